"""Placeholder: being written (remove this line when implemented)."""


def batch_hessian_extremes(*args, **kwargs):
    raise NotImplementedError("batch_hessian_extremes")

"""Placeholder: being written (remove this line when implemented)."""


def lr_scaling_exponent(*args, **kwargs):
    raise NotImplementedError("lr_scaling_exponent")

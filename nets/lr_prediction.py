"""Placeholder: being written (remove this line when implemented)."""


def predict_max_lr(*args, **kwargs):
    raise NotImplementedError("predict_max_lr")

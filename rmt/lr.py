"""Placeholder: being written (remove this line when implemented)."""


def sgd_max_lr(*args, **kwargs):
    raise NotImplementedError("sgd_max_lr")


def critical_batch_size(*args, **kwargs):
    raise NotImplementedError("critical_batch_size")


def adam_max_lr(*args, **kwargs):
    raise NotImplementedError("adam_max_lr")


def min_damping(*args, **kwargs):
    raise NotImplementedError("min_damping")


def heavy_ball(*args, **kwargs):
    raise NotImplementedError("heavy_ball")

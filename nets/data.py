"""Placeholder: being written (remove this line when implemented)."""


def load_cifar(*args, **kwargs):
    raise NotImplementedError("load_cifar")


def load_digits(*args, **kwargs):
    raise NotImplementedError("load_digits")

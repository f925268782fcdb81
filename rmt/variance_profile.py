"""Placeholder: being written (remove this line when implemented)."""


def profile_edge(*args, **kwargs):
    raise NotImplementedError("profile_edge")


def profile_outlier(*args, **kwargs):
    raise NotImplementedError("profile_outlier")

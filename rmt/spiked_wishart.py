"""Placeholder: being written (remove this line when implemented)."""


def spiked_wishart_outlier(*args, **kwargs):
    raise NotImplementedError("spiked_wishart_outlier")


def spiked_wishart_overlap(*args, **kwargs):
    raise NotImplementedError("spiked_wishart_overlap")

"""Placeholder: being written (remove this line when implemented)."""


def spiked_wigner_outlier(*args, **kwargs):
    raise NotImplementedError("spiked_wigner_outlier")


def spiked_wigner_overlap(*args, **kwargs):
    raise NotImplementedError("spiked_wigner_overlap")

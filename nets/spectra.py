"""Placeholder: being written (remove this line when implemented)."""


def top_eigenvalues(*args, **kwargs):
    raise NotImplementedError("top_eigenvalues")

"""Placeholder: being written (remove this line when implemented)."""


def measure_batch_top_eigenvalue(*args, **kwargs):
    raise NotImplementedError("measure_batch_top_eigenvalue")


def predict_batch_top_eigenvalue(*args, **kwargs):
    raise NotImplementedError("predict_batch_top_eigenvalue")

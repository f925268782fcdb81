"""nets: curvature of real networks, measured (THEORY.md §1, §3–§6).

Data flows model + data → operator → algorithm → result. CPU by default; pass
`device="cuda"` to run on a GPU.
"""

from .data import load_cifar, load_digits
from .spectra import top_eigenvalues
from .batch_spectra import measure_batch_top_eigenvalue, predict_batch_top_eigenvalue
from .lr_prediction import predict_max_lr

__all__ = [
    "load_cifar",
    "load_digits",
    "top_eigenvalues",
    "measure_batch_top_eigenvalue",
    "predict_batch_top_eigenvalue",
    "predict_max_lr",
]

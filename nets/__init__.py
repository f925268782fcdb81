"""nets: curvature of real networks, measured (THEORY.md §1, §3–§6).

Data flows model + data → operator → algorithm → result. CPU by default; pass
`device="cuda"` to run on a GPU.

The fixed entry points (PRODUCT.md) are re-exported here together with the objects
a user composes them from: operators (`hessian_operator`, `ggn_operator`,
`batch_hessian_operator`, `fluctuation_operator`), algorithms (`lanczos`, `eigsh`,
`slq_density`, `hutchinson_trace`), noise estimators (`directional_noise`,
`isotropic_noise`), learning-rate tables (`lr_table`, `fit_scaling_exponent`) and the
on-the-fly learner (`CurvatureAdaptiveSGD`).
"""

from .data import load_cifar, load_digits
from .operators import (
    CurvatureOperator,
    batch_ggn_operator,
    batch_hessian_operator,
    fluctuation_operator,
    ggn_operator,
    hessian_operator,
)
from .lanczos import eigsh, lanczos
from .slq import slq_density
from .hutchinson import hutchinson_trace
from .noise import directional_noise, isotropic_noise
from .spectra import bottom_eigenvalues, top_eigenvalues
from .batch_spectra import measure_batch_top_eigenvalue, predict_batch_top_eigenvalue
from .lr_prediction import fit_scaling_exponent, lr_table, predict_max_lr
from .learner import CurvatureAdaptiveSGD

__all__ = [
    "load_cifar",
    "load_digits",
    "CurvatureOperator",
    "hessian_operator",
    "ggn_operator",
    "batch_hessian_operator",
    "batch_ggn_operator",
    "fluctuation_operator",
    "lanczos",
    "eigsh",
    "slq_density",
    "hutchinson_trace",
    "directional_noise",
    "isotropic_noise",
    "top_eigenvalues",
    "bottom_eigenvalues",
    "measure_batch_top_eigenvalue",
    "predict_batch_top_eigenvalue",
    "lr_table",
    "fit_scaling_exponent",
    "predict_max_lr",
    "CurvatureAdaptiveSGD",
]

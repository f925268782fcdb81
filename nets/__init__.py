"""nets: curvature of real networks, measured (docs/theory.md §1, §3–§6).

Data flows model + data → operator → algorithm → result. CPU by default; pass
`device="cuda"` to run on a GPU.

The fixed public entry points (see the README) are re-exported here together with the objects
a user composes them from: operators (`hessian_operator`, `ggn_operator`,
`batch_hessian_operator`, `fluctuation_operator`), algorithms (`lanczos`, `eigsh`,
`slq_density`, `hutchinson_trace`), noise estimators (`directional_noise`,
`isotropic_noise`), learning-rate tables (`lr_table`, `fit_scaling_exponent`) and the
on-the-fly learner (`CurvatureAdaptiveSGD`).
"""

import sys as _sys

from nets.algorithms.hutchinson import hutchinson_trace
from nets.algorithms.lanczos import eigsh, lanczos
from nets.algorithms.slq import slq_density
from nets.algorithms.spectra import bottom_eigenvalues, top_eigenvalues
from nets.curvature.loss_check import check_mean_reduced
from nets.curvature.operators import (
    CurvatureOperator,
    batch_ggn_operator,
    batch_hessian_operator,
    fluctuation_operator,
    ggn_operator,
    hessian_operator,
)

# modules users reach by name (`nets.lr_search.lr_sweep`, `nets.stability...`)
from nets.learning_rates import (  # noqa: F401
    learner,
    least_squares,
    lr_prediction,
    lr_search,
    stability,
)
from nets.learning_rates.adam import (
    adam_noise_floor_lr,
    adam_threshold,
    adam_transfer_lr,
    preconditioned_batch_sharpness,
    predict_adam_max_lr,
)
from nets.learning_rates.adam_linearized import linearized_adam_threshold
from nets.learning_rates.learner import CurvatureAdaptiveSGD
from nets.learning_rates.linearized import linearized_threshold
from nets.learning_rates.lr_prediction import (
    OptimizerSettings,
    fit_scaling_exponent,
    lr_table,
    optimizer_settings,
    predict_max_lr,
)
from nets.learning_rates.monitor import CurvatureMonitor, eoss_plateau
from nets.learning_rates.sharpness_gap import sharpness_gap_terms, stochastic_sharpness_gap
from nets.learning_rates.transfer import transfer_lr
from nets.noise import batch_spectra, resolved_noise, subspace_noise  # noqa: F401
from nets.noise.batch_spectra import measure_batch_top_eigenvalue, predict_batch_top_eigenvalue
from nets.noise.directional import directional_noise, isotropic_noise

# the function, not its module (which `nets.noise` shadows with it): `nets.gradient_noise(...)`
from nets.noise.gradient_noise import gradient_noise
from nets.noise.resolved_noise import resolved_noise_from_operator
from nets.training import data, models  # noqa: F401
from nets.training.data import load_cifar, load_digits
from nets.utils.data_source import DataSource, as_data_source

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
    "gradient_noise",
    "top_eigenvalues",
    "bottom_eigenvalues",
    "measure_batch_top_eigenvalue",
    "predict_batch_top_eigenvalue",
    "lr_table",
    "fit_scaling_exponent",
    "predict_max_lr",
    "transfer_lr",
    "linearized_threshold",
    "linearized_adam_threshold",
    "CurvatureAdaptiveSGD",
    "CurvatureMonitor",
    "adam_threshold",
    "adam_transfer_lr",
    "adam_noise_floor_lr",
    "predict_adam_max_lr",
    "preconditioned_batch_sharpness",
    "resolved_noise_from_operator",
    "eoss_plateau",
    "sharpness_gap_terms",
    "stochastic_sharpness_gap",
    "OptimizerSettings",
    "optimizer_settings",
    "check_mean_reduced",
    "DataSource",
    "as_data_source",
]

# ... and import by that name: `from nets.lr_search import training_threshold`
for _name in ("learner", "least_squares", "lr_prediction", "lr_search", "stability"):
    _sys.modules.setdefault(f"nets.{_name}", globals()[_name])
del _name

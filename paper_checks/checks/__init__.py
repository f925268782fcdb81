"""One module per claim of the paper, in the paper's order.

Each module defines NAME, CLAIM, REQUIRES ('module:attr' it needs from rmt/nets),
`run(ctx) -> CheckResult` and `plot(result) -> matplotlib Figure` (drawn only from the
result's stored series). `DEFAULT` is what `python -m paper_checks` runs; `PAPER_SCALE`
adds the GPU-sized CIFAR-100 checks of `--scale paper`.
"""

from __future__ import annotations

import importlib
import importlib.util

_DEFAULT_NAMES = [
    "batch_hessian_top",
    "batch_hessian_bottom",
    "eigenvector_overlap",
    "variance_profile",
    "ggn_wishart",
    "network_batch_spectra",
    "sgd_scaling_least_squares",
    "sgd_scaling_mlp",
    "lr_transfer",
    "stability_onset",
    "adam_sqrt_scaling",
    "adam_real_training",
    "damping_inverse_batch",
    "symbolic_derivations",
    "edge_of_stochastic_stability",
]
_OPTIONAL = {"on_the_fly_learner": "nets.learning_rates.learner"}   # included only if the module exists
_PAPER_SCALE_NAMES = ["cifar_batch_spectra"]


def _load(names):
    return [importlib.import_module(f"{__name__}.{n}") for n in names]


def default_names() -> list[str]:
    names = list(_DEFAULT_NAMES)
    for check, dep in _OPTIONAL.items():
        try:
            present = importlib.util.find_spec(dep) is not None
        except (ImportError, ValueError):
            present = False
        if present:
            names.append(check)
    return names


def all_names(scale: str = "default") -> list[str]:
    return default_names() + (_PAPER_SCALE_NAMES if scale == "paper" else [])


def load(names) -> list:
    return _load(names)


def by_name(name: str):
    known = set(_DEFAULT_NAMES) | set(_OPTIONAL) | set(_PAPER_SCALE_NAMES)
    if name not in known:
        raise KeyError(name)
    return importlib.import_module(f"{__name__}.{name}")

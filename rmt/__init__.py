"""rmt: random-matrix models of batch-size-dependent curvature (docs/theory.md §1–§5).

Conventions used throughout: Stieltjes transform g(z) = ∫ dμ(x)/(x − z) (so g < 0 to
the right of the support); Wishart ratio q = p/n; c(B, N) = 1/B − 1/N.
"""

from . import lr, symbolic
from .batch_hessian import batch_hessian_extremes
from .sampling import batch_noise_factor
from .spiked_wigner import spiked_wigner_outlier, spiked_wigner_overlap
from .spiked_wishart import spiked_wishart_outlier, spiked_wishart_overlap
from .tridiagonal import sample_spiked_goe_top
from .variance_profile import profile_edge, profile_outlier

__all__ = [
    "batch_noise_factor",
    "spiked_wigner_outlier",
    "spiked_wigner_overlap",
    "spiked_wishart_outlier",
    "spiked_wishart_overlap",
    "batch_hessian_extremes",
    "profile_edge",
    "profile_outlier",
    "sample_spiked_goe_top",
    "lr",
    "symbolic",
]

"""Learning rates: predicted stability limits and tables, measured real-training
thresholds (bisection), the exact mean-square stability oracle, least-squares problems
with known answers, and the on-the-fly curvature-adaptive learner."""

from nets.learning_rates.learner import CurvatureAdaptiveSGD
from nets.learning_rates.lr_prediction import LRTable, fit_scaling_exponent, lr_table, predict_max_lr

__all__ = ["CurvatureAdaptiveSGD", "LRTable", "fit_scaling_exponent", "lr_table", "predict_max_lr"]

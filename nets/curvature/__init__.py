"""Curvature operators: matrix-free H, G, H_B, G_B and ε = H_B − H of a network's loss,
the parameter layout they act on, their sharded (torch.distributed) form, and per-sample
output Jacobians used without forming them (`SampleJacobians`)."""

from nets.curvature.operators import (
    CurvatureOperator,
    ModelCurvatureOperator,
    batch_ggn_operator,
    batch_hessian_operator,
    curvature_operator,
    fluctuation_operator,
    ggn_operator,
    hessian_operator,
)
from nets.curvature.sample_jacobians import SampleJacobians

__all__ = ["CurvatureOperator", "ModelCurvatureOperator", "hessian_operator", "ggn_operator",
           "batch_hessian_operator", "batch_ggn_operator", "fluctuation_operator",
           "curvature_operator", "SampleJacobians"]

"""Batch noise and the forms of λ'_1(B): per-sample curvature noise along the outlier
directions (directional, isotropic, subspace, sample-resolved), per-sample gradient
noise, and the batch Hessian's top eigenvalue measured and predicted."""

from nets.noise.batch_spectra import (
    FORMS,
    BatchTopEigenvaluePrediction,
    BatchTopEigenvalues,
    FormCurve,
    directional_form,
    isotropic_form,
    measure_batch_top_eigenvalue,
    predict_batch_top_eigenvalue,
    resolved_form,
    subspace_form,
)
from nets.noise.directional import (
    NoiseEstimate,
    directional_noise,
    directional_noise_from_operator,
    isotropic_noise,
    isotropic_noise_from_operator,
)
from nets.noise.gradient_noise import GradientNoise, gradient_noise, per_sample_gradients

__all__ = ["measure_batch_top_eigenvalue", "predict_batch_top_eigenvalue", "FORMS",
           "BatchTopEigenvaluePrediction", "BatchTopEigenvalues", "FormCurve", "directional_form",
           "isotropic_form", "resolved_form", "subspace_form", "NoiseEstimate",
           "directional_noise", "directional_noise_from_operator", "isotropic_noise",
           "isotropic_noise_from_operator", "GradientNoise", "gradient_noise",
           "per_sample_gradients"]

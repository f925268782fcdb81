"""Algorithms on curvature operators: Lanczos and thick-restart eigsh, stochastic Lanczos
quadrature (spectral density), Hutchinson traces, and extremal eigenvalues of a model."""

from nets.algorithms.hutchinson import hutchinson_trace
from nets.algorithms.lanczos import EigenResult, LanczosResult, eigsh, lanczos, lanczos_batch
from nets.algorithms.slq import SpectralDensity, slq_density
from nets.algorithms.spectra import bottom_eigenvalues, extremal_eigenpairs, top_eigenvalues

__all__ = ["hutchinson_trace", "EigenResult", "LanczosResult", "eigsh", "lanczos",
           "lanczos_batch", "SpectralDensity", "slq_density", "bottom_eigenvalues",
           "extremal_eigenpairs", "top_eigenvalues"]

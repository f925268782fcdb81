"""Reliability by class of bad input, across every public function of `rmt` (and the
`nets` entry points' scalar and list arguments).

Each class of the reliability issue is one property test, drawn by hypothesis over the
functions and arguments below:

* numpy scalars and 0-d arrays of a valid value give exactly the plain call's result;
  0-d arrays / numpy scalars holding a bool, a string, None or a complex are refused
  (TypeError naming the argument), exactly like the bare value;
* elements of list arguments: a string, bool, None, complex or nested list anywhere in
  a list is refused with a TypeError (ValueError for a ragged nesting) naming the
  argument — never converted, never reported as "NaN or inf";
* extreme values (±1e300, 2**63, 10**400, 5e-324, ...) either give a finite answer or
  a ValueError/TypeError whose message names one of the caller's own arguments; never
  an OverflowError / ZeroDivisionError, never NaN;
* seeds: an int is used as is; a numpy Generator yields one int drawn from it.

The oracle is the plain call with Python floats (numpy scalars must agree bit for bit)
and the function's own signature (the argument names a message may use).
"""

import inspect
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import rmt
from rmt import batch_hessian as BH
from rmt import ensembles as E
from rmt import free_convolution as FC
from rmt import lr as L
from rmt import marchenko_pastur as MP
from rmt import outliers as O
from rmt import semicircle as SC
from rmt import spiked_wigner as SW
from rmt import spiked_wishart as SWi
from rmt import tracy_widom as TW
from rmt import tridiagonal as T
from rmt import validation as V
from rmt import variance_profile as VP

S2 = [[1.0, 0.5], [0.5, 2.0]]
F2 = [0.4, 0.6]
W2 = [0.3, 0.7]
SUPPORT = (-2.0, 2.0)

# name -> (function, valid keyword arguments). Every public function of rmt's modules.
RMT = {
    "batch_noise_variance": (BH.batch_noise_variance, dict(sigma2=1e-3, P=100, B=8, N=64)),
    "batch_hessian_extremes": (BH.batch_hessian_extremes,
                               dict(lam_top=1.0, lam_bottom=-0.5, sigma2=1e-3, P=100, B=8, N=64)),
    "goe": (E.goe, dict(n=4, rng=0)),
    "gue": (E.gue, dict(n=4, rng=0)),
    "wishart": (E.wishart, dict(p=3, n=5, rng=0, variance=1.0, population=[1.0, 2.0, 0.5])),
    "check_profile": (E.check_profile, dict(block_variances=S2, block_fractions=F2)),
    "block_sizes": (E.block_sizes, dict(P=10, block_fractions=F2)),
    "profile_wigner": (E.profile_wigner, dict(P=6, block_variances=S2, block_fractions=F2, rng=0)),
    "spiked_additive": (E.spiked_additive, dict(H=np.eye(3), spike=2.0, vector=[1.0, 0.0, 1.0])),
    "spiked_multiplicative": (E.spiked_multiplicative, dict(G=np.eye(2) * 2.0, W=[[1.0, 0.5], [0.5, 1.0]])),
    "discrete_stieltjes": (FC.discrete_stieltjes, dict(z=[3.0, 4.0], atoms=[0.0, 1.0], weights=[0.5, 0.5])),
    "semicircle_free_convolution": (FC.semicircle_free_convolution,
                                    dict(z=[3.0 + 1.0j], atoms=[0.0, 1.0], weights=[0.5, 0.5], noise_var=1.0)),
    "semicircle_free_convolution_density": (FC.semicircle_free_convolution_density,
                                            dict(x=[0.0, 0.5], atoms=[0.0, 1.0], weights=[0.5, 0.5],
                                                 noise_var=1.0)),
    "semicircle_free_convolution_edges": (FC.semicircle_free_convolution_edges,
                                          dict(atoms=[0.0, 1.0], weights=[0.5, 0.5], noise_var=1.0)),
    "semicircle_free_convolution_outlier": (FC.semicircle_free_convolution_outlier,
                                            dict(spike=5.0, atoms=[0.0, 1.0], weights=[0.5, 0.5],
                                                 noise_var=1.0)),
    "sc_mp_inverse": (FC.sc_mp_inverse, dict(G=[0.2, 0.3], s2=1.0, ratio=0.5)),
    "sc_mp_edges": (FC.sc_mp_edges, dict(s2=1.0, ratio=0.5)),
    "sc_mp_density": (FC.sc_mp_density, dict(x=[0.5, 1.0], s2=1.0, ratio=0.5)),
    "noise_factor": (L.noise_factor, dict(B=[8, 16], N=64)),
    "batch_curvature": (L.batch_curvature, dict(B=[8, 16], lam=1.0, s2=2.0, N=64)),
    "isotropic_batch_curvature": (L.isotropic_batch_curvature, dict(B=[8, 16], lam=1.0, sigma2=1e-3,
                                                                    P=100, N=64)),
    "momentum_factor": (L.momentum_factor, dict(beta=0.5)),
    "sgd_max_lr": (L.sgd_max_lr, dict(B=[8, 16], lam=1.0, s2=2.0, N=64, momentum=0.5)),
    "sgd_max_lr_isotropic": (L.sgd_max_lr_isotropic, dict(B=[8, 16], lam=1.0, sigma2=1e-3, P=100,
                                                          N=64, momentum=0.5)),
    "momentum_noise_gain": (L.momentum_noise_gain, dict(momentum=0.5)),
    "sgd_momentum_ms_max_lr": (L.sgd_momentum_ms_max_lr, dict(B=[8, 16], lam=1.0, s2=2.0, N=64, momentum=0.5)),
    "sgd_nesterov_ms_max_lr": (L.sgd_nesterov_ms_max_lr, dict(B=[8, 16], lam=1.0, s2=2.0, N=64, momentum=0.5)),
    "momentum_effective_curvature": (L.momentum_effective_curvature,
                                     dict(lam=1.0, batch_curvature=[1.5, 3.0], momentum=0.5,
                                          nesterov=True)),
    "heavy_ball_lyapunov_exponent": (L.heavy_ball_lyapunov_exponent,
                                     dict(lr=[0.5, 1.0], lam=1.0, var=0.5, momentum=0.5, steps=50)),
    "sgd_momentum_as_max_lr": (L.sgd_momentum_as_max_lr, dict(B=[8, 16], lam=1.0, s2=2.0, N=64,
                                                              momentum=0.5, steps=50)),
    "critical_batch_size": (L.critical_batch_size, dict(lam=1.0, s2=2.0)),
    "adam_max_lr": (L.adam_max_lr, dict(B=[8, 16], lam=1.0, s2=2.0, grad_mean_sq=0.1, grad_var=1.0,
                                        N=64, eps=1e-8, beta1=0.9)),
    "adam_ms_max_lr": (L.adam_ms_max_lr, dict(B=[8, 16], lam=1.0, s2=2.0, N=64, beta1=0.9)),
    "min_damping": (L.min_damping, dict(lr=0.1, lam_noise=2.0)),
    "min_damping_at_batch": (L.min_damping_at_batch, dict(lr=0.1, lam_noise_ref=2.0, B_ref=8, B=[16, 32],
                                                          N=64, power=1.0)),
    "heavy_ball": (L.heavy_ball, dict(lam_max=10.0, lam_min=0.1)),
    "underlying_curvature": (L.underlying_curvature, dict(lam_measured=3.0, B=8, s2=2.0, N=64)),
    "rescale_curvature": (L.rescale_curvature, dict(lam_measured=3.0, B_from=8, B_to=[16, 32], s2=2.0, N=64)),
    "mccandlish_b_simple": (L.mccandlish_b_simple, dict(trace_sigma=2.0, grad_sq_norm=0.5)),
    "mccandlish_b_noise": (L.mccandlish_b_noise, dict(trace_h_sigma=2.0, g_h_g=0.5)),
    "mccandlish_eps_max": (L.mccandlish_eps_max, dict(grad_sq_norm=0.5, g_h_g=0.25)),
    "mccandlish_optimal_lr": (L.mccandlish_optimal_lr, dict(B=[8, 16], eps_max=0.5, b_noise=10.0, N=64)),
    "mccandlish_two_batch_estimate": (L.mccandlish_two_batch_estimate,
                                      dict(B_small=8, sq_norm_small=2.0, B_big=32, sq_norm_big=1.0, N=64)),
    "malladi_adam_scaling": (L.malladi_adam_scaling, dict(kappa=2.0, lr=1e-3, beta1=0.9, beta2=0.999,
                                                          eps=1e-8)),
    "mp_edges": (MP.mp_edges, dict(ratio=0.5, variance=1.0)),
    "mp_atom": (MP.mp_atom, dict(ratio=2.0)),
    "mp_density": (MP.mp_density, dict(x=[0.5, 1.0], ratio=0.5, variance=1.0)),
    "mp_stieltjes": (MP.mp_stieltjes, dict(z=[4.0, 5.0], ratio=0.5, variance=1.0)),
    "mp_stieltjes_derivative": (MP.mp_stieltjes_derivative, dict(z=[4.0, 5.0], ratio=0.5, variance=1.0)),
    "find_outlier": (O.find_outlier, dict(spike=2.0, stieltjes=SC.semicircle_stieltjes, support=SUPPORT)),
    "outlier_location": (O.outlier_location, dict(spike=2.0, stieltjes=SC.semicircle_stieltjes,
                                                  support=SUPPORT)),
    "outlier_overlap": (O.outlier_overlap, dict(spike=2.0, stieltjes=SC.semicircle_stieltjes,
                                                support=SUPPORT)),
    "batch_noise_factor": (rmt.batch_noise_factor, dict(B=8, N=64)),
    "semicircle_edges": (SC.semicircle_edges, dict(variance=1.0)),
    "semicircle_density": (SC.semicircle_density, dict(x=[0.0, 0.5], variance=1.0)),
    "semicircle_stieltjes": (SC.semicircle_stieltjes, dict(z=[3.0, 4.0], variance=1.0)),
    "semicircle_stieltjes_derivative": (SC.semicircle_stieltjes_derivative, dict(z=[3.0, 4.0], variance=1.0)),
    "spiked_wigner_outlier": (SW.spiked_wigner_outlier, dict(spike=2.0, noise_var=1.0)),
    "spiked_wigner_overlap": (SW.spiked_wigner_overlap, dict(spike=2.0, noise_var=1.0)),
    "spiked_wigner_outlier_variance": (SW.spiked_wigner_outlier_variance,
                                       dict(spike=2.0, noise_var=1.0, n=100, beta=1.0)),
    "spiked_wishart_outlier": (SWi.spiked_wishart_outlier, dict(spike=3.0, ratio=0.5, noise_var=1.0)),
    "spiked_wishart_overlap": (SWi.spiked_wishart_overlap, dict(spike=3.0, ratio=0.5, noise_var=1.0)),
    "spiked_wishart_outlier_variance": (SWi.spiked_wishart_outlier_variance,
                                        dict(spike=3.0, ratio=0.5, n=100, noise_var=1.0, beta=1.0)),
    "tw_edge_mean": (TW.tw_edge_mean, dict(n=100, beta=1, radius=2.0)),
    "tw_edge_std": (TW.tw_edge_std, dict(n=100, beta=1, radius=2.0)),
    "hermite_tridiagonal": (T.hermite_tridiagonal, dict(n=5, beta=1.0, rng=0)),
    "laguerre_tridiagonal": (T.laguerre_tridiagonal, dict(p=3, n=5, beta=1.0, rng=0, spike=2.0)),
    "tridiagonal_eigvals": (T.tridiagonal_eigvals, dict(diag=[1.0, 2.0, 3.0], off=[0.5, 0.5])),
    "sample_spiked_goe_top": (T.sample_spiked_goe_top, dict(n=20, spike=2.0, rng=0)),
    "sample_spiked_wishart_top": (T.sample_spiked_wishart_top, dict(p=5, n=10, spike=3.0, rng=0)),
    "solve_qve_real": (VP.solve_qve_real, dict(z=5.0, block_variances=S2, block_fractions=F2)),
    "solve_qve": (VP.solve_qve, dict(z=[1.0 + 1.0j], block_variances=S2, block_fractions=F2)),
    "profile_density": (VP.profile_density, dict(x=[0.0, 0.5], block_variances=S2, block_fractions=F2)),
    "profile_edge": (rmt.profile_edge, dict(block_variances=S2, block_fractions=F2)),
    "profile_outlier": (rmt.profile_outlier, dict(spike=3.0, block_variances=S2, block_fractions=F2,
                                                  spike_block_weights=W2)),
    "profile_outlier_overlap": (VP.profile_outlier_overlap, dict(spike=3.0, block_variances=S2,
                                                                 block_fractions=F2, spike_block_weights=W2)),
}

SEEDS = {"rng", "seed"}


def _public_rmt_functions():
    import importlib
    import pkgutil
    out = set()
    for m in pkgutil.iter_modules(rmt.__path__):
        if m.name in ("validation", "symbolic"):
            continue
        mod = importlib.import_module(f"rmt.{m.name}")
        for n, f in vars(mod).items():
            if not n.startswith("_") and inspect.isfunction(f) and f.__module__ == mod.__name__:
                out.add(n)
    return out


def test_the_table_covers_every_public_rmt_function():
    assert _public_rmt_functions() <= set(RMT), _public_rmt_functions() - set(RMT)


def _args(kind):
    """(function name, argument) pairs whose valid value is of `kind`."""
    out = []
    for fname, (_fn, kw) in RMT.items():
        for a, v in kw.items():
            if a in SEEDS or callable(v) or a == "support":
                continue
            if kind == "scalar" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append((fname, a))
            if kind == "array" and isinstance(v, (list, tuple, np.ndarray)):
                out.append((fname, a))
    return out


SCALARS = _args("scalar")
ARRAYS = _args("array")


def names(arg: str) -> str:
    return rf"(?<![A-Za-z_]){re.escape(arg)}(?![A-Za-z_])"


def _same(a, b):
    """Bit-for-bit equality of two results (floats, tuples, arrays, result objects)."""
    if hasattr(a, "__dataclass_fields__"):
        return all(_same(getattr(a, k), getattr(b, k)) for k in a.__dataclass_fields__)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype.kind not in "biufc" or b.dtype.kind not in "biufc":
        return a.shape == b.shape and bool(np.all(a == b))
    return np.array_equal(a, b, equal_nan=True)


def _call(fname, **changes):
    fn, kw = RMT[fname]
    return fn(**{**kw, **changes})


SET = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- class 1: numpy scalars and 0-d arrays ---------------------------------------

def _numpy_forms(v):
    forms = [np.float64(v), np.array(float(v)), np.array(v)]
    if isinstance(v, int):
        forms += [np.int64(v), np.int32(v), np.uint16(v) if v >= 0 else np.int16(v), np.array(v, dtype=np.int64)]
    return forms


@pytest.mark.parametrize("fname, arg", SCALARS, ids=[f"{f}-{a}" for f, a in SCALARS])
def test_numpy_scalars_and_0d_arrays_of_a_valid_value_give_the_same_result(fname, arg):
    fn, kw = RMT[fname]
    v = kw[arg]
    plain = fn(**kw)
    for form in _numpy_forms(v):
        assert _same(fn(**{**kw, arg: form}), plain), (fname, arg, form)


BAD_0D = st.sampled_from([np.array(True), np.array(False), np.bool_(True), np.array("1.0"),
                          np.str_("2"), np.array(None, dtype=object), np.array(1.0 + 1.0j),
                          np.complex128(2.0), np.array(b"3"), np.array([1.0, 2.0], dtype=object)[0:0],
                          np.array(object(), dtype=object)])


@SET
@given(case=st.sampled_from(SCALARS), bad=BAD_0D)
def test_0d_arrays_holding_a_non_number_are_refused_like_the_bare_value(case, bad):
    fname, arg = case
    with pytest.raises((TypeError, ValueError), match=names(arg)):
        _call(fname, **{arg: bad})
    if bad.ndim == 0 and bad.dtype.kind in "bUSOc":
        with pytest.raises(TypeError, match=names(arg)):
            _call(fname, **{arg: bad})


# ---- class 2: elements of list arguments -----------------------------------------

BAD_ELEMENT = st.sampled_from(["8", "1.5", b"2", True, False, np.bool_(True), None, 1.0 + 2.0j,
                               object(), {"a": 1}])


def _replace_element(value, pos, bad):
    arr = np.asarray(value)
    lst = arr.tolist()
    flat = arr.size
    i = pos % flat
    if arr.ndim == 1:
        lst[i] = bad
    else:
        lst[i // arr.shape[1]][i % arr.shape[1]] = bad
    return lst


@SET
@given(case=st.sampled_from(ARRAYS), pos=st.integers(0, 10**6), bad=BAD_ELEMENT)
def test_a_non_number_inside_a_list_is_a_type_error_naming_the_argument(case, pos, bad):
    fname, arg = case
    if isinstance(bad, complex) and (arg in ("z", "G") and fname != "solve_qve_real"):
        return   # complex is a valid element of a complex argument (z)
    value = _replace_element(RMT[fname][1][arg], pos, bad)
    with pytest.raises(TypeError, match=names(arg)) as info:
        _call(fname, **{arg: value})
    assert "NaN" not in str(info.value)


@SET
@given(case=st.sampled_from(ARRAYS), pos=st.integers(0, 10**6))
def test_ragged_nesting_inside_a_list_is_refused_naming_the_argument(case, pos):
    fname, arg = case
    value = _replace_element(RMT[fname][1][arg], pos, 0.0)
    arr = np.asarray(RMT[fname][1][arg])
    if arr.ndim == 1:
        value[pos % len(value)] = [1.0, 2.0]
        if len(value) == 1:          # [[1, 2]] alone is a regular (1, 2) array, not ragged
            value.append(0.0)
    else:
        value[pos % len(value)] = value[pos % len(value)] + [1.0]
    with pytest.raises((TypeError, ValueError), match=names(arg)):
        _call(fname, **{arg: value})


@pytest.mark.parametrize("bad", [["8", "16"], [True, 16], [None, 16], [8, "16"], [8.0, np.bool_(False)]])
def test_list_of_batch_sizes_with_non_numbers_is_refused(bad):
    for call in (lambda: L.sgd_max_lr(bad, 1.0, 2.0, N=64), lambda: L.noise_factor(bad),
                 lambda: V.as_batch_sizes(bad), lambda: L.adam_max_lr(bad, 1.0, 1.0, 0.1, 1.0)):
        with pytest.raises(TypeError, match=r"(?<![A-Za-z_])(B|batch_sizes)(?![A-Za-z_])"):
            call()


# ---- class 3: huge and tiny values ----------------------------------------------

EXTREMES = (1e300, -1e300, 1.7976931348623157e308, -1.7976931348623157e308,
            2.0 ** 63, 2 ** 63, 2 ** 64 + 1, 10 ** 400, -(10 ** 400), 1e-300, -1e-300,
            5e-324, -5e-324, 0.0, -0.0, np.float64(1e300), np.int64(2 ** 62),
            np.uint64(2 ** 64 - 1), np.float32(3e38))

RAW = (OverflowError, ZeroDivisionError, FloatingPointError, ArithmeticError, MemoryError, RecursionError,
       IndexError, KeyError, AttributeError)


def _finite_or_named(fname, arg, run):
    """Either a result without NaN, or a ValueError/TypeError naming a parameter."""
    fn = RMT[fname][0]
    params = list(inspect.signature(fn).parameters)
    try:
        with np.errstate(over="ignore", under="ignore", divide="ignore", invalid="ignore"):
            out = run()
    except (ValueError, TypeError) as exc:
        assert not isinstance(exc, RAW)
        msg = str(exc)
        assert any(re.search(names(p), msg) for p in params), (fname, arg, msg)
        return "named"
    except RAW as exc:  # pragma: no cover - the failure being tested for
        pytest.fail(f"{fname}({arg}=extreme) raised raw {type(exc).__name__}: {exc}")
    vals = _numbers(out)
    assert not np.any(np.isnan(vals)), (fname, arg, out)
    return "finite"


def _numbers(out):
    if hasattr(out, "__dataclass_fields__"):
        return np.concatenate([_numbers(getattr(out, k)) for k in out.__dataclass_fields__] or [[]])
    if isinstance(out, dict):
        return np.concatenate([_numbers(v) for v in out.values()] or [[]])
    if isinstance(out, (tuple, list)):
        return np.concatenate([_numbers(v) for v in out] or [[]])
    a = np.asarray(out)
    if a.dtype.kind == "c":
        return np.concatenate([a.real.ravel(), a.imag.ravel()])
    return a.astype(float).ravel() if a.dtype.kind in "biuf" else np.zeros(0)


# Every (function, argument) × every extreme value, deterministically (≈ 3,000 cheap calls
# in ≈ 5 s): a random sample of them (hypothesis, 60 examples) passed for months and then
# found `profile_outlier(spike=1.8e308)` raising a bare RuntimeError on one CI run.
@pytest.mark.parametrize("x", EXTREMES, ids=[f"x{i}" for i in range(len(EXTREMES))])
def test_extreme_scalars_give_a_finite_answer_or_an_error_naming_an_argument(x):
    for fname, arg in SCALARS:
        assert _finite_or_named(fname, arg, lambda: _call(fname, **{arg: x})) in ("finite", "named")


@pytest.mark.parametrize("x", EXTREMES, ids=[f"x{i}" for i in range(len(EXTREMES))])
def test_extreme_list_elements_give_a_finite_answer_or_an_error_naming_an_argument(x):
    for fname, arg in ARRAYS:
        base = RMT[fname][1][arg]
        for pos in sorted({0, 7 % int(np.size(base)), int(np.size(base)) - 1}):
            value = _replace_element(base, pos, x)
            assert _finite_or_named(fname, arg, lambda: _call(fname, **{arg: value})) in (
                "finite", "named")


@pytest.mark.parametrize("B", [1e300, 2 ** 63, 2.0 ** 63, 10 ** 400, np.float64(1e300)])
def test_huge_batch_sizes_are_value_errors_naming_the_argument(B):
    with pytest.raises(ValueError, match=names("batch_sizes")):
        V.as_batch_sizes([8, B])
    with pytest.raises(ValueError, match=names("B")):
        rmt.batch_noise_factor(B, 64)
    # without N, c = 1/B is a finite (tiny) number, and λ' = λ
    if not (type(B) is int and B > 10 ** 308):
        assert L.sgd_max_lr([B], 1.0, 2.0)[0] == pytest.approx(2.0)


def test_an_overflowing_product_is_reported_under_the_callers_arguments():
    with pytest.raises(ValueError, match=r"sigma2.*P") as info:
        rmt.batch_hessian_extremes(1.0, -1.0, 1e300, 1e300, 1, None)
    assert not re.search(names("noise_var"), str(info.value))
    with pytest.raises(ValueError, match=r"(?<![A-Za-z_])(lam|s2)(?![A-Za-z_])") as info:
        L.critical_batch_size(1e-300, 1e300)


# ---- valid degenerate input: exact answers ---------------------------------------

def test_degenerate_valid_input_gives_exact_results():
    assert rmt.batch_noise_factor(64, 64) == 0.0
    assert rmt.batch_hessian_extremes(np.float64(1.0), np.array(-0.5), 0.0, np.int64(100), 8, 64) == (1.0, -0.5)
    assert rmt.batch_hessian_extremes(1.0, -0.5, 1.0, 100, np.array(64), np.int32(64)) == (1.0, -0.5)
    assert rmt.spiked_wigner_outlier(np.float64(0.0), np.array(0.0)) == 0.0
    assert L.sgd_max_lr(np.array([64]), 2.0, 5.0, N=64)[0] == 1.0
    assert V.as_batch_sizes(np.array(8)).tolist() == [8]
    assert V.as_batch_sizes([np.int64(8), 16.0, np.array(32)]).tolist() == [8, 16, 32]
    assert V.as_int("n", 2 ** 63 - 1) == 2 ** 63 - 1
    assert V.as_float("x", 10 ** 300) == 1e300
    assert rmt.profile_edge(np.array([[1.0]]), np.array([1.0])) == pytest.approx(2.0, rel=1e-12)
    assert SC.semicircle_density([], 1.0).shape == (0,)


# ---- seeds -----------------------------------------------------------------------

def test_as_seed_rule_int_as_is_generator_yields_one_draw():
    assert V.as_seed("seed", 7) == 7 and type(V.as_seed("seed", np.int64(7))) is int
    g1, g2 = np.random.default_rng(3), np.random.default_rng(3)
    s = V.as_seed("seed", g1)
    assert isinstance(s, int) and s == int(g2.integers(0, 2 ** 63 - 1))
    assert g1.bit_generator.state == g2.bit_generator.state          # one draw consumed
    for bad, exc in [(True, TypeError), (np.array(True), TypeError), (1.5, TypeError), ("3", TypeError),
                     (np.array("3"), TypeError), (-1, ValueError), (np.array(-2), ValueError),
                     ([1, "2"], TypeError), ([1, -2], ValueError), (None, None)]:
        if exc is None:
            assert V.as_seed("seed", bad) is None
            continue
        with pytest.raises(exc, match=names("seed")):
            V.as_seed("seed", bad)


@pytest.mark.parametrize("fname", ["goe", "gue", "wishart", "profile_wigner", "hermite_tridiagonal",
                                   "laguerre_tridiagonal", "sample_spiked_goe_top",
                                   "sample_spiked_wishart_top"])
def test_sampling_functions_take_seed_like_rng(fname):
    fn, kw = RMT[fname]
    kw = {k: v for k, v in kw.items() if k != "rng"}
    by_rng = fn(**kw, rng=5)
    assert _same(fn(**kw, seed=5), by_rng)
    assert _same(fn(**kw, seed=np.random.default_rng(5)), fn(**kw, rng=np.random.default_rng(5)))
    assert _same(fn(**kw, seed=np.int64(5)), by_rng)
    with pytest.raises(TypeError, match=names("seed")):
        fn(**kw, seed=5, rng=5)
    for bad, exc in [(np.array(True), TypeError), ("5", TypeError), (-1, ValueError), (2.5, TypeError)]:
        with pytest.raises(exc, match=names("seed")):
            fn(**kw, seed=bad)


# ---- nets entry points: the same classes through their scalar and list arguments ----

def _tiny():
    g = torch.Generator().manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    X = torch.randn(12, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (12,), generator=g)
    return model, (X, y)


CE = nn.functional.cross_entropy


def _nets_calls():
    import nets
    return {
        "top_eigenvalues.k": (lambda m, d, v: nets.top_eigenvalues(m, CE, d, k=v), "k", 2),
        "top_eigenvalues.seed": (lambda m, d, v: nets.top_eigenvalues(m, CE, d, seed=v), "seed", 1),
        "measure.batch_sizes": (lambda m, d, v: nets.measure_batch_top_eigenvalue(m, CE, d, v, n_batches=2),
                                "batch_sizes", [4, 8]),
        "measure.n_batches": (lambda m, d, v: nets.measure_batch_top_eigenvalue(m, CE, d, [4], n_batches=v),
                              "n_batches", 2),
        "measure.seed": (lambda m, d, v: nets.measure_batch_top_eigenvalue(m, CE, d, [4], n_batches=2, seed=v),
                         "seed", 3),
        "predict.batch_sizes": (lambda m, d, v: nets.predict_batch_top_eigenvalue(m, CE, d, v), "batch_sizes",
                                [4, 8]),
        "predict.seed": (lambda m, d, v: nets.predict_batch_top_eigenvalue(m, CE, d, [4], seed=v), "seed", 2),
    }


NETS_BAD = [(np.array(True), TypeError), (np.bool_(True), TypeError), (np.array("2"), TypeError),
            (np.array(None, dtype=object), TypeError), (np.array(2.0 + 1.0j), TypeError),
            ("2", TypeError), (None, TypeError)]
NETS_BAD_LISTS = [(["4", "8"], TypeError), ([True, 8], TypeError), ([None, 8], TypeError),
                  ([4, np.array(True)], TypeError), ([4, 2 ** 63], ValueError), ([4, 1e300], ValueError),
                  ([4, 10 ** 400], ValueError), ([[4, 8]], ValueError)]


@pytest.mark.parametrize("key", list(_nets_calls()))
def test_nets_arguments_by_class(key):
    call, arg, good = _nets_calls()[key]
    model, data = _tiny()
    heavy = key.startswith("predict")      # full-data noise passes: bad input only
    plain = None if heavy else call(model, data, good)
    if not isinstance(good, list) and heavy:
        cases = [c for c in NETS_BAD if c[0] is not None]
    elif not isinstance(good, list):
        # numpy scalar and 0-d array forms of the valid value give the same numbers
        for form in (np.int64(good), np.array(good)):
            again = call(model, data, form)
            a = plain if isinstance(plain, np.ndarray) else plain.to_dict()
            b = again if isinstance(again, np.ndarray) else again.to_dict()
            assert _same(a, b), (key, form)
        cases = NETS_BAD if arg != "seed" else [c for c in NETS_BAD if c[0] is not None]
    else:
        cases = NETS_BAD_LISTS
    for bad, exc in cases:
        with pytest.raises(exc, match=names(arg)):
            call(model, data, bad)


def test_nets_seed_takes_an_int_or_a_generator_drawing_one_int():
    import nets
    model, data = _tiny()
    g = np.random.default_rng(11)
    drawn = int(np.random.default_rng(11).integers(0, 2 ** 63 - 1))
    by_gen = nets.measure_batch_top_eigenvalue(model, CE, data, [4], n_batches=2, seed=g)
    by_int = nets.measure_batch_top_eigenvalue(model, CE, data, [4], n_batches=2, seed=drawn)
    assert np.array_equal(by_gen["mean"], by_int["mean"])


def test_as_range_takes_an_increasing_positive_pair():
    assert V.as_range("span", (0.5, np.float32(2.0))) == (0.5, 2.0)
    for bad in [(1.0, 1.0), (2.0, 1.0), (0.0, 1.0), (-1.0, 1.0), (1.0, float("inf"))]:
        with pytest.raises(ValueError, match="span"):
            V.as_range("span", bad)
    for bad in [3.0, (1.0, 2.0, 3.0), ("a", 2.0), None]:
        with pytest.raises((TypeError, ValueError), match="span"):
            V.as_range("span", bad)


def test_every_line_against_b_is_drawn_in_b_order(tiny_mlp):
    """Batch sizes keep the caller's order, and five plot() methods joined the points in
    it: [60, 4, 16] drew a chord 60 → 4 → 16 (an outside sweep). Every line with more than
    one point must run in increasing B, and through the same points as before."""
    import warnings

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch.nn.functional as F

    import nets
    from nets.learning_rates.adam_linearized import linearized_adam_threshold

    model, X, y = tiny_mlp(seed=0, N=60)
    data, Bs = (X, y), [60, 4, 16]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = [
            nets.predict_batch_top_eigenvalue(model, F.cross_entropy, data, Bs),
            nets.lr_table(model, F.cross_entropy, data, Bs, measure=False, mccandlish=False),
            nets.adam_transfer_lr(model, F.cross_entropy, data, Bs, reference=(16, 0.01),
                                  form="mean_square"),
            nets.linearized_threshold(model, F.cross_entropy, data, Bs, steps=10, seeds=(0,),
                                      n_grid=8, dtype=torch.float64),
            linearized_adam_threshold(model, F.cross_entropy, data, Bs, warmup_steps=3,
                                      steps=8, seeds=(0,)),
            nets.transfer_lr(model, F.cross_entropy, data, Bs, reference=(16, 0.5),
                             form="directional"),
        ]
    for r in results:
        fig, ax = plt.subplots()
        try:
            r.plot(ax=ax)
            lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1
                     and ln.get_linestyle() not in ("None", "")]
            assert lines, type(r).__name__
            for ln in lines:
                x = np.asarray(ln.get_xdata(), float)
                assert np.all(np.diff(x) >= 0), (type(r).__name__, ln.get_label(), x)
        finally:
            plt.close(fig)

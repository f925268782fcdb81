"""Check 10 — the symbolic side: sympy derives the scaling exponents (SGD 1, Adam 1/2, both
→ 0 at large B) and the outlier/overlap/learning-rate formulas, and the derived formulas
equal the numeric functions of `rmt` that the other checks use.

Derivations come from `rmt.symbolic` (each derived from its defining equation: Stieltjes
quadratic, Silverstein–Bai equation, stability condition; exponents by sympy limits of
B·α'(B)/α(B)). The derived expressions are lambdified and compared with
`rmt.spiked_wigner_*`, `rmt.spiked_wishart_*`, `rmt.lr.sgd_max_lr`, `rmt.lr.adam_max_lr`
and `rmt.lr.critical_batch_size` at random supercritical parameter points.

Pass iff the exponents are exactly 1 and 1/2 (and 0 in the large-B regime) and every
derived formula matches its numeric function to relative error ≤ 1e-10.
"""

from __future__ import annotations

import numpy as np

from ..result import judged
from . import _plotting as pl

NAME = "symbolic_derivations"
CLAIM = ("Sympy derivations give α_max ∝ B (SGD) and ∝ √B (Adam) at small B, saturation at "
         "large B (for Adam where ḡ² > 0 or ε > 0: with both zero, as at an exact minimiser, "
         "its limit falls as B^(-1/2) there), and outlier/overlap/lr formulas identical to the "
         "numeric functions.")
REQUIRES = ("rmt.symbolic:lr_scaling_exponent", "rmt.symbolic:derive_spiked_wigner",
            "rmt.symbolic:derive_spiked_wishart", "rmt.symbolic:derive_lr_laws",
            "rmt.lr:sgd_max_lr", "rmt.lr:adam_max_lr")
RTOL = 1e-10


def _max_rel(a, b) -> float:
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), 1e-300)))


def _each(fn, *columns) -> list:
    """fn applied to each row of the parameter columns (the numeric functions take scalars)."""
    return [fn(*row) for row in zip(*columns)]


def run(ctx):
    import sympy as sp

    import rmt
    from rmt import lr, symbolic

    rng = ctx.rng(NAME)
    n = ctx.pick(200, 40)
    expected = {"sgd": sp.Integer(1), "adam": sp.Rational(1, 2)}
    exps = {k: symbolic.lr_scaling_exponent(k) for k in expected}
    exps_large = {k: symbolic.lr_scaling_exponent(k, regime="large") for k in expected}
    exps_fin = {k: symbolic.lr_scaling_exponent(k, finite_N=True) for k in expected}
    failures = []
    for k, want in expected.items():
        for label, got, w in (("small B", exps[k], want), ("small B, finite N", exps_fin[k], want),
                              ("large B", exps_large[k], sp.Integer(0))):
            if sp.simplify(got - w) != 0:
                failures.append(f"{k} exponent ({label}) derived as {got}, expected {w}")

    errors = {}
    # spiked Wigner: θ > √v
    dw = symbolic.derive_spiked_wigner()
    v = rng.uniform(0.1, 4.0, n)
    th = np.sqrt(v) * rng.uniform(1.05, 5.0, n)
    f_out, f_ov = dw.lambdify("outlier", "theta", "v"), dw.lambdify("overlap", "theta", "v")
    errors["wigner_outlier"] = _max_rel(f_out(th, v), _each(rmt.spiked_wigner_outlier, th, v))
    errors["wigner_overlap"] = _max_rel(f_ov(th, v), _each(rmt.spiked_wigner_overlap, th, v))
    # spiked Wishart: ℓ > σ²(1 + √q)
    ds = symbolic.derive_spiked_wishart()
    q, s2 = rng.uniform(0.05, 4.0, n), rng.uniform(0.2, 3.0, n)
    ell = s2 * (1 + np.sqrt(q)) * rng.uniform(1.05, 6.0, n)
    g_out = ds.lambdify("outlier", "ell", "q", "sigma2")
    g_ov = ds.lambdify("overlap", "ell", "q", "sigma2")
    errors["wishart_outlier"] = _max_rel(g_out(ell, q, s2),
                                         _each(rmt.spiked_wishart_outlier, ell, q, s2))
    errors["wishart_overlap"] = _max_rel(g_ov(ell, q, s2),
                                         _each(rmt.spiked_wishart_overlap, ell, q, s2))
    # learning-rate laws (finite N)
    dl = symbolic.derive_lr_laws()
    N = rng.integers(1000, 100000, n).astype(float)
    B = np.floor(rng.uniform(0, 0.9, n) * N) + 1
    lam, s2u = rng.uniform(0.1, 10, n), rng.uniform(0.1, 1000, n)
    rho = rng.uniform(0, 0.95, n)
    g2, gv, eps = rng.uniform(0, 1, n), rng.uniform(0.01, 10, n), rng.uniform(0, 1e-3, n)
    b1 = rng.uniform(0, 0.95, n)
    h_sgd = dl.lambdify("sgd", "B", "N", "lam", "s2", "rho")
    h_adam = dl.lambdify("adam", "B", "N", "lam", "s2", "g2", "gv", "eps", "beta1")
    errors["sgd_max_lr"] = _max_rel(h_sgd(B, N, lam, s2u, rho),
                                    [lr.sgd_max_lr(*a) for a in zip(B, lam, s2u, N, rho)])
    errors["adam_max_lr"] = _max_rel(h_adam(B, N, lam, s2u, g2, gv, eps, b1),
                                     [lr.adam_max_lr(bb, la, ss, gg, vv, nn, ee, bt)
                                      for bb, nn, la, ss, gg, vv, ee, bt
                                      in zip(B, N, lam, s2u, g2, gv, eps, b1)])
    dc = symbolic.derive_critical_batch_size()
    cb = dc.lambdify("critical_batch_size", "lam", "s2")
    errors["critical_batch_size"] = _max_rel(cb(lam, s2u), _each(lr.critical_batch_size, lam, s2u))
    failures += [f"{k}: max relative difference {e:.2e} > {RTOL:g}" for k, e in errors.items()
                 if not e <= RTOL]

    # figure data: local exponent B·α'/α of the derived N = ∞ laws
    Bsym = dl.symbols["B"]
    grid = np.geomspace(1e-3, 1e4, 200)
    local = {}
    for k, extra in (("sgd", {dl.symbols["rho"]: 0}),
                     ("adam", {dl.symbols["g2"]: sp.Rational(1, 100), dl.symbols["eps"]: 0,
                               dl.symbols["beta1"]: 0, dl.symbols["gv"]: 1})):
        expr = dl.exprs[f"{k}_inf"].subs(extra).subs({dl.symbols["lam"]: 1, dl.symbols["s2"]: 100})
        el = sp.lambdify(Bsym, sp.simplify(Bsym * sp.diff(expr, Bsym) / expr), "numpy")
        local[k] = np.asarray(el(grid), float) * np.ones_like(grid)
    return judged(
        name=NAME, claim=CLAIM,
        predicted="SGD exponent 1, Adam 1/2 (small B); 0 (large B); formulas equal",
        measured=f"sympy: SGD {exps['sgd']}, Adam {exps['adam']}; large B {exps_large['sgd']}, "
                 f"{exps_large['adam']}; max rel. diff {max(errors.values()):.1e}",
        tolerance=f"exact exponents; derived vs numeric relative error ≤ {RTOL:g} at {n} random points each",
        failures=failures,
        details={"exponents_small_B": {k: str(v) for k, v in exps.items()},
                 "exponents_small_B_finite_N": {k: str(v) for k, v in exps_fin.items()},
                 "exponents_large_B": {k: str(v) for k, v in exps_large.items()},
                 "max_relative_difference": errors,
                 "latex_sgd": dl.latex["sgd"], "latex_adam": dl.latex["adam"],
                 "latex_wigner_outlier": dw.latex["outlier"],
                 "latex_wishart_outlier": ds.latex["outlier"],
                 "caption": "Local scaling exponent d log α_max/d log B of the sympy-derived "
                            "laws (λ=1, s²=100 so B*=100; Adam with ḡ²=0.01, σ_g²=1)."},
        series={"grid_B": grid, "local_exponent_sgd": local["sgd"],
                "local_exponent_adam": local["adam"],
                "error_names": list(errors), "error_values": list(errors.values())},
    )


def plot(result):
    fig, (ax, ax2) = pl.new_figure(2, width=4.6)
    g = result.array("grid_B")
    ax.plot(g, result.array("local_exponent_sgd"), color="C0", label="SGD (sympy)")
    ax.plot(g, result.array("local_exponent_adam"), color="C1", label="Adam (sympy)")
    ax.axhline(1, color="C0", ls=":", lw=1)
    ax.axhline(0.5, color="C1", ls=":", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("batch size B")
    ax.set_ylabel("d log α_max / d log B")
    ax.legend(fontsize=8)
    pl.verdict_title(ax, result, "derived scaling exponents")
    names = result.series["error_names"]
    vals = np.maximum(result.array("error_values"), 1e-18)
    ax2.barh(range(len(names)), vals, color="C2")
    ax2.set_yticks(range(len(names)))
    ax2.set_yticklabels(names, fontsize=8)
    ax2.set_xscale("log")
    ax2.axvline(1e-10, color="C3", ls="--", label="tolerance")
    ax2.set_xlabel("max relative difference, sympy vs numeric")
    ax2.legend(fontsize=8)
    return fig

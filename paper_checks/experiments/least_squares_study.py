"""Least-squares learning-rate study: predicted vs exact vs measured stability limits.

`lr_study` runs, on one `nets.learning_rates.least_squares.LeastSquaresProblem`, every
learning-rate estimate of the package side by side: the exact mean-square threshold of
mini-batch SGD (`nets.learning_rates.stability`), the one-pass predictions of
`nets.learning_rates.lr_prediction.lr_table`, the naive 2/E[λ_max(H_B)]
(`naive_batch_lr`) and single-run divergence thresholds found by
`nets.learning_rates.lr_search.lr_sweep` (SGD, optionally Adam).
"""

from __future__ import annotations

import math

import numpy as np

from nets.learning_rates.least_squares import LeastSquaresProblem, naive_batch_lr
from rmt.validation import as_int

__all__ = ["lr_study"]


def lr_study(problem: LeastSquaresProblem, batch_sizes, *, seeds=(0,), steps=1000, min_epochs=0.0,
             measure_batches=None, rel_tol=0.02, start_fraction=0.5, n_naive=100,
             adam_batches=None, adam_betas=(0.9, 0.999), store=None, tag=None, seed=0,
             hessian_samples=256) -> dict:
    """Predicted vs exact vs measured maximal learning rates on one least-squares problem.

    All learning rates here are stability limits except `greedy_optimal` (McCandlish).
    Per B in `batch_sizes` (sampling without replacement):
      oracle          exact mean-square threshold (`nets.learning_rates.stability`)
      directional     2/λ'(B) from the one-pass network measurement (`lr_table`)
      iso_clipped / iso_unclipped   the isotropic (Pσ²) forms
      naive           2/E[λ_max(H_B)] (`naive_batch_lr`)
      measured        single-run divergence threshold (`nets.learning_rates.lr_search`, growth criterion),
                      for B in `measure_batches` (default: all), one column per seed
    Adam (if `adam_batches`): loss-criterion threshold of torch Adam with `adam_betas`
    (see `nets.learning_rates.lr_search`), with the predicted `adam_closed`/`adam_measured` stability
    limits (β₁ = adam_betas[0]) beside it.
    Every run starts at w_0 = start_fraction·ŵ (ŵ the least-squares minimizer), so that
    McCandlish's B_simple, B_noise are finite and Adam starts above its noise floor; the
    SGD threshold on a quadratic does not depend on w_0.
    Exponents (`fit_scaling_exponent`, 95% t-intervals): SGD oracle and measured over
    B ≤ B*/10, Adam measured over all `adam_batches`.
    `store`: JsonlStore/path for the lr_search sweeps (resumable), `tag` its key prefix;
    `hessian_samples`: samples for McCandlish's tr(HΣ) (None: all, exact).
    SGD runs use K = max(steps, ⌈min_epochs·N/B⌉) steps: on heavy-tailed data
    (standardized digits) runs shorter than a few epochs miss the rare large-norm samples
    and overstate the divergence threshold (B = 1: 3.7–35× the oracle at K = 1000 but
    ≈ 1.9× at K = 10000 ≈ 5.6 epochs).
    """
    from nets.learning_rates.lr_prediction import fit_scaling_exponent, lr_table
    from nets.learning_rates.lr_search import lr_sweep
    from nets.learning_rates.stability import ms_threshold_curve

    bs = np.array([as_int("batch_sizes", b, minimum=1) for b in np.atleast_1d(batch_sizes)])
    w0 = start_fraction * problem.minimizer()
    model, loss_fn, data = problem.torch_problem(w=w0)
    sd = model.state_dict()
    adam_bs = None if adam_batches is None else np.atleast_1d(adam_batches).astype(int)
    table_bs = bs if adam_bs is None else np.union1d(bs, adam_bs)
    table = lr_table(model, loss_fn, data, table_bs, optimizer="adam", betas=tuple(adam_betas),
                     n_batches=4,
                     measure=adam_bs is not None, hessian_samples=hessian_samples, seed=seed)
    pos = {int(b): i for i, b in enumerate(table.batch_sizes)}
    sel = np.array([pos[int(b)] for b in bs])
    oracle = ms_threshold_curve(problem, bs)
    naive = naive_batch_lr(problem, bs, n_batches=n_naive, rng=seed)
    out = {
        "name": problem.name, "N": problem.N, "d": problem.d, "noise_std": problem.noise_std,
        "batch_sizes": bs, "lam": table.lam, "s2_dir": table.s2_dir, "s2_iso": table.s2_iso,
        "B_star": table.B_star, "B_star_iso": table.B_star_iso,
        "B_simple": table.B_simple, "B_noise": table.B_noise,
        "oracle": oracle, "directional": table.sgd_directional[sel],
        "iso_clipped": table.sgd_iso_clipped[sel], "iso_unclipped": table.sgd_iso_unclipped[sel],
        "naive": naive, "greedy_optimal": table.greedy_optimal[sel],
        "min_damping": table.min_damping[sel],
    }
    out["directional_over_oracle"] = out["directional"] / oracle
    out["naive_over_oracle"] = naive / oracle
    small = bs[bs <= table.B_star / 10]
    if small.size >= 2:
        out["oracle_exponent"] = fit_scaling_exponent(bs, oracle, max_batch=table.B_star / 10)
    tag = problem.name if tag is None else tag
    mb = bs if measure_batches is None else np.atleast_1d(measure_batches).astype(int)
    if mb.size:
        oracle_of = dict(zip(bs.tolist(), oracle.tolist()))
        K_of = lambda B: max(int(steps), int(math.ceil(min_epochs * problem.N / B)))
        sweep = lr_sweep(model, loss_fn, data, sd, mb, seeds=seeds, steps=K_of, optimizer="sgd",
                         alpha0=lambda B: oracle_of.get(int(B), 2.0 / table.lam), rel_tol=rel_tol,
                         store=store, tag=tag + "|sgd")
        out["measured_batch_sizes"] = mb
        out["measured_steps"] = np.array([K_of(int(b)) for b in mb])
        out["measured"] = sweep["alpha"]
        orc = ms_threshold_curve(problem, mb)
        out["measured_over_oracle"] = sweep["alpha"] / orc[:, None]
        if np.sum(mb <= table.B_star / 10) >= 2:
            out["measured_exponent"] = fit_scaling_exponent(mb, sweep["alpha"], max_batch=table.B_star / 10)
    if adam_bs is not None:
        asel = np.array([pos[int(b)] for b in adam_bs])
        sweep = lr_sweep(model, loss_fn, data, sd, adam_bs, seeds=seeds, steps=steps,
                         optimizer="adam", alpha0=1e-2, rel_tol=max(rel_tol, 0.05), store=store,
                         tag=tag + "|adam", betas=tuple(adam_betas))
        out["adam_batch_sizes"] = adam_bs
        out["adam_measured_loss_criterion"] = sweep["alpha"]
        out["adam_predicted_closed"] = table.adam_closed[asel]
        out["adam_predicted_measured"] = table.adam_measured[asel]
        out["adam_exponent"] = fit_scaling_exponent(adam_bs, sweep["alpha"])
        out["adam_predicted_exponent"] = fit_scaling_exponent(adam_bs, table.adam_measured[asel])
    return out

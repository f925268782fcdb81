"""Check 2 — the negative spike: bottom eigenvalue of the batch Hessian.

Same simulation as check 1 (`_batch_wigner`, bottom spike λ_P = −1.5). Theory:
`rmt.batch_hessian_extremes(...)[1]` = λ_P + v/λ_P below −√v, else −2√v, so the batch
Hessian's most negative eigenvalue is *more* negative than the empirical one by ∝ 1/B.

Pass rule as in check 1: every B within 4·SE + 5%·|predicted shift|, and the model
without the finite-population factor rejected at some B.
"""

from __future__ import annotations

from ._batch_wigner import shared_simulation
from .batch_hessian_top import judge_extreme, plot_extreme

NAME = "batch_hessian_bottom"
CLAIM = ("Bottom eigenvalue of the batch Hessian (negative spike): λ'_P = λ_P + v/λ_P for "
         "λ_P < −√v, else −2√v; more negative as B falls.")
REQUIRES = ("rmt.batch_hessian:batch_hessian_extremes", "rmt.sampling:batch_noise_factor")
SHARES = "batch_wigner"   # one simulation (ctx.cache): run in one process


def run(ctx):
    return judge_extreme(shared_simulation(ctx), 1, NAME, CLAIM)


def plot(result):
    return plot_extreme(result, "bottom eigenvalue of H_B")

"""Sampled noise estimators, memory-bounded products and the scaled resolved form.

Oracles: dense float64 per-sample Hessians from `torch.func.hessian` (conftest), and
the package's own exhaustive forms (exact=True) where the claim is "the estimate
agrees with the exhaustive value within its error bar"."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from nets.curvature.operators import hessian_operator
from nets.noise.directional import directional_noise_from_operator, isotropic_noise_from_operator
from nets.noise.resolved_noise import (
    per_sample_top_eigenpairs,
    resolved_batch_top_eigenvalue,
    resolved_noise_from_operator,
)
from nets.utils.memory import CPU_LANCZOS_BYTES, chunk_count, lanczos_chunk_budget, memory_budget

CE = F.cross_entropy
N = 240
HEAVY = tuple(range(0, N, 17))


@pytest.fixture(scope="module")
def problem(tiny_mlp, per_sample_hessians):
    model, X, y = tiny_mlp(seed=3, N=N, heavy=HEAVY)
    Hs, H, ev, V = per_sample_hessians(model, CE, X, y)
    return model, X, y, Hs, H, ev, V


@pytest.fixture(scope="module")
def light(tiny_mlp, per_sample_hessians):
    """Moderate tails (no scaled inputs): the regime where a 10–20 % error bar is cheap."""
    model, X, y = tiny_mlp(seed=5, N=200)
    Hs, H, ev, V = per_sample_hessians(model, CE, X, y)
    return model, X, y, Hs, H, ev, V


def _dense_s2(Hs, H, u):
    d = np.einsum("npq,q->np", Hs - H, u)
    return float((d * d).sum() / (len(Hs) - 1))


def test_memory_budget_parsing_and_chunks():
    assert memory_budget("2GiB") == 2 << 30
    assert memory_budget(1e6) == 1_000_000
    assert memory_budget(None) >= 1 << 24
    assert chunk_count(100, 10, 35) == 3 and chunk_count(100, 10, 5) == 1
    assert chunk_count(2, 1, 10**9) == 2 and chunk_count(100, 1, 10**9, cap=7) == 7
    for bad in (0, -1, "lots", float("nan")):
        with pytest.raises(ValueError, match="memory"):
            memory_budget(bad)
    with pytest.raises(TypeError, match="memory"):
        memory_budget(True)


def test_lanczos_chunk_budget_caps_only_the_default_cpu_budget():
    assert lanczos_chunk_budget(None, "cpu") <= CPU_LANCZOS_BYTES
    assert lanczos_chunk_budget(None, "cpu") <= memory_budget(None, "cpu")
    assert lanczos_chunk_budget("2GiB", "cpu") == 2 << 30      # explicit budget as given
    with pytest.raises(ValueError, match="memory"):
        lanczos_chunk_budget(0)


def test_float32_pass_matches_float64_oracle(problem):
    """Products and their difference from the shift in float32 (no float64 copy of the
    chunk), squared norms summed in float64: agrees with the dense float64 oracle to
    float32 accuracy."""
    model, X, y, Hs, H, ev, V = problem
    op = hessian_operator(model, CE, (X, y), dtype=torch.float32)
    u = V[:, 0]
    est = directional_noise_from_operator(op, torch.from_numpy(u.copy()), exact=True,
                                          chunk_size=16)
    assert est.s2 == pytest.approx(_dense_s2(Hs, H, u), rel=1e-4)


def test_exact_pass_matches_dense_oracle_whatever_the_chunking(problem):
    model, X, y, Hs, H, ev, V = problem
    op = hessian_operator(model, CE, (X, y))
    u = V[:, 0]
    want = _dense_s2(Hs, H, u)
    for kw in (dict(), dict(memory=20_000), dict(chunk_size=7)):
        est = directional_noise_from_operator(op, torch.from_numpy(u.copy()), exact=True, **kw)
        assert est.s2 == pytest.approx(want, rel=1e-10)
        assert est.exact and est.n_used == N
    # a subset as large as the data set is the exhaustive value
    est = directional_noise_from_operator(op, torch.from_numpy(u.copy()), min_samples=N)
    assert est.s2 == pytest.approx(want, rel=1e-10) and est.exact


def test_matmat_split_by_memory_is_exact(problem):
    model, X, y, Hs, H, ev, V = problem
    op = hessian_operator(model, CE, (X, y))
    W = torch.from_numpy(np.random.default_rng(0).standard_normal((op.P, 9)))
    full = op.matmat(W)
    op.memory = 1                       # forces one vector per vmapped call
    assert op._column_block(9, N) == 1
    np.testing.assert_allclose(op.matmat(W).numpy(), full.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(full.numpy(), H @ W.numpy(), rtol=1e-9, atol=1e-12)


def test_sampled_directional_error_bars_are_honest(light):
    """Coverage over seeds: z = (estimate − exact)/stderr. Fails for error bars half as
    large (then ~half of |z| exceed 2) or for a biased estimator (mean z away from 0)."""
    model, X, y, Hs, H, ev, V = light
    op = hessian_operator(model, CE, (X, y))
    u = V[:, 0]
    want = _dense_s2(Hs, H, u)
    zs, used = [], []
    for seed in range(30):
        est = directional_noise_from_operator(op, torch.from_numpy(u.copy()), seed=seed,
                                              rel_error=0.1, min_samples=24)
        assert not est.exact and est.n_used < len(X)
        zs.append((est.s2 - want) / est.stderr)
        used.append(est.n_used)
    zs = np.array(zs)
    # the stopping rule looks at the data, so 2σ coverage is below 95 % (measured 83 %
    # over these 30 seeds); 3σ must cover nearly all
    assert np.mean(np.abs(zs) <= 2.0) >= 0.75, zs
    assert np.mean(np.abs(zs) <= 3.0) >= 0.93, zs
    assert abs(zs.mean()) < 0.5, zs.mean()
    assert np.mean(used) < 0.8 * len(X)


def test_micro_batch_error_bars_cover_the_per_sample_value(light):
    """micro_batch = m > 1 estimates the per-sample s² through a random partition, whose
    own variance must be in the error bar: the finite-population correction (error
    against the partition's exhaustive value) and the isotropic form's spread over probes
    alone left a fifth to a quarter of the seeds beyond 2 standard errors (an outside
    sweep, m = 8). z = (estimate − per-sample exact)/stderr over 30 seeds, m = 4."""
    model, X, y, Hs, H, ev, V = light
    op = hessian_operator(model, CE, (X, y))
    u = V[:, 0]
    want_dir = _dense_s2(Hs, H, u)
    D = Hs - H
    want_iso = float(np.einsum("npq,npq->", D, D)) / (len(Hs) - 1) / H.shape[0]
    z_dir, z_iso = [], []
    for seed in range(30):
        d = directional_noise_from_operator(op, torch.from_numpy(u.copy()), micro_batch=4,
                                            seed=seed, rel_error=0.1, min_samples=24)
        z_dir.append((d.s2 - want_dir) / d.stderr)
        i = isotropic_noise_from_operator(op, num_probes=6, micro_batch=4, seed=seed,
                                          exact=True)
        z_iso.append((i.s2 - want_iso) / i.stderr)
    # before: 26 and 24 of 30 within 2σ on this model (0.63–0.87 on two other seeds of it);
    # now 30 and 30 (0.83–1.0 there: the data-dependent stopping rule's own shortfall, as
    # for m = 1 above)
    z_dir, z_iso = np.array(z_dir), np.array(z_iso)
    assert np.mean(np.abs(z_dir) <= 2.0) >= 0.9, z_dir
    assert np.mean(np.abs(z_iso) <= 2.0) >= 0.93, z_iso
    assert abs(z_dir.mean()) < 0.6 and abs(z_iso.mean()) < 0.6


def test_sampled_directional_respects_max_samples_and_rel_error(problem):
    model, X, y, Hs, H, ev, V = problem
    op = hessian_operator(model, CE, (X, y))
    u = torch.from_numpy(V[:, 0].copy())
    est = directional_noise_from_operator(op, u, max_samples=40, min_samples=16, rel_error=1e-6)
    assert est.n_used == 40 and est.full_products < 1.2
    est = directional_noise_from_operator(op, u, rel_error=0.2, min_samples=16)
    assert est.n_used == N or est.stderr <= 0.2 * est.s2
    with pytest.raises(ValueError, match="rel_error"):
        directional_noise_from_operator(op, u, rel_error=-0.1)
    with pytest.raises(TypeError, match="exact"):
        directional_noise_from_operator(op, u, exact="yes")


def test_sampled_isotropic_matches_exhaustive(problem):
    model, X, y, Hs, H, ev, V = problem
    op = hessian_operator(model, CE, (X, y))
    ex = isotropic_noise_from_operator(op, num_probes=6, seed=2, exact=True)
    est = isotropic_noise_from_operator(op, num_probes=6, seed=2, rel_error=0.15,
                                        min_samples=24, max_samples=120)
    assert est.n_used <= 120 and not est.exact
    np.testing.assert_allclose(est.per_probe.shape, (6,))
    # same probes (same seed): the difference is the sample subset alone
    assert abs(est.s2 - ex.s2) < 4 * est.stderr


def test_priority_sampling_is_unbiased(problem):
    """Σ_kept γ_i/π_i estimates Σ_candidates γ_i without bias (z-score over seeds)."""
    model, X, y, Hs, H, ev, V = problem
    op = hessian_operator(model, CE, (X, y))
    full = per_sample_top_eigenpairs(op, seed=0, keep_above=0.0)
    want = float(full.gamma[full.gamma > 0].sum())
    ests = []
    for seed in range(12):
        sp = per_sample_top_eigenpairs(op, seed=seed, keep_above=0.0, max_keep=40)
        assert sp.index.size == 40 and sp.vectors.shape == (op.P, 40)
        top = np.argsort(-sp.gamma)[:5]
        assert set(top.tolist()) <= set(sp.index.tolist())       # largest spikes kept
        ests.append(float((sp.weight * sp.gamma[sp.index]).sum()))
    ests = np.array(ests)
    z = (ests.mean() - want) / (ests.std(ddof=1) / np.sqrt(len(ests)))
    assert abs(z) < 3.5, (ests.mean(), want, z)


def _priority_oracle(gamma, keep_above, max_keep, seed):
    """The documented rule written out with a plain loop: priorities γ_i/u_i with
    u_i = 1 − U_i, U_i ~ `default_rng(SeedSequence(seed, spawn_key=(11,))).random()` one
    per sample in order; candidates γ_i > keep_above; keep the `max_keep` largest
    priorities; τ = the (max_keep + 1)-th largest candidate priority; 1/π_i = max(1, τ/γ_i)."""
    rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(11,)))
    u = [1.0 - x for x in rng.random(len(gamma))]
    cand = [i for i in range(len(gamma)) if keep_above is None or gamma[i] > keep_above]
    if max_keep is None or len(cand) <= max_keep:
        return cand, [1.0] * len(cand), 0.0
    ranked = sorted(cand, key=lambda i: -gamma[i] / u[i])
    tau = gamma[ranked[max_keep]] / u[ranked[max_keep]]
    kept = sorted(ranked[:max_keep])
    return kept, [max(1.0, tau / gamma[i]) for i in kept], tau


def _heavy_gammas(n=60, seed=0):
    return np.random.default_rng(seed).lognormal(0.0, 1.5, n)


def test_priority_keep_follows_the_documented_rule_exactly():
    """`priority_keep` (the GGN path's priority sampling): kept set, threshold τ (the
    (m+1)-th largest priority, not the m-th) and weights max(1, τ/γ_i), against the rule
    written out by hand, for several seeds, candidate cuts and sizes."""
    from nets.noise.ggn_samples import priority_keep
    gamma = _heavy_gammas()
    for seed in range(5):
        for keep_above, max_keep in [(None, 7), (0.2, 8), (1.0, 3), (0.2, 1),
                                     (float(gamma[12]), 5)]:      # γ_i = keep_above: dropped
            index, weight, tau = priority_keep(gamma, keep_above, max_keep, seed)
            kept, w, t = _priority_oracle(gamma, keep_above, max_keep, seed)
            assert index.tolist() == kept
            assert tau == pytest.approx(t, rel=1e-15)
            np.testing.assert_allclose(weight, w, rtol=1e-15)
            assert np.all(weight >= 1.0)
    # nothing to drop: every candidate kept with weight 1 and τ = 0
    index, weight, tau = priority_keep(gamma, float(gamma[12]), 1000, 0)
    assert index.tolist() == np.flatnonzero(gamma > gamma[12]).tolist() and 12 not in index
    assert tau == 0.0 and np.all(weight == 1.0)


def test_priority_keep_estimates_sums_without_bias():
    """Σ_kept f_i/π_i estimates Σ_candidates f_i without bias (priority sampling; Duffield,
    Lund & Thorup 2007), for f = γ and f = 1, over 3000 seeds: z-scores against the
    exact sums. Taking τ one rank too high, or weights min(1, ·), biases both (|z| > 10)."""
    from nets.noise.ggn_samples import priority_keep
    gamma = _heavy_gammas()
    cand = gamma > 0.2
    want_sum, want_count = float(gamma[cand].sum()), float(cand.sum())
    sums, counts = [], []
    for seed in range(3000):
        index, weight, _ = priority_keep(gamma, 0.2, 8, seed)
        assert index.size == 8 and np.all(cand[index])
        sums.append(float(weight @ gamma[index]))
        counts.append(float(weight.sum()))
    for est, want in [(np.array(sums), want_sum), (np.array(counts), want_count)]:
        z = (est.mean() - want) / (est.std(ddof=1) / np.sqrt(est.size))
        assert abs(z) < 4.0, (est.mean(), want, z)


def _pool_run(gamma, keep_above, max_keep, seed, chunks):
    """A `_SpikePool` fed `gamma` in the given chunk sizes, each sample's vector (i, i², 1)
    so that the kept columns name their samples."""
    from nets.noise.resolved_noise import _SpikePool
    pool = _SpikePool(seed, keep_above, max_keep, 3, torch.device("cpu"))
    start = 0
    for g in chunks:
        ids = torch.arange(start, start + g, dtype=torch.float64)
        vec = torch.stack([ids, ids ** 2, torch.ones(g, dtype=torch.float64)], dim=1)
        pool.add(start, torch.from_numpy(gamma[start:start + g].copy()), vec)
        start += g
    assert start == gamma.size
    return pool.result(np.zeros(gamma.size), steps=5)


def test_lanczos_spike_pool_follows_the_priority_rule_exactly():
    """The streamed pool of `per_sample_top_eigenpairs` (pruned as it fills): the same rule
    as `priority_keep` — kept set, τ the (m+1)-th largest priority, weights max(1, τ/γ_i),
    vectors the kept samples' own — whatever the chunking."""
    gamma = _heavy_gammas()
    for seed in range(4):
        for keep_above, max_keep in [(None, 7), (0.2, 8), (0.2, 2)]:
            kept, w, t = _priority_oracle(gamma, keep_above, max_keep, seed)
            for chunks in ([60], [1] * 60, [7, 13, 1, 20, 19]):
                sp = _pool_run(gamma, keep_above, max_keep, seed, chunks)
                assert sp.index.tolist() == kept
                assert sp.threshold == pytest.approx(t, rel=1e-15)
                np.testing.assert_allclose(sp.weight, w, rtol=1e-15)
                np.testing.assert_array_equal(sp.vectors[0].numpy(), np.array(kept, dtype=float))
                np.testing.assert_array_equal(sp.vectors[1].numpy(), np.array(kept, dtype=float) ** 2)
                np.testing.assert_array_equal(sp.gamma, gamma)


def test_lanczos_spike_pool_estimates_sums_without_bias():
    """Σ_kept γ_i/π_i of the streamed pool against the exact candidate sum, z-score over
    2000 seeds (the 12-seed check above cannot see τ taken one rank too high)."""
    gamma = _heavy_gammas()
    want = float(gamma[gamma > 0.2].sum())
    est = []
    for seed in range(2000):
        sp = _pool_run(gamma, 0.2, 8, seed, [25, 35])
        est.append(float(sp.weight @ gamma[sp.index]))
    est = np.array(est)
    z = (est.mean() - want) / (est.std(ddof=1) / np.sqrt(est.size))
    assert abs(z) < 4.0, (est.mean(), want, z)



def test_per_sample_top_eigenpairs_keeps_by_the_priority_rule(problem):
    """End to end (Lanczos chunks and the streamed pool; the Gauss–Newton pass): the kept
    samples, τ and 1/π_i of `per_sample_top_eigenpairs` and `per_sample_ggn_top_eigenpairs`
    are the documented rule applied to their own γ_i."""
    model, X, y, Hs, H, ev, V = problem
    op = hessian_operator(model, CE, (X, y))
    sp = per_sample_top_eigenpairs(op, seed=3, keep_above=0.0, max_keep=40, chunk_size=64)
    kept, w, t = _priority_oracle(sp.gamma, 0.0, 40, 3)
    assert sp.index.tolist() == kept
    assert sp.threshold == pytest.approx(t, rel=1e-15)
    np.testing.assert_allclose(sp.weight, w, rtol=1e-15)
    # the Gauss–Newton form (per_sample="ggn") keeps by the same rule
    from nets.noise.resolved_noise import per_sample_ggn_top_eigenpairs
    gp = per_sample_ggn_top_eigenpairs(op, seed=3, keep_above=0.0, max_keep=40)
    kept, w, t = _priority_oracle(gp.gamma, 0.0, 40, 3)
    assert gp.index.tolist() == kept and gp.vectors.shape == (op.P, 40)
    assert gp.threshold == pytest.approx(t, rel=1e-15)
    np.testing.assert_allclose(gp.weight, w, rtol=1e-15)

def test_scaled_resolved_form_tracks_exhaustive(problem):
    model, X, y, Hs, H, ev, V = problem
    op = hessian_operator(model, CE, (X, y))
    U = torch.from_numpy(V[:, :3].copy())
    Bs = [2, 8, 32]
    ex = resolved_noise_from_operator(op, U, min_batch=2, seed=0, exact=True)
    sc = resolved_noise_from_operator(op, U, min_batch=2, seed=0, max_candidates=24,
                                      cross="nystrom")
    assert ex.index.size > 24 and sc.index.size == 24 and sc.cross == "nystrom"
    assert sc.full_products < ex.full_products
    a = resolved_batch_top_eigenvalue(ex, Bs, n_batches=200, seed=1)
    b = resolved_batch_top_eigenvalue(sc, Bs, n_batches=200, seed=1)
    np.testing.assert_allclose(b["mean"], a["mean"], rtol=0.15)


def test_dropped_candidates_get_distinct_stand_ins_within_a_batch():
    """Two dropped candidates of one batch never share a kept spike direction (they would
    add along it coherently); a kept candidate stands for itself, a repeated sample keeps
    one stand-in, and stand-ins are shared only when the kept vectors run out."""
    from types import SimpleNamespace

    from nets.noise.resolved_noise import _StandIns
    gamma = np.array([1.0, 10.0, 11.0, 12.0, 13.0, 30.0, 31.0, 32.0])
    index = np.array([1, 5])                       # kept candidates (positions 0, 1)
    pos = np.array([-1, 0, 0, 0, 0, 1, 1, 1])      # nearest kept in log γ
    si = _StandIns(SimpleNamespace(index=index, gamma=gamma), pos)
    assert si(np.array([1, 5])).tolist() == [0, 1]              # kept: themselves
    assert sorted(si(np.array([2, 3])).tolist()) == [0, 1]      # distinct, nearest first
    assert si(np.array([2, 3]))[0] == 0                         # 2 is nearest to kept 1
    assert si(np.array([1, 2])).tolist() == [0, 1]              # own stand-in stays taken
    assert si(np.array([6, 6])).tolist() == [1, 1]              # same sample twice
    out = si(np.array([2, 3, 4]))                               # 3 samples, 2 vectors
    assert sorted(out[:2].tolist()) == [0, 1] and out[2] in (0, 1)


# ---------------------------------------------------------------- chunking and micro-batches

def test_product_chunk_caps_only_the_default_cpu_budget():
    from nets.utils.memory import CPU_PRODUCT_BYTES, product_bytes, product_chunk
    P = 300_000
    one = product_bytes(P, 1, 1, 64)
    n = product_chunk(5000, P, 10, 1, 64)
    assert 1 <= n <= max(1, CPU_PRODUCT_BYTES // one)             # one vector's call capped
    assert n * product_bytes(P, 10, 1, 64) <= max(memory_budget(None, "cpu"),
                                                  product_bytes(P, 10, 1, 64))
    big = product_chunk(5000, P, 10, 1, 64, memory="64GiB")      # explicit budget as given
    assert big == min(4096, (64 << 30) // product_bytes(P, 10, 1, 64))
    assert product_chunk(3, 10, 1, 1, 4) == 3                      # never more than the total


def test_auto_micro_batch_rule_and_its_use_in_the_prediction(tiny_mlp, monkeypatch):
    from nets.noise.batch_spectra import predict_batch_top_eigenvalue
    from nets.noise.directional import auto_micro_batch, resolve_micro_batch
    assert [auto_micro_batch(n) for n in (10, 511, 512, 1797, 5000)] == [1, 1, 2, 7, 19]
    # small per-sample passes stay exact: N·P ≤ 2²⁷
    assert auto_micro_batch(1797, 3000) == 1 and auto_micro_batch(1797, 301_066) == 7
    assert resolve_micro_batch(3, 100) == 3 and resolve_micro_batch("auto", 1797) == 7
    with pytest.raises(ValueError, match="auto"):
        resolve_micro_batch("many", 100)
    with pytest.raises(ValueError, match="micro_batch"):
        resolve_micro_batch(0, 100)
    model, X, y = tiny_mlp(seed=4, N=1100)
    op = hessian_operator(model, CE, (X, y))
    small = predict_batch_top_eigenvalue(model, CE, (X, y), [8, 64], seed=3)
    assert small.micro_batch == 1                         # N·P = 1100·57: per-sample
    import nets.noise.directional as dmod
    monkeypatch.setattr(dmod, "AUTO_PER_SAMPLE_NUMBERS", 1000)   # as if the model were large
    pred = predict_batch_top_eigenvalue(model, CE, (X, y), [8, 64], seed=3)
    from nets.algorithms.lanczos import eigsh
    u = eigsh(op, k=1, which="LA", tol=1e-8, seed=3).vectors[:, 0]
    want = directional_noise_from_operator(op, u, micro_batch=4, seed=3)
    assert want.micro_batch == 4 == auto_micro_batch(1100) and want.n_groups == 275
    assert pred.s2_directional == pytest.approx(want.s2, rel=1e-6) and pred.micro_batch == 4
    # the micro-batch estimate is unbiased for the per-sample s_u²: within 3 standard errors
    per_sample = directional_noise_from_operator(op, u, exact=True)
    assert abs(want.s2 - per_sample.s2) < 3 * want.stderr
    one = predict_batch_top_eigenvalue(model, CE, (X, y), [8, 64], seed=3, micro_batch=1)
    assert one.s2_directional == pytest.approx(
        directional_noise_from_operator(op, u, seed=3).s2, rel=1e-6)


# ---------------------------------------------------------------- sampled population

def test_sampled_subspace_population_is_horvitz_thompson(problem):
    """With every sample it is the exhaustive pass; over random subsets of n = 60 of the
    N = 240 samples, D and S are unbiased for the exhaustive ones (z-scores on traces)."""
    from nets.noise.subspace_noise import subspace_noise_from_operator
    model, X, y, Hs, H, ev, V = problem
    op = hessian_operator(model, CE, (X, y))
    U = torch.from_numpy(V[:, :3].copy())
    full = subspace_noise_from_operator(op, U)
    same = subspace_noise_from_operator(op, U, samples=np.arange(N)[::-1])
    assert full.samples is None and same.samples is None
    np.testing.assert_allclose(same.D, full.D, rtol=1e-10)
    rng = np.random.default_rng(0)
    trD, trS = [], []
    for _ in range(40):
        rows = rng.choice(N, size=60, replace=False)
        sn = subspace_noise_from_operator(op, U, samples=rows)
        assert sn.n_rows == 60 and sn.ht_scale == pytest.approx(4.0)
        assert sn.samples.tolist() == sorted(rows.tolist())
        trD.append(np.trace(sn.D))
        trS.append(np.trace(sn.S))
    for est, want in ((np.array(trD), np.trace(full.D)), (np.array(trS), np.trace(full.S))):
        z = (est.mean() - want) / (est.std(ddof=1) / np.sqrt(len(est)))
        assert abs(z) < 3.5, (est.mean(), want, z)
    with pytest.raises(ValueError, match="distinct"):
        subspace_noise_from_operator(op, U, samples=[1, 1, 2])
    with pytest.raises(ValueError, match="indices"):
        subspace_noise_from_operator(op, U, samples=[3])


def test_population_batches_count_resolved_samples_like_the_data():
    """Emulated batches: the number of resolved samples per batch has the hypergeometric
    mean B·n_res/N of the data, resolved rows do not repeat within a batch (unless it
    holds more resolved samples than there are resolved rows)."""
    from nets.noise.resolved_noise import _population_batches
    rng = np.random.default_rng(1)
    resolved = np.zeros(100, dtype=bool)
    resolved[[3, 17, 40, 41, 77]] = True                 # r = 5 of n = 100 rows
    Nd, B = 1000, 40                                     # population count 50
    idx = _population_batches(Nd, resolved, B, 4000, rng, False)
    assert idx.shape == (4000, B)
    counts = resolved[idx].sum(axis=1)
    want = B * 50 / Nd
    sd = np.sqrt(want * (1 - 50 / Nd) * (Nd - B) / (Nd - 1))
    assert abs(counts.mean() - want) < 4 * sd / np.sqrt(4000)
    for row in idx[(counts > 1) & (counts <= 5)][:200]:     # at most r: all distinct
        hs = row[resolved[row]]
        assert len(set(hs.tolist())) == hs.size
    plain = _population_batches(Nd, np.zeros(100, bool), B, 5, rng, False)
    assert plain.shape == (5, B) and plain.min() >= 0 and plain.max() < 100


def _sampled_resolved_ratios(model, X, y, seeds=range(6)):
    """Sampled population (n = N/2) against the exhaustive form at B = 2, 8, 32: one row of
    ratios per subset seed."""
    op = hessian_operator(model, CE, (X, y))
    from nets.algorithms.lanczos import eigsh
    U = eigsh(op, k=3, which="LA", tol=1e-10, seed=0).vectors
    Bs = [2, 8, 32]
    ex = resolved_noise_from_operator(op, U, min_batch=2, seed=0, exact=True)
    assert ex.subspace.samples is None
    a = resolved_batch_top_eigenvalue(ex, Bs, n_batches=400, seed=1)["mean"]
    n = X.shape[0] // 2
    runs = []
    for seed in seeds:
        sc = resolved_noise_from_operator(op, U, min_batch=2, seed=seed, max_samples=n)
        assert sc.subspace.n_rows == n and sc.gamma.shape == (n,) and sc.proxy.shape == (n,)
        assert np.all(sc.weight >= 1.0 - 1e-12) and sc.full_products < ex.full_products
        assert sc.subspace.weights.sum() == pytest.approx(X.shape[0])
        runs.append(resolved_batch_top_eigenvalue(sc, Bs, n_batches=400, seed=1)["mean"])
    with pytest.raises(ValueError, match="exhaustive"):
        resolved_batch_top_eigenvalue(sc, [4], indices=[np.zeros((3, 4), dtype=int)])
    whole = resolved_noise_from_operator(op, U, min_batch=2, seed=0, max_samples=X.shape[0])
    assert whole.subspace.samples is None                  # max_samples >= N: every sample
    return np.array(runs) / a


def test_sampled_resolved_form_tracks_exhaustive(light):
    """Moderate tails: every one of 6 subsets of n = 100 of the N = 200 samples within 15 %
    of the exhaustive form at B = 2, 8, 32 (measured: 0.97–1.12), their mean within 6 %."""
    model, X, y = light[:3]
    r = _sampled_resolved_ratios(model, X, y)
    assert np.all(np.abs(r - 1) < 0.15), r
    assert np.all(np.abs(r.mean(axis=0) - 1) < 0.06), r.mean(axis=0)


def test_sampled_resolved_form_on_few_very_heavy_samples(problem):
    """15 of 240 samples are heavy (×6 inputs). The stratified rows (the highest-scoring
    micro-batch groups taken whole) hold the heavy samples, so 6 subsets of n = 120 stay
    within 40 % at every B (measured 0.89–1.31; uniform rows gave 0.67–1.88) and their
    mean within 20 %. Not 15 %: the exhaustive form is the one to use on such data."""
    model, X, y = problem[:3]
    r = _sampled_resolved_ratios(model, X, y)
    assert np.all(np.abs(r - 1) < 0.40), r
    assert np.all(np.abs(r.mean(axis=0) - 1) < 0.20), r.mean(axis=0)


def test_stratified_rows_take_the_heaviest_groups_whole(problem):
    from nets.noise.subspace_noise import micro_batch_moments, stratified_rows
    model, X, y, Hs, H, ev, V = problem
    op = hessian_operator(model, CE, (X, y))
    U = torch.from_numpy(V[:, :3].copy())
    mom = micro_batch_moments(op, U, op.matmat(U), micro_batch=2, seed=0)
    rows, w = stratified_rows(mom, N, 80, seed=0)
    assert rows.size == 80 and np.all(np.diff(rows) > 0)
    assert w.sum() == pytest.approx(N) and np.all(w >= 1.0)
    top = mom.groups[np.argsort(-mom.score)[:10]].reshape(-1)        # 80/4 = 20 samples
    assert set(top.tolist()) <= set(rows[w == 1.0].tolist())
    # the heavy samples are over-represented: a uniform draw would hold 80/240 of 15
    assert len(set(HEAVY) & set(rows.tolist())) >= 10


def test_micro_batch_moments_are_unbiased(light):
    """D, S and the covariance C of vec(a_i) from micro-batches of 4: unbiased over random
    partitions for the exhaustive per-sample values (z-scores over 30 partitions)."""
    from nets.noise.subspace_noise import micro_batch_moments, subspace_noise_from_operator
    model, X, y, Hs, H, ev, V = light
    op = hessian_operator(model, CE, (X, y))
    U = torch.from_numpy(V[:, :3].copy())
    full = subspace_noise_from_operator(op, U)
    flat = full.a.reshape(full.N, -1)
    C_full = flat.T @ flat / (full.N - 1)                       # Σ_i a_i = 0
    HU = op.matmat(U)
    est = [micro_batch_moments(op, U, HU, micro_batch=4, seed=s) for s in range(30)]
    for pos, want in (("D", full.D), ("S", full.S), ("C", C_full)):
        tr = np.array([np.trace(getattr(e, pos)) for e in est])
        z = (tr.mean() - np.trace(want)) / (tr.std(ddof=1) / np.sqrt(len(tr)))
        assert abs(z) < 3.5, (pos, tr.mean(), np.trace(want), z)
    assert est[0].C.shape == (9, 9) and np.allclose(est[0].C, est[0].C.T)
    assert est[0].groups.shape == (50, 4) and est[0].score.shape == (50,)
    # S is the contraction of C: S_jl = Σ_m C_(jm),(lm) for symmetric a_i
    C4 = est[0].C.reshape(3, 3, 3, 3)
    np.testing.assert_allclose(np.einsum("jmlm->jl", C4), est[0].S, rtol=1e-8, atol=1e-12)


def test_sampled_subspace_form_is_a_gaussian_with_the_datas_moments(light):
    """A sampled population's subspace form draws a_S from N(0, c·C): with C and D from the
    micro-batch pass over every sample it is within 10 % of the exhaustive form's Gaussian
    variant at every B."""
    from nets.noise.subspace_noise import subspace_batch_top_eigenvalue as sbt
    from nets.noise.subspace_noise import subspace_noise_from_operator, subspace_pass
    model, X, y, Hs, H, ev, V = light
    op = hessian_operator(model, CE, (X, y))
    U = torch.from_numpy(V[:, :3].copy())
    Bs = [2, 8, 32]
    full = subspace_noise_from_operator(op, U)
    want = sbt(full, Bs, method="gaussian", n_batches=4000, seed=0)["mean"]
    rows = np.random.default_rng(0).choice(X.shape[0], size=60, replace=False)
    sn, _ = subspace_pass(op, U, samples=rows, moments=2, seed=0)
    assert sn.a_cov is not None and sn.a_cov.shape == (9, 9)
    got = sbt(sn, Bs, n_batches=4000, seed=0)["mean"]
    np.testing.assert_allclose(got, want, rtol=0.10)
    with pytest.raises(ValueError, match="exhaustive"):
        sbt(sn, [4], indices=[np.zeros((3, 4), dtype=int)])


def test_sampled_subspace_form_against_a_dense_gaussian_oracle(light):
    """A sampled population given the exact per-sample moments (D, S, C from dense per-sample
    Hessians, passed as the micro-batch `Moments`) draws a_S ~ N(0, c·C) with c = 1/B − 1/N:
    E λ_max(Λ_k + a_S + c·D/λ₁) matches a numpy Monte-Carlo of that closed form (z-score of
    the difference of two independent Monte-Carlo means; a variance off by ×0.5 gives
    |z| ≈ 25–40), and the spread of the values matches too."""
    from dense_oracles import dense_subspace_moments, gaussian_top_eigenvalue

    from nets.noise.subspace_noise import Moments, subspace_pass
    from nets.noise.subspace_noise import subspace_batch_top_eigenvalue as sbt
    model, X, y, Hs, H, ev, V = light
    Nd, k, nb = X.shape[0], 3, 20000
    U = V[:, :k].copy()
    a, D, S, C = dense_subspace_moments(Hs, H, U)
    mom = Moments(D=D, S=S, C=C, groups=np.arange(Nd).reshape(-1, 2), score=np.zeros(Nd // 2))
    op = hessian_operator(model, CE, (X, y))
    rows = np.random.default_rng(0).choice(Nd, size=60, replace=False)
    sn, _ = subspace_pass(op, torch.from_numpy(U), samples=rows, moments=mom)
    Bs = [2, 8, 32]
    got = sbt(sn, Bs, n_batches=nb, seed=0)
    rng = np.random.default_rng(12345)
    for j, B in enumerate(Bs):
        c = 1.0 / B - 1.0 / Nd
        assert got["c"][j] == pytest.approx(c, rel=1e-12)
        z = gaussian_top_eigenvalue(np.diag(ev[:k]) + c * D / ev[0], c * C, nb, rng)
        se = np.hypot(z.std(ddof=1) / np.sqrt(nb), got["stderr"][j])
        zs = (got["mean"][j] - z.mean()) / se
        assert abs(zs) < 4.0, (B, got["mean"][j], z.mean(), zs)
        assert got["values"][j].std() == pytest.approx(z.std(), rel=0.05), B


@pytest.mark.parametrize("which", ["light", "problem"])
def test_sampled_resolved_form_against_a_dense_gaussian_oracle(which, request):
    """The sampled population's unresolved fluctuation against a dense oracle. N ≤ 511, so
    the micro-batch moments are per-sample (m = 1) and equal the dense D and C; the dense
    spikes γ_i = λ_max(H_i) say which batch sizes resolve nothing. Where nothing is
    resolved (γ_i ≤ resolve_factor·B·λ₁ for every i: forced by resolve_factor at every B,
    and under the default rule at the B above max γ_i/λ₁ on the light data) the model is
    λ_max(Λ_k + c·D/λ₁ + a_S), a_S ~ N(0, c·C), c = 1/B − 1/N: z-score of the two
    Monte-Carlo means (the unresolved variance halved gives |z| ≈ 13–38 at B = 8, 32)."""
    from dense_oracles import dense_subspace_moments, gaussian_top_eigenvalue
    model, X, y, Hs, H, ev, V = request.getfixturevalue(which)
    Nd, k, nb = X.shape[0], 3, 20000
    U = V[:, :k].copy()
    a, D, S, C = dense_subspace_moments(Hs, H, U)
    gam = np.linalg.eigvalsh(Hs)[:, -1]                          # dense spikes γ_i
    gmax = float(gam.max())
    op = hessian_operator(model, CE, (X, y))
    rn = resolved_noise_from_operator(op, torch.from_numpy(U), min_batch=2, seed=0,
                                      max_samples=Nd // 2)
    assert rn.subspace.samples is not None and rn.subspace.n_rows == Nd // 2
    np.testing.assert_allclose(rn.subspace.D, D, rtol=1e-8, atol=1e-12 * np.abs(D).max())
    np.testing.assert_allclose(rn.subspace.a_cov, C, rtol=1e-8, atol=1e-12 * np.abs(C).max())
    np.testing.assert_allclose(rn.gamma, gam[rn.subspace.samples], rtol=1e-8)   # the rows'
    runs = [([2, 8, 32], 1.01 * gmax / (2 * ev[0]))]                # nothing resolved at any B
    if which == "light":
        free = int(np.ceil(gmax / ev[0] * 1.001))                  # 12: first B resolving nothing
        assert free <= 16
        runs.append(([free, 32], 1.0))                               # the default rule
    rng = np.random.default_rng(7)
    for Bs, rf in runs:
        got = resolved_batch_top_eigenvalue(rn, Bs, n_batches=nb, seed=1, resolve_factor=rf)
        assert np.all(got["n_resolved"] == 0)
        for j, B in enumerate(Bs):
            c = 1.0 / B - 1.0 / Nd
            z = gaussian_top_eigenvalue(np.diag(ev[:k]) + c * D / ev[0], c * C, nb, rng)
            se = np.hypot(z.std(ddof=1) / np.sqrt(nb), got["stderr"][j])
            zs = (got["mean"][j] - z.mean()) / se
            assert abs(zs) < 3.5, (B, rf, got["mean"][j], z.mean(), zs)


def test_sampled_directional_stderr_is_the_finite_population_one(light):
    """At a fixed subset size n = N/2 (min_samples = max_samples = n, m = 1) the sampled s_u²
    is the mean of n of the N dense terms t_i = N/(N−1)·‖(H_i − H)u‖², drawn without
    replacement, and stderr² is unbiased for the exact finite-population variance
    (1 − n/N)·var(t)/n (var with ddof 1, from the dense per-sample Hessians). Two-sided over
    40 seeds: z-score of mean(stderr²)/exact − 1 (measured 0.99 ± 0.03; without the
    correction √(1 − n/N) the ratio is 2, with a doubled stderr 4)."""
    model, X, y, Hs, H, ev, V = light
    Nd, n, seeds = X.shape[0], X.shape[0] // 2, 40
    u = V[:, 0]
    d = np.einsum("npq,q->np", Hs - H, u)
    t = Nd / (Nd - 1) * (d * d).sum(axis=1)
    se2 = (1.0 - n / Nd) * t.var(ddof=1) / n
    op = hessian_operator(model, CE, (X, y))
    s2, r = [], []
    for seed in range(seeds):
        est = directional_noise_from_operator(op, torch.from_numpy(u.copy()), seed=seed,
                                              rel_error=1e-9, min_samples=n, max_samples=n)
        assert est.n_used == n and not est.exact and est.micro_batch == 1
        s2.append(float(est.s2))
        r.append(float(est.stderr) ** 2 / se2)
    r, s2 = np.array(r), np.array(s2)
    z = (r.mean() - 1.0) / (r.std(ddof=1) / np.sqrt(seeds))
    assert abs(z) < 3.5 and abs(r.mean() - 1) < 0.15, (r.mean(), z)
    # the estimate itself: unbiased for the exhaustive mean (z-score with the exact SE)
    zm = (s2.mean() - t.mean()) / np.sqrt(se2 / seeds)
    assert abs(zm) < 3.5, (s2.mean(), t.mean(), zm)

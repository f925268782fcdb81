"""Tests of nets.learning_rates.monitor (CurvatureMonitor, eoss_plateau).

Oracles: the package's public entry points called independently at the same checkpoint
(top_eigenvalues with a cold start; measure_batch_top_eigenvalue with the same seed),
a dense float64 Hessian (torch.func.hessian), the closed-form root of the plateau
equation, and a fake clock for the budget.
"""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from nets import measure_batch_top_eigenvalue, top_eigenvalues
from nets.learning_rates.monitor import CurvatureMonitor, MonitorRecord, eoss_plateau
from nets.training.models import MLP
from rmt.lr import batch_curvature, sgd_max_lr


def _data(N=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 6, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    return X, y


def _model(seed=0):
    return MLP(6, (5,), 3, activation="tanh", seed=seed).double()


CE = nn.functional.cross_entropy


def _train_steps(model, opt, X, y, steps, B=16, start=0, mon=None):
    g = torch.Generator().manual_seed(123)
    orders = [torch.randperm(X.shape[0], generator=g) for _ in range(50)]
    flat = torch.cat(orders)
    for k in range(start, start + steps):
        idx = flat[k * B:(k + 1) * B]
        opt.zero_grad()
        CE(model(X[idx]), y[idx]).backward()
        opt.step()
        if mon is not None:
            mon.maybe_record(k + 1)


def test_record_reproduces_the_public_measurements(dense_hessian):
    X, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    _train_steps(model, opt, X, y, 5)
    mon = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=3, lr=0.5, seed=4,
                           tol=1e-8)
    rec = mon.record(5)
    lam_ref = top_eigenvalues(model, CE, (X, y), k=1, seed=11)[0]
    assert rec.lam == pytest.approx(lam_ref, rel=1e-6)
    lam_dense = float(torch.linalg.eigvalsh(dense_hessian(model, CE, X, y))[-1])
    assert rec.lam == pytest.approx(lam_dense, rel=1e-6)
    ref = measure_batch_top_eigenvalue(model, CE, (X, y), [16], n_batches=3, seed=4 + 5)
    assert abs(rec.batch_sharpness - float(ref["mean"][0])) <= float(ref["stderr"][0])
    # the derived quantities are the formulas of rmt.lr at the recorded λ₁, s_u²
    N = X.shape[0]
    assert rec.lam_prime == pytest.approx(batch_curvature(16, rec.lam, rec.s2, N), rel=1e-12)
    assert rec.b_star == pytest.approx(rec.s2 / rec.lam ** 2, rel=1e-12)
    np.testing.assert_allclose(rec.max_lr, sgd_max_lr(np.array(rec.batch_sizes), rec.lam,
                                                      rec.s2, N), rtol=1e-12)
    i = rec.batch_sizes.index(16)
    assert rec.transfer_lr[i] == pytest.approx(0.5, rel=1e-12)
    assert rec.plateau == pytest.approx(eoss_plateau(0.5, 16, rec.s2, N), rel=1e-12)
    assert rec.s2 > 0 and rec.s2_stderr >= 0
    # N = 120 < DEFAULT_MIN_SAMPLES: s_u² is the exhaustive value along the top eigenvector,
    # (1/(N−1)) Σ_i ‖(H_i − H)u‖², and its stderr the data's own std(t)/√N of the terms
    # t_i = N/(N−1)·‖(H_i − H)u‖² (dense per-sample Hessians)
    from dense_oracles import vmapped_per_sample_hessians
    Hs, H, ev, V = vmapped_per_sample_hessians(model, CE, X, y)
    d = np.einsum("npq,q->np", Hs - H, V[:, 0])
    t = N / (N - 1) * (d * d).sum(axis=1)
    assert rec.lam == pytest.approx(ev[0], rel=1e-6)
    assert rec.s2 == pytest.approx(t.mean(), rel=1e-6)
    assert rec.s2_stderr == pytest.approx(t.std(ddof=1) / math.sqrt(N), rel=1e-6)


def test_warm_start_uses_fewer_products():
    X, y = _data(seed=1)
    model = _model(1)
    mon = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0)
    cold = mon.record(0)
    with torch.no_grad():                       # a small move of the weights
        for p in model.parameters():
            p.mul_(1.001)
    warm = mon.record(1)
    lam_ref = top_eigenvalues(model, CE, (X, y), k=1)[0]
    assert warm.lam == pytest.approx(lam_ref, rel=1e-6)
    assert warm.num_matvecs < cold.num_matvecs


def test_killed_run_resumes_without_loss_or_duplicates(tmp_path):
    X, y = _data(seed=2)
    path = tmp_path / "mon.jsonl"
    kw = dict(batch_size=16, n_batches=2, every=5, budget=1.0, lr=0.3, path=path)
    model = _model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    mon = CurvatureMonitor(model, CE, (X, y), **kw)
    mon.maybe_record(0)
    _train_steps(model, opt, X, y, 12, mon=mon)          # records 0, 5, 10
    ckpt = {k: v.clone() for k, v in model.state_dict().items()}     # saved at step 10
    _train_steps(model, opt, X, y, 3, start=12, mon=mon)   # step 15 recorded, then "killed"
    assert mon.recorded_steps() == [0, 5, 10, 15]
    with open(path, "ab") as fh:                          # a kill in the middle of a write
        fh.write(b'{"key": "step=20", "val')
    model2 = _model(99)
    model2.load_state_dict(ckpt)
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.3)
    mon2 = CurvatureMonitor(model2, CE, (X, y), **kw)
    assert mon2.recorded_steps() == [0, 5, 10, 15]
    assert mon2.records[1].to_dict() == mon.records[1].to_dict()
    _train_steps(model2, opt2, X, y, 15, start=10, mon=mon2)           # steps 11..25
    assert mon2.recorded_steps() == [0, 5, 10, 15, 20, 25]
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    keys = [x["key"] for x in lines]
    assert keys == ["config", "step=0", "step=5", "step=10", "step=15", "step=20", "step=25"]
    # other settings on the same file are refused
    with pytest.raises(ValueError, match="other settings"):
        CurvatureMonitor(model2, CE, (X, y), **dict(kw, batch_size=8))
    rec = MonitorRecord.from_dict(lines[-1]["value"])
    assert rec.to_dict() == mon2.records[-1].to_dict()


def test_budget_bounds_the_overhead_with_a_fake_clock():
    X, y = _data(seed=3)
    model = _model(3)
    t = [0.0]
    mon = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0, budget=0.1,
                           clock=lambda: t[0])
    real_measure = mon.measure

    def slow_measure(step, **kw):           # every record costs 2 time units
        t[0] += 2.0
        return real_measure(step, **kw)

    mon.measure = slow_measure
    for step in range(400):                 # every training step costs 1 unit
        mon.maybe_record(step)
        t[0] += 1.0
    n = len(mon.records)
    # records at 0 and then whenever spent + 2 <= 0.1·(elapsed + 2): about every 20 units
    assert 15 <= n <= 22, mon.recorded_steps()
    assert mon.overhead() <= 0.1 + 1e-12
    assert mon.records[0].step == 0
    # with a budget of 1 every call records
    t2 = [0.0]
    mon_all = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0, budget=1.0,
                               every=3, clock=lambda: t2[0])
    for step in range(10):
        mon_all.maybe_record(step)
        t2[0] += 1.0
    assert mon_all.recorded_steps() == [0, 3, 6, 9]


def test_attach_reads_lr_from_the_optimizer_and_plots():
    X, y = _data(seed=4)
    model = _model(4)
    opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.5)
    mon = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0, every=2, budget=1.0)
    handle = mon.attach(opt)
    _train_steps(model, opt, X, y, 4)
    handle.remove()
    assert mon.recorded_steps() == [1, 3]
    r = mon.records[-1]
    assert (r.lr, r.momentum) == (0.2, 0.5)
    assert r.plateau == pytest.approx(eoss_plateau(0.2, 16, r.s2, X.shape[0], momentum=0.5))
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    plt.figure()                        # plot() draws on the current axes
    ax = mon.plot()
    assert len(ax.lines) >= 3
    plt.close(ax.figure)
    d = mon.to_dict()
    assert json.dumps(d) and len(d["records"]) == 2


def test_eoss_plateau_closed_form():
    lr, N, s2 = 0.1, 1000, 30.0
    assert eoss_plateau(lr, N, s2, N) == pytest.approx(2 / lr)              # c(N, N) = 0
    for B in (8, 32, 128):
        lam = eoss_plateau(lr, B, s2, N)
        c = 1 / B - 1 / N
        assert lam + c * s2 / lam == pytest.approx(2 / lr, rel=1e-12)       # on the edge
        assert lam < 2 / lr
    assert eoss_plateau(lr, 8, s2, N) < eoss_plateau(lr, 128, s2, N)        # lower at small B
    assert eoss_plateau(lr, 32, s2, N, momentum=0.9) == pytest.approx(
        eoss_plateau(lr / 1.9, 32, s2, N))
    assert math.isnan(eoss_plateau(1.0, 1, 10.0, N))         # 4cs² = 39.96 > (2/1)² = 4


def test_monitor_validates_its_arguments():
    X, y = _data()
    model = _model()
    for kw, exc, name in [(dict(batch_size=0), ValueError, "batch_size"),
                          (dict(batch_size=1000), ValueError, "batch_size"),
                          (dict(batch_size=8, budget=0.0), ValueError, "budget"),
                          (dict(batch_size=8, budget=2.0), ValueError, "budget"),
                          (dict(batch_size=8, every=0), ValueError, "every"),
                          (dict(batch_size=8, momentum=1.0), ValueError, "momentum"),
                          (dict(batch_size=8, kind="fisher"), ValueError, "kind"),
                          (dict(batch_size=8, batch_sizes=[4, 10_000]), ValueError,
                           "batch_sizes")]:
        with pytest.raises(exc, match=name):
            CurvatureMonitor(model, CE, (X, y), **kw)
    bn = nn.Sequential(nn.Linear(6, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)).double()
    with pytest.raises(ValueError, match="BatchNorm"):
        CurvatureMonitor(bn, CE, (X, y), batch_size=8)
    with pytest.raises(ValueError, match="at least 2 samples"):     # not at the 1st record
        CurvatureMonitor(model, CE, (X[:1], y[:1]), batch_size=1)


def test_attach_says_when_a_resumed_store_and_start_step_disagree(tmp_path):
    """Resumed from its store without start_step, the monitor labelled the step-29
    record 16 and skipped three; and an optimizer over another model was not said."""
    X, y = _data(seed=3)
    model = _model(3)
    path = tmp_path / "mon.jsonl"
    mon = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0, every=5, path=path,
                           budget=1.0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    mon.attach(opt)
    _train_steps(model, opt, X, y, 7)
    assert mon.recorded_steps() == [1, 6]
    again = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0, every=5, path=path,
                           budget=1.0)
    with pytest.warns(UserWarning, match="records up to step 6"):
        again.attach(opt)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again.attach(opt, start_step=7)
        # a restart from a checkpoint before the last record, its step passed, is fine
        # (the stored step 6 is skipped): it was warned about as if start_step were wrong
        again.attach(opt, start_step=4)
    other = torch.optim.SGD(_model(4).parameters(), lr=0.05)
    with pytest.warns(UserWarning, match="none of the model's trainable parameters"):
        again.attach(other, start_step=7)
    assert 1 in CurvatureMonitor(model, CE, (X[:2], y[:2]), batch_size=1,
                                 n_batches=0).batch_sizes



def test_default_lr_table_batch_sizes_are_powers_of_two_from_2_with_B_and_N():
    """Default B' of the lr table: powers of 2 from 2 up to N, with B and N added; B' = 1
    (a single sample, far outside the batch model) only when B or N is 1."""
    X, y = _data()                                              # N = 120
    mon = CurvatureMonitor(_model(), CE, (X, y), batch_size=16, n_batches=0)
    assert mon.batch_sizes == (2, 4, 8, 16, 32, 64, 120)
    mon = CurvatureMonitor(_model(), CE, (X, y), batch_size=12, n_batches=0)
    assert mon.batch_sizes == (2, 4, 8, 12, 16, 32, 64, 120)
    mon = CurvatureMonitor(_model(), CE, (X[:2], y[:2]), batch_size=2, n_batches=0)
    assert mon.batch_sizes == (2,)

def test_monitor_user_loop_edge_cases(tmp_path):
    """From a sweep of user loops: an optimizer with no limit here is said and gets nan
    limits (not heavy ball's); attaching twice counts each step once; to_dict is strict
    JSON before any record; a file written for other parameters is refused."""
    import warnings

    X, y = _data()
    model = _model()
    kw = dict(batch_size=16, batch_sizes=[16, 120], n_batches=0, budget=1.0)
    mon = CurvatureMonitor(model, CE, (X, y), every=1, **kw)
    json.dumps(mon.to_dict(), allow_nan=False)
    nadam = torch.optim.NAdam(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="no stability limit for NAdam"):
        mon.attach(nadam)
    _train_steps(model, nadam, X, y, 1)
    rec = mon.records[-1]
    assert np.isnan(rec.max_lr).all() and np.isnan(rec.edge) and np.isnan(rec.plateau)
    json.dumps(mon.to_dict(), allow_nan=False)
    # RMSprop has a limit here, not SGD's: its nan SGD table was said in a docstring only
    rms = torch.optim.RMSprop(model.parameters(), lr=1e-3)
    with pytest.warns(UserWarning, match="attached to RMSprop, whose stability limit is not"):
        mon.attach(rms, start_step=1)
    _train_steps(model, rms, X, y, 1)
    assert np.isnan(mon.records[-1].max_lr).all() and np.isfinite(mon.records[-1].lam)

    mon2 = CurvatureMonitor(model, CE, (X, y), every=10, **kw)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        mon2.attach(sgd)
        mon2.attach(sgd)                      # again: the first hook is removed
    _train_steps(model, sgd, X, y, 20)
    assert mon2._steps == 20 and mon2.recorded_steps() == [1, 11]

    path = tmp_path / "mon.jsonl"
    names = [n for n, _ in model.named_parameters()][:2]
    CurvatureMonitor(model, CE, (X, y), path=path, params=names, **kw)
    with pytest.raises(ValueError, match="other settings"):
        CurvatureMonitor(model, CE, (X, y), path=path, **kw)


def test_learner_history_is_strict_json():
    from nets import CurvatureAdaptiveSGD
    from nets.learning_rates.learner import CurvatureUpdate

    X, y = _data()
    opt = CurvatureAdaptiveSGD(_model(), CE, (X, y), batch_size=16)
    d = opt.history[0].to_dict()
    text = json.dumps(d, allow_nan=False)
    back = CurvatureUpdate.from_dict(json.loads(text))
    for k in ("lr", "s2", "lam_measured"):
        a, b = getattr(back, k), getattr(opt.history[0], k)
        assert (math.isnan(a) and math.isnan(b)) or a == b


def test_refusals_come_at_construction_and_load():
    from nets import CurvatureAdaptiveSGD

    X, y = _data()
    with pytest.raises(ValueError, match="train_batch_stats"):
        CurvatureMonitor(_model(), CE, (X, y), batch_size=16, policy="train_batch_stats")
    a = CurvatureAdaptiveSGD(_model(), CE, (X, y), batch_size=16)
    b = CurvatureAdaptiveSGD(_model(), CE, (X, y), batch_size=32)
    with pytest.raises(ValueError, match="batch_size=16"):
        b.load_state_dict(a.state_dict())
    c = CurvatureAdaptiveSGD(_model(), CE, (X, y), batch_size=16)
    c.load_state_dict(a.state_dict())                       # same batch size: fine


def test_a_record_leaves_layer_modes_and_the_random_stream_alone():
    """Fine-tuning keeps BatchNorm/Dropout in eval mode inside a training model: a record
    once restored only the top-level flag (model.train(True) switched them back to train
    mode), and a forward with active dropout drew from the caller's random stream, so the
    same seeded run ended up to 0.22 apart with a monitor attached."""
    X, y = _data(seed=2)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Dropout(0.3),
                        nn.Linear(8, 3)).double()
    net.train()
    net[1].eval()
    modes = [m.training for m in net.modules()]
    mon = CurvatureMonitor(net, CE, (X, y), batch_size=16, policy="eval", n_batches=2)
    torch.manual_seed(7)
    before = torch.rand(3)
    torch.manual_seed(7)
    mon.record(0)
    assert [m.training for m in net.modules()] == modes
    torch.testing.assert_close(torch.rand(3), before)        # the stream was not drawn from


def test_eoss_plateau_names_momentum_when_refused():
    """Review D4: momentum=1.0 failed with rmt.lr's "beta must be in [0, 1)", a name the
    caller never gave."""
    for bad in (1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="momentum"):
            eoss_plateau(0.1, 8, 1.0, 100, momentum=bad)
    assert eoss_plateau(0.1, 8, 1.0, 100, momentum=0.5) > 0


def test_unfreezing_a_layer_mid_run_is_refused_not_mixed_into_the_records(tmp_path):
    """Review D2: after a frozen layer was unfrozen, the records silently switched from the
    head's 18 parameters to all 53 while the file's settings still said P = 18, and the
    restart on that file was then refused. A record over another parameter set is now
    refused as the learner refuses it, and nothing is written; a fixed `params=` set is
    unaffected."""
    X, y = _data()
    model = _model()
    body = [p for n, p in model.named_parameters() if n.startswith("net.0.")]
    for p in body:
        p.requires_grad_(False)                     # fine-tuning: the head only
    path = tmp_path / "mon.jsonl"
    kw = dict(batch_size=16, n_batches=0, budget=1.0, path=path)
    mon = CurvatureMonitor(model, CE, (X, y), **kw)
    mon.record(0)
    for p in body:
        p.requires_grad_(True)                      # progressive unfreezing
    with pytest.raises(ValueError, match=r"trainable parameters changed.*net\.0\.weight"):
        mon.record(1)
    with pytest.raises(ValueError, match="trainable parameters changed"):
        mon.maybe_record(2)
    assert mon.recorded_steps() == [0]
    keys = [json.loads(x)["key"] for x in path.read_text().splitlines()]
    assert keys == ["config", "step=0"]             # no record of the other set written
    for p in body:
        p.requires_grad_(False)
    again = CurvatureMonitor(model, CE, (X, y), **kw)   # the file is still this run's
    assert again.recorded_steps() == [0] and again.record(1).step == 1
    # a set named with params= does not move when layers are unfrozen
    head = ["net.2.weight", "net.2.bias"]
    fixed = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0, params=head)
    r0 = fixed.record(0)
    for p in body:
        p.requires_grad_(True)
    assert fixed.record(1).lam == pytest.approx(r0.lam, rel=1e-6)


def test_another_run_on_the_same_file_is_refused(tmp_path):
    """Review D3: a second run (other initialisation and lr) writing to the first run's
    path got the first run's records back for its steps 1-16 and appended its own: one
    trace of two runs, no warning. Each record now stores a fingerprint of the weights,
    and a run at the step of the file's first record must have that record's weights;
    the same run started again from scratch (deterministic) reads its records back."""
    X, y = _data(seed=2)
    path = tmp_path / "mon.jsonl"
    kw = dict(batch_size=16, n_batches=0, every=5, budget=1.0, path=path)

    def run(seed, lr, steps):
        model = _model(seed)
        opt = torch.optim.SGD(model.parameters(), lr=lr)
        mon = CurvatureMonitor(model, CE, (X, y), **kw)
        _train_steps(model, opt, X, y, steps, mon=mon)
        return mon

    first = run(0, 0.3, 12)
    assert first.recorded_steps() == [1, 6, 11]
    lines = [json.loads(x)["value"] for x in path.read_text().splitlines()[1:]]
    assert all(isinstance(v["weights"], str) and v["weights"] for v in lines)
    with pytest.raises(ValueError, match="another run"):
        run(7, 2.0, 20)                               # other init and lr
    with pytest.raises(ValueError, match="another run"):
        run(0, 2.0, 20)                               # same init, other lr: differs at step 1
    with pytest.raises(ValueError, match="another run"):
        CurvatureMonitor(_model(7), CE, (X, y), **kw).record(1)
    keys = [json.loads(x)["key"] for x in path.read_text().splitlines()]
    assert keys == ["config", "step=1", "step=6", "step=11"]     # nothing of them written
    same = run(0, 0.3, 20)                            # the same run again: its records read back
    assert same.recorded_steps() == [1, 6, 11, 16]
    for a, b in zip(first.records, same.records):
        assert a.to_dict() == b.to_dict()


def test_summed_and_weighted_losses_warn_at_construction():
    # with n_batches=0 nothing warned, and a summed loss gave a max_lr at B=1 54× too low
    X, y = _data()
    model = _model()
    summed = lambda out, t: CE(out, t, reduction="sum")
    weighted = lambda out, t: CE(out, t, weight=torch.tensor([1.0, 4.0, 0.2], dtype=torch.float64))
    for loss, what in [(summed, "summed"), (weighted, "weighted mean")]:
        with pytest.warns(UserWarning, match=what) as rec:
            CurvatureMonitor(model, loss, (X, y), batch_size=8, n_batches=0, lr=0.1)
        assert sum("loss_fn" in str(w.message) for w in rec) == 1, what    # once
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        CurvatureMonitor(model, CE, (X, y), batch_size=8, n_batches=0, lr=0.1)
    assert not [w for w in rec if "loss_fn" in str(w.message)]


def test_an_explicit_lr_keeps_the_attached_optimizers_momentum():
    """With SGD(momentum=0.9) attached, `measure(lr=...)` recorded momentum 0 and the
    limits of plain SGD (max_lr 5.7× high, an outside sweep): the lr given replaces α
    only. The oracle: the same measurement without the lr, at the same step (same seed)."""
    X, y = _data(seed=2)
    model = _model(2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    mon = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0)
    mon.attach(opt)
    read = mon.measure(3)
    given = mon.measure(3, lr=0.1)
    assert (given.lr, given.momentum) == (0.1, 0.9)
    # (the second Lanczos run starts from the first's vector: equal to its tolerance)
    np.testing.assert_allclose(given.max_lr, read.max_lr, rtol=1e-5)
    assert given.edge == pytest.approx(read.edge, rel=1e-5)


def test_a_subset_monitor_uses_the_training_sets_size_in_the_batch_noise():
    """docs advise giving the monitor a few hundred samples of the training set; c(B, N)
    then used the subset's N (the noise term 0.38× its value for 200 of 3,000) and refused
    B above the subset. With train_size the limits use the training N. The oracle: the
    closed form λ' = λ + (1/B − 1/N)·s²/λ from the recorded λ and s²."""
    X, y = _data(N=120, seed=5)
    model = _model(5)
    sub = (X[:40], y[:40])
    mon = CurvatureMonitor(model, CE, sub, batch_size=64, n_batches=2, lr=0.1, train_size=120)
    r = mon.record(0)
    assert r.lam_prime == pytest.approx(float(batch_curvature(64, r.lam, r.s2, 120)), rel=1e-12)
    assert max(mon.batch_sizes) == 120 and math.isnan(r.batch_sharpness)    # B > len(data)
    small = CurvatureMonitor(model, CE, sub, batch_size=16, lr=0.1, train_size=120).record(0)
    assert small.lam_prime == pytest.approx(float(batch_curvature(16, small.lam, small.s2, 120)),
                                            rel=1e-12)
    assert math.isfinite(small.batch_sharpness)
    with pytest.raises(ValueError, match="train_size"):
        CurvatureMonitor(model, CE, sub, batch_size=16, train_size=20)
    with pytest.raises(ValueError, match="batch_size must be <= N = 40"):
        CurvatureMonitor(model, CE, sub, batch_size=64)


def test_the_learners_weight_decay_is_said_and_a_loss_tensor_is_read_quietly():
    """The learner adds its weight decay to its own curvature; the monitor's limits are
    without it and said nothing (torch's SGD with weight decay is warned about; an outside
    sweep). A loss passed as the training step's tensor (requires grad) raised torch's
    'Converting a tensor with requires_grad=True to a scalar' warning."""
    from nets import CurvatureAdaptiveSGD

    X, y = _data(seed=6)
    model = _model(6)
    mon = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0)
    learner = CurvatureAdaptiveSGD(model, CE, (X, y), batch_size=16, weight_decay=0.5)
    with pytest.warns(UserWarning, match="weight_decay=0.5 is not in the monitor's curvature"):
        mon.attach(learner)
    loss = CE(model(X), y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = mon.measure(1, loss=loss)
    assert r.loss == pytest.approx(float(loss.detach()))


def test_policy_eval_on_a_training_batch_norm_net_is_said():
    """A BatchNorm net trained in train mode can only be monitored with policy='eval',
    which measures the running-statistics function: its λ₁ was 2.8× the train-mode one on
    a small CNN after 6 steps, silently (an outside sweep). The oracle: the package's
    own batch-statistics Hessian (policy='train_batch_stats') differs from the eval one
    here too; a BatchNorm held in eval mode (fine-tuning) is not warned about."""
    X, y = _data(seed=3)
    torch.manual_seed(3)
    net = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3)).double()
    net.train()
    with pytest.warns(UserWarning, match="policy='eval' measures the model on its running"):
        mon = CurvatureMonitor(net, CE, (X, y), batch_size=16, policy="eval", n_batches=0)
    lam_eval = mon.record(0).lam
    lam_train = top_eigenvalues(net, CE, (X, y), k=1, policy="train_batch_stats")[0]
    assert abs(lam_eval / lam_train - 1) > 0.05
    net[1].eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CurvatureMonitor(net, CE, (X, y), batch_size=16, policy="eval")


def test_bad_inputs_are_refused_up_front_and_leave_the_monitor_as_it_was(tmp_path):
    """From an outside audit: a failed attach (a string for the optimizer) stored it and
    every later record failed with AttributeError; chunk_size=0 was refused only inside the
    first step's hook, after the weights had moved; record(loss="abc") failed after the
    measurement had moved the warm start; a directory or an impossible path gave the OS's
    error; trace() of an unknown field an AttributeError."""
    X, y = _data()
    model = _model()
    lf = nn.functional.cross_entropy
    with pytest.raises(ValueError, match="chunk_size"):
        CurvatureMonitor(model, lf, (X, y), batch_size=16, chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        CurvatureMonitor(model, lf, (X, y), batch_size=16, chunk_size=True)
    for path in (tmp_path, tmp_path / "f.jsonl" / "x.jsonl"):
        if path != tmp_path:
            (tmp_path / "f.jsonl").write_text("")          # a file where a folder is needed
        with pytest.raises(ValueError, match="path: cannot use"):
            CurvatureMonitor(model, lf, (X, y), batch_size=16, path=path)
    mon = CurvatureMonitor(model, lf, (X, y), batch_size=16, n_batches=2, lr=0.1)
    clean = CurvatureMonitor(model, lf, (X, y), batch_size=16, n_batches=2, lr=0.1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer"):
        mon.attach("sgd")
    with pytest.raises(TypeError, match="loss must be a real number"):
        mon.record(0, loss="abc")
    for m in (mon, clean):
        m.record(0, loss=torch.tensor(1.5))
        m.record(1)
    assert mon.recorded_steps() == clean.recorded_steps() == [0, 1]
    np.testing.assert_array_equal(mon.trace("lam"), clean.trace("lam"))
    assert mon.trace("loss")[0] == 1.5
    with pytest.raises(ValueError, match="key must be a field"):
        mon.trace("nope")


# ------------------------------------------------------ mutation audit, round 3 (monitor)

class _ScaledNet(nn.Module):
    """An MLP whose output is multiplied by a buffer: a buffer the weights fingerprint
    must see (a state_dict entry that is not a parameter)."""

    def __init__(self, scale):
        super().__init__()
        self.net = _model(0)
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float64))

    def forward(self, x):
        return self.net(x) * self.scale


def test_another_run_differing_only_in_a_buffer_is_refused(tmp_path):
    X, y = _data(seed=3)
    kw = dict(batch_size=16, n_batches=0, budget=1.0, path=tmp_path / "mon.jsonl")
    CurvatureMonitor(_ScaledNet(1.0), CE, (X, y), **kw).record(0)
    with pytest.raises(ValueError, match="another run"):
        CurvatureMonitor(_ScaledNet(2.0), CE, (X, y), **kw).record(0)
    assert CurvatureMonitor(_ScaledNet(1.0), CE, (X, y), **kw).recorded_steps() == [0]


def test_lr_table_and_transfer_by_hand_without_momentum():
    """Without momentum: max_lr(B') = 2/λ'(B'), transfer(B') = α·λ'(B)/λ'(B'), with
    λ'(B') = λ₁ + (1/B' − 1/N)·s²/λ₁ written out from the record's λ₁ and s²."""
    X, y = _data(seed=5)
    N, B, a = X.shape[0], 16, 0.3
    mon = CurvatureMonitor(_model(5), CE, (X, y), batch_size=B, n_batches=0, lr=a,
                           batch_sizes=(2, 16, 60))
    r = mon.record(0)
    lp = lambda b: r.lam + (1.0 / b - 1.0 / N) * r.s2 / r.lam  # noqa: E731
    np.testing.assert_allclose(r.max_lr, [2.0 / lp(b) for b in (2, 16, 60)], rtol=1e-12)
    np.testing.assert_allclose(r.transfer_lr, [a * lp(B) / lp(b) for b in (2, 16, 60)],
                               rtol=1e-12)
    assert r.transfer_lr[1] == pytest.approx(a, rel=1e-12)


def test_dampening_without_momentum_does_not_change_the_limit():
    """torch's SGD ignores dampening when momentum is 0 — also when a momentum schedule
    sets it to 0 after the monitor was attached: the limit is then 2/λ'(B')."""
    X, y = _data(seed=6)
    model = _model(6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5, dampening=0.5)
    mon = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0, batch_sizes=(4, 16))
    mon.attach(opt)
    opt.param_groups[0]["momentum"] = 0.0             # e.g. a momentum warm-up's first step
    r = mon.measure(0)
    N = X.shape[0]
    lp = [r.lam + (1.0 / b - 1.0 / N) * r.s2 / r.lam for b in (4, 16)]
    np.testing.assert_allclose(r.max_lr, [2.0 / v for v in lp], rtol=1e-12)
    assert r.edge == pytest.approx(2.0 / 0.1, rel=1e-12)


def test_records_taken_out_of_order_are_kept_in_step_order():
    X, y = _data(seed=7)
    mon = CurvatureMonitor(_model(7), CE, (X, y), batch_size=16, n_batches=0, budget=1.0)
    for s in (10, 3, 7):
        mon.record(s)
    assert mon.recorded_steps() == [3, 7, 10]
    assert list(mon.trace("step")) == [3, 7, 10]


def test_another_run_differing_only_in_its_lr_or_momentum_is_refused(tmp_path):
    """A run at lr 1.0 on the file of a run at lr 0.1 got the old records back (edge 20
    for 2), and so did momentum 0.9 after 0: lr and momentum were not in the file's
    settings, and the weights check of the first record cannot see them when that record
    is taken before any step (an outside audit). The constructor's lr and momentum are now
    settings, and an attached optimizer's are compared with each stored record's."""
    X, y = _data(seed=2)
    path = tmp_path / "mon.jsonl"
    kw = dict(batch_size=16, n_batches=0, path=path)
    first = CurvatureMonitor(_model(0), CE, (X, y), lr=0.1, **kw).record(0)
    assert first.lr == 0.1
    with pytest.raises(ValueError, match=r"lr \(0.1 there, 1.0 here\)"):
        CurvatureMonitor(_model(0), CE, (X, y), lr=1.0, **kw)
    with pytest.raises(ValueError, match=r"momentum \(0.0 there, 0.9 here\)"):
        CurvatureMonitor(_model(0), CE, (X, y), lr=0.1, momentum=0.9, **kw)
    again = CurvatureMonitor(_model(0), CE, (X, y), lr=0.1, **kw).record(0)
    assert again.to_dict() == first.to_dict()                  # the same run reads it back

    opt_path = tmp_path / "opt.jsonl"

    def attached(lr, momentum=0.0):
        model = _model(0)
        mon = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0, path=opt_path)
        mon.attach(torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum))
        return mon.record(0)

    assert attached(0.1).lr == 0.1
    with pytest.raises(ValueError, match="recorded at lr = 0.1 and this run has 1"):
        attached(1.0)
    with pytest.raises(ValueError, match="recorded at momentum = 0 and this run has 0.9"):
        attached(0.1, 0.9)
    assert attached(0.1).lr == 0.1

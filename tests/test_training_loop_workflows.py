"""The package inside a practitioner's training loop: schedulers, warm-ups, parameter
groups, a reused records file, mixed precision, augmenting datasets, DataLoader options.

Oracles: torch's own SGD update (dampening is applied inside the momentum buffer only),
the optimizer's param_groups, a dense float64 Hessian, and the same call made outside
the loop's context (autocast) or with the data given as a tensor pair.
"""

from __future__ import annotations

import contextlib
import json
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from nets import CurvatureAdaptiveSGD, predict_max_lr, top_eigenvalues
from nets.learning_rates.lr_prediction import optimizer_settings
from nets.learning_rates.lr_search import training_threshold
from nets.learning_rates.monitor import CurvatureMonitor
from nets.training.models import MLP
from nets.utils.data_source import as_data_source
from nets.utils.jsonl_store import JsonlStore

CE = nn.functional.cross_entropy


def _data(N=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(N, 6, generator=g, dtype=torch.float64)
    y = (X[:, 0] + 0.5 * X[:, 1] > 0).long() + (X[:, 2] > 1).long()
    return X, y


def _model(seed=0, width=5):
    return MLP(6, (width,), 3, activation="tanh", seed=seed).double()


def _steps(model, opt, X, y, n, *, B=16, sched=None):
    for k in range(n):
        idx = torch.arange(k * B, (k + 1) * B) % X.shape[0]
        opt.zero_grad()
        CE(model(X[idx]), y[idx]).backward()
        opt.step()
        if sched is not None:
            sched.step()


# ----------------------------------------------------------------- optimizer settings

def test_dampening_without_momentum_is_plain_sgd():
    """torch applies dampening inside the momentum buffer: with momentum 0 the update is
    plain SGD, so the limit must be 2/λ'(B), not 2/((1−τ)λ'(B))."""
    X, y = _data()
    model = _model()
    w0 = [p.detach().clone() for p in model.parameters()]
    a = torch.optim.SGD(model.parameters(), lr=0.3, dampening=0.5)
    _steps(model, a, X, y, 3)
    w_damp = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p, w in zip(model.parameters(), w0):
            p.copy_(w)
    _steps(model, torch.optim.SGD(model.parameters(), lr=0.3), X, y, 3)
    assert all(torch.equal(u, v) for u, v in zip(w_damp, model.parameters()))   # torch's own
    s = optimizer_settings(torch.optim.SGD(model.parameters(), lr=0.1, dampening=0.5))
    assert s.dampening == 0.0 and s.sgd_factor == 2.0
    damp = predict_max_lr(model, CE, (X, y), [8, 32],
                          optimizer=torch.optim.SGD(model.parameters(), lr=0.1, dampening=0.5))
    plain = predict_max_lr(model, CE, (X, y), [8, 32], optimizer="sgd")
    np.testing.assert_allclose(damp, plain, rtol=1e-12)
    with_m = optimizer_settings(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.5,
                                                dampening=0.5))
    assert with_m.dampening == 0.5 and with_m.sgd_factor == pytest.approx(2 * 1.5 / 0.5)


def test_adam_with_decoupled_weight_decay_is_read_as_adamw():
    model = _model()
    opt = torch.optim.Adam(model.parameters(), weight_decay=0.01, decoupled_weight_decay=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        s = optimizer_settings(opt)
    assert s.name == "adam"
    with pytest.warns(UserWarning, match="weight_decay=0.01 is not modelled"):
        optimizer_settings(torch.optim.Adam(model.parameters(), weight_decay=0.01))


def test_training_threshold_refuses_groups_with_different_momenta():
    X, y = _data()
    model = _model()
    params = list(model.parameters())
    for groups in ([{"params": params[:2], "momentum": 0.9}, {"params": params[2:], "momentum": 0.0}],
                   [{"params": params[:2], "momentum": 0.0}, {"params": params[2:], "momentum": 0.9}]):
        opt = torch.optim.SGD(groups, lr=0.1)
        with pytest.raises(ValueError, match="param groups differ in.*momentum"):
            training_threshold(model, CE, (X, y), [16], optimizer=opt, seeds=(0,), steps=5)


# ----------------------------------------------------------------- the monitor

def test_monitor_records_a_zero_learning_rate_warmup_step():
    """A warm-up from lr 0 (LambdaLR(s/10)) must not stop training: the record keeps
    lr = 0 and has no edge, plateau or transfer."""
    X, y = _data()
    model = _model()
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, s / 10))
    mon = CurvatureMonitor(model, CE, (X, y), batch_size=16, every=3, n_batches=0, budget=1.0)
    mon.attach(opt)
    _steps(model, opt, X, y, 5, sched=sched)
    first, later = mon.records[0], mon.records[1]
    assert first.step == 1 and first.lr == 0.0
    assert math.isnan(first.edge) and math.isnan(first.plateau)
    assert all(math.isnan(t) for t in first.transfer_lr)
    assert all(math.isfinite(m) for m in first.max_lr)           # the limits need no lr
    assert later.lr == pytest.approx(0.5 * 3 / 10)               # the scheduler's, at step 4
    assert later.edge == pytest.approx(2 * 1.9 / later.lr)
    rec = mon.measure(9, lr=0.0)
    assert rec.lr == 0.0 and math.isnan(rec.edge)


def test_monitor_refuses_a_file_of_another_model(tmp_path):
    X, y = _data()
    path = tmp_path / "curv.jsonl"
    m1 = _model(width=5)
    CurvatureMonitor(m1, CE, (X, y), batch_size=16, n_batches=0, path=path).record(1)
    # the same model and data resume
    again = CurvatureMonitor(m1, CE, (X, y), batch_size=16, n_batches=0, path=path)
    assert again.recorded_steps() == [1]
    cases = {"the number of parameters": (_model(width=9), CE, (X, y)),
             "the model's structure or the loss": (m1, lambda o, t: CE(o, t, label_smoothing=0.2), (X, y)),
             "the data": (m1, CE, (X + 0.1, y)),
             "the model's dtype": (_model(width=5).float(), CE, (X, y))}
    for what, (model, loss, data) in cases.items():
        with pytest.raises(ValueError, match=f"another run \\(differing: .*{what.split()[-1]}"):
            CurvatureMonitor(model, loss, data, batch_size=16, n_batches=0, path=path)


def test_two_monitors_on_one_file_are_refused_not_interleaved(tmp_path):
    X, y = _data()
    path = tmp_path / "shared.jsonl"
    a = CurvatureMonitor(_model(), CE, (X, y), batch_size=16, n_batches=0, path=path)
    b = CurvatureMonitor(_model(), CE, (X, y), batch_size=16, n_batches=0, path=path)
    a.record(1)
    with pytest.raises(ValueError, match="step 1 was written by another monitor"):
        b.record(1)
    keys = [json.loads(line)["key"] for line in path.read_text().splitlines()]
    assert keys == ["config", "step=1"]


def test_jsonl_store_sees_a_key_another_writer_appended(tmp_path):
    path = tmp_path / "s.jsonl"
    one, two = JsonlStore(path), JsonlStore(path)
    one.put("a", 1)
    with pytest.raises(KeyError, match="by another writer"):
        two.put("a", 2)
    two.put("b", 3)                         # a fresh key still goes in, and `a` is seen
    assert two["a"] == 1 and JsonlStore(path).keys() == ["a", "b"]


def test_monitor_says_what_it_cannot_follow_in_an_optimizer():
    X, y = _data()
    model = _model()
    head = list(model.parameters())[-2:]
    with pytest.warns(UserWarning, match="updates only"):
        CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0).attach(
            torch.optim.SGD(head, lr=0.1))
    params = list(model.parameters())
    mixed = torch.optim.SGD([{"params": params[:2], "momentum": 0.9},
                             {"params": params[2:], "momentum": 0.0}], lr=0.1)
    with pytest.warns(UserWarning, match="param groups differ in"):
        CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0).attach(mixed)
    two_lrs = torch.optim.SGD([{"params": params[:2], "lr": 0.5},
                               {"params": params[2:], "lr": 0.05}])
    with pytest.warns(UserWarning, match="different learning rates"):
        CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0).attach(two_lrs)
    # a group added after attaching is read at the next step
    opt = torch.optim.SGD(params[:2], lr=0.1, momentum=0.9)
    mon = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0, budget=1.0)
    mon.attach(opt)
    opt.add_param_group({"params": params[2:], "momentum": 0.0})
    with pytest.warns(UserWarning, match="param groups differ in"):
        _steps(model, opt, X, y, 1)
    assert all(math.isnan(v) for v in mon.records[0].max_lr)


def test_monitor_ignores_an_enclosing_autocast():
    X, y = _data()
    model = _model().float()
    Xf = X.float()
    ref = top_eigenvalues(model, CE, (Xf, y), k=1, seed=3, tol=1e-8)[0]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = top_eigenvalues(model, CE, (Xf, y), k=1, seed=3, tol=1e-8)[0]
        rec = CurvatureMonitor(model, CE, (Xf, y), batch_size=16, n_batches=0,
                               tol=1e-8).record(1)
    assert inside == ref
    assert rec.lam == pytest.approx(ref, rel=1e-6)


#: public functions that take a model or operator but compute nothing curvature-like: the
#: training loop and checkpoints (a user's own autocast applies there), helpers that size
#: chunks, fetch samples or describe a model
NOT_ENTRY_POINTS = {"fetch_groups", "group_chunk", "default_subspace_dim", "code_fingerprint",
                    "kept_modes", "kept_tensors", "kept_attributes", "tensor_attributes",
                    "model_copy"}


def _public_functions():
    """Every function in the `__all__` of a `nets` module (outside nets.training) whose
    first two parameters name a model, an operator or a shard."""
    import importlib
    import inspect
    import pkgutil

    import nets

    seen = {}
    for info in pkgutil.walk_packages(nets.__path__, "nets."):
        if info.name.startswith("nets.training"):
            continue
        mod = importlib.import_module(info.name)
        for name in getattr(mod, "__all__", []):
            obj = getattr(mod, name, None)
            if (inspect.isfunction(obj) and name not in NOT_ENTRY_POINTS
                    and {"model", "op", "batch_op", "shard"}
                    & set(list(inspect.signature(obj).parameters)[:2])):
                seen[name] = obj
    return seen


def test_every_entry_point_that_computes_runs_outside_autocast():
    """A user's mixed-precision region reached the noise passes and the training trials
    (predict_max_lr 4e-4 off, isotropic_noise 0.5 %, training_threshold failing to find
    a divergent lr inside torch.autocast bf16), then (a review) preconditioned_noise,
    warm_adam_state and output_jacobians: every public function of a nets module that
    takes a model or an operator is wrapped."""
    computing = _public_functions()
    assert {"predict_max_lr", "training_threshold", "isotropic_noise", "eigsh",
            "gradient_noise", "hessian_operator", "preconditioned_noise", "warm_adam_state",
            "output_jacobians", "distributed_hessian_operator"} <= set(computing)
    missing = sorted(n for n, f in computing.items()
                     if not getattr(f, "runs_outside_autocast", False))
    assert missing == []


def test_noise_predictions_and_trials_ignore_an_enclosing_autocast():
    from nets import isotropic_noise

    X, y = _data()
    model = _model().float()
    data = (X.float(), y)

    from nets.learning_rates.adam import preconditioned_noise, warm_adam_state
    P = sum(p.numel() for p in model.parameters())

    def calls():
        warm = warm_adam_state(model, CE, *data, 16, warmup_steps=3, warmup_lr=1e-2)
        return (float(predict_max_lr(model, CE, data, [8, 32], seed=1)[0]),
                float(isotropic_noise(model, CE, data, seed=1).s2),
                float(training_threshold(model, CE, data, [16], steps=8, seeds=(0,)).lr[0]),
                float(preconditioned_noise(model, CE, data, torch.ones(P)).s2),
                float(sum(p.double().sum() for p in warm.model.parameters())))

    ref = calls()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = calls()
    assert all(np.isfinite(ref))
    assert inside == ref


def _orthogonal_model():
    from torch.nn.utils.parametrizations import orthogonal

    torch.manual_seed(4)
    return nn.Sequential(orthogonal(nn.Linear(6, 6)), nn.Tanh(), nn.Linear(6, 3)).double()


def test_entry_points_ignore_an_enclosing_parametrization_cache():
    """Inside `torch.nn.utils.parametrize.cached()` every forward after the first read the
    orthogonal weight the first one computed: λ₁ 0.520 for 0.537 and predict_max_lr 31 %
    high, a training trial crashed (the original weight not in the graph), and the
    package's tensors left in the caller's cache broke the next call (an outside sweep)."""
    import torch.nn.utils.parametrize as P

    X, y = _data()
    model = _orthogonal_model()
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(w):                       # the oracle: dense float64 Hessian of the loss in w
        parts = dict(zip(names, torch.split(w, [s.numel() for s in shapes])))
        out = torch.func.functional_call(model, {n: parts[n].view(s) for n, s in
                                                 zip(names, shapes)}, (X,))
        return CE(out, y)

    lam = float(torch.linalg.eigvalsh(torch.func.hessian(loss)(w0))[-1])

    def calls():
        return (float(top_eigenvalues(model, CE, (X, y), k=1, seed=3, tol=1e-10)[0]),
                *np.asarray(predict_max_lr(model, CE, (X, y), [4, 32], seed=1)),
                float(training_threshold(model, CE, (X, y), [16], steps=10, seeds=(0,)).lr[0]))

    ref = calls()
    assert ref[0] == pytest.approx(lam, rel=1e-8)
    with P.cached():
        model(X[:2])                   # the caller's own cached forward
        inside = calls()
        assert P._cache_enabled == 1   # the caller's cache is still on afterwards
        again = calls()
    assert inside == pytest.approx(ref, rel=1e-10) and again == pytest.approx(ref, rel=1e-10)

    # a monitor attached to a training step run inside the cache
    def monitored(cached):
        net = _orthogonal_model()
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        mon = CurvatureMonitor(net, CE, (X, y), batch_size=16, n_batches=0, every=1, budget=1.0,
                               tol=1e-10, seed=0)
        mon.attach(opt)
        for k in range(3):
            with P.cached() if cached else contextlib.nullcontext():
                opt.zero_grad()
                CE(net(X[16 * k:16 * (k + 1)]), y[16 * k:16 * (k + 1)]).backward()
                opt.step()
        return [r.lam for r in mon.records]

    plain = monitored(False)
    assert len(plain) == 3 and monitored(True) == pytest.approx(plain, rel=1e-10)


def test_monitor_built_on_an_eval_model_with_train_mode_layers_warns():
    """As the learner does: the usual model.train() afterwards makes opt.step() raise."""
    X, y = _data()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.BatchNorm1d(8), nn.Tanh(),
                          nn.Linear(8, 3)).double().eval()
    with pytest.warns(UserWarning, match="CurvatureMonitor: the model is in eval mode"):
        CurvatureMonitor(model, CE, (X, y), batch_size=16)
    assert not any(m.training for m in model.modules())        # modes restored
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        CurvatureMonitor(model, CE, (X, y), batch_size=16, policy="eval")
        CurvatureMonitor(_model().eval(), CE, (X, y), batch_size=16)   # nothing to switch


def test_monitor_plot_draws_on_the_current_axes():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X, y = _data()
    mon = CurvatureMonitor(_model(), CE, (X, y), batch_size=16, n_batches=0, lr=0.1)
    mon.record(1)
    plt.close("all")
    fig, (a1, a2) = plt.subplots(1, 2)
    plt.sca(a2)
    try:
        assert mon.plot() is a2 and len(a2.lines) > 0 and not a1.lines
        assert len(plt.get_fignums()) == 1
    finally:
        plt.close("all")


# ----------------------------------------------------------------- the learner

def test_learner_undoes_a_schedulers_change_and_says_so():
    X, y = _data()
    model = _model()
    opt = CurvatureAdaptiveSGD(model, CE, (X, y), batch_size=16, update_every=4,
                               first_update_every=2, curvature_batch_size=32)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, 0.5)
    used = []
    with pytest.warns(UserWarning, match="changed from outside") as rec:
        for k in range(8):
            idx = torch.arange(k * 16, (k + 1) * 16) % X.shape[0]
            opt.zero_grad()
            CE(model(X[idx]), y[idx]).backward()
            opt.step()
            used.append(opt.param_groups[0]["lr"])       # the lr of the step just taken
            sched.step()
    # named at the opt.step() line here, past torch's step wrappers
    assert {w.filename for w in rec if "changed from outside" in str(w.message)} == {__file__}
    learned = {h.lr for h in opt.history}
    assert set(used) <= learned                          # every step used a learned lr
    # between the scheduler's step and the next opt.step() (where a loop logs or saves),
    # opt.lr and the saved param_groups are the learner's, not the scheduler's
    assert sched.get_last_lr()[0] != opt.history[-1].lr
    assert opt.lr == opt.history[-1].lr and opt.momentum == opt.history[-1].momentum
    saved = opt.state_dict()["param_groups"][0]
    assert (saved["lr"], saved["momentum"]) == (opt.lr, opt.momentum)
    with pytest.raises(ValueError, match="one parameter group"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(3))]})


# ----------------------------------------------------------------- data

class _Augmenting(Dataset):
    def __init__(self, X, y):
        self.X, self.y = X, y

    def __len__(self):
        return len(self.X)

    def __getitem__(self, i):
        return self.X[i] + 0.05 * torch.randn_like(self.X[i]), self.y[i]


def test_a_randomly_augmenting_dataset_is_refused():
    X, y = _data()
    with pytest.raises(ValueError, match="differs between two reads"):
        top_eigenvalues(_model(), CE, _Augmenting(X, y), k=1)
    with pytest.raises(ValueError, match="differs between two reads"):
        as_data_source(DataLoader(_Augmenting(X, y), batch_size=32))
    as_data_source(TensorDataset(X, y))                   # a fixed one passes


def test_drop_last_is_said_and_the_numbers_are_those_of_the_kept_samples():
    X, y = _data(N=100)
    loader = DataLoader(TensorDataset(X, y), batch_size=32, drop_last=True)
    with pytest.warns(UserWarning, match="4 of its dataset's 100 samples are left out"):
        src = as_data_source(loader)
    assert src.N == 96
    with pytest.warns(UserWarning, match="drop_last"):
        lam = top_eigenvalues(_model(), CE, loader, k=1, seed=2, tol=1e-10)[0]
    ref = top_eigenvalues(_model(), CE, (X[:96], y[:96]), k=1, seed=2, tol=1e-10)[0]
    assert lam == pytest.approx(ref, rel=1e-9)


class _Terminal:
    """A standard error that says it is a terminal and keeps what is written to it."""

    def __init__(self):
        self.text = []

    def isatty(self):
        return True

    def write(self, s):
        self.text.append(s)

    def flush(self):
        pass


def test_a_slow_call_on_a_small_network_shows_a_bar_and_a_fast_one_does_not(monkeypatch):
    """progress=None used to decide from the network's size (P > 200,000 for Lanczos), so a
    CNN whose products take a second each ran for minutes without a bar. Now a bar is
    created on a terminal and drawn once the call has run AUTO_SECONDS (tqdm's delay;
    a total changed mid-run is redrawn only after that too)."""
    import sys
    import time

    import nets.utils.progress as progress
    from nets import eigsh
    from nets.curvature.operators import CurvatureOperator

    class Dense(CurvatureOperator):          # a small operator, products slow or fast
        def __init__(self, A, pause):
            super().__init__(A.shape[0], A.dtype, "cpu")
            self.A, self.pause = A, pause

        def _matmat(self, V):
            time.sleep(self.pause)
            return self.A @ V

    g = torch.Generator().manual_seed(0)
    M = torch.randn(30, 30, generator=g, dtype=torch.float64)
    A = M @ M.T
    monkeypatch.setattr(progress, "AUTO_SECONDS", 0.5)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    fast = eigsh(Dense(A, 0.0), k=2, seed=0, return_vectors=False).values
    assert "".join(term.text) == ""
    slow = eigsh(Dense(A, 0.03), k=2, seed=0, return_vectors=False).values   # ~1 s
    assert "eigsh: products" in "".join(term.text)
    np.testing.assert_allclose(slow, fast, rtol=1e-12)
    np.testing.assert_allclose(fast, torch.linalg.eigvalsh(A).flip(0)[:2].numpy(), rtol=1e-9)
    term.text.clear()
    eigsh(Dense(A, 0.03), k=2, seed=0, return_vectors=False, progress=False)
    assert "".join(term.text) == ""


def test_slq_and_the_gradient_noise_hessian_pass_draw_bars(monkeypatch):
    """An outside sweep at scale: slq_density had no progress option (280 s silent on a
    14k-parameter CNN) and gradient_noise's Hessian products (95 s of a 101 s call, and
    lr_table's longest silent stretch) drew no bar. Numbers unchanged by the bars."""
    import sys

    import nets
    import nets.utils.progress as progress
    from nets import gradient_noise, hessian_operator, slq_density

    X, y = _data()
    model = _model()
    monkeypatch.setattr(progress, "AUTO_SECONDS", 0.0)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    op = hessian_operator(model, CE, (X, y))
    quiet = slq_density(op, num_probes=3, num_steps=6, seed=1, probe_block=2, progress=False)
    assert "".join(term.text) == ""
    shown = slq_density(op, num_probes=3, num_steps=6, seed=1, probe_block=2)
    assert "SLQ Lanczos steps" in "".join(term.text)
    np.testing.assert_array_equal(quiet.nodes, shown.nodes)
    np.testing.assert_array_equal(quiet.weights, shown.weights)
    term.text.clear()
    gradient_noise(model, CE, (X, y), hessian_samples=8, progress=False)
    assert "".join(term.text) == ""
    gradient_noise(model, CE, (X, y), hessian_samples=8)
    assert "Hessian products" in "".join(term.text)
    term.text.clear()                   # the subspace Jacobians of the linearised form
    nets.linearized_threshold(model, CE, (X, y), [16], rank=4, steps=4, seeds=(0,), n_grid=4)
    assert "output Jacobians along 4 directions" in "".join(term.text)


def test_the_secant_profile_and_the_hessian_samples_report_as_they_go(monkeypatch):
    """Scale sweep: transfer_lr's first stage, the loss along the top eigenvector (a
    Lanczos run and 4n full-data losses), was 91 s silent at N = 5,000 on a 134k-parameter
    CNN, and gradient_noise's 32 default Hessian samples ran as one call under a bar of
    total 1, drawn only when done (44 s silent). The oracle for the numbers: the same
    calls without bars."""
    import re
    import sys

    import nets.utils.progress as progress
    from nets import gradient_noise
    from nets.learning_rates.along_top import loss_along_top

    X, y = _data()
    model = _model()
    monkeypatch.setattr(progress, "AUTO_SECONDS", 0.0)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    quiet = loss_along_top(model, CE, (X, y), n=8, progress=False)
    assert "".join(term.text) == ""
    shown = loss_along_top(model, CE, (X, y), n=8)
    assert "loss along the top eigenvector" in "".join(term.text)
    assert shown.secant_ratio == quiet.secant_ratio
    term.text.clear()
    a = gradient_noise(model, CE, (X, y), hessian_samples=8, progress=False)
    b = gradient_noise(model, CE, (X, y), hessian_samples=8)
    text = "".join(term.text)
    # a bar over the samples (tqdm skips redraws under 0.1 s, so the steps themselves
    # show only on a slow call), no longer one of total 1
    assert re.search(r"Hessian products: +0%.*\| 0/[2-8] ", text)
    assert b.tr_HSigma == pytest.approx(a.tr_HSigma, rel=1e-12)


def test_warnings_name_the_users_line_whatever_the_call_path():
    """Every entry point is wrapped (outside_autocast), which moved each fixed-stacklevel
    warning one frame into the package (a review: the summed-loss warning of
    isotropic_noise named nets/noise/directional.py). Warnings now name the first frame
    outside nets and torch: this file, for a direct call, a call through another entry
    point, and a learner warning raised inside optimizer.step's torch wrappers."""
    import warnings

    from nets import isotropic_noise

    X, y = _data()
    model = _model()
    summed = (lambda o, t: CE(o, t, reduction="sum"))

    def where(call):
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            call()
        mine = [w for w in rec if "summed" in str(w.message) or "num_probes" in str(w.message)]
        assert mine
        return {w.filename for w in mine}

    assert where(lambda: isotropic_noise(model, summed, (X, y), num_probes=2)) == {__file__}
    assert where(lambda: predict_max_lr(model, summed, (X, y), [8])) == {__file__}
    assert where(lambda: predict_max_lr(model, CE, (X, y), [8], num_probes=3)) == {__file__}
    assert where(lambda: top_eigenvalues(model, summed, (X, y))) == {__file__}


def test_progress_false_silences_the_inner_solves_and_a_disabled_bar_is_left_alone(monkeypatch):
    """(A review.) With the delayed bar, inner Lanczos solves that did not receive the
    caller's progress drew bars under progress=False (batch spectra, the Adam batch
    solves, every monitor record); and redraw() crashed on a bar tqdm had disabled
    (TQDM_DISABLE=1: no clock)."""
    import sys

    from tqdm.auto import tqdm

    import nets.utils.progress as progress
    from nets import measure_batch_top_eigenvalue

    X, y = _data()
    model = _model()
    monkeypatch.setattr(progress, "AUTO_SECONDS", 0.0)
    term = _Terminal()
    monkeypatch.setattr(sys, "stderr", term)
    measure_batch_top_eigenvalue(model, CE, (X, y), [8, 32], n_batches=2, progress=False)
    mon = CurvatureMonitor(model, CE, (X, y), batch_size=16, n_batches=0, lr=0.1)
    mon.record(1)
    assert "".join(term.text) == ""
    measure_batch_top_eigenvalue(model, CE, (X, y), [8, 32], n_batches=2, progress=True)
    assert "batch top eigenvalues" in "".join(term.text)
    off = tqdm(total=3, disable=True)
    progress.redraw(off)                      # no clock: nothing to draw, no error
    off.close()

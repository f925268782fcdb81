"""Shared helpers for the benchmark scripts (timing, environment, JSON output).

Benchmarks are scripts, not tests: they print tables and write
benchmarks/results/<name>.json (atomically: a temporary file renamed into place).
Timings are medians over repeats; competing methods are interleaved round-robin
inside one process so that load drift on a shared machine hits all of them alike.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:                 # run as `python benchmarks/x.py` from anywhere
    sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results"


def base_parser(description: str, *, quick: bool = True) -> argparse.ArgumentParser:
    """The shared options; `quick=False` for a script without a small mode (then --quick
    is an unknown option instead of a promise the script does not keep)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1: reproducible on a shared machine)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per method (median)")
    if quick:
        p.add_argument("--quick", action="store_true", help="smaller sizes / fewer repeats")
    p.add_argument("--out", default=None, help="JSON output path (default benchmarks/results/<name>.json)")
    return p


def setup_torch(args):
    import torch

    torch.set_num_threads(max(1, int(args.threads)))
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but torch.cuda.is_available() is False "
                         "(this benchmark was not run on a GPU)")
    return torch.device(args.device)


def sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn, device=None, repeats: int = 5, warmup: int = 1, min_time: float = 0.0):
    """Median wall time (s) of `fn()` over `repeats` calls after `warmup` calls.
    With min_time > 0, each sample loops fn until it has run ≥ min_time and reports
    the per-call mean (for sub-millisecond functions). Returns (median, samples, last)."""
    out = None
    for _ in range(warmup):
        out = fn()
    sync(device)
    samples = []
    for _ in range(repeats):
        n, t0 = 0, time.perf_counter()
        while True:
            out = fn()
            n += 1
            sync(device)
            el = time.perf_counter() - t0
            if el >= min_time:
                break
        samples.append(el / n)
    return statistics.median(samples), samples, out


def race(fns: dict, device=None, repeats: int = 7, warmup: int = 1, min_time: float = 0.0) -> dict:
    """Time several zero-argument functions interleaved round-robin: repeat r runs
    each function once (looping until ≥ min_time, per-call mean), so slow drifts of
    the machine's load affect all alike. Returns {name: {"min", "median", "samples"}}
    in seconds. Ratios are taken between minima (best of repeats, the usual
    convention for wall-clock timings on a shared machine: noise only adds time)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    sync(device)
    samples = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                sync(device)
                el = time.perf_counter() - t0
                if el >= min_time:
                    break
            samples[k].append(el / n)
    return {k: {"min": min(v), "median": statistics.median(v), "samples": v}
            for k, v in samples.items()}


def environment(device=None) -> dict:
    import scipy
    import torch

    env = dict(python=platform.python_version(), torch=torch.__version__, numpy=np.__version__,
               scipy=scipy.__version__, machine=platform.machine(), processor=platform.processor(),
               cpu_count=os.cpu_count(), torch_threads=torch.get_num_threads(),
               device=str(device) if device is not None else "cpu",
               time_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    try:
        env["loadavg_1min"] = os.getloadavg()[0]
    except OSError:
        pass
    if device is not None and str(device).startswith("cuda"):
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def _clean(x):
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if isinstance(x, np.ndarray):
        return _clean(x.tolist())
    if isinstance(x, (np.floating, float)):
        x = float(x)
        return x if math.isfinite(x) else None
    if isinstance(x, (np.integer,)):
        return int(x)
    if isinstance(x, (np.bool_,)):
        return bool(x)
    return x


def peak_rss_mb() -> float:
    """This process's peak resident set size so far, MB (Linux ru_maxrss is in kB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def write_json(name: str, payload: dict, out: str | None = None) -> Path:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(_clean(payload), indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)
    return path


def stored_parts(name: str, out: str | None = None) -> tuple[Path, dict]:
    """(path, its JSON) of a benchmark that stores one part per run in one file
    (`out`, or RESULTS/<name>.json; {} when there is none yet)."""
    path = Path(out) if out else RESULTS / f"{name}.json"
    return path, (json.loads(path.read_text()) if path.exists() else {})


def write_part(name: str, path: Path, stored: dict, key: str, part: dict, t0: float) -> Path:
    """Merge one run's `part` into `stored` under `key`, with its own wall seconds (since
    `t0`, `time.perf_counter`) and this process's peak RSS, and write the file."""
    part.update(seconds=time.perf_counter() - t0, peak_rss_mb=peak_rss_mb())
    return write_json(name, {**stored, key: part, "environment": environment()}, str(path))


def fmt_time(t) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.0f} µs"
    if t < 1:
        return f"{t * 1e3:.2f} ms"
    return f"{t:.2f} s"


def print_table(rows, columns) -> None:
    """Plain-text table: rows are dicts, columns a list of (key, header)."""
    cells = [[h for _, h in columns]]
    for r in rows:
        cells.append([_cell(r.get(k)) for k, _ in columns])
    widths = [max(len(c[i]) for c in cells) for i in range(len(columns))]
    for j, row in enumerate(cells):
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
        if j == 0:
            print("  ".join("-" * w for w in widths))


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if v == 0:
            return "0"
        if abs(v) >= 1e4 or abs(v) < 1e-2:
            return f"{v:.2e}"
        return f"{v:.3g}"
    return str(v)


def half_mse_onehot(outputs, targets):
    """½‖f(x) − e_y‖² averaged over the batch (mean-reduced): the MSE loss on one-hot targets."""
    import torch

    classes = torch.arange(outputs.shape[-1], device=outputs.device)
    onehot = (targets[..., None] == classes).to(outputs.dtype)      # vmap-safe one-hot
    return 0.5 * ((outputs - onehot) ** 2).sum(dim=-1).mean()


def trained_breast_cancer_mlp(loss_fn, *, layer_norm=False, seed=0, epochs=30):
    """(model in eval mode, (X, y)): the MLP 30-48-32-2 (GELU, SiLU; a LayerNorm after the
    first layer if `layer_norm`) on the standardised breast-cancer data (569 samples),
    trained with `loss_fn` by a plain torch loop — SGD lr 0.05, momentum 0.9, batches of 32
    from a permutation seeded `seed` per epoch, `epochs` epochs, init from
    `torch.manual_seed(seed)` (bench_heldout_tabular.py, bench_heldout_transfer.py)."""
    import torch
    from sklearn.datasets import load_breast_cancer
    from torch import nn

    Xn, yn = load_breast_cancer(return_X_y=True)
    Xn = (Xn - Xn.mean(0)) / Xn.std(0)
    X, y = torch.tensor(Xn, dtype=torch.float32), torch.tensor(yn)
    torch.manual_seed(seed)
    layers = [nn.Linear(30, 48)] + ([nn.LayerNorm(48)] if layer_norm else [])
    model = nn.Sequential(*layers, nn.GELU(), nn.Linear(48, 32), nn.SiLU(), nn.Linear(32, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(X), generator=gen)
        for i in range(0, len(X), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            loss_fn(model(X[idx]), y[idx]).backward()
            opt.step()
    return model.eval(), (X, y)


def trained_mse_mlp(seed=0, hidden=(32,), activation="tanh"):
    """The digits MLP (64-hidden-10, tanh by default) trained with `half_mse_onehot` by the
    digits recipe (10 epochs, SGD lr 0.05, momentum 0.9, batch 64). Returns (model, (X, y),
    loss_fn)."""
    from nets.training.data import load_digits
    from nets.training.loops import DIGITS_RECIPE, train
    from nets.training.models import MLP

    X, y = load_digits(standardize=True)
    model = MLP(64, tuple(hidden), 10, activation=activation, seed=seed)
    res = train(model, half_mse_onehot, (X, y), epochs=DIGITS_RECIPE["epochs"],
                lr=DIGITS_RECIPE["lr"], batch_size=DIGITS_RECIPE["batch_size"],
                momentum=DIGITS_RECIPE["momentum"], seed=seed)
    if res.diverged:
        raise FloatingPointError("MSE digits MLP training diverged")
    return model.eval(), (X, y), half_mse_onehot

"""Memory budgets for batched curvature products.

Every batched computation in `nets` (per-sample products vmapped over samples, products
on several vectors vmapped over the vectors, SLQ probes run side by side) is split into
chunks whose working memory stays below a budget in bytes:

* `memory=None` (default): a fraction of the memory free now on the device
  (CUDA: `DEFAULT_FRACTION` of `torch.cuda.mem_get_info()[0]`; CPU: of the available
  system memory, capped at `CPU_CAP` bytes, so a shared machine is not swamped);
* an int or float: that many bytes; a string such as "512MB" or "2 GiB".

The working memory of one item of a chunk is an estimate (`per_item_bytes`), not a
measurement: a vmapped curvature product along k vectors holds about
`PRODUCT_COPIES` parameter-sized tensors per vector (tangent, cotangent and the output)
plus the activations of the samples it sees, `ACTIVATION_FACTOR` × the input numbers.

Batched per-sample Lanczos (`lanczos_chunk_budget`): with the default budget on CPU the
chunk is also capped at `CPU_LANCZOS_BYTES`. Every step re-reads the chunk's float64
bases (full reorthogonalisation), so the work is bound by memory traffic and larger
chunks are slower per sample: on a 301,066-parameter MLP (1 thread) a chunk of 2 samples
(0.1 GB of bases) took 9 ms per sample-step, chunks of 16 and 32 took 36 and 59 ms
(`benchmarks/bench_scale.py`, README "Predictions at scale"). Small models are
unaffected (their bases are small); an explicit `memory` is used as given.

Per-sample products (`product_chunk`): the same holds for vmapped per-sample (or
per-group) curvature products on CPU. Each call writes one P-vector per sample and
vector, and once a call's working set leaves the caches the time per product grows:
on the same MLP (1 thread, `product_bytes` per sample-product ≈ 7 MB) one product cost
0.012–0.019 full-data HVPs in calls of 8–32 samples along one vector, but 0.04 in
calls of 8 samples along 10 vectors and 0.13 in calls of 256 samples along 10 vectors.
So with the default budget on CPU a call holds at most `CPU_PRODUCT_BYTES` of product
working set, and `ModelCurvatureOperator.group_products` runs the vectors one after
the other on CPU (the result, chunk × P × k, must still fit `memory_budget`).
"""

from __future__ import annotations

import os
import re

import torch

from rmt.validation import as_float

__all__ = ["memory_budget", "chunk_count", "product_bytes", "lanczos_chunk_budget",
           "product_chunk", "capped_sample_chunk", "DEFAULT_FRACTION", "CPU_CAP",
           "CPU_LANCZOS_BYTES", "CPU_PRODUCT_BYTES", "SAMPLE_CHUNK_CAP"]

DEFAULT_FRACTION = 0.25
#: the largest chunk of the per-sample passes that take `capped_sample_chunk`
SAMPLE_CHUNK_CAP = 256
CPU_CAP = 4 << 30
CPU_LANCZOS_BYTES = 128 << 20
CPU_PRODUCT_BYTES = 64 << 20
PRODUCT_COPIES = 4
ACTIVATION_FACTOR = 16

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}


def _available_cpu_bytes() -> int:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 1 << 30


def memory_budget(memory=None, device=None) -> int:
    """The budget in bytes (module docstring). Raises ValueError/TypeError on bad input."""
    if memory is None:
        dev = torch.device("cpu" if device is None else device)
        if dev.type == "cuda" and torch.cuda.is_available():
            free, _ = torch.cuda.mem_get_info(dev)
            return max(1 << 24, int(DEFAULT_FRACTION * free))
        return max(1 << 24, min(CPU_CAP, int(DEFAULT_FRACTION * _available_cpu_bytes())))
    if isinstance(memory, bool):
        raise TypeError(f"memory must be bytes (int), a string like '2GB', or None, got {memory!r}")
    if isinstance(memory, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", memory)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"memory must look like '512MB' or '2GiB', got {memory!r}")
        memory = float(m.group(1)) * _UNITS[m.group(2).lower()]
    try:                                # numpy integers and 0-d tensors count as numbers
        memory = as_float("memory", memory, positive=True)
    except TypeError:
        raise TypeError(f"memory must be bytes (int), a string like '2GB', or None, got "
                        f"{memory!r}") from None
    except ValueError:
        raise ValueError(f"memory must be a positive finite number of bytes, got {memory!r}") from None
    return int(memory)


def lanczos_chunk_budget(memory=None, device=None) -> int:
    """The budget for chunks of batched per-sample Lanczos runs: `memory_budget`, capped
    at CPU_LANCZOS_BYTES when memory is None and the device is the CPU (module docstring)."""
    budget = memory_budget(memory, device)
    if memory is None and _is_cpu(device):
        return min(budget, CPU_LANCZOS_BYTES)
    return budget


def _is_cpu(device) -> bool:
    return torch.device("cpu" if device is None else device).type == "cpu"


def product_chunk(total: int, P: int, k: int, samples: int, sample_numel: int,
                  itemsize: int = 4, *, memory=None, device=None, cap: int | None = 4096) -> int:
    """Groups of `samples` samples per vmapped call of per-group products along k vectors
    (`ModelCurvatureOperator.group_products`), out of `total` groups.

    The whole chunk (product_bytes(P, k, samples, ...) per group) fits
    `memory_budget(memory, device)`; with the default budget on CPU, where the vectors
    run one after the other, one vector's working set per call is also at most
    CPU_PRODUCT_BYTES (module docstring). At least 1, at most `cap`."""
    budget = memory_budget(memory, device)
    n = chunk_count(total, product_bytes(P, k, samples, sample_numel, itemsize), budget, cap)
    if memory is None and _is_cpu(device):
        n = min(n, chunk_count(total, product_bytes(P, 1, samples, sample_numel, itemsize),
                               CPU_PRODUCT_BYTES, cap))
    return n


def product_bytes(P: int, k: int, samples: int, sample_numel: int, itemsize: int = 4) -> int:
    """Estimated working memory of one vmapped curvature product along k vectors on a
    group of `samples` samples: k·(PRODUCT_COPIES·P·itemsize + 8·P) for the tangents and
    the float64 result, plus k·ACTIVATION_FACTOR·samples·sample_numel·itemsize."""
    per_vec = PRODUCT_COPIES * P * itemsize + 8 * P
    act = ACTIVATION_FACTOR * samples * max(sample_numel, 1) * itemsize
    return int(max(k, 1) * (per_vec + act))


def chunk_count(total: int, per_item_bytes: int, budget: int, cap: int | None = None) -> int:
    """How many of `total` items fit the budget at once (at least 1, at most `cap`)."""
    n = max(1, int(budget // max(int(per_item_bytes), 1)))
    n = min(n, max(int(total), 1))
    return n if cap is None else max(1, min(n, int(cap)))


def capped_sample_chunk(total: int, P: int, sample_numel: int, itemsize: int = 4, *,
                        device=None, cap: int = SAMPLE_CHUNK_CAP) -> int:
    """Samples per call of a per-sample pass that holds about `product_bytes(P, 1, 1, ...)`
    per sample (per-sample gradients and their float64 moments; per-sample products along
    one vector): at most `cap` — larger calls gain little, and a chunk of the operator's
    CPU-sized `product_chunk` is several times slower for these passes on large P — and no
    more than the default `memory_budget` holds (a fixed 256 took 4.4 GiB at P = 670k)."""
    return chunk_count(total, product_bytes(P, 1, 1, sample_numel, itemsize),
                       memory_budget(None, device), cap)

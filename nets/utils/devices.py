"""The `device=` option, checked once for every entry point."""

from __future__ import annotations

import torch

__all__ = ["as_device", "canonical_device"]


def canonical_device(device) -> torch.device:
    """torch.device(device), with a CPU index dropped: 'cpu:0' is the CPU, whose tensors
    report no index (so a device comparison with them would fail)."""
    device = torch.device(device)
    return torch.device("cpu") if device.type == "cpu" else device


def as_device(device) -> torch.device:
    """`device` as a usable torch.device, or a ValueError naming `device`: a string torch
    cannot parse, 'meta' (it holds no numbers), CUDA where there is none, and any other
    device torch cannot allocate on. A CUDA device without an index gets the current one."""
    try:
        device = canonical_device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device must name a torch device (e.g. 'cpu', 'cuda'), got {device!r}: "
                         f"{exc}") from None
    if device.type == "meta":
        raise ValueError("device='meta' holds no numbers: curvature needs a real device "
                         "('cpu' or 'cuda'); move the model with model.to('cpu') or pass device=")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device='cuda' requested but CUDA is not available")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
    elif device.type != "cpu":
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError):
            raise ValueError(f"device={str(device)!r} is not available here (torch cannot "
                             "allocate on it): use 'cpu' or an available 'cuda' device") from None
    return device

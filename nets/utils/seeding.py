"""Explicit torch random streams: every random draw in `nets` goes through a seeded
generator passed by the caller, never through torch's global state."""

from __future__ import annotations

import torch

from rmt.validation import as_int


def torch_generator(seed) -> torch.Generator:
    """A CPU `torch.Generator` seeded with `seed` (an int >= 0), or `seed` itself when it
    already is a Generator; the global torch RNG is never touched."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(as_int("seed", seed, minimum=0))
    return g

"""Explicit random streams: every random draw in `nets` goes through a seeded generator
passed by the caller, never through torch's global state.

Seeds (`seed=` of the entry points): an int >= 0; a `numpy.random.Generator` (one int is
drawn from it); or None, fresh entropy: one int is drawn from the operating system's
entropy (`resolved_seed`), and a result that records its seed records that int, so the
call can be repeated."""

from __future__ import annotations

import numpy as np
import torch

from rmt.validation import SEED_BOUND, as_int, as_seed


def resolved_seed(name: str, seed):
    """`seed` checked (`rmt.validation.as_seed`: errors name `name`) and, when None, one
    int in [0, 2**63 - 1) drawn from fresh entropy; an int >= 0 and a Generator's draw
    are returned as ints, other accepted seeds (a SeedSequence) as they are."""
    seed = as_seed(name, seed)
    if seed is None:
        return int(np.random.default_rng().integers(0, SEED_BOUND))
    return seed


def torch_generator(seed) -> torch.Generator:
    """A CPU `torch.Generator` seeded with `seed` (an int >= 0), or `seed` itself when it
    already is a Generator; the global torch RNG is never touched."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(as_int("seed", seed, minimum=0))
    return g

"""Explicit random streams: every random draw in `nets` goes through a seeded generator
passed by the caller, never through torch's global state.

Seeds (`seed=` of the entry points): an int >= 0; a `numpy.random.Generator` (one int is
drawn from it); or None, fresh entropy: one int is drawn from the operating system's
entropy (`resolved_seed`, `rmt.validation`'s, re-exported here), and a result that
records its seed records that int, so the call can be repeated."""

from __future__ import annotations

import torch

from rmt.validation import as_int, resolved_seed  # noqa: F401 -- nets' seeds resolve as rmt's


def torch_generator(seed) -> torch.Generator:
    """A CPU `torch.Generator` seeded with `seed` (an int >= 0), or `seed` itself when it
    already is a Generator; the global torch RNG is never touched."""
    if isinstance(seed, torch.Generator):
        return seed
    g = torch.Generator()
    g.manual_seed(as_int("seed", seed, minimum=0))
    return g

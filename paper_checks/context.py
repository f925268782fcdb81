"""Run-wide settings shared by the checks: seed, sizes, device, progress display.

Randomness: every check draws from `ctx.rng(tag)`, a numpy Generator seeded from the
run seed and the tag, so checks are independent of the order they run in and a re-run
with the same seed gives the same numbers.
"""

from __future__ import annotations

import dataclasses
import functools
import zlib
from pathlib import Path
from typing import Iterable

import numpy as np


class MissingDependency(Exception):
    """Raised by a check's `run` when it is honestly not applicable in this run (e.g. no
    CIFAR folder given, no GPU): the runner reports it as "skipped". A dependency that
    fails to import is *not* this: see `require`."""


class DependencyError(ImportError):
    """A 'module:attr' a check REQUIRES cannot be imported, does not exist or is a
    placeholder: the runner reports it as an error (with the import's traceback), and
    the job's exit code is non-zero."""


@dataclasses.dataclass
class Context:
    seed: int = 0
    quick: bool = False
    device: str = "cpu"
    scale: str = "default"           # "default" (CPU, embedded data) | "paper" (GPU, CIFAR)
    data: Path | None = None         # CIFAR folder for --scale paper
    progress: bool = True            # show nested tqdm bars inside checks
    bar_position: int = 1            # their line under the main bar (one per worker process)
    cache: dict = dataclasses.field(default_factory=dict, repr=False, compare=False)

    def rng(self, tag: str) -> np.random.Generator:
        """Generator seeded by (run seed, tag): order-independent, reproducible."""
        return np.random.default_rng([self.seed, zlib.crc32(tag.encode())])

    def pick(self, default, quick):
        """`quick` in --quick mode, else `default` (problem sizes)."""
        return quick if self.quick else default

    def bar(self, iterable: Iterable, desc: str, total: int | None = None):
        """A nested progress bar (tqdm) over `iterable`, or the iterable when disabled."""
        if not self.progress:
            return iterable
        from tqdm.auto import tqdm
        return tqdm(iterable, desc=f"  {desc}", total=total, leave=False, position=self.bar_position,
                    dynamic_ncols=True)

    def config_key(self) -> str:
        """What makes results of two runs interchangeable (used as the resume key): the
        settings, the package's source (a result computed by other code is never
        served: any edit to rmt/, nets/ or paper_checks/ recomputes) and the versions of
        the numerical libraries underneath (another torch gives other round-off, and
        thresholds found by bisection can move by a step)."""
        data = f",data={Path(self.data).resolve()}" if self.data is not None else ""
        return (f"seed={self.seed},quick={int(self.quick)},scale={self.scale}{data},"
                f"device={self.device},code={source_fingerprint()},libs={library_versions()}")


@functools.lru_cache(maxsize=1)
def library_versions() -> str:
    """'torch-X;numpy-Y;scipy-Z;sympy-W' of the installed distributions (read from their
    metadata, nothing imported)."""
    from importlib.metadata import PackageNotFoundError, version

    def one(name):
        try:
            return version(name)
        except PackageNotFoundError:
            return "absent"
    return ";".join(f"{name}-{one(name)}" for name in ("torch", "numpy", "scipy", "sympy"))


@functools.lru_cache(maxsize=1)
def source_fingerprint() -> str:
    """12 hex digits of every .py file of the rmt, nets and paper_checks packages."""
    import hashlib

    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in ("rmt", "nets", "paper_checks"):
        for f in sorted((root / pkg).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode())
            h.update(f.read_bytes())
    return h.hexdigest()[:12]


def require(*names: str) -> None:
    """Raise DependencyError (an ImportError, chained to the original exception so its
    traceback is kept) unless every 'module:attr' (or 'module') is importable and is not
    one of the team's placeholders (module docstring 'Placeholder: ...')."""
    import importlib

    for spec in names:
        mod_name, _, attr = spec.partition(":")
        try:
            mod = importlib.import_module(mod_name)
        except Exception as exc:  # ImportError or an error inside a half-written module
            raise DependencyError(f"{mod_name} not importable ({type(exc).__name__}: {exc})") from exc
        obj = mod
        if attr:
            for part in attr.split("."):
                if not hasattr(obj, part):
                    raise DependencyError(f"{mod_name}.{attr} does not exist")
                obj = getattr(obj, part)
        for m in {mod, importlib.import_module(getattr(obj, "__module__", mod_name) or mod_name)}:
            doc = (m.__doc__ or "").lstrip()
            if doc.startswith("Placeholder"):
                raise DependencyError(f"{m.__name__} is still a placeholder")

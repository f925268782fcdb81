"""The data contract of every `nets` function that takes data.

`data` may be given in three forms, and each gives the same numbers:

* an `(X, y)` pair of tensors or numpy arrays with the same first dimension N;
* a map-style torch `Dataset` whose item `i` is one sample `(x_i, y_i)`;
* a re-iterable of `(x, y)` batches, such as a `DataLoader` or a list of pairs (a
  DataLoader with `batch_size=None` yields single samples: it is read as its Dataset,
  each item passed through its `collate_fn`).

The sample order is the pair's row order, the Dataset's index order, or the iteration
order of the batches. Curvature is an average over a *fixed* set of samples, so a
DataLoader that shuffles (a `RandomSampler`, or any sampler that is not sequential) is
refused with a ValueError (curvlinops does the same), and so is a one-shot iterator (a
generator), which could not be read twice.

`as_data_source(data)` wraps any form in a `DataSource`, which

* streams `batches(chunk_size=...)` one batch at a time, moved to the device and, for
  floating tensors, cast to the requested dtype (integer tensors — class labels, token
  ids — are only moved); nothing is copied whole unless the form is already a pair;
* `take(indices)` gives the samples at `indices` as one `(X, y)` pair (random access:
  rows of the pair, items of the Dataset — stacked with the DataLoader's `collate_fn`
  when a DataLoader over a Dataset was given — and, for a plain iterable of batches,
  the concatenation of its batches, read once and kept);
* knows `N`, the number of samples.

Floating data must be finite; an empty data set is refused. Type rules: floating inputs
and targets are cast to the dtype of the products; integer inputs (token ids, pixel
bytes) are passed to the model as they are — a float network fed integer inputs gets a
TypeError from the operators saying to convert them; integer targets of any width are
cast to int64 (class indices).
"""

from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np
import torch

from nets.utils.callers import caller_stacklevel
from nets.utils.devices import as_device
from nets.utils.modes import kept_rng

__all__ = ["DataSource", "as_data_source", "is_pair"]


def is_pair(data) -> bool:
    """True for an `(X, y)` pair of tensors/arrays (y may also be a list of numbers)."""
    return (isinstance(data, (tuple, list)) and len(data) == 2
            and isinstance(data[0], (torch.Tensor, np.ndarray))
            and (isinstance(data[1], (torch.Tensor, np.ndarray)) or _number_list(data[1])))


def _number_list(t) -> bool:
    return (isinstance(t, list) and len(t) > 0
            and all(isinstance(v, (int, float, np.integer, np.floating))
                    and not isinstance(v, bool) for v in t))


def _as_tensor(t, name: str) -> torch.Tensor:
    if isinstance(t, torch.Tensor):
        return t
    if _number_list(t):                               # y given as a list of labels / values
        return torch.as_tensor(np.asarray(t))
    if isinstance(t, np.ndarray):
        if t.dtype == object or t.dtype.kind in "USV":
            raise TypeError(f"{name} must hold numbers, got a numpy array of dtype {t.dtype}")
        # (a 0-d array stays 0-d: np.ascontiguousarray would make it 1-d)
        return torch.from_numpy(np.ascontiguousarray(t) if t.ndim else np.array(t))
    if isinstance(t, (bool, int, float, np.number)):
        return torch.as_tensor(t)
    hint = ""
    if isinstance(t, (dict, tuple, list)) and name.endswith("inputs"):
        hint = ("; one input tensor per sample is the data contract: for a model that takes "
                "several inputs or a dict, wrap the model so that it takes one tensor (e.g. "
                "the inputs concatenated, split again in forward)")
    raise TypeError(f"{name} must be a torch.Tensor or numpy array, got {type(t).__name__}{hint}")


def _place(t: torch.Tensor, name: str, device, dtype) -> torch.Tensor:
    """Move to `device`; cast floating tensors to `dtype`; integer *targets* to int64
    (torch's class-index type, so int32/uint8 labels work with cross-entropy); refuse
    NaN/inf and complex."""
    if t.is_complex():
        raise TypeError(f"{name} is complex ({t.dtype}); real data are expected")
    if t.is_floating_point():
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")
        return t.to(device=device, dtype=dtype)
    if name.endswith("targets") and t.dtype not in (torch.bool, torch.int64):
        t = t.to(torch.int64)
    return t.to(device=device)


def model_place(model) -> tuple:
    """(device, dtype) of the model's first floating parameter (or buffer); (None, None) if
    it has none."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.device, t.dtype
    return None, None


def tensors_for(model, data, *, name: str = "data", device=None, dtype=None):
    """All samples of `data` as one (X, y) pair for training copies of `model`: floating
    inputs and targets cast to `dtype`, or (dtype None) to the model's own floating dtype —
    so numpy float64 data work with a float32 model and the other way round, as on the
    curvature paths."""
    target = dtype if dtype is not None else model_place(model)[1]
    device = None if device is None else as_device(device)
    return as_data_source(data, name=name).tensors(device=device, dtype=target)


def _check_sampler(loader, name: str) -> None:
    """Refuse a DataLoader that does not read its whole (map-style) dataset once, in the
    dataset's order: a shuffling or custom sampler, a sequential one over fewer samples
    than the dataset holds (the products would add up the samples read and divide by the
    dataset's length), or a batch sampler yielding other indices."""
    from torch.utils.data import BatchSampler, DataLoader, SequentialSampler
    if not isinstance(loader, DataLoader) or _is_iterable_dataset(loader.dataset):
        return
    n = len(loader.dataset) if hasattr(loader.dataset, "__len__") else None
    bs = loader.batch_sampler
    if bs is not None and not isinstance(bs, BatchSampler):
        # the user's own batch sampler: fine if its indices are 0, 1, …, n − 1 in order
        # (read with torch's global generator left as it was, as for the data)
        with kept_rng():
            order = [int(i) for b in bs for i in b]
        if order != list(range(len(order))) or (n is not None and len(order) != n):
            raise ValueError(
                f"{name} is a DataLoader whose batch_sampler ({type(bs).__name__}) does not "
                f"yield every sample of its dataset once in order (it yields {len(order)} "
                f"indices{'' if n is None else f' for {n} samples'}): the package reads every "
                "sample once in the dataset's own order; build the loader with shuffle=False "
                "and no sampler — pass a torch.utils.data.Subset for a subset")
        return
    sampler = bs.sampler if bs is not None else loader.sampler
    if not isinstance(sampler, SequentialSampler):
        raise ValueError(
            f"{name} is a DataLoader with a {type(sampler).__name__}: the package reads every "
            "sample once in the dataset's own order, so a loader with any other sampler (a "
            "shuffling one, or a custom order or subset) is refused; build it with "
            "shuffle=False and no sampler — pass a torch.utils.data.Subset for a subset (the "
            "package draws its own random batches where it needs them)")
    if n is not None and len(sampler) != n:
        raise ValueError(
            f"{name} is a DataLoader whose SequentialSampler covers {len(sampler)} of its "
            f"dataset's {n} samples: the package reads the whole dataset; pass a "
            "torch.utils.data.Subset for a subset")


def _drops_last(loader) -> bool:
    """Whether a DataLoader leaves out its last partial batch (its own drop_last, or that
    of a BatchSampler it was given as batch_sampler, where its own reads False)."""
    from torch.utils.data import BatchSampler
    return bool(loader.drop_last) or (isinstance(loader.batch_sampler, BatchSampler)
                                      and bool(loader.batch_sampler.drop_last))


def _is_iterable_dataset(ds) -> bool:
    from torch.utils.data import IterableDataset
    return isinstance(ds, IterableDataset)


def _iter_keeping_rng(data):
    """iter(data) with torch's global CPU generator left as it was: a DataLoader draws its
    base seed from it on every iter() even without shuffling, so reading the user's data
    would change the random numbers their own code draws next."""
    state = torch.random.get_rng_state()
    try:
        return iter(data)
    finally:
        torch.random.set_rng_state(state)


class _PerSample:
    """`dataset` with `convert` applied to each item (a DataLoader's per-sample collate_fn
    when its batch_size is None)."""

    def __init__(self, dataset, convert):
        self.dataset, self.convert = dataset, convert

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.convert(self.dataset[i])


class DataSource:
    """One view of the three data forms (module docstring). Build with `as_data_source`."""

    def __init__(self, data, *, name: str = "data"):
        from torch.utils.data import DataLoader, Dataset
        self.name = name
        self._pair = None
        self._dataset = None
        self._iterable = None
        self._collate = None
        self._cached_pair = None
        if is_pair(data):
            X, Y = _as_tensor(data[0], f"{name} inputs"), _as_tensor(data[1], f"{name} targets")
            if X.ndim == 0 or Y.ndim == 0 or X.shape[0] != Y.shape[0]:
                raise ValueError(f"{name}: inputs and targets must have the same first dimension, "
                                 f"got {tuple(X.shape)} and {tuple(Y.shape)}")
            self._pair, self.N, self.form = (X, Y), int(X.shape[0]), "pair"
        elif isinstance(data, Dataset) and not _is_iterable_dataset(data) and hasattr(data, "__len__"):
            self._dataset, self.N, self.form = data, len(data), "dataset"
        elif (isinstance(data, DataLoader) and data.batch_size is None and data.batch_sampler is None
              and not _is_iterable_dataset(data.dataset) and hasattr(data.dataset, "__len__")):
            # batch_size=None: the loader yields single samples collate_fn(dataset[i]), in
            # its sampler's order (checked sequential): the Dataset form of those samples
            _check_sampler(data, name)
            self._dataset = _PerSample(data.dataset, data.collate_fn)
            self.N, self.form = len(data.dataset), "dataset"
        elif isinstance(data, (str, bytes, dict)) or torch.is_tensor(data) or isinstance(data, np.ndarray):
            raise TypeError(f"{name} must be an (X, y) pair, a torch Dataset of (x, y) samples or a "
                            f"re-iterable of (x, y) batches, got {type(data).__name__}")
        else:
            try:
                it = _iter_keeping_rng(data)
            except TypeError:
                raise TypeError(f"{name} must be an (X, y) pair, a torch Dataset of (x, y) samples or "
                                f"a re-iterable of (x, y) batches, got {type(data).__name__}") from None
            if it is data:
                raise TypeError(f"{name} is a one-shot iterator ({type(data).__name__}); pass a "
                                "re-iterable such as a list of (x, y) batches or a DataLoader")
            _check_sampler(data, name)
            self._iterable, self.form = data, "batches"
            if (isinstance(data, DataLoader) and not _is_iterable_dataset(data.dataset)
                    and not _drops_last(data) and hasattr(data.dataset, "__len__")):
                self._dataset, self._collate = data.dataset, data.collate_fn
                self.N = len(data.dataset)
            else:
                self.N = sum(int(self._check_item(item, j)[0].shape[0])
                             for j, item in self._items())
                if self.N and next(self._items(), None) is None:
                    # __iter__ handing back one stored generator: the count used it up
                    raise TypeError(f"{name} is a one-shot iterator ({type(data).__name__}'s "
                                    "__iter__ returns batches once, then none); pass a "
                                    "re-iterable such as a list of (x, y) batches or a "
                                    "DataLoader")
                full = len(data.dataset) if (isinstance(data, DataLoader) and _drops_last(data)
                                             and hasattr(data.dataset, "__len__")) else None
                if full is not None and self.N < full:
                    warnings.warn(f"{name}: the DataLoader has drop_last=True, so {full - self.N} "
                                  f"of its dataset's {full} samples are left out (N = {self.N}); "
                                  "build it with drop_last=False to use them all", UserWarning,
                                  stacklevel=caller_stacklevel())
        if self.N == 0:
            raise ValueError(f"{name} is empty")
        if self._dataset is not None or isinstance(self._iterable, DataLoader):
            self._check_fixed()

    def _check_fixed(self) -> None:
        """Refuse data whose samples change from one read to the next — random
        augmentation in a Dataset's `__getitem__` or in a DataLoader's `collate_fn` (a
        MixUp-style recipe): curvature is an average over fixed samples, and every pass
        over such data would see other ones. Torch's global generator is left as it was."""
        def differs(read) -> bool:          # two reads; NaN equal to NaN (refused elsewhere)
            a, b = read(), read()
            return not all(u.shape == v.shape and u.dtype == v.dtype
                           and (bool(torch.isclose(u, v, rtol=0.0, atol=0.0, equal_nan=True).all())
                                if u.is_floating_point() else torch.equal(u, v))
                           for u, v in zip(a, b))

        fixed = ("; curvature is an average over fixed samples, so pass the data without "
                 "random transforms")
        with kept_rng():
            if self._dataset is None:         # a loader read as batches (drop_last)
                if differs(lambda: self._check_item(next(_iter_keeping_rng(self._iterable)), 0)):
                    raise ValueError(f"{self.name}: the DataLoader's first batch differs between "
                                     "two reads (random augmentation in its dataset or "
                                     "collate_fn?)" + fixed)
                return
            for i in sorted({0, self.N - 1}):
                if differs(lambda: self._check_item(self._dataset[i], i, sample=True)):
                    raise ValueError(f"{self.name}: item {i} of the dataset differs between two "
                                     "reads (random augmentation in __getitem__?)" + fixed)
            idx = np.arange(min(self.N, 4))
            if self._collate is not None and differs(lambda: self._stack_samples(idx)):
                raise ValueError(f"{self.name}: the DataLoader's collate_fn gives other batches "
                                 "on two reads of the same samples (random augmentation in "
                                 "collate_fn?)" + fixed)

    # -- pieces ---------------------------------------------------------------------
    def _items(self):
        """(j, batch) over the iterable, the global generator untouched (`_iter_keeping_rng`)."""
        return enumerate(_iter_keeping_rng(self._iterable))

    def _read(self):
        """The iterable's checked (x, y) batches, and a ValueError at the end where this
        read held another number of samples than the first (data that is not the same on
        every read: a stream running dry, samples added or dropped)."""
        n = 0
        for j, item in self._items():
            x, y = self._check_item(item, j)
            n += int(x.shape[0])
            yield x, y
        if n != self.N:
            raise ValueError(f"{self.name} held {n} samples on this read and {self.N} on the "
                             "first: curvature needs data that gives the same samples on every "
                             "read (a list of (x, y) batches or a non-shuffling DataLoader)")

    def _check_item(self, item, j, *, sample=False):
        what = f"{self.name}[{j}]"
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            kind = "sample" if sample else "batch"
            got = (f"a {type(item).__name__} of {len(item)} items"
                   if isinstance(item, (tuple, list)) else type(item).__name__)
            hint = ""
            if isinstance(item, dict):
                hint = (f" (keys {sorted(map(str, item))}); wrap the dataset so that it returns "
                        "(x, y) — and if these are several inputs of one model (an (inputs, y) "
                        "pair whose inputs are a dict is read as a list of batches), wrap the "
                        "model so that it takes one tensor x per sample")
            elif not sample and torch.is_tensor(item):
                hint = ("; the data were read as a re-iterable of (x, y) batches because they "
                        "are not an (X, y) pair of exactly two tensors/arrays")
            elif isinstance(item, (tuple, list)):
                hint = ("; extra items (or several model inputs) are not part of the data "
                        "contract: one input tensor x and one target y per " + kind)
            raise TypeError(f"{what} must be an (x, y) {kind}, got {got}{hint}")
        x, y = _as_tensor(item[0], f"{what} inputs"), _as_tensor(item[1], f"{what} targets")
        if not sample and (x.ndim == 0 or y.ndim == 0 or x.shape[0] != y.shape[0]):
            raise ValueError(f"{what}: inputs and targets must have the same first dimension, "
                             f"got {tuple(x.shape)} and {tuple(y.shape)} (a "
                             f"{type(self._iterable).__name__} is read as (x, y) batches; for "
                             "per-sample pairs use a torch Dataset, or stack them into an (X, y) "
                             "pair)")
        return x, y

    def _stack_samples(self, idx) -> tuple[torch.Tensor, torch.Tensor]:
        items = [self._dataset[int(i)] for i in idx]
        if self._collate is not None:
            return self._check_item(self._collate(items), f"{int(idx[0])}:")
        xs, ys = zip(*(self._check_item(it, int(i), sample=True) for it, i in zip(items, idx)))
        return torch.stack(xs), torch.stack(ys)

    def _all_pair(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole data as one pair, on its own device/dtype (read once, then kept for
        plain iterables; pairs are returned as they are)."""
        if self._pair is not None:
            return self._pair
        if self._cached_pair is None:
            if self._dataset is not None:
                self._cached_pair = self._stack_samples(np.arange(self.N))
            else:
                xs, ys = zip(*self._read())
                self._cached_pair = (torch.cat(xs), torch.cat(ys))
        return self._cached_pair

    # -- public ---------------------------------------------------------------------
    def batches(self, chunk_size: int | None = None, *, device=None, dtype=None
                ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The data, in order, as (x, y) batches placed on `device` (floating data cast
        to `dtype`). chunk_size: at most this many samples per batch (None: a pair is one
        batch, a Dataset is read in chunks of 1024, an iterable keeps its own batches)."""
        if self._pair is not None:
            X, Y = self._pair
            step = self.N if chunk_size is None else chunk_size
            for i in range(0, self.N, step):
                yield (_place(X[i:i + step], f"{self.name} inputs", device, dtype),
                       _place(Y[i:i + step], f"{self.name} targets", device, dtype))
            return
        if self.form == "dataset":
            step = 1024 if chunk_size is None else chunk_size
            for i in range(0, self.N, step):
                x, y = self._stack_samples(np.arange(i, min(i + step, self.N)))
                yield (_place(x, f"{self.name} inputs", device, dtype),
                       _place(y, f"{self.name} targets", device, dtype))
            return
        for j, (x, y) in enumerate(self._read()):
            if x.shape[0] == 0:
                continue
            step = x.shape[0] if chunk_size is None else chunk_size
            for i in range(0, x.shape[0], step):
                yield (_place(x[i:i + step], f"{self.name}[{j}] inputs", device, dtype),
                       _place(y[i:i + step], f"{self.name}[{j}] targets", device, dtype))

    def take(self, indices, *, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Samples `indices` (positions in the sample order) as one (X, y) pair."""
        idx = check_indices(indices, self.N)
        if self._dataset is not None and self._pair is None and self._cached_pair is None:
            X, Y = self._stack_samples(idx)
        else:
            X, Y = self._all_pair()
            t = torch.as_tensor(idx, device=X.device)
            X, Y = X.index_select(0, t), Y.index_select(0, t.to(Y.device))
        return (_place(X, f"{self.name} inputs", device, dtype),
                _place(Y, f"{self.name} targets", device, dtype))

    def tensors(self, *, device=None, dtype=None) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples as one (X, y) pair (materialised for Datasets and iterables)."""
        X, Y = self._all_pair()
        return (_place(X, f"{self.name} inputs", device, dtype),
                _place(Y, f"{self.name} targets", device, dtype))

    def first_sample_numel(self) -> int:
        """Numbers in one input sample (for memory estimates)."""
        if self._pair is not None:
            return int(self._pair[0][0].numel())
        if self._dataset is not None:
            x, _ = self._check_item(self._dataset[0], 0, sample=True)
            return int(x.numel())
        for j, item in self._items():
            x, _ = self._check_item(item, j)
            if x.shape[0]:
                return int(x[0].numel())
        return 0

    def __repr__(self) -> str:
        return f"DataSource(form={self.form!r}, N={self.N})"


def check_indices(indices, N: int, *, name: str = "indices") -> np.ndarray:
    """A non-empty 1-d integer array of positions in [0, N)."""
    idx = np.asarray(indices)
    if idx.ndim != 1 or idx.size == 0:
        raise ValueError(f"{name} must be a non-empty 1-d array of sample indices")
    if idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"{name} must be integers, got dtype {idx.dtype}")
    if idx.min() < 0 or idx.max() >= N:
        raise ValueError(f"{name} must lie in [0, {N}), got range [{idx.min()}, {idx.max()}]")
    return idx.astype(np.int64)


def as_data_source(data, *, name: str = "data") -> DataSource:
    """`data` in any of the three forms (module docstring) as a `DataSource`."""
    if isinstance(data, DataSource):
        return data
    return DataSource(data, name=name)

"""Test helper: tiny CIFAR datasets written in exactly the real on-disk format.

Imported by the tests as `from cifar_files import write_fake_cifar` (pytest puts the
`tests/` folder on `sys.path`). The file layout and pickle format are spelled out here,
independently of the loader in `nets.training.data`, so the loader is tested against the
format of the original files and not against itself.
"""

from __future__ import annotations

import io
import os
import pickle
import struct
from pathlib import Path

import numpy as np

__all__ = ["CIFAR_LAYOUT", "write_fake_cifar"]

#: name -> (data folder, train files, test files), as in the official archives.
CIFAR_LAYOUT = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"]),
    "cifar100": ("cifar-100-python", ["train"], ["test"]),
}


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _Py2StylePickler(pickle._Pickler):
    """Protocol-2 pickler that writes what Python 2's cPickle wrote for CIFAR.

    Byte strings and text strings become BINSTRING opcodes (Python 2 `str`), and the
    array reconstructor is named `numpy.core.multiarray._reconstruct` as in the
    original files, whatever numpy writes today.
    """

    def save_bytes(self, obj):
        n = len(obj)
        if n < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj)
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    def save_str(self, obj):
        self.save_bytes(obj.encode("latin-1"))

    def save_global(self, obj, name=None):
        if obj is _numpy_reconstruct():
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)

    dispatch = dict(pickle._Pickler.dispatch)
    dispatch[bytes] = save_bytes
    dispatch[str] = save_str


def _dump(obj, path: Path):
    buf = io.BytesIO()
    _Py2StylePickler(buf, protocol=2).dump(obj)
    path.write_bytes(buf.getvalue())


def write_fake_cifar(root, name: str = "cifar100", n_train: int = 20, n_test: int = 10,
                     seed: int = 0) -> Path:
    """Write a tiny random CIFAR dataset in the exact on-disk format of the real one.

    Creates `root/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}` or
    `root/cifar-100-python/{train, test, meta}`: protocol-2 pickles of dicts with
    byte-string keys (b'batch_label', b'labels' or b'fine_labels'/b'coarse_labels',
    b'data' as a uint8 ndarray (N, 3072), b'filenames'). For CIFAR-10 the `n_train`
    images are split over the five batches (n_train must be ≥ 5). Random uint8 pixels
    and labels from `numpy.random.default_rng(seed)`. Returns the data folder.
    """
    name = name.lower()
    if name not in CIFAR_LAYOUT:
        raise ValueError(f"name must be one of {sorted(CIFAR_LAYOUT)}, got {name!r}")
    if n_train < (5 if name == "cifar10" else 1) or n_test < 1:
        raise ValueError(f"too few images for {name}: n_train={n_train}, n_test={n_test}")
    rng = np.random.default_rng(seed)
    folder, train_files, test_files = CIFAR_LAYOUT[name]
    out = Path(os.fspath(root)) / folder
    out.mkdir(parents=True, exist_ok=True)

    def batch(n, label):
        data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
        files = [f"fake_{label}_{i}.png".encode() for i in range(n)]
        if name == "cifar10":
            return {b"batch_label": label.encode(), b"labels": rng.integers(0, 10, n).tolist(),
                    b"data": data, b"filenames": files}
        fine = rng.integers(0, 100, n)
        return {b"filenames": files, b"batch_label": label.encode(),
                b"fine_labels": fine.tolist(), b"coarse_labels": (fine // 5).tolist(),
                b"data": data}

    if name == "cifar10":
        sizes = [n_train // 5 + (i < n_train % 5) for i in range(5)]
        for i, (fname, n) in enumerate(zip(train_files, sizes)):
            _dump(batch(n, f"training batch {i + 1} of 5"), out / fname)
        _dump(batch(n_test, "testing batch 1 of 1"), out / test_files[0])
        _dump({b"num_cases_per_batch": 10000, b"label_names": [b"c%d" % i for i in range(10)],
               b"num_vis": 3072}, out / "batches.meta")
    else:
        _dump(batch(n_train, "training batch 1 of 1"), out / train_files[0])
        _dump(batch(n_test, "testing batch 1 of 1"), out / test_files[0])
        _dump({b"fine_label_names": [b"f%d" % i for i in range(100)],
               b"coarse_label_names": [b"c%d" % i for i in range(20)]}, out / "meta")
    return out

"""Datasets for the empirical module: embedded digits, synthetic problems, CIFAR.

A dataset is a pair of tensors `(X, y)` with `len(X) == len(y)`. Classification
targets are int64 class indices; regression targets are float tensors of shape (n, 1).

* `load_digits` – scikit-learn's bundled 8×8 digits (1797 × 64, 10 classes), no download.
* `gaussian_mixture`, `teacher_student_regression`, `spiked_covariance_regression` –
  synthetic problems with a known ground truth (docs/theory.md §4 for the Wishart case).
* `load_cifar` – CIFAR-10/100 from the standard python-pickle files in a local folder,
  read through a restricted unpickler that can build nothing but dicts, lists,
  strings, numbers and numpy uint8 arrays (no arbitrary code runs on load).
* `check_dataset` – the shared validation of `(X, y)` pairs.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from nets.utils.seeding import torch_generator
from rmt.validation import as_bool, as_float, as_int

__all__ = [
    "check_dataset",
    "load_digits",
    "gaussian_mixture",
    "teacher_student_regression",
    "spiked_covariance_regression",
    "load_cifar",
    "CIFAR_MEAN",
    "CIFAR_STD",
    "RefusedPickleError",
]


# ----------------------------------------------------------------------------- checks
def check_dataset(X, y, *, name: str = "dataset"):
    """Validate a dataset `(X, y)` and return it unchanged.

    Raises `TypeError` if either part is not a `torch.Tensor`; `ValueError` if the data
    are empty, if `X` has no sample axis, if the lengths differ, or if `X` (or floating
    `y`) contains NaN or inf. Messages name `name` (default "dataset").
    """
    if not isinstance(X, torch.Tensor):
        raise TypeError(f"{name}: X must be a torch.Tensor, got {type(X).__name__}")
    if not isinstance(y, torch.Tensor):
        raise TypeError(f"{name}: y must be a torch.Tensor, got {type(y).__name__}")
    if X.ndim == 0:
        raise ValueError(f"{name}: X must have a sample axis, got a 0-d tensor")
    if X.shape[0] == 0 or X.numel() == 0:
        raise ValueError(f"{name}: X is empty (shape {tuple(X.shape)})")
    if y.ndim == 0:
        raise ValueError(f"{name}: y must have a sample axis, got a 0-d tensor")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"{name}: X has {X.shape[0]} samples but y has {y.shape[0]}")
    if X.is_floating_point() or X.is_complex():
        if not bool(torch.isfinite(X).all()):
            raise ValueError(f"{name}: X contains NaN or inf")
    if y.is_floating_point() or y.is_complex():
        if not bool(torch.isfinite(y).all()):
            raise ValueError(f"{name}: y contains NaN or inf")
    return X, y


def _check_dtype(dtype):
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    return dtype


# ----------------------------------------------------------------------------- digits
def load_digits(standardize: bool = True, dtype: torch.dtype = torch.float32, device=None,
                *, as_images: bool = False):
    """scikit-learn's bundled handwritten digits: X (1797, 64), y (1797,) int64 in 0..9.

    Pixels are integers 0..16. Scaling:

    * `standardize=True` (default): each of the 64 features is shifted to zero mean and
      scaled to unit variance over the 1797 samples (population std, ddof = 0); the
      features that are constant (some border pixels are always 0) have std 0 and are
      left at 0 after centring.
    * `standardize=False`: pixels / 16, in [0, 1].

    `as_images=True` returns X with shape (1797, 1, 8, 8) (rows of the image in order),
    for convolutional models. No download: the data ship with scikit-learn.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    standardize = as_bool("standardize", standardize)
    as_images = as_bool("as_images", as_images)
    dtype = _check_dtype(dtype)
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ValueError(f"device must name a torch device (e.g. 'cpu', 'cuda'), got "
                             f"{device!r}: {exc}") from None
    raw = _sk_load_digits()
    data = np.asarray(raw.data, dtype=np.float64)
    target = np.asarray(raw.target, dtype=np.int64)
    if standardize:
        mean = data.mean(axis=0)
        std = data.std(axis=0)
        std[std == 0] = 1.0
        data = (data - mean) / std
    else:
        data = data / 16.0
    X = torch.as_tensor(data, dtype=dtype)
    if as_images:
        X = X.reshape(-1, 1, 8, 8)
    y = torch.as_tensor(target, dtype=torch.int64)
    if device is not None:
        X, y = X.to(device), y.to(device)
    return X, y


# -------------------------------------------------------------------------- synthetic
def gaussian_mixture(n: int, dim: int, n_classes: int = 2, separation: float = 3.0,
                     seed: int = 0, *, dtype: torch.dtype = torch.float32):
    """Isotropic Gaussian mixture: x = m_y + z, z ~ N(0, I_dim), y uniform on classes.

    The class means are m_k = separation · u_k with u_k i.i.d. uniform on the unit
    sphere of R^dim (so `separation` is the distance of each mean from the origin).
    Labels are balanced: class k holds ⌊n/K⌋ or ⌈n/K⌉ samples, in random order.
    Returns X (n, dim) of `dtype` and y (n,) int64.
    """
    n = as_int("n", n, minimum=1)
    dim = as_int("dim", dim, minimum=1)
    n_classes = as_int("n_classes", n_classes, minimum=2)
    separation = as_float("separation", separation, nonnegative=True)
    dtype = _check_dtype(dtype)
    g = torch_generator(seed)
    u = torch.randn(n_classes, dim, generator=g, dtype=torch.float64)
    means = separation * u / u.norm(dim=1, keepdim=True)
    y = torch.arange(n, dtype=torch.int64) % n_classes
    y = y[torch.randperm(n, generator=g)]
    X = means[y] + torch.randn(n, dim, generator=g, dtype=torch.float64)
    return X.to(dtype), y


def teacher_student_regression(n: int, dim: int, hidden: int = 16, noise: float = 0.1,
                               seed: int = 0, *, dtype: torch.dtype = torch.float32,
                               return_teacher: bool = False):
    """Regression on the outputs of a random one-hidden-layer tanh teacher.

    x ~ N(0, I_dim);  y = w2ᵀ tanh(W1 x) + noise · ξ,  ξ ~ N(0, 1), with
    W1 (hidden × dim) entries N(0, 1/dim) and w2 (hidden) entries N(0, 1/hidden), so
    the clean target has variance O(1). Returns X (n, dim), y (n, 1) float; with
    `return_teacher=True` also a dict {"W1": ndarray, "w2": ndarray}.
    """
    n = as_int("n", n, minimum=1)
    dim = as_int("dim", dim, minimum=1)
    hidden = as_int("hidden", hidden, minimum=1)
    noise = as_float("noise", noise, nonnegative=True)
    dtype = _check_dtype(dtype)
    g = torch_generator(seed)
    W1 = torch.randn(hidden, dim, generator=g, dtype=torch.float64) / dim ** 0.5
    w2 = torch.randn(hidden, generator=g, dtype=torch.float64) / hidden ** 0.5
    X = torch.randn(n, dim, generator=g, dtype=torch.float64)
    y = torch.tanh(X @ W1.T) @ w2 + noise * torch.randn(n, generator=g, dtype=torch.float64)
    out = (X.to(dtype), y.reshape(n, 1).to(dtype))
    if return_teacher:
        return out + ({"W1": W1.numpy(), "w2": w2.numpy()},)
    return out


def spiked_covariance_regression(n: int, dim: int, spikes=(5.0,), noise: float = 0.1,
                                 seed: int = 0, *, dtype: torch.dtype = torch.float32,
                                 return_params: bool = False):
    """Linear regression with spiked-covariance inputs (docs/theory.md §4).

    x ~ N(0, Σ),  Σ = I + Σ_i s_i u_i u_iᵀ  with orthonormal random u_i (Haar);
    y = w*ᵀ x + noise · ξ,  w* entries N(0, 1/dim),  ξ ~ N(0, 1).
    For the least-squares loss ½·mean (wᵀx − y)² of a linear model the Hessian is
    exactly XᵀX/n, a Wishart matrix with population covariance Σ (ratio dim/n);
    torch's `mse_loss` (no ½) gives 2XᵀX/n. The seed may also be a torch.Generator. Each spike must be
    > −1 so that Σ is positive definite. Sampled as x = Σ^{1/2} z with
    Σ^{1/2} = I + Σ_i (√(1+s_i) − 1) u_i u_iᵀ (no dim × dim matrix is formed).
    Returns X (n, dim), y (n, 1); with `return_params=True` also
    {"directions": (dim, k) ndarray, "spikes": ndarray, "weights": ndarray}.
    """
    n = as_int("n", n, minimum=1)
    dim = as_int("dim", dim, minimum=1)
    noise = as_float("noise", noise, nonnegative=True)
    dtype = _check_dtype(dtype)
    try:
        s = np.atleast_1d(np.asarray(spikes, dtype=np.float64))
    except (TypeError, ValueError):
        raise TypeError(f"spikes must be a sequence of numbers, got {spikes!r}") from None
    if s.ndim != 1:
        raise ValueError(f"spikes must be one-dimensional, got shape {s.shape}")
    if not np.all(np.isfinite(s)):
        raise ValueError("spikes contains NaN or inf")
    if np.any(s <= -1):
        raise ValueError(f"spikes must all be > -1 (Σ positive definite), got {s.tolist()}")
    if s.size > dim:
        raise ValueError(f"spikes has {s.size} entries but dim is {dim}")
    g = torch_generator(seed)
    k = s.size
    if k:
        A = torch.randn(dim, k, generator=g, dtype=torch.float64)
        Q, R = torch.linalg.qr(A)
        U = Q * torch.sign(torch.diagonal(R))  # Haar-distributed orthonormal columns
    else:
        U = torch.zeros(dim, 0, dtype=torch.float64)
    w = torch.randn(dim, generator=g, dtype=torch.float64) / dim ** 0.5
    Z = torch.randn(n, dim, generator=g, dtype=torch.float64)
    scale = torch.as_tensor(np.sqrt(1.0 + s) - 1.0, dtype=torch.float64)
    X = Z + ((Z @ U) * scale) @ U.T
    y = X @ w + noise * torch.randn(n, generator=g, dtype=torch.float64)
    out = (X.to(dtype), y.reshape(n, 1).to(dtype))
    if return_params:
        return out + ({"directions": U.numpy(), "spikes": s.copy(), "weights": w.numpy()},)
    return out


# ------------------------------------------------------------------------------ CIFAR
#: Per-channel mean / std of the training images scaled to [0, 1] (R, G, B), the
#: constants used by the usual CIFAR training code; `load_cifar` normalises with them
#: for both splits, so train and test go through the same affine map.
CIFAR_MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
CIFAR_STD = {"cifar10": (0.2470, 0.2435, 0.2616), "cifar100": (0.2673, 0.2564, 0.2762)}

_CIFAR_LAYOUT = {
    # name: (folder, train files, test files, label key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                ["test_batch"], b"labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], b"fine_labels"),
}


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _plain_dtype(dtype) -> bool:
    """A numeric dtype without fields or sub-arrays (bool, integers, floats): raw bytes
    read as such are numbers, never object pointers."""
    return (isinstance(dtype, np.dtype) and dtype.kind in "biuf" and dtype.fields is None
            and dtype.subdtype is None and not dtype.hasobject)


def _array_from_buffer(buf, dtype, shape, order):
    """An ndarray from a pickled buffer — what numpy ≥ 2 names as
    `numpy._core.numeric._frombuffer` in pickles of protocol 5 — rebuilt here with
    `np.frombuffer` (a copy that owns its memory) instead of importing numpy's private
    function: it reads bytes, never code, and only as a plain numeric dtype."""
    if not _plain_dtype(dtype) or not isinstance(buf, (bytes, bytearray)):
        raise RefusedPickleError("an array of a non-numeric dtype is not part of the CIFAR format")
    return np.frombuffer(buf, dtype=dtype).reshape(shape, order=order).copy()


class RefusedPickleError(pickle.UnpicklingError):
    """A CIFAR file names a global outside the format's minimal set (possibly hostile)."""


class _CifarUnpickler(pickle._Unpickler):
    """Unpickler for the CIFAR python files that can construct nothing dangerous.

    The real files (cPickle protocol 2, written by Python 2 with numpy 1.x) hold a dict
    with byte-string keys, lists of ints / byte strings and one uint8 ndarray. Dicts,
    lists, strings and ints come from pickle opcodes alone; the only globals the
    stream names are the three needed to rebuild the array:
    `numpy.core.multiarray._reconstruct` (spelled `numpy._core.multiarray` by
    numpy ≥ 2), `numpy.ndarray` and `numpy.dtype`. Every other global is refused with
    `RefusedPickleError` (a `pickle.UnpicklingError`) before it is imported, so no code
    outside that set runs, and the states those objects are given (pickle's BUILD) are
    checked before they are applied: a dtype state must describe a plain number (no
    fields, sub-arrays or objects: a hidden object field would let raw bytes be read as
    pointers and crash the interpreter) and an array state must hold such a dtype and its
    bytes. (The pure-Python unpickler is used, whose BUILD can be intercepted; the
    files' few hundred thousand small objects take well under a second.)
    (Files re-saved by Python 3 at protocol 2 name
    `_codecs.encode` for byte strings; they are refused too — re-save at protocol ≥ 3.
    Arrays pickled at protocol 5 by numpy ≥ 2 name `numpy._core.numeric._frombuffer`,
    which is rebuilt by `_array_from_buffer` without importing it.)
    """

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy.core.numeric", "_frombuffer"),
    }

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise RefusedPickleError(
                f"refusing to load global {module}.{name}: not part of the CIFAR format")
        if name == "_reconstruct":
            return _numpy_reconstruct()
        if name == "_frombuffer":
            return _array_from_buffer
        return getattr(np, name)

    def persistent_load(self, pid):
        raise RefusedPickleError("persistent ids are not part of the CIFAR format")

    def load_build(self):
        state, inst = self.stack[-1], self.stack[-2]
        if isinstance(inst, np.dtype):
            # (version, byte order, sub-array, names, fields, itemsize, alignment, flags)
            ok = (isinstance(state, tuple) and len(state) >= 5 and state[2] is None
                  and state[3] is None and state[4] is None)
        elif isinstance(inst, np.ndarray):
            # (version, shape, dtype, Fortran order, raw bytes)
            ok = (isinstance(state, tuple) and len(state) == 5 and _plain_dtype(state[2])
                  and isinstance(state[4], (bytes, bytearray)))
        else:
            ok = False
        if not ok:
            what = "dtype" if isinstance(inst, np.dtype) else type(inst).__name__
            raise RefusedPickleError(f"refusing to set the state of a {what}: "
                                     "only plain numeric dtypes and arrays are part of the "
                                     "CIFAR format")
        super().load_build()

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.BUILD[0]] = load_build


def _restricted_load(path: Path):
    with open(path, "rb") as fh:
        return _CifarUnpickler(fh, encoding="bytes").load()


def _key(d: dict, key: bytes):
    """Look up a byte-string key, also accepting the str spelling (re-saved files)."""
    if key in d:
        return d[key]
    skey = key.decode("ascii")
    if skey in d:
        return d[skey]
    raise KeyError(key)


def _cifar_dir(root, name: str) -> Path:
    folder = _CIFAR_LAYOUT[name][0]
    root = Path(os.fspath(root)).expanduser()
    if not root.exists():
        raise FileNotFoundError(f"CIFAR root {str(root)!r} does not exist")
    if (root / folder).is_dir():
        return root / folder
    if root.name == folder or any((root / f).exists() for f in _CIFAR_LAYOUT[name][1]):
        return root
    raise FileNotFoundError(
        f"no {name} data under root {str(root)!r}: expected the folder {folder!r} "
        f"(or root pointing at it)")


def load_cifar(root, name: str = "cifar100", train: bool = True, *,
               normalize: bool = True, dtype: torch.dtype = torch.float32):
    """Load CIFAR-10 or CIFAR-100 from the python-pickle files in a local folder.

    `root` is the folder that contains `cifar-10-batches-py/` (files `data_batch_1` …
    `data_batch_5`, `test_batch`) or `cifar-100-python/` (files `train`, `test`), or
    that folder itself. Nothing is downloaded.

    Returns X (N, 3, 32, 32) and y (N,) int64 — `labels` for CIFAR-10, `fine_labels`
    (100 classes) for CIFAR-100. Pixels are scaled to [0, 1] and then, if `normalize`
    (default), each channel c is mapped to (x − mean_c)/std_c with the published
    training-set constants `CIFAR_MEAN[name]`, `CIFAR_STD[name]` (same map for both
    splits, so the training set is only approximately standardised).

    The files are unpickled with a restricted unpickler (see `_CifarUnpickler`): a
    file naming any global outside the format raises `RefusedPickleError` (a subclass
    of `pickle.UnpicklingError`) without importing or running it.
    Errors: `FileNotFoundError` naming the path if `root` or a file is missing;
    `ValueError` naming `name` for an unknown name; `ValueError` for content that is
    not a well-formed CIFAR batch.
    """
    if not isinstance(root, (str, os.PathLike)):
        raise TypeError(f"root must be a folder path (str or os.PathLike), got {type(root).__name__}")
    if not isinstance(name, str) or name.lower() not in _CIFAR_LAYOUT:
        raise ValueError(f"name must be one of {sorted(_CIFAR_LAYOUT)}, got {name!r}")
    name = name.lower()
    train = as_bool("train", train)
    normalize = as_bool("normalize", normalize)
    dtype = _check_dtype(dtype)
    directory = _cifar_dir(root, name)
    _, train_files, test_files, label_key = _CIFAR_LAYOUT[name]
    xs, ys = [], []
    for fname in (train_files if train else test_files):
        path = directory / fname
        if not path.is_file():
            raise FileNotFoundError(f"CIFAR file {str(path)!r} does not exist")
        try:
            batch = _restricted_load(path)
        except RefusedPickleError:
            raise
        except Exception as exc:  # truncated / not a pickle at all / bad array state
            raise ValueError(f"{path}: not a readable CIFAR pickle ({exc})") from None
        data, labels = _parse_batch(batch, label_key, path, n_classes=10 if name == "cifar10" else 100)
        xs.append(data)
        ys.append(labels)
    data = np.concatenate(xs)
    labels = np.concatenate(ys)
    X = torch.from_numpy(data).reshape(-1, 3, 32, 32).to(dtype) / 255.0
    if normalize:
        mean = torch.tensor(CIFAR_MEAN[name], dtype=dtype).reshape(1, 3, 1, 1)
        std = torch.tensor(CIFAR_STD[name], dtype=dtype).reshape(1, 3, 1, 1)
        X = (X - mean) / std
    return X, torch.from_numpy(labels)


def _parse_batch(batch, label_key: bytes, path: Path, n_classes: int):
    if not isinstance(batch, dict):
        raise ValueError(f"{path}: expected a dict, got {type(batch).__name__}")
    try:
        data = _key(batch, b"data")
        labels = _key(batch, label_key)
    except KeyError as exc:
        raise ValueError(f"{path}: missing key {exc.args[0]!r}") from None
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        desc = (f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray)
                else type(data).__name__)
        raise ValueError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {desc}")
    try:
        labels = np.asarray(labels)
    except Exception:  # pragma: no cover - ragged content
        raise ValueError(f"{path}: labels are not a flat list of integers") from None
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise ValueError(f"{path}: labels must be a flat list of integers")
    labels = labels.astype(np.int64)
    if labels.shape[0] != data.shape[0]:
        raise ValueError(f"{path}: {data.shape[0]} images but {labels.shape[0]} labels")
    if labels.size and (labels.min() < 0 or labels.max() >= n_classes):
        raise ValueError(f"{path}: labels outside 0..{n_classes - 1}")
    return data, labels

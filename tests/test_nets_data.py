"""Tests for nets.training.data: digits scaling, synthetic ground truths, CIFAR reading with a
restricted unpickler (including a malicious file), dataset validation."""

import math
import os
import pickle

import numpy as np
import pytest
import torch
from cifar_files import write_fake_cifar

from nets.training.data import (
    CIFAR_MEAN,
    CIFAR_STD,
    check_dataset,
    gaussian_mixture,
    load_cifar,
    load_digits,
    spiked_covariance_regression,
    teacher_student_regression,
)


# ------------------------------------------------------------------------------ digits
def _raw_digits():
    from sklearn.datasets import load_digits as sk

    d = sk()
    return np.asarray(d.data, dtype=np.float64), np.asarray(d.target)


def test_digits_shapes_labels_and_raw_scaling():
    raw, target = _raw_digits()
    X, y = load_digits(standardize=False, dtype=torch.float64)
    assert X.shape == (1797, 64) and X.dtype == torch.float64
    assert y.dtype == torch.int64 and y.shape == (1797,)
    assert sorted(torch.unique(y).tolist()) == list(range(10))
    np.testing.assert_array_equal(y.numpy(), target)
    np.testing.assert_allclose(X.numpy(), raw / 16.0, rtol=0, atol=0)
    assert float(X.min()) == 0.0 and float(X.max()) == 1.0


def test_digits_standardized_per_feature():
    raw, _ = _raw_digits()
    X, _ = load_digits(dtype=torch.float64)
    mean = X.mean(0)
    std = X.std(0, unbiased=False)
    constant = raw.std(0) == 0
    assert constant.sum() >= 1  # digits do have always-zero border pixels
    assert float(mean.abs().max()) < 1e-12
    np.testing.assert_allclose(std.numpy()[~constant], 1.0, atol=1e-12)
    np.testing.assert_array_equal(X.numpy()[:, constant], 0.0)
    # Oracle: the affine map computed independently from sklearn's raw data.
    mu, sd = raw.mean(0), raw.std(0)
    sd[sd == 0] = 1
    np.testing.assert_allclose(X.numpy(), (raw - mu) / sd, atol=1e-12)


def test_digits_as_images_and_dtype():
    X, _ = load_digits()
    Xi, _ = load_digits(as_images=True)
    assert X.dtype == torch.float32
    assert Xi.shape == (1797, 1, 8, 8)
    assert torch.equal(Xi.reshape(1797, 64), X)
    with pytest.raises(TypeError, match="dtype"):
        load_digits(dtype=torch.int64)


# --------------------------------------------------------------------------- synthetic
def test_gaussian_mixture_balance_means_and_determinism():
    n, dim, K, sep = 6000, 4, 3, 2.5
    X, y = gaussian_mixture(n, dim, K, sep, seed=3)
    X2, y2 = gaussian_mixture(n, dim, K, sep, seed=3)
    X3, _ = gaussian_mixture(n, dim, K, sep, seed=4)
    assert torch.equal(X, X2) and torch.equal(y, y2) and not torch.equal(X, X3)
    assert X.shape == (n, dim) and y.dtype == torch.int64
    assert torch.bincount(y).tolist() == [n // K] * K
    for k in range(K):
        Xk = X[y == k].double()
        m = Xk.mean(0)
        # ‖m̂_k‖² = sep² + noise: E = sep² + dim/n_k, sd ≈ 2·sep/√n_k.
        nk = Xk.shape[0]
        z = (float(m.norm() ** 2) - sep ** 2 - dim / nk) / (2 * sep / math.sqrt(nk))
        assert abs(z) < 5
        # within-class covariance is the identity: each variance has sd √(2/n_k)
        v = Xk.var(0)
        assert float(((v - 1) / math.sqrt(2 / nk)).abs().max()) < 5


def test_teacher_student_noise_level():
    n, noise = 4000, 0.3
    X, y, t = teacher_student_regression(n, 10, hidden=8, noise=noise, seed=1,
                                         return_teacher=True)
    assert X.shape == (n, 10) and y.shape == (n, 1) and y.is_floating_point()
    clean = np.tanh(X.double().numpy() @ t["W1"].T) @ t["w2"]
    resid = y.double().numpy()[:, 0] - clean
    # sample variance of N(0, σ²) has sd σ²√(2/(n−1))
    z = (resid.var(ddof=1) - noise ** 2) / (noise ** 2 * math.sqrt(2 / (n - 1)))
    assert abs(z) < 5
    assert clean.std() > 0.1  # the teacher is not trivial


def test_spiked_covariance_population_and_regression():
    n, dim, spikes, noise = 8000, 30, [4.0, 1.5], 0.2
    X, y, p = spiked_covariance_regression(n, dim, spikes, noise, seed=2,
                                           return_params=True, dtype=torch.float64)
    U = p["directions"]
    np.testing.assert_allclose(U.T @ U, np.eye(2), atol=1e-12)
    Xn = X.numpy()
    # E (u_iᵀx)² = 1 + s_i, var of the sample mean = 2(1+s_i)²/n
    proj = Xn @ U
    for i, s in enumerate(spikes):
        z = ((proj[:, i] ** 2).mean() - (1 + s)) / ((1 + s) * math.sqrt(2 / n))
        assert abs(z) < 5
    # a direction orthogonal to the spikes has unit variance
    v = np.random.default_rng(0).standard_normal(dim)
    v -= U @ (U.T @ v)
    v /= np.linalg.norm(v)
    z = (((Xn @ v) ** 2).mean() - 1) / math.sqrt(2 / n)
    assert abs(z) < 5
    # off-diagonal population covariance between spike directions is 0
    z = (proj[:, 0] * proj[:, 1]).mean() / math.sqrt((1 + spikes[0]) * (1 + spikes[1]) / n)
    assert abs(z) < 5
    resid = y.numpy()[:, 0] - Xn @ p["weights"]
    z = (resid.var(ddof=1) - noise ** 2) / (noise ** 2 * math.sqrt(2 / (n - 1)))
    assert abs(z) < 5


def test_spiked_covariance_bad_input():
    with pytest.raises(ValueError, match="spikes"):
        spiked_covariance_regression(10, 5, [-1.0])
    with pytest.raises(ValueError, match="spikes"):
        spiked_covariance_regression(10, 2, [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="n"):
        spiked_covariance_regression(0, 5, [1.0])
    with pytest.raises(ValueError, match="noise"):
        teacher_student_regression(10, 5, noise=-1.0)
    with pytest.raises(ValueError, match="n_classes"):
        gaussian_mixture(10, 2, n_classes=1)


# ------------------------------------------------------------------------ check_dataset
def test_check_dataset_accepts_and_rejects():
    X, y = torch.randn(5, 3), torch.arange(5)
    out = check_dataset(X, y)
    assert out[0] is X and out[1] is y
    with pytest.raises(TypeError, match="X"):
        check_dataset(X.numpy(), y)
    with pytest.raises(TypeError, match="y"):
        check_dataset(X, [0, 1, 2, 3, 4])
    with pytest.raises(ValueError, match="empty"):
        check_dataset(torch.zeros(0, 3), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(ValueError, match="samples"):
        check_dataset(X, torch.arange(4))
    Xn = X.clone()
    Xn[2, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        check_dataset(Xn, y)
    Xi = X.clone()
    Xi[0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf"):
        check_dataset(Xi, y)
    with pytest.raises(ValueError, match="y contains"):
        check_dataset(X, torch.tensor([0.0, 1.0, float("nan"), 2.0, 3.0]))


# ------------------------------------------------------------------------------- CIFAR
def _unrestricted(path):
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="bytes")


def _expected(batches, name, label_key):
    data = np.concatenate([b[b"data"] for b in batches]).astype(np.float64) / 255.0
    data = data.reshape(-1, 3, 32, 32)
    mean = np.array(CIFAR_MEAN[name]).reshape(1, 3, 1, 1)
    std = np.array(CIFAR_STD[name]).reshape(1, 3, 1, 1)
    labels = np.concatenate([b[label_key] for b in batches])
    return (data - mean) / std, labels


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_fake_cifar_roundtrip(tmp_path, name):
    folder = write_fake_cifar(tmp_path, name, n_train=12, n_test=7, seed=5)
    if name == "cifar10":
        train_files, test_files, key = [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], b"labels"
    else:
        train_files, test_files, key = ["train"], ["test"], b"fine_labels"
    for train, files, n in ((True, train_files, 12), (False, test_files, 7)):
        batches = [_unrestricted(folder / f) for f in files]
        X, y = load_cifar(tmp_path, name, train=train)
        assert X.shape == (n, 3, 32, 32) and X.dtype == torch.float32
        assert y.dtype == torch.int64 and y.shape == (n,)
        Xe, ye = _expected(batches, name, key)
        np.testing.assert_allclose(X.numpy(), Xe, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(y.numpy(), ye)
        # root may point at the data folder itself
        X2, y2 = load_cifar(folder, name, train=train)
        assert torch.equal(X, X2) and torch.equal(y, y2)
    # unnormalised pixels lie in [0, 1] and are multiples of 1/255
    Xr, _ = load_cifar(tmp_path, name, normalize=False)
    assert 0 <= float(Xr.min()) and float(Xr.max()) <= 1
    np.testing.assert_allclose((Xr * 255).numpy(), np.round((Xr * 255).numpy()), atol=1e-4)


def test_fake_cifar_uses_the_real_file_format(tmp_path):
    """Python-2 style protocol-2 pickles: byte-string keys, numpy uint8 array, and only
    the three numpy globals of the original files."""
    import pickletools

    folder = write_fake_cifar(tmp_path, "cifar100", n_train=3, n_test=2)
    raw = (folder / "train").read_bytes()
    assert raw[:2] == b"\x80\x02"
    ops = list(pickletools.genops(raw))
    globals_ = {arg for op, arg, _ in ops if op.name == "GLOBAL"}
    assert globals_ == {"numpy.core.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    assert not any(op.name in ("BINUNICODE", "SHORT_BINUNICODE", "BINBYTES") for op, _, _ in ops)
    d = _unrestricted(folder / "train")
    assert set(d) == {b"filenames", b"batch_label", b"fine_labels", b"coarse_labels", b"data"}
    assert d[b"data"].dtype == np.uint8 and d[b"data"].shape == (3, 3072)


def test_load_cifar_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_cifar(missing)
    with pytest.raises(ValueError, match="name"):
        load_cifar(tmp_path, name="cifar1000")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="empty"):
        load_cifar(tmp_path / "empty", "cifar100")
    folder = write_fake_cifar(tmp_path, "cifar100", n_train=3, n_test=2)
    # not a pickle at all
    (folder / "train").write_bytes(b"this is not a pickle")
    with pytest.raises(ValueError, match="train"):
        load_cifar(tmp_path, "cifar100")
    # truncated file
    good = (folder / "test").read_bytes()
    (folder / "train").write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError):
        load_cifar(tmp_path, "cifar100")
    # well-formed pickles with the wrong content
    bad_contents = [
        [1, 2, 3],
        {b"data": np.zeros((2, 3072), np.uint8)},                     # no labels
        {b"data": np.zeros((2, 100), np.uint8), b"fine_labels": [0, 1]},   # wrong width
        {b"data": np.zeros((2, 3072), np.float32), b"fine_labels": [0, 1]},  # wrong dtype
        {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0]},    # length mismatch
        {b"data": np.zeros((2, 3072), np.uint8), b"fine_labels": [0, 100]},  # label range
    ]
    for content in bad_contents:
        (folder / "train").write_bytes(pickle.dumps(content, protocol=3))
        with pytest.raises(ValueError):
            load_cifar(tmp_path, "cifar100")


class _Evil:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))


class _EvilPrint:
    def __reduce__(self):
        return (print, ("PWNED-BY-PICKLE",))


def test_malicious_cifar_pickle_is_refused_without_side_effect(tmp_path, capfd):
    folder = write_fake_cifar(tmp_path, "cifar10", n_train=5, n_test=2)
    marker = tmp_path / "pwned"
    payload = {b"data": np.zeros((1, 3072), np.uint8), b"labels": [0],
               b"batch_label": _Evil(marker)}
    evil_bytes = pickle.dumps(payload, protocol=3)
    (folder / "data_batch_1").write_bytes(evil_bytes)
    with pytest.raises(pickle.UnpicklingError, match="system"):
        load_cifar(tmp_path, "cifar10")
    assert not marker.exists()
    # control: the payload is live — an ordinary unpickler does run it
    pickle.loads(evil_bytes, encoding="bytes")
    assert marker.exists()

    (folder / "data_batch_1").write_bytes(pickle.dumps([_EvilPrint()], protocol=4))
    with pytest.raises(pickle.UnpicklingError, match="print"):
        load_cifar(tmp_path, "cifar10")
    assert "PWNED" not in capfd.readouterr().out


class _HostileDtype:
    """A dtype built from allowed globals whose pickled state hides an object field (its
    flags cleared, so numpy's object checks pass)."""

    def __reduce__(self):
        return (np.dtype, ("V8", False, True),
                (3, "|", None, ("a",), {"a": (np.dtype("O"), 0)}, 8, 1, 0))


class _PointersFromBytes:
    def __init__(self, route):
        self.route = route

    def __reduce__(self):
        if self.route == "frombuffer":     # numpy >= 2's protocol-5 array
            from numpy._core.numeric import _frombuffer
            return (_frombuffer, (b"A" * 16, _HostileDtype(), (2,), "C"))
        from numpy._core.multiarray import _reconstruct
        return (_reconstruct, (np.ndarray, (0,), b"b"),
                (1, (2,), _HostileDtype(), False, b"A" * 16))


def test_a_dtype_state_hiding_objects_is_refused(tmp_path):
    """A file naming only the allowed globals rebuilt a dtype with a hidden object field
    through its pickled state, so that raw bytes were read as object pointers: the
    interpreter crashed (SIGSEGV; this test's process, run against that code). The states
    given to dtypes and arrays are checked now."""
    folder = write_fake_cifar(tmp_path, "cifar10", n_train=5, n_test=2)
    for route in ("reconstruct", "frombuffer"):
        payload = {b"data": _PointersFromBytes(route), b"labels": [1, 1]}
        (folder / "test_batch").write_bytes(pickle.dumps(payload, protocol=4))
        with pytest.raises(pickle.UnpicklingError, match="dtype"):
            load_cifar(tmp_path, "cifar10", train=False)


@pytest.mark.parametrize("protocol", [3, 4, 5])
def test_cifar_resaved_by_python3_numpy2_still_loads(tmp_path, protocol):
    """A batch re-saved today (numpy._core names, BINBYTES keys; at protocol 5 numpy's
    `_frombuffer`, rebuilt without importing it) is read identically."""
    folder = write_fake_cifar(tmp_path, "cifar100", n_train=4, n_test=2, seed=1)
    X, y = load_cifar(tmp_path, "cifar100")
    d = _unrestricted(folder / "train")
    (folder / "train").write_bytes(pickle.dumps(d, protocol=protocol))
    X2, y2 = load_cifar(tmp_path, "cifar100")
    assert torch.equal(X, X2) and torch.equal(y, y2)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch.func internals
def test_spiked_covariance_least_squares_hessian_is_the_sample_covariance():
    X, y = spiked_covariance_regression(40, 6, [3.0], 0.1, seed=0, dtype=torch.float64)

    def loss(w):
        return 0.5 * ((X @ w - y[:, 0]) ** 2).mean()

    H = torch.func.hessian(loss)(torch.zeros(6, dtype=torch.float64))
    torch.testing.assert_close(H, X.T @ X / 40, rtol=1e-12, atol=1e-12)

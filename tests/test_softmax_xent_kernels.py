"""kernels/softmax_xent.cu against the NumPy SoftmaxCrossEntropy.

The kernels run through gpucnn.cuda.ops on the two kernel backends of
tests/backends.py (fixture ``device``): ``cudasim`` (the unchanged ``.cu``
source on the CPU emulator, NumPy arrays) and ``cupy`` (a real GPU; skipped,
with the reason, without one).  Plain parity of the loss with an independent
reference on every backend is in tests/test_functional.py; this file holds
what is particular to these kernels.

The reference is the library's own NumPy path, ``SoftmaxCrossEntropy().forward``
/ ``backward`` on host arrays.  Checked: loss, probs and gradient for float32
and float64, int32 and int64 labels, K = 1, 3, 10, 37, 1000, row counts that
are not multiples of the warps per block, batch 1, extreme logits (+-80, equal
logits, -inf, NaN), both forward launch sequences (fused one-block and
row-kernel + mean-kernel) and their bit-identity, determinism, invalid labels
(NaN, no error), the launch count, argument errors, and the dispatch in
gpucnn.losses (on the emulator through the patched dispatch seam).
The emulator runs threaded blocks (warp shuffles) at ~100 us per CUDA thread,
so the shapes are small and most cases use a 32- or 64-thread block.
"""
from __future__ import annotations

import contextlib

import numpy as np
import pytest

from backends import KERNEL_BACKENDS, use_backend
from gpucnn.cuda import loader, ops
from gpucnn.functional import _dispatch
from gpucnn.losses import SoftmaxCrossEntropy

# Tolerances for kernel vs NumPy: the sums run in a different order and the
# exp/log come from different libraries, so a few ulp; the gradient from the
# SAME probs is compared bit for bit separately.
TOL = {np.float32: dict(rtol=1e-5, atol=1e-6), np.float64: dict(rtol=1e-12, atol=1e-14)}


@pytest.fixture(params=KERNEL_BACKENDS)
def device(request, monkeypatch):
    """The kernels on the emulator (NumPy arrays) or the GPU (CuPy arrays)."""
    with use_backend(request.param, request, monkeypatch) as dev:
        yield dev


@contextlib.contextmanager
def numpy_path():
    """The NumPy path of gpucnn.losses, for the reference (the emulator patches the seam)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_dispatch, "use_kernels", lambda *a: False)
        yield


def reference(logits, labels, scale=1.0):
    """(loss, probs, grad) from the NumPy SoftmaxCrossEntropy."""
    assert isinstance(logits, np.ndarray)
    with numpy_path():
        loss_fn = SoftmaxCrossEntropy()
        loss = loss_fn.forward(logits, labels)
        return np.asarray(loss), loss_fn.probs, loss_fn.backward(scale)


def make(N, K, dtype, label_dtype=np.int64, seed=0, spread=3.0):
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal((N, K)) * spread).astype(dtype)
    labels = rng.integers(0, K, size=N).astype(label_dtype)
    return logits, labels


# Forward launch sequences: (fused_max_rows, block) -- "fused": one block does
# everything; "split": the row kernel on several blocks + the mean kernel.
PATHS = {"fused": dict(fused_max_rows=1 << 30, block=None),
         "split": dict(fused_max_rows=0, block=64)}


def run(device, logits, labels, scale=1.0, path="split"):
    loss, probs = ops.softmax_xent_forward(device.put(logits), device.put(labels), **PATHS[path])
    grad = ops.softmax_xent_backward(probs, device.put(labels), scale)
    return device.get(loss), device.get(probs), device.get(grad)


def assert_matches(got, want, dtype):
    (loss, probs, grad), (rloss, rprobs, rgrad) = got, want
    assert loss.shape == () and loss.dtype == dtype
    assert probs.dtype == dtype and grad.dtype == dtype
    assert probs.shape == rprobs.shape and grad.shape == rgrad.shape
    np.testing.assert_allclose(loss, rloss, **TOL[dtype])
    np.testing.assert_allclose(probs, rprobs, **TOL[dtype])
    np.testing.assert_allclose(grad, rgrad, **TOL[dtype])


# ---------------------------------------------------------------------------
# Parity with the NumPy path
# ---------------------------------------------------------------------------

# (N, K): batch 1, K = 1 (probs 1, loss 0), rows not a multiple of 2 warps
# (the split path's 64-thread block) nor of 32, K < 32, K = 32 + 5, K >> 32.
CASES = [(1, 10), (5, 1), (7, 3), (37, 10), (9, 37), (3, 1000), (33, 32)]


@pytest.mark.parametrize("N,K", CASES, ids=[f"N{n}K{k}" for n, k in CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_parity(N, K, dtype, path, device):
    logits, labels = make(N, K, dtype, seed=N * 1000 + K)
    assert_matches(run(device, logits, labels, path=path), reference(logits, labels), dtype)


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_label_dtypes(label_dtype, dtype, device):
    logits, labels = make(11, 10, dtype, label_dtype, seed=3)
    assert_matches(run(device, logits, labels, scale=0.25),
                   reference(logits, labels, scale=0.25), dtype)


def test_default_launch_configuration(device):
    """The production settings: fused for N <= 128, block 256 + mean kernel above."""
    for N in (64, 129):
        logits, labels = make(N, 10, np.float32, seed=N)
        loss, probs = ops.softmax_xent_forward(device.put(logits), device.put(labels))
        grad = ops.softmax_xent_backward(probs, device.put(labels))
        assert_matches((device.get(loss), device.get(probs), device.get(grad)),
                       reference(logits, labels), np.float32)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_gradient_bits_equal_numpy_given_the_same_probs(dtype, device):
    """(p - onehot) * dtype(scale / N): the very operations of the NumPy path."""
    logits, labels = make(13, 37, dtype, seed=5)
    loss_fn = SoftmaxCrossEntropy()
    with numpy_path():
        loss_fn.forward(logits, labels)
    for scale in (1.0, 0.3, 7):
        with numpy_path():
            want = loss_fn.backward(scale)
        got = device.get(ops.softmax_xent_backward(device.put(loss_fn.probs), device.put(labels), scale))
        np.testing.assert_array_equal(got.view(f"u{got.itemsize}"), want.view(f"u{want.itemsize}"))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_extreme_logits(dtype, device):
    K = 37
    logits = np.zeros((6, K), dtype)
    logits[0] = 80                          # all equal and large: uniform, loss log K
    logits[1] = -80
    logits[2, ::2], logits[2, 1::2] = 80, -80
    logits[3, 5] = 80                       # one dominant class (label elsewhere)
    logits[3, :5] = -80
    logits[4, 1] = -np.inf                  # a -inf logit: probability 0
    logits[5] = np.linspace(-80, 80, K)
    labels = np.array([0, 36, 1, 0, 2, 36], np.int64)
    for path in PATHS:
        got = run(device, logits, labels, path=path)
        assert np.all(np.isfinite(got[0])) and np.all(np.isfinite(got[1])) and np.all(np.isfinite(got[2]))
        np.testing.assert_allclose(got[1][0], 1.0 / K, **TOL[dtype])
        assert got[1][4, 1] == 0
        assert_matches(got, reference(logits, labels), dtype)


def test_nan_and_inf_propagate_like_numpy(device):
    logits, labels = make(4, 10, np.float64, seed=9)
    logits[1, 3] = np.nan                   # NaN row: probs, loss, gradient NaN
    logits[2, 7] = np.inf                   # inf - inf = NaN, as in NumPy
    with np.errstate(invalid="ignore"):
        want = reference(logits, labels)
    got = run(device, logits, labels)
    assert np.isnan(got[0]) and np.isnan(want[0])
    for g, w in zip(got[1:], want[1:]):
        np.testing.assert_array_equal(np.isnan(g), np.isnan(w))
        np.testing.assert_allclose(g, w, **TOL[np.float64])   # NaNs compare equal


@pytest.mark.parametrize("label_dtype", [np.int32, np.int64])
def test_invalid_labels_give_nan_rows_not_errors(label_dtype, device):
    N, K = 5, 10
    logits, labels = make(N, K, np.float32, label_dtype, seed=2)
    bad = {1: -1, 3: K}
    if label_dtype == np.int64:
        bad[4] = (1 << 32) + 2              # high word set: invalid, not label 2
    for row, value in bad.items():
        labels[row] = value
    for path in PATHS:
        loss, probs, grad = run(device, logits, labels, path=path)
        assert np.isnan(loss)
        good = [n for n in range(N) if n not in bad]
        assert np.all(np.isnan(grad[list(bad)])) and np.all(np.isfinite(grad[good]))
        np.testing.assert_allclose(probs.sum(axis=1), 1, rtol=1e-5)
        _, rprobs, rgrad = reference(logits[good], labels[good])
        np.testing.assert_allclose(probs[good], rprobs, **TOL[np.float32])
        np.testing.assert_allclose(grad[good] * N / len(good), rgrad, **TOL[np.float32])


# ---------------------------------------------------------------------------
# Determinism and launch shapes
# ---------------------------------------------------------------------------

def _bits(arrays):
    return [a.tobytes() for a in arrays]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_deterministic_and_independent_of_launch_shape(dtype, device):
    """Same bits twice, and the same bits for every block size / launch sequence."""
    logits, labels = make(70, 10, dtype, seed=11, spread=10.0)
    first = _bits(run(device, logits, labels, path="split"))
    assert _bits(run(device, logits, labels, path="split")) == first
    assert _bits(run(device, logits, labels, path="fused")) == first
    loss, probs = ops.softmax_xent_forward(device.put(logits), device.put(labels),
                                           fused_max_rows=0, block=32)
    assert _bits([device.get(loss), device.get(probs)]) == first[:2]


class _Counter:
    """Wraps a module builder; records every kernel launch by name."""

    def __init__(self, inner):
        self.inner, self.launches = inner, []

    def __call__(self, code, name, options):
        module, counter = self.inner(code, name, options), self

        class Module:
            def get_function(self, kernel):
                fn = module.get_function(kernel)

                def launch(grid, block, args, shared_mem=0):
                    counter.launches.append((kernel, tuple(grid), tuple(block)))
                    return fn(grid, block, args, shared_mem=shared_mem)
                return launch
        return Module()


@pytest.mark.parametrize("N,expected", [(128, ["softmax_xent_forward"]),
                                        (129, ["softmax_xent_forward", "softmax_xent_mean"])])
def test_launch_count(N, expected, device):
    counter = _Counter(loader.get_module_builder())
    with loader.use_module_builder(counter):
        loss_fn = SoftmaxCrossEntropy(check_labels=False)
        logits, labels = make(N, 3, np.float32, seed=1)
        loss_fn.forward(device.put(logits), device.put(labels))
        loss_fn.backward()
    assert [k for k, _, _ in counter.launches] == expected + ["softmax_xent_backward"]
    fwd = counter.launches[0]
    if N <= ops.SOFTMAX_XENT_FUSED_MAX_ROWS:
        assert fwd[1:] == ((1, 1, 1), (1024, 1, 1))
    else:
        assert fwd[1:] == ((loader.ceil_div(N, 8), 1, 1), (256, 1, 1))
        assert counter.launches[1][1:] == ((1, 1, 1), (32, 1, 1))


# ---------------------------------------------------------------------------
# gpucnn.losses dispatch
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("label_dtype", [np.int64, np.int32, np.uint8])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_dispatch(label_dtype, dtype, device):
    logits, labels = make(6, 10, dtype, label_dtype, seed=4)
    want = reference(logits, labels, scale=2.0)
    loss_fn = SoftmaxCrossEntropy()
    loss = loss_fn.forward(device.put(logits), device.put(labels))
    assert loss.shape == ()
    grad = loss_fn.backward(2.0)
    assert_matches((device.get(loss), device.get(loss_fn.probs), device.get(grad)), want, dtype)


def test_softmax_cross_entropy_still_checks_labels(device):
    logits, labels = make(4, 10, np.float32, seed=6)
    labels[2] = 10
    with pytest.raises(ValueError, match=r"label 10 out of range \[0, 10\)"):
        SoftmaxCrossEntropy().forward(device.put(logits), device.put(labels))
    labels[2] = -3
    with pytest.raises(ValueError, match=r"label -3 out of range"):
        SoftmaxCrossEntropy().forward(device.put(logits), device.put(labels))
    if device.name == "cupy":   # NumPy labels are always checked (free); on a GPU it can be off
        loss = SoftmaxCrossEntropy(check_labels=False).forward(device.put(logits), device.put(labels))
        assert np.isnan(device.get(loss))


# ---------------------------------------------------------------------------
# Argument errors (raised before any launch: no emulator needed)
# ---------------------------------------------------------------------------

def test_argument_errors():
    logits = np.zeros((3, 4), np.float32)
    labels = np.zeros(3, np.int64)
    for bad in (np.int16, np.uint8, np.uint32, np.float32):
        with pytest.raises(TypeError, match=np.dtype(bad).name):
            ops.softmax_xent_forward(logits, labels.astype(bad))
        with pytest.raises(TypeError, match=np.dtype(bad).name):
            ops.softmax_xent_backward(logits, labels.astype(bad))
    with pytest.raises(TypeError, match="float16"):
        ops.softmax_xent_forward(logits.astype(np.float16), labels)
    with pytest.raises(ValueError, match=r"shape \(3,\)"):
        ops.softmax_xent_forward(logits, labels[:2])
    with pytest.raises(ValueError, match="2-D"):
        ops.softmax_xent_forward(logits[0], labels)
    with pytest.raises(ValueError, match="K >= 1"):
        ops.softmax_xent_forward(np.zeros((3, 0), np.float32), labels)
    with pytest.raises(ValueError, match="multiple of 32"):
        ops.softmax_xent_forward(logits, labels, block=48)
    with pytest.raises(TypeError, match="host number"):
        ops.softmax_xent_backward(logits, labels, scale=np.ones(1))


def test_kernel_file_registered():
    names = loader.KERNEL_FILES["softmax_xent.cu"]
    assert {n for n in names if not n.endswith("_f64")} == {
        "softmax_xent_forward", "softmax_xent_mean", "softmax_xent_backward"}
    for name in names:
        assert loader.kernel_signature(name)

"""What only a GPU run can show that the backend-parametrised tests do not.

Parity of every op and of whole networks with the NumPy path runs on every
backend (numpy, the CPU emulator, the GPU) in tests/test_functional.py and
tests/test_network_backends.py.  Here: errors on the GPU path (unsupported
dtypes, arrays on the wrong device), non-contiguous CuPy input, CuPy's seeded
randomness, and one MNIST epoch through ``gpucnn.train`` on the GPU.

Every test here is marked ``gpu`` and needs CuPy with a CUDA device (the
``cupy_xp`` fixture from tests/conftest.py skips, with the reason, otherwise).
"""
from __future__ import annotations

import numpy as np
import pytest

import gpucnn
from gpucnn import backend, layers as L, losses, models
from gpucnn.backend import DeviceMismatchError

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cupy_xp")]


def _cp():
    return backend.cupy


def test_conv2d_non_contiguous_gpu_input():
    cp = _cp()
    layer = L.Conv2D(2, 3, 3, stride=2, padding=1)
    x = np.random.default_rng(0).standard_normal((3, 2, 11, 13)).astype(np.float32)
    gpu = __import__("copy").deepcopy(layer).to("cuda")
    xt = cp.asfortranarray(cp.asarray(x))
    assert not xt.flags.c_contiguous
    np.testing.assert_allclose(backend.asnumpy(gpu.forward(xt)), layer.forward(x), rtol=1e-4, atol=1e-4)


def test_one_hot_on_gpu():
    cp = _cp()
    labels = np.array([3, 0, 9, 3])
    out = losses.one_hot(cp.asarray(labels), 10)
    assert backend.is_cupy(out)
    np.testing.assert_array_equal(backend.asnumpy(out), losses.one_hot(labels, 10))


# --------------------------------------------------------------------------- #
# Errors on the GPU path
# --------------------------------------------------------------------------- #
def test_gpu_rejects_unsupported_dtypes():
    from gpucnn.cuda import conv, pool

    cp = _cp()
    layer = L.Conv2D(1, 2, 3).to("cuda")
    x16 = cp.zeros((1, 1, 5, 5), cp.float16)
    with pytest.raises(TypeError, match="float16"):
        layer.forward(x16)
    with pytest.raises(TypeError, match=r"float16.*float32.*float64"):
        conv.conv_forward(cp.zeros((1, 5, 5, 1), cp.float16), cp.zeros((2, 1, 3, 3), cp.float16), None, (1, 1), (0, 0))
    with pytest.raises(TypeError, match="int32"):
        pool.max_pool_forward(cp.zeros((1, 4, 4, 1), cp.int32), (2, 2), (2, 2))
    with pytest.raises(TypeError, match="float16"):
        L.MaxPool2D(2).forward(cp.zeros((1, 1, 4, 4), cp.float16))
    with pytest.raises(TypeError, match="float64.*float32|float32.*float64"):
        layer.forward(cp.zeros((1, 1, 5, 5), cp.float64))          # no silent cast to the layer's dtype


def test_numpy_input_into_gpu_layer_raises_device_mismatch():
    cp = _cp()
    x = np.zeros((2, 1, 28, 28), np.float32)
    with pytest.raises(DeviceMismatchError, match="cpu.*cuda|cuda.*cpu"):
        L.Conv2D(1, 6, 5).to("cuda").forward(x)
    with pytest.raises(DeviceMismatchError):
        L.Dense(4, 3).to("cuda").forward(np.zeros((2, 4), np.float32))
    with pytest.raises(DeviceMismatchError):
        models.build("lenet5", device="cuda").forward(x)
    pool = L.MaxPool2D(2)
    y = pool.forward(cp.asarray(np.zeros((1, 1, 4, 4), np.float32)))
    with pytest.raises(DeviceMismatchError):
        pool.backward(np.zeros(y.shape, np.float32))            # argmax lives on the GPU
    conv = L.Conv2D(1, 2, 3).to("cuda")
    conv.forward(cp.zeros((1, 1, 5, 5), cp.float32))
    with pytest.raises(DeviceMismatchError):
        conv.backward(np.zeros((1, 2, 3, 3), np.float32))
    with pytest.raises(DeviceMismatchError):
        losses.SoftmaxCrossEntropy().forward(cp.zeros((2, 10), cp.float32), np.array([1, 2]))
    from gpucnn.cuda import conv

    with pytest.raises(DeviceMismatchError):
        conv.conv_forward(cp.zeros((1, 5, 5, 1), cp.float32), np.zeros((2, 1, 3, 3), np.float32), None, (1, 1), (0, 0))


# --------------------------------------------------------------------------- #
# Randomness
# --------------------------------------------------------------------------- #
def test_seed_gives_identical_cupy_rrelu_draws():
    cp = _cp()
    x = cp.full((4, 5, 6, 7), -1.0, dtype=cp.float32)       # all negative: output = -slope

    def draw(seed):
        gpucnn.seed(seed)
        layer = L.RReLU(0.125, 1 / 3)
        out = layer.forward(x)
        assert backend.is_cupy(out)
        return -backend.asnumpy(out)

    a, b, c = draw(42), draw(42), draw(43)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert a.min() >= 0.125 and a.max() <= 1 / 3 + 1e-7
    assert len(np.unique(a)) > a.size // 2                    # per-element draws, not one slope


# --------------------------------------------------------------------------- #
# One MNIST epoch on the GPU
# --------------------------------------------------------------------------- #
@pytest.mark.slow
def test_mnist_one_epoch_on_gpu(tmp_path, monkeypatch):
    """lenet5, SGD momentum 0.9, one epoch: >= 98% test accuracy; the dataset moved to the GPU once."""
    from gpucnn.train import loop

    moved = []
    real_load_arrays = loop.load_arrays

    def recording_load_arrays(*args, **kwargs):
        arrays = real_load_arrays(*args, **kwargs)
        moved.extend(arrays[:4])
        return arrays

    monkeypatch.setattr(loop, "load_arrays", recording_load_arrays)
    cfg = gpucnn.train.TrainConfig(model="lenet5", epochs=1, optimizer="sgd", seed=0)
    result = gpucnn.train.train(cfg, device="cuda", out_dir=tmp_path / "run", progress=False, log=None)
    assert result.device == "cuda"
    assert len(moved) == 4 and all(backend.is_cupy(a) for a in moved), \
        "the dataset should be moved to the GPU once, not per batch"
    print(f"\nMNIST 1 epoch on GPU: test accuracy {100 * result.test_accuracy:.2f}%, "
          f"{result.images_per_sec:.0f} images/s, {result.seconds:.1f} s")
    assert all(backend.is_cupy(p) for p in result.model.parameters())
    assert result.test_accuracy >= 0.98, f"test accuracy after one epoch on the GPU: {100 * result.test_accuracy:.2f}%"


def test_graphed_steps_equal_eager_steps_on_gpu():
    """lenet5 with its shifted batches, 16 steps: the CUDA graph (the default) gives the eager steps'
    losses and weights bit for bit, and really replayed (its checks passed, no fallback)."""
    import warnings

    from gpucnn import optim
    from gpucnn.train.graph import GraphedStep

    cp = _cp()
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((8 * 64, 1, 28, 28)).astype(np.float32))
    y = cp.asarray(rng.integers(0, 10, 8 * 64).astype(np.int64))
    order = cp.asarray(rng.permutation(8 * 64))

    def run(**kw):
        gpucnn.seed(0)
        model = models.build("lenet5", device="cuda")
        trainer = gpucnn.train.Trainer(model, losses.SoftmaxCrossEntropy(check_labels=False),
                                       optim.SGD(model, lr=0.05, momentum=0.9, weight_decay=1e-3), batch_size=64,
                                       schedule=lambda e, s: 0.05 / (1 + s), sync_every=5,
                                       augment={"seed": 1, "fill": -0.42, "flip": False}, **kw)
        seen = []
        for epoch in range(2):
            trainer.run_steps(x, y, order, epoch, range(8), 8,
                              on_sync=lambda st, k: seen.append((st.loss_sum, st.correct)))
        return seen, model.state_dict(), list(trainer._graphs.values())

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        eager = run(cuda_graph=False)
        replayed = run()
    (static,) = replayed[2]
    assert isinstance(static, GraphedStep) and static.validated
    assert replayed[0] == eager[0]
    for name, value in eager[1].items():
        np.testing.assert_array_equal(replayed[1][name], value, err_msg=name)


def test_a_batch_of_zero_samples_on_gpu():
    """lenet5 forward and backward on a (0, 1, 28, 28) batch give empty results and zero gradients
    (an H200 run refused the first dense layer's (400, 0) input in the kernel wrapper)."""
    from helpers import check_lenet5_on_a_batch_of_zero

    check_lenet5_on_a_batch_of_zero(_cp(), _cp().ndarray)

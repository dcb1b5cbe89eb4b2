"""GPU path (CuPy + the hand-written kernels) against the NumPy path, layer by layer.

Every test here is marked ``gpu`` and needs CuPy with a CUDA device (the
``cupy_xp`` fixture from tests/conftest.py skips, with the reason, otherwise).
Run them with ``PYTHONPATH=. python3 -m pytest -m gpu``; the MNIST epoch is
also marked ``slow``.

Pattern: build a layer on the CPU, ``copy.deepcopy(layer).to("cuda")`` for the
GPU twin (same parameters), run forward and backward on both from the same
NumPy inputs, and compare outputs, input gradients and parameter gradients.
float32 comparisons use ``rtol`` plus an ``atol`` scaled by the reference's
largest magnitude (summation order differs between the CPU GEMMs and the GPU
kernels); no exact float equality except where the value is selected, not
computed (max pooling's outputs and argmax).
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

import gpucnn
from gpucnn import backend, layers as L, losses, models, optim
from gpucnn.backend import DeviceMismatchError

pytestmark = [pytest.mark.gpu, pytest.mark.usefixtures("cupy_xp")]

#: (rtol, atol relative to max |reference|, floor 1) per dtype.
TOL = {np.float32: (1e-4, 1e-4), np.float64: (1e-10, 1e-10)}
#: element-wise activations: no reductions, so tighter.
TOL_ELEMENTWISE = {np.float32: (1e-5, 1e-5), np.float64: (1e-12, 1e-12)}


def assert_close(actual, desired, dtype=np.float32, tol=None, what=""):
    """``actual`` (CuPy, or NumPy) close to ``desired`` (NumPy), with a magnitude-scaled atol."""
    rtol, atol = (tol or TOL)[np.dtype(dtype).type]
    if backend.is_cupy(actual):
        actual = backend.asnumpy(actual)
    desired = np.asarray(desired)
    assert actual.shape == desired.shape, f"{what}: shape {actual.shape} != {desired.shape}"
    scale = max(1.0, float(np.max(np.abs(desired)))) if desired.size else 1.0
    np.testing.assert_allclose(actual, desired, rtol=rtol, atol=atol * scale, err_msg=what)


def _cp():
    return backend.cupy


def _gpu_twin(layer):
    """Same layer, same parameters, on the GPU."""
    return copy.deepcopy(layer).to("cuda")


def check_layer_parity(layer, x, dy, dtype=np.float32, tol=None, exact_forward=False,
                       fwd_kwargs=None):
    """Forward + backward of ``layer`` on NumPy and of its GPU twin on CuPy; compare everything.

    ``fwd_kwargs`` (NumPy arrays) go to both forwards, moved to the GPU for the twin.
    Returns the GPU twin (for extra checks).
    """
    cp = _cp()
    fwd_kwargs = fwd_kwargs or {}
    gpu = _gpu_twin(layer)
    for k, p in gpu.params.items():
        assert backend.is_cupy(p) and backend.is_cupy(gpu.grads[k]), f"param {k} not moved to the GPU"

    y_cpu = layer.forward(x, **fwd_kwargs)
    y_gpu = gpu.forward(cp.asarray(x), **{k: cp.asarray(v) for k, v in fwd_kwargs.items()})
    assert backend.is_cupy(y_gpu), f"{layer!r}: forward on CuPy returned {type(y_gpu).__name__}"
    assert y_gpu.dtype == y_cpu.dtype == dtype and y_gpu.shape == y_cpu.shape
    if exact_forward:
        np.testing.assert_array_equal(backend.asnumpy(y_gpu), y_cpu, err_msg=f"{layer!r} forward")
    else:
        assert_close(y_gpu, y_cpu, dtype, tol, f"{layer!r} forward")

    dx_cpu = layer.backward(dy)
    dx_gpu = gpu.backward(cp.asarray(dy))
    if dx_cpu is None:
        assert dx_gpu is None
    else:
        assert backend.is_cupy(dx_gpu) and dx_gpu.dtype == dtype
        assert_close(dx_gpu, dx_cpu, dtype, tol, f"{layer!r} dL/dx")
    assert sorted(gpu.grads) == sorted(layer.grads)
    for k in layer.grads:
        assert backend.is_cupy(gpu.grads[k])
        assert_close(gpu.grads[k], layer.grads[k], dtype, tol, f"{layer!r} grad {k}")
    return gpu


def _rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- #
# Conv2D
# --------------------------------------------------------------------------- #
# (N, C, H, W, O, kernel, stride, padding, bias)
CONV = [
    pytest.param((4, 1, 28, 28, 6, 5, 1, 2, True), id="lenet5-conv1"),
    pytest.param((4, 6, 14, 14, 16, 5, 1, 0, True), id="lenet5-conv2"),
    pytest.param((1, 3, 7, 9, 4, 3, 1, 1, True), id="batch1-same"),
    pytest.param((3, 2, 11, 13, 3, 3, 2, 1, True), id="batch3-s2-p1"),
    pytest.param((3, 2, 17, 10, 5, (3, 2), (3, 2), (2, 0), False), id="nonsquare-s3x2-p2x0-nobias"),
    pytest.param((2, 4, 9, 9, 3, 1, 2, 0, True), id="1x1-s2"),
    pytest.param((2, 3, 8, 8, 2, 4, 3, 2, True), id="even-k4-s3-p2"),
    pytest.param((8, 3, 32, 32, 8, 3, 1, 1, True), id="long-reduction-8192"),
]


def _conv_setup(case, dtype, seed=0):
    N, C, H, W, O, k, s, p, bias = case
    layer = L.Conv2D(C, O, k, stride=s, padding=p, bias=bias, dtype=dtype)
    rng = _rng(seed)
    if bias:
        layer.params["b"][...] = rng.standard_normal(O).astype(dtype)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    dy = rng.standard_normal(layer.output_shape(x.shape)).astype(dtype)
    return layer, x, dy


@pytest.mark.parametrize("case", CONV)
def test_conv2d_parity(case):
    layer, x, dy = _conv_setup(case, np.float32)
    check_layer_parity(layer, x, dy)


@pytest.mark.parametrize("case", [CONV[1], CONV[3], CONV[4]])
def test_conv2d_parity_float64(case):
    layer, x, dy = _conv_setup(case, np.float64, seed=1)
    check_layer_parity(layer, x, dy, dtype=np.float64)


def test_conv2d_first_layer_skips_input_grad():
    layer, x, dy = _conv_setup(CONV[0].values[0], np.float32)
    layer.needs_input_grad = False
    gpu = check_layer_parity(layer, x, dy)
    assert gpu.needs_input_grad is False


def test_conv2d_non_contiguous_gpu_input():
    cp = _cp()
    layer, x, dy = _conv_setup(CONV[3].values[0], np.float32)
    gpu = _gpu_twin(layer)
    xt = cp.asfortranarray(cp.asarray(x))
    assert not xt.flags.c_contiguous
    assert_close(gpu.forward(xt), layer.forward(x), what="Conv2D forward, Fortran-order x")


# --------------------------------------------------------------------------- #
# Pooling
# --------------------------------------------------------------------------- #
# (N, C, H, W, kernel, stride)
POOL = [
    pytest.param((4, 6, 28, 28, 2, 2), id="lenet5-2x2"),
    pytest.param((3, 2, 7, 7, 3, 2), id="overlap-3s2"),
    pytest.param((1, 3, 9, 8, (3, 2), (1, 2)), id="overlap-heavy-3x2-s1x2"),
    pytest.param((2, 2, 9, 9, 2, 3), id="gaps-2s3"),
    pytest.param((2, 3, 8, 9, 3, (3, 2)), id="floor-border"),
    pytest.param((3, 2, 5, 5, 5, 1), id="one-window"),
]


@pytest.mark.parametrize("ties", [pytest.param(False, id="distinct"), pytest.param(True, id="ties")])
@pytest.mark.parametrize("case", POOL)
def test_maxpool2d_parity(case, ties):
    N, C, H, W, k, s = case
    rng = _rng(2)
    x = (rng.integers(0, 3, size=(N, C, H, W)) if ties else rng.standard_normal((N, C, H, W))).astype(np.float32)
    layer = L.MaxPool2D(k, s)
    dy = rng.standard_normal(layer.output_shape(x.shape)).astype(np.float32)
    gpu = check_layer_parity(layer, x, dy, exact_forward=True,
                             tol={np.float32: (1e-6, 1e-6)})
    assert backend.is_cupy(gpu.argmax) and gpu.argmax.dtype == np.int32
    np.testing.assert_array_equal(backend.asnumpy(gpu.argmax), layer.argmax)  # first max wins on both


def test_maxpool2d_parity_float64():
    x = _rng(3).standard_normal((2, 3, 9, 9))
    layer = L.MaxPool2D(3, 2)
    dy = _rng(4).standard_normal(layer.output_shape(x.shape))
    check_layer_parity(layer, x, dy, dtype=np.float64, exact_forward=True)


@pytest.mark.parametrize("case", POOL)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_avgpool2d_parity(case, dtype):
    N, C, H, W, k, s = case
    rng = _rng(5)
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    layer = L.AvgPool2D(k, s)
    dy = rng.standard_normal(layer.output_shape(x.shape)).astype(dtype)
    check_layer_parity(layer, x, dy, dtype=dtype)


# --------------------------------------------------------------------------- #
# Dense, Flatten
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("shape", [pytest.param((1, 400, 120, True), id="batch1-400x120"),
                                   pytest.param((64, 400, 120, True), id="lenet5-fc1"),
                                   pytest.param((3, 84, 10, False), id="batch3-nobias")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_dense_parity(shape, dtype):
    N, fin, fout, bias = shape
    rng = _rng(6)
    layer = L.Dense(fin, fout, bias=bias, dtype=dtype)
    if bias:
        layer.params["b"][...] = rng.standard_normal(fout).astype(dtype)
    x = rng.standard_normal((N, fin)).astype(dtype)
    dy = rng.standard_normal((N, fout)).astype(dtype)
    check_layer_parity(layer, x, dy, dtype=dtype)


def test_flatten_parity():
    rng = _rng(7)
    x = rng.standard_normal((3, 16, 5, 5)).astype(np.float32)
    dy = rng.standard_normal((3, 400)).astype(np.float32)
    check_layer_parity(L.Flatten(), x, dy, exact_forward=True, tol={np.float32: (0, 0)})


# --------------------------------------------------------------------------- #
# Activations
# --------------------------------------------------------------------------- #
def _act_input(shape=(3, 4, 5, 6), dtype=np.float32, seed=8):
    """N(0, 3) values with some exact zeros (the ReLU family's x = 0 branch)."""
    x = (3 * _rng(seed).standard_normal(shape)).astype(dtype)
    x.reshape(-1)[::7] = 0
    return x


ACTIVATIONS = [
    pytest.param(lambda: L.Sigmoid(), id="Sigmoid"),
    pytest.param(lambda: L.Tanh(), id="Tanh"),
    pytest.param(lambda: L.ScaledTanh(), id="ScaledTanh"),
    pytest.param(lambda: L.ReLU(), id="ReLU"),
    pytest.param(lambda: L.LeakyReLU(0.1), id="LeakyReLU"),
    pytest.param(lambda: L.PReLU(1), id="PReLU-shared"),
    pytest.param(lambda: L.PReLU(4, init=0.2), id="PReLU-per-channel"),
    pytest.param(lambda: L.RReLU().eval(), id="RReLU-eval"),
    pytest.param(lambda: L.Softmax(axis=1), id="Softmax"),
]


@pytest.mark.parametrize("make", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_activation_parity(make, dtype):
    layer = make()
    if "a" in layer.params:
        layer.params["a"] = layer.params["a"].astype(dtype)
        layer.grads["a"] = layer.grads["a"].astype(dtype)
    x = _act_input(dtype=dtype)
    dy = _rng(9).standard_normal(x.shape).astype(dtype)
    tol = TOL if "a" in layer.params else TOL_ELEMENTWISE   # PReLU's grad "a" is a reduction
    check_layer_parity(layer, x, dy, dtype=dtype, tol=tol)


def test_relu_half_subgradient_at_zero_on_gpu():
    cp = _cp()
    relu = L.ReLU()
    x = cp.asarray(np.array([[-1.0, 0.0, 2.0]], np.float32))
    relu.forward(x)
    np.testing.assert_array_equal(backend.asnumpy(relu.backward(cp.ones_like(x))), [[0.0, 0.5, 1.0]])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_rrelu_fixed_slopes_parity(dtype):
    layer = L.RReLU(0.1, 0.3)
    assert layer.training
    x = _act_input(dtype=dtype)
    slopes = _rng(10).uniform(0.1, 0.3, x.shape).astype(dtype)
    dy = _rng(11).standard_normal(x.shape).astype(dtype)
    check_layer_parity(layer, x, dy, dtype=dtype, tol=TOL_ELEMENTWISE, fwd_kwargs={"slopes": slopes})


# --------------------------------------------------------------------------- #
# Losses
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("scale", [pytest.param(1.0, id="logits-N01"), pytest.param(60.0, id="logits-large")])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_softmax_cross_entropy_parity(scale, dtype):
    cp = _cp()
    rng = _rng(12)
    logits = (scale * rng.standard_normal((37, 10))).astype(dtype)
    labels = rng.integers(0, 10, 37)
    cpu, gpu = losses.SoftmaxCrossEntropy(), losses.SoftmaxCrossEntropy()
    L_cpu = cpu.forward(logits, labels)
    L_gpu = gpu.forward(cp.asarray(logits), cp.asarray(labels))
    assert backend.is_cupy(L_gpu) and L_gpu.ndim == 0 and np.isfinite(float(L_gpu))
    assert_close(L_gpu, L_cpu, dtype, what="cross-entropy loss")
    g = gpu.backward()
    assert backend.is_cupy(g) and g.dtype == dtype
    assert_close(g, cpu.backward(), dtype, what="cross-entropy dL/dz")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_mse_parity(dtype):
    cp = _cp()
    rng = _rng(13)
    pred = rng.standard_normal((21, 10)).astype(dtype)
    target = losses.one_hot(rng.integers(0, 10, 21), 10, dtype=dtype)
    cpu, gpu = losses.MSE(), losses.MSE()
    L_cpu = cpu.forward(pred, target)
    L_gpu = gpu.forward(cp.asarray(pred), cp.asarray(target))
    assert backend.is_cupy(L_gpu) and L_gpu.ndim == 0
    assert_close(L_gpu, L_cpu, dtype, what="MSE loss")
    assert_close(gpu.backward(), cpu.backward(), dtype, what="MSE dL/dpred")


def test_one_hot_on_gpu():
    cp = _cp()
    labels = np.array([3, 0, 9, 3])
    out = losses.one_hot(cp.asarray(labels), 10)
    assert backend.is_cupy(out)
    np.testing.assert_array_equal(backend.asnumpy(out), losses.one_hot(labels, 10))


# --------------------------------------------------------------------------- #
# Whole models
# --------------------------------------------------------------------------- #
def _twin_models(name, seed=0, dtype=np.float32):
    gpucnn.seed(seed)
    cpu = models.build(name, dtype=dtype)
    gpu = models.build(name, dtype=dtype, device="cuda")
    gpu.load_state_dict(cpu.state_dict())
    assert gpu.device == "cuda" and cpu.device == "cpu"
    return cpu, gpu


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["lenet5", "zhang2016", "seed002_c2"])
def test_model_forward_backward_parity(name, dtype):
    """Whole network, input gradient included (input_grad=True)."""
    cp = _cp()
    cpu, gpu = _twin_models(name, dtype=dtype)
    rng = _rng(14)
    x = rng.standard_normal((5, 1, 28, 28)).astype(dtype)
    labels = rng.integers(0, 10, 5)
    loss_c, loss_g = models.make_loss(name), models.make_loss(name)
    if isinstance(loss_c, losses.MSE):
        t_c, t_g = losses.one_hot(labels, 10, dtype), losses.one_hot(cp.asarray(labels), 10, dtype)
    else:
        t_c, t_g = labels, cp.asarray(labels)
    out_c, out_g = cpu.forward(x), gpu.forward(cp.asarray(x))
    assert_close(out_g, out_c, dtype, what=f"{name} logits")
    assert_close(loss_g.forward(out_g, t_g), loss_c.forward(out_c, t_c), dtype, what=f"{name} loss")
    dx_c = cpu.backward(loss_c.backward())
    dx_g = gpu.backward(loss_g.backward())
    assert_close(dx_g, dx_c, dtype, what=f"{name} dL/dx")
    for (n, lc, k), (_, lg, _) in zip(cpu.named_parameters(), gpu.named_parameters()):
        assert_close(lg.grads[k], lc.grads[k], dtype, what=f"{name} grad {n}")


# After 3 SGD steps.  float64: tight, so any difference in the maths shows.  float32: the
# production dtype; a little looser, because a pre-activation within float32 rounding of 0
# (or a max-pool near-tie) can take the other branch on one device, which moves single
# weights by ~lr * |dy * x| (rare, ~1e-4) without anything being wrong.
STEP_TOL = {np.float32: dict(loss_rel=1e-4, params=(1e-3, 2e-4)),
            np.float64: dict(loss_rel=1e-10, params=(1e-9, 1e-10))}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lenet5_three_sgd_steps_match_numpy(dtype):
    """forward, SoftmaxCrossEntropy, backward(input_grad=False), SGD(momentum) step; 3 times."""
    cp = _cp()
    tol = STEP_TOL[dtype]
    cpu, gpu = _twin_models("lenet5", seed=3, dtype=dtype)
    opt_c = optim.SGD(cpu, lr=0.05, momentum=0.9)
    opt_g = optim.SGD(gpu, lr=0.05, momentum=0.9)
    loss_c, loss_g = losses.SoftmaxCrossEntropy(), losses.SoftmaxCrossEntropy()
    rng = _rng(15)
    for step in range(3):
        x = rng.standard_normal((32, 1, 28, 28)).astype(dtype)
        y = rng.integers(0, 10, 32)
        L_c = loss_c.forward(cpu.forward(x), y)
        assert cpu.backward(loss_c.backward(), input_grad=False) is None
        opt_c.step()
        L_g = loss_g.forward(gpu.forward(cp.asarray(x)), cp.asarray(y))
        assert gpu.backward(loss_g.backward(), input_grad=False) is None
        opt_g.step()
        assert float(L_g) == pytest.approx(float(L_c), rel=tol["loss_rel"]), f"loss at step {step}"
    assert all(backend.is_cupy(p) for p in gpu.parameters())
    state_c, state_g = cpu.state_dict(), gpu.state_dict()
    assert sorted(state_c) == sorted(state_g)
    ptol = {np.dtype(dtype).type: tol["params"]}
    for name in state_c:
        assert_close(state_g[name], state_c[name], dtype, ptol, what=f"param {name} after 3 steps")
    for name, slots in opt_c.state.items():
        assert_close(opt_g.state[name]["momentum"], slots["momentum"], dtype, ptol, what=f"momentum {name}")


# --------------------------------------------------------------------------- #
# Errors on the GPU path
# --------------------------------------------------------------------------- #
def test_gpu_rejects_unsupported_dtypes():
    from gpucnn.cuda import loader, ops

    cp = _cp()
    conv = L.Conv2D(1, 2, 3).to("cuda")
    x16 = cp.zeros((1, 1, 5, 5), cp.float16)
    with pytest.raises(TypeError, match="float16"):
        conv.forward(x16)
    with pytest.raises(TypeError, match=r"float16.*float32, float64"):
        ops.conv2d_forward(x16, cp.zeros((2, 1, 3, 3), cp.float16), None, 1, 0)
    with pytest.raises(TypeError, match="int32"):
        ops.maxpool2d_forward(cp.zeros((1, 1, 4, 4), cp.int32), 2, 2)
    with pytest.raises(TypeError, match="float16"):
        L.MaxPool2D(2).forward(cp.zeros((1, 1, 4, 4), cp.float16))
    with pytest.raises(TypeError, match="float64.*float32|float32.*float64"):
        conv.forward(cp.zeros((1, 1, 5, 5), cp.float64))          # no silent cast to the layer's dtype
    with pytest.raises(TypeError, match="share one dtype"):
        ops.conv2d_forward(cp.zeros((1, 1, 5, 5), cp.float32), cp.zeros((2, 1, 3, 3), cp.float64), None, 1, 0)
    y = cp.empty((1, 1, 3, 3), cp.float32)
    W = cp.zeros((1, 1, 3, 3), cp.float32)
    with pytest.raises(TypeError, match="float64"):
        loader.launch("conv2d_forward", (cp.zeros((1, 1, 5, 5), cp.float64), W, W[0, 0, 0, :1].copy(), y,
                                         1, 1, 5, 5, 1, 3, 3, 3, 3, 1, 1, 0, 0, 1), n_threads=y.size)


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
    from gpucnn.cuda import ops

    with pytest.raises(DeviceMismatchError):
        ops.conv2d_forward(cp.zeros((1, 1, 5, 5), cp.float32), np.zeros((2, 1, 3, 3), np.float32), None, 1, 0)


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
def _train_api():
    """gpucnn.train if its API is there and can run here (it needs tqdm), else None."""
    import importlib.util

    if importlib.util.find_spec("tqdm") is None:
        return None
    try:
        from gpucnn import train as train_mod
    except Exception:
        return None
    if all(hasattr(train_mod, n) for n in ("TrainConfig", "train", "load_arrays")):
        return train_mod
    return None


def _manual_epoch(batch_size=64, lr=0.05, momentum=0.9, seed=0):
    """The same loop without gpucnn.train: data moved to the GPU once, cosine lr per step."""
    import math

    from gpucnn import data

    cp = _cp()
    ds = data.load_dataset("mnist")
    x_tr = cp.asarray(data.normalize(ds.train_images, ds))
    y_tr = cp.asarray(ds.train_labels.astype(np.int64))
    x_te = cp.asarray(data.normalize(ds.test_images, ds))
    y_te = cp.asarray(ds.test_labels.astype(np.int64))
    gpucnn.seed(seed)
    model = models.build("lenet5", device="cuda")
    opt = optim.SGD(model, lr=lr, momentum=momentum)
    loss = losses.SoftmaxCrossEntropy(check_labels=False)
    n = int(x_tr.shape[0])
    order = cp.asarray(np.random.default_rng([seed, 0]).permutation(n))
    steps = math.ceil(n / batch_size)
    for step in range(steps):
        opt.lr = lr * 0.5 * (1 + math.cos(math.pi * step / steps))
        idx = order[step * batch_size:(step + 1) * batch_size]
        loss.forward(model.forward(x_tr[idx]), y_tr[idx])
        model.backward(loss.backward(), input_grad=False)
        opt.step()
    model.eval()
    correct = sum(int((model.forward(x_te[i:i + 1000]).argmax(axis=1) == y_te[i:i + 1000]).sum())
                  for i in range(0, int(x_te.shape[0]), 1000))
    return correct / int(x_te.shape[0]), model


@pytest.mark.slow
def test_mnist_one_epoch_on_gpu(tmp_path, monkeypatch):
    """lenet5, SGD momentum 0.9, one epoch: >= 98% test accuracy (the CPU gets ~98.5-99%)."""
    train_mod = _train_api()
    if train_mod is None:
        accuracy, model = _manual_epoch()
    else:
        moved = []
        real_load_arrays = train_mod.load_arrays

        def recording_load_arrays(*args, **kwargs):
            arrays = real_load_arrays(*args, **kwargs)
            moved.extend(arrays[:4])
            return arrays

        monkeypatch.setattr(train_mod, "load_arrays", recording_load_arrays)
        cfg = train_mod.TrainConfig(model="lenet5", epochs=1, optimizer="sgd", seed=0)
        result = train_mod.train(cfg, device="cuda", out_dir=tmp_path / "run", progress=False, log=None)
        assert result.device == "cuda"
        assert len(moved) == 4 and all(backend.is_cupy(a) for a in moved), \
            "the dataset should be moved to the GPU once, not per batch"
        accuracy, model = result.test_accuracy, result.model
        print(f"\nMNIST 1 epoch on GPU: test accuracy {100 * accuracy:.2f}%, "
              f"{result.images_per_sec:.0f} images/s, {result.seconds:.1f} s")
    assert all(backend.is_cupy(p) for p in model.parameters())
    assert accuracy >= 0.98, f"test accuracy after one epoch on the GPU: {100 * accuracy:.2f}%"

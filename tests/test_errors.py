"""Bad input fails loudly, with the offending value named in the message.

Each row of the layer registry (tests/layer_cases.py) brings its own bad
inputs (``LayerCase.rejects``), and every row goes through the checks that
hold for any layer: non-array and unsupported-dtype input, a parameter dtype
or device mismatch, backward before forward, dy of another dtype.

Covers: rank, channels, output size, kernel/stride/padding, labels, batch and
shape mismatches, NumPy/CuPy mixing (through a stub CuPy), unsupported and
mismatched dtypes, backward before forward, strict ``load_state_dict``,
unknown model / initializer names, optimizer hyper-parameters, and the opt-in
anomaly detection of :mod:`gpucnn.debug`.
"""
from __future__ import annotations

import re
import types

import numpy as np
import pytest

import gpucnn
from gpucnn import backend, debug, losses, models, optim
from gpucnn import layers as L
from gpucnn.backend import DeviceMismatchError
from layer_cases import CASES
from layer_cases import params as layer_params

F64 = np.float64


def esc(s):
    return re.escape(s)


# --------------------------------------------------------------------------- #
# shapes
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("case,reject", [
    pytest.param(case, reject, id=f"{case.id}-{reject.id}") for case in CASES for reject in case.rejects])
def test_layer_case_rejects(case, reject):
    """Each registry row's bad inputs (rank, channels, output size <= 0, constructor arguments, a
    fixed draw of the wrong shape) fail with the row's message, exact."""
    with pytest.raises(reject.error, match=esc(reject.message)):
        reject.call(case.make())


def test_a_batch_of_zero_samples_gives_empty_outputs_as_in_pytorch():
    """PyTorch's Conv2d maps a (0, C, H, W) batch to an empty (0, O, Ho, Wo) output; ours raised
    ZeroDivisionError.  Backward gives an empty dL/dx and zero parameter gradients (overwritten)."""
    gpucnn.seed(0)
    conv = L.Conv2D(2, 3, 3, stride=2, padding=1)
    y = conv.forward(np.zeros((0, 2, 7, 6), np.float32))
    assert y.shape == (0, 3, 4, 3) and y.dtype == np.float32
    for g in conv.grads.values():
        g[...] = 5
    dx = conv.backward(np.zeros(y.shape, np.float32))
    assert dx.shape == (0, 2, 7, 6)
    assert all(not g.any() for g in conv.grads.values())
    model = models.build("lenet5")      # conv + relu + pool fused, then flatten and dense layers
    y = model.forward(np.zeros((0, 1, 28, 28), np.float32))
    assert y.shape == (0, 10)
    assert model.backward(np.zeros((0, 10), np.float32)).shape == (0, 1, 28, 28)
    assert all(not g.any() for g in model.gradients())


def test_backward_dy_shape_mismatch_is_named():
    conv = L.Conv2D(1, 2, 3, dtype=F64)
    conv.forward(np.zeros((1, 1, 5, 5)))
    with pytest.raises(ValueError, match=esc("Conv2D.backward: dy has shape (1, 2, 2, 2), expected (1, 2, 3, 3)")):
        conv.backward(np.zeros((1, 2, 2, 2)))


# --------------------------------------------------------------------------- #
# losses
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("labels,pattern", [
    pytest.param(np.array([0, 3]), esc("label 3 out of range [0, 3) for 3 classes"), id="too-big"),
    pytest.param(np.array([-1, 0]), esc("label -1 out of range [0, 3) for 3 classes"), id="negative"),
])
def test_labels_out_of_range(labels, pattern):
    with pytest.raises(ValueError, match=pattern):
        losses.SoftmaxCrossEntropy().forward(np.zeros((2, 3)), labels)


@pytest.mark.parametrize("labels", [
    pytest.param(np.array([0.0, 1.0]), id="float"), pytest.param(np.array([True, False]), id="bool"),
])
def test_labels_not_integer(labels):
    with pytest.raises(TypeError, match=f"labels must be integers, got dtype {labels.dtype}"):
        losses.SoftmaxCrossEntropy().forward(np.zeros((2, 3)), labels)


def test_float_labels_are_refused_not_truncated():
    """A Dataset with labels 7.5 trained on 7 (astype(int64) truncated them); now the first bad value is named."""
    from gpucnn.data import Dataset, load_arrays

    images = np.zeros((3, 28, 28), np.uint8)
    y = np.array([1.0, 2.0, 7.5, 8.25])[:3]
    with pytest.raises(TypeError, match=esc("train_labels must be integer class indices, got dtype float64: "
                                            "train_labels[2] = 7.5 is not a whole number")):
        Dataset("mnist", [str(i) for i in range(10)], images, y, images, np.arange(3))
    with pytest.raises(TypeError, match=esc("test_labels must be integer class indices, got dtype float64 (whole "
                                            "numbers: convert them explicitly, test_labels.astype(np.int64))")):
        Dataset("mnist", [str(i) for i in range(10)], images, np.arange(3), images, np.array([1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match=esc("train_labels has label -1; labels are class indices >= 0")):
        Dataset("mnist", [str(i) for i in range(10)], images, np.array([0, -1, 2]), images, np.arange(3))
    with pytest.raises(TypeError, match=esc("one_hot: labels must be integer class indices, got dtype float64: "
                                            "labels[1] = 7.5 is not a whole number")):
        losses.one_hot(np.array([1.0, 7.5]), 10)
    ds = Dataset("mnist", [str(i) for i in range(10)], images, np.array([1, 2, 7], np.uint8), images, np.arange(3))
    assert load_arrays(data=ds)[1].tolist() == [1, 2, 7]


def test_labels_wrong_rank():
    with pytest.raises(ValueError, match=esc("labels must have shape (N,), got shape (2, 1)")):
        losses.SoftmaxCrossEntropy().forward(np.zeros((2, 3)), np.zeros((2, 1), np.int64))


def test_logits_labels_batch_mismatch():
    with pytest.raises(ValueError, match=esc("batch mismatch: logits have N=3 rows (shape (3, 4)), labels have 2")):
        losses.SoftmaxCrossEntropy().forward(np.zeros((3, 4)), np.array([0, 1]))


def test_mse_shape_and_dtype_mismatch():
    with pytest.raises(ValueError, match=esc("MSE: pred has shape (2, 3) but target has shape (2, 4)")):
        losses.MSE().forward(np.zeros((2, 3)), np.zeros((2, 4)))
    with pytest.raises(TypeError, match="MSE: pred is float64 but target is float32"):
        losses.MSE().forward(np.zeros((2, 3)), np.zeros((2, 3), np.float32))


# --------------------------------------------------------------------------- #
# NumPy / CuPy mixing, through a stub CuPy module
# --------------------------------------------------------------------------- #


class FakeCupyArray:
    """Looks enough like a cupy.ndarray for gpucnn's argument checks."""

    def __init__(self, shape, dtype=np.float32):
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.ndim = len(self.shape)
        self.size = int(np.prod(self.shape))


@pytest.fixture
def fake_cupy(monkeypatch):
    """Install a stub ``cupy`` whose ``ndarray`` is :class:`FakeCupyArray`.

    Used even where real CuPy is installed: the checks must fire before any
    device work, so a stub exercises exactly them, on any machine.
    """
    stub = types.ModuleType("cupy")
    stub.ndarray = FakeCupyArray
    monkeypatch.setattr(backend, "cupy", stub)
    return stub


def test_fake_cupy_is_recognized(fake_cupy):
    assert backend.device_of(FakeCupyArray((2,))) == "cuda"
    assert backend.device_of(np.zeros(2)) == "cpu"


@pytest.mark.parametrize("case", layer_params(where=lambda c: c.make().params))
def test_device_mismatch_input_vs_parameters(case, fake_cupy):
    """Every layer holding parameters (Conv2D, Dense, PReLU) names both devices."""
    layer = case.make()
    with pytest.raises(DeviceMismatchError, match=esc(f"x on cuda, {type(layer).__name__} parameters on cpu")):
        layer.forward(FakeCupyArray(case.shapes[0], layer.dtype))


def test_device_mismatch_loss_arguments(fake_cupy):
    with pytest.raises(DeviceMismatchError, match=esc("logits on cpu, labels on cuda")):
        losses.SoftmaxCrossEntropy().forward(np.zeros((2, 3), np.float32), FakeCupyArray((2,), np.int64))
    with pytest.raises(DeviceMismatchError, match=esc("pred on cpu, target on cuda")):
        losses.MSE().forward(np.zeros((2, 3), np.float32), FakeCupyArray((2, 3)))


def test_device_mismatch_rrelu_slopes(fake_cupy):
    with pytest.raises(DeviceMismatchError, match=esc("x on cpu, slopes on cuda")):
        L.RReLU().forward(np.zeros((2, 3), np.float32), slopes=FakeCupyArray((2, 3)))


def test_device_mismatch_backward_dy(fake_cupy):
    relu = L.ReLU()
    relu.forward(np.ones((2, 3), np.float32))
    with pytest.raises(DeviceMismatchError, match=esc("dy on cuda, saved on cpu")):
        relu.backward(FakeCupyArray((2, 3)))


def test_get_array_module_names_every_argument(fake_cupy):
    with pytest.raises(DeviceMismatchError, match=esc("arg0 on cpu, arg1 on cuda, weights on cpu")):
        backend.get_array_module(np.zeros(1), FakeCupyArray((1,)), weights=np.zeros(1))
    assert isinstance(DeviceMismatchError("x"), TypeError)


def test_to_device_cuda_without_cupy(monkeypatch):
    monkeypatch.setattr(backend, "cupy", None)
    with pytest.raises(RuntimeError, match=esc("device='cuda' needs CuPy")):
        models.build("zhang2016", device="cuda")
    with pytest.raises(RuntimeError, match=esc("device='cuda' needs CuPy")):
        backend.to_device(np.zeros(2), "cuda")
    with pytest.raises(ValueError, match=esc("device must be one of ('cpu', 'cuda'), got device='tpu'")):
        backend.to_device(np.zeros(2), "tpu")


@pytest.mark.parametrize("case", layer_params())
def test_non_array_input(case):
    layer = case.make()
    with pytest.raises(TypeError, match=esc(f"{type(layer).__name__}: x must be a numpy or cupy ndarray, got list")):
        layer.forward(case.x(case.shapes[0]).tolist())


# --------------------------------------------------------------------------- #
# dtypes
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("dtype", [pytest.param(np.float16, id="float16"), pytest.param(np.int32, id="int32"),
                                   pytest.param(np.int64, id="int64")])
@pytest.mark.parametrize("case", layer_params())
def test_unsupported_input_dtype(case, dtype):
    layer = case.make()
    msg = f"{type(layer).__name__}: x has dtype {np.dtype(dtype)}; supported dtypes are float32 and float64"
    with pytest.raises(TypeError, match=esc(msg)):
        layer.forward(np.ones(case.shapes[0], dtype=dtype))


def test_unsupported_loss_dtype():
    with pytest.raises(TypeError, match="logits has dtype float16"):
        losses.SoftmaxCrossEntropy().forward(np.zeros((2, 3), np.float16), np.array([0, 1]))
    with pytest.raises(TypeError, match="pred has dtype int64"):
        losses.MSE().forward(np.zeros((2, 3), np.int64), np.zeros((2, 3), np.int64))


@pytest.mark.parametrize("case", layer_params(where=lambda c: c.make().params))
def test_param_dtype_mismatch_is_not_cast(case):
    layer = case.make()  # float64 parameters
    name, x = type(layer).__name__, case.x(case.shapes[0])
    with pytest.raises(TypeError, match=f"{name}: x has dtype float32 but the layer's parameters are float64"):
        layer.forward(x.astype(np.float32))
    layer.astype(np.float32)
    with pytest.raises(TypeError, match=f"{name}: x has dtype float64 but the layer's parameters are float32"):
        layer.forward(x)


def test_unsupported_parameter_dtype():
    with pytest.raises(TypeError, match="parameter dtype must be float32 or float64, got dtype=float16"):
        L.Conv2D(1, 1, 3, dtype=np.float16)
    with pytest.raises(TypeError, match="dtype must be float32 or float64, got dtype=int32"):
        L.Dense(2, 2).astype(np.int32)


# --------------------------------------------------------------------------- #
# backward before forward
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("case", layer_params())
def test_backward_before_forward(case):
    """A layer names itself; a Sequential names the stage and its index (see the test after the next)."""
    layer = case.make()
    name = re.escape(type(layer).__name__) if type(layer) is not L.Sequential else r"[\w+]+"
    with pytest.raises(RuntimeError, match=name + r"\.backward called before forward"):
        layer.backward(np.zeros((1, 2), layer.dtype or np.float64))


def test_loss_backward_before_forward():
    with pytest.raises(RuntimeError, match="SoftmaxCrossEntropy.backward called before forward"):
        losses.SoftmaxCrossEntropy().backward()
    with pytest.raises(RuntimeError, match="MSE.backward called before forward"):
        losses.MSE().backward()


def test_model_backward_before_forward_names_the_last_layer():
    model = models.build("zhang2016")
    with pytest.raises(RuntimeError, match=r"Dense\+Sigmoid\.backward called before forward \(layer 7 "):
        model.backward(np.zeros((1, 10), np.float32))


# --------------------------------------------------------------------------- #
# strict load_state_dict
# --------------------------------------------------------------------------- #


def small_net():
    gpucnn.seed(0)
    return L.Sequential(L.Conv2D(1, 2, 3), L.ReLU(), L.Flatten(), L.Dense(8, 3))


def test_load_state_dict_missing_key():
    net = small_net()
    state = net.state_dict()
    del state["3.b"]
    with pytest.raises(ValueError, match=esc("missing keys: ['3.b']")):
        net.load_state_dict(state)


def test_load_state_dict_unexpected_key():
    net = small_net()
    state = net.state_dict()
    state["7.W"] = np.zeros(3, np.float32)
    with pytest.raises(ValueError, match=esc("unexpected keys: ['7.W']")):
        net.load_state_dict(state)


def test_load_state_dict_shape_and_dtype_mismatch():
    net = small_net()
    state = net.state_dict()
    state["0.W"] = np.zeros((2, 1, 5, 5), np.float32)
    with pytest.raises(ValueError, match=esc("0.W: shape (2, 1, 5, 5) in state, (2, 1, 3, 3) in model")):
        net.load_state_dict(state)
    state = net.state_dict()
    state["3.W"] = state["3.W"].astype(np.float64)
    with pytest.raises(ValueError, match=esc("3.W: dtype float64 in state, float32 in model")):
        net.load_state_dict(state)


def test_load_state_dict_lists_every_problem_and_loads_nothing():
    net = small_net()
    before = net.state_dict()
    state = {k: v + 1 for k, v in before.items()}
    del state["0.b"]
    state["extra"] = np.zeros(1, np.float32)
    state["3.W"] = np.zeros((3, 9), np.float32)
    with pytest.raises(ValueError) as info:
        net.load_state_dict(state)
    msg = str(info.value)
    assert "missing keys: ['0.b']" in msg
    assert "unexpected keys: ['extra']" in msg
    assert "3.W: shape (3, 9) in state, (3, 8) in model" in msg
    for k, v in net.state_dict().items():  # nothing was loaded
        np.testing.assert_array_equal(v, before[k])


def test_load_state_dict_non_strict_loads_what_matches():
    net = small_net()
    state = {"0.W": np.ones((2, 1, 3, 3), np.float32), "extra": np.zeros(1)}
    net.load_state_dict(state, strict=False)
    np.testing.assert_array_equal(net[0].params["W"], 1.0)


# --------------------------------------------------------------------------- #
# names
# --------------------------------------------------------------------------- #


def test_unknown_model_name():
    with pytest.raises(ValueError, match=r"unknown model 'lenet6'; known models: lenet5, seed001"):
        models.build("lenet6")
    with pytest.raises(ValueError, match="unknown model 'nope'"):
        models.make_loss("nope")


def test_unknown_initializer():
    with pytest.raises(ValueError, match=r"unknown initializer 'kaiming'; known: \[.*'he_uniform'"):
        L.Conv2D(1, 1, 3, weight_init="kaiming")
    with pytest.raises(ValueError, match="unknown initializer 'zeros'"):
        L.Dense(2, 2, weight_init="zeros")


def test_initializer_callable_with_wrong_shape():
    with pytest.raises(ValueError, match=esc("initializer returned (2, 2) float32, expected (3, 2) float32")):
        L.Dense(2, 3, weight_init=lambda shape, fi, fo, dt: np.zeros((2, 2), dt))


def test_bad_seed():
    with pytest.raises(ValueError, match="seed must be a non-negative int, got seed=-1"):
        gpucnn.seed(-1)
    with pytest.raises(ValueError, match="seed must be a non-negative int, got seed=1.5"):
        gpucnn.seed(1.5)


# --------------------------------------------------------------------------- #
# optimizer hyper-parameters
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("make,pattern", [
    pytest.param(lambda p: optim.SGD(p, lr=0), esc("lr must be > 0, got lr=0"), id="sgd-lr0"),
    pytest.param(lambda p: optim.SGD(p, lr=-0.1), esc("lr must be > 0, got lr=-0.1"), id="sgd-lr-neg"),
    pytest.param(lambda p: optim.SGD(p, lr=float("nan")), esc("lr must be > 0, got lr=nan"), id="sgd-lr-nan"),
    pytest.param(lambda p: optim.SGD(p, momentum=1.0), esc("momentum must be in [0, 1), got momentum=1.0"),
                 id="sgd-momentum1"),
    pytest.param(lambda p: optim.SGD(p, momentum=-0.5), esc("momentum must be in [0, 1), got momentum=-0.5"),
                 id="sgd-momentum-neg"),
    pytest.param(lambda p: optim.SGD(p, nesterov=True), esc("nesterov=True needs momentum > 0"), id="sgd-nesterov"),
    pytest.param(lambda p: optim.SGD(p, weight_decay=-1e-4), esc("weight_decay must be >= 0, got weight_decay=-0.0001"),
                 id="sgd-wd-neg"),
    pytest.param(lambda p: optim.Adam(p, lr=0.0), esc("lr must be > 0, got lr=0.0"), id="adam-lr0"),
    pytest.param(lambda p: optim.Adam(p, betas=(1.0, 0.999)), esc("betas must be in [0, 1), got betas=(1.0, 0.999)"),
                 id="adam-beta1"),
    pytest.param(lambda p: optim.Adam(p, betas=(0.9, -0.1)), esc("betas must be in [0, 1), got betas=(0.9, -0.1)"),
                 id="adam-beta2-neg"),
    pytest.param(lambda p: optim.Adam(p, eps=0), esc("eps must be > 0, got eps=0"), id="adam-eps0"),
    pytest.param(lambda p: optim.Adam(p, weight_decay=-1), esc("weight_decay must be >= 0, got weight_decay=-1"),
                 id="adam-wd-neg"),
])
def test_bad_optimizer_hyperparameters(make, pattern):
    with pytest.raises(ValueError, match=pattern):
        make(small_net())


def test_optimizer_without_parameters():
    with pytest.raises(ValueError, match="optimizer got no parameters"):
        optim.SGD(L.Sequential(L.ReLU(), L.Flatten()))


def test_optimizer_state_of_other_type():
    net = small_net()
    with pytest.raises(ValueError, match="optimizer state is for 'SGD', this is Adam"):
        optim.Adam(net).load_state_dict(optim.SGD(net).state_dict())


# --------------------------------------------------------------------------- #
# opt-in anomaly detection
# --------------------------------------------------------------------------- #


def test_detect_anomaly_names_first_bad_layer_forward():
    gpucnn.seed(3)
    model = models.build("lenet5", dtype=F64)
    model[9].params["W"][0, 0] = np.inf  # Dense(120, 84) is layer 9
    x = np.random.default_rng(0).uniform(0, 1, (2, 1, 28, 28))
    before = debug.is_enabled()
    with debug.detect_anomaly(), np.errstate(invalid="ignore", over="ignore"):
        with pytest.raises(debug.NonFiniteError, match=esc("layer 9 (Dense) forward produced non-finite values")):
            model.forward(x)
    assert debug.is_enabled() == before  # restored after the block


def test_detect_anomaly_names_first_bad_layer_backward():
    gpucnn.seed(4)
    model = L.Sequential(L.Dense(3, 4, dtype=F64), L.Sigmoid(), L.Dense(4, 2, dtype=F64))
    model.forward(np.ones((2, 3)))
    model[2].params["W"][1, 1] = np.nan  # poisoned after the forward
    with debug.detect_anomaly():
        with pytest.raises(debug.NonFiniteError, match=esc("layer 2 (Dense) backward produced non-finite values")):
            model.backward(np.ones((2, 2)))


def test_detect_anomaly_checks_the_input():
    model = L.Sequential(L.ReLU())
    x = np.array([[1.0, np.nan]])
    with debug.detect_anomaly():
        msg = "Sequential input produced non-finite values (1 NaN, 0 Inf of 2)"
        with pytest.raises(debug.NonFiniteError, match=esc(msg)):
            model.forward(x)


def test_anomaly_detection_and_nvtx_are_off_by_default_in_a_fresh_process():
    """A new interpreter, without GPUCNN_DEBUG / GPUCNN_NVTX: both off; with them set: both on."""
    import os
    import subprocess
    import sys

    probe = "import gpucnn; print(gpucnn.debug.is_enabled(), gpucnn.nvtx.is_enabled())"
    env = {k: v for k, v in os.environ.items() if k not in ("GPUCNN_DEBUG", "GPUCNN_NVTX")}
    off = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
    assert off.stdout.split() == ["False", "False"]
    on = subprocess.run([sys.executable, "-c", probe], env=dict(env, GPUCNN_DEBUG="1", GPUCNN_NVTX="1"),
                        capture_output=True, text=True, check=True)
    assert on.stdout.split() == ["True", "True"]


def test_anomaly_detection_off_lets_non_finite_values_through(monkeypatch):
    monkeypatch.setattr(debug, "_enabled", False)
    gpucnn.seed(3)
    model = L.Sequential(L.Dense(2, 2, dtype=F64))
    model[0].params["W"][0, 0] = np.inf
    y = model.forward(np.ones((1, 2)))  # no check, no error
    assert not np.isfinite(y).all()


# ---------------------------------------------------------------------------
# Found in review: nothing is cast, wrapped or clamped silently
# ---------------------------------------------------------------------------

def test_negative_label_is_an_error_on_numpy_even_without_check_labels():
    z = np.zeros((2, 3), np.float32)
    with pytest.raises(ValueError, match=esc("label -1 out of range [0, 3)")):
        losses.SoftmaxCrossEntropy(check_labels=False).forward(z, np.array([-1, 0]))


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id) for c in CASES])
def test_backward_rejects_dy_of_another_dtype(case):
    layer = case.make().astype(np.float32)
    shape = case.shapes[0]
    fixed = {k: v.astype(np.float32) for k, v in case.forward_kwargs(shape).items()}
    y = layer.forward(case.x(shape).astype(np.float32), **fixed)
    with pytest.raises(TypeError, match="dy has dtype float64 but forward ran in float32"):
        layer.backward(np.ones(y.shape, np.float64))


def _sgd_with_state():
    gpucnn.seed(0)
    model = L.Sequential(L.Flatten(), L.Dense(4, 2))
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    model.forward(np.ones((3, 4), np.float32))
    model.backward(np.ones((3, 2), np.float32))
    opt.step()
    return model, opt


def test_optimizer_state_with_unknown_slot_is_refused():
    model, opt = _sgd_with_state()
    state = opt.state_dict()
    state["slots"]["1.W/bogus"] = state["slots"].pop("1.W/momentum")
    with pytest.raises(ValueError, match="SGD has no slot 'bogus'"):
        optim.SGD(model, lr=0.1, momentum=0.9).load_state_dict(state)


def test_optimizer_state_with_bad_hyperparameters_is_refused():
    model, opt = _sgd_with_state()
    state = opt.state_dict()
    state["hyper"]["momentum"] = 7
    with pytest.raises(ValueError, match=esc("momentum must be in [0, 1), got momentum=7")):
        optim.SGD(model, lr=0.1, momentum=0.9).load_state_dict(state)


def test_optimizer_state_of_another_dtype_is_refused_not_cast():
    model, opt = _sgd_with_state()
    state = opt.state_dict()
    state["slots"]["1.W/momentum"] = state["slots"]["1.W/momentum"].astype(np.float64)
    with pytest.raises(TypeError, match="dtype float64 != parameter dtype float32"):
        optim.SGD(model, lr=0.1, momentum=0.9).load_state_dict(state)


def test_optimizer_notices_a_model_converted_after_it_was_created():
    model, opt = _sgd_with_state()
    model.astype(np.float64)
    model.forward(np.ones((3, 4), np.float64))
    model.backward(np.ones((3, 2), np.float64))
    with pytest.raises(RuntimeError, match=r"SGD: parameter 1\.W was replaced \(layer.to\(\), layer.astype\(\)"):
        opt.step()


@pytest.mark.parametrize("kernel", [pytest.param(4, id="global-window"), pytest.param(2, id="2x2")])
def test_maxpool_forward_never_modifies_its_input(kernel):
    x = np.random.default_rng(0).permutation(16).reshape(1, 1, 4, 4).astype(np.float32)
    before = x.copy()
    L.MaxPool2D(kernel).forward(x)
    np.testing.assert_array_equal(x, before)


@pytest.mark.cudasim
def test_a_batch_of_zero_samples_on_the_kernel_path():
    """The same on the CUDA path (the stand-in for CuPy, the kernels on the emulator): on an H200
    the dense kernel's wrapper refused the (400, 0) input of lenet5's first dense layer."""
    from backends import emulator_builder, skip_without_emulator
    from gpucnn.bench import standin

    from helpers import check_lenet5_on_a_batch_of_zero

    skip_without_emulator()
    with standin.installed(standin.Recorder(), builder=emulator_builder) as cp:
        check_lenet5_on_a_batch_of_zero(cp, standin.DeviceArray)

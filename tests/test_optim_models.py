"""Optimizers against torch.optim, optimizer/model state round trips, the named
models (shapes, parameter counts, seeding, train/eval), and a training sanity run.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpucnn
from gpucnn import layers as L
from gpucnn import losses, models, optim
from helpers import to_numpy, to_torch

torch = pytest.importorskip("torch")

F64 = np.float64


# --------------------------------------------------------------------------- #
# optimizers vs torch.optim
# --------------------------------------------------------------------------- #


def tiny_net(seed=0, dtype=F64):
    gpucnn.seed(seed)
    return L.Sequential(L.Conv2D(1, 2, 3, dtype=dtype), L.ReLU(), L.Flatten(), L.Dense(8, 3, dtype=dtype))


def fake_grads(net, step, seed=0):
    """Deterministic per-step gradients, the same for gpucnn and torch."""
    rng = np.random.default_rng((seed, step))
    return {name: rng.standard_normal(layer.params[k].shape) for name, layer, k in net.named_parameters()}


def set_grads(net, grads):
    for name, layer, k in net.named_parameters():
        layer.grads[k][...] = grads[name]


OPT_CASES = [
    pytest.param(optim.SGD, torch.optim.SGD, dict(lr=0.1), id="sgd-plain"),
    pytest.param(optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9), id="sgd-momentum"),
    pytest.param(optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.9, nesterov=True), id="sgd-nesterov"),
    pytest.param(optim.SGD, torch.optim.SGD, dict(lr=0.1, weight_decay=0.01), id="sgd-weight-decay"),
    pytest.param(optim.SGD, torch.optim.SGD, dict(lr=0.05, momentum=0.8, nesterov=True, weight_decay=0.05),
                 id="sgd-nesterov-weight-decay"),
    pytest.param(optim.Adam, torch.optim.Adam, dict(lr=0.01), id="adam"),
    pytest.param(optim.Adam, torch.optim.Adam, dict(lr=0.02, betas=(0.8, 0.99), eps=1e-6), id="adam-betas-eps"),
    pytest.param(optim.Adam, torch.optim.Adam, dict(lr=0.01, weight_decay=0.1), id="adam-weight-decay"),
]


@pytest.mark.parametrize("ours,theirs,kwargs", OPT_CASES)
def test_optimizer_matches_torch(ours, theirs, kwargs):
    net = tiny_net()
    tparams = {name: to_torch(layer.params[k], requires_grad=True) for name, layer, k in net.named_parameters()}
    opt = ours(net, **kwargs)
    topt = theirs(list(tparams.values()), **kwargs)
    for step in range(6):
        if step == 4:  # lr is a plain attribute that schedules assign between steps
            opt.lr = kwargs["lr"] / 2
            for group in topt.param_groups:
                group["lr"] = kwargs["lr"] / 2
        g = fake_grads(net, step)
        set_grads(net, g)
        for name, t in tparams.items():
            t.grad = to_torch(g[name])
        opt.step()
        topt.step()
        for name, layer, k in net.named_parameters():
            np.testing.assert_allclose(layer.params[k], to_numpy(tparams[name]), rtol=1e-10, atol=1e-12,
                                       err_msg=f"step {step}, parameter {name}")
    assert opt.step_count == 6


@pytest.mark.parametrize("make", [
    pytest.param(lambda n: optim.SGD(n, lr=0.05, momentum=0.9, nesterov=True, weight_decay=0.01), id="sgd-nesterov"),
    pytest.param(lambda n: optim.Adam(n, lr=0.01, betas=(0.8, 0.95), weight_decay=0.01), id="adam"),
])
def test_optimizer_state_dict_round_trip_continues_identically(make):
    net_a = tiny_net(seed=1)
    opt_a = make(net_a)
    for step in range(3):
        set_grads(net_a, fake_grads(net_a, step))
        opt_a.step()
    model_state, opt_state = net_a.state_dict(), opt_a.state_dict()
    assert opt_state["step_count"] == 3

    net_b = tiny_net(seed=2)  # different weights, fresh optimizer with other hypers
    opt_b = optim.SGD(net_b, lr=1.0) if isinstance(opt_a, optim.SGD) else optim.Adam(net_b, lr=1.0)
    net_b.load_state_dict(model_state)
    opt_b.load_state_dict(opt_state)
    assert opt_b.hyper() == opt_a.hyper()

    for step in range(3, 6):
        g = fake_grads(net_a, step)
        set_grads(net_a, g)
        set_grads(net_b, g)
        opt_a.step()
        opt_b.step()
    for (name, la, k), (_, lb, _) in zip(net_a.named_parameters(), net_b.named_parameters()):
        np.testing.assert_array_equal(la.params[k], lb.params[k], err_msg=name)


def test_optimizer_state_dict_is_a_copy():
    net = tiny_net()
    opt = optim.SGD(net, lr=0.1, momentum=0.9)
    set_grads(net, fake_grads(net, 0))
    opt.step()
    state = opt.state_dict()
    saved = {k: v.copy() for k, v in state["slots"].items()}
    opt.step()
    for k, v in state["slots"].items():
        np.testing.assert_array_equal(v, saved[k])


def test_sgd_is_seed001_update_rule():
    # w <- w - eta dL/dw, checked on a single Dense layer with hand numbers
    dense = L.Dense(2, 1, dtype=F64)
    dense.params["W"][...] = [[1.0, -2.0]]
    dense.params["b"][...] = [0.5]
    dense.grads["W"][...] = [[0.5, 1.0]]
    dense.grads["b"][...] = [-1.0]
    optim.SGD(L.Sequential(dense), lr=0.1).step()
    np.testing.assert_allclose(dense.params["W"], [[0.95, -2.1]], rtol=1e-15)
    np.testing.assert_allclose(dense.params["b"], [0.6], rtol=1e-15)


# --------------------------------------------------------------------------- #
# named models
# --------------------------------------------------------------------------- #

# Parameter counts by hand: conv O*C*kh*kw + O, dense out*in + out.
#   lenet5:     conv1 6*1*25+6 = 156; conv2 16*6*25+16 = 2416; 28 -pad2-> 28 -pool-> 14 -conv5-> 10
#               -pool-> 5: flatten 16*5*5 = 400; dense 400*120+120 = 48120; 120*84+84 = 10164;
#               84*10+10 = 850.  Total 156+2416+48120+10164+850 = 61706
#   seed001:    156; 2416; 28 -conv5-> 24 -pool-> 12 -conv5-> 8 -pool-> 4: flatten 16*4*4 = 256;
#               256*100+100 = 25700; 100*10+10 = 1010.  Total 156+2416+25700+1010 = 29282
#   zhang2016:  156; conv2 12*6*25+12 = 1812; flatten 12*4*4 = 192; 192*10+10 = 1930.
#               Total 156+1812+1930 = 3898
#   seed002_c1: 156; 28 -conv5-> 24 -pool-> 12: flatten 6*12*12 = 864; 864*10+10 = 8650.
#               Total 156+8650 = 8806
#   seed002_c2: same layer sizes as zhang2016 (max pool instead of mean pool, no output sigmoid):
#               156+1812+1930 = 3898
#   resnet_mini: no conv biases (a BatchNorm follows each), BN(C) = 2C.  stem 16*1*9 = 144 + BN 32;
#               block 16->32 s2: 32*16*9 = 4608, 32*32*9 = 9216, 1x1 projection 32*16 = 512, three
#               BN(32) = 192: 14528; block 32->64 s2: 18432 + 36864 + 2048 + 3*128 = 57728;
#               block 64->64 (identity): 2*36864 + 2*128 = 73984; dense 64*10+10 = 650.
#               Total 144+32+14528+57728+73984+650 = 147066
PARAM_COUNTS = {
    "lenet5": 61706,
    "seed001": 29282,
    "zhang2016": 3898,
    "seed002_c1": 8806,
    "seed002_c2": 3898,
    "resnet_mini": 147066,
    # resnet_cifar: stem 64*1*9 + BN 128; blocks 64->64 (2 convs + 2 BN), 64->128 and 128->256 with
    # 1x1 projections + BN; dense 256*10 + 10
    "resnet_cifar": 1226442,
}
LOSS_NAMES = {
    "lenet5": "softmax_cross_entropy", "seed001": "softmax_cross_entropy", "zhang2016": "mse",
    "seed002_c1": "softmax_cross_entropy", "seed002_c2": "softmax_cross_entropy",
    "resnet_mini": "softmax_cross_entropy", "resnet_cifar": "softmax_cross_entropy",
}
MODEL_IDS = [pytest.param(n, id=n) for n in models.MODELS]


def test_models_list_is_documented():
    """The README's model list and the table in gpucnn/models.py name exactly the built models."""
    import pathlib
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    line = re.search(r"`gc\.models\.build\(name\)`:(.*?)\n\n", readme, re.S)
    assert line, "README.md lost its `gc.models.build(name)`: list"
    in_readme = set(re.findall(r"`(\w+)`", line.group(1)))
    borders = [i for i, ln in enumerate(models.__doc__.splitlines()) if ln.startswith("=====")]
    rows = models.__doc__.splitlines()[borders[1] + 1:borders[2]]   # between the header and the end
    in_docstring = {ln.split()[0] for ln in rows if ln and not ln[0].isspace()}
    assert in_readme == set(models.MODELS), f"README lists {sorted(in_readme)}"
    assert in_docstring == set(models.MODELS), f"models.py's table lists {sorted(in_docstring)}"
    assert set(PARAM_COUNTS) == set(models.MODELS)


@pytest.mark.parametrize("name", MODEL_IDS)
@pytest.mark.parametrize("dtype", [pytest.param(np.float32, id="f32"), pytest.param(F64, id="f64")])
def test_model_builds_with_documented_shape_and_size(name, dtype):
    gpucnn.seed(0)
    model = models.build(name, dtype=dtype)
    assert model.name == name
    assert model.num_parameters() == PARAM_COUNTS[name]
    assert model.dtype == dtype
    x = np.random.default_rng(0).uniform(0, 1, (3, 1, 28, 28)).astype(dtype)
    y = model.forward(x)
    assert y.shape == (3, 10) and y.dtype == dtype
    assert models.loss_name(name) == LOSS_NAMES[name]
    loss = models.make_loss(name)
    assert type(loss) is losses.LOSSES[LOSS_NAMES[name]]
    dx = model.backward(np.ones_like(y))
    assert dx.shape == x.shape and dx.dtype == dtype


@pytest.mark.parametrize("name", MODEL_IDS)
def test_seed_gives_identical_weights(name):
    gpucnn.seed(123)
    a = models.build(name).state_dict()
    gpucnn.seed(123)
    b = models.build(name).state_dict()
    gpucnn.seed(124)
    c = models.build(name).state_dict()
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    assert any(not np.array_equal(a[k], c[k]) for k in a if k.endswith("W"))


def test_seed_gives_identical_rrelu_draws():
    x = -np.ones((4, 5))
    gpucnn.seed(7)
    y1 = L.RReLU().forward(x)
    y1b = L.RReLU().forward(x)
    gpucnn.seed(7)
    y2 = L.RReLU().forward(x)
    y2b = L.RReLU().forward(x)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y1b, y2b)
    assert not np.array_equal(y1, y1b)  # successive draws differ


def test_train_eval_propagate():
    inner = L.Sequential(L.RReLU(), L.Dense(3, 3))
    model = L.Sequential(L.Dense(3, 3), inner, L.RReLU())
    all_layers = [model, model[0], inner, inner[0], inner[1], model[2]]
    assert all(layer.training for layer in all_layers)
    assert model.eval() is model
    assert not any(layer.training for layer in all_layers)
    model.train()
    assert all(layer.training for layer in all_layers)
    model.train(False)
    assert not any(layer.training for layer in all_layers)
    # eval RReLU is deterministic: slope (lower + upper) / 2
    y = model[2].forward(-np.ones((2, 3), np.float32))
    np.testing.assert_allclose(y, -(1 / 8 + 1 / 3) / 2, rtol=1e-6)


@pytest.mark.parametrize("name", MODEL_IDS)
def test_state_dict_round_trip(name):
    gpucnn.seed(1)
    a = models.build(name)
    gpucnn.seed(2)
    b = models.build(name)
    opt = optim.SGD(b, lr=0.1)          # moves b's parameters into its flat buffer (views)
    arrays_before = b.parameters()
    state = a.state_dict()
    assert all(isinstance(v, np.ndarray) for v in state.values())
    b.load_state_dict(state)
    # loaded in place: the arrays (and an optimizer holding them) are unchanged objects
    assert all(p is q for p, q in zip(arrays_before, b.parameters()))
    x = np.random.default_rng(3).uniform(0, 1, (2, 1, 28, 28)).astype(np.float32)
    a.eval(), b.eval()               # eval mode: BatchNorm's running statistics stay as loaded
    np.testing.assert_allclose(b.forward(x), a.forward(x), rtol=1e-6, atol=1e-7)
    # the state dict is a copy: stepping b does not change it or a
    b.backward(np.ones((2, 10), np.float32))
    opt.step()
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(v, state[k])


def test_backward_without_input_grad_gives_same_parameter_gradients():
    gpucnn.seed(5)
    model = models.build("lenet5", dtype=F64)
    rng = np.random.default_rng(6)
    x = rng.uniform(0, 1, (2, 1, 28, 28))
    dy = rng.standard_normal((2, 10))
    model.forward(x)
    dx = model.backward(dy)
    assert dx.shape == x.shape
    full = [g.copy() for g in model.gradients()]
    model.forward(x)
    assert model.backward(dy, input_grad=False) is None
    assert model[0].input_grad is True and model.input_grad is True  # the flags are left alone
    for name, g0, g1 in zip(model.state_dict(), full, model.gradients()):
        np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-14, err_msg=name)


def test_gradients_are_overwritten_not_accumulated():
    gpucnn.seed(8)
    model = models.build("zhang2016", dtype=F64)
    x = np.random.default_rng(9).uniform(0, 1, (2, 1, 28, 28))
    dy = np.ones((2, 10))
    model.forward(x)
    model.backward(dy)
    first = [g.copy() for g in model.gradients()]
    model.forward(x)
    model.backward(dy)
    for g0, g1 in zip(first, model.gradients()):
        np.testing.assert_allclose(g1, g0, rtol=1e-12, atol=1e-15)


# --------------------------------------------------------------------------- #
# the NumPy path trains
# --------------------------------------------------------------------------- #


def bars(n, rng, size=6):
    """Horizontal bar (class 0) or vertical bar (class 1) at a random position, plus noise."""
    x = 0.1 * rng.standard_normal((n, 1, size, size)).astype(np.float32)
    y = rng.integers(0, 2, n)
    pos = rng.integers(0, size, n)
    for i in range(n):
        if y[i] == 0:
            x[i, 0, pos[i], :] += 1
        else:
            x[i, 0, :, pos[i]] += 1
    return x, y


@pytest.mark.parametrize("make_opt", [
    pytest.param(lambda m: optim.SGD(m, lr=0.05, momentum=0.9), id="sgd-momentum"),
    pytest.param(lambda m: optim.Adam(m, lr=0.01), id="adam"),
])
def test_numpy_path_trains_on_separable_problem(make_opt):
    gpucnn.seed(0)
    rng = np.random.default_rng(0)
    model = L.Sequential(L.Conv2D(1, 4, 3), L.ReLU(), L.MaxPool2D(2), L.Flatten(), L.Dense(16, 2))
    loss = losses.SoftmaxCrossEntropy()
    opt = make_opt(model)
    x_test, y_test = bars(256, rng)
    initial = float(loss.forward(model.forward(x_test), y_test))
    for _ in range(300):
        x, y = bars(32, rng)
        loss.forward(model.forward(x), y)
        model.backward(loss.backward(), input_grad=False)
        opt.step()
    logits = model.forward(x_test)
    final = float(loss.forward(logits, y_test))
    accuracy = float((logits.argmax(axis=1) == y_test).mean())
    assert final < 0.2 * initial, (initial, final)
    assert accuracy > 0.95, accuracy


@pytest.mark.parametrize("name", MODEL_IDS)
def test_fused_network_equals_the_layers_run_one_by_one(name):
    """Sequential fuses conv/dense with the activation (and pooling) after them; anomaly
    detection turns fusion off.  Both give the same bits on finite inputs."""
    from gpucnn import debug

    def run(fused):
        gpucnn.seed(4)
        model = models.build(name, dtype=F64)
        x = np.random.default_rng(5).standard_normal((3, 1, 28, 28))
        x[:, :, ::4] = 0                                  # exact zeros: relu'(0) = 1/2 paths
        y = model.forward(x) if fused else _unfused(model.forward, x)
        dx = model.backward(np.random.default_rng(6).standard_normal(y.shape)) if fused else \
            _unfused(model.backward, np.random.default_rng(6).standard_normal(y.shape))
        return y, dx, [g.copy() for g in model.gradients()]

    def _unfused(fn, *args):
        with debug.detect_anomaly():
            return fn(*args)

    (y1, dx1, g1), (y2, dx2, g2) = run(True), run(False)
    assert y1.tobytes() == y2.tobytes() and dx1.tobytes() == dx2.tobytes()
    assert all(a.tobytes() == b.tobytes() for a, b in zip(g1, g2))

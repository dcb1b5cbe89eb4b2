"""Whole networks on the kernel backends against the NumPy path.

On ``cudasim`` the layers' kernel path runs on NumPy arrays through the
emulator (the dispatch seam patched, tests/backends.py); on ``cupy`` it runs
on a GPU.  Either way the very code a GPU run executes -- the argument order
of every functional op, what forward keeps for backward, the first layer's
skipped input gradient -- is compared, output, input gradient and every
parameter gradient, with the plain NumPy path.  A meta-test plants a bug in
the dispatch (a dropped padding argument) and checks that the comparison
catches it.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

import gpucnn as gc
from backends import KERNEL_BACKENDS, backend_fixture
from gpucnn import losses, models, optim
from gpucnn.cuda import conv as kconv
from gpucnn.cuda import loader
from gpucnn.functional import _dispatch
from gpucnn.layers import AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, Sigmoid
from layer_cases import params as layer_params

backend = backend_fixture(KERNEL_BACKENDS)


def _small_net(dtype=np.float64):
    gc.seed(3)
    return Sequential(
        Conv2D(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dtype=dtype), ReLU(),
        MaxPool2D(3, stride=2),               # overlapping windows
        Conv2D(3, 2, 2, padding=1, dtype=dtype), Sigmoid(),
        AvgPool2D(2),
        Flatten(), Dense(2, 4, dtype=dtype),  # (2, 9, 6) -> (3, 5, 5) -> (3, 2, 2) -> (2, 3, 3) -> (2, 1, 1)
    )


def _run(net, loss, x, target, input_grad=True):
    value = loss.forward(net.forward(x), target)
    dx = net.backward(loss.backward(), input_grad=input_grad)
    return value, dx, {name: lay.grads[k] for name, lay, k in net.named_parameters()}


def _on_numpy(fn):
    """Run ``fn()`` with the dispatch seam forced to the NumPy path (the reference)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(_dispatch, "use_kernels", lambda *a: False)
        return fn()


def _assert_same(got, want, backend, rtol, atol, what):
    value, dx, grads = got
    rvalue, rdx, rgrads = want
    np.testing.assert_allclose(float(value), float(rvalue), rtol=rtol, err_msg=f"{what} loss")
    if rdx is None:
        assert dx is None
    else:
        np.testing.assert_allclose(backend.get(dx), rdx, rtol=rtol, atol=atol, err_msg=f"{what} dL/dx")
    assert grads.keys() == rgrads.keys()
    for name in rgrads:
        np.testing.assert_allclose(backend.get(grads[name]), rgrads[name], rtol=rtol, atol=atol,
                                   err_msg=f"{what} grad {name}")


def _compare_small_net(backend):
    rng = np.random.default_rng(0)
    x, labels = rng.standard_normal((2, 2, 9, 6)), np.array([1, 3])
    want = _on_numpy(lambda: _run(_small_net(), losses.SoftmaxCrossEntropy(), x, labels))
    net = _small_net().to("cuda") if backend.name == "cupy" else _small_net()
    got = _run(net, losses.SoftmaxCrossEntropy(), backend.put(x), backend.put(labels))
    _assert_same(got, want, backend, 1e-10, 1e-12, "small net")


def test_small_network_matches_numpy(backend):
    _compare_small_net(backend)


class _Counting:
    """Module builder wrapper that records every kernel launched."""

    def __init__(self, inner):
        self.inner, self.launched = inner, []

    def __call__(self, code, name, options):
        module, launched = self.inner(code, name, options), self.launched

        class Module:
            def get_function(self, kernel):
                fn = module.get_function(kernel)

                def call(*args, **kwargs):
                    launched.append(kernel)
                    return fn(*args, **kwargs)
                return call
        return Module()


def test_every_kernel_of_the_network_is_launched(backend):
    counting = _Counting(loader.get_module_builder())
    with loader.use_module_builder(counting):
        _compare_small_net(backend)
    for name in ("conv_forward_f64", "conv_backward_input_f64", "conv_backward_weight_partial_f64",
                 "conv_backward_weight_reduce_f64", "pool_max_forward_f64", "pool_max_backward_f64",
                 "act_backward_f64", "dense_forward_f64", "dense_backward_f64"):
        assert name in counting.launched, f"{name} was not launched: a layer did not take its kernel path"


def test_first_layer_skips_the_input_gradient_kernel(backend):
    net = _small_net().to("cuda") if backend.name == "cupy" else _small_net()
    loss = losses.SoftmaxCrossEntropy()
    loss.forward(net.forward(backend.put(np.random.default_rng(1).standard_normal((1, 2, 9, 6)))),
                 backend.put(np.array([2])))
    counting = _Counting(loader.get_module_builder())
    with loader.use_module_builder(counting):
        assert net.backward(loss.backward(), input_grad=False) is None
    assert counting.launched.count("conv_backward_input_f64") == 1   # the second conv's only


@pytest.mark.parametrize("backend", KERNEL_BACKENDS[:1], indirect=True)
def test_comparison_catches_a_dropped_padding_argument(backend, monkeypatch):
    """Mutation check: the network comparison above fails when the dispatch drops padding."""
    real = kconv.conv_forward

    def planted(x, W, b, stride, padding, act=None, **kw):
        y, z = real(x, W, b, stride, (0, 0), act=act)
        shape = (W.shape[0],) + tuple((s + 2 * p - k) // st + 1
                                      for s, p, k, st in zip(x.shape[1:3], padding, W.shape[2:], stride)) + x.shape[3:]
        out = np.zeros(shape, y.dtype)
        h, w = min(y.shape[1], out.shape[1]), min(y.shape[2], out.shape[2])
        out[:, :h, :w] = y[:, :h, :w]       # right shape, wrong values: only values can catch it
        return out, (None if z is None else out.copy())

    monkeypatch.setattr(kconv, "conv_forward", planted)
    with pytest.raises(AssertionError):
        _compare_small_net(backend)


# --------------------------------------------------------------------------- #
# Every row of the layer registry (tests/layer_cases.py), alone
# --------------------------------------------------------------------------- #
def _pass(layer, x, fixed, put=np.asarray):
    """Forward + backward of ``layer`` on ``put(x)``: (y, dL/dx, parameter gradients, buffers after)."""
    y = layer.forward(put(x), **{k: put(v) for k, v in fixed.items()})
    dx = layer.backward(put(np.random.default_rng(7).standard_normal(tuple(y.shape))))
    return (y, dx, {n: o.grads[k] for n, o, k in layer.named_parameters()},
            {n: o.buffers[k] for n, o, k in layer.named_buffers()})


@pytest.mark.parametrize("case", layer_params())
def test_layer_case_matches_numpy(case, backend):
    """Output, dL/dx, parameter gradients and buffers of each row's layer on the kernel path (its own
    kernels where it has them) equal the NumPy path's, on every input shape of the row."""
    for shape in case.shapes:
        x, fixed = case.x(shape, seed=5), case.forward_kwargs(shape, seed=5)
        want = _on_numpy(lambda: _pass(case.make(), x, fixed))
        layer = case.make()
        if backend.name == "cupy":
            layer.to("cuda")
        got = _pass(layer, x, fixed, backend.put)
        what = f"{case.id} {shape}"
        for name, g, w in (("y", got[0], want[0]), ("dx", got[1], want[1])):
            np.testing.assert_allclose(backend.get(g), w, rtol=1e-10, atol=1e-12, err_msg=f"{what} {name}")
        for part in (2, 3):
            assert got[part].keys() == want[part].keys()
            for name in want[part]:
                np.testing.assert_allclose(backend.get(got[part][name]), want[part][name], rtol=1e-10, atol=1e-12,
                                           err_msg=f"{what} {name}")


# --------------------------------------------------------------------------- #
# The seed networks, and a few optimizer steps (float64 tight; float32 looser, see STEP_TOL)
# --------------------------------------------------------------------------- #
def _twins(name, backend, dtype, seed=0):
    gc.seed(seed)
    ref = models.build(name, dtype=dtype)
    net = copy.deepcopy(ref)
    if backend.name == "cupy":
        net.to("cuda")
    return ref, net


@pytest.mark.parametrize("backend", KERNEL_BACKENDS[1:], indirect=True)   # 30-70 s each on the emulator
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("name", ["lenet5", "zhang2016", "seed002_c2"])
def test_seed_network_matches_numpy(name, dtype, backend):
    ref, net = _twins(name, backend, dtype)
    rng = np.random.default_rng(14)
    x = rng.standard_normal((2, 1, 28, 28)).astype(dtype)
    labels = rng.integers(0, 10, 2)
    target = losses.one_hot(labels, 10, dtype) if models.loss_name(name) == "mse" else labels
    want = _on_numpy(lambda: _run(ref, models.make_loss(name), x, target))
    got = _run(net, models.make_loss(name), backend.put(x), backend.put(target))
    rtol, atol = (1e-10, 1e-12) if dtype == np.float64 else (1e-4, 1e-5)
    _assert_same(got, want, backend, rtol, atol, name)


# After 3 SGD steps.  float32 is looser: a pre-activation within float32 rounding of 0 (or a
# max-pool near-tie) can take the other branch on one device, which moves single weights by
# ~lr * |dy * x| (rare, ~1e-4) without anything being wrong.
STEP_TOL = {np.float32: (1e-4, 1e-3, 2e-4), np.float64: (1e-10, 1e-9, 1e-10)}


def _sgd_steps(ref, net, backend, batches, dtype):
    loss_rtol, prtol, patol = STEP_TOL[dtype]

    def train(model, put):
        opt = optim.SGD(model, lr=0.05, momentum=0.9)
        trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(), opt, batch_size=len(batches[0][1]))
        return [float(trainer.step(put(x), put(y))[0]) for x, y in batches]

    want = _on_numpy(lambda: train(ref, np.asarray))
    got = train(net, backend.put)
    np.testing.assert_allclose(got, want, rtol=loss_rtol)
    for name, value in ref.state_dict().items():
        np.testing.assert_allclose(net.state_dict()[name], value, rtol=prtol, atol=patol, err_msg=name)


def test_training_steps_match_numpy(backend):
    """The loss curve of a few Trainer steps (forward, loss, backward, SGD momentum) through the
    kernel path equals the NumPy path's, and so do the weights after them."""
    ref = _small_net()
    net = copy.deepcopy(ref).to("cuda") if backend.name == "cupy" else copy.deepcopy(ref)
    rng = np.random.default_rng(4)
    batches = [(rng.standard_normal((3, 2, 9, 6)), rng.integers(0, 4, 3)) for _ in range(5)]
    _sgd_steps(ref, net, backend, batches, np.float64)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS[1:], indirect=True)
@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_lenet5_sgd_steps_match_numpy(dtype, backend):
    ref, net = _twins("lenet5", backend, dtype, seed=3)
    batches = [(np.random.default_rng(15 + s).standard_normal((32, 1, 28, 28)).astype(dtype),
                np.random.default_rng(25 + s).integers(0, 10, 32)) for s in range(3)]
    _sgd_steps(ref, net, backend, batches, dtype)


@pytest.mark.parametrize("augment", [None, {"seed": 3, "fill": -0.5, "flip": True}], ids=["plain", "augmented"])
@pytest.mark.parametrize("make_opt", [lambda m: optim.SGD(m, lr=0.05, momentum=0.9, nesterov=True, weight_decay=1e-3),
                                      lambda m: optim.Adam(m, lr=0.01, weight_decay=1e-3)], ids=["sgd", "adam"])
def test_epoch_of_steps_matches_numpy(backend, make_opt, augment, monkeypatch):
    """Trainer.run_steps as `gpucnn train` runs it: batches gathered from the dataset by the
    gather kernel (with augmentation: the fused shift-and-mirror gather, reading each step's
    key from the per-epoch table), a learning-rate schedule read by the optimizer kernels from
    the per-epoch hyper table, a last batch of another size; losses, counts and weights equal
    the NumPy path's."""
    from gpucnn.cuda import loader

    rng = np.random.default_rng(6)
    x = rng.standard_normal((23, 2, 9, 6))
    y = rng.integers(0, 4, 23)
    order = rng.permutation(23)
    launched = []
    real_launch = loader.launch
    monkeypatch.setattr(loader, "launch", lambda kernel, *a, **k: (launched.append(kernel), real_launch(kernel, *a, **k)))

    def run(model, put):
        # sync_every=1 on both: a GPU trainer otherwise reads the loss back every 50 steps (once
        # here), the NumPy one every step, and the per-sync rows below would differ in number
        trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(check_labels=False), make_opt(model),
                                   batch_size=5, schedule=lambda epoch, step: 0.05 / (1 + step), augment=augment,
                                   sync_every=1)
        seen = []
        stats = trainer.run_steps(put(x), put(y), put(order), 0, range(5), 5,
                                  on_sync=lambda st, n: seen.append((st.loss_sum, st.correct, st.seen)))
        return seen, stats.lr_last, model.state_dict(), trainer.optimizer.step_count

    ref = _small_net()
    net = copy.deepcopy(ref).to("cuda") if backend.name == "cupy" else copy.deepcopy(ref)
    want = _on_numpy(lambda: run(ref, np.asarray))
    got = run(net, backend.put)
    gathers = [k for k in launched if k.startswith("gather_batch")]
    assert gathers == ["gather_batch" + ("_augment" if augment else "") + "_f64"] * 5
    assert [s[1:] for s in got[0]] == [s[1:] for s in want[0]]            # correct counts, examples seen
    np.testing.assert_allclose([s[0] for s in got[0]], [s[0] for s in want[0]], rtol=1e-10)
    assert got[1] == want[1] == 0.05 / 5 and got[3] == want[3] == 5
    for name, value in want[2].items():
        np.testing.assert_allclose(got[2][name], value, rtol=1e-9, atol=1e-10, err_msg=name)


def test_optimizer_kernel_path_is_taken(backend, monkeypatch):
    """On the kernel backends SGD and Adam update through kernels/optim.cu, not the NumPy arithmetic."""
    from gpucnn.cuda import optim as koptim

    calls = []
    for name in ("sgd_update", "adam_update"):
        real = getattr(koptim, name)
        monkeypatch.setattr(koptim, name, lambda *a, _real=real, _n=name, **k: calls.append(_n) or _real(*a, **k))
    for make in (lambda m: optim.SGD(m, lr=0.1, momentum=0.5), lambda m: optim.Adam(m, lr=0.1)):
        net = _small_net()
        make(net.to("cuda") if backend.name == "cupy" else net).step()
    assert calls == ["sgd_update", "adam_update"]


@pytest.mark.parametrize("augment", [None, {"seed": 3, "fill": 0.0, "flip": True, "max_shift": 1}],
                         ids=["plain", "augmented"])
def test_uint8_dataset_trains_as_the_float_one_bit_for_bit(backend, augment, monkeypatch):
    """A uint8 training set with Trainer(normalize=(mean, std)) -- on the kernel backends gathered,
    augmented and normalised per channel by gather_batch_augment_u8 -- trains exactly as the float32
    set normalised up front (gc.data.normalize) does."""
    rng = np.random.default_rng(8)
    raw = rng.integers(0, 256, (23, 2, 9, 6), dtype=np.uint8)
    y = rng.integers(0, 4, 23)
    order = rng.permutation(23)
    mean, std = (0.3, 0.6), (0.2, 0.25)
    launched = []
    real_launch = loader.launch
    monkeypatch.setattr(loader, "launch", lambda kernel, *a, **k: (launched.append(kernel), real_launch(kernel, *a, **k)))

    def run(x, normalize):
        net = _small_net(np.float32)
        net = net.to("cuda") if backend.name == "cupy" else net
        trainer = gc.train.Trainer(net, losses.SoftmaxCrossEntropy(check_labels=False), optim.SGD(net, lr=0.05),
                                   batch_size=5, augment=augment, normalize=normalize, sync_every=1)
        seen = []
        trainer.run_steps(backend.put(x), backend.put(y), backend.put(order), 0, range(5), 5,
                          on_sync=lambda st, n: seen.append((st.loss_sum, st.correct)))
        return seen, {k: np.asarray(backend.get(v)) for k, v in net.state_dict().items()}

    floats = gc.data.normalize(raw, mean=mean, std=std)
    want = run(floats, None)
    launched.clear()
    got = run(raw, (mean, std))
    assert got[0] == want[0]
    for name, value in want[1].items():
        np.testing.assert_array_equal(got[1][name], value, err_msg=name)
    if backend.name != "numpy":
        assert [k for k in launched if k.startswith("gather")] == ["gather_batch_augment_u8"] * 5

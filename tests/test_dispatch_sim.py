"""The layers' CuPy branches, exercised without a GPU.

On CuPy arrays Conv2D, MaxPool2D and SoftmaxCrossEntropy call the CUDA
kernels through gpucnn.cuda.ops.  Here ``gpucnn.backend.is_cupy`` is patched
to say "yes" for NumPy arrays and the loader builds modules with the CPU
emulator (tests/cudasim), so the very code the layers run on a GPU (argument
order, shapes, strides, what forward keeps for backward) runs against the
real kernels, and a whole network's forward and backward is compared with the
plain NumPy path.  float64 keeps the comparison tight.
"""
from __future__ import annotations

import shutil

import numpy as np
import pytest

import gpucnn as gc
from gpucnn import backend
from gpucnn.cuda import loader
from gpucnn.layers import AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D, ReLU, Sequential, Sigmoid
from kernel_backends import CUDASIM_ERROR, cudasim

pytestmark = pytest.mark.cudasim


def _net():
    gc.seed(3)
    return Sequential(
        Conv2D(2, 3, (3, 2), stride=(2, 1), padding=(1, 0), dtype=np.float64), ReLU(),
        MaxPool2D(3, stride=2),               # overlapping windows
        Conv2D(3, 2, 2, padding=1, dtype=np.float64), Sigmoid(),
        AvgPool2D(2),
        Flatten(), Dense(2, 4, dtype=np.float64),     # (2, 9, 6) -> (3, 5, 5) -> (3, 2, 2) -> (2, 3, 3) -> (2, 1, 1)
    )


def _run(net, x, labels):
    loss = gc.losses.SoftmaxCrossEntropy()
    value = loss.forward(net.forward(x), labels)
    dx = net.backward(loss.backward())
    return float(value), dx, {name: lay.grads[k].copy() for name, lay, k in net.named_parameters()}


@pytest.fixture
def kernels(monkeypatch):
    """Route the layers' CuPy branches to the emulator; count the kernels launched."""
    if cudasim is None:
        pytest.skip(CUDASIM_ERROR)
    if shutil.which("g++") is None:
        pytest.skip("cudasim needs g++")
    launched = []

    def build(code, name, options):
        module = cudasim.load_module(code=code, name=name, options=options)

        class Counting:
            def get_function(self, kernel):
                fn = module.get_function(kernel)

                def call(*args, **kwargs):
                    launched.append(kernel)
                    return fn(*args, **kwargs)
                return call
        return Counting()

    monkeypatch.setattr(backend, "is_cupy", lambda a: isinstance(a, np.ndarray))
    with loader.use_module_builder(build):
        yield launched


def test_network_on_the_kernel_path_matches_numpy(kernels):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 2, 9, 6))
    labels = np.array([1, 3])

    with pytest.MonkeyPatch.context() as mp:  # the plain NumPy path for the reference
        mp.setattr(backend, "is_cupy", lambda a: False)
        expected = _run(_net(), x, labels)
    assert kernels == []
    got = _run(_net(), x, labels)

    for name in ("conv2d_forward_f64", "conv2d_backward_input_f64", "conv2d_backward_weight_f64",
                 "conv2d_backward_bias_f64", "maxpool2d_forward_f64", "maxpool2d_backward_f64",
                 "softmax_xent_forward_f64", "softmax_xent_backward_f64"):
        assert name in kernels, f"{name} was not launched: the layer did not take its CuPy branch"
    assert got[0] == pytest.approx(expected[0], rel=1e-12)
    np.testing.assert_allclose(got[1], expected[1], rtol=1e-10, atol=1e-12)
    assert got[2].keys() == expected[2].keys()
    for name in expected[2]:
        np.testing.assert_allclose(got[2][name], expected[2][name], rtol=1e-10, atol=1e-12, err_msg=name)


def test_first_layer_skips_the_input_gradient_kernel(kernels):
    net = _net()
    loss = gc.losses.SoftmaxCrossEntropy()
    loss.forward(net.forward(np.random.default_rng(1).standard_normal((1, 2, 9, 6))), np.array([2]))
    del kernels[:]
    assert net.backward(loss.backward(), input_grad=False) is None
    # the second conv still needs dL/dx, the first must not launch it
    assert kernels.count("conv2d_backward_input_f64") == 1

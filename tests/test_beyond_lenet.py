"""BatchNorm, Dropout, global average pooling and residual blocks: gradients, PyTorch parity, state.

* float64 gradient checks of every new layer (both BatchNorm modes, batch 2
  and larger, affine on and off; Dropout with a fixed mask; Residual with and
  without a projection shortcut);
* PyTorch float64 parity of outputs, input gradients, parameter gradients and
  the running statistics after several steps;
* buffers: in state dicts and checkpoints, out of the optimizer, moved with the model;
* Dropout's masks from the counter stream: seeded, resumable, shaped by p.
"""
from __future__ import annotations

import numpy as np
import pytest

import gpucnn as gc
from gpucnn import checkpoint as ck
from gpucnn import layers as L
from gpucnn import optim, random as grandom
from gpucnn.layers.residual import basic_block
from gpucnn.testing import check_backward

F64 = np.float64


def randn(shape, seed):
    return np.random.default_rng(seed).standard_normal(shape)


def _bn(cls, C, affine, seed=0):
    bn = cls(C, affine=affine, dtype=F64)
    if affine:
        rng = np.random.default_rng(seed)
        bn.params["gamma"][...] = rng.uniform(0.5, 2.0, C)
        bn.params["beta"][...] = rng.standard_normal(C)
    return bn


# --------------------------------------------------------------------------- #
# gradient checks
# --------------------------------------------------------------------------- #
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
@pytest.mark.parametrize("shape", [(2, 3, 4, 5), (6, 2, 3, 3), (2, 3, 1, 1)], ids=["batch2", "batch6", "1x1-planes"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_2d_gradients(shape, affine, training):
    bn = _bn(L.BatchNorm2d, shape[1], affine)
    if not training:
        bn.buffers["running_mean"][...] = randn(shape[1], 7)
        bn.buffers["running_var"][...] = np.random.default_rng(8).uniform(0.5, 2.0, shape[1])
        bn.eval()
    check_backward(bn, randn(shape, 11))


@pytest.mark.parametrize("shape", [(2, 4), (5, 3), (3, 2, 6)], ids=["NC-batch2", "NC-batch5", "NCL"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_batch_norm_1d_gradients(shape, training):
    bn = _bn(L.BatchNorm1d, shape[1], True)
    bn.train(training)
    check_backward(bn, randn(shape, 12))


def test_dropout_gradient_with_a_fixed_mask():
    drop = L.Dropout(0.4)
    x = randn((3, 2, 4, 4), 1)
    mask = (np.random.default_rng(2).uniform(size=x.shape) > 0.4).astype(F64)
    forward = lambda v: drop.forward(v, mask=mask)  # noqa: E731
    check_backward(drop, x, forward=forward)
    y = forward(x)
    np.testing.assert_allclose(y, x * mask / 0.6)


def test_global_avg_pool_gradient():
    check_backward(L.GlobalAvgPool2D(), randn((3, 4, 5, 2), 3))


@pytest.mark.parametrize("stride,cin,cout", [(1, 3, 3), (2, 3, 4), (1, 2, 5)], ids=["identity", "projection-s2",
                                                                                    "projection-channels"])
def test_residual_block_gradients(stride, cin, cout):
    gc.seed(4)
    block = basic_block(cin, cout, stride, dtype=F64)
    assert (block.shortcut is None) == (stride == 1 and cin == cout)
    net = L.Sequential(block, L.ReLU())
    check_backward(net, randn((2, cin, 6, 6), 5), max_elements=300, n_directions=12)


def test_residual_with_a_custom_block_and_identity():
    gc.seed(5)
    res = L.Residual(L.Sequential(L.Conv2D(2, 2, 3, padding=1, dtype=F64), L.Tanh()))
    check_backward(res, randn((2, 2, 5, 5), 6))
    with pytest.raises(ValueError, match="the block gives shape .* but the shortcut"):
        L.Residual(L.Conv2D(2, 3, 3, padding=1, dtype=F64)).forward(randn((1, 2, 5, 5), 0))


# --------------------------------------------------------------------------- #
# PyTorch parity (float64): outputs, gradients, running statistics after several steps
# --------------------------------------------------------------------------- #
def _torch():
    return pytest.importorskip("torch")


def _torch_bn(torch, bn, dims):
    cls = torch.nn.BatchNorm2d if dims == 2 else torch.nn.BatchNorm1d
    t = cls(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, dtype=torch.float64)
    if bn.affine:
        with torch.no_grad():
            t.weight.copy_(torch.from_numpy(bn.params["gamma"]))
            t.bias.copy_(torch.from_numpy(bn.params["beta"]))
    return t


@pytest.mark.parametrize("dims,shape", [(2, (4, 3, 5, 5)), (1, (7, 4)), (1, (3, 4, 6))], ids=["2d", "1d-NC", "1d-NCL"])
@pytest.mark.parametrize("affine", [True, False], ids=["affine", "plain"])
def test_batch_norm_matches_torch_over_several_steps(dims, shape, affine):
    torch = _torch()
    bn = _bn(L.BatchNorm2d if dims == 2 else L.BatchNorm1d, shape[1], affine, seed=3)
    t = _torch_bn(torch, bn, dims)
    for step in range(4):
        x, dy = randn(shape, 20 + step), randn(shape, 40 + step)
        tx = torch.from_numpy(x.copy()).requires_grad_(True)
        ty = t(tx)
        ty.backward(torch.from_numpy(dy))
        y = bn.forward(x)
        dx = bn.backward(dy)
        np.testing.assert_allclose(y, ty.detach().numpy(), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=1e-9, atol=1e-11)
        if affine:
            np.testing.assert_allclose(bn.grads["gamma"], t.weight.grad.numpy(), rtol=1e-10, atol=1e-12)
            np.testing.assert_allclose(bn.grads["beta"], t.bias.grad.numpy(), rtol=1e-10, atol=1e-12)
            t.weight.grad = t.bias.grad = None
        np.testing.assert_allclose(bn.buffers["running_mean"], t.running_mean.numpy(), rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(bn.buffers["running_var"], t.running_var.numpy(), rtol=1e-12, atol=1e-14)
        assert int(bn.buffers["num_batches_tracked"]) == int(t.num_batches_tracked) == step + 1
    bn.eval()
    t.eval()
    x = randn(shape, 99)
    np.testing.assert_allclose(bn.forward(x), t(torch.from_numpy(x)).detach().numpy(), rtol=1e-10, atol=1e-12)


def test_residual_network_matches_torch():
    """A residual net with BN in float64: the same output, input gradient and parameter gradients."""
    torch = _torch()
    nn = torch.nn
    gc.seed(6)
    net = L.Sequential(L.Conv2D(1, 4, 3, padding=1, bias=False, dtype=F64), L.BatchNorm2d(4, dtype=F64), L.ReLU(),
                       basic_block(4, 8, 2, dtype=F64), L.ReLU(), L.GlobalAvgPool2D(), L.Dense(8, 3, dtype=F64))

    class TorchResidual(nn.Module):
        def __init__(self, block, shortcut):
            super().__init__()
            self.block, self.shortcut = block, shortcut

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    class TorchGAP(nn.Module):
        def forward(self, x):
            return x.mean(dim=(2, 3))

    def conv(c):
        return nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, c.stride, c.padding, bias="b" in c.params,
                         dtype=torch.float64)

    def bn(b):
        return nn.BatchNorm2d(b.num_features, dtype=torch.float64)

    res = net[3]
    twin = nn.Sequential(conv(net[0]), bn(net[1]), nn.ReLU(),
                         TorchResidual(nn.Sequential(conv(res.block[0]), bn(res.block[1]), nn.ReLU(),
                                                     conv(res.block[3]), bn(res.block[4])),
                                       nn.Sequential(conv(res.shortcut[0]), bn(res.shortcut[1]))),
                         nn.ReLU(), TorchGAP(), nn.Linear(8, 3, dtype=torch.float64))
    from gpucnn.export import torch_state_dict

    twin.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in torch_state_dict(net).items()}, strict=True)
    x, dy = randn((5, 1, 8, 8), 1), randn((5, 3), 2)
    tx = torch.from_numpy(x.copy()).requires_grad_(True)
    ty = twin(tx)
    ty.backward(torch.from_numpy(dy))
    np.testing.assert_allclose(net.forward(x), ty.detach().numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(net.backward(dy), tx.grad.numpy(), rtol=1e-9, atol=1e-11)
    from gpucnn.export.safetensors import _slots

    tgrads = {k: p.grad.numpy() for k, p in twin.named_parameters()}
    checked = 0
    for torch_name, (store, key) in _slots(net).items():     # the exporter's name for each of our tensors
        for name, layer, k in net.named_parameters():
            if layer.params is store and k == key:
                np.testing.assert_allclose(layer.grads[k], tgrads[torch_name], rtol=1e-9, atol=1e-11,
                                           err_msg=f"{name} ~ {torch_name}")
                checked += 1
    assert checked == len(tgrads) == len(net.named_parameters())


# --------------------------------------------------------------------------- #
# buffers and state
# --------------------------------------------------------------------------- #
def test_buffers_are_saved_and_restored_but_not_trained(tmp_path):
    gc.seed(0)
    model = gc.models.build("resnet_mini")
    opt = optim.SGD(model, lr=0.1, momentum=0.9)
    names = {n for n, _, _ in opt.params}
    buffers = [n for n, _, _ in model.named_buffers()]
    assert buffers and not names & set(buffers)              # kept out of the optimizer
    x = np.random.default_rng(0).standard_normal((8, 1, 28, 28)).astype(np.float32)
    loss = gc.losses.SoftmaxCrossEntropy()
    loss.forward(model.forward(x), np.arange(8) % 10)
    model.backward(loss.backward())
    opt.step()
    state = model.state_dict()
    assert all(n in state for n in buffers) and int(state["0.block.1.num_batches_tracked"] if
                                                    "0.block.1.num_batches_tracked" in state else 1) >= 0
    ck.save_checkpoint(tmp_path / "c.npz", model, opt, model_name="resnet_mini", epoch=1)
    again, _ = ck.restore_model(tmp_path / "c.npz")
    for name, value in state.items():
        assert again.state_dict()[name].tobytes() == value.tobytes(), name


def test_a_lenet5_checkpoint_still_loads(tmp_path):
    gc.seed(1)
    model = gc.models.build("lenet5")
    ck.save_checkpoint(tmp_path / "l.npz", model, None, model_name="lenet5")
    again, _ = ck.restore_model(tmp_path / "l.npz")
    assert again.named_buffers() == [] and again.state_dict().keys() == model.state_dict().keys()


def test_state_dict_is_strict_about_buffers():
    gc.seed(2)
    a = L.Sequential(L.Conv2D(1, 2, 3), L.BatchNorm2d(2))
    state = a.state_dict()
    del state["1.running_var"]
    with pytest.raises(ValueError, match=r"missing keys: \['1.running_var'\]"):
        L.Sequential(L.Conv2D(1, 2, 3), L.BatchNorm2d(2)).load_state_dict(state)


# --------------------------------------------------------------------------- #
# Dropout's randomness
# --------------------------------------------------------------------------- #
def test_dropout_masks_are_seeded_resumable_and_of_rate_p():
    x = np.ones((200, 50), np.float32)

    def draw():
        return L.Dropout(0.3).forward(x)

    gc.seed(7)
    a = draw()
    state = grandom.get_state()
    b = draw()
    grandom.set_state(state)
    assert draw().tobytes() == b.tobytes()                   # a checkpoint's rng resumes the stream
    gc.seed(7)
    assert draw().tobytes() == a.tobytes()
    assert not np.array_equal(a, b)
    kept = (a != 0).mean()
    assert abs(kept - 0.7) < 0.02 and np.allclose(a[a != 0], 1 / 0.7)
    d = L.Dropout(0.3).eval()
    assert d.forward(x).tobytes() == x.tobytes()             # identity in eval mode


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="p must be in \\[0, 1\\), got p=1.0"):
        L.Dropout(1.0)
    with pytest.raises(ValueError, match="momentum must be in \\[0, 1\\], got momentum=1.5"):
        L.BatchNorm2d(3, momentum=1.5)
    with pytest.raises(ValueError, match="BatchNorm2d: x has 2 channels .* num_features=3"):
        L.BatchNorm2d(3).forward(np.zeros((2, 2, 4, 4), np.float32))
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        L.BatchNorm1d(3).forward(np.zeros((1, 3), np.float32))
    with pytest.raises(TypeError, match="block is int"):
        L.Residual(3)


def test_nested_repr_is_indented_by_depth():
    text = repr(gc.models.build("resnet_mini"))
    lines = text.splitlines()
    assert lines[0] == "Sequential(" and lines[-1] == ")"
    assert "  (3) Residual(" in lines
    assert "    block=Sequential(" in lines and "    shortcut=Sequential(" in lines
    assert any(line.startswith("      (0) Conv2D(16, 32, kernel_size=(3, 3), stride=(2, 2)") for line in lines)
    assert "  )" in lines                                  # the Residual closes at its own depth

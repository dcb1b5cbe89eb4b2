"""Whole-train-step, per-layer and per-kernel timings, gpucnn against PyTorch."""
from __future__ import annotations

import numpy as np

from .. import backend, layers, losses, models, optim
from .._utils import shown_shape
from ..functional.layout import from_internal, to_internal
from ..layers.base import run_forward
from ..random import seed
from ..train import Trainer
from .twin import torch_step, torch_twin

__all__ = ["StepPair", "step_pair", "check_step", "layer_rows", "kernel_rows"]


class StepPair:
    """gpucnn's train step (through :class:`~gpucnn.train.Trainer`) and its PyTorch twin on one batch."""

    def __init__(self, name, batch, device, torch, lr=0.01, momentum=0.9):
        seed(0)
        self.model = models.build(name, device=device)
        loss = models.make_loss(name)
        if isinstance(loss, losses.SoftmaxCrossEntropy):
            loss.check_labels = False  # no host sync inside the timed step
        self.trainer = Trainer(self.model, loss, optim.SGD(self.model, lr=lr, momentum=momentum), batch_size=batch,
                               cuda_graph=False)
        rng = np.random.default_rng(0)
        x_np = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
        y_np = rng.integers(0, 10, batch).astype(np.int64)
        self.x, self.y = backend.to_device(x_np, device), backend.to_device(y_np, device)
        self.torch = None
        if torch is not None:
            self.torch = torch_step(self.model, models.loss_name(name), x_np, y_np, device, torch, lr, momentum)

    def gpucnn(self):
        return self.trainer.step(self.x, self.y)[0]

    def steps(self, k: int, cuda_graph: bool):
        """``k`` train steps the way ``gpucnn train`` runs them (:meth:`Trainer.run_steps` over a
        dataset of this one batch; ``cuda_graph``: replayed as a CUDA graph once captured and checked).
        Returns a function running them; time it and divide by ``k``."""
        model = self.model
        trainer = Trainer(model, self.trainer.loss, self.trainer.optimizer, batch_size=self.x.shape[0],
                          sync_every=k, cuda_graph=cuda_graph)
        xp = backend.get_array_module(self.x)
        order = xp.arange(self.x.shape[0], dtype=xp.int64)
        orders = [order] * k        # every step the same batch (what the single-step figure times too)
        full = xp.concatenate(orders)

        def run():
            trainer.run_steps(self.x, self.y, full, 0, range(k), k)
        run.trainer = trainer
        return run


def step_pair(name, batch, device, torch, lr=0.01, momentum=0.9) -> StepPair:
    return StepPair(name, batch, device, torch, lr, momentum)


def check_step(pair: StepPair):
    """Correctness before timing: the first losses of both steps agree."""
    a = float(pair.gpucnn())
    if pair.torch is None:
        return a, None
    b = float(pair.torch().detach())
    if not np.isclose(a, b, rtol=1e-3, atol=1e-4):
        raise RuntimeError(f"gpucnn and PyTorch disagree on the first loss: {a} vs {b}")
    return a, b


def layer_rows(name, batch, device, torch, timer, ttimer):
    """Forward and backward of every stage of the model, as the Sequential runs it.

    Each stage (a layer, or a convolution / dense layer with the activation
    and pooling fused into it, :mod:`gpucnn.layers.fusion`) is timed on its real
    batch-last input; the PyTorch row is the same layers as one
    ``nn.Sequential`` on the NCHW tensor.
    """
    seed(0)
    model = models.build(name, device=device)
    rng = np.random.default_rng(1)
    x = backend.to_device(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), device)
    tdev = "cuda" if device == "cuda" else "cpu"
    twin = torch_twin(model, torch, tdev) if torch is not None else None
    x_bl = to_internal(x)
    rows = []
    for stage in model.stages():
        y = stage.forward(x_bl)
        dy = backend.to_device(rng.standard_normal(y.shape).astype(np.float32), device)
        label = f"{stage.start}:{stage.name}{shown_shape(x_bl, True)[1:]}"
        fwd = timer(lambda: stage.forward(x_bl))
        stage.forward(x_bl)
        bwd = timer(lambda: stage.backward(dy, True))
        tf = tb = None
        if twin is not None:
            tl = torch.nn.Sequential(*list(twin)[stage.start:stage.start + len(stage.layers)])
            tx = torch.from_numpy(backend.asnumpy(from_internal(x_bl))).to(tdev).requires_grad_(True)
            tdy = torch.from_numpy(backend.asnumpy(from_internal(dy))).to(tdev)
            with torch.no_grad():
                tf = ttimer(lambda: tl(tx))
            ty = tl(tx)
            tb = ttimer(lambda: torch.autograd.grad(ty, [tx] + list(tl.parameters()), tdy, retain_graph=True))
        rows.append((label, fwd, tf, bwd, tb))
        x_bl = y
    return rows


def kernel_rows(name, batch, timer, ttimer, torch):
    """gpucnn's CUDA kernels vs the cuDNN / ATen calls doing the same job (GPU only).

    Each stage's kernels on its real batch-last input: the convolution passes
    (forward with its fused epilogue excluded, backward-input, backward-weight
    with the bias) and max pooling, against ``F.conv2d``,
    ``torch.nn.grad.conv2d_input`` / ``conv2d_weight`` and ``F.max_pool2d`` on
    the same data in NCHW.
    """
    from ..cuda import conv as kconv
    from ..cuda import pool as kpool

    cp = backend.cupy
    seed(0)
    model = models.build(name, device="cuda")
    x = cp.random.standard_normal((1, 28, 28, batch), dtype=cp.float32)
    rows = []
    F = torch.nn.functional if torch is not None else None
    for layer in model.layers:
        tag = f"{type(layer).__name__}{shown_shape(x, True)[1:]}"
        if isinstance(layer, layers.Conv2D):
            W, b, s, p = layer.params["W"], layer.params.get("b"), layer.stride, layer.padding
            y, _ = kconv.conv_forward(x, W, b, s, p)
            dy = cp.random.standard_normal(y.shape, dtype=cp.float32)
            t = {"conv fwd": timer(lambda: kconv.conv_forward(x, W, b, s, p)),
                 "conv bwd-input": timer(lambda: kconv.conv_backward_input(dy, W, x.shape, s, p)),
                 "conv bwd-weight+bias": timer(lambda: kconv.conv_backward_weight(x, dy, W.shape, s, p))}
            ref = {}
            if torch is not None:
                tx, tdy = (torch.as_tensor(cp.ascontiguousarray(cp.moveaxis(a, -1, 0)), device="cuda") for a in (x, dy))
                tW = torch.as_tensor(W, device="cuda")
                tb = None if b is None else torch.as_tensor(b, device="cuda")
                ref["conv fwd"] = ttimer(lambda: F.conv2d(tx, tW, tb, s, p))
                ref["conv bwd-input"] = ttimer(lambda: torch.nn.grad.conv2d_input(tx.shape, tW, tdy, s, p))
                ref["conv bwd-weight+bias"] = ttimer(
                    lambda: (torch.nn.grad.conv2d_weight(tx, tW.shape, tdy, s, p), tdy.sum((0, 2, 3))))
            rows += [(f"{k} {tag}", v, ref.get(k)) for k, v in t.items()]
            x = y
        elif isinstance(layer, layers.MaxPool2D):
            k, s = layer.kernel_size, layer.stride
            y, tap, _ = kpool.max_pool_forward(x, k, s)
            dy = cp.random.standard_normal(y.shape, dtype=cp.float32)
            t = {"maxpool fwd": timer(lambda: kpool.max_pool_forward(x, k, s)),
                 "maxpool bwd": timer(lambda: kpool.max_pool_backward(dy, tap, None, x.shape, k, s))}
            ref = {}
            if torch is not None:
                tx, tdy = (torch.as_tensor(cp.ascontiguousarray(cp.moveaxis(a, -1, 0)), device="cuda") for a in (x, dy))
                _, ti = F.max_pool2d(tx, k, s, return_indices=True)
                ref["maxpool fwd"] = ttimer(lambda: F.max_pool2d(tx, k, s))
                ref["maxpool bwd"] = ttimer(lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                    tdy, tx, list(k), list(s), [0, 0], [1, 1], False, ti))
            rows += [(f"{kk} {tag}", v, ref.get(kk)) for kk, v in t.items()]
            x = y
        else:
            x = run_forward(layer, x)
    return rows

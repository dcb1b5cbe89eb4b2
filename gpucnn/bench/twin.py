"""The PyTorch twin of a gpucnn model (same layers, a copy of the weights), and its train step."""
from __future__ import annotations

from .. import backend, layers

__all__ = ["import_torch", "try_import_torch", "torch_twin", "torch_step", "torch_graphed"]


def import_torch():
    """PyTorch, or None when it cannot be imported (:func:`try_import_torch` also says why)."""
    return try_import_torch()[0]


def try_import_torch():
    """``(torch, None)``, or ``(None, why)`` when importing it fails (not installed, or broken)."""
    try:
        import torch  # noqa: F401

        return torch, None
    except Exception as exc:
        return None, f"{type(exc).__name__}: {exc}"


def torch_twin(model, torch, device):
    """An ``nn.Sequential`` with the same layers and a copy of ``model``'s weights and buffers
    (nested Sequentials and Residual blocks included, index for index)."""
    return _twin_sequential(model, torch).to(device)


def _twin_sequential(seq, torch):
    return torch.nn.Sequential(*[_twin_layer(layer, torch) for layer in seq.layers])


def _twin_layer(layer, torch):
    nn = torch.nn
    if isinstance(layer, layers.Conv2D):
        m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                      stride=layer.stride, padding=layer.padding, bias="b" in layer.params)
    elif isinstance(layer, layers.Dense):
        m = nn.Linear(layer.in_features, layer.out_features, bias="b" in layer.params)
    elif isinstance(layer, (layers.BatchNorm2d, layers.BatchNorm1d)):
        cls = nn.BatchNorm2d if isinstance(layer, layers.BatchNorm2d) else nn.BatchNorm1d
        m = cls(layer.num_features, layer.eps, layer.momentum, layer.affine)
        with torch.no_grad():
            for key in ("running_mean", "running_var"):
                getattr(m, key).copy_(torch.from_numpy(backend.asnumpy(layer.buffers[key])))
            if layer.affine:
                m.weight.copy_(torch.from_numpy(backend.asnumpy(layer.params["gamma"])))
                m.bias.copy_(torch.from_numpy(backend.asnumpy(layer.params["beta"])))
        return m
    elif isinstance(layer, layers.Residual):
        return _Residual(layer, torch)
    elif isinstance(layer, layers.Sequential):
        return _twin_sequential(layer, torch)
    else:
        simple = {layers.MaxPool2D: lambda l: nn.MaxPool2d(l.kernel_size, l.stride),
                  layers.AvgPool2D: lambda l: nn.AvgPool2d(l.kernel_size, l.stride),
                  layers.Flatten: lambda l: nn.Flatten(), layers.ReLU: lambda l: nn.ReLU(),
                  layers.Sigmoid: lambda l: nn.Sigmoid(), layers.Tanh: lambda l: nn.Tanh(),
                  layers.Dropout: lambda l: nn.Dropout(l.p),
                  layers.GlobalAvgPool2D: lambda l: nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())}
        make = simple.get(type(layer))
        if make is None:
            raise ValueError(f"no PyTorch twin for {type(layer).__name__}")
        return make(layer)
    with torch.no_grad():
        m.weight.copy_(torch.from_numpy(backend.asnumpy(layer.params["W"])))
        if "b" in layer.params:
            m.bias.copy_(torch.from_numpy(backend.asnumpy(layer.params["b"])))
    return m


def _Residual(layer, torch):  # noqa: N802 - builds a module class lazily (torch is optional)
    class Residual(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.block = _twin_layer(layer.block, torch)
            self.shortcut = None if layer.shortcut is None else _twin_layer(layer.shortcut, torch)

        def forward(self, x):
            return self.block(x) + (x if self.shortcut is None else self.shortcut(x))

    return Residual()


def torch_step(model, loss_name, x_np, y_np, device, torch, lr, momentum):
    """The PyTorch twin's train step (SGD with momentum) on fixed NumPy inputs."""
    tdev = "cuda" if device == "cuda" else "cpu"
    tmodel = torch_twin(model, torch, tdev)
    topt = torch.optim.SGD(tmodel.parameters(), lr=lr, momentum=momentum)
    tx = torch.from_numpy(x_np).to(tdev)
    ty = torch.from_numpy(y_np).to(tdev)
    mse = loss_name == "mse"
    tt = torch.nn.functional.one_hot(ty, 10).to(tx.dtype) if mse else ty

    def step(zero_grad=True):
        if zero_grad:  # inside a graph capture the grads are already None (torch_graphed drops them)
            topt.zero_grad(set_to_none=True)
        out = tmodel(tx)
        if mse:
            value = 0.5 * ((out - tt) ** 2).sum() / out.shape[0]
        else:
            value = torch.nn.functional.cross_entropy(out, tt)
        value.backward()
        topt.step()
        return value

    step.optimizer = topt
    return step


def torch_graphed(tstep, torch, warmup=3):
    """Capture a PyTorch train step into one CUDA graph; returns its replay.

    The recipe of PyTorch's CUDA-graphs notes for a whole training step: warm
    up on a side stream (so the optimizer's state exists), drop the gradients,
    capture forward + backward + step, then time ``graph.replay()``.  Inputs
    are the step's static tensors, so every replay redoes the same batch.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            tstep()
    torch.cuda.current_stream().wait_stream(side)
    # Drop the warm-up's gradients: captured with them in place, backward would ACCUMULATE into
    # them on every replay.  Dropped, the captured backward allocates them in the graph's pool
    # and writes them fresh each replay (PyTorch's whole-network capture recipe).
    tstep.optimizer.zero_grad(set_to_none=True)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tstep(zero_grad=False)
    return graph.replay

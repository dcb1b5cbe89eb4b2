"""Sequential: a chain of layers that is itself a layer."""
from __future__ import annotations

import numpy as np

from .. import backend, debug
from .base import Layer


class Sequential(Layer):
    """Run layers in order; ``backward`` runs them in reverse.

    Parameters are named ``"<index>.<key>"`` (``"0.W"``, ``"0.b"``, ...), as in
    ``state_dict()``.  With anomaly detection on (:mod:`gpucnn.debug`), every
    layer's output and input gradient is checked for NaN/Inf and the first
    offender is named.

    >>> import gpucnn as gc
    >>> net = gc.layers.Sequential(gc.layers.Flatten(), gc.layers.Dense(4, 2))
    >>> sorted(net.state_dict())
    ['1.W', '1.b']
    """

    def __init__(self, *layers, name: str | None = None):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is {type(layer).__name__}, not a gpucnn Layer")
        self.layers = list(layers)
        self.name = name

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        inner = "\n".join(f"  ({i}) {layer!r}" for i, layer in enumerate(self.layers))
        return f"Sequential(\n{inner}\n)"

    def forward(self, x):
        check = debug.is_enabled()
        if check:
            debug.check_finite(x, "Sequential input")
        for i, layer in enumerate(self.layers):
            x = layer.forward(x)
            if check:
                debug.check_finite(x, f"layer {i} ({type(layer).__name__}) forward")
        return x

    def backward(self, dy, input_grad: bool = True):
        """Backpropagate ``dy``; returns dL/dx (``None`` when ``input_grad=False``).

        ``input_grad=False`` lets the first layer skip dL/dx (nothing upstream
        needs it), which saves a whole convolution when training.
        """
        check = debug.is_enabled()
        first = self.layers[0] if self.layers else None
        skip = not input_grad and hasattr(first, "needs_input_grad")
        if skip:
            saved, first.needs_input_grad = first.needs_input_grad, False
        try:
            for i in range(len(self.layers) - 1, -1, -1):
                layer = self.layers[i]
                dy = layer.backward(dy)
                if check and dy is not None:
                    debug.check_finite(dy, f"layer {i} ({type(layer).__name__}) backward")
                for key, g in layer.grads.items():
                    if check:
                        debug.check_finite(g, f"layer {i} ({type(layer).__name__}) gradient {key!r}")
        finally:
            if skip:
                first.needs_input_grad = saved
        return dy if input_grad else None

    # -- parameters ---------------------------------------------------------
    def named_parameters(self, prefix: str = ""):
        out = []
        for i, layer in enumerate(self.layers):
            out.extend(layer.named_parameters(f"{prefix}{i}."))
        return out

    def parameters(self):
        """The parameter arrays, in ``named_parameters`` order."""
        return [layer.params[k] for _, layer, k in self.named_parameters()]

    def gradients(self):
        return [layer.grads[k] for _, layer, k in self.named_parameters()]

    def num_parameters(self) -> int:
        return int(sum(p.size for p in self.parameters()))

    def train(self, mode: bool = True):
        self.training = bool(mode)
        for layer in self.layers:
            layer.train(mode)
        return self

    def astype(self, dtype):
        for layer in self.layers:
            layer.astype(dtype)
        return self

    def to(self, device: str):
        for layer in self.layers:
            layer.to(device)
        return self

    @property
    def dtype(self):
        for _, layer, k in self.named_parameters():
            return layer.params[k].dtype
        return None

    @property
    def device(self) -> str:
        for _, layer, k in self.named_parameters():
            return backend.device_of(layer.params[k])
        return "cpu"

    # -- state --------------------------------------------------------------
    def state_dict(self) -> dict:
        """``{name: NumPy copy}`` of every parameter (device-neutral)."""
        return {name: np.array(backend.asnumpy(layer.params[k]), copy=True)
                for name, layer, k in self.named_parameters()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy ``state`` into the parameters, in place, on their current device.

        Strict (the default): missing keys, unexpected keys, shape mismatches and
        dtype mismatches are all listed in one ``KeyError``/``ValueError``; nothing
        is loaded unless everything matches.
        """
        own = {name: (layer, k) for name, layer, k in self.named_parameters()}
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        problems = []
        if missing:
            problems.append(f"missing keys: {missing}")
        if unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        for name in sorted(set(own) & set(state)):
            layer, k = own[name]
            p, v = layer.params[k], state[name]
            if tuple(p.shape) != tuple(v.shape):
                problems.append(f"{name}: shape {tuple(v.shape)} in state, {tuple(p.shape)} in model")
            elif p.dtype != v.dtype:
                problems.append(f"{name}: dtype {v.dtype} in state, {p.dtype} in model")
        if problems and strict:
            raise ValueError("state_dict does not match the model: " + "; ".join(problems))
        for name in sorted(set(own) & set(state)):
            layer, k = own[name]
            p = layer.params[k]
            if tuple(p.shape) == tuple(state[name].shape) and p.dtype == state[name].dtype:
                p[...] = backend.to_device(state[name], backend.device_of(p))

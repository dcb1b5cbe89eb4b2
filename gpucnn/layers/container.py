"""Sequential: a chain of layers that is itself a layer."""
from __future__ import annotations

import contextlib

import numpy as np

from .. import backend, debug, nvtx
from .base import Layer, indent_repr
from .fusion import stages_of


def _range(stage, what: str):
    """The stage's NVTX range; none for a layer running its own passes (they open their own)."""
    return contextlib.nullcontext() if stage.own_passes else nvtx.nvtx_range(f"{stage.name}.{what}")


class Sequential(Layer):
    """Run layers in order; ``backward`` runs them in reverse.

    Parameters are named ``"<index>.<key>"`` (``"0.W"``, ``"0.b"``, ...), as in
    ``state_dict()``.  The input is converted once to the batch-last layout
    (:mod:`gpucnn.functional.layout`) and the layers run on it in stages -- a
    convolution or dense layer with the activation and pooling that follow it
    fused into one call (:mod:`gpucnn.layers.fusion`; ``fuse=False`` turns
    that off) -- and the output is converted back; ``forward`` and
    ``backward`` return new arrays.  A layer that defines its own ``forward``
    / ``backward`` runs through them (:func:`~gpucnn.layers.base.runs_batch_last`).
    ``repr`` shows both.  With anomaly detection on (:mod:`gpucnn.debug`)
    nothing is fused, and every layer's output and input gradient is checked
    for NaN/Inf and the first offender is named.

    >>> import gpucnn as gc
    >>> net = gc.layers.Sequential(gc.layers.Flatten(), gc.layers.Dense(4, 2))
    >>> sorted(net.state_dict())
    ['1.W', '1.b']
    """

    def __init__(self, *layers, name: str | None = None, fuse: bool = True):
        super().__init__()
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"Sequential: item {i} is {type(layer).__name__}, not a gpucnn Layer")
        if not isinstance(fuse, bool):
            raise TypeError(f"Sequential: fuse must be True or False, got fuse={fuse!r}")
        self.layers = list(layers)
        self.name = name
        self.fuse = fuse

    def __len__(self):
        return len(self.layers)

    def __getitem__(self, i):
        return self.layers[i]

    def __iter__(self):
        return iter(self.layers)

    def __repr__(self):
        notes = {}
        for stage in self.stages():
            if len(stage.layers) > 1:
                notes[stage.start] = f"fused: {stage.name}"
                for k in range(1, len(stage.layers)):
                    notes[stage.start + k] = f"in ({stage.start})"
            elif stage.own_passes:
                notes[stage.start] = "its own forward/backward: not fused, not split into micro-batches"
        lines = []
        for i, layer in enumerate(self.layers):
            line = f"  ({i}) " + indent_repr(layer)
            lines.append(line + (f"  # {notes[i]}" if i in notes else ""))
        if not self.fuse:
            lines.append("  fuse=False")
        return "Sequential(\n" + "\n".join(lines) + "\n)"

    def children(self) -> list:
        return list(self.layers)

    def stages(self):
        """How :meth:`forward` runs the layers: a list of :class:`~gpucnn.layers.fusion.Stage`
        (fused when ``fuse`` and anomaly detection is off)."""
        fuse = self.fuse and not debug.is_enabled()
        key = (tuple(map(id, self.layers)), fuse)
        if getattr(self, "_stages_key", None) != key:
            self._stages, self._stages_key = stages_of(self.layers, fuse=fuse), key
        return self._stages

    def _forward(self, x, epilogue=None):
        self._no_epilogue(epilogue)
        check = debug.is_enabled()
        if check:
            debug.check_finite(x, "Sequential input")
        for stage in self.stages():
            with _range(stage, "forward"):
                x = stage.forward(x)
            if check:
                debug.check_finite(x, f"layer {stage.start} ({stage.name}) forward")
        self._forwarded = True
        return x

    def _backward(self, dy, input_grad=True):
        if not self.layers:
            return dy if input_grad else None
        check = debug.is_enabled()
        stages = self.stages()
        if not getattr(self, "_forwarded", False):
            raise RuntimeError(f"{stages[-1].name}.backward called before forward "
                               f"(layer {stages[-1].start} of the Sequential)")
        for stage in reversed(stages):
            with _range(stage, "backward"):
                dy = stage.backward(dy, input_grad or stage is not stages[0])
            where = f"layer {stage.start} ({stage.name})"
            if check and dy is not None:
                debug.check_finite(dy, f"{where} backward")
            if check:
                for key, g in stage.lead.grads.items():
                    debug.check_finite(g, f"{where} gradient {key!r}")
        return dy

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
    def named_buffers(self, prefix: str = ""):
        out = []
        for i, layer in enumerate(self.layers):
            out.extend(layer.named_buffers(f"{prefix}{i}."))
        return out

    def _state_entries(self):
        """``{name: (dict, key)}`` of every parameter and buffer (what a state dict holds)."""
        entries = {name: (layer.params, k) for name, layer, k in self.named_parameters()}
        entries.update({name: (layer.buffers, k) for name, layer, k in self.named_buffers()})
        return entries

    def state_dict(self) -> dict:
        """``{name: NumPy copy}`` of every parameter and buffer (device-neutral)."""
        return {name: np.array(backend.asnumpy(d[k]), copy=True) for name, (d, k) in self._state_entries().items()}

    def load_state_dict(self, state: dict, strict: bool = True) -> None:
        """Copy ``state`` into the parameters and buffers, in place, on their current device.

        Strict (the default): missing keys, unexpected keys, shape mismatches and
        dtype mismatches are all listed in one ``ValueError``; nothing is loaded
        unless everything matches.
        """
        own = self._state_entries()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        problems = []
        if missing:
            problems.append(f"missing keys: {missing}")
        if unexpected:
            problems.append(f"unexpected keys: {unexpected}")
        for name in sorted(set(own) & set(state)):
            d, k = own[name]
            p, v = d[k], state[name]
            if tuple(p.shape) != tuple(v.shape):
                problems.append(f"{name}: shape {tuple(v.shape)} in state, {tuple(p.shape)} in model")
            elif p.dtype != v.dtype:
                problems.append(f"{name}: dtype {v.dtype} in state, {p.dtype} in model")
        if problems and strict:
            raise ValueError("state_dict does not match the model: " + "; ".join(problems))
        for name in sorted(set(own) & set(state)):
            d, k = own[name]
            p = d[k]
            if tuple(p.shape) == tuple(state[name].shape) and p.dtype == state[name].dtype:
                p[...] = backend.to_device(state[name], backend.device_of(p))

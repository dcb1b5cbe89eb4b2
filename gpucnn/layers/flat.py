"""Flat storage of parameters and gradients: one contiguous buffer per (dtype, device).

:func:`flatten` moves every parameter of a list ``named_parameters()`` into
one buffer per dtype and device, and every gradient into a twin buffer, then
rebinds ``layer.params[key]`` / ``layer.grads[key]`` to views of them.  The
layers see no difference (a view is an ndarray of the same shape; backward
passes write gradients into them in place), while an optimizer updates all
parameters with one operation (one kernel on a GPU) and a distributed run
allreduces all gradients as one buffer, with no packing.

A CPU group's parameter buffer comes from the allocator the caller passes:
the optimizer passes :func:`gpucnn.threads.shared_empty` where workers can
be forked, so the micro-batch workers of :mod:`gpucnn.train.workers` read
every update.

Views stay views as long as nobody *replaces* an array (``layer.to`` /
``layer.astype`` do, on purpose); :meth:`FlatGroup.check` says so cheaply, and
the optimizer calls it every step.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .. import backend

__all__ = ["FlatGroup", "flatten"]


@dataclass
class FlatGroup:
    """All parameters of one dtype and device: ``params``/``grads`` are 1-D buffers.

    ``entries`` lists ``(name, layer, key, offset, shape)`` in ``named_parameters`` order.
    """

    dtype: np.dtype
    device: str
    params: object
    grads: object
    entries: list = field(default_factory=list)
    _views: list = field(default_factory=list, repr=False)

    @property
    def size(self) -> int:
        return int(self.params.size)

    def views(self, flat, name_filter=None):
        """``{name: view of flat}`` for every parameter (``flat`` shaped like ``params``)."""
        return {name: flat[off:off + int(np.prod(shape))].reshape(shape)
                for name, _, _, off, shape in self.entries if name_filter is None or name_filter(name)}

    def check(self, who: str = "optimizer") -> None:
        """Raise if a layer's parameter or gradient is no longer this group's view."""
        for (name, layer, key, _, _), (p, g) in zip(self.entries, self._views):
            if layer.params.get(key) is not p or layer.grads.get(key) is not g:
                raise RuntimeError(
                    f"{who}: parameter {name} was replaced (layer.to(), layer.astype() or an assignment "
                    f"to layer.params[{key!r}]) after the {who} was created; create the {who} after "
                    f"moving or converting the model, and change parameters in place (p[...] = value)")


def flatten(named_parameters, alloc=None) -> list[FlatGroup]:
    """Group ``(name, layer, key)`` triples by dtype and device into :class:`FlatGroup` s.

    Values are copied into the new buffers; the gradients start as copies of
    the current ones.  Parameters already flattened together are re-flattened
    (cheap: a copy of each array).  ``alloc(size, dtype)`` makes the parameter
    buffer of a CPU group (None: ``numpy.empty``); GPU groups use CuPy's.
    """
    groups: dict[tuple, list] = {}
    for name, layer, key in named_parameters:
        p = layer.params[key]
        groups.setdefault((np.dtype(p.dtype), backend.device_of(p, name)), []).append((name, layer, key))
    out = []
    for (dtype, device), members in groups.items():
        xp = backend.cupy if device == "cuda" else np
        total = sum(int(layer.params[key].size) for _, layer, key in members)
        params = alloc(total, dtype) if xp is np and alloc is not None else xp.empty(total, dtype=dtype)
        grads = xp.empty(total, dtype=dtype)
        group = FlatGroup(dtype, device, params, grads)
        offset = 0
        for name, layer, key in members:
            p, g = layer.params[key], layer.grads[key]
            shape, n = tuple(p.shape), int(p.size)
            params[offset:offset + n] = p.reshape(-1)
            grads[offset:offset + n] = g.reshape(-1)
            pv, gv = params[offset:offset + n].reshape(shape), grads[offset:offset + n].reshape(shape)
            layer.params[key], layer.grads[key] = pv, gv
            group.entries.append((name, layer, key, offset, shape))
            group._views.append((pv, gv))
            offset += n
        out.append(group)
    return out

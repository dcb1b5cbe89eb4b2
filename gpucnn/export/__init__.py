"""Export trained gpucnn models to ONNX and safetensors, and import safetensors.

* :func:`to_onnx` / :func:`build_onnx` — a float32 ONNX graph (opset 17, IR
  version 8, symbolic batch dimension ``"N"``) built with the ``onnx``
  package's helper API; ``onnx`` is imported only when you call them
  (``pip install 'gpucnn[onnx]'``).
* :func:`to_safetensors` / :func:`load_safetensors` — weights under PyTorch
  ``nn.Sequential`` names (``"0.weight"``, ``"0.bias"``, ...), read and written
  by gpucnn's own safetensors code (no pickle, no ``safetensors`` package).
* :func:`read_safetensors` / :func:`write_safetensors` — the file format itself.

Both exporters are per-layer-class registries (``gpucnn.export.onnx.register``
and ``gpucnn.export.safetensors.register``): one small function per layer
type.  A layer class with no entry is refused by name, never skipped.

>>> import gpucnn as gc, gpucnn.export as ge
>>> sorted(ge.torch_state_dict(gc.models.build("seed002_c1")))
['0.bias', '0.weight', '4.bias', '4.weight']
"""
from __future__ import annotations


class ExportError(ValueError):
    """A model cannot be exported, or a file does not fit the model (message says why)."""


# The submodules import ExportError from here, so it is defined first.
from .onnx import build_onnx, to_onnx  # noqa: E402
from .safetensors import (  # noqa: E402
    SafetensorsError, load_safetensors, read_safetensors, to_safetensors, torch_state_dict,
    write_safetensors,
)

__all__ = [
    "ExportError", "SafetensorsError", "build_onnx", "to_onnx", "to_safetensors", "load_safetensors",
    "read_safetensors", "write_safetensors", "torch_state_dict",
]

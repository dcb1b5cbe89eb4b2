"""The bare GPU box, simulated on any box: these packages cannot be imported.

``PYTHONPATH=tests/gpu/bare:.`` makes Python load this file at start-up (the
``site`` module imports ``sitecustomize`` from the path), so a process sees
only what the lent GPU box has -- Python, NumPy, CuPy, PyTorch, pytest and
pytest-timeout -- and none of gpucnn's other dependencies or dev tools.
tests/test_device_check.py runs the device check's rehearsal and a training
run this way, so an unconditional import of any of these fails CI.
"""
import importlib.machinery
import sys

ABSENT = ("hypothesis", "PIL", "tqdm", "matplotlib", "threadpoolctl", "onnx", "onnxruntime", "safetensors",
          "mpi4py", "nvtx", "cuda.bindings")


def _absent(name):
    return any(name == a or name.startswith(a + ".") for a in ABSENT)


class _PathFinderWithout(importlib.machinery.PathFinder):
    """The path finder, blind to ABSENT: importing one raises ModuleNotFoundError and
    ``importlib.util.find_spec`` returns None, as for a package that is not installed."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        return None if _absent(name) else super().find_spec(name, path, target)


sys.meta_path[:] = [_PathFinderWithout if f is importlib.machinery.PathFinder else f for f in sys.meta_path]

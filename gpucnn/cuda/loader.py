"""Find, compile, cache and launch gpucnn's hand-written CUDA kernels.

The ``.cu`` sources live in the data package ``gpucnn.kernels`` (the
repository's top-level ``kernels/`` directory, installed into the wheel).  This
module

* locates them (:func:`kernel_dir`, :func:`list_sources`), also from a source
  tree run with ``PYTHONPATH=.``;
* reads them with a ``#line 1 "kernels/<file>"`` prefix so compiler errors name
  the real file (:func:`read_source`);
* builds one module per file through a *module builder*, by default
  ``cupy.RawModule(code=..., options=..., name_expressions=...)``, and caches it
  per (builder, file, options, device id) (:func:`get_module`, :func:`warmup`);
* launches every kernel through ONE checked launcher (:func:`launch`): it reads
  the kernel's parameter list from the ``extern "C" __global__`` signature in
  the source, checks each array's dtype, C-contiguity, size (int32) and device,
  converts every scalar to ``numpy.int32``/``numpy.float32`` itself (a Python
  ``int`` never reaches a kernel), computes the grid itself (ceil-div) and, with
  ``GPUCNN_CUDA_SYNC_CHECK=1`` in the environment, synchronizes after the launch
  so that asynchronous CUDA errors surface at the launch that caused them.

The module builder is injectable (:func:`set_module_builder`,
:func:`use_module_builder`) so the tests can swap CuPy for the CPU emulator in
``tests/cudasim`` and run the unchanged kernels on NumPy arrays.  A builder is
any callable ``fn(code: str, name: str, options: tuple) -> module`` where
``module.get_function(kernel_name)`` returns a callable
``kernel(grid, block, args, shared_mem=0)``.

Importing this module never needs CuPy; only building with the default builder
does, and then it raises :class:`CudaUnavailableError` with an install hint.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import os
import pathlib
import re
import threading
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from .. import backend

__all__ = [
    "CudaUnavailableError",
    "KernelLaunchError",
    "KERNEL_FILES",
    "DEFAULT_OPTIONS",
    "DEFAULT_BLOCK",
    "INT32_MAX",
    "KernelParam",
    "kernel_dir",
    "list_sources",
    "read_source",
    "kernel_signature",
    "kernel_file_of",
    "cupy_module_builder",
    "get_module_builder",
    "set_module_builder",
    "use_module_builder",
    "get_module",
    "get_function",
    "clear_cache",
    "warmup",
    "ceil_div",
    "launch",
]

#: Every kernel source file and the ``extern "C"`` entry points it defines.
#: Each pass exists for float32 (plain name) and float64 (``_f64`` suffix).
KERNEL_FILES: dict[str, tuple[str, ...]] = {
    "conv2d_forward.cu": ("conv2d_forward", "conv2d_forward_f64"),
    "conv2d_backward_input.cu": ("conv2d_backward_input", "conv2d_backward_input_f64"),
    "conv2d_backward_weight.cu": ("conv2d_backward_weight", "conv2d_backward_weight_f64",
                                  "conv2d_backward_bias", "conv2d_backward_bias_f64"),
    "maxpool2d.cu": ("maxpool2d_forward", "maxpool2d_forward_f64",
                     "maxpool2d_backward", "maxpool2d_backward_f64"),
    "softmax_xent.cu": ("softmax_xent_forward", "softmax_xent_forward_f64",
                        "softmax_xent_mean", "softmax_xent_mean_f64",
                        "softmax_xent_backward", "softmax_xent_backward_f64"),
}

#: Options gpucnn passes to the compiler: none.  CuPy's RawModule adds its own
#: (``-arch=compute_XX`` for the current device, ``-ftz=true``, ``-I`` for its
#: headers and the CUDA headers); tests/test_kernel_compile.py compiles with
#: that set through NVRTC.  The kernels include no headers, need no particular
#: C++ standard and mark every function ``__global__``/``__device__``.
DEFAULT_OPTIONS: tuple[str, ...] = ()

#: Threads per block for the one-thread-per-element kernels.
DEFAULT_BLOCK = 256

INT32_MAX = int(np.iinfo(np.int32).max)

#: Environment switch: synchronize after each launch and surface CUDA errors.
SYNC_CHECK_ENV = "GPUCNN_CUDA_SYNC_CHECK"


class CudaUnavailableError(RuntimeError):
    """A CUDA kernel was requested but CuPy (or a GPU) is not available."""


class KernelLaunchError(RuntimeError):
    """A kernel launch failed (reported with ``GPUCNN_CUDA_SYNC_CHECK=1``)."""


# ---------------------------------------------------------------------------
# Locating and reading the sources
# ---------------------------------------------------------------------------

def kernel_dir() -> pathlib.Path:
    """Directory holding the ``.cu`` files.

    The installed data package ``gpucnn.kernels`` when it is importable and
    holds the sources (an installed wheel, or an editable install); otherwise
    ``<repo>/kernels`` next to the ``gpucnn`` package (a source tree run with
    ``PYTHONPATH=.``, where ``gpucnn.kernels`` is not mapped).
    """
    try:
        root = importlib.resources.files("gpucnn.kernels")
        path = pathlib.Path(str(root))
        if all((path / name).is_file() for name in KERNEL_FILES):
            return path
    except Exception:  # not installed / not a filesystem package: fall back
        pass
    repo_kernels = pathlib.Path(__file__).resolve().parents[2] / "kernels"
    if all((repo_kernels / name).is_file() for name in KERNEL_FILES):
        return repo_kernels
    raise FileNotFoundError(
        "gpucnn's CUDA sources (" + ", ".join(KERNEL_FILES) + ") were found "
        "neither in the installed package gpucnn.kernels nor in "
        f"{repo_kernels}; reinstall gpucnn (the wheel ships kernels/*.cu)"
    )


def list_sources() -> dict[str, pathlib.Path]:
    """Map each kernel file name to its path (all four must exist)."""
    directory = kernel_dir()
    return {name: directory / name for name in KERNEL_FILES}


_source_cache: dict[str, str] = {}
_lock = threading.RLock()


def _check_file(filename: str) -> None:
    if filename not in KERNEL_FILES:
        raise ValueError(
            f"unknown kernel file {filename!r}; known files: {sorted(KERNEL_FILES)}"
        )


def read_source(filename: str) -> str:
    """Source text of ``filename`` with ``#line 1 "kernels/<file>"`` prepended."""
    _check_file(filename)
    with _lock:
        text = _source_cache.get(filename)
        if text is None:
            raw = list_sources()[filename].read_text(encoding="utf-8")
            text = f'#line 1 "kernels/{filename}"\n' + raw
            _source_cache[filename] = text
        return text


# ---------------------------------------------------------------------------
# Kernel signatures, read from the sources
# ---------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class KernelParam:
    """One kernel parameter: ``dtype`` and whether it is a pointer (an array)."""

    name: str
    dtype: np.dtype
    is_array: bool
    is_const: bool

    def describe(self) -> str:
        base = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
                np.dtype(np.int32): "int"}[self.dtype]
        return f"{'const ' if self.is_const else ''}{base}{'*' if self.is_array else ''} {self.name}"


_C_TYPES = {"float": np.dtype(np.float32), "double": np.dtype(np.float64),
            "int": np.dtype(np.int32)}
_SIGNATURE_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_PARAM_RE = re.compile(
    r"^(const\s+)?(float|double|int)\s*(\*)?\s*(?:__restrict__\s+)?(\w+)$")
_signature_cache: dict[str, tuple[KernelParam, ...]] = {}


def _parse_signatures(filename: str) -> dict[str, tuple[KernelParam, ...]]:
    text = re.sub(r"//[^\n]*", "", read_source(filename))
    found = {}
    for match in _SIGNATURE_RE.finditer(text):
        params = []
        for raw in match.group(2).split(","):
            decl = " ".join(raw.split())
            decl = decl.replace(" *", "*").replace("*", "* ").replace("  ", " ").strip()
            m = _PARAM_RE.match(decl)
            if m is None:
                raise ValueError(
                    f"kernels/{filename}: cannot parse parameter {raw.strip()!r} of "
                    f"{match.group(1)}; the launcher understands [const] float|double|int[*]"
                )
            params.append(KernelParam(name=m.group(4), dtype=_C_TYPES[m.group(2)],
                                      is_array=m.group(3) is not None,
                                      is_const=m.group(1) is not None))
        found[match.group(1)] = tuple(params)
    return found


def kernel_file_of(kernel: str) -> str:
    """The source file that defines ``kernel``."""
    for filename, names in KERNEL_FILES.items():
        if kernel in names:
            return filename
    known = sorted(n for names in KERNEL_FILES.values() for n in names)
    raise ValueError(f"unknown kernel {kernel!r}; known kernels: {known}")


def kernel_signature(kernel: str) -> tuple[KernelParam, ...]:
    """Parameters of ``kernel`` as declared in its ``.cu`` file."""
    with _lock:
        if kernel not in _signature_cache:
            filename = kernel_file_of(kernel)
            parsed = _parse_signatures(filename)
            missing = set(KERNEL_FILES[filename]) - set(parsed)
            if missing:
                raise ValueError(f"kernels/{filename} defines no extern \"C\" "
                                 f"__global__ {sorted(missing)}")
            _signature_cache.update(parsed)
        return _signature_cache[kernel]


# ---------------------------------------------------------------------------
# Module builders and the module cache
# ---------------------------------------------------------------------------

ModuleBuilder = Callable[[str, str, tuple], object]


def cupy_module_builder(code: str, name: str, options: tuple):
    """Default builder: ``cupy.RawModule`` compiled with NVRTC.

    CuPy compiles lazily (at the first ``get_function``) and keeps its own
    on-disk cache (``~/.cupy/kernel_cache``, keyed on source, options, arch and
    NVRTC version), so a rebuilt module is cheap after the first run.
    """
    cupy = backend.cupy
    if cupy is None:
        raise CudaUnavailableError(
            f"compiling kernels/{name} needs CuPy and a CUDA GPU: "
            "pip install 'gpucnn[cuda12]' (or [cuda13]); "
            "on a machine without a GPU, use the NumPy path (device='cpu')"
        )
    # The kernels are extern "C" (no C++ name mangling), so name_expressions
    # stays None; a templated kernel would list its instantiations here.
    return cupy.RawModule(code=code, options=tuple(options), name_expressions=None)


_builder: ModuleBuilder = cupy_module_builder
_module_cache: dict[tuple, object] = {}


def get_module_builder() -> ModuleBuilder:
    return _builder


def set_module_builder(fn: ModuleBuilder | None) -> ModuleBuilder:
    """Install ``fn`` as the module builder (``None``: back to CuPy).

    Returns the previous builder.  Modules are cached per builder, so modules
    built by one builder are never handed out under another.
    """
    global _builder
    if fn is not None and not callable(fn):
        raise TypeError(f"module builder must be callable, got {type(fn).__name__}")
    with _lock:
        previous = _builder
        _builder = cupy_module_builder if fn is None else fn
        return previous


@contextlib.contextmanager
def use_module_builder(fn: ModuleBuilder) -> Iterator[ModuleBuilder]:
    """Context manager: build modules with ``fn`` inside the block."""
    previous = set_module_builder(fn)
    try:
        yield fn
    finally:
        set_module_builder(previous)


def _device_id(builder: ModuleBuilder) -> int:
    """Current CUDA device for the CuPy builder; -1 for other builders."""
    if builder is cupy_module_builder and backend.cupy is not None:
        return int(backend.cupy.cuda.runtime.getDevice())
    return -1


def get_module(filename: str, options: Sequence[str] | None = None):
    """Build (or fetch from the cache) the module compiled from ``filename``."""
    _check_file(filename)
    opts = DEFAULT_OPTIONS if options is None else tuple(options)
    with _lock:
        builder = _builder
        key = (builder, filename, opts, _device_id(builder))
        module = _module_cache.get(key)
        if module is None:
            module = builder(read_source(filename), filename, opts)
            _module_cache[key] = module
        return module


def get_function(kernel: str, options: Sequence[str] | None = None):
    """The callable for ``kernel`` from its (cached) module."""
    return get_module(kernel_file_of(kernel), options).get_function(kernel)


def clear_cache() -> None:
    """Forget every built module (and re-read sources next time)."""
    with _lock:
        _module_cache.clear()
        _source_cache.clear()
        _signature_cache.clear()


def warmup(options: Sequence[str] | None = None) -> list[str]:
    """Compile every kernel now (instead of at its first launch).

    Returns the names of the kernels that were loaded.  With CuPy, fetching
    each function forces the NVRTC compile and the module load on the current
    device, so compile errors surface here.
    """
    loaded = []
    for filename, names in KERNEL_FILES.items():
        module = get_module(filename, options)
        for name in names:
            module.get_function(name)
            loaded.append(name)
    return loaded


# ---------------------------------------------------------------------------
# The checked launcher
# ---------------------------------------------------------------------------

def ceil_div(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _is_array(value) -> bool:
    return isinstance(value, np.ndarray) or backend.is_cupy(value)


def _scalar(kernel: str, param: KernelParam, value):
    """Convert a host scalar to the exact NumPy scalar type the kernel takes."""
    if _is_array(value):
        raise TypeError(f"{kernel}: parameter {param.describe()} is a scalar, "
                        f"got an array of shape {value.shape}")
    if param.dtype == np.int32:
        if isinstance(value, (bool, np.bool_)):
            value = int(value)
        if not isinstance(value, (int, np.integer)):
            raise TypeError(f"{kernel}: parameter {param.describe()} needs an "
                            f"integer, got {type(value).__name__} {value!r}")
        if not -INT32_MAX - 1 <= int(value) <= INT32_MAX:
            raise OverflowError(f"{kernel}: {param.name}={int(value)} does not fit int32")
        return np.int32(value)
    if not isinstance(value, (int, float, np.integer, np.floating)):
        raise TypeError(f"{kernel}: parameter {param.describe()} needs a "
                        f"number, got {type(value).__name__}")
    return param.dtype.type(value)


def _check_array(kernel: str, param: KernelParam, value) -> None:
    if not _is_array(value):
        raise TypeError(f"{kernel}: parameter {param.describe()} needs a "
                        f"numpy/cupy array, got {type(value).__name__}")
    if value.dtype != param.dtype:
        raise TypeError(f"{kernel}: parameter {param.name} must be {param.dtype} "
                        f"(kernel takes {param.describe()}), got dtype {value.dtype}")
    if not value.flags.c_contiguous:
        raise ValueError(f"{kernel}: parameter {param.name} must be C-contiguous "
                         f"(shape {value.shape}, strides {value.strides}); "
                         "pass xp.ascontiguousarray(a)")
    if value.size > INT32_MAX:
        raise OverflowError(f"{kernel}: {param.name} has {value.size} elements; "
                            "the kernels index with int32 (at most 2**31 - 1)")
    if not param.is_const and isinstance(value, np.ndarray) and not value.flags.writeable:
        raise ValueError(f"{kernel}: output parameter {param.name} is read-only")


def _check_current_device(kernel: str, arrays: Mapping[str, object]) -> None:
    """CuPy arrays must live on the current device (where the module is loaded)."""
    if backend.cupy is None:
        return
    current = None
    for name, a in arrays.items():
        if backend.is_cupy(a):
            if current is None:
                current = int(backend.cupy.cuda.runtime.getDevice())
            if int(a.device.id) != current:
                raise backend.DeviceMismatchError(
                    f"{kernel}: {name} lives on GPU {a.device.id} but the current device is "
                    f"GPU {current}; use `with cupy.cuda.Device({a.device.id}):`"
                )


def _sync_check_enabled() -> bool:
    return os.environ.get(SYNC_CHECK_ENV, "").strip() not in ("", "0")


def launch(kernel: str, args: Sequence, *, n_threads: int | None = None,
           n_blocks: int | None = None, block: int = DEFAULT_BLOCK,
           options: Sequence[str] | None = None) -> None:
    """Check ``args`` against ``kernel``'s signature and launch it.

    Give exactly one of

    * ``n_threads``: one thread per element; grid = ceil(n_threads / block);
    * ``n_blocks``: one block per reduction; grid = n_blocks.

    ``args`` are in the order of the kernel's parameters: arrays for pointer
    parameters (exact dtype, C-contiguous, fewer than 2**31 elements, all on
    one device) and host numbers for scalars (converted here to
    ``numpy.int32``/``numpy.float32``).  Launching zero threads or blocks is a
    no-op.
    """
    params = kernel_signature(kernel)
    if len(args) != len(params):
        raise TypeError(
            f"{kernel} takes {len(params)} arguments "
            f"({', '.join(p.describe() for p in params)}), got {len(args)}"
        )
    if (n_threads is None) == (n_blocks is None):
        raise ValueError("give exactly one of n_threads and n_blocks")
    block = int(block)
    if not 1 <= block <= 1024:
        raise ValueError(f"block must be in [1, 1024], got {block}")

    converted = []
    arrays = {}
    for param, value in zip(params, args):
        if param.is_array:
            _check_array(kernel, param, value)
            arrays[param.name] = value
            converted.append(value)
        else:
            converted.append(_scalar(kernel, param, value))
    backend.check_same_device(**arrays)
    _check_current_device(kernel, arrays)

    grid = ceil_div(n_threads, block) if n_blocks is None else int(n_blocks)
    if grid < 0:
        raise ValueError(f"{kernel}: negative launch size")
    if grid == 0:
        return
    if grid * block > INT32_MAX:
        raise OverflowError(f"{kernel}: grid {grid} x block {block} threads exceed "
                            "int32 (the kernels compute a flat int32 thread index)")

    function = get_function(kernel, options)
    function((grid, 1, 1), (block, 1, 1), tuple(converted))

    if _sync_check_enabled() and any(backend.is_cupy(a) for a in arrays.values()):
        try:
            backend.cupy.cuda.get_current_stream().synchronize()
        except Exception as exc:  # pragma: no cover - needs a GPU
            raise KernelLaunchError(
                f"{kernel} failed (grid=({grid},1,1), block=({block},1,1), "
                f"shapes {', '.join(f'{k}={tuple(v.shape)}' for k, v in arrays.items())}): {exc}"
            ) from exc

"""Find, compile, cache and launch gpucnn's hand-written CUDA kernels.

The ``.cu`` sources live in the data package ``gpucnn.kernels`` (the
repository's top-level ``kernels/`` directory, installed into the wheel);
:mod:`gpucnn.cuda.sources` finds and reads them and parses their signatures
(re-exported here).  This module

* builds one module per file through a *module builder*, by default
  ``cupy.RawModule(code=..., options=..., name_expressions=...)``, and caches it
  per (builder, file, options, device id) (:func:`get_module`, :func:`warmup`);
* launches every kernel through ONE checked launcher (:func:`launch`): it reads
  the kernel's parameter list from the ``extern "C" __global__`` signature in
  the source, checks each array's dtype, C-contiguity, size (int32) and device,
  converts every scalar to ``numpy.int32``/``numpy.float32`` itself (a Python
  ``int`` never reaches a kernel), computes the grid itself (ceil-div), refuses
  a grid or block past CUDA's limits or past the kernel's own
  ``__launch_bounds__`` (once per launch shape, naming the dimension) and, with
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
import operator
import os
import re
import threading
from typing import Callable, Iterator, Mapping, Sequence

import numpy as np

from .. import backend
from . import sources
from .sources import (KERNEL_FILES, KernelParam, kernel_dir, kernel_file_of, kernel_launch_bounds, kernel_signature,
                      list_sources, read_source)

_lock = threading.RLock()

__all__ = [
    "CudaUnavailableError",
    "KernelLaunchError",
    "KERNEL_FILES",
    "DEFAULT_OPTIONS",
    "DEFAULT_BLOCK",
    "INT32_MAX",
    "MAX_GRID",
    "MAX_BLOCK",
    "MAX_BLOCK_THREADS",
    "KernelParam",
    "kernel_dir",
    "list_sources",
    "read_source",
    "kernel_signature",
    "kernel_launch_bounds",
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

#: Options gpucnn passes to the compiler: none.  CuPy's RawModule adds its own
#: (``--std=c++11`` in CuPy 13, ``--std=c++17`` in CuPy 14, ``-ftz=true``,
#: ``-arch=sm_XX`` for the current device, ``--device-as-default-execution-space``
#: and ``-I`` for its headers and the CUDA headers); tests/test_kernel_compile.py
#: compiles every kernel with both versions' sets through NVRTC (its docstring
#: cites the CuPy functions).  The code handed to CuPy includes no headers (the
#: kernels' own ``kernels/*.cuh`` are expanded in place by :mod:`.sources`), needs
#: no particular C++ standard and marks every function ``__global__``/``__device__``.
DEFAULT_OPTIONS: tuple[str, ...] = ()

#: Threads per block for the one-thread-per-element kernels.
DEFAULT_BLOCK = 256

INT32_MAX = int(np.iinfo(np.int32).max)

#: CUDA's launch limits (every GPU CuPy 13+ supports, sm_80/sm_90 included): the
#: largest gridDim (x, y, z), the largest blockDim (x, y, z) and threads per block.
MAX_GRID = (2**31 - 1, 65535, 65535)
MAX_BLOCK = (1024, 1024, 64)
MAX_BLOCK_THREADS = 1024

#: Largest dynamic shared memory a launch may ask for (the sm_90 opt-in maximum).
MAX_SHARED_MEM = 227 * 1024

#: Environment switch: synchronize after each launch and surface CUDA errors.
SYNC_CHECK_ENV = "GPUCNN_CUDA_SYNC_CHECK"


class CudaUnavailableError(RuntimeError):
    """A CUDA kernel was requested but CuPy (or a GPU) is not available."""


class KernelLaunchError(RuntimeError):
    """A kernel launch failed (reported with ``GPUCNN_CUDA_SYNC_CHECK=1``)."""


# ---------------------------------------------------------------------------
# Locating and reading the sources
# ---------------------------------------------------------------------------

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
    global _builder, _sync_check
    _sync_check = _read_sync_check()
    if fn is not None and not callable(fn):
        raise TypeError(f"module builder must be callable, got {type(fn).__name__}")
    with _lock:
        previous = _builder
        _builder = cupy_module_builder if fn is None else fn
        _function_cache.clear()   # keyed by builder too; clearing keeps it from growing in tests
        _prepared.clear()         # prepared launches hold the functions of the old builder
        return previous


@contextlib.contextmanager
def use_module_builder(fn: ModuleBuilder) -> Iterator[ModuleBuilder]:
    """Context manager: build modules with ``fn`` inside the block.

    On exit the previous builder *and* the sync-check state found on entry come
    back: a ``GPUCNN_CUDA_SYNC_CHECK`` set for the block (a test's monkeypatch,
    undone only after the block) must not stay on for the rest of the process.
    """
    global _sync_check
    sync_check = _sync_check
    previous = set_module_builder(fn)
    try:
        yield fn
    finally:
        set_module_builder(previous)
        _sync_check = sync_check


def _device_id(builder: ModuleBuilder) -> int:
    """Current CUDA device for the CuPy builder; -1 for other builders."""
    if builder is cupy_module_builder and backend.cupy is not None:
        return int(backend.cupy.cuda.runtime.getDevice())
    return -1


def get_module(filename: str, options: Sequence[str] | None = None):
    """Build (or fetch from the cache) the module compiled from ``filename``."""
    sources.check_file(filename)
    opts = DEFAULT_OPTIONS if options is None else tuple(options)
    with _lock:
        builder = _builder
        key = (builder, filename, opts, _device_id(builder))
        module = _module_cache.get(key)
        if module is None:
            module = builder(read_source(filename), filename, opts)
            _module_cache[key] = module
        return module


_function_cache: dict[tuple, object] = {}


def get_function(kernel: str, options: Sequence[str] | None = None):
    """The callable for ``kernel`` from its (cached) module, itself cached per (builder, device)."""
    opts = DEFAULT_OPTIONS if options is None else tuple(options)
    builder = _builder
    key = (builder, kernel, opts, _device_id(builder))
    fn = _function_cache.get(key)
    if fn is None:
        fn = get_module(kernel_file_of(kernel), opts).get_function(kernel)
        with _lock:
            _function_cache[key] = fn
    return fn


def clear_cache() -> None:
    """Forget every built module (and re-read sources and ``GPUCNN_CUDA_SYNC_CHECK`` next time)."""
    global _sync_check
    _sync_check = _read_sync_check()
    with _lock:
        _module_cache.clear()
        _function_cache.clear()
        _prepared.clear()
        sources.clear()


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


def _read_sync_check() -> bool:
    return os.environ.get(SYNC_CHECK_ENV, "").strip() not in ("", "0")


_sync_check = _read_sync_check()


def _sync_check_enabled() -> bool:
    """``GPUCNN_CUDA_SYNC_CHECK`` is set: read at import, and again whenever the module
    builder is set or the cache cleared (not per launch: an environment read is not free)."""
    return _sync_check


def _dims(value, what) -> tuple[int, int, int]:
    t = (int(value),) if isinstance(value, (int, np.integer)) else tuple(int(v) for v in value)
    if not 1 <= len(t) <= 3:
        raise ValueError(f"{what} must be an int or 1 to 3 ints, got {value!r}")
    return t + (1,) * (3 - len(t))


class _Prepared:
    """What one (kernel, scalar values, launch shape) needs at launch: computed once, then reused."""

    __slots__ = ("params", "array_slots", "args", "grid", "block", "shared_mem", "functions", "build")

    def __init__(self, kernel, params, args, grid, block, shared_mem):
        self.params = params
        self.array_slots = tuple((i, p.dtype, not p.is_const) for i, p in enumerate(params) if p.is_array)
        self.args = [None if p.is_array else _scalar(kernel, p, v) for p, v in zip(params, args)]
        self.grid, self.block, self.shared_mem = grid, block, shared_mem
        self.functions = {}   # device id -> compiled function
        self.build = _tuple_builder(tuple(p.is_array for p in params))


_builders: dict[tuple, Callable] = {}


def _tuple_builder(is_array: tuple) -> Callable:
    """``build(args, converted) -> tuple``: the arrays from ``args``, the scalars from ``converted``.

    Generated once per parameter pattern (indices only), so building a launch's argument
    tuple is one call instead of a Python loop.
    """
    fn = _builders.get(is_array)
    if fn is None:
        parts = "".join(f"{'a' if arr else 's'}[{i}], " for i, arr in enumerate(is_array))
        fn = _builders[is_array] = eval(f"lambda a, s: ({parts})")  # noqa: S307 - indices only
    return fn


_prepared: dict[tuple, _Prepared] = {}
_scalar_slots: dict[str, tuple] = {}   # kernel -> (number of parameters, getter of the scalar arguments)


def _key(kernel, args, n_threads, n_blocks, grid, block, shared_mem):
    """The cache key of a launch: the kernel, its scalar arguments (values and types) and its shape."""
    slots = _scalar_slots.get(kernel)
    if slots is None:
        params = kernel_signature(kernel)
        idx = [i for i, p in enumerate(params) if not p.is_array]
        getter = (lambda a: ()) if not idx else (
            (lambda a, _i=idx[0]: (a[_i],)) if len(idx) == 1 else operator.itemgetter(*idx))
        slots = _scalar_slots.setdefault(kernel, (len(params), getter))
    if len(args) != slots[0]:
        return None
    scalars = slots[1](args)
    return (kernel, scalars, tuple(map(type, scalars)), n_threads, n_blocks,
            grid if grid is None or type(grid) is int else tuple(grid),
            block if block is None or type(block) is int else tuple(block), shared_mem)


def _arrays_ok(prep, args, cupy_type):
    """The launch's device id (-1: NumPy arrays) when every array passes the cheap checks, else None."""
    device = None
    for i, dtype, written in prep.array_slots:
        a = args[i]
        t = type(a)
        if t is np.ndarray:
            d = -1
            if written and not a.flags.writeable:
                return None
            if a.dtype != dtype or a.size > INT32_MAX or not a.flags.c_contiguous:
                return None
        elif t is cupy_type:
            d = a.data.device_id
            # CuPy keeps contiguity as a plain attribute; .flags builds an object per call
            if a.dtype != dtype or a.size > INT32_MAX or not a._c_contiguous:
                return None
        else:
            return None
        if device is None:
            device = d
        elif d != device:
            return None
    return -1 if device is None else device


_AXES = "xyz"


def _check_block(kernel: str, block3: tuple[int, int, int]) -> int:
    """The threads of ``block3``, after checking it against CUDA's limits and the kernel's
    ``__launch_bounds__`` (a launch past them fails on the device, or runs with too few registers)."""
    for axis, value, limit in zip(_AXES, block3, MAX_BLOCK):
        if not 1 <= value <= limit:
            raise ValueError(f"{kernel}: blockDim.{axis} = {value} (block {block3}) is outside "
                             f"CUDA's 1..{limit}")
    threads = block3[0] * block3[1] * block3[2]
    if threads > MAX_BLOCK_THREADS:
        raise ValueError(f"{kernel}: block {block3} has {threads} threads; CUDA allows "
                         f"1 to {MAX_BLOCK_THREADS} threads per block")
    bound = kernel_launch_bounds(kernel)
    if bound is not None and threads > bound:
        raise ValueError(f"{kernel}: block {block3} has {threads} threads, more than the "
                         f"__launch_bounds__({bound}) it is compiled with (kernels/{kernel_file_of(kernel)})")
    return threads


def _check_grid(kernel: str, grid3: tuple[int, int, int]) -> None:
    """``grid3`` (no zero in it) within CUDA's limits: x <= 2**31 - 1, y and z <= 65535."""
    for axis, value, limit in zip(_AXES, grid3, MAX_GRID):
        if value > limit:
            raise ValueError(f"{kernel}: gridDim.{axis} = {value} (grid {grid3}) exceeds CUDA's "
                             f"limit of {limit}")


def _prepare(kernel, args, n_threads, n_blocks, grid, block, shared_mem) -> _Prepared | None:
    """Validate the scalar arguments and the launch shape; ``None`` for an empty launch."""
    params = kernel_signature(kernel)
    if len(args) != len(params):
        raise TypeError(f"{kernel} takes {len(params)} arguments "
                        f"({', '.join(p.describe() for p in params)}), got {len(args)}")
    if sum(v is not None for v in (n_threads, n_blocks, grid)) != 1:
        raise ValueError("give exactly one of n_threads, n_blocks and grid")
    block3 = _dims(DEFAULT_BLOCK if block is None else block, "block")
    threads = _check_block(kernel, block3)
    if grid is None:
        if block3[1:] != (1, 1):
            raise ValueError("n_threads / n_blocks launches take a 1-D block")
        count = ceil_div(n_threads, block3[0]) if n_blocks is None else int(n_blocks)
        if count < 0:
            raise ValueError(f"{kernel}: negative launch size")
        grid3 = (count, 1, 1)
    else:
        grid3 = _dims(grid, "grid")
        if min(grid3) < 0:
            raise ValueError(f"{kernel}: negative grid {grid3}")
    if 0 in grid3:
        return None
    _check_grid(kernel, grid3)
    if grid3[0] * grid3[1] * grid3[2] * threads > INT32_MAX:
        raise OverflowError(f"{kernel}: grid {grid3} x block {block3} threads exceed "
                            "int32 (the kernels compute flat int32 thread indices)")
    if not 0 <= int(shared_mem) <= MAX_SHARED_MEM:
        raise ValueError(f"{kernel}: shared_mem={shared_mem} bytes is outside [0, {MAX_SHARED_MEM}]")
    return _Prepared(kernel, params, args, grid3, block3, int(shared_mem))


def launch(kernel: str, args: Sequence, *, n_threads: int | None = None,
           n_blocks: int | None = None, grid=None, block=None, shared_mem: int = 0,
           options: Sequence[str] | None = None) -> None:
    """Check ``args`` against ``kernel``'s signature and launch it.

    Give exactly one of

    * ``n_threads``: one thread per element; grid = ceil(n_threads / block);
    * ``n_blocks``: one block per reduction (or tile); grid = n_blocks;
    * ``grid``: the grid itself, an int or up to 3 ints (with any ``block``
      of up to 3 dimensions).

    ``block`` defaults to :data:`DEFAULT_BLOCK`; ``shared_mem`` is the
    dynamic shared memory in bytes.  ``args`` are in the order of the
    kernel's parameters: arrays for pointer parameters (exact dtype,
    C-contiguous, fewer than 2**31 elements, all on the current device) and
    host numbers for scalars (converted here to ``numpy.int32`` /
    ``numpy.float32`` ...: a Python ``int`` never reaches a kernel).
    Launching zero threads or blocks is a no-op.

    Cheap by construction: the scalar conversions and the launch shape are
    validated once per distinct (kernel, scalars, shape) and cached; every
    call still checks each array's dtype, contiguity, size and device.
    """
    try:
        key = _key(kernel, args, n_threads, n_blocks, grid, block, shared_mem)
        prep = _prepared.get(key) if key is not None else None
    except TypeError:            # an unhashable argument: not cached, and refused below
        key = prep = None
    if prep is None:
        prep = _prepare(kernel, args, n_threads, n_blocks, grid, block, shared_mem)
        if prep is None:
            return
        if key is not None:
            if len(_prepared) > 4096:   # bounded: shapes repeat in training, not without end
                _prepared.clear()
            _prepared[key] = prep
    cupy = backend.cupy
    device = _arrays_ok(prep, args, cupy.ndarray if cupy is not None else None)
    if device is None or (device >= 0 and device != cupy.cuda.runtime.getDevice()):
        _explain_bad_arrays(kernel, prep, args)     # raises, naming the array and what is wrong
    call = prep.build(args, prep.args)
    fkey = device if options is None else (device, tuple(options))
    function = prep.functions.get(fkey)
    if function is None:
        function = prep.functions[fkey] = get_function(kernel, options)
    if prep.shared_mem:
        function(prep.grid, prep.block, call, shared_mem=prep.shared_mem)
    else:
        function(prep.grid, prep.block, call)
    if device >= 0 and _sync_check_enabled():
        stream = cupy.cuda.get_current_stream()
        if stream.is_capturing():  # CUDA refuses a sync inside a capture (it invalidates the graph)
            return
        try:
            stream.synchronize()
        except Exception as exc:  # pragma: no cover - needs a GPU
            shapes = ", ".join(f"{prep.params[i].name}={tuple(args[i].shape)}" for i, _, _ in prep.array_slots)
            raise KernelLaunchError(f"{kernel} failed (grid={prep.grid}, block={prep.block}, "
                                    f"shapes {shapes}): {exc}") from exc


def _explain_bad_arrays(kernel, prep, args):
    """The detailed checks, run only when the cheap ones failed: raise with the reason."""
    arrays = {}
    for i, _, _ in prep.array_slots:
        param = prep.params[i]
        _check_array(kernel, param, args[i])
        arrays[param.name] = args[i]
    backend.check_same_device(**arrays)
    _check_current_device(kernel, arrays)
    raise AssertionError(f"{kernel}: arrays failed the launch checks for no reason found")  # pragma: no cover

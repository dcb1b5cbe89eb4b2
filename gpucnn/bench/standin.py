"""A NumPy-backed stand-in for CuPy that runs no kernel and records every GPU operation.

``gpucnn bench --static`` runs gpucnn's CUDA code path on a machine without a
GPU through this module: while :func:`installed` is active,

* ``gpucnn.backend.cupy`` is :data:`standin` (``cuda.runtime`` answers one
  device; streams have CuPy's handles -- the null stream is 0 -- and run work
  at once, or capture gpucnn's launches into a graph: see :class:`_Stream`), and its arrays are
  :class:`DeviceArray`, a NumPy subclass that the backend treats as a GPU
  array -- so every layer, loss and optimizer takes its kernel path;
* the kernel loader builds modules whose functions record their launch
  (kernel, grid, block, dynamic shared memory) instead of running: outputs
  are left as they were allocated, which is fine for counting;
* every operation a CuPy array would turn into a GPU kernel or a transfer
  is recorded too: ufuncs and reductions, NumPy functions that compute,
  ``fill``/``copy``/``astype``, fancy indexing, slice assignment, creation
  that writes memory (``zeros``, ``arange``), host-to-device copies, and host
  synchronisations (``float(a)``, ``int(a)``, ``a.get()``...).  Views,
  reshapes and ``empty`` record nothing, as on CuPy.

The count of CuPy's own kernels is an estimate per operation (one kernel per
ufunc, reduction or copy, which is what CuPy launches for contiguous arrays);
gpucnn's own launches are exact.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import itertools
import threading
import types

import numpy as np

__all__ = ["Event", "Recorder", "DeviceArray", "standin", "installed", "stub_module_builder",
           "recording_builder"]


@dataclasses.dataclass
class Event:
    """One recorded operation: ``kind`` is ``kernel`` (gpucnn's), ``xp`` (a CuPy kernel),
    ``copy`` (host<->device), ``sync`` (the host waits for the device) or ``alloc`` (device
    memory handed out by the stand-in's ``empty``/``zeros``... and ufunc results are not
    counted: every CuPy op already counts as a launch)."""

    kind: str
    name: str
    grid: tuple | None = None
    block: tuple | None = None
    shared_mem: int = 0


class Recorder:
    """Where the events go while :func:`installed` is active (``paused`` drops them)."""

    def __init__(self):
        self.events: list[Event] = []
        self.paused = 0

    def add(self, kind, name, **kw):
        if not self.paused:
            self.events.append(Event(kind, name, **kw))

    @contextlib.contextmanager
    def pause(self):
        self.paused += 1
        try:
            yield
        finally:
            self.paused -= 1

    def take(self) -> list[Event]:
        out, self.events = self.events, []
        return out


_state = threading.local()


def _rec() -> Recorder | None:
    return getattr(_state, "recorder", None)


#: what an event of each kind does to a capture in progress: CUDA invalidates a capture on a host
#: synchronisation or a host-to-device copy; a CuPy operation would be captured by CUDA, but the
#: stand-in runs it at once and could not replay it
_BREAKS_CAPTURE = {
    "xp": "a CuPy operation ({}), which the stand-in cannot replay",
    "sync": "a host synchronisation ({}), which invalidates a CUDA stream capture",
    "copy": "a host-to-device copy ({}), which invalidates a CUDA stream capture",
}


def _record(kind, name, **kw):
    r = _rec()
    if r is not None:
        r.add(kind, name, **kw)


def _note(kind, name, **kw):
    """Record an event; one of the kinds in :data:`_BREAKS_CAPTURE` during a capture makes its
    ``end_capture`` fail (the first such event is the reason given)."""
    if kind in _BREAKS_CAPTURE:
        _spoil_capture(_BREAKS_CAPTURE[kind].format(name))
    _record(kind, name, **kw)


def _spoil_capture(problem: str) -> None:
    if getattr(_state, "capture", None) is not None and _state.capture_problem is None:
        _state.capture_problem = problem


def _plain(v):
    if isinstance(v, DeviceArray):
        return v.view(np.ndarray)
    if isinstance(v, (tuple, list)):
        return type(v)(_plain(x) for x in v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _wrap(v):
    if type(v) is np.ndarray:
        return v.view(DeviceArray)
    if isinstance(v, np.generic):          # CuPy reductions give 0-d device arrays, not host scalars
        return np.asarray(v).view(DeviceArray)
    if isinstance(v, tuple):
        return tuple(_wrap(x) for x in v)
    if isinstance(v, list):
        return [_wrap(x) for x in v]
    return v


class _Memory:
    """CuPy's MemoryPointer: the device (0) and the address (the NumPy buffer's)."""

    __slots__ = ("_array",)
    device_id = 0

    def __init__(self, array):
        self._array = array

    @property
    def ptr(self):
        return self._array.ctypes.data


class _Device:
    id = 0

    def __init__(self, device=0):
        pass

    def synchronize(self):
        _note("sync", "Device.synchronize")

    def use(self):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class _CachedMemory:
    """``array.data``: made on first access, then kept in the instance (a non-data descriptor, so
    later lookups find the instance's copy: as cheap as CuPy's C attribute)."""

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        mem = obj.__dict__["data"] = _Memory(obj)
        return mem


def _advanced(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, (np.ndarray, list)) or (isinstance(i, np.generic) and i.dtype == bool)
               for i in items)


class DeviceArray(np.ndarray):
    """A NumPy array that stands for a CuPy array (``gpucnn.backend`` treats it as one)."""

    __array_priority__ = 100.0

    data = _CachedMemory()     # CuPy's MemoryPointer: what the loader reads the device from

    def __array_finalize__(self, obj):
        # CuPy keeps contiguity as an attribute set when an array or view is made; so do we
        self._c_contiguous = self.flags.c_contiguous

    @property
    def device(self):
        return _Device()

    def __array_ufunc__(self, ufunc, method, *inputs, out=None, **kwargs):
        _note("xp", ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}")
        if out is not None:
            kwargs["out"] = tuple(_plain(o) for o in out)
        result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
        if out is not None:
            return out[0] if len(out) == 1 else out
        return _wrap(result)

    def __array_function__(self, func, types_, args, kwargs):
        name = func.__name__
        if name not in _FREE_FUNCTIONS:
            _note("xp", name)
        return _wrap(func(*_plain(args), **_plain(kwargs)))

    # -- methods that are CuPy kernels --------------------------------------------------
    def _kernel(name):  # noqa: N805 - a method factory
        def method(self, *args, **kwargs):
            _note("xp", name)
            return _wrap(getattr(np.ndarray, name)(self.view(np.ndarray), *_plain(args), **_plain(kwargs)))
        method.__name__ = name
        return method

    argmax = _kernel("argmax")
    argmin = _kernel("argmin")
    copy = _kernel("copy")
    fill = _kernel("fill")
    take = _kernel("take")
    put = _kernel("put")
    clip = _kernel("clip")
    cumsum = _kernel("cumsum")
    nonzero = _kernel("nonzero")
    flatten = _kernel("flatten")
    del _kernel

    def astype(self, dtype, *args, **kwargs):
        if np.dtype(dtype) != self.dtype or kwargs.get("copy", True):
            _note("xp", "astype")
        return _wrap(self.view(np.ndarray).astype(dtype, *args, **kwargs))

    def ravel(self, order="C"):
        if not self.flags.c_contiguous:
            _note("xp", "ravel (copy)")
        return _wrap(self.view(np.ndarray).ravel(order))

    def reshape(self, *shape, **kwargs):
        plain = self.view(np.ndarray)
        out = plain.reshape(*shape, **kwargs)
        if not np.shares_memory(out, plain):
            _note("xp", "reshape (copy)")
        return _wrap(out)

    def __getitem__(self, index):
        if _advanced(_plain(index)):
            _note("xp", "take (fancy index)")
        return _wrap(self.view(np.ndarray)[_plain(index)])

    def __setitem__(self, index, value):
        _note("xp", "copy (setitem)" if isinstance(value, np.ndarray) else "fill (setitem)")
        self.view(np.ndarray)[_plain(index)] = _plain(value)

    # -- host synchronisations ----------------------------------------------------------
    def _sync(name, convert):  # noqa: N805
        def method(self, *args):
            _note("sync", name)
            return convert(self.view(np.ndarray), *args)
        method.__name__ = name
        return method

    __float__ = _sync("float(array)", lambda a: float(a))
    __int__ = _sync("int(array)", lambda a: int(a))
    __index__ = _sync("int(array)", lambda a: a.__index__())
    __bool__ = _sync("bool(array)", lambda a: bool(a))
    item = _sync("array.item()", lambda a, *i: a.item(*i))
    tolist = _sync("array.tolist()", lambda a: a.tolist())
    del _sync

    def get(self, stream=None):
        _note("sync", "array.get() (device to host)")
        return np.array(self.view(np.ndarray), copy=True)

    def set(self, host, stream=None):
        _note("copy", "array.set() (host to device)")
        self.view(np.ndarray)[...] = host


#: NumPy functions that only make views or read metadata (no kernel on CuPy).
_FREE_FUNCTIONS = frozenset({
    "moveaxis", "swapaxes", "transpose", "reshape", "expand_dims", "squeeze", "broadcast_to",
    "atleast_1d", "atleast_2d", "shape", "ndim", "size", "result_type", "may_share_memory",
    "shares_memory", "empty_like", "ravel_multi_index", "iscomplexobj", "isrealobj",
})
#: stand-in functions that create memory without writing it
_ALLOC = frozenset({"empty", "empty_like"})
#: ... that write it (a memset or a fill kernel on CuPy)
_WRITE = frozenset({"zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "arange", "eye",
                    "linspace"})


def _function(name, fn):
    def call(*args, **kwargs):
        out = _wrap(fn(*_plain(args), **_plain(kwargs)))
        if name in _WRITE:
            _note("alloc", name)
            _note("xp", name)
            _allocating(getattr(out, "nbytes", 0))
        return out
    call.__name__ = name
    return call


def _asarray(a, dtype=None, order=None, **kwargs):
    if isinstance(a, DeviceArray):
        if dtype is not None and np.dtype(dtype) != a.dtype:
            return a.astype(dtype)
        return a
    _note("copy", "asarray (host to device)")
    return _wrap(np.array(a, dtype=dtype, copy=True))


def _ascontiguousarray(a, dtype=None):
    if isinstance(a, DeviceArray) and a.flags.c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
        return a
    if isinstance(a, DeviceArray):
        _note("xp", "ascontiguousarray (copy)")
        return _wrap(np.ascontiguousarray(a.view(np.ndarray), dtype=dtype))
    return _asarray(np.ascontiguousarray(a, dtype=dtype))


def _asnumpy(a, stream=None, **kwargs):
    if isinstance(a, DeviceArray):
        return a.get()
    return np.asarray(a)


class _Stream:
    """A CUDA stream: work runs at once; between ``begin_capture`` and ``end_capture`` the gpucnn
    kernels launched on the capturing stream are recorded into a :class:`_Graph` instead.

    As in CuPy, ``ptr`` is the handle: 0 for the null (legacy default) stream :attr:`null`, 2 for
    the per-thread default stream, a distinct non-zero value for every new ``Stream()``.  Capture
    is refused on the legacy stream (ptr 0 or 1, CuPy's own check and message), and what CUDA would
    not let into a graph -- a CuPy operation, a host synchronisation, a host-device copy, a device
    allocation (see :func:`_note`, :func:`_alloc`) -- makes ``end_capture`` fail.
    """

    _handles = itertools.count(0x7F0000001000, 0x100)     # addresses, as cudaStreamCreate hands out

    def __init__(self, null=False, non_blocking=False, ptds=False, priority=0):
        self.ptr = 0 if null else 2 if ptds else next(_Stream._handles)
        self.device_id = -1 if null or ptds else 0
        self._outer = []

    def __eq__(self, other):          # as CuPy: the same handle is the same stream
        return isinstance(other, _Stream) and other.ptr == self.ptr

    def __hash__(self):
        return self.ptr

    def __repr__(self):
        return f"<Stream {self.ptr} (device {self.device_id})>"

    def synchronize(self):
        _note("sync", "stream.synchronize")

    def is_capturing(self):
        capture = getattr(_state, "capture", None)
        return capture is not None and capture.stream == self

    def record(self, event=None):
        return object()

    def wait_event(self, event):
        pass

    def begin_capture(self, mode=None):
        if self.ptr in (0, 1):
            raise RuntimeError("cannot capture on the default (legacy) stream")   # CuPy's check
        if getattr(_state, "capture", None) is not None:
            raise RuntimeError("stand-in: a capture is already in progress")
        _state.capture, _state.capture_problem = _Capture(self), None

    def end_capture(self):
        capture, problem = getattr(_state, "capture", None), getattr(_state, "capture_problem", None)
        if capture is None or capture.stream != self:
            raise RuntimeError("stand-in: end_capture on a stream that is not capturing")
        _state.capture = _state.capture_problem = None
        if problem is not None:
            raise RuntimeError(f"stand-in: the capture held {problem}")
        return _Graph(capture.launches)

    def __enter__(self):
        self._outer.append(getattr(_state, "stream", None))
        _state.stream = self
        return self

    def __exit__(self, *exc):
        _state.stream = self._outer.pop()
        return False


_Stream.null = _Stream(null=True)
_Stream.ptds = _Stream(ptds=True)


def _current_stream() -> _Stream:
    return getattr(_state, "stream", None) or _Stream.null


@dataclasses.dataclass
class _Capture:
    """A capture in progress: the capturing stream and the launches recorded on it."""

    stream: _Stream
    launches: list = dataclasses.field(default_factory=list)

    def takes(self) -> bool:
        """Whether work issued now goes into this capture (it is issued on the capturing stream)."""
        return _current_stream() == self.stream


class _Graph:
    def __init__(self, launches):
        self.launches = launches

    def launch(self, stream=None):
        _record("graph", f"graph of {len(self.launches)} kernels")
        for fn, grid, block, args, shared_mem in self.launches:
            fn(grid, block, args, shared_mem=shared_mem)


def _memcpy_async(dst, src, size, kind, stream):
    """``cudaMemcpyAsync`` device to device: joins the graph when issued on the capturing stream."""
    capture = getattr(_state, "capture", None)
    if capture is not None and capture.stream.ptr == stream:
        capture.launches.append((_copy_node, None, None, (dst, src, size), 0))
        return
    _record("copy", "memcpyAsync (device to device)")
    ctypes.memmove(dst, src, size)


def _copy_node(grid, block, args, shared_mem=0):
    """A captured device-to-device copy, replayed."""
    ctypes.memmove(*args)


@contextlib.contextmanager
def _using_allocator(allocator=None):
    outer = getattr(_state, "allocator", None)
    _state.allocator = allocator
    try:
        yield
    finally:
        _state.allocator = outer


def _allocating(nbytes):
    allocator = getattr(_state, "allocator", None)
    if allocator is not None:
        allocator(int(nbytes))
    _spoil_capture("a device allocation")


class _StandIn(types.ModuleType):
    """``cupy``, as far as gpucnn uses it, on NumPy."""

    ndarray = DeviceArray
    __version__ = "stand-in (no GPU)"

    def __init__(self):
        super().__init__("gpucnn.bench.standin.cupy")
        runtime = types.SimpleNamespace(
            getDevice=lambda: 0, getDeviceCount=lambda: 1,
            getDeviceProperties=lambda i: {"name": b"stand-in GPU (no device)", "multiProcessorCount": 132},
            driverGetVersion=lambda: 0, runtimeGetVersion=lambda: 0, memcpyAsync=_memcpy_async,
            memcpyDeviceToDevice=3)
        self.cuda = types.SimpleNamespace(
            runtime=runtime, Device=_Device, Stream=_Stream, using_allocator=_using_allocator,
            get_current_stream=_current_stream)
        self.random = types.SimpleNamespace(seed=lambda *a, **k: None)
        self.asarray = self.array = _asarray
        self.ascontiguousarray = _ascontiguousarray
        self.asnumpy = _asnumpy

    # ``empty`` hands out zeroed memory (calloc: as cheap as empty for large arrays), so that
    # outputs of stubbed kernels are valid numbers (labels 0, finite activations).
    @staticmethod
    def empty(shape, dtype=float, order="C"):
        _note("alloc", "empty")
        out = np.zeros(shape, dtype, order).view(DeviceArray)
        _allocating(out.nbytes)
        return out

    @staticmethod
    def empty_like(a, dtype=None, order="K", shape=None):
        _note("alloc", "empty_like")
        out = np.zeros_like(a.view(np.ndarray) if isinstance(a, DeviceArray) else a, dtype, order,
                            shape=shape).view(DeviceArray)
        _allocating(out.nbytes)
        return out

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc) or not callable(attr) or isinstance(attr, type):
            value = attr                     # ufuncs dispatch through DeviceArray; dtypes pass through
        else:
            value = _function(name, attr)
        setattr(self, name, value)           # looked up once
        return value


standin = _StandIn()


def _no_kernel(grid, block, args, shared_mem=0):
    """A stubbed kernel: runs nothing."""


class _RecordingFunction:
    """A kernel that records its launch (or, while a stream captures, joins the graph), then runs
    ``inner`` -- a stub, or e.g. the test emulator's function."""

    def __init__(self, name, inner):
        self.name, self.inner = name, inner

    def __call__(self, grid, block, args, shared_mem=0, **kwargs):
        capture = getattr(_state, "capture", None)
        if capture is not None and capture.takes():
            capture.launches.append((self.inner, grid, block, args, shared_mem))
            return
        r = getattr(_state, "recorder", None)
        if r is not None and not r.paused:
            r.events.append(Event("kernel", self.name, tuple(grid), tuple(block), int(shared_mem)))
        self.inner(grid, block, args, shared_mem=shared_mem)


class _RecordingModule:
    def __init__(self, inner):
        self.inner = inner

    def get_function(self, kernel):
        return _RecordingFunction(kernel, _no_kernel if self.inner is None else self.inner.get_function(kernel))


def stub_module_builder(code, name, options):
    """A kernel-loader module builder whose functions record their launches and run nothing."""
    return _RecordingModule(None)


def recording_builder(inner):
    """A module builder recording every launch, then running it with ``inner``'s functions."""
    return lambda code, name, options: _RecordingModule(inner(code, name, options))


@contextlib.contextmanager
def installed(recorder: Recorder, builder=None):
    """Run gpucnn's CUDA path on the stand-in inside the block, recording into ``recorder``.

    ``builder``: a kernel-loader module builder whose functions really run the
    kernels on the stand-in's (NumPy) memory, e.g. the test emulator's; None
    stubs them out.
    """
    from .. import backend
    from ..cuda import loader

    saved_cupy, saved_device_of = backend.cupy, backend.device_of

    def device_of(a, name="array"):
        return "cuda" if isinstance(a, DeviceArray) else saved_device_of(a, name)

    _state.recorder = recorder
    backend.cupy, backend.device_of = standin, device_of
    try:
        with loader.use_module_builder(stub_module_builder if builder is None else recording_builder(builder)):
            yield standin
    finally:
        backend.cupy, backend.device_of = saved_cupy, saved_device_of
        _state.recorder = _state.capture = _state.capture_problem = _state.allocator = _state.stream = None

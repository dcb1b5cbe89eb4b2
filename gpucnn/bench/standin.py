"""A NumPy-backed stand-in for CuPy that runs no kernel and records every GPU operation.

``gpucnn bench --static`` runs gpucnn's CUDA code path on a machine without a
GPU through this module: while :func:`installed` is active,

* ``gpucnn.backend.cupy`` is :data:`standin` (``cuda.runtime`` answers one
  device; streams have CuPy's handles -- the null stream is 0 -- and run work
  at once, or capture gpucnn's launches into a graph: see :class:`_Stream`), and its arrays are
  :class:`DeviceArray`, which the backend treats as a GPU array -- so every
  layer, loss and optimizer takes its kernel path.  Like CuPy's, they are not
  NumPy arrays: NumPy refuses them (``np.asarray(a)`` raises), and so does a
  device operation given a NumPy array.  Every new one -- made by a
  constructor, an operation, ``astype``, a copy -- lives in memory the
  allocator in use handed out (``cuda.set_allocator``/``using_allocator``), as on CuPy;
* the kernel loader builds modules whose functions record their launch
  (kernel, grid, block, dynamic shared memory) instead of running: outputs
  are left as they were allocated (``empty`` memory is zeroed then, which is
  fine for counting; when kernels do run, e.g. on the test emulator, it holds
  garbage, as on CuPy);
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
    #: a kernel's arguments as launched (arrays and NumPy scalars), for the time model
    args: tuple = ()


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
    """``v`` with every :class:`DeviceArray` in it replaced by the NumPy array it holds."""
    if type(v) is DeviceArray:
        return v._a
    if isinstance(v, (tuple, list)):
        return type(v)(_plain(x) for x in v)
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return v


def _wrap(v):
    """A NumPy result as device arrays (recursively through tuples and lists): a view of device
    memory stays a view, anything else is a new array, in memory from the allocator."""
    if isinstance(v, np.ndarray):
        return DeviceArray(v) if _on_device(v) else _adopt(v)
    if isinstance(v, np.generic):          # CuPy reductions give 0-d device arrays, not host scalars
        return _adopt(np.asarray(v))
    if isinstance(v, tuple):
        return tuple(_wrap(x) for x in v)
    if isinstance(v, list):
        return [_wrap(x) for x in v]
    return v


# -- device memory ---------------------------------------------------------------------------
# Contract: every DeviceArray lives in memory an allocator handed out, as on CuPy, which calls
# the allocator in use (cupy.cuda.set_allocator / using_allocator) for every new array --
# constructors, operation results, astype, copies, fancy indexing -- and builds the array on the
# MemoryPointer it returns.  Views share their array's memory and allocate nothing.


class _Raw(np.ndarray):
    """A block of device memory (bytes); it owns its buffer, so every view's ``.base`` chain ends
    at it: :func:`_on_device` tells device memory from host memory by that."""


class _Memory:
    """CuPy's MemoryPointer: the device (0) and the address (the NumPy buffer's).  An allocator
    returns one over a block of device memory; ``array.data`` is one over the array's first byte."""

    __slots__ = ("_array",)
    device_id = 0

    def __init__(self, array):
        self._array = array

    @property
    def ptr(self):
        return self._array.ctypes.data


def _malloc(size):
    """The default allocator: a fresh block of ``size`` bytes (what ``cupy.cuda.alloc`` gives)."""
    return _Memory(_Raw((int(size),), np.uint8))


_global_allocator = _malloc      # cupy.cuda.set_allocator; using_allocator's is thread-local (_state)


def _get_allocator():
    return getattr(_state, "allocator", None) or _global_allocator


def _set_allocator(allocator=None):
    global _global_allocator
    if getattr(_state, "allocator", None) is not None:
        raise ValueError("Can't change the global allocator inside `using_allocator` context manager")
    _global_allocator = _malloc if allocator is None else allocator


@contextlib.contextmanager
def _using_allocator(allocator=None):
    outer = getattr(_state, "allocator", None)
    _state.allocator = _malloc if allocator is None else allocator
    try:
        yield
    finally:
        _state.allocator = outer


def _on_device(a) -> bool:
    """Whether NumPy array ``a`` is (a view of) device memory."""
    while a is not None:
        if type(a) is _Raw:
            return True
        a = getattr(a, "base", None)      # also through as_strided's wrapper, which is no ndarray
    return False


def _alloc(nbytes: int) -> np.ndarray:
    """``nbytes`` of device memory from the allocator in use; an allocator that raises fails the
    allocation, one that returns no MemoryPointer (or too few bytes) too.  A capture in progress
    is spoiled: its graph would keep pointing at memory the allocator may hand out again."""
    mem = _get_allocator()(nbytes)
    if type(mem) is not _Memory:
        raise TypeError(f"Cannot convert {type(mem).__name__} to cupy.cuda.memory.MemoryPointer")
    block = mem._array
    if not _on_device(block) or block.nbytes < nbytes:
        raise ValueError(f"stand-in: the allocator returned {block.nbytes} bytes of "
                         f"{'device' if _on_device(block) else 'host'} memory for {nbytes} bytes")
    _spoil_capture("a device allocation")
    return block


def _new(shape, dtype, order="C") -> DeviceArray:
    """A new device array, its contents whatever its memory held."""
    dtype = np.dtype(dtype)
    shape = (int(shape),) if np.ndim(shape) == 0 else tuple(int(n) for n in shape)
    nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    return DeviceArray(np.ndarray(shape, dtype, buffer=_alloc(nbytes), order=order))


def _uninitialised(a: DeviceArray) -> DeviceArray:
    """``a`` as ``empty`` hands it out.  On CuPy that memory holds garbage (the pool recycles freed
    blocks), so here it holds values chosen to be noticed when read before written: NaN (floats),
    the largest value (integers: an index or a count out of any range), True (bools).  Only with
    kernels stubbed (``installed(garbage=False)``, the default without a builder) is it zeroed:
    nothing writes the kernels' outputs then, and zeros keep the step running on valid numbers
    (labels 0, finite losses)."""
    kind = a.dtype.kind
    if not getattr(_state, "garbage", True):
        a._a[...] = 0
    elif kind in "fc":
        a._a[...] = np.nan
    elif kind in "iu":
        a._a[...] = np.iinfo(a.dtype).max
    else:
        a._a[...] = kind == "b"
    return a


def _adopt(host: np.ndarray) -> DeviceArray:
    """A new device array holding a copy of ``host`` (in its layout when that is Fortran order)."""
    fortran = host.flags.f_contiguous and not host.flags.c_contiguous
    out = _new(host.shape, host.dtype, "F" if fortran else "C")
    out._a[...] = host
    return out


class _Device:
    id = 0
    compute_capability = "90"          # as cupy.cuda.Device: a string, the H200 the stand-in models

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


class _Flags:
    """CuPy's ``ndarray.flags``: contiguity and ownership only (no ``writeable``)."""

    __slots__ = ("c_contiguous", "f_contiguous", "owndata")

    def __init__(self, a):
        self.c_contiguous, self.f_contiguous, self.owndata = a.flags.c_contiguous, a.flags.f_contiguous, a.base is None

    def __getitem__(self, name):
        return getattr(self, {"C_CONTIGUOUS": "c_contiguous", "F_CONTIGUOUS": "f_contiguous",
                              "OWNDATA": "owndata"}[name])


def _advanced(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, (np.ndarray, list)) or (isinstance(i, np.generic) and i.dtype == bool)
               for i in items)


def _as_view_index(index):
    """``index`` so that NumPy gives a view where CuPy does: ``a[0]`` of a 1-d array is a 0-d view
    on CuPy, a host scalar on NumPy (an Ellipsis at the end keeps NumPy's answer an array)."""
    items = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in items):
        return index
    return items + (Ellipsis,)


_NO_IMPLICIT_CONVERSION = ("Implicit conversion to a NumPy array is not allowed. "
                           "Please use `.get()` to construct a NumPy array explicitly.")   # CuPy's words


def _refuse_host_arrays(values, skip=()):
    """CuPy's kernels take device arrays and scalars: a NumPy array among ``values`` raises."""
    for i, x in enumerate(values):
        if isinstance(x, np.ndarray) and i not in skip:
            raise TypeError(f"Unsupported type {type(x)}")                            # CuPy's words


def _ufunc(ufunc, method, inputs, kwargs):
    """A NumPy ufunc (``method``: ``__call__``, ``reduce``...) as a CuPy kernel on device arrays."""
    out = kwargs.get("out")
    outs = () if out is None else out if isinstance(out, tuple) else (out,)
    _refuse_host_arrays(inputs + outs, skip=(1,) if method == "at" else ())   # ufunc.at: host indices are fine
    _note("xp", ufunc.__name__ if method == "__call__" else f"{ufunc.__name__}.{method}")
    if outs:
        kwargs = dict(kwargs, out=_plain(outs))
    result = getattr(ufunc, method)(*_plain(inputs), **kwargs)
    if outs:
        return outs[0] if len(outs) == 1 else outs
    return _wrap(result)


class _Ufunc:
    """``cupy.add`` ...: the NumPy ufunc, applied to device arrays as a CuPy kernel."""

    def __init__(self, ufunc):
        self._ufunc = ufunc
        self.__name__ = ufunc.__name__

    def __call__(self, *inputs, **kwargs):
        return _ufunc(self._ufunc, "__call__", inputs, kwargs)

    def _method(method):  # noqa: N805 - a method factory
        def call(self, *inputs, **kwargs):
            return _ufunc(self._ufunc, method, inputs, kwargs)
        call.__name__ = method
        return call

    reduce, accumulate, reduceat = _method("reduce"), _method("accumulate"), _method("reduceat")
    outer, at = _method("outer"), _method("at")
    del _method

    def __getattr__(self, name):          # nin, nout, identity, types ...
        return getattr(self._ufunc, name)

    def __repr__(self):
        return f"<stand-in ufunc '{self.__name__}'>"


def _operators() -> dict:
    """Python's operators for :class:`DeviceArray`: the stand-in's ufuncs, as on CuPy."""
    namespace = {}
    binary = {"add": np.add, "sub": np.subtract, "mul": np.multiply, "truediv": np.true_divide,
              "floordiv": np.floor_divide, "mod": np.remainder, "pow": np.power, "matmul": np.matmul,
              "and": np.bitwise_and, "or": np.bitwise_or, "xor": np.bitwise_xor, "lshift": np.left_shift,
              "rshift": np.right_shift}
    for name, uf in binary.items():
        namespace[f"__{name}__"] = lambda self, other, uf=uf: _ufunc(uf, "__call__", (self, other), {})
        namespace[f"__r{name}__"] = lambda self, other, uf=uf: _ufunc(uf, "__call__", (other, self), {})
        namespace[f"__i{name}__"] = lambda self, other, uf=uf: _ufunc(uf, "__call__", (self, other), {"out": (self,)})
    compare = {"lt": np.less, "le": np.less_equal, "eq": np.equal, "ne": np.not_equal, "gt": np.greater,
               "ge": np.greater_equal}
    for name, uf in compare.items():
        namespace[f"__{name}__"] = lambda self, other, uf=uf: _ufunc(uf, "__call__", (self, other), {})
    unary = {"neg": np.negative, "pos": np.positive, "abs": np.absolute, "invert": np.invert}
    for name, uf in unary.items():
        namespace[f"__{name}__"] = lambda self, uf=uf: _ufunc(uf, "__call__", (self,), {})
    namespace["__divmod__"] = lambda self, other: _ufunc(np.divmod, "__call__", (self, other), {})
    namespace["__rdivmod__"] = lambda self, other: _ufunc(np.divmod, "__call__", (other, self), {})
    return namespace


class DeviceArray:
    """A CuPy array on the stand-in: it holds a NumPy array (``_a``) that only the stand-in reads.

    Like CuPy's ``ndarray`` it is not a NumPy array: ``np.asarray(a)`` raises CuPy's TypeError
    (``__array__``), so does a NumPy function (``np.sum(a)``: ``__array_function__``) or ufunc
    (``np.exp(a)``: ``__array_ufunc__``) applied to it, and a NumPy array among a CuPy kernel's
    operands.  (CuPy itself hands some NumPy functions on to its own; the stand-in refuses them all:
    gpucnn calls them through its array module.)  The stand-in's module functions, the methods
    and the operators are CuPy's, recorded as such.
    """

    __slots__ = ("_a", "_c_contiguous", "_data")
    __array_priority__ = 100.0
    __hash__ = None            # unhashable, as CuPy's (its == is elementwise: see _operators)

    def __init__(self, a: np.ndarray):
        if not _on_device(a):
            raise RuntimeError("stand-in: a device array made outside the allocator (a stand-in bug: "
                               "new arrays go through _wrap or _new)")
        self._a = a
        # CuPy keeps contiguity as an attribute set when an array or view is made; so do we
        self._c_contiguous = a.flags.c_contiguous
        self._data = None

    # -- attributes ------------------------------------------------------------------------
    shape = property(lambda self: self._a.shape)
    dtype = property(lambda self: self._a.dtype)
    ndim = property(lambda self: self._a.ndim)
    size = property(lambda self: self._a.size)
    nbytes = property(lambda self: self._a.nbytes)
    itemsize = property(lambda self: self._a.itemsize)
    strides = property(lambda self: self._a.strides)
    flags = property(lambda self: _Flags(self._a))
    T = property(lambda self: DeviceArray(self._a.T))
    real = property(lambda self: _wrap(self._a.real))
    imag = property(lambda self: _wrap(self._a.imag))

    @property
    def data(self):
        """CuPy's MemoryPointer: what the loader reads the device and the address from."""
        if self._data is None:
            self._data = _Memory(self._a)
        return self._data

    @property
    def device(self):
        return _Device()

    def __len__(self):
        return len(self._a)

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    # -- NumPy refuses a device array, as it refuses CuPy's -----------------------------------
    def __array__(self, dtype=None, copy=None):
        raise TypeError(_NO_IMPLICIT_CONVERSION)

    def __array_function__(self, func, types_, args, kwargs):
        raise TypeError(f"numpy.{func.__name__} was applied to a device array (the stand-in's cupy.ndarray); "
                        f"call it through the array module (xp.{func.__name__}) -- CuPy refuses NumPy "
                        "functions it does not implement and any implicit conversion to NumPy")

    def __array_ufunc__(self, ufunc, method, *inputs, **kwargs):
        _refuse_host_arrays(inputs + tuple(kwargs.get("out") or ()))
        if (method == "__call__" and not kwargs and len(inputs) == 2 and isinstance(inputs[0], np.generic)
                and inputs[1] is self):
            return _ufunc(ufunc, method, inputs, kwargs)    # np.float32(2) * a: NumPy's scalar, CuPy's operator
        raise TypeError(f"numpy.{ufunc.__name__} was applied to a device array (the stand-in's cupy.ndarray); "
                        f"call it through the array module (xp.{ufunc.__name__})")

    # -- views: no kernel -----------------------------------------------------------------
    def view(self, dtype=None):
        return DeviceArray(self._a.view() if dtype is None else self._a.view(dtype))

    def transpose(self, *axes):
        return DeviceArray(self._a.transpose(*axes))

    def swapaxes(self, axis1, axis2):
        return DeviceArray(self._a.swapaxes(axis1, axis2))

    def squeeze(self, axis=None):
        return DeviceArray(self._a.squeeze(axis))

    def diagonal(self, offset=0, axis1=0, axis2=1):
        return DeviceArray(self._a.diagonal(offset, axis1, axis2))

    def ravel(self, order="C"):
        if not self._a.flags.c_contiguous:
            _note("xp", "ravel (copy)")
        return _wrap(self._a.ravel(order))

    def reshape(self, *shape, **kwargs):
        out = self._a.reshape(*shape, **kwargs)
        if not np.shares_memory(out, self._a):
            _note("xp", "reshape (copy)")
        return _wrap(out)

    # -- methods that are CuPy kernels --------------------------------------------------
    def _kernel(name, label=None):  # noqa: N805 - a method factory
        def method(self, *args, **kwargs):
            _note("xp", label or name)
            return _wrap(getattr(self._a, name)(*_plain(args), **_plain(kwargs)))
        method.__name__ = name
        return method

    argmax, argmin, argsort, sort = _kernel("argmax"), _kernel("argmin"), _kernel("argsort"), _kernel("sort")
    copy, fill, take, put, repeat = _kernel("copy"), _kernel("fill"), _kernel("take"), _kernel("put"), _kernel("repeat")
    clip, cumsum, cumprod, nonzero = _kernel("clip"), _kernel("cumsum"), _kernel("cumprod"), _kernel("nonzero")
    flatten, dot, round, conj = _kernel("flatten"), _kernel("dot"), _kernel("round"), _kernel("conj")
    mean, var, std, trace = _kernel("mean"), _kernel("var"), _kernel("std"), _kernel("trace")
    # reductions, named as the ufunc reductions NumPy runs for them
    sum, prod = _kernel("sum", "add.reduce"), _kernel("prod", "multiply.reduce")
    max, min = _kernel("max", "maximum.reduce"), _kernel("min", "minimum.reduce")
    any, all = _kernel("any", "logical_or.reduce"), _kernel("all", "logical_and.reduce")
    __copy__ = copy
    del _kernel

    def __deepcopy__(self, memo):
        return self.copy()

    def astype(self, dtype, order="K", casting=None, subok=None, copy=True):
        if np.dtype(dtype) != self.dtype or copy:
            _note("xp", "astype")
        out = self._a.astype(dtype, order=order, copy=copy)
        return self if out is self._a else _wrap(out)

    def __getitem__(self, index):
        index = _plain(index)
        if _advanced(index):
            _note("xp", "take (fancy index)")
        return _wrap(self._a[_as_view_index(index)])

    def __setitem__(self, index, value):
        if isinstance(value, np.ndarray):
            _note("copy", "setitem (host to device)")
        _note("xp", "copy (setitem)" if isinstance(value, (np.ndarray, DeviceArray)) else "fill (setitem)")
        self._a[_plain(index)] = _plain(value)

    # -- host synchronisations ----------------------------------------------------------
    def _sync(name, convert):  # noqa: N805
        def method(self, *args):
            _note("sync", name)
            return convert(self._a, *args)
        method.__name__ = name
        return method

    __float__ = _sync("float(array)", lambda a: float(a))
    __int__ = _sync("int(array)", lambda a: int(a))
    __index__ = _sync("int(array)", lambda a: a.__index__())
    __bool__ = _sync("bool(array)", lambda a: bool(a))
    __complex__ = _sync("complex(array)", lambda a: complex(a))
    __repr__ = _sync("repr(array)", lambda a: repr(a).replace("array(", "DeviceArray(", 1))
    __str__ = _sync("str(array)", lambda a: str(a))
    __format__ = _sync("format(array)", lambda a, spec: format(a, spec))
    item = _sync("array.item()", lambda a, *i: a.item(*i))
    tolist = _sync("array.tolist()", lambda a: a.tolist())
    del _sync

    def get(self, stream=None, order="C", out=None, blocking=True):
        _note("sync", "array.get() (device to host)")
        if out is not None:
            out[...] = self._a
            return out
        return np.array(self._a, copy=True, order=order)

    def set(self, arr, stream=None):
        if not isinstance(arr, np.ndarray):
            raise TypeError("Only numpy.ndarray can be set to cupy.ndarray")                 # CuPy's checks
        if arr.dtype != self.dtype:
            raise TypeError(f"{arr.dtype} array cannot be set to {self.dtype} array")
        if arr.shape != self.shape:
            raise ValueError(f"Shape mismatch. Old shape: {self.shape}, new shape: {arr.shape}")
        _note("copy", "array.set() (host to device)")
        self._a[...] = arr


for _name, _method in _operators().items():
    setattr(DeviceArray, _name, _method)
del _name, _method


#: NumPy functions that only make views or read metadata (no kernel on CuPy).
_FREE_FUNCTIONS = frozenset({
    "moveaxis", "swapaxes", "transpose", "reshape", "expand_dims", "squeeze", "broadcast_to",
    "broadcast_arrays", "atleast_1d", "atleast_2d", "atleast_3d", "split", "array_split", "as_strided",
    "shape", "ndim", "size", "result_type", "can_cast", "promote_types", "issubdtype", "isscalar",
    "may_share_memory", "shares_memory", "ravel_multi_index", "iscomplexobj", "isrealobj",
})
#: stand-in functions that allocate memory and write it (a memset or a fill kernel on CuPy)
_WRITE = frozenset({"zeros", "zeros_like", "ones", "ones_like", "full", "full_like", "arange", "eye",
                    "linspace"})


def _function(name, fn):
    """``cupy.<name>``: NumPy's function run on the device arrays' memory, recorded as the CuPy
    kernel it is -- so that it counts as a launch and spoils a capture, which could not replay it
    -- unless it only makes views or reads metadata."""
    def call(*args, **kwargs):
        if name in _WRITE:
            _note("alloc", name)
        if name not in _FREE_FUNCTIONS:
            _note("xp", name)
        return _wrap(fn(*_plain(args), **_plain(kwargs)))
    call.__name__ = name
    return call


def _asarray(a, dtype=None, order=None, **kwargs):
    if isinstance(a, DeviceArray):
        if dtype is not None and np.dtype(dtype) != a.dtype:
            return a.astype(dtype)
        return a
    _note("copy", "asarray (host to device)")
    return _adopt(np.asarray(a, dtype=dtype))


def _ascontiguousarray(a, dtype=None):
    if isinstance(a, DeviceArray):
        if a._c_contiguous and (dtype is None or np.dtype(dtype) == a.dtype):
            return a
        _note("xp", "ascontiguousarray (copy)")
        return _wrap(np.ascontiguousarray(a._a, dtype=dtype))
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
            runtime=runtime, Device=_Device, Stream=_Stream, get_current_stream=_current_stream,
            alloc=lambda size: _get_allocator()(size), get_allocator=_get_allocator,
            set_allocator=_set_allocator, using_allocator=_using_allocator)
        self.random = types.SimpleNamespace(seed=lambda *a, **k: None)
        self.lib = types.SimpleNamespace(stride_tricks=types.SimpleNamespace(
            as_strided=_function("as_strided", np.lib.stride_tricks.as_strided)))
        self.asarray = self.array = _asarray
        self.ascontiguousarray = _ascontiguousarray
        self.asnumpy = _asnumpy

    @staticmethod
    def empty(shape, dtype=float, order="C"):
        _note("alloc", "empty")
        return _uninitialised(_new(shape, dtype, order))

    @staticmethod
    def empty_like(a, dtype=None, order="K", shape=None):
        _note("alloc", "empty_like")
        a = _plain(a)
        fortran = order == "F" or (order in "AK" and a.flags.f_contiguous and not a.flags.c_contiguous)
        return _uninitialised(_new(a.shape if shape is None else shape, a.dtype if dtype is None else dtype,
                                   "F" if fortran else "C"))

    def __getattr__(self, name):
        attr = getattr(np, name)
        if isinstance(attr, np.ufunc):
            value = _Ufunc(attr)
        elif not callable(attr) or isinstance(attr, type):
            value = attr                     # dtypes, constants pass through
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
        self.name = name
        self.run = inner if inner is _no_kernel else _on_host_arrays(inner)

    def __call__(self, grid, block, args, shared_mem=0, **kwargs):
        capture = getattr(_state, "capture", None)
        if capture is not None and capture.takes():
            capture.launches.append((self.run, grid, block, args, shared_mem))
            return
        r = getattr(_state, "recorder", None)
        if r is not None and not r.paused:
            r.events.append(Event("kernel", self.name, tuple(grid), tuple(block), int(shared_mem), tuple(args)))
        self.run(grid, block, args, shared_mem=shared_mem)


def _on_host_arrays(inner):
    """``inner`` (e.g. the emulator's kernel, which reads NumPy arrays) given the device arrays' memory."""
    def run(grid, block, args, shared_mem=0):
        inner(grid, block, _plain(tuple(args)), shared_mem=shared_mem)
    return run


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
def installed(recorder: Recorder, builder=None, *, garbage: bool | None = None):
    """Run gpucnn's CUDA path on the stand-in inside the block, recording into ``recorder``.

    ``builder``: a kernel-loader module builder whose functions really run the
    kernels on the stand-in's (NumPy) memory, e.g. the test emulator's; None
    stubs them out.  ``garbage``: whether ``empty`` memory holds garbage, as on
    CuPy (default: when kernels run, i.e. with a ``builder``; see :func:`_uninitialised`).
    """
    from .. import backend
    from ..cuda import loader

    global _global_allocator
    saved_cupy, saved_allocator = backend.cupy, _global_allocator
    _state.recorder, _state.garbage = recorder, builder is not None if garbage is None else bool(garbage)
    backend.cupy = standin
    try:
        with loader.use_module_builder(stub_module_builder if builder is None else recording_builder(builder)):
            yield standin
    finally:
        backend.cupy, _global_allocator = saved_cupy, saved_allocator
        _state.recorder = _state.capture = _state.capture_problem = _state.allocator = _state.stream = None
        _state.garbage = True

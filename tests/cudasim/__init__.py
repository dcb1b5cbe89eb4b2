"""cudasim: a small test-only CUDA emulator that runs the unchanged ``kernels/*.cu``
sources on the CPU, so GPU kernels can be tested against the NumPy path without
a GPU.  Import it as ``from cudasim import load_module`` (``tests/`` is put on
``sys.path`` by ``tests/conftest.py``; ``run_sanitized`` does the same for its
subprocess).

Usage (same call shape as ``cupy.RawModule``)::

    mod = load_module(code=src, name="conv2d_forward.cu", options=("-I", "kernels"))
    fn = mod.get_function("conv2d_forward")
    fn((gx, gy, gz), (bx, by, bz), (x, w, y, np.int32(n), np.float32(a)), shared_mem=0)

Design
------
* Build: the source goes through ``g++ -std=c++20 -O1 -g -fPIC -shared -pthread
  -include cudasim.h``.  The shim maps the CUDA keywords to C++, defines
  ``dim3``/``uint3``, the ``thread_local`` built-ins ``threadIdx``, ``blockIdx``,
  ``blockDim``, ``gridDim``, ``__syncthreads``, warp shuffles, ``atomic*``
  (``std::atomic_ref``), ``__ldg`` and the fast-math intrinsics.  A textual
  pass (line numbers unchanged, so ``#line`` directives and g++ diagnostics keep
  pointing at the real ``.cu`` lines) turns static ``__shared__`` arrays into
  function-local ``static`` arrays that register themselves, and
  ``extern __shared__ T s[]`` into a pointer to one per-module dynamic
  shared-memory buffer.  For every ``__global__`` kernel a generated
  ``extern "C" sim_launch_<name>`` unpacks ``void** args`` with the parameter
  types parsed from the kernel's signature.  The ``.so`` is cached by a hash
  of (source, included headers, options, shim, flags, compiler); gpucnn's
  loader hands over a source with its ``kernels/*.cuh`` already expanded
  (gpucnn/cuda/sources.py), so a header edit changes the source itself.
* Run: blocks run one after another.  Inside a block the CUDA threads run as a
  plain loop, or -- when the kernel (or a function it calls) uses
  ``__syncthreads``/``__syncwarp``/``__shfl*`` -- as one ``std::thread`` each,
  meeting at a mutex/condvar barrier (exited threads drop out of it).
  Shared memory (static and dynamic) is filled with 0xFF (float NaN) before
  every block, so reading shared memory nobody wrote shows up as NaN.
* Arguments: numpy arrays stand in for device buffers and are type-checked
  against the C signature (exact dtype, C-contiguous); scalars must be the
  exact numpy scalar type (``np.int32`` for ``int``...): a Python int/float is
  rejected because CuPy would pass it as a 64-bit value.  Each array is copied
  into a buffer with 256-byte guard zones before and after it, filled with
  *signalling* NaNs (of the array's element width) tagged with the argument's
  position: an out-of-range read returns NaN (ints read about -6e6), and an
  out-of-range write of anything computed from them (arithmetic quiets the
  NaN) or copied from another argument's guard changes the guard.  After the
  launch damaged guards raise :class:`OutOfBoundsWrite` naming the kernel and
  argument, ``const`` buffers are checked unchanged, and the data is copied
  back.
* Sanitizers: ``sanitize="address"`` (ASan+UBSan, guards poisoned so any
  out-of-range read or write is reported) or ``"thread"`` (TSan: data races
  between the threads of a block, e.g. a missing ``__syncthreads``).  The
  interpreter is not instrumented, so such modules only load in a process
  started by :func:`run_sanitized`, which preloads the runtime and sets
  ``GPUCNN_CUDASIM_SANITIZE`` so plain ``load_module`` calls build sanitized.

Limits (what it cannot catch or model): warp-synchronous code that relies on
lock-step execution without ``__syncwarp`` (threads here are independent; TSan
may report it, which is right on Volta+); divergent ``__syncthreads`` (threads
waiting at different barriers just pair up); real scheduling, memory
coalescing, bank conflicts, timing; launch-bound/register limits and the 48 KiB
default dynamic shared-memory limit (only the 227 KiB hardware maximum is
checked); ``__constant__``/``cudaMemcpyToSymbol``, textures, cooperative
groups, ``__half``, template kernels (``name_expressions``); an out-of-range
write of the guard's own bits (``y[n] = y[n]``); out-of-range accesses further
than 256 bytes away (they hit other memory: garbage or a crash, unless the
build is sanitized); races in serial mode.  Launches of one
module are serialized.  Several threads per block cost ~100 us each.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["load_module", "RawModule", "SimModule", "SimFunction", "CudaSimError", "OutOfBoundsWrite",
           "CompileError", "run_sanitized", "sanitizer_available", "stats"]

HERE = Path(__file__).resolve().parent
SHIM = HERE / "cudasim.h"
CXX = os.environ.get("CXX", "g++")
BASE_FLAGS = ("-std=c++20", "-O1", "-g", "-fPIC", "-shared", "-pthread", "-fno-strict-aliasing", "-w")
SAN_FLAGS = {"address": ("-fsanitize=address,undefined", "-fno-omit-frame-pointer"),
             "thread": ("-fsanitize=thread",)}
SAN_LIB = {"address": "libasan.so", "thread": "libtsan.so"}
GUARD = 256
stats = {"compiles": 0, "disk_hits": 0, "memory_hits": 0}

# C type -> numpy dtype (None: void*, any dtype).
CTYPES = {
    "float": np.float32, "double": np.float64, "int": np.int32, "int32_t": np.int32,
    "unsigned int": np.uint32, "uint32_t": np.uint32, "long long": np.int64, "long": np.int64,
    "int64_t": np.int64, "unsigned long long": np.uint64, "unsigned long": np.uint64,
    "uint64_t": np.uint64, "size_t": np.uint64, "short": np.int16, "int16_t": np.int16,
    "unsigned short": np.uint16, "uint16_t": np.uint16, "char": np.int8, "signed char": np.int8,
    "int8_t": np.int8, "unsigned char": np.uint8, "uint8_t": np.uint8, "bool": np.bool_, "void": None,
}
SYNC_RE = re.compile(r"\b(__syncthreads|__syncwarp|__shfl\w*_sync|mma_sync_\w+)\b")


class CudaSimError(RuntimeError):
    """A launch failed (bad configuration, error raised inside the kernel...)."""


class OutOfBoundsWrite(CudaSimError):
    """A kernel wrote into the guard zone of an argument (or through a const pointer)."""


class CompileError(CudaSimError):
    """g++ rejected the kernel source; the message holds its stderr."""


# ---------------------------------------------------------------- source parsing
def _blank(text: str) -> str:
    """Comments, string/char literals and preprocessor lines -> spaces (offsets kept)."""
    pat = re.compile(r'//[^\n]*|/\*.*?\*/|"(?:\\.|[^"\\\n])*"|\'(?:\\.|[^\'\\\n])*\'|^[ \t]*#(?:[^\n]*\\\n)*[^\n]*',
                     re.S | re.M)
    return pat.sub(lambda m: m.group() if m.group() == '"C"' else re.sub(r"[^\n]", " ", m.group()), text)


def _match(text: str, i: int, open_: str, close: str) -> int:
    """Index just past the bracket closing the one at text[i]."""
    depth = 0
    for j in range(i, len(text)):
        depth += {open_: 1, close: -1}.get(text[j], 0)
        if depth == 0:
            return j + 1
    raise CompileError(f"unbalanced {open_!r} in kernel source")


def _functions(text: str):
    """(header, body) of every top-level brace block, looking inside extern "C" { }."""
    out, start, i = [], 0, 0
    while i < len(text):
        c = text[i]
        if c in ";}":
            start = i + 1
        elif c == "{":
            end = _match(text, i, "{", "}")
            header = text[start:i]
            if re.fullmatch(r'\s*extern\s+"C"\s*', header):
                out += _functions(text[i + 1:end - 1])
            else:
                out.append((header, text[i + 1:end - 1]))
            i, start = end, end
            continue
        i += 1
    return out


@dataclass
class Param:
    name: str
    ctype: str        # base C type, e.g. "float", "unsigned int"
    pointer: bool
    const: bool       # pointee is const
    supported: bool

    @property
    def cdecl(self) -> str:
        return (("const " if self.const else "") + self.ctype + ("*" if self.pointer else "")) if self.supported else "?"


def _param(text: str) -> Param:
    toks = [t for t in re.findall(r"\w+|\*", text) if t not in ("__restrict__", "__restrict", "restrict", "volatile")]
    name, toks = toks[-1], toks[:-1]
    stars = toks.count("*")
    first_star = toks.index("*") if stars else len(toks)
    const = "const" in toks[:first_star]
    base = " ".join(t for t in toks if t not in ("const", "*", "signed"))
    base = {"unsigned": "unsigned int", "long long int": "long long", "long int": "long",
            "unsigned long long int": "unsigned long long", "": "int"}.get(base, base)
    ok = stars <= 1 and base in CTYPES and (stars == 1 or base != "void")
    return Param(name, base, stars == 1, const, ok)


def _scan(source: str):
    """{kernel name: ([Param], needs_threads)} for every non-template __global__ function."""
    clean = _blank(source)
    clean = re.sub(r"__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)", lambda m: " " * len(m.group()), clean)
    funcs = []
    for header, body in _functions(clean):
        m = re.search(r"(\w+)\s*\(([^()]*)\)\s*(?:const\s*)?$", header)
        if m:
            funcs.append((header, m.group(1), m.group(2), body))
    syncing = set()
    changed = True
    while changed:  # transitive: a kernel calling a __device__ helper that syncs
        changed = False
        for _, name, _, body in funcs:
            if name not in syncing and (SYNC_RE.search(body) or
                                        any(re.search(rf"\b{s}\s*(?:<[^;{{}}()]*>)?\s*\(", body) for s in syncing)):
                syncing.add(name)
                changed = True
    kernels = {}
    for header, name, params, _ in funcs:
        if re.search(r"\b__global__\b", header) and not re.search(r"\btemplate\b", header):
            ps = [_param(p) for p in params.split(",")] if params.strip() not in ("", "void") else []
            kernels[name] = (ps, name in syncing)
    return kernels


def _rewrite_shared(src: str) -> str:
    """extern __shared__ -> pointer into cudasim::dyn_shared; __shared__ -> registered static.
    Matches are searched in the comment-blanked text (so comments are left alone) and
    replacements stay on the declaration's lines, so line numbers do not move."""
    counter = iter(range(1 << 30))

    def dyn(m):
        t = re.sub(r"__align__\s*\(\s*\d+\s*\)", "", m.group(1)).strip()
        return f"[[maybe_unused]] static {t}* const {m.group(2)} = reinterpret_cast<{t}*>(::cudasim::dyn_shared);"

    def static(m):
        decl, regs = m.group(1), []
        depth, pieces, cur = 0, [], ""
        for ch in decl:
            depth += {"[": 1, "(": 1, "]": -1, ")": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                pieces.append(cur)
                cur = ""
            else:
                cur += ch
        for piece in pieces + [cur]:
            name = re.findall(r"(\w+)\s*(?:\[|$)", piece.strip())[0]
            regs.append(f"static ::cudasim::SharedReg __cudasim_sreg{next(counter)}((void*)&{name}, sizeof({name}));")
        return f"static {decl}; " + " ".join(regs)

    for pattern, repl in ((r"\bextern\s+__shared__\s+([^;\[]*?)\b(\w+)\s*\[\s*\]\s*;", dyn),
                          (r"\b__shared__\s+([^;]*);", static)):
        out, last = [], 0
        for m in re.finditer(pattern, _blank(src)):
            out += [src[last:m.start()], repl(m)]
            last = m.end()
        src = "".join(out) + src[last:]
    return src


def _launchers(kernels) -> str:
    out = ['\n#line 1 "<cudasim launchers>"']
    for name, (params, _) in kernels.items():
        if all(p.supported for p in params):
            call = ", ".join(f"*({p.cdecl}*)a[{i}]" for i, p in enumerate(params))
            out.append(f'extern "C" int sim_launch_{name}(const unsigned* g, const unsigned* b, unsigned long shmem, '
                       f"int threaded, void** a, char* err, unsigned long errlen) {{ return ::cudasim::launch"
                       f"(g, b, shmem, threaded, err, errlen, [&] {{ {name}({call}); }}); }}")
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------- building
def _run(cmd):
    return subprocess.run(cmd, capture_output=True, text=True)


_compiler_id = None


def _cache_dir() -> Path:
    d = os.environ.get("GPUCNN_CUDASIM_CACHE")
    if not d:
        xdg = os.environ.get("XDG_CACHE_HOME")
        d = os.path.join(xdg, "gpucnn-cudasim") if xdg else os.path.join(tempfile.gettempdir(), f"gpucnn-cudasim-{os.getuid()}")
    return Path(d)


def _translate_options(options, path):
    """Keep the nvcc/NVRTC options that mean something to g++: -I, -D, -U."""
    flags, opts = [], list(options)
    if path is not None:
        flags.append(f"-I{Path(path).resolve().parent}")
    it = iter(opts)
    for o in it:
        for short, long_ in (("-I", "--include-path="), ("-D", "--define-macro="), ("-U", "--undefine-macro=")):
            if o == short:
                flags.append(short + next(it))
            elif o.startswith(long_):
                flags.append(short + o[len(long_):])
            elif o.startswith(short):
                flags.append(o)
    return [f if not f.startswith("-I") else "-I" + str(Path(f[2:]).resolve()) for f in flags]


def _headers_digest(flags) -> bytes:
    h = hashlib.sha256()
    for f in flags:
        if f.startswith("-I") and os.path.isdir(f[2:]):
            for p in sorted(Path(f[2:]).glob("*")):
                if p.suffix in (".h", ".cuh", ".hpp", ".inc") and p.is_file():
                    h.update(p.name.encode() + p.read_bytes())
    return h.digest()


_memo: dict = {}


def load_module(code: str | None = None, name: str | None = None, options=(), *,
                path: str | os.PathLike | None = None, sanitize: str | None = None,
                threaded: bool | None = None) -> "SimModule":
    """Compile (or fetch from the cache) a CUDA source and return a :class:`SimModule`.

    ``load_module(code, name, options)`` has the shape of a gpucnn.cuda.loader builder.

    ``code`` or ``path`` gives the source; ``name`` is the file name diagnostics use.
    ``options`` are nvcc/NVRTC style (``-I``, ``-D``, ``-U`` are honoured, the rest ignored).
    ``sanitize``: None / "address" / "thread"; default from ``$GPUCNN_CUDASIM_SANITIZE``.
    ``threaded``: force real threads (True) or the serial loop (False) for every kernel;
    None decides per kernel from its use of __syncthreads / warp functions.
    """
    global _compiler_id
    if (code is None) == (path is None):
        raise TypeError("load_module: give exactly one of code= or path=")
    if code is None:
        code = Path(path).read_text()
        name = name or str(path)
    name = name or "<cudasim source>"
    if sanitize is None:
        sanitize = os.environ.get("GPUCNN_CUDASIM_SANITIZE", "").strip() or None
    if sanitize in ("none", "0"):
        sanitize = None
    if sanitize not in (None, "address", "thread"):
        raise ValueError(f"sanitize must be None, 'address' or 'thread', not {sanitize!r}")
    if sanitize and not _runtime_loaded(sanitize):
        raise CudaSimError(f"sanitize={sanitize!r} modules need the {SAN_LIB[sanitize]} runtime preloaded into the "
                           "interpreter: run the test through cudasim.run_sanitized(...)")
    kernels = _scan(code)
    text = f'#line 1 "{name}"\n' + _rewrite_shared(code) + _launchers(kernels)
    flags = list(BASE_FLAGS) + list(SAN_FLAGS.get(sanitize, ())) + _translate_options(options, path)
    if _compiler_id is None:
        _compiler_id = _run([CXX, "--version"]).stdout
    key = hashlib.sha256("\0".join([text, *flags, SHIM.read_text(), _compiler_id]).encode()
                         + _headers_digest(flags)).hexdigest()[:24]
    if key in _memo:
        stats["memory_hits"] += 1
    else:
        d = _cache_dir() / key
        so = d / "module.so"
        if so.exists():
            stats["disk_hits"] += 1
        else:
            d.mkdir(parents=True, exist_ok=True)
            cpp, tmp = d / f"source.{os.getpid()}.cpp", d / f"module.{os.getpid()}.tmp.so"
            cpp.write_text(text)  # per-process names: parallel test processes may build the same key
            r = _run([CXX, *flags, "-include", str(SHIM), "-x", "c++", str(cpp), "-o", str(tmp)])
            if r.returncode != 0:
                tmp.unlink(missing_ok=True)
                raise CompileError(f"g++ failed to compile {name} (cudasim):\n{r.stderr}")
            os.replace(cpp, d / "source.cpp")  # kept for reading what was compiled
            os.replace(tmp, so)
            stats["compiles"] += 1
        _memo[key] = ctypes.CDLL(str(so))
    return SimModule(_memo[key], kernels, name, sanitize, threaded)


def RawModule(code=None, *, path=None, options=(), name_expressions=None, **_ignored):
    """``cupy.RawModule`` look-alike (keyword arguments of CuPy that have no meaning here are ignored)."""
    if name_expressions:
        raise CudaSimError("cudasim does not support template kernels (name_expressions)")
    return load_module(code=code, path=path, options=options)


class SimModule:
    def __init__(self, lib, kernels, name, sanitize, threaded):
        self._lib, self._kernels, self.name, self.sanitize, self._threaded = lib, kernels, name, sanitize, threaded

    @property
    def kernel_names(self):
        return sorted(self._kernels)

    def get_function(self, name: str) -> "SimFunction":
        if name not in self._kernels:
            raise CudaSimError(f"no __global__ kernel {name!r} in {self.name} (found: {', '.join(self.kernel_names)})")
        params, syncs = self._kernels[name]
        bad = [p for p in params if not p.supported]
        if bad:
            raise CudaSimError(f"kernel {name!r}: cudasim cannot pass parameter(s) "
                               + ", ".join(repr(p.name) for p in bad) + " (unsupported C type)")
        fn = getattr(self._lib, f"sim_launch_{name}")
        fn.argtypes = [ctypes.POINTER(ctypes.c_uint)] * 2 + [ctypes.c_ulong, ctypes.c_int,
                                                              ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p,
                                                              ctypes.c_ulong]
        fn.restype = ctypes.c_int
        return SimFunction(name, params, fn, syncs if self._threaded is None else self._threaded, self.sanitize)


# ---------------------------------------------------------------- launching
def _pattern(n: int, itemsize: int, tag: int) -> np.ndarray:
    """n guard bytes: signalling NaNs (for float32/float64 views) carrying the argument's tag.
    Any arithmetic on a signalling NaN yields a quiet NaN with other bits, and a copy from
    another argument's guard carries another tag, so both show up as damage."""
    word = {8: ("<u8", 0xFFF4000000000000), 4: ("<u4", 0xFFA00000), 2: ("<u2", 0xFD00), 1: ("<u1", 0xA0)}
    dt, base = word.get(itemsize, word[1])
    one = np.array([base | (tag * 0x0101 & (0xFF if dt == "<u1" else 0xFFFF)) or 1], dt).view(np.uint8)
    return np.tile(one, -(-n // one.size))[:n]


def _dims(v, what, limits):
    t = (v,) if isinstance(v, (int, np.integer)) else tuple(v)
    if not 1 <= len(t) <= 3 or not all(isinstance(x, (int, np.integer)) for x in t):
        raise TypeError(f"{what} must be an int or a tuple of 1 to 3 ints, got {v!r}")
    t = tuple(int(x) for x in t) + (1,) * (3 - len(t))
    if any(x < 1 or x > lim for x, lim in zip(t, limits)):
        raise CudaSimError(f"invalid {what} {t}: each dimension must be in 1..{limits} (cudaErrorInvalidConfiguration)")
    return t


class _Guarded:
    """One device buffer: the array's bytes between two guard zones of the NaN pattern."""

    def __init__(self, arr: np.ndarray, tag: int):
        self.arr, self.n, self.tag = arr, arr.nbytes, tag
        self.lo, self.hi = GUARD, GUARD + self.n
        total = self.hi + GUARD + (-self.n % 8)
        store = np.empty(total + 64, np.uint8)
        off = -store.ctypes.data % 64
        self.raw = store[off:off + total]
        self.raw[:] = _pattern(total, arr.itemsize, tag)
        self.raw[self.lo:self.hi] = arr.reshape(-1).view(np.uint8)
        self.base = self.raw.ctypes.data
        self.ptr = self.base + self.lo

    def damage(self):
        """Element indices (relative to the array start) of the first damaged guard byte, before/after."""
        pat, item = _pattern(len(self.raw), self.arr.itemsize, self.tag), self.arr.itemsize
        bad = [np.flatnonzero(self.raw[s] != pat[s]) + s.start for s in (slice(0, self.lo), slice(self.hi, None))]
        return [(b.size, (int(b[0]) - self.lo) // item) for b in bad if b.size]

    def data(self):
        return self.raw[self.lo:self.hi]


class SimFunction:
    """A kernel; call it like a ``cupy.RawKernel``: ``fn(grid, block, args, shared_mem=0)``."""

    def __init__(self, name, params, launcher, threaded, sanitize):
        self.name, self.params, self._launch, self.threaded, self.sanitize = name, params, launcher, threaded, sanitize

    def _check(self, i, p, a):
        where = f"kernel {self.name!r}: args[{i}] {p.name!r} (C type {p.cdecl})"
        if p.pointer:
            want = CTYPES[p.ctype]
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{where} needs a numpy array standing in for a device buffer, got {type(a).__name__}")
            if want is not None and a.dtype != want:
                raise TypeError(f"{where} needs a {np.dtype(want).name} array, got dtype {a.dtype}")
            if not a.flags.c_contiguous:
                raise TypeError(f"{where} needs a C-contiguous array, got a non-contiguous view (strides {a.strides})")
            if not p.const and not a.flags.writeable:
                raise TypeError(f"{where} is written by the kernel but the array is read-only")
        else:
            want = CTYPES[p.ctype]
            if type(a) is not want:
                extra = (" (a Python int/float would reach the kernel as a 64-bit value on CuPy; wrap it as "
                         f"np.{np.dtype(want).name}(...))") if isinstance(a, (int, float)) else ""
                raise TypeError(f"{where} needs a numpy.{np.dtype(want).name} scalar, got "
                                f"{type(a).__module__.replace('builtins', 'Python')} {type(a).__name__} {a!r}{extra}")

    def __call__(self, grid, block, args, *, shared_mem=0, stream=None, threaded=None):
        args = tuple(args)
        if len(args) != len(self.params):
            raise TypeError(f"kernel {self.name!r} takes {len(self.params)} arguments "
                            f"({', '.join(p.cdecl + ' ' + p.name for p in self.params)}), got {len(args)}")
        for i, (p, a) in enumerate(zip(self.params, args)):
            self._check(i, p, a)
        g = _dims(grid, "grid", (2**31 - 1, 65535, 65535))
        b = _dims(block, "block", (1024, 1024, 64))
        if b[0] * b[1] * b[2] > 1024:
            raise CudaSimError(f"invalid block {b}: more than 1024 threads (cudaErrorInvalidConfiguration)")
        bufs, keep, argv = {}, [], (ctypes.c_void_p * max(1, len(args)))()
        for i, (p, a) in enumerate(zip(self.params, args)):
            if p.pointer:
                key = (a.__array_interface__["data"][0], a.nbytes)
                if key not in bufs:
                    for (s, n), other in bufs.items():
                        if s < key[0] + key[1] and key[0] < s + n:
                            raise CudaSimError(f"kernel {self.name!r}: args[{i}] {p.name!r} partially overlaps "
                                               "another argument; cudasim only supports identical aliases")
                    bufs[key] = _Guarded(a, tag=i + 1)
                box = ctypes.c_void_p(bufs[key].ptr)
            else:
                box = np.array(a, dtype=type(a))
            keep.append(box)
            argv[i] = ctypes.addressof(box) if p.pointer else box.ctypes.data
        poisoned = self.sanitize == "address"
        if poisoned:
            for buf in bufs.values():
                _asan("__asan_poison_memory_region", buf.base, buf.lo)
                _asan("__asan_poison_memory_region", buf.ptr + buf.n, len(buf.raw) - buf.hi)
        err = ctypes.create_string_buffer(4096)
        try:
            rc = self._launch((ctypes.c_uint * 3)(*g), (ctypes.c_uint * 3)(*b), int(shared_mem),
                              int(self.threaded if threaded is None else threaded), argv, err, len(err))
        finally:
            if poisoned:
                for buf in bufs.values():
                    _asan("__asan_unpoison_memory_region", buf.base, len(buf.raw))
        if rc:
            raise CudaSimError(f"kernel {self.name!r} failed in {err.value.decode(errors='replace')}")
        problems = []
        written = {id(a) for p, a in zip(self.params, args) if p.pointer and not p.const}
        for i, (p, a) in enumerate(zip(self.params, args)):
            if not p.pointer:
                continue
            buf = bufs[(a.__array_interface__["data"][0], a.nbytes)]
            for nbytes, idx in buf.damage():
                problems.append(f"args[{i}] {p.name!r} ({p.cdecl}, {a.size} elements): {nbytes} guard byte(s) "
                                f"{'before its start' if idx < 0 else 'after its end'} overwritten, first at "
                                f"element index {idx}")
            if p.const and id(a) not in written and not np.array_equal(buf.data(), a.reshape(-1).view(np.uint8)):
                problems.append(f"args[{i}] {p.name!r} ({p.cdecl}) was modified through a const pointer")
        for p, a in zip(self.params, args):
            if p.pointer and not p.const:
                a.reshape(-1).view(np.uint8)[:] = bufs[(a.__array_interface__["data"][0], a.nbytes)].data()
        if problems:
            raise OutOfBoundsWrite(f"kernel {self.name!r} wrote out of bounds: " + "; ".join(problems))


# ---------------------------------------------------------------- sanitizers
def _asan(fn: str, addr: int, size: int):
    if size > 0:
        getattr(ctypes.CDLL(None), fn)(ctypes.c_void_p(addr), ctypes.c_size_t(size))


def _runtime_loaded(sanitize: str) -> bool:
    return hasattr(ctypes.CDLL(None), {"address": "__asan_init", "thread": "__tsan_init"}[sanitize])


def _lib_path(lib: str) -> str | None:
    if shutil.which(CXX) is None:
        return None
    p = _run([CXX, f"-print-file-name={lib}"]).stdout.strip()
    return p if os.path.isabs(p) and os.path.exists(p) else None


def sanitizer_available(sanitize: str) -> bool:
    """True when g++ ships the runtime (libasan.so / libtsan.so) that ``sanitize`` needs."""
    return _lib_path(SAN_LIB[sanitize]) is not None


def run_sanitized(argv, sanitize: str = "address", *, cwd=None, env=None, timeout: float = 600):
    """Run ``python *argv`` (e.g. ``["-m", "pytest", "tests/x.py"]`` or ``["-c", code]``) in a subprocess
    with the sanitizer runtime preloaded and ``GPUCNN_CUDASIM_SANITIZE=sanitize``, so every
    ``load_module`` there builds sanitized.  Returns the ``CompletedProcess`` (text stdout/stderr)."""
    runtime, stdcxx = _lib_path(SAN_LIB[sanitize]), _lib_path("libstdc++.so")
    if runtime is None:
        raise CudaSimError(f"{SAN_LIB[sanitize]} not found (g++ -print-file-name)")
    e = dict(os.environ if env is None else env)
    e.update(LD_PRELOAD=" ".join(x for x in (runtime, stdcxx) if x), GPUCNN_CUDASIM_SANITIZE=sanitize,
             PYTHONPATH=os.pathsep.join([str(HERE.parent)] + ([e["PYTHONPATH"]] if e.get("PYTHONPATH") else [])),
             ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:allow_user_poisoning=1",
             UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1",
             TSAN_OPTIONS="halt_on_error=1:exitcode=66:report_signal_unsafe=0")
    return subprocess.run([sys.executable, *argv], cwd=cwd or HERE.parent.parent, env=e, capture_output=True,
                          text=True, timeout=timeout)

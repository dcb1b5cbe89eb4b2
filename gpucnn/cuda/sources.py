"""The kernel sources: where ``kernels/*.cu`` are, their text, and their entry points' signatures.

* :func:`kernel_dir` finds the ``.cu`` files (the installed data package
  ``gpucnn.kernels``, or ``<repo>/kernels`` in a source tree);
* :data:`KERNEL_FILES` maps each file to the ``extern "C" __global__`` entry
  points it defines, discovered when this module is imported (entry-point
  names are unique across files);
* :func:`read_source` returns a file's text with ``#line 1 "kernels/<file>"``
  prepended, so compiler errors name the real file, and each
  ``#include "<header>.cuh"`` of a header beside it expanded in place between
  ``#line`` directives (see :func:`expand_includes`);
* :func:`kernel_signature` parses an entry point's parameter list, which the
  launcher (:mod:`gpucnn.cuda.loader`) checks every launch against;
* :func:`kernel_launch_bounds` reads the threads per block an entry point
  declares with ``__launch_bounds__``, which the launcher also enforces.

Shared device code lives in ``kernels/*.cuh`` (``activation.cuh``: the
activation rules of conv_forward.cu, dense.cu, elementwise.cu and pool.cu).  The
includes are expanded here rather than left to the compiler's ``-I``, so that
every consumer sees one self-contained text: NVRTC through CuPy (whose on-disk
cache is keyed on the code string, so an edited header is a new key), the SASS
report, the CPU emulator (tests/cudasim), and the signature parsers.
"""
from __future__ import annotations

import dataclasses
import importlib.resources
import pathlib
import re
import threading

import numpy as np

__all__ = ["KERNEL_FILES", "KernelParam", "kernel_dir", "list_sources", "read_source", "expand_includes",
           "included_headers", "kernel_signature", "kernel_launch_bounds", "kernel_file_of", "clear"]

_SIGNATURE_RE = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_LAUNCH_BOUNDS_RE = re.compile(r"__launch_bounds__\s*\((?:[^()]|\([^()]*\))*\)")
# An entry point declared with __launch_bounds__(maxThreads[, minBlocks[, ...]]), before or
# after ``void``: (maxThreads, name).
_BOUNDED_ENTRY_RE = re.compile(
    r'extern\s+"C"\s+__global__\s+(?:void\s+)?__launch_bounds__\s*\(\s*([^,()]*?)\s*(?:,[^()]*)?\)'
    r'\s*(?:void\s+)?(\w+)\s*\(')
_INT_DEFINE_RE = re.compile(r"^[ \t]*#[ \t]*define[ \t]+(\w+)[ \t]+(\d+)[ \t]*$", re.M)
# A quoted include, the form a kernel uses for its own headers: #include "activation.cuh".
_INCLUDE_RE = re.compile(r'^[ \t]*#[ \t]*include[ \t]*"([^"]*)"[ \t]*(?://[^\n]*)?$')


def _declarations(text: str) -> str:
    """Source text with comments and ``__launch_bounds__(...)`` removed (so signatures parse)."""
    return _LAUNCH_BOUNDS_RE.sub(" ", re.sub(r"//[^\n]*", "", text))

#: Every kernel source file and the ``extern "C" __global__`` entry points it
#: defines, read from ``kernels/*.cu`` when this module is imported (adding a
#: file is all it takes to make its kernels launchable).
KERNEL_FILES: dict[str, tuple[str, ...]] = {}


def _candidate_dirs() -> list[pathlib.Path]:
    """Where the ``.cu`` files may be, in order: the source tree the imported ``gpucnn``
    sits in (a checkout: it has the project's pyproject.toml), then the installed data
    package ``gpucnn.kernels``, then ``<parent>/kernels`` for the error message.

    The checkout comes first so that a tree run with ``PYTHONPATH=.`` (a git worktree,
    the device check's copy) compiles its own kernels even where another checkout is
    installed in editable mode and maps ``gpucnn.kernels`` to *its* kernels/.
    """
    tree = pathlib.Path(__file__).resolve().parents[2]
    dirs = [tree / "kernels"] if (tree / "pyproject.toml").is_file() else []
    try:
        dirs.append(pathlib.Path(str(importlib.resources.files("gpucnn.kernels"))))
    except Exception:  # not installed / not a filesystem package
        pass
    dirs.append(tree / "kernels")
    return dirs


def kernel_dir() -> pathlib.Path:
    """Directory holding the ``.cu`` files.

    ``<repo>/kernels`` when the imported ``gpucnn`` package sits in a source
    tree (beside the project's pyproject.toml); else the installed data
    package ``gpucnn.kernels`` (an installed wheel).
    """
    for path in _candidate_dirs():
        if path.is_dir() and any(path.glob("*.cu")):
            return path
    raise FileNotFoundError(
        "gpucnn's CUDA sources (kernels/*.cu) were found neither in the installed package "
        f"gpucnn.kernels nor in {_candidate_dirs()[-1]}; reinstall gpucnn (the wheel ships kernels/*.cu)"
    )


def expand_includes(filename: str, text: str, directory: pathlib.Path,
                    _seen: set[str] | None = None) -> str:
    """``text`` (the file ``kernels/<filename>``) with every ``#include "<header>"`` replaced by
    the header's own text, itself expanded, between ``#line`` directives.

    The header must be a ``.cuh`` file in ``directory`` (the kernel directory): a kernel's
    includes are its own.  ``#line 1 "kernels/<header>"`` opens the header and
    ``#line <n+1> "kernels/<filename>"`` resumes the includer after its line ``n``, so a
    compiler error names the file and line it is on.  Each header is expanded once per
    source (as ``#pragma once``); a repeated include becomes a blank line.  Other lines,
    ``#include <...>`` among them, are left as they are.
    """
    seen = set() if _seen is None else _seen
    out = []
    for number, line in enumerate(text.splitlines(keepends=True), 1):
        match = _INCLUDE_RE.match(line.rstrip("\r\n"))
        if match is None:
            out.append(line)
            continue
        header = match.group(1)
        path = directory / header
        if "/" in header or "\\" in header or not header.endswith(".cuh") or not path.is_file():
            raise ValueError(f"kernels/{filename}:{number}: #include \"{header}\" names no header of "
                             f"{directory}; a kernel includes only kernels/*.cuh, by bare file name")
        if header in seen:
            out.append("\n")
            continue
        seen.add(header)
        body = expand_includes(header, path.read_text(encoding="utf-8"), directory, seen)
        out.append(f'#line 1 "kernels/{header}"\n{body}')
        if body and not body.endswith("\n"):
            out.append("\n")
        out.append(f'#line {number + 1} "kernels/{filename}"\n')
    return "".join(out)


def _discover() -> dict[str, tuple[str, ...]]:
    """``{file name: extern "C" __global__ entry points}`` of every ``kernels/*.cu``."""
    try:
        directory = kernel_dir()
    except FileNotFoundError:
        return {}
    found, owner = {}, {}
    for path in sorted(directory.glob("*.cu")):
        text = _declarations(expand_includes(path.name, path.read_text(encoding="utf-8"), directory))
        names = tuple(m.group(1) for m in _SIGNATURE_RE.finditer(text))
        for name in names:
            if name in owner:
                raise ValueError(f"kernel {name!r} is defined in both kernels/{owner[name]} and "
                                 f"kernels/{path.name}; entry-point names must be unique")
            owner[name] = path.name
        if names:
            found[path.name] = names
    return found


def list_sources() -> dict[str, pathlib.Path]:
    """Map each kernel file name to its path."""
    directory = kernel_dir()
    return {name: directory / name for name in KERNEL_FILES}


KERNEL_FILES.update(_discover())

_source_cache: dict[str, str] = {}
_lock = threading.RLock()


def check_file(filename: str) -> None:
    if filename not in KERNEL_FILES:
        raise ValueError(
            f"unknown kernel file {filename!r}; known files: {sorted(KERNEL_FILES)}"
        )


def included_headers(filename: str) -> tuple[str, ...]:
    """The ``kernels/*.cuh`` headers ``filename`` includes (directly or through another header)."""
    return tuple(re.findall(r'^#line 1 "kernels/([^"]+\.cuh)"$', read_source(filename), re.M))


def read_source(filename: str) -> str:
    """Source text of ``filename`` with ``#line 1 "kernels/<file>"`` prepended and its headers
    expanded in place (:func:`expand_includes`): the text every compiler of it receives."""
    check_file(filename)
    with _lock:
        text = _source_cache.get(filename)
        if text is None:
            path = list_sources()[filename]
            raw = path.read_text(encoding="utf-8")
            text = f'#line 1 "kernels/{filename}"\n' + expand_includes(filename, raw, path.parent)
            _source_cache[filename] = text
        return text



@dataclasses.dataclass(frozen=True)
class KernelParam:
    """One kernel parameter: ``dtype`` and whether it is a pointer (an array)."""

    name: str
    dtype: np.dtype
    is_array: bool
    is_const: bool

    def describe(self) -> str:
        base = {np.dtype(np.float32): "float", np.dtype(np.float64): "double",
                np.dtype(np.int32): "int", np.dtype(np.uint8): "unsigned char"}[self.dtype]
        return f"{'const ' if self.is_const else ''}{base}{'*' if self.is_array else ''} {self.name}"


_C_TYPES = {"float": np.dtype(np.float32), "double": np.dtype(np.float64),
            "int": np.dtype(np.int32), "unsigned char": np.dtype(np.uint8)}
_PARAM_RE = re.compile(
    r"^(const\s+)?(float|double|int|unsigned char)\s*(\*)?\s*(?:__restrict__\s+)?(\w+)$")
_signature_cache: dict[str, tuple[KernelParam, ...]] = {}
_bounds_cache: dict[str, int | None] = {}


def _parse_signatures(filename: str) -> dict[str, tuple[KernelParam, ...]]:
    text = _declarations(read_source(filename))
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
                    f"{match.group(1)}; the launcher understands [const] float|double|int|unsigned char[*]"
                )
            params.append(KernelParam(name=m.group(4), dtype=_C_TYPES[m.group(2)],
                                      is_array=m.group(3) is not None,
                                      is_const=m.group(1) is not None))
        found[match.group(1)] = tuple(params)
    return found


def _parse_launch_bounds(filename: str) -> dict[str, int]:
    """``{entry point: maxThreadsPerBlock}`` for the entry points of ``filename`` that declare
    ``__launch_bounds__``; the value is an integer literal or a ``#define NAME <integer>``."""
    text = re.sub(r"//[^\n]*", "", read_source(filename))
    defines = {name: int(value) for name, value in _INT_DEFINE_RE.findall(text)}
    found = {}
    for match in _BOUNDED_ENTRY_RE.finditer(text):
        expr, name = match.group(1), match.group(2)
        value = int(expr) if expr.isdigit() else defines.get(expr)
        if value is None:
            raise ValueError(f"kernels/{filename}: cannot read the threads of {name}'s "
                             f"__launch_bounds__({expr}); the launcher understands an integer "
                             "or a #define'd integer")
        found[name] = value
    return found


def kernel_launch_bounds(kernel: str) -> int | None:
    """The most threads per block ``kernel`` declares with ``__launch_bounds__``; ``None`` when
    it declares none (then only CUDA's 1024 applies, and the register count decides)."""
    with _lock:
        if kernel not in _bounds_cache:
            filename = kernel_file_of(kernel)
            bounds = _parse_launch_bounds(filename)
            for name in KERNEL_FILES[filename]:
                _bounds_cache[name] = bounds.get(name)
        return _bounds_cache[kernel]


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


def clear() -> None:
    """Forget the cached sources, signatures and launch bounds (they are re-read on the next use)."""
    with _lock:
        _source_cache.clear()
        _signature_cache.clear()
        _bounds_cache.clear()

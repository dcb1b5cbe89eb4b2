"""Compile gate: every kernels/*.cu compiles with NVRTC exactly as CuPy 13 and CuPy 14 compile it.

Runs without a GPU, using NVRTC from PyPI (``cuda-bindings`` for the Python
API, ``nvidia-cuda-nvrtc`` for the library; both in the ``dev`` extra).

What ``cupy.RawModule(code=src, options=loader.DEFAULT_OPTIONS)`` hands NVRTC
(read from CuPy's sources at v13.6.0 and v14.2.0; CUDA, NVRTC backend, no
jitify, no cooperative groups -- the loader's call):

* ``RawModule`` compiles lazily through ``cupy._core.raw._get_raw_module``,
  which calls ``cupy._core.core.compile_with_cache(code, options,
  prepend_cupy_headers=False)``; that calls
  ``assemble_cupy_compiler_options(options)``:

  - CuPy 13.6: appends ``--std=c++11`` (unless the caller gave a ``-std=``),
    puts the bundled CCCL ``-I`` paths (cub, thrust, libcudacxx) in front and
    appends ``-I<cupy>/include``, a bundled ``-I.../cuda-12`` for NVRTC 12.0 and
    12.1 only, and ``-I<CUDA_PATH>/include`` when a CUDA root was found;
  - CuPy 14.2: appends ``--std=c++17`` (unless the caller gave one), the same
    CCCL ``-I`` paths in front, ``-I<cupy>/include`` and the ``cudart`` header
    directory found by ``cuda.pathfinder.find_nvidia_header_directory``.

* ``cupy.cuda.compiler._compile_with_cache_cuda`` then appends ``-ftz=true``
  (CuPy 13.6 also appends ``_get_extra_include_dir_opts()``: ``-I`` for the
  headers of CUDA wheels or conda);
* and NVRTC compiles in ``compile_using_nvrtc`` (13.6) /
  ``_compile_using_nvrtc_no_warning`` (14.2), which appends the arch from
  ``_get_arch_for_options_for_nvrtc``: ``-arch=sm_<cc>`` -- a cubin, so NVRTC
  runs ptxas -- unless ``CUPY_COMPILE_WITH_PTX=1`` or the device is newer than
  the NVRTC knows (then ``-arch=compute_<cc>``, PTX for the driver to JIT);
  then ``--device-as-default-execution-space`` (13.6: with NVRTC 12 or later,
  i.e. always for ``cupy-cuda12x``; 14.2: always).  CuPy 14.2 appends
  ``--pch`` too, only with ``CUPY_NVRTC_USE_PCH=1``.

So the option tuples are :func:`cupy_options` below, ``DEFAULT_OPTIONS`` and
then, per version, ``--std=c++11`` (13.x) or ``--std=c++17`` (14.x),
``-ftz=true``, ``-arch=sm_XX``, ``--device-as-default-execution-space``.  The
``-I`` paths are left out: they only matter to ``#include``, and
:func:`test_kernels_include_no_headers` keeps the compiled text free of it (the
kernels' own ``kernels/*.cuh`` are expanded in place by gpucnn/cuda/sources.py,
so the text compiled here, by CuPy and by the emulator is one and the same).
:func:`test_compiles_like_cupy` compiles every file with both tuples for
sm_80 and sm_90 and fails on any error or warning.

To see registers, spills and shared memory, :func:`test_ptxas_report` adds
``--ptxas-options=-v`` to the CuPy 14 tuple -- NVRTC writes ptxas's report
into the program log -- and checks, per entry point: no spill stores/loads,
no stack frame, static shared memory within 48 KiB, at most 255 registers.
ptxas's register allocation differs between CUDA releases (nvcc 13.0 spilled
4 bytes in ``conv_backward_input_f64`` on sm_90 where NVRTC 12.9 to 13.5 did
not), so :func:`test_ptxas_report_nvcc` applies the same checks to ``nvcc``'s
ptxas when ``nvcc`` is on ``PATH``.  The figures are printed (``pytest -s``
shows them).
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpucnn.cuda import loader, sass

nvrtc = pytest.importorskip(
    "cuda.bindings.nvrtc",
    reason="NVRTC compile gate needs cuda-bindings and nvidia-cuda-nvrtc (pip install -e '.[dev]')",
)

#: The C++ standard each CuPy line adds (core.assemble_cupy_compiler_options).
CUPY_STD = {"cupy13": "--std=c++11", "cupy14": "--std=c++17"}
ARCHS = ("80", "90")
SMEM_BUDGET = 48 * 1024                      # static shared memory per block
MAX_REGISTERS = 255


def cupy_options(cupy: str, arch: str) -> tuple[str, ...]:
    """The options ``cupy.RawModule(code, options=loader.DEFAULT_OPTIONS)`` hands NVRTC on an
    sm_<arch> device under CuPy ``cupy`` ("cupy13" or "cupy14"), less the ``-I`` paths."""
    return loader.DEFAULT_OPTIONS + (CUPY_STD[cupy], "-ftz=true", f"-arch=sm_{arch}",
                                     "--device-as-default-execution-space")


def _check(result, what):
    err = result[0] if isinstance(result, tuple) else result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise RuntimeError(f"{what} failed: {err}")
    return result[1:] if isinstance(result, tuple) else ()


def compile_nvrtc(filename: str, options: tuple[str, ...]) -> tuple[bool, str]:
    """Compile kernels/<filename> as the loader reads it; return (ok, program log)."""
    source = loader.read_source(filename).encode()
    (prog,) = _check(nvrtc.nvrtcCreateProgram(source, f"kernels/{filename}".encode(), 0, [], []),
                     "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in options]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log = sass.nvrtc_output(nvrtc, prog, "ProgramLog")
        ok = result == nvrtc.nvrtcResult.NVRTC_SUCCESS
        if ok and any(o.startswith("-arch=sm_") for o in options):
            (cubin_size,) = _check(nvrtc.nvrtcGetCUBINSize(prog), "nvrtcGetCUBINSize")
            ok = cubin_size > 0
        return ok, log.rstrip(b"\0 ").decode(errors="replace")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


# ptxas' resource report: the package's parser (gpucnn/cuda/sass.py), tested in tests/test_sass.py
parse_ptxas = sass.parse_ptxas


def ptxas_options(arch: str) -> tuple[str, ...]:
    """The CuPy 14 tuple with ptxas's resource report (-v) into the program log."""
    return cupy_options("cupy14", arch) + ("--ptxas-options=-v",)


def compile_nvcc(filename: str, arch: str) -> tuple[list[str], int, str]:
    """kernels/<filename> through the toolkit's nvcc with ptxas -v: (command, return code, output)."""
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, filename)
        with open(source, "w", encoding="utf-8") as f:
            f.write(loader.read_source(filename))
        cmd = [shutil.which("nvcc"), "-cubin", f"-arch=sm_{arch}", CUPY_STD["cupy14"], "-ftz=true", "-Xptxas", "-v",
               "-o", os.path.join(tmp, "out.cubin"), source]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        return cmd, proc.returncode, proc.stdout + proc.stderr


# Every compile of this module, started at once: NVRTC and nvcc run outside the GIL, and a
# tensor-core module takes ~12 s per compile on one core, 8 compiles each (2 CuPy tuples and the
# ptxas report for 2 archs, and nvcc's report for 2).  Each test waits for its own result.
_POOL = ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 2))
_FUTURES: dict = {}


def _ahead(key, fn, *args):
    if key not in _FUTURES:
        _FUTURES[key] = _POOL.submit(fn, *args)
    return _FUTURES[key]


def _nvrtc_ahead(filename, options):
    return _ahead(("nvrtc", filename, options), compile_nvrtc, filename, options)


def _nvcc_ahead(filename, arch):
    return _ahead(("nvcc", filename, arch), compile_nvcc, filename, arch)


@pytest.fixture(scope="module", autouse=True)
def _compile_ahead():
    """Slowest first: the tensor-core modules' compiles are queued before the rest."""
    files = sorted(loader.KERNEL_FILES, key=lambda f: (not f.startswith("gemm_tc"), f))
    for filename in files:
        for arch in ARCHS:
            for cupy in sorted(CUPY_STD):
                _nvrtc_ahead(filename, cupy_options(cupy, arch))
            _nvrtc_ahead(filename, ptxas_options(arch))
            if shutil.which("nvcc"):
                _nvcc_ahead(filename, arch)
    yield
    for future in _FUTURES.values():
        future.cancel()
    _FUTURES.clear()


@pytest.mark.parametrize("cupy", sorted(CUPY_STD))
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", sorted(loader.KERNEL_FILES))
def test_compiles_like_cupy(filename, arch, cupy):
    """The exact option tuple cupy.RawModule hands NVRTC (a cubin), for CuPy 13.x and 14.x."""
    options = cupy_options(cupy, arch)
    ok, log = _nvrtc_ahead(filename, options).result()
    assert ok, f"NVRTC failed on kernels/{filename} with {options}:\n{log}"
    assert "warning" not in log.lower(), f"NVRTC warnings for kernels/{filename} with {options}:\n{log}"


@pytest.mark.parametrize("filename", sorted(loader.KERNEL_FILES))
def test_kernels_include_no_headers(filename):
    """The gate leaves CuPy's -I paths out; that is exact only while the text the loader hands
    the compiler #includes nothing (kernels/*.cuh are expanded into it by sources.py)."""
    includes = re.findall(r"^[ \t]*#[ \t]*include\b.*$", loader.read_source(filename), re.M)
    assert not includes, f"kernels/{filename} includes {includes}; add CuPy's -I paths to cupy_options"


def check_ptxas_report(filename: str, what: str, log: str) -> None:
    """Every entry point of ``filename`` is in ptxas's report ``log``, within the budgets above."""
    figures = parse_ptxas(log)
    if not figures:
        pytest.fail(f"no ptxas report ({what}) for kernels/{filename}:\n{log}")
    assert set(figures) == set(loader.KERNEL_FILES[filename]), log
    for kernel, f in sorted(figures.items()):
        print(f"{what} {kernel}: {f['registers']} registers, {f['smem']} bytes smem, "
              f"{f['stack']} bytes stack, {f['spill_stores']}/{f['spill_loads']} bytes spill st/ld")
        assert f["spill_stores"] == 0 and f["spill_loads"] == 0, f"{kernel} spills:\n{log}"
        assert f["stack"] == 0, f"{kernel} uses a stack frame:\n{log}"
        assert f["smem"] <= SMEM_BUDGET, f"{kernel} uses {f['smem']} bytes of static shared memory"
        assert f["registers"] <= MAX_REGISTERS, f"{kernel} uses {f['registers']} registers"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", sorted(loader.KERNEL_FILES))
def test_ptxas_report(filename, arch):
    options = ptxas_options(arch)
    ok, log = _nvrtc_ahead(filename, options).result()
    assert ok, f"NVRTC failed on kernels/{filename} with {options}:\n{log}"
    check_ptxas_report(filename, f"NVRTC sm_{arch}", log)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", sorted(loader.KERNEL_FILES))
def test_ptxas_report_nvcc(filename, arch):
    """The same checks on the ptxas of the CUDA toolkit on PATH (its release may differ from NVRTC's)."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not on PATH")
    cmd, returncode, log = _nvcc_ahead(filename, arch).result()
    assert returncode == 0, f"{' '.join(cmd)} failed:\n{log}"
    check_ptxas_report(filename, f"nvcc sm_{arch}", log)


def test_compile_errors_name_the_real_file():
    """The #line prefix makes NVRTC report kernels/<file>:<line>."""
    source = '#line 1 "kernels/broken.cu"\nextern "C" __global__ void k() {\n  undeclared = 1;\n}\n'
    (prog,) = _check(nvrtc.nvrtcCreateProgram(source.encode(), b"x.cu", 0, [], []), "create")
    try:
        opts = [b"-arch=compute_80"]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        (size,) = _check(nvrtc.nvrtcGetProgramLogSize(prog), "log size")
        log = b" " * size
        _check(nvrtc.nvrtcGetProgramLog(prog, log), "log")
    finally:
        nvrtc.nvrtcDestroyProgram(prog)
    assert result != nvrtc.nvrtcResult.NVRTC_SUCCESS
    assert "kernels/broken.cu(2)" in log.decode(errors="replace")


def test_nvrtc_leaves_python_constants_alone():
    """NVRTC writes into the buffers it is given; a 1-byte log once overwrote CPython's shared
    ``b" "`` with NUL, and every safetensors header padded after it was invalid JSON."""
    ok, log = compile_nvrtc(sorted(loader.KERNEL_FILES)[0], loader.DEFAULT_OPTIONS + ("-arch=compute_90",))
    sass.compile_source('extern "C" __global__ void k() {}')
    assert ok and log == ""                    # an empty log is NVRTC's single "\0"
    assert b" " * 3 == bytes([32, 32, 32]) and b" ".hex() == "20"

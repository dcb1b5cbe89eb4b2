"""Compile gate: every kernels/*.cu compiles with NVRTC, as CuPy would compile it.

Runs without a GPU, using NVRTC from PyPI (``cuda-bindings`` for the Python
API, ``nvidia-cuda-nvrtc`` for the library; both in the ``dev`` extra).

Options.  ``cupy.RawModule(code, options)`` compiles through
``cupy._core.core.compile_with_cache``, which appends ``-I<cupy>/include`` and
``-I<CUDA_PATH>/include``, then ``cupy.cuda.compiler._compile_with_cache_cuda``
appends ``-ftz=true`` and ``compile_using_nvrtc`` appends
``-arch=compute_<cc>`` (PTX that the driver JIT-compiles for the device).  The
kernels include no headers, so the two ``-I`` paths change nothing and are left
out here.  So the production compile is
``loader.DEFAULT_OPTIONS + ("-ftz=true", "-arch=compute_XX")``;
:func:`test_compiles_like_cupy` does exactly that.

To see registers, spills and shared memory, :func:`test_ptxas_report` compiles
to a cubin (``-arch=sm_80`` / ``sm_90``, so NVRTC runs ptxas) with
``--ptxas-options=-v`` -- NVRTC writes ptxas's report into the program log --
plus ``--device-as-default-execution-space`` as the issue asks, and checks, per
entry point: no spill stores/loads, no stack frame, static shared memory within
48 KiB, at most 255 registers.  The figures are printed (``pytest -s`` shows them).
"""
from __future__ import annotations

import pytest

from gpucnn.cuda import loader, sass

nvrtc = pytest.importorskip(
    "cuda.bindings.nvrtc",
    reason="NVRTC compile gate needs cuda-bindings and nvidia-cuda-nvrtc (pip install -e '.[dev]')",
)

CUPY_ADDED_OPTIONS = ("-ftz=true",)          # appended by cupy.cuda.compiler
ARCHS = ("80", "90")
SMEM_BUDGET = 48 * 1024                      # static shared memory per block
MAX_REGISTERS = 255


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


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", sorted(loader.KERNEL_FILES))
def test_compiles_like_cupy(filename, arch):
    """The exact option tuple cupy.RawModule hands NVRTC (to PTX)."""
    options = loader.DEFAULT_OPTIONS + CUPY_ADDED_OPTIONS + (f"-arch=compute_{arch}",)
    ok, log = compile_nvrtc(filename, options)
    assert ok, f"NVRTC failed on kernels/{filename} with {options}:\n{log}"
    assert "warning" not in log.lower(), f"NVRTC warnings for kernels/{filename}:\n{log}"


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("filename", sorted(loader.KERNEL_FILES))
def test_ptxas_report(filename, arch):
    options = (loader.DEFAULT_OPTIONS + CUPY_ADDED_OPTIONS
               + ("--device-as-default-execution-space", f"-arch=sm_{arch}", "--ptxas-options=-v"))
    ok, log = compile_nvrtc(filename, options)
    assert ok, f"NVRTC failed on kernels/{filename} with {options}:\n{log}"
    figures = parse_ptxas(log)
    if not figures:
        pytest.fail(f"no ptxas report in NVRTC's program log for kernels/{filename}:\n{log}")
    assert set(figures) == set(loader.KERNEL_FILES[filename]), log
    for kernel, f in sorted(figures.items()):
        print(f"sm_{arch} {kernel}: {f['registers']} registers, {f['smem']} bytes smem, "
              f"{f['stack']} bytes stack, {f['spill_stores']}/{f['spill_loads']} bytes spill st/ld")
        assert f["spill_stores"] == 0 and f["spill_loads"] == 0, f"{kernel} spills:\n{log}"
        assert f["stack"] == 0, f"{kernel} uses a stack frame:\n{log}"
        assert f["smem"] <= SMEM_BUDGET, f"{kernel} uses {f['smem']} bytes of static shared memory"
        assert f["registers"] <= MAX_REGISTERS, f"{kernel} uses {f['registers']} registers"


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

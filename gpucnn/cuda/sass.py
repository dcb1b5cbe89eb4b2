"""Static SASS report of gpucnn's CUDA kernels: registers, spills and the innermost FMA loop.

No GPU is needed: a ``kernels/*.cu`` file is compiled with NVRTC (the Python
bindings ``cuda.bindings.nvrtc`` of the ``cuda-bindings`` package plus the
library from ``nvidia-cuda-nvrtc``) straight to a cubin for a real
architecture (``-arch=sm_90`` by default, ``-ftz=true`` as CuPy compiles,
``--ptxas-options=-v`` so that ptxas writes its per-kernel resource report into
the program log), and the cubin is disassembled with ``nvdisasm`` (package
``nvidia-cuda-nvdisasm``; found on ``PATH`` or inside the installed ``nvidia``
package directory) or, failing that, ``cuobjdump -sass``.

For every entry point the report holds ptxas' figures and the figures of its
*main loop*: loops are found from the branches (a ``BRA`` to an address at or
before its own is a back edge, the loop body is ``[target, branch]``); the
innermost loops are those whose body contains no other back edge, and the
main loop is the innermost loop with the most FFMA (DFMA for the ``_f64``
twins).  Its figures are static instruction counts over the body:
instructions, FMAs, global loads (``LDG``) and shared loads (``LDS``), and the
ratios instructions per FMA and LDG per FMA -- how much issue bandwidth the
loop spends around each multiply-add.

API::

    report(filename, arch="sm_90") -> {kernel: {...}}
    compile_cubin(filename, arch="sm_90") -> (cubin bytes, ptxas log)
    parse_ptxas(log) -> {kernel: {registers, smem, stack, spill_stores, spill_loads}}
    disassemble(cubin) -> SASS text;  split_kernels(sass) -> {kernel: [Instruction]}
    find_loops(instructions) -> [Loop];  loop_figures(instructions, fma_op) -> dict | None

Used by ``gpucnn bench --static`` and tests/test_sass.py (the convolution
kernels' bounds).  Raises :class:`ToolMissingError` naming the missing
package when NVRTC or both disassemblers are absent.
"""
from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import os
import pathlib
import re
import shutil
import subprocess
import tempfile

__all__ = [
    "ToolMissingError",
    "SassError",
    "Instruction",
    "Loop",
    "DEFAULT_ARCH",
    "compile_options",
    "compile_source",
    "compile_cubin",
    "parse_ptxas",
    "find_disassembler",
    "disassemble",
    "split_kernels",
    "find_loops",
    "innermost_loops",
    "loop_figures",
    "report",
    "report_source",
    "format_report",
]

DEFAULT_ARCH = "sm_90"


class ToolMissingError(RuntimeError):
    """A tool the SASS report needs (NVRTC bindings, libnvrtc, nvdisasm/cuobjdump) is absent."""


class SassError(RuntimeError):
    """NVRTC failed to compile, or the disassembly could not be read."""


# ---------------------------------------------------------------------------
# Compiling with NVRTC
# ---------------------------------------------------------------------------

def _nvrtc():
    try:
        nvrtc = importlib.import_module("cuda.bindings.nvrtc")
    except ImportError as exc:
        raise ToolMissingError(
            "the SASS report compiles with NVRTC through cuda-bindings: "
            "pip install cuda-bindings nvidia-cuda-nvrtc (both in gpucnn's 'dev' extra)"
        ) from exc
    return nvrtc


def _check(nvrtc, result, what):
    err = result[0] if isinstance(result, tuple) else result
    if err != nvrtc.nvrtcResult.NVRTC_SUCCESS:
        raise SassError(f"{what} failed: {err}")
    return result[1:] if isinstance(result, tuple) else ()


def nvrtc_output(nvrtc, prog, which: str) -> bytes:
    """What NVRTC holds for ``prog``: ``which`` = "ProgramLog", "CUBIN" or "PTX".

    NVRTC writes through the buffer it is handed, so the buffer is a fresh
    ``bytearray``.  Never an immutable ``bytes``: ``b" " * 1`` is CPython's
    shared one-byte object, and NVRTC writing a 1-byte empty log ("\\0") into it
    turns every ``b" "`` of the process into a NUL byte.
    """
    (size,) = _check(nvrtc, getattr(nvrtc, f"nvrtcGet{which}Size")(prog), f"nvrtcGet{which}Size")
    buf = bytearray(size)
    _check(nvrtc, getattr(nvrtc, f"nvrtcGet{which}")(prog, buf), f"nvrtcGet{which}")
    return bytes(buf)


def compile_options(arch: str = DEFAULT_ARCH) -> tuple[str, ...]:
    """The NVRTC options of the report: the loader's, ``-ftz=true`` (as CuPy), the arch, ``-v`` ptxas."""
    from . import loader
    if not re.fullmatch(r"sm_\d+a?", arch):
        raise ValueError(f"arch must name a real architecture like 'sm_90', got {arch!r}")
    return tuple(loader.DEFAULT_OPTIONS) + ("-ftz=true", f"-arch={arch}", "--ptxas-options=-v")


def compile_source(source: str, name: str = "kernel.cu", arch: str = DEFAULT_ARCH) -> tuple[bytes, str]:
    """Compile CUDA ``source`` with NVRTC to a cubin for ``arch``; return (cubin, program log)."""
    nvrtc = _nvrtc()
    try:
        created = nvrtc.nvrtcCreateProgram(source.encode(), name.encode(), 0, [], [])
    except RuntimeError as exc:   # cuda-bindings could not load libnvrtc
        raise ToolMissingError(f"NVRTC library not found ({exc}): pip install nvidia-cuda-nvrtc") from exc
    (prog,) = _check(nvrtc, created, "nvrtcCreateProgram")
    try:
        opts = [o.encode() for o in compile_options(arch)]
        (result,) = nvrtc.nvrtcCompileProgram(prog, len(opts), opts)
        log_text = nvrtc_output(nvrtc, prog, "ProgramLog").rstrip(b"\0 ").decode(errors="replace")
        if result != nvrtc.nvrtcResult.NVRTC_SUCCESS:
            raise SassError(f"NVRTC failed to compile {name} for {arch}:\n{log_text}")
        return nvrtc_output(nvrtc, prog, "CUBIN"), log_text
    finally:
        nvrtc.nvrtcDestroyProgram(prog)


def compile_cubin(filename: str, arch: str = DEFAULT_ARCH) -> tuple[bytes, str]:
    """Compile ``kernels/<filename>`` exactly as the loader reads it (``#line`` prefix included)."""
    from . import loader
    return compile_source(loader.read_source(filename), f"kernels/{filename}", arch)


# ---------------------------------------------------------------------------
# ptxas' resource report (tests/test_kernel_compile.py uses this parser too)
# ---------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(sm_\d+a?)'")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas(log: str) -> dict[str, dict[str, int]]:
    """Per entry function: registers, smem, stack, spill_stores, spill_loads."""
    figures: dict[str, dict[str, int]] = {}
    current = None
    for line in log.splitlines():
        m = _ENTRY.search(line)
        if m:
            current = figures.setdefault(m.group(1), {"smem": 0})
            continue
        if current is None:
            continue
        m = _FRAME.search(line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                           spill_loads=int(m.group(3)))
        m = _USED.search(line)
        if m:
            current["registers"] = int(m.group(1))
            s = _SMEM.search(line)
            current["smem"] = int(s.group(1)) if s else 0
    return figures


# ---------------------------------------------------------------------------
# Disassembling
# ---------------------------------------------------------------------------

def _nvidia_bin_dirs() -> list[pathlib.Path]:
    try:
        import nvidia
    except ImportError:
        return []
    dirs = []
    for root in getattr(nvidia, "__path__", []):
        for path in sorted(pathlib.Path(root).glob("**/bin")):
            if path.is_dir():
                dirs.append(path)
    return dirs


@functools.lru_cache(maxsize=None)
def find_disassembler() -> tuple[str, str]:
    """``("nvdisasm" | "cuobjdump", path)``: nvdisasm preferred, PATH first, then the nvidia wheels."""
    for tool in ("nvdisasm", "cuobjdump"):
        path = shutil.which(tool)
        if path:
            return tool, path
        for d in _nvidia_bin_dirs():
            cand = d / tool
            if cand.is_file() and os.access(cand, os.X_OK):
                return tool, str(cand)
    raise ToolMissingError(
        "no SASS disassembler found: pip install nvidia-cuda-nvdisasm (or nvidia-cuda-cuobjdump), "
        "or put nvdisasm / cuobjdump from a CUDA toolkit on PATH"
    )


def disassemble(cubin: bytes) -> str:
    """SASS text of ``cubin`` (nvdisasm -c, or cuobjdump -sass)."""
    tool, path = find_disassembler()
    with tempfile.TemporaryDirectory() as tmp:
        f = pathlib.Path(tmp) / "kernels.cubin"
        f.write_bytes(cubin)
        cmd = [path, "-c", str(f)] if tool == "nvdisasm" else [path, "-sass", str(f)]
        r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SassError(f"{' '.join(cmd)} failed (rc {r.returncode}):\n{r.stderr}")
    return r.stdout


@dataclasses.dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str          # e.g. "FFMA", "LDG.E.128", "BRA"
    text: str            # the whole instruction, predicate included
    target: int | None   # branch target address (BRA with a label), else None

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]


_SECTION_NV = re.compile(r"^\s*\.section\s+\.text\.(\w+)")
_SECTION_OBJ = re.compile(r"^\s*Function\s*:\s*(\w+)")
_INSN = re.compile(r"/\*([0-9a-fA-F]{4,})\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^\s*(\.L\w+):")
_TARGET_LABEL = re.compile(r"`\((\.L\w+)\)")
_TARGET_ADDR = re.compile(r"\b(?:BRA|BRX|JMP)\b[^;]*?\b0x([0-9a-fA-F]+)\b")
_PRED = re.compile(r"^@!?U?P(?:T|\d)\s+")


def split_kernels(sass: str) -> dict[str, list[Instruction]]:
    """``{kernel: [Instruction]}`` from nvdisasm or cuobjdump output."""
    raw: dict[str, list[tuple[int, str]]] = {}
    labels: dict[str, dict[str, int]] = {}
    current = None
    pending: list[str] = []
    for line in sass.splitlines():
        m = _SECTION_NV.match(line) or _SECTION_OBJ.match(line)
        if m:
            current = m.group(1)
            raw.setdefault(current, [])
            labels.setdefault(current, {})
            pending = []
            continue
        if current is None:
            continue
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSN.search(line)
        if m:
            address = int(m.group(1), 16)
            for name in pending:
                labels[current][name] = address
            pending = []
            raw[current].append((address, m.group(2).strip()))
    out = {}
    for kernel, insns in raw.items():
        parsed = []
        for address, text in insns:
            body = _PRED.sub("", text)
            opcode = body.split()[0] if body.split() else ""
            target = None
            if opcode.split(".")[0] in ("BRA", "BRX", "JMP"):
                t = _TARGET_LABEL.search(text)
                if t and t.group(1) in labels[kernel]:
                    target = labels[kernel][t.group(1)]
                else:
                    t = _TARGET_ADDR.search(text)
                    if t:
                        target = int(t.group(1), 16)
            parsed.append(Instruction(address, opcode, text, target))
        if parsed:
            out[kernel] = parsed
    return out


@dataclasses.dataclass(frozen=True)
class Loop:
    start: int           # address of the loop head (the back edge's target)
    end: int             # address of the back-edge branch

    def contains(self, other: "Loop") -> bool:
        return self != other and self.start <= other.start and other.end <= self.end


def find_loops(instructions: list[Instruction]) -> list[Loop]:
    """Every back edge (a branch to an address at or before its own) as a Loop, in address order."""
    loops = {Loop(i.target, i.address) for i in instructions
             if i.target is not None and i.target <= i.address}
    return sorted(loops, key=lambda lp: (lp.start, lp.end))


def innermost_loops(instructions: list[Instruction]) -> list[Loop]:
    """The loops whose body holds no other back edge."""
    loops = find_loops(instructions)
    return [lp for lp in loops if not any(lp.contains(other) for other in loops)]


def _body(instructions, loop):
    return [i for i in instructions if loop.start <= i.address <= loop.end]


def _figures(body, fma_op):
    count = lambda pred: sum(1 for i in body if pred(i))  # noqa: E731
    n_fma = count(lambda i: i.base == fma_op)
    n_ldg = count(lambda i: i.base == "LDG")
    return {
        "loop_instructions": len(body),
        "loop_ffma": n_fma,
        "fma_opcodes": sorted({i.opcode for i in body if i.base == fma_op}),
        "loop_ldg": n_ldg,
        "loop_lds": count(lambda i: i.base == "LDS"),
        "loop_sts": count(lambda i: i.base == "STS"),
        "loop_bar": count(lambda i: i.base == "BAR"),
        "instructions_per_ffma": len(body) / n_fma if n_fma else None,
        "ldg_per_ffma": n_ldg / n_fma if n_fma else None,
    }


_NO_LOOP = {"loop_instructions": None, "loop_ffma": None, "loop_ldg": None, "loop_lds": None,
            "loop_sts": None, "loop_bar": None, "instructions_per_ffma": None, "ldg_per_ffma": None,
            "loop_start": None, "loop_end": None, "fma_op": None, "fma_opcodes": [], "fma_loops": []}


def loop_figures(instructions: list[Instruction], fma_op: str = "FFMA") -> dict:
    """Figures of the innermost loop with the most ``fma_op``; the ``loop_*`` values are None without one.

    ``fma_loops`` lists the figures of every innermost loop holding at least one ``fma_op``
    (most FMAs first), so a kernel with several hot loops can be checked loop by loop.
    """
    loops = []
    for lp in innermost_loops(instructions):
        f = _figures(_body(instructions, lp), fma_op)
        if f["loop_ffma"]:
            f.update(loop_start=lp.start, loop_end=lp.end)
            loops.append(f)
    if not loops:
        return dict(_NO_LOOP, fma_op=fma_op)
    loops.sort(key=lambda f: (-f["loop_ffma"], f["loop_start"]))
    return dict(loops[0], fma_op=fma_op, fma_loops=loops)


def staging_loops(instructions: list[Instruction]) -> list[dict]:
    """The innermost loops that copy global memory to shared memory without computing (no FFMA/DFMA,
    some LDG and STS): per loop, ``ldg_before_sts`` -- the loads issued before the loop's first
    store, i.e. how many loads one thread keeps in flight (1 means load -> store -> branch, one
    memory latency per element) -- and ``ldg`` / ``instructions`` of the body."""
    out = []
    for lp in innermost_loops(instructions):
        body = _body(instructions, lp)
        bases = [i.base for i in body]
        if "FFMA" in bases or "DFMA" in bases or "LDG" not in bases or "STS" not in bases:
            continue
        first_sts = bases.index("STS")
        out.append({"ldg_before_sts": bases[:first_sts].count("LDG"), "ldg": bases.count("LDG"),
                    "instructions": len(body), "loop_start": lp.start, "loop_end": lp.end})
    return out


def _fma_op(kernel: str) -> str:
    """The multiply-add a kernel's hot loop is made of: HMMA (tensor cores) for the gemm_tc_*
    entry points, DFMA for the _f64 ones, else FFMA."""
    if kernel.startswith("gemm_tc_"):
        return "HMMA"
    return "DFMA" if kernel.endswith("_f64") else "FFMA"


def _assemble(sass: str, log: str) -> dict[str, dict]:
    ptxas = parse_ptxas(log)
    kernels = split_kernels(sass)
    out = {}
    for kernel in sorted(set(ptxas) | set(kernels)):
        f = {"registers": None, "spill_stores": None, "spill_loads": None, "stack": None, "smem": None}
        f.update({k: v for k, v in ptxas.get(kernel, {}).items() if k in f})
        f.update(loop_figures(kernels.get(kernel, []), _fma_op(kernel)))
        f["instructions"] = len(kernels.get(kernel, []))
        f["staging_loops"] = staging_loops(kernels.get(kernel, []))
        out[kernel] = f
    return out


def report_source(source: str, name: str = "kernel.cu", arch: str = DEFAULT_ARCH) -> dict[str, dict]:
    """:func:`report` for CUDA source text (e.g. a synthetic kernel in a test)."""
    cubin, log = compile_source(source, name, arch)
    return _assemble(disassemble(cubin), log)


def report(filename: str, arch: str = DEFAULT_ARCH) -> dict[str, dict]:
    """Per entry point of ``kernels/<filename>``: ptxas' figures and its main loop's.

    Keys: ``registers``, ``spill_stores``, ``spill_loads``, ``stack``, ``smem`` (bytes of
    static shared memory), ``loop_instructions``, ``loop_ffma`` (FFMA, or DFMA for ``_f64``
    kernels), ``loop_ldg``, ``loop_lds``, ``instructions_per_ffma``, ``ldg_per_ffma`` (the
    ``loop_*`` keys are None for a kernel without an FMA loop), plus ``loop_sts``,
    ``loop_bar``, ``loop_start``/``loop_end`` (addresses), ``fma_op``, ``fma_opcodes`` (the
    loop's distinct ``fma_op`` opcodes with their suffixes, e.g. ``HMMA.16816.F32.BF16``), ``fma_loops`` (every
    innermost FMA loop's figures), ``staging_loops`` (:func:`staging_loops`) and ``instructions``
    (the kernel's total).
    """
    from . import loader
    return copy.deepcopy(_report_of_text(loader.read_source(filename), f"kernels/{filename}", arch))


@functools.lru_cache(maxsize=32)
def _report_of_text(source: str, name: str, arch: str) -> dict[str, dict]:
    """:func:`report`, once per source text (a tensor-core module takes ~20 s of NVRTC; ``bench``
    and the tests ask for the same files again).  Keyed on the text, so an edited kernel or header
    compiles anew."""
    cubin, log = compile_source(source, name, arch)
    return _assemble(disassemble(cubin), log)


def format_report(figures: dict[str, dict]) -> str:
    """One line per kernel, for a static benchmark report."""
    lines = []
    for kernel, f in sorted(figures.items()):
        line = (f"{kernel}: {f['registers']} regs, {f['spill_stores']}/{f['spill_loads']} B spill st/ld, "
                f"{f['stack']} B stack, {f['smem']} B smem")
        if f["loop_ffma"]:
            line += (f"; main loop {f['loop_instructions']} instr, {f['loop_ffma']} {f['fma_op']}, "
                     f"{f['loop_ldg']} LDG, {f['loop_lds']} LDS: {f['instructions_per_ffma']:.2f} instr/"
                     f"{f['fma_op']}, {f['ldg_per_ffma']:.3f} LDG/{f['fma_op']}")
        lines.append(line)
    return "\n".join(lines)

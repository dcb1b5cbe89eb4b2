"""gpucnn/cuda/sass.py (static SASS report) and the convolution kernels' SASS bounds.

No GPU needed: NVRTC (cuda-bindings + nvidia-cuda-nvrtc) compiles to an sm_90
cubin and nvdisasm (nvidia-cuda-nvdisasm) disassembles it; the tests skip, with
the reason, when a tool is missing.

* The tool on hand-written SASS (parsing, labels, back edges, innermost loops:
  no tools needed) and on tiny synthetic kernels with known loops.
* The convolution kernels (kernels/conv_*.cu) for sm_90: no spills, no stack,
  static shared memory within 48 KiB, and in EVERY innermost loop holding FFMA
  of a float32 kernel at most 0.25 global loads per FFMA and a per-kernel bound on
  instructions per FFMA (FFMA_BOUNDS, issue 25's fix 6); the grids of the four listed layers at batch 64 reach 132 blocks.
* kernels/pool.cu's pool_max_backward: at most 2 integer divisions per thread
  (each a MUFU.RCP sequence in SASS; it had 7 when every thread decomposed
  its flat index), issue 25's SIMT fix 4.
* The tensor-core GEMMs (kernels/gemm_tc_<mode>.cu): every entry point's hot
  loop is made of the mode's HMMA (m16n8k8 TF32; m16n8k16 BF16 / F16), as
  many per stage as its tile's fragments, with no spills and no stack, and at
  most a bounded number of instructions per HMMA (operand staging, which
  dominates these kernels: 621 per HMMA in the n8 forward before the index
  maths left the loop, 153 after).
"""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor

import pytest

from gpucnn.cuda import conv, sass

CONV_FILES = ("conv_forward.cu", "conv_backward_input.cu", "conv_backward_weight.cu")
#: Instructions per FFMA in each float32 kernel's FMA loops: (16-row tile, 8-row tile) for the
#: forward and backward-input kernels, one loop for the weight gradient.  NVRTC 13 for sm_90 gives
#: 405/256, 516/256 (forward), 411/256, 268/128 (backward-input) and 451/256: the bounds leave
#: ~2% for other compilers and fail the per-element LDC.64 + IADD3 of a gather base rebuilt from
#: the parameter bank (kernels/opaque.cuh), which cost 425/256, 552/256, 428/256 and 278/128.
#: Issue 25's fix 6: 1.66 in the forward's 16-row loop when it was filed.
FFMA_BOUNDS = {"conv_forward": (1.63, 2.10), "conv_backward_input": (1.65, 2.14),
               "conv_backward_weight_partial": (1.80,)}
MAX_LDG_PER_FFMA = 0.25
#: float32 registers of the forward and backward-input kernels (NVRTC 13: 96 and 80) with ~2% room.
#: ncu measured 88 for both in run 2; conv_forward's four gather base pointers (kernels/opaque.cuh,
#: fix 6) took it from 80 to 96 -- 10 blocks of 64 threads per SM by registers instead of 12, where
#: shared memory allows 13: enough warps for a loop of 16 independent FMA chains per thread, whose
#: issue slots fix 6 cut by 5% -- and backward-input's from 88 to 80.
MAX_REGISTERS = {"conv_forward": 98, "conv_backward_input": 82}
SMEM_BUDGET = 48 * 1024


def _tools_or_skip():
    try:
        sass._nvrtc()
        sass.find_disassembler()
    except sass.ToolMissingError as exc:
        pytest.skip(str(exc))


@pytest.fixture(scope="module")
def conv_reports():
    _tools_or_skip()
    return {f: sass.report(f, "sm_90") for f in CONV_FILES}


# ---------------------------------------------------------------------------
# The parser on hand-written nvdisasm output (no tools needed)
# ---------------------------------------------------------------------------

_SASS_TEXT = """
//--------------------- .text.k_two         --------------------------
        .section        .text.k_two,"ax",@progbits
k_two:
.text.k_two:
        /*0000*/                   S2R R11, SR_TID.X ;
        /*0010*/               @P0 BRA `(.L_x_1) ;
.L_x_2:
        /*0020*/                   LDG.E R2, desc[UR4][R2.64] ;
        /*0030*/                   FFMA R9, R2, UR7, R9 ;
        /*0040*/                   LDS.128 R4, [R3] ;
.L_x_3:
        /*0050*/                   FFMA R9, R4, R5, R9 ;
        /*0060*/                   FFMA R9, R6, R7, R9 ;
        /*0070*/              @!P1 BRA `(.L_x_3) ;
        /*0080*/              @!P0 BRA `(.L_x_2) ;
.L_x_1:
        /*0090*/                   DFMA R10, R12, R14, R10 ;
.L_x_4:
        /*00a0*/                   DFMA R10, R12, R14, R10 ;
        /*00b0*/                   LDG.E.64 R12, desc[UR4][R2.64] ;
        /*00c0*/               @P2 BRA `(.L_x_4) ;
        /*00d0*/                   EXIT ;
.L_x_5:
        /*00e0*/                   BRA `(.L_x_5);
//--------------------- .text.k_none        --------------------------
        .section        .text.k_none,"ax",@progbits
k_none:
        /*0000*/                   STG.E desc[UR4][R4.64], R9 ;
        /*0010*/                   EXIT ;
"""


def test_parser_on_handwritten_sass():
    kernels = sass.split_kernels(_SASS_TEXT)
    assert sorted(kernels) == ["k_none", "k_two"]
    k = kernels["k_two"]
    assert [i.address for i in k][:3] == [0x0, 0x10, 0x20]
    assert k[1].opcode == "BRA" and k[1].target == 0x90          # forward branch to .L_x_1
    loops = sass.find_loops(k)
    assert loops == [sass.Loop(0x20, 0x80), sass.Loop(0x50, 0x70), sass.Loop(0xa0, 0xc0), sass.Loop(0xe0, 0xe0)]
    assert sass.innermost_loops(k) == [sass.Loop(0x50, 0x70), sass.Loop(0xa0, 0xc0), sass.Loop(0xe0, 0xe0)]
    f = sass.loop_figures(k, "FFMA")
    assert (f["loop_start"], f["loop_end"]) == (0x50, 0x70)
    assert (f["loop_instructions"], f["loop_ffma"], f["loop_ldg"], f["loop_lds"]) == (3, 2, 0, 0)
    assert f["instructions_per_ffma"] == 1.5 and f["ldg_per_ffma"] == 0
    d = sass.loop_figures(k, "DFMA")
    assert (d["loop_start"], d["loop_ffma"], d["loop_ldg"], d["instructions_per_ffma"]) == (0xa0, 1, 1, 3.0)
    assert len(d["fma_loops"]) == 1
    none = sass.loop_figures(kernels["k_none"])
    assert none["loop_ffma"] is None and none["instructions_per_ffma"] is None and none["fma_loops"] == []


def test_parse_ptxas_log():
    log = ("ptxas info    : Compiling entry function 'a_f64' for 'sm_90'\n"
           "ptxas info    : Function properties for a_f64\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]\n"
           "ptxas info    : Compiling entry function 'b' for 'sm_90'\n"
           "ptxas info    : Function properties for b\n"
           "    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads\n"
           "ptxas info    : Used 8 registers, 356 bytes cmem[0]\n")
    assert sass.parse_ptxas(log) == {
        "a_f64": {"registers": 40, "smem": 2048, "stack": 8, "spill_stores": 4, "spill_loads": 12},
        "b": {"registers": 8, "smem": 0, "stack": 0, "spill_stores": 0, "spill_loads": 0}}


def test_missing_tools_are_named(monkeypatch):
    monkeypatch.setattr(sass.shutil, "which", lambda name: None)
    monkeypatch.setattr(sass, "_nvidia_bin_dirs", lambda: [])
    sass.find_disassembler.cache_clear()
    try:
        with pytest.raises(sass.ToolMissingError, match="nvidia-cuda-nvdisasm"):
            sass.find_disassembler()
    finally:
        sass.find_disassembler.cache_clear()
    monkeypatch.setitem(sys.modules, "cuda.bindings.nvrtc", None)
    with pytest.raises(sass.ToolMissingError, match="cuda-bindings"):
        sass.compile_source('extern "C" __global__ void k() {}')


def test_cuobjdump_gives_the_same_figures(monkeypatch):
    """The fallback disassembler (cuobjdump -sass) yields the same kernels and loop figures."""
    _tools_or_skip()
    cuobjdump = [d / "cuobjdump" for d in sass._nvidia_bin_dirs() if (d / "cuobjdump").is_file()]
    if not cuobjdump:
        pytest.skip("cuobjdump not installed (pip install nvidia-cuda-cuobjdump)")
    nv = sass.report_source(_SYNTHETIC, "synthetic.cu")
    monkeypatch.setattr(sass, "find_disassembler", lambda: ("cuobjdump", str(cuobjdump[0])))
    obj = sass.report_source(_SYNTHETIC, "synthetic.cu")
    assert obj == nv


def test_arch_is_checked():
    with pytest.raises(ValueError, match="sm_90"):
        sass.compile_options("compute_90")


# ---------------------------------------------------------------------------
# The tool on synthetic kernels with known loops
# ---------------------------------------------------------------------------

_SYNTHETIC = r"""
extern "C" __global__ void one_loop(const float* __restrict__ x, float* __restrict__ y, int n, float a)
{
    float acc = 0.0f;
#pragma unroll 1
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc = fmaf(a, x[i], acc);
    y[threadIdx.x] = acc;
}

template <typename T>
__device__ __forceinline__ void nested_impl(const T* __restrict__ x, T* __restrict__ y, int n, int m, T* s)
{
    T a0 = 0, a1 = 0, a2 = 0, a3 = 0, b0 = 0;
#pragma unroll 1
    for (int r = 0; r < m; ++r) {                      // outer loop: holds the inner back edge
        s[threadIdx.x] = x[r * blockDim.x + threadIdx.x];
        __syncthreads();
#pragma unroll 1
        for (int i = 0; i < n; ++i) {                  // the main loop: 4 FMAs, 1 LDS
            const T v = s[(threadIdx.x + i) & 127];
            a0 = fma(v, a0, T(1)); a1 = fma(v, a1, T(2)); a2 = fma(v, a2, T(3)); a3 = fma(v, a3, T(4));
        }
        __syncthreads();
    }
#pragma unroll 1
    for (int i = 0; i < n; ++i) b0 = fma(x[i], b0, T(5));   // a second innermost loop: 1 FMA, 1 LDG
    y[threadIdx.x] = a0 + a1 + a2 + a3 + b0;
}

extern "C" __global__ void nested(const float* __restrict__ x, float* __restrict__ y, int n, int m)
{
    __shared__ float s[128];
    nested_impl(x, y, n, m, s);
}

extern "C" __global__ void nested_f64(const double* __restrict__ x, double* __restrict__ y, int n, int m)
{
    __shared__ double s[128];
    nested_impl(x, y, n, m, s);
}

extern "C" __global__ void no_loop(float* y) { y[threadIdx.x] = 1.0f; }
"""


@pytest.fixture(scope="module")
def synthetic():
    _tools_or_skip()
    return sass.report_source(_SYNTHETIC, "synthetic.cu", "sm_90")


def test_synthetic_single_loop(synthetic):
    f = synthetic["one_loop"]
    assert f["loop_ffma"] == 1 and f["loop_ldg"] == 1 and f["loop_lds"] == 0
    assert 3 <= f["loop_instructions"] <= 12
    assert f["instructions_per_ffma"] == f["loop_instructions"] and f["ldg_per_ffma"] == 1.0
    assert f["spill_stores"] == 0 and f["stack"] == 0 and f["smem"] == 0 and f["registers"] > 0


@pytest.mark.parametrize("kernel, op, smem", [("nested", "FFMA", 512), ("nested_f64", "DFMA", 1024)])
def test_synthetic_nested_loops(synthetic, kernel, op, smem):
    f = synthetic[kernel]
    assert f["fma_op"] == op and f["smem"] == smem
    assert f["loop_ffma"] == 4 and f["loop_lds"] == 1 and f["loop_ldg"] == 0 and f["loop_bar"] == 0
    assert [lp["loop_ffma"] for lp in f["fma_loops"]] == [4, 1]
    assert f["fma_loops"][1]["loop_ldg"] == 1
    assert f["instructions_per_ffma"] == f["loop_instructions"] / 4


def test_synthetic_without_loop(synthetic):
    f = synthetic["no_loop"]
    for key in ("loop_instructions", "loop_ffma", "loop_ldg", "loop_lds", "instructions_per_ffma", "ldg_per_ffma"):
        assert f[key] is None
    assert f["registers"] is not None


def test_compile_errors_raise():
    _tools_or_skip()
    with pytest.raises(sass.SassError, match="NVRTC failed"):
        sass.report_source('extern "C" __global__ void k() { undeclared = 1; }', "broken.cu")


# ---------------------------------------------------------------------------
# The convolution kernels
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("filename", CONV_FILES)
def test_conv_kernels_meet_the_sass_bounds(conv_reports, filename):
    figures = conv_reports[filename]
    from gpucnn.cuda import loader
    assert set(figures) == set(loader.KERNEL_FILES[filename])
    print()
    print(sass.format_report(figures))
    for kernel, f in figures.items():
        assert f["spill_stores"] == 0 and f["spill_loads"] == 0 and f["stack"] == 0, kernel
        assert f["smem"] <= SMEM_BUDGET and f["registers"] <= 255, kernel
        if kernel.startswith("conv_backward_weight_reduce"):
            assert f["loop_ffma"] is None, kernel          # a plain sum: no FMA loop
            continue
        # The main loop: one slice of the 4 x 4 register block per thread; the forward and
        # backward-input kernels have two, for 16-row and 8-row tiles (blockDim.y 4 or 2).
        assert f["loop_ffma"] == 256, (kernel, f)
        two_tiles = not kernel.startswith("conv_backward_weight")
        assert len(f["fma_loops"]) == (2 if two_tiles else 1), (kernel, f["fma_loops"])
        if kernel.endswith("_f64"):
            continue                                        # the bounds are for float32
        # The 16-row tile's loop is the cheaper; the 8-row loop gathers twice the rows per thread
        # per FMA -- at 6 channels still ~0.7x the instructions per useful FMA of a 16-row tile,
        # 10 of whose rows would be zeros.
        per_ffma = sorted(loop["instructions_per_ffma"] for loop in f["fma_loops"])
        bounds = FFMA_BOUNDS[kernel]
        assert len(per_ffma) == len(bounds), (kernel, per_ffma)
        for got, bound in zip(per_ffma, bounds):
            assert got <= bound, (kernel, per_ffma, bounds)
        for loop in f["fma_loops"]:
            assert loop["ldg_per_ffma"] <= MAX_LDG_PER_FFMA, (kernel, loop)


@pytest.mark.parametrize("filename", ["conv_forward.cu", "conv_backward_input.cu"])
def test_weight_staging_keeps_loads_in_flight(conv_reports, filename):
    """Issue 25, SIMT fix 1: the W chunk was staged load -> store -> branch, one L2 round trip per
    element (80 serial round trips per block in lenet5's conv2 forward).  Each thread now issues a
    row's loads (16, or 8 for 8-row tiles) before its stores: at least 8 in flight in every staging
    loop, and float32 registers bounded per kernel (MAX_REGISTERS)."""
    for kernel, f in conv_reports[filename].items():
        staging = [lp for lp in f["staging_loops"] if lp["ldg"] >= 1]
        assert len(staging) == 2, (kernel, f["staging_loops"])      # 16-row and 8-row tiles
        assert min(lp["ldg_before_sts"] for lp in staging) >= 8, (kernel, staging)
        if not kernel.endswith("_f64"):
            assert f["registers"] <= MAX_REGISTERS[kernel], (kernel, f["registers"])


@pytest.mark.parametrize("kernel", ["dense_forward", "gemm_nt", "gemm_tn"])
def test_dense_main_loop_prefetches_the_next_slice(kernel):
    """Issue 25, SIMT fix 5: the dense GEMM loop loaded a slice, waited, stored it and only then
    multiplied.  Now the slice stored at the top of an iteration was loaded during the previous one:
    in the main loop every STS comes before the first LDG, and the loads precede FFMAs they overlap."""
    _tools_or_skip()
    cubin, _ = sass.compile_cubin("dense.cu", "sm_90")
    instructions = sass.split_kernels(sass.disassemble(cubin))[kernel]
    loop = sass.loop_figures(instructions)
    body = [i.base for i in instructions if loop["loop_start"] <= i.address <= loop["loop_end"]]
    assert body.count("FFMA") == 256 and body.count("LDG") == 16 and body.count("STS") == 16, kernel
    last_sts = len(body) - 1 - body[::-1].index("STS")
    first_ldg = body.index("LDG")
    assert last_sts < first_ldg, f"{kernel}: a store waits on this iteration's loads ({last_sts} >= {first_ldg})"
    assert body[first_ldg:].count("FFMA") >= 128, kernel


def test_fused_dense_backward_keeps_the_prefetching_gemm_loop_in_both_roles():
    """Issue 25, SIMT fix 7: dense_backward (dW, dx and db of a layer in one launch) runs the GEMM core
    twice, dz computed from dy and saved as it is staged.  Both roles keep fix 5's prefetch (every STS
    of an iteration before its first LDG, all 256 FFMA of the slice after it), with no spill, no stack
    and at most 64 registers (4 blocks of 256 threads per SM).  The loops' static instruction counts
    include every activation's branch of the staging (the 8 further FFMA: tanh's 1 - s * s)."""
    _tools_or_skip()
    cubin, _ = sass.compile_cubin("dense.cu", "sm_90")
    instructions = sass.split_kernels(sass.disassemble(cubin))["dense_backward"]
    f = sass.report("dense.cu", "sm_90")["dense_backward"]
    assert f["spill_stores"] == f["spill_loads"] == f["stack"] == 0 and f["registers"] <= 64, f
    gemm_loops = [lp for lp in f["fma_loops"] if lp["loop_ffma"] >= 256]
    assert len(gemm_loops) == 2, f["fma_loops"]                      # the dW role and the dx role
    for lp in gemm_loops:
        body = [i.base for i in instructions if lp["loop_start"] <= i.address <= lp["loop_end"]]
        assert body.count("STS") == 16 and body.count("BAR") == 2, lp
        last_sts, first_ldg = len(body) - 1 - body[::-1].index("STS"), body.index("LDG")
        assert last_sts < first_ldg and body[first_ldg:].count("FFMA") >= 256, lp
        assert lp["instructions_per_ffma"] < 3.5, lp


def test_staging_loops_on_handwritten_sass():
    """:func:`sass.staging_loops` counts the loads issued before a copy loop's first store."""
    text = """
        .section .text.k,"ax",@progbits
        /*0000*/ MOV R1, c[0x0][0x28] ;
    .L_x_0:
        /*0010*/ LDG.E R2, desc[UR4][R4.64] ;
        /*0020*/ STS [R6], R2 ;
        /*0030*/ @P0 BRA `(.L_x_0) ;
    .L_x_1:
        /*0040*/ LDG.E R2, desc[UR4][R4.64] ;
        /*0050*/ LDG.E R3, desc[UR4][R4.64+0x4] ;
        /*0060*/ STS [R6], R2 ;
        /*0070*/ STS [R6+0x4], R3 ;
        /*0080*/ @P0 BRA `(.L_x_1) ;
        /*0090*/ EXIT ;
    """
    loops = sass.staging_loops(sass.split_kernels(text)["k"])
    assert [(lp["ldg_before_sts"], lp["ldg"]) for lp in loops] == [(1, 1), (2, 2)]


LAYERS = [("lenet5-conv1", (1, 28, 28, 64), (6, 1, 5, 5), 2, False),
          ("lenet5-conv2", (6, 14, 14, 64), (16, 6, 5, 5), 0, True),
          ("zhang2016-conv1", (1, 28, 28, 64), (6, 1, 5, 5), 0, False),
          ("zhang2016-conv2", (6, 12, 12, 64), (12, 6, 5, 5), 0, True)]


@pytest.mark.parametrize("name, x_shape, w_shape, pad, needs_dx", LAYERS, ids=[lay[0] for lay in LAYERS])
def test_conv_grids_reach_132_blocks(name, x_shape, w_shape, pad, needs_dx):
    plan = conv.launch_shapes(x_shape, w_shape, 1, pad)
    for kernel, shape in plan.items():
        if kernel == "conv_backward_input" and not needs_dx:
            continue
        assert shape["blocks"] >= 132, (name, kernel, shape)


def _integer_divisions(instructions) -> int:
    """Integer divisions by a runtime value: each is one ``I2F.U32.RP`` + ``MUFU.RCP`` sequence on sm_90."""
    return sum(i.opcode.startswith("MUFU.RCP") for i in instructions)


def test_pool_max_backward_divides_at_most_twice_per_thread():
    """h and w come from the grid, n from the block: only the window bounds divide (h / SH, w / SW)."""
    _tools_or_skip()
    cubin, _ = sass.compile_cubin("pool.cu", "sm_90")
    kernels = sass.split_kernels(sass.disassemble(cubin))
    for name in ("pool_max_backward", "pool_max_backward_f64"):
        assert _integer_divisions(kernels[name]) == 2, name
    assert _integer_divisions(kernels["pool_max_forward"]) == 3     # the proxy counts what it should


# ---------------------------------------------------------------------------
# The tensor-core GEMMs
# ---------------------------------------------------------------------------

#: mode tag -> (the HMMA opcode its mma.sync becomes on sm_90, k of one HMMA, HMMAs per product)
TC_HMMA = {"tf32": ("HMMA.1688.F32.TF32", 8, 1), "3xtf32": ("HMMA.1688.F32.TF32", 8, 3),
           "bf16": ("HMMA.16816.F32.BF16", 16, 1), "f16": ("HMMA.16816.F32", 16, 1)}
TC_GEMMS = ("conv_fwd", "conv_dgrad", "conv_wgrad", "dense_fwd", "dense_wgrad", "dense_dgrad")
#: Main-loop instructions per 16x8x8 multiply-add (an m16n8k16 HMMA counts as two), per GEMM and
#: tile, the most of the four modes under NVRTC 13 (tf32 each time) plus ~15%: room for another
#: compiler's scheduling, not for the index maths coming back into the loop.  The conv GEMMs stage
#: through tap tables and masks: forward 66 at n8, 21 at n64 (153 and 44 before), backward-input 66
#: and 17 (265, 72), backward-weight 79 and 23 (144, 38).  A strided operand's orientation is fixed
#: per entry point (STRIDED / STRIDED_K), so the loop holds one staging path: the dense GEMMs take
#: 77-83 and 19-20, where one entry point with a run-time choice compiled both (152 and 38).
TC_MAX_INSTRUCTIONS_PER_K8 = {("conv_fwd", "n8"): 76, ("conv_dgrad", "n8"): 76, ("conv_wgrad", "n8"): 91,
                              ("dense_fwd", "n8"): 94, ("dense_wgrad", "n8"): 89, ("dense_dgrad", "n8"): 95,
                              ("conv_fwd", "n64"): 24, ("conv_dgrad", "n64"): 20, ("conv_wgrad", "n64"): 26,
                              ("dense_fwd", "n64"): 22, ("dense_wgrad", "n64"): 22, ("dense_dgrad", "n64"): 23}
TC_MAX_REGISTERS = 168          # 128 threads a block: at most 3 blocks per SM at 168


@pytest.fixture(scope="module")
def tc_reports():
    """The four modules compiled at once (NVRTC releases the GIL; ~20 s each on a CI core)."""
    _tools_or_skip()
    with ThreadPoolExecutor(max_workers=4) as pool:
        reports = pool.map(lambda tag: sass.report(f"gemm_tc_{tag}.cu", "sm_90"), TC_HMMA)
        return dict(zip(TC_HMMA, reports))


@pytest.mark.parametrize("tag", sorted(TC_HMMA))
def test_tensor_core_gemms_run_their_mode_hmma_in_the_hot_loop(tc_reports, tag):
    from gpucnn.cuda import gemm_tc, loader
    figures = tc_reports[tag]
    names = {f"gemm_tc_{tag}_{gemm}_{tile}" for gemm in TC_GEMMS for tile in gemm_tc.TILES}
    assert set(figures) == names == set(loader.KERNEL_FILES[f"gemm_tc_{tag}.cu"])
    opcode, k, per_product = TC_HMMA[tag]
    print()
    print(sass.format_report(figures))
    for kernel, f in figures.items():
        assert f["fma_op"] == "HMMA", kernel
        assert f["spill_stores"] == 0 and f["spill_loads"] == 0 and f["stack"] == 0, (kernel, f)
        assert f["smem"] <= SMEM_BUDGET and f["registers"] <= TC_MAX_REGISTERS, (kernel, f)
        assert len(f["fma_loops"]) == 1, (kernel, f["fma_loops"])        # one main loop, nothing else
        # One stage (BK = 32) per iteration: per warp (BM / WARPS_M) x (BN / WARPS_N) outputs, i.e.
        # tile rows x columns / 4 warps, in 16 x 8 fragments, each BK / k HMMAs deep.
        gemm, tile = kernel.split("_", 3)[3].rsplit("_", 1)
        bm, bn = gemm_tc.TILES[tile]
        fragments = bm * bn // (gemm_tc.THREADS // 32) // (16 * 8)
        assert f["loop_ffma"] == fragments * (gemm_tc.BK // k) * per_product, (kernel, f["loop_ffma"])
        per_k8 = f["loop_instructions"] / (f["loop_ffma"] * k // 8)
        assert per_k8 <= TC_MAX_INSTRUCTIONS_PER_K8[gemm, tile], (kernel, round(per_k8, 1))
        assert f["fma_opcodes"] == [opcode], (kernel, f["fma_opcodes"])   # the mode's, and no other

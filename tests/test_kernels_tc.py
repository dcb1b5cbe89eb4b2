"""The tensor-core GEMMs (kernels/gemm_tc.cuh, gpucnn/cuda/gemm_tc.py) on odd shapes, per mode.

Each GEMM kind -- conv forward, backward-input, backward-weight (split-K), and the
dense layer's three products -- runs on the unchanged kernels (the CPU emulator,
or a GPU), in every mode, on shapes that leave every tile partial: channels
that are 1, 6, 13 and 37 (the n8 and n64 tiles, and more than one block of n), columns that are not multiples of a block, reductions that are not
multiples of the 32-wide stage, strides and paddings, a weight gradient split
into several slabs.  The reference is float64 of the operands as the mode
rounds them (gpucnn.precision: the NumPy path's own rounding), so an operand
rounded the wrong way (2^-11 or 2^-8 relative), a mis-indexed fragment or a
lost slab fails by orders of magnitude more than the FP32 accumulation error
the tolerance allows.  3xtf32 is compared with the unrounded operands: its
point is FP32 accuracy.
"""
from __future__ import annotations

import numpy as np
import pytest

from backends import backend_fixture
from gpucnn import precision
from gpucnn.cuda import gemm_tc

backend = backend_fixture()
MODES = ("tf32", "3xtf32", "bf16", "fp16")


@pytest.fixture
def kernels(backend):
    if not backend.kernels:
        pytest.skip("a kernel test")
    return backend


def _rounded(a, mode):
    """float64 of what a tensor core multiplies in ``mode`` (3xtf32: the value itself)."""
    if mode == "3xtf32":
        return a.astype(np.float64)
    if mode == "fp16":
        return a.astype(np.float16).astype(np.float64)
    return precision.round_operand(a, mode).astype(np.float64)


def _close(got, want, what, mode):
    rtol = {"3xtf32": 3e-6}.get(mode, 2e-6)
    scale = np.abs(want).max()
    err = np.abs(np.asarray(got, np.float64) - want).max()
    assert err <= rtol * scale, f"{mode} {what}: max error {err:.3g} > {rtol:g} x {scale:.3g}"


def _conv_ref(x, W, b, dz, stride, padding):
    """float64 torch: y (with bias), dx and dW, batch-last in and out."""
    torch = pytest.importorskip("torch")
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a))      # noqa: E731
    xt = t(x.transpose(3, 0, 1, 2)).requires_grad_()
    Wt = t(W).requires_grad_()
    y = torch.nn.functional.conv2d(xt, Wt, None if b is None else t(b), stride=stride, padding=padding)
    y.backward(t(dz.transpose(3, 0, 1, 2)))
    return (y.detach().numpy().transpose(1, 2, 3, 0), xt.grad.numpy().transpose(1, 2, 3, 0), Wt.grad.numpy())


# (C, O, H, W, N, k, stride, padding): n8 / n64 tiles on both sides, partial tiles everywhere
CONV_SHAPES = [
    (1, 6, 9, 8, 5, 5, (1, 1), (0, 0)),       # lenet5's conv1: one input channel, 6 outputs (n8)
    (6, 13, 7, 9, 3, 3, (2, 1), (1, 0)),      # n64 forward (13 of 64), n8 backward-input, a stride-2 gather
    (13, 37, 6, 5, 2, 3, (1, 2), (1, 1)),     # n64 forward (one partial block of n), n64 backward
    (37, 6, 5, 5, 3, 2, (2, 2), (0, 1)),      # n8 forward with a 148-long reduction, n64 backward
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", CONV_SHAPES, ids=lambda s: "C{}-O{}-{}x{}-N{}-k{}-s{}{}-p{}{}".format(
    *s[:6], *s[6], *s[7]))
def test_conv_gemms(kernels, mode, shape):
    C, O, H, Wd, N, k, stride, padding = shape
    rng = np.random.default_rng(C * 100 + O)
    x = rng.standard_normal((C, H, Wd, N)).astype(np.float32)
    W = rng.standard_normal((O, C, k, k)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    y, z = gemm_tc.conv_forward(kernels.put(x), kernels.put(W), kernels.put(b), stride, padding, act="relu",
                                mode=mode)
    dz = rng.standard_normal(z.shape).astype(np.float32)
    y_ref, dx_ref, dW_ref = _conv_ref(_rounded(x, mode), _rounded(W, mode), b.astype(np.float64),
                                      _rounded(dz, mode), stride, padding)
    _close(kernels.get(z), y_ref, "z", mode)
    np.testing.assert_array_equal(kernels.get(y), np.maximum(kernels.get(z), 0))   # relu of the same z
    dx = gemm_tc.conv_backward_input(kernels.put(dz), kernels.put(W), x.shape, stride, padding, mode=mode)
    _close(kernels.get(dx), dx_ref, "dx", mode)
    dW, db = gemm_tc.conv_backward_weight(kernels.put(x), kernels.put(dz), W.shape, stride, padding, mode=mode)
    _close(kernels.get(dW), dW_ref, "dW", mode)
    _close(kernels.get(db), _rounded(dz, mode).sum(axis=(1, 2, 3)), "db (the ones row)", mode)


def test_the_widest_window_the_tap_mask_holds_and_more_than_one_table_chunk(kernels):
    """KH + KW = 31 (a tap's bits KW + u and v reach bit 30 of the mask; bit 31 marks a k past the
    slab, and the weight gradient's ones row), with strides and padding; and reductions over two
    chunks of the tap table (K > 512), whose weight gradient spans several row blocks."""
    for C, O, H, Wd, N, kh, kw, stride, padding in [(2, 3, 17, 18, 2, 15, 16, (1, 2), (1, 2)),
                                                   (60, 6, 5, 4, 2, 3, 3, (1, 1), (1, 1)),
                                                   (4, 64, 7, 7, 2, 3, 3, (2, 2), (1, 1))]:
        rng = np.random.default_rng(C + kh)
        x = rng.standard_normal((C, H, Wd, N)).astype(np.float32)
        W = rng.standard_normal((O, C, kh, kw)).astype(np.float32)
        y, _ = gemm_tc.conv_forward(kernels.put(x), kernels.put(W), None, stride, padding, mode="tf32")
        dz = rng.standard_normal(y.shape).astype(np.float32)
        y_ref, dx_ref, dW_ref = _conv_ref(_rounded(x, "tf32"), _rounded(W, "tf32"), None, _rounded(dz, "tf32"),
                                          stride, padding)
        _close(kernels.get(y), y_ref, f"y {kh}x{kw}", "tf32")
        dx = gemm_tc.conv_backward_input(kernels.put(dz), kernels.put(W), x.shape, stride, padding, mode="tf32")
        _close(kernels.get(dx), dx_ref, f"dx {kh}x{kw}", "tf32")
        dW, db = gemm_tc.conv_backward_weight(kernels.put(x), kernels.put(dz), W.shape, stride, padding,
                                              mode="tf32")
        _close(kernels.get(dW), dW_ref, f"dW {kh}x{kw}", "tf32")
        _close(kernels.get(db), _rounded(dz, "tf32").sum(axis=(1, 2, 3)), f"db {kh}x{kw}", "tf32")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("C, O, k", [(7, 13, 3), (127, 6, 1)], ids=["n64-K63", "n8-K127"])
def test_the_bias_ones_row_as_a_tiles_last_row(kernels, mode, C, O, k):
    """K = C*k*k = BM - 1: the weight gradient's ones row (db) is the last row of its tile, stored by
    the threads of the last row slot (kernels/gemm_tc.cuh, ones_row)."""
    from gpucnn.cuda.gemm_tc import TILES
    assert C * k * k + 1 == TILES["n64" if O > 8 else "n8"][0]
    rng = np.random.default_rng(C + O)
    x = rng.standard_normal((C, 6, 6, 3)).astype(np.float32)
    dz = rng.standard_normal((O, 6, 6, 3)).astype(np.float32)
    pad = (k // 2, k // 2)
    dW, db = gemm_tc.conv_backward_weight(kernels.put(x), kernels.put(dz), (O, C, k, k), 1, pad, mode=mode)
    _, _, dW_ref = _conv_ref(_rounded(x, mode), np.zeros((O, C, k, k)), None, _rounded(dz, mode), 1, pad)
    _close(kernels.get(dW), dW_ref, "dW", mode)
    _close(kernels.get(db), _rounded(dz, mode).sum(axis=(1, 2, 3)), "db", mode)


def test_the_weight_gradient_splits_into_slabs_and_sums_them_all(kernels):
    """A column count that gives several slabs (and a last, short one): every slab is summed."""
    C, O, H, N, k = 2, 6, 12, 9, 3
    P = (H - k + 1) ** 2 * N
    slab, S = gemm_tc.wgrad_slab(P, C * k * k + 1, O)
    assert S >= 3 and P % slab, (slab, S)
    rng = np.random.default_rng(7)
    x = rng.standard_normal((C, H, H, N)).astype(np.float32)
    dz = rng.standard_normal((O, H - k + 1, H - k + 1, N)).astype(np.float32)
    dW, db = gemm_tc.conv_backward_weight(kernels.put(x), kernels.put(dz), (O, C, k, k), 1, 0, mode="bf16")
    _, _, dW_ref = _conv_ref(_rounded(x, "bf16"), np.zeros((O, C, k, k)), None, _rounded(dz, "bf16"), 1, 0)
    _close(kernels.get(dW), dW_ref, "dW", "bf16")
    _close(kernels.get(db), _rounded(dz, "bf16").sum(axis=(1, 2, 3)), "db", "bf16")


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("fout, fin, n", [(10, 84, 7), (6, 1, 33), (13, 40, 130), (120, 37, 9)])
def test_dense_gemms(kernels, mode, fout, fin, n):
    rng = np.random.default_rng(fout * fin + n)
    x = rng.standard_normal((fin, n)).astype(np.float32)
    W = rng.standard_normal((fout, fin)).astype(np.float32)
    b = rng.standard_normal(fout).astype(np.float32)
    dz = rng.standard_normal((fout, n)).astype(np.float32)
    xr, Wr, dzr = _rounded(x, mode), _rounded(W, mode), _rounded(dz, mode)
    y, z = gemm_tc.dense_forward(kernels.put(x), kernels.put(W), kernels.put(b), act="tanh", mode=mode,
                                 write_z=True)
    _close(kernels.get(z), Wr @ xr + b[:, None], "z", mode)
    np.testing.assert_allclose(kernels.get(y), np.tanh(kernels.get(z)), rtol=2e-6, atol=1e-7)
    _close(kernels.get(gemm_tc.dense_weight_grad(kernels.put(dz), kernels.put(x), mode=mode)), dzr @ xr.T,
           "dW", mode)
    _close(kernels.get(gemm_tc.dense_input_grad(kernels.put(W), kernels.put(dz), mode=mode)), Wr.T @ dzr,
           "dx", mode)


def test_each_strided_operand_is_staged_along_its_unit_stride(kernels, monkeypatch):
    """STRIDED operands are staged along the tile's rows, STRIDED_K along k, fixed per entry point
    (kernels/gemm_tc.cuh).  A swap leaves every result the same and only uncoalesces the loads, so
    the host's strides are checked against the kinds each entry point compiles: stride 1 along the
    staged axis, for every GEMM of the six."""
    import re

    from gpucnn.cuda import sources
    text = (sources.kernel_dir() / "gemm_tc_tf32.cu").read_text(encoding="utf-8")
    kinds = dict(((g, (pk, qk)) for g, pk, qk in re.findall(
        r"gemm_tc_tf32_(\w+?)_n8\(.*?gemm_tc<MODE_TF32, (OP_\w+), (OP_\w+),", text, re.S)))
    assert len(kinds) == 6, kinds
    calls = {}
    monkeypatch.setattr(gemm_tc, "_launch", lambda mode, gemm, *args, **kw: calls.setdefault(gemm, args))
    x = kernels.put(np.ones((3, 9, 8, 5), np.float32))
    W = kernels.put(np.ones((7, 3, 3, 3), np.float32))
    dz = kernels.put(np.ones((7, 7, 6, 5), np.float32))
    gemm_tc.conv_forward(x, W, None, 1, 0, mode="tf32")
    gemm_tc.conv_backward_input(dz, W, (3, 9, 8, 5), 1, 0, mode="tf32")
    gemm_tc.conv_backward_weight(x, dz, (7, 3, 3, 3), 1, 0, mode="tf32")
    xd, Wd, dzd = (kernels.put(np.ones(s, np.float32)) for s in ((11, 5), (7, 11), (7, 5)))
    gemm_tc.dense_forward(xd, Wd, None, mode="tf32")
    gemm_tc.dense_weight_grad(dzd, xd, mode="tf32")
    gemm_tc.dense_input_grad(Wd, dzd, mode="tf32")
    assert set(calls) == set(kinds)
    staged = {"OP_STRIDED": 0, "OP_STRIDED_K": 1}      # P (m, k): p[m*s0 + k*s1]; Q (k, n): q[k*s0 + n*s1]
    for gemm, args in calls.items():
        (ps, qs), (pk, qk) = args[11:13], kinds[gemm]
        if pk in staged:
            assert ps[staged[pk]] == 1, (gemm, pk, ps)
        if qk in staged:
            assert qs[1 - staged[qk]] == 1, (gemm, qk, qs)


def test_outputs_are_written_into_the_given_buffers_and_nowhere_else(kernels):
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 8, 8, 4)).astype(np.float32)
    W = rng.standard_normal((5, 3, 3, 3)).astype(np.float32)
    y_out = kernels.put(np.full((5, 6, 6, 4), np.nan, np.float32))
    y, z = gemm_tc.conv_forward(kernels.put(x), kernels.put(W), None, 1, 0, mode="tf32", y_out=y_out)
    assert y is y_out and z is None and not np.isnan(kernels.get(y)).any()


def test_refusals_name_the_bad_value(kernels):
    x = kernels.put(np.ones((3, 8, 8, 4), np.float32))
    W = kernels.put(np.ones((5, 3, 3, 3), np.float32))
    with pytest.raises(ValueError, match=r"'fp32' has no tensor-core kernels.*fp32 runs the SIMT kernels"):
        gemm_tc.conv_forward(x, W, None, 1, 0, mode="fp32")
    with pytest.raises(ValueError, match="the input has 3 channels .* the weights expect 4"):
        gemm_tc.conv_forward(x, kernels.put(np.ones((5, 4, 3, 3), np.float32)), None, 1, 0, mode="bf16")
    with pytest.raises(ValueError, match=r"y_out must be a C-contiguous float32 array of shape \(5, 6, 6, 4\)"):
        gemm_tc.conv_forward(x, W, None, 1, 0, mode="bf16", y_out=kernels.put(np.ones((5, 6, 6, 3), np.float32)))
    with pytest.raises(ValueError, match="dz has shape"):
        gemm_tc.conv_backward_input(kernels.put(np.ones((5, 6, 6, 3), np.float32)), W, (3, 8, 8, 4), 1, 0,
                                    mode="tf32")
    big = kernels.put(np.ones((1, 1, 16, 16), np.float32))          # KH + KW = 32: past the tap mask
    with pytest.raises(ValueError, match=r"KH \+ KW must be at most 31; got a 16x16 kernel"):
        gemm_tc.conv_forward(kernels.put(np.ones((1, 20, 20, 1), np.float32)), big, None, 1, 0, mode="tf32")
    with pytest.raises(ValueError, match=r"KH \+ KW must be at most 31; got a 16x16 kernel"):
        gemm_tc.conv_backward_input(kernels.put(np.ones((1, 5, 5, 1), np.float32)), big, (1, 20, 20, 1), 1, 0,
                                    mode="bf16")
    with pytest.raises(ValueError, match=r"conv_backward_weight: .*KH \+ KW must be at most 31; got a 16x16"):
        gemm_tc.conv_backward_weight(kernels.put(np.ones((1, 20, 20, 1), np.float32)),
                                     kernels.put(np.ones((1, 5, 5, 1), np.float32)), (1, 1, 16, 16), 1, 0,
                                     mode="tf32")


def test_the_host_limits_are_the_kernels():
    """gemm_tc.py's launch constants and limits are the #defines of kernels/gemm_tc.cuh."""
    import re

    from gpucnn.cuda import sources

    text = (sources.kernel_dir() / "gemm_tc.cuh").read_text(encoding="utf-8")
    defines = dict(re.findall(r"^#define (TC_\w+) (\d+)", text, re.M))
    assert (int(defines["TC_THREADS"]), int(defines["TC_BK"]), int(defines["TC_MAX_WINDOW"])) == (
        gemm_tc.THREADS, gemm_tc.BK, gemm_tc.MAX_WINDOW)


def test_tiles_follow_the_output_channels():
    assert [gemm_tc.tile_for(n) for n in (1, 6, 8, 9, 16, 17, 120)] == ["n8"] * 3 + ["n64"] * 4
    assert gemm_tc.kernel_name("fp16", "conv_fwd", 6) == "gemm_tc_f16_conv_fwd_n8"


# -- the emulator's model of mma.sync --------------------------------------------------------
_PROBE = r'''
#include "mma.cuh"
extern "C" __global__ void probe(const float* A, const float* B, float* D, int lanes)
{
    // one warp: A 16x8 and B 8x8 (row-major in memory) into the m16n8k8 fragments, D = A B
    const int lane = threadIdx.x, g = lane >> 2, t = lane & 3;
    if (lane >= lanes) return;
    unsigned int a[4], b[2];
    for (int i = 0; i < 4; ++i) a[i] = __float_as_uint(A[(g + 8 * (i & 1)) * 8 + t + 4 * (i >= 2)]);
    for (int i = 0; i < 2; ++i) b[i] = __float_as_uint(B[(t + 4 * i) * 8 + g]);
    float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    mma_tf32_m16n8k8(d, a, b);
    for (int i = 0; i < 4; ++i) D[(g + 8 * (i >= 2)) * 8 + 2 * t + (i & 1)] = d[i];
}
'''


def _probe(lanes):
    cudasim = pytest.importorskip("cudasim")
    from gpucnn.cuda import sources

    code = sources.expand_includes("probe.cu", _PROBE, sources.kernel_dir())
    fn = cudasim.load_module(code=code, name="probe.cu").get_function("probe")
    rng = np.random.default_rng(1)
    A = precision.round_tf32(rng.standard_normal((16, 8)).astype(np.float32))
    B = precision.round_tf32(rng.standard_normal((8, 8)).astype(np.float32))
    D = np.zeros((16, 8), np.float32)
    fn((1, 1, 1), (32, 1, 1), (A, B, D, np.int32(lanes)))
    return A, B, D


def test_the_emulated_mma_computes_a_times_b_from_the_ptx_fragment_layout():
    A, B, D = _probe(32)
    np.testing.assert_allclose(D, A.astype(np.float64) @ B, rtol=1e-6, atol=1e-6)


def test_the_emulated_mma_reports_a_warp_that_is_not_converged():
    cudasim = pytest.importorskip("cudasim")
    with pytest.raises(cudasim.CudaSimError, match="lane 16 did not make this call"):
        _probe(16)

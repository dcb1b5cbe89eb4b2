"""The batch-last convolution kernels (kernels/conv_*.cu) through gpucnn/cuda/conv.py.

The kernels run on the two kernel backends of tests/backends.py (fixture
``device``): ``cudasim`` (the unchanged ``.cu`` sources on the CPU emulator,
NumPy arrays) and ``cupy`` (a real GPU; skipped, with the reason, without one).

References: independent float64 NumPy code written here -- the forward pass and
the weight gradient as loops over the kernel offsets (u, v) on a zero-padded
copy of x, the input gradient in the scatter form (each dz element added into a
padded dx at every tap, then cropped), i.e. NOT the kernels' gather, and not
gpucnn's own functional code.

Checked: forward (bias or none, the four activations, z written or not),
backward-input and backward-weight/bias parity on odd shapes (batch 1, N not a
multiple of anything, H/W 1..9, kernels 1..5 square and not, strides 1-3,
padding 0-2, more than one 16-channel tile, more than one 160-row reduction
chunk, more than one 256-column segment per slab) in float32 and float64; the
activation rules at 0 and NaN; every output element written (outputs prefilled
with NaN); bit-identical results for every launch shape of the forward and
backward-input kernels and run to run; ``out=`` buffers and the workspace; the
grids of the four listed layers at batch 64 with a recording fake builder (no
emulator); argument errors; an ASan run of every kernel (slow).
"""
from __future__ import annotations

import numpy as np
import pytest

from backends import CUDASIM_ERROR, KERNEL_BACKENDS, cudasim, recording_fixture, use_backend
from gpucnn.cuda import conv, loader


@pytest.fixture(params=KERNEL_BACKENDS)
def device(request, monkeypatch):
    """The kernels on the emulator (NumPy arrays) or the GPU (CuPy arrays)."""
    with use_backend(request.param, request, monkeypatch) as dev:
        yield dev


# ---------------------------------------------------------------------------
# Independent float64 references (batch-last layout)
# ---------------------------------------------------------------------------

def _out_hw(H, W, KH, KW, s, p):
    return (H + 2 * p[0] - KH) // s[0] + 1, (W + 2 * p[1] - KW) // s[1] + 1


def _taps(xpad, u, v, s, OH, OW):
    """xpad[:, i*SH+u, j*SW+v, :] for all (i, j): (C, OH, OW, N)."""
    return xpad[:, u:u + s[0] * (OH - 1) + 1:s[0], v:v + s[1] * (OW - 1) + 1:s[1], :]


def ref_forward(x, W, b, s, p):
    """z[o,i,j,n] = b[o] + sum_{c,u,v} xpad[c, i*SH+u, j*SW+v, n] * W[o,c,u,v]."""
    x, W = np.asarray(x, np.float64), np.asarray(W, np.float64)
    C, H, Wd, N = x.shape
    O, _, KH, KW = W.shape
    OH, OW = _out_hw(H, Wd, KH, KW, s, p)
    xpad = np.pad(x, ((0, 0), (p[0], p[0]), (p[1], p[1]), (0, 0)))
    z = np.zeros((O, OH, OW, N))
    for u in range(KH):
        for v in range(KW):
            z += np.einsum("oc,cijn->oijn", W[:, :, u, v], _taps(xpad, u, v, s, OH, OW))
    if b is not None:
        z += np.asarray(b, np.float64)[:, None, None, None]
    return z


def ref_backward_input(dz, W, x_shape, s, p):
    """Scatter form: every dz[o,i,j,n] * W[o,c,u,v] added at xpad position (i*SH+u, j*SW+v)."""
    dz, W = np.asarray(dz, np.float64), np.asarray(W, np.float64)
    C, H, Wd, N = x_shape
    O, _, KH, KW = W.shape
    _, OH, OW, _ = dz.shape
    dxpad = np.zeros((C, H + 2 * p[0] + s[0] * KH, Wd + 2 * p[1] + s[1] * KW, N))
    for u in range(KH):
        for v in range(KW):
            _taps(dxpad, u, v, s, OH, OW)[...] += np.einsum("oc,oijn->cijn", W[:, :, u, v], dz)
    return dxpad[:, p[0]:p[0] + H, p[1]:p[1] + Wd, :]


def ref_backward_weight(x, dz, w_shape, s, p):
    """dW[o,c,u,v] = sum_{i,j,n} dz[o,i,j,n] * xpad[c, i*SH+u, j*SW+v, n];  db[o] = sum dz[o]."""
    x, dz = np.asarray(x, np.float64), np.asarray(dz, np.float64)
    O, C, KH, KW = w_shape
    _, OH, OW, _ = dz.shape
    xpad = np.pad(x, ((0, 0), (p[0], p[0]), (p[1], p[1]), (0, 0)))
    dW = np.zeros(w_shape)
    for u in range(KH):
        for v in range(KW):
            dW[:, :, u, v] = np.einsum("oijn,cijn->oc", dz, _taps(xpad, u, v, s, OH, OW))
    return dW, dz.sum(axis=(1, 2, 3))


def tol(dtype, length):
    """Kernel vs float64 reference: summation orders differ; float32 scaled by the sum's length."""
    if np.dtype(dtype) == np.float64:
        return dict(rtol=1e-12, atol=1e-13 * max(1, length))
    return dict(rtol=2e-5, atol=2e-6 * max(1, length))


# ---------------------------------------------------------------------------
# Cases: (C, H, W, N, O, kernel, stride, padding, bias)
# ---------------------------------------------------------------------------

def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


CASES = [
    (1, 5, 5, 1, 1, 3, 1, 0, True),              # batch 1, smallest
    (3, 7, 9, 2, 3, 3, 1, 1, True),              # 'same' conv
    (2, 8, 7, 3, 3, (3, 2), (2, 1), (1, 0), True),   # non-square kernel, mixed stride
    (3, 9, 8, 1, 2, (2, 3), (3, 2), (2, 1), False),  # stride 3, padding 2, no bias
    (2, 6, 6, 2, 2, 1, 3, 0, True),              # 1x1 kernel, stride > kernel: gaps (phases without taps)
    (5, 9, 7, 5, 17, (5, 4), (1, 2), (2, 2), True),  # 17 channels: two 16-row tiles; K+1 > 32
    (20, 6, 5, 3, 5, 3, 1, 1, True),             # K = 180: two 160-row chunks (forward)
    (3, 4, 4, 7, 20, 3, 1, 1, True),             # O*9 = 180: two chunks (backward-input), N = 7
    (4, 1, 1, 3, 3, 1, 1, 0, True),              # 1x1 image
    (2, 1, 9, 2, 3, (1, 5), (1, 2), (0, 2), True),   # H = 1, kernel 1x5
    (2, 9, 9, 2, 2, (5, 3), 3, 2, True),         # stride 3, kernel 5: phases with 2 and 1 taps
    (1, 7, 6, 1, 2, 4, 2, 0, True),              # even kernel, stride 2
    (2, 2, 3, 4, 3, 2, 1, 2, False),             # padding >= kernel: outputs reading padding only
    (1, 28, 28, 2, 6, 5, 1, 2, True),            # lenet5 conv1 at batch 2 (default launch shapes)
    (6, 14, 14, 3, 16, 5, 1, 0, True),           # lenet5 conv2 at batch 3
    (8, 5, 5, 2, 8, 3, 1, 1, True),              # C = O = 8: the largest 8-row tiles
    (9, 5, 6, 2, 9, 3, 2, 1, True),              # C = O = 9: 16-row tiles with 7 empty rows
]


def _case_id(c):
    C, H, W, N, O, k, s, p, bias = c
    (kh, kw), (sh, sw), (ph, pw) = _pair(k), _pair(s), _pair(p)
    return f"C{C}H{H}W{W}N{N}-O{O}k{kh}x{kw}s{sh}x{sw}p{ph}x{pw}{'' if bias else '-nobias'}"


def make(case, dtype, seed=0):
    C, H, W, N, O, k, s, p, bias = case
    k, s, p = _pair(k), _pair(s), _pair(p)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((C, H, W, N)).astype(dtype)
    Wt = rng.standard_normal((O, C) + k).astype(dtype)
    b = rng.standard_normal(O).astype(dtype) if bias else None
    OH, OW = _out_hw(H, W, k[0], k[1], s, p)
    dz = rng.standard_normal((O, OH, OW, N)).astype(dtype)
    return x, Wt, b, dz, s, p


def _nan(shape, dtype, device):
    return device.put(np.full(shape, np.nan, dtype))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_parity(case, dtype, device):
    x, W, b, dz, s, p = make(case, dtype, seed=len(CASES))
    O, C, KH, KW = W.shape
    z_ref = ref_forward(x, W, b, s, p)
    # Forward, act None with z written too; outputs prefilled with NaN: every element written.
    y_out, z_out = _nan(z_ref.shape, dtype, device), _nan(z_ref.shape, dtype, device)
    y, z = conv.conv_forward(device.put(x), device.put(W), None if b is None else device.put(b), s, p,
                             y_out=y_out, z_out=z_out, write_z=True)
    assert y is y_out and z is z_out
    np.testing.assert_allclose(device.get(y), z_ref, **tol(dtype, C * KH * KW))
    np.testing.assert_array_equal(device.get(z), device.get(y))
    # Backward-input.
    dx = conv.conv_backward_input(device.put(dz), device.put(W), x.shape, s, p,
                                  out=_nan(x.shape, dtype, device))
    np.testing.assert_allclose(device.get(dx), ref_backward_input(dz, W, x.shape, s, p),
                               **tol(dtype, O * KH * KW))
    # Backward-weight and bias.
    dW_ref, db_ref = ref_backward_weight(x, dz, W.shape, s, p)
    dW, db = conv.conv_backward_weight(device.put(x), device.put(dz), W.shape, s, p,
                                       dW_out=_nan(W.shape, dtype, device), db_out=_nan((O,), dtype, device))
    length = dz[0].size
    np.testing.assert_allclose(device.get(dW), dW_ref, **tol(dtype, length))
    np.testing.assert_allclose(device.get(db), db_ref, **tol(dtype, length))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_activations(act, dtype, device):
    x, W, b, _, s, p = make((3, 6, 5, 3, 5, 3, 1, 1, True), dtype, seed=4)
    W *= 3                                           # large |z| for sigmoid's two branches
    z_ref = ref_forward(x, W, b, s, p)
    y, z = conv.conv_forward(device.put(x), device.put(W), device.put(b), s, p, act=act, write_z=True)
    want = {"relu": lambda v: np.maximum(v, 0), "sigmoid": lambda v: 1 / (1 + np.exp(-v)),
            "tanh": np.tanh}[act](z_ref)
    t = tol(dtype, 27)
    np.testing.assert_allclose(device.get(z), z_ref, **t)
    np.testing.assert_allclose(device.get(y), want, **t)
    # Default write_z: only relu keeps z.
    y2, z2 = conv.conv_forward(device.put(x), device.put(W), device.put(b), s, p, act=act)
    assert (z2 is not None) == (act == "relu")
    np.testing.assert_array_equal(device.get(y2), device.get(y))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_relu_zero_and_nan(dtype, device):
    """relu(0) = 0, relu(NaN) = NaN, z = NaN; sigmoid/tanh of NaN are NaN; z exactly 0 stays 0."""
    C, H, Wd, N, O = 2, 4, 4, 3, 3
    x = np.zeros((C, H, Wd, N), dtype)
    x[1, 2, 2, 1] = np.nan                            # reaches the outputs whose window covers (2, 2)
    W = np.ones((O, C, 3, 3), dtype)
    b = np.zeros(O, dtype)
    for act in ("relu", "sigmoid", "tanh"):
        y, z = conv.conv_forward(device.put(x), device.put(W), device.put(b), 1, 1, act=act, write_z=True)
        y, z = device.get(y), device.get(z)
        nan = np.zeros((O, H, Wd, N), bool)
        nan[:, 1:4, 1:4, 1] = True
        np.testing.assert_array_equal(np.isnan(z), nan)
        np.testing.assert_array_equal(np.isnan(y), nan)
        assert np.all(z[~nan] == 0)
        want = {"relu": 0.0, "sigmoid": 0.5, "tanh": 0.0}[act]
        assert np.all(y[~nan] == want)
        if act == "relu":
            assert not np.any(np.signbit(y[~nan]))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_same_bits_for_every_launch_shape(dtype, device):
    """Forward and backward-input sum in increasing k for any TX; weight grad repeats exactly."""
    x, W, b, dz, s, p = make((3, 7, 6, 5, 18, (3, 2), (2, 1), (1, 1), True), dtype, seed=7)
    xd, Wd, bd, dzd = (device.put(a) for a in (x, W, b, dz))
    ys = [device.get(conv.conv_forward(xd, Wd, bd, s, p, act="tanh", tx=tx)[0]) for tx in (1, 2, 16)]
    dxs = [device.get(conv.conv_backward_input(dzd, Wd, x.shape, s, p, tx=tx)) for tx in (1, 4, 16)]
    for a in ys[1:]:
        np.testing.assert_array_equal(a, ys[0])
    for a in dxs[1:]:
        np.testing.assert_array_equal(a, dxs[0])
    first = [device.get(a) for a in conv.conv_backward_weight(xd, dzd, W.shape, s, p)]
    again = [device.get(a) for a in conv.conv_backward_weight(xd, dzd, W.shape, s, p)]
    for a, b_ in zip(first, again):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weight_grad_slabs_segments_and_reduce_blocks(dtype, device):
    """Slabs of 16 columns (many), of 7 (not a multiple of the slice), of 272 (two 256-column
    segments), one slab; reduce blocks with BY 1, 2 and 8."""
    x, W, b, dz, s, p = make((2, 10, 9, 4, 3, 3, 1, 1, True), dtype, seed=8)   # P = 360
    dW_ref, db_ref = ref_backward_weight(x, dz, W.shape, s, p)
    t = tol(dtype, dz[0].size)
    xd, dzd = device.put(x), device.put(dz)
    for slab, rb in ((16, (4, 2)), (7, (3, 8)), (272, (1, 2)), (400, (32, 1)), (None, None)):
        need = conv.conv_backward_weight_workspace_size(x.shape, W.shape, s, p, slab=slab)
        ws = _nan((need + 5,), dtype, device)      # larger than needed is fine
        dW, db = conv.conv_backward_weight(xd, dzd, W.shape, s, p, slab=slab, reduce_block=rb, workspace=ws)
        np.testing.assert_allclose(device.get(dW), dW_ref, **t)
        np.testing.assert_allclose(device.get(db), db_ref, **t)
    dW, db = conv.conv_backward_weight(xd, dzd, W.shape, s, p, has_bias=False)
    assert db is None
    np.testing.assert_allclose(device.get(dW), dW_ref, **t)


def test_outputs_reused_across_calls(device):
    x, W, b, dz, s, p = make((2, 6, 6, 3, 4, 3, 1, 0, True), np.float32, seed=9)
    xd, Wd, bd, dzd = (device.put(a) for a in (x, W, b, dz))
    y, z = conv.conv_forward(xd, Wd, bd, s, p, act="relu")
    y2, z2 = conv.conv_forward(xd, Wd, bd, s, p, act="relu", y_out=y, z_out=z)
    assert y2 is y and z2 is z
    y3, z3 = conv.conv_forward(xd, Wd, bd, s, p, act="tanh", z_out=z)        # z_out: z written
    assert z3 is z
    np.testing.assert_allclose(device.get(y3), np.tanh(device.get(z)), **tol(np.float32, 1))
    dx = conv.conv_backward_input(dzd, Wd, x.shape, s, p)
    assert conv.conv_backward_input(dzd, Wd, x.shape, s, p, out=dx) is dx
    dW, db = conv.conv_backward_weight(xd, dzd, W.shape, s, p)
    ws = device.xp.empty(conv.conv_backward_weight_workspace_size(x.shape, W.shape, s, p), np.float32)
    dW2, db2 = conv.conv_backward_weight(xd, dzd, W.shape, s, p, dW_out=dW, db_out=db, workspace=ws)
    assert dW2 is dW and db2 is db
    np.testing.assert_allclose(device.get(dW), ref_backward_weight(x, dz, W.shape, s, p)[0], **tol(np.float32, 48))


# ---------------------------------------------------------------------------
# Launch shapes, with a recording fake module builder (no emulator, no GPU)
# ---------------------------------------------------------------------------

fake = recording_fixture(shared_mem=True)


# The listed layers: (name, C, H, W, O, kernel, padding), stride 1.
LAYERS = [("lenet5-conv1", 1, 28, 28, 6, 5, 2), ("lenet5-conv2", 6, 14, 14, 16, 5, 0),
          ("zhang2016-conv1", 1, 28, 28, 6, 5, 0), ("zhang2016-conv2", 6, 12, 12, 12, 5, 0)]


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("layer", LAYERS, ids=[lay[0] for lay in LAYERS])
def test_grids_fill_an_h200_at_batch_64(layer, dtype, fake):
    name, C, H, W, O, k, pad = layer
    N = 64
    x = np.zeros((C, H, W, N), dtype)
    Wt = np.zeros((O, C, k, k), dtype)
    b = np.zeros(O, dtype)
    OH, OW = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    dz = np.zeros((O, OH, OW, N), dtype)
    sfx = "" if dtype == np.float32 else "_f64"
    conv.conv_forward(x, Wt, b, 1, pad, act="relu")
    conv.conv_backward_input(dz, Wt, x.shape, 1, pad)
    conv.conv_backward_weight(x, dz, Wt.shape, 1, pad)
    names = [lau[0] for lau in fake.launches]
    assert names == [n + sfx for n in ("conv_forward", "conv_backward_input",
                                       "conv_backward_weight_partial", "conv_backward_weight_reduce")]
    plan = conv.launch_shapes(x.shape, Wt.shape, 1, pad)
    for (kernel, grid, block, args, shared_mem), base in zip(fake.launches, plan):
        assert kernel == base + sfx
        assert grid == plan[base]["grid"] and block == plan[base]["block"] and shared_mem == 0
        blocks = grid[0] * grid[1] * grid[2]
        assert blocks == plan[base]["blocks"]
        if base == "conv_backward_input" and name.endswith("conv1"):
            continue                                    # the first layer never needs dL/dx
        assert blocks >= 132, f"{name}: {kernel} launches only {blocks} blocks {grid} x {block}"
    # The documented block shapes.
    (_, fg, fb, *_), (_, ig, ib, *_), (_, pg, pb, *_), (_, rg, rb, *_) = fake.launches
    # 8-row tiles (blockDim.y 2) for at most 8 output (forward) / input (backward) channels
    assert fb[1:] == (2 if O <= 8 else 4, 1) and fb[0] in (1, 2, 4, 8, 16) and ib[1:] == (2 if C <= 8 else 4, 1)
    assert fg[1] == -(-O // (8 if O <= 8 else 16)) and ig[1] == -(-C // (8 if C <= 8 else 16))
    assert pb == (8, 4, 1) and pg[:2] == (-(-(C * k * k + 1) // 32), -(-O // 16))
    assert rb[0] * rb[1] <= 256 and rb[1] & (rb[1] - 1) == 0
    partial = plan["conv_backward_weight_partial"]
    assert partial["slabs"] == pg[2] == -(-(OH * OW * N) // partial["slab"])
    assert partial["workspace"] == pg[2] * O * (C * k * k + 1)


def test_launch_scalars_are_int32_and_counts(fake):
    x, W, b, dz, s, p = make(CASES[2], np.float64)
    conv.conv_forward(x, W, b, s, p, act="sigmoid", write_z=False)
    conv.conv_forward(x, W, None, s, p)
    conv.conv_backward_input(dz, W, x.shape, s, p)
    conv.conv_backward_weight(x, dz, W.shape, s, p, has_bias=False)
    assert [lau[0] for lau in fake.launches] == ["conv_forward_f64", "conv_forward_f64", "conv_backward_input_f64",
                                                 "conv_backward_weight_partial_f64",
                                                 "conv_backward_weight_reduce_f64"]
    for kernel, grid, block, args, _ in fake.launches:
        params = loader.kernel_signature(kernel)
        assert len(args) == len(params)
        for prm, a in zip(params, args):
            if prm.is_array:
                assert isinstance(a, np.ndarray) and a.dtype == prm.dtype
            else:
                assert type(a) is np.int32, f"{kernel}.{prm.name} got {type(a).__name__}"
    fwd = dict(zip([prm.name for prm in loader.kernel_signature("conv_forward_f64")], fake.launches[0][3]))
    assert (fwd["act"], fwd["write_z"], fwd["has_bias"]) == (2, 0, 1)
    fwd = dict(zip([prm.name for prm in loader.kernel_signature("conv_forward_f64")], fake.launches[1][3]))
    assert (fwd["act"], fwd["write_z"], fwd["has_bias"]) == (0, 0, 0)
    red = dict(zip([prm.name for prm in loader.kernel_signature("conv_backward_weight_reduce_f64")],
                   fake.launches[4][3]))
    assert red["has_bias"] == 0


# ---------------------------------------------------------------------------
# Argument errors (nothing launched)
# ---------------------------------------------------------------------------

def test_argument_errors(fake):
    x, W, b, dz, s, p = make((2, 6, 6, 2, 3, 3, 1, 0, True), np.float32)
    with pytest.raises(TypeError, match=r"x has dtype int32.*float32 and float64"):
        conv.conv_forward(x.astype(np.int32), W, b, s, p)
    with pytest.raises(TypeError, match="share one dtype"):
        conv.conv_forward(x, W.astype(np.float64), b, s, p)
    with pytest.raises(TypeError, match="dz has dtype float16"):
        conv.conv_backward_input(dz.astype(np.float16), W, x.shape, s, p)
    with pytest.raises(ValueError, match="C-contiguous"):
        conv.conv_forward(np.asfortranarray(x), W, b, s, p)
    with pytest.raises(ValueError, match="C-contiguous"):
        conv.conv_backward_weight(x, dz[:, :, ::-1], W.shape, s, p)
    with pytest.raises(ValueError, match="channels"):
        conv.conv_forward(x[:1].copy(), W, b, s, p)
    with pytest.raises(ValueError, match="4-D"):
        conv.conv_forward(x[0], W, b, s, p)
    with pytest.raises(ValueError, match=r"bias b must have shape \(3,\)"):
        conv.conv_forward(x, W, b[:2].copy(), s, p)
    with pytest.raises(ValueError, match="act must be"):
        conv.conv_forward(x, W, b, s, p, act="gelu")
    with pytest.raises(ValueError, match="does not fit"):
        conv.conv_forward(x, np.zeros((3, 2, 7, 7), np.float32), b, 1, 0)
    with pytest.raises(ValueError, match="larger than the kernels support"):
        conv.conv_forward(np.zeros((1, 40, 40, 1), np.float32), np.zeros((1, 1, 32, 3), np.float32), None, 1, 0)
    with pytest.raises(ValueError, match="stride must be >= 1"):
        conv.conv_forward(x, W, b, 0, p)
    with pytest.raises(ValueError, match="padding must be >= 0"):
        conv.conv_backward_input(dz, W, x.shape, s, -1)
    with pytest.raises(ValueError, match=r"dz has shape .* expected \(3, 4, 4, 2\)"):
        conv.conv_backward_input(dz[:, :3].copy(), W, x.shape, s, p)
    with pytest.raises(ValueError, match=r"dz has shape"):
        conv.conv_backward_weight(x, dz[:2].copy(), W.shape, s, p)
    with pytest.raises(ValueError, match="y_out has shape"):
        conv.conv_forward(x, W, b, s, p, y_out=np.empty((3, 4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="z_out has dtype float64"):
        conv.conv_forward(x, W, b, s, p, act="relu", z_out=np.empty((3, 4, 4, 2), np.float64))
    with pytest.raises(ValueError, match="z_out given but write_z is false"):
        conv.conv_forward(x, W, b, s, p, write_z=False, z_out=np.empty((3, 4, 4, 2), np.float32))
    with pytest.raises(ValueError, match="out has shape"):
        conv.conv_backward_input(dz, W, x.shape, s, p, out=np.empty((2, 6, 6, 3), np.float32))
    with pytest.raises(ValueError, match="workspace has 3 elements, needs"):
        conv.conv_backward_weight(x, dz, W.shape, s, p, workspace=np.empty(3, np.float32))
    with pytest.raises(TypeError, match="workspace has dtype float64"):
        conv.conv_backward_weight(x, dz, W.shape, s, p, workspace=np.empty(10**4, np.float64))
    with pytest.raises(ValueError, match="db_out given but has_bias is false"):
        conv.conv_backward_weight(x, dz, W.shape, s, p, has_bias=False, db_out=np.empty(3, np.float32))
    with pytest.raises(ValueError, match="dW_out has shape"):
        conv.conv_backward_weight(x, dz, W.shape, s, p, dW_out=np.empty((3, 2, 3, 2), np.float32))
    with pytest.raises(ValueError, match="tx must be one of"):
        conv.conv_forward(x, W, b, s, p, tx=3)
    with pytest.raises(ValueError, match="reduce_block"):
        conv.conv_backward_weight(x, dz, W.shape, s, p, reduce_block=(4, 3))
    with pytest.raises(ValueError, match="slab must be a positive int"):
        conv.conv_backward_weight(x, dz, W.shape, s, p, slab=0)
    with pytest.raises(TypeError, match="x_shape must be a 4-tuple"):
        conv.conv_backward_input(dz, W, 5, s, p)
    assert fake.launches == []


# ---------------------------------------------------------------------------
# Sanitizers: every kernel, both dtypes, under ASan+UBSan (guard zones poisoned:
# any out-of-range read or write aborts) and the tiled ones under TSan (a missing
# __syncthreads is a data race).  Marked slow.
# ---------------------------------------------------------------------------

_PROBE = r"""
import numpy as np, cudasim
from gpucnn.cuda import loader, conv
from test_kernels_conv import CASES, make
cases = [CASES[i] for i in {cases}] + [(2, 10, 9, 4, 3, 3, 1, 1, True)]
with loader.use_module_builder(lambda c, n, o: cudasim.load_module(code=c, name=n, options=o)):
    for dtype in {dtypes}:
        for case in cases:
            x, W, b, dz, s, p = make(case, dtype)
            conv.conv_forward(x, W, b, s, p, act="relu")
            conv.conv_forward(x, W, None, s, p, act="sigmoid", tx=1)
            conv.conv_backward_input(dz, W, x.shape, s, p)
            conv.conv_backward_weight(x, dz, W.shape, s, p)
            conv.conv_backward_weight(x, dz, W.shape, s, p, slab=272, reduce_block=(2, 4), has_bias=False)
print("SANITIZED-OK")
"""


@pytest.mark.slow
@pytest.mark.cudasim
@pytest.mark.parametrize("sanitize, cases, dtypes", [
    ("address", list(range(len(CASES))), "(np.float32, np.float64)"),
    ("thread", [2, 5, 6, 10], "(np.float32,)"),
])
def test_kernels_clean_under_sanitizers(sanitize, cases, dtypes):
    if cudasim is None:
        pytest.skip(CUDASIM_ERROR)
    if not cudasim.sanitizer_available(sanitize):
        pytest.skip(f"g++ has no {sanitize} sanitizer runtime")
    import os
    import pathlib
    tests = pathlib.Path(__file__).resolve().parent
    code = _PROBE.format(cases=cases, dtypes=dtypes)
    paths = [str(tests.parent), str(tests)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths))
    result = cudasim.run_sanitized(["-c", code], sanitize, env=env, timeout=1200)
    assert result.returncode == 0 and "SANITIZED-OK" in result.stdout, (
        f"{sanitize} run failed (rc {result.returncode}):\n{result.stdout[-2000:]}\n{result.stderr[-6000:]}")


@pytest.mark.parametrize("batch", [64, 256, 1024])
@pytest.mark.parametrize("layer", ["conv1", "conv2"])
def test_weight_grad_partial_grid_grows_with_the_batch(layer, batch):
    """The partial kernel's blocks are one warp each: slabs stay <= MAX_SLAB columns so that a large
    batch brings more blocks (>= 3.5 warps per SM of an H200), not longer serial walks.  Before the
    cap, lenet5's conv1 at batch 1024 ran 263 blocks of ~3,050 columns (2 warps per SM)."""
    x_shape, w_shape, pad = {"conv1": ((1, 28, 28, batch), (6, 1, 5, 5), 2),
                             "conv2": ((6, 14, 14, batch), (16, 6, 5, 5), 0)}[layer]
    partial = conv.launch_shapes(x_shape, w_shape, 1, pad)["conv_backward_weight_partial"]
    P = (x_shape[1] + 2 * pad - 4) * (x_shape[2] + 2 * pad - 4) * batch
    assert conv.MIN_SLAB <= partial["slab"] <= conv.MAX_SLAB and partial["slab"] % 16 == 0
    assert partial["slabs"] == -(-P // partial["slab"])
    warps_per_sm = partial["blocks"] * partial["threads_per_block"] / 32 / 132
    assert warps_per_sm >= 3.5, f"{layer} batch {batch}: {partial}"
    if batch == 1024:
        assert partial["slab"] == conv.MAX_SLAB and warps_per_sm > 7


@pytest.mark.parametrize("layer", LAYERS, ids=[lay[0] for lay in LAYERS])
def test_tile_rows_are_mostly_used(layer):
    """Issue 25, SIMT fix 3: a 16-row tile was 37.5% used at 6 channels.  The forward's rows are the
    output channels, backward-input's the input channels: with 8-row tiles for at most 8 channels,
    every listed layer's launched rows are at least 62.5% real (lenet5: 6 of 8, 16 of 16)."""
    name, C, H, W, O, k, pad = layer
    plan = conv.launch_shapes((C, H, W, 64), (O, C, k, k), 1, pad)
    for kernel, rows in (("conv_forward", O), ("conv_backward_input", C)):
        if kernel == "conv_backward_input" and C == 1:
            continue                                     # a first layer's dL/dx is never computed
        launched = plan[kernel]["grid"][1] * plan[kernel]["block"][1] * 4     # blockDim.y x 4 rows each
        assert rows / launched >= 0.625, f"{name} {kernel}: {rows} of {launched} rows"

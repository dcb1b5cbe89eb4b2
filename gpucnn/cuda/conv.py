"""Convolution on the GPU in the batch-last layout: host wrappers of the tiled kernels.

Kernels (``kernels/conv_forward.cu``, ``kernels/conv_backward_input.cu``,
``kernels/conv_backward_weight.cu``; float32 entry points, ``_f64`` twins for
float64; the contract comments at the top of each file give the formulas, the
thread mapping and the summation orders):

* :func:`conv_forward` -- ``y = act(z)``, ``z = conv(x, W) + b``: ONE launch of
  ``conv_forward`` (a shared-memory tiled implicit GEMM, bias and activation
  fused; ``z`` also written when asked).
* :func:`conv_backward_input` -- ``dx``: ONE launch of ``conv_backward_input``
  (the gather, tiled per stride phase).
* :func:`conv_backward_weight` -- ``(dW, db)``: TWO launches,
  ``conv_backward_weight_partial`` (split-K over slabs of the columns, the bias as
  an extra "ones" column) then ``conv_backward_weight_reduce`` (the slabs summed
  in a fixed order).

Layout "batch-last" (BL): activations are ``(C, H, W, N)`` with the batch
innermost, weights ``(O, C, KH, KW)``, biases ``(O,)``.  Convolution is the
seeds' cross-correlation with zero padding, output size
``(H + 2*PH - KH) // SH + 1``.  float32 and float64 (one dtype per call); any
other dtype raises :class:`TypeError`.  Kernel sizes up to 31 x 31.

Every wrapper only validates, allocates missing outputs with the arrays' own
module (``xp.empty``: NumPy under the test emulator, CuPy on a GPU) and
launches through :func:`gpucnn.cuda.loader.launch`: no other array operation,
so every GPU operation of a train step is one of the counted launches.  Inputs
must be C-contiguous (a strided view raises instead of being copied).  Pass the
``*_out`` arrays (and the weight-gradient ``workspace``) to reuse buffers across
steps.

Launch shapes (chosen from the shapes only, see :func:`launch_shapes`):

* ``conv_forward``: block ``(TX, BM / 4)``, grid ``(ceil(P / (4*TX)), ceil(O / BM))``
  with ``P = OH*OW*N``, ``BM`` = 8 rows per block when ``O <= 8`` (lenet5's 6
  channels fill 6 of 8 rows, not 6 of 16), else 16, and ``TX`` the largest of
  16, 8, 4, 2, 1 that still gives at least :data:`MIN_BLOCKS` blocks (1 when
  none does);
* ``conv_backward_input``: block ``(TX, BM / 4)``, grid ``(sum over the SH*SW stride
  phases of ceil(cols_phase / (4*TX)), ceil(C / BM))``, ``BM`` from ``C`` and
  ``TX`` chosen the same way;
* ``conv_backward_weight_partial``: block ``(8, 4)``, grid ``(ceil((K+1) / 32),
  ceil(O / 16), S)``, ``K = C*KH*KW``; the slab length is a multiple of 16 chosen
  so that the grid has about :data:`TARGET_PARTIAL_BLOCKS` blocks, between
  :data:`MIN_SLAB` and :data:`MAX_SLAB` columns (so a large batch gives more
  blocks, not longer slabs: each block is one warp), ``S = ceil(P / slab)``;
* ``conv_backward_weight_reduce``: block ``(BX, BY)``, grid ``ceil(O*(K+1) / BX)``,
  ``BX`` the largest power of two <= 32 with at least :data:`MIN_BLOCKS` blocks
  (1 when none), ``BY`` the largest power of two <= min(S, 256 / BX).

Determinism: no atomics; the forward and backward-input sums run in increasing
reduction index for every launch shape; the weight gradient's order depends on
(slab, BY) only, both functions of the shapes.
"""
from __future__ import annotations

import functools

import numpy as np

from .._utils import output_size
from .._utils import pair as _pair
from ..backend import get_array_module
from . import loader

__all__ = [
    "SUPPORTED_DTYPES",
    "ACTIVATIONS",
    "MAX_KERNEL",
    "MIN_BLOCKS",
    "TARGET_PARTIAL_BLOCKS",
    "MIN_SLAB",
    "MAX_SLAB",
    "conv_output_shape",
    "conv_forward",
    "conv_backward_input",
    "conv_backward_weight",
    "conv_backward_weight_workspace_size",
    "launch_shapes",
    "reduce_plan",
]

#: Dtypes the kernels implement, and the suffix of their entry points.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_SUFFIX = {np.dtype(np.float32): "", np.dtype(np.float64): "_f64"}

#: Activation names and the kernels' ``act`` codes.
ACTIVATIONS = {None: 0, "relu": 1, "sigmoid": 2, "tanh": 3}

#: Largest kernel height / width (the tap masks are 32-bit words with bit 31 reserved).
MAX_KERNEL = 31

#: Blocks a launch should reach to give every SM of an H200 (132 SMs) work.
MIN_BLOCKS = 132

#: The weight-gradient partial kernel aims at about four blocks (one warp each) per SM.
TARGET_PARTIAL_BLOCKS = 528

#: Smallest and largest slab of the weight-gradient split (columns per partial block).  The cap
#: keeps large batches from becoming a few long serial walks: at batch 1024 lenet5's conv1 slabs
#: were ~3,000 columns for 2 warps per SM (Nsight Compute measured 3.1% achieved occupancy and
#: 167 us, bench/results/nvidia-h200-2026-12-04-run2/ncu-conv.txt); capped, the grid grows with
#: the batch instead.
MIN_SLAB = 64
MAX_SLAB = 512

# Tile constants of the kernels (see their contract comments).
_BM = 16                 # output rows (channels) per block, all kernels ...
_BM_SMALL = 8            # ... forward / backward-input: 8 when there are at most 8 (blockDim.y 2)
_TP = 4                  # columns per thread, forward and backward-input
_TX_CHOICES = (16, 8, 4, 2, 1)
_WG_BN = 32              # weight-gradient columns (k) per block
_WG_BLOCK = (8, 4)
_WG_SLICE = 16           # columns per slice: slabs are multiples of it
_RED_MAX = 256
_GRID_YZ_MAX = 65535


# ---------------------------------------------------------------------------
# Argument checking
# ---------------------------------------------------------------------------

def _check_dtype(func: str, **arrays) -> np.dtype:
    """The common dtype of ``arrays`` (``None`` values ignored), if the kernels implement it."""
    supported = "float32 and float64"
    found = {}
    for name, a in arrays.items():
        if a is None:
            continue
        if a.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{func}: {name} has dtype {a.dtype}, but the convolution kernels "
                            f"implement only {supported}")
        found[name] = np.dtype(a.dtype)
    if len(set(found.values())) > 1:
        desc = ", ".join(f"{name} is {dt}" for name, dt in found.items())
        raise TypeError(f"{func}: arrays must share one dtype ({supported}), but {desc}")
    return next(iter(found.values()))


def _check_contiguous(func: str, **arrays) -> None:
    for name, a in arrays.items():
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"{func}: {name} must be C-contiguous (shape {tuple(a.shape)}, strides "
                             f"{tuple(a.strides)}); the wrapper does not copy")


def _check_ndim(func: str, name: str, a, ndim: int, layout: str) -> None:
    if a.ndim != ndim:
        raise ValueError(f"{func}: {name} must be {ndim}-D {layout}, got shape {tuple(a.shape)}")


def _shape4(func: str, name: str, shape) -> tuple[int, int, int, int]:
    try:
        shape = tuple(int(s) for s in shape)
    except TypeError:
        raise TypeError(f"{func}: {name} must be a 4-tuple of ints, got {shape!r}") from None
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"{func}: {name} must be 4 positive sizes, got {shape}")
    return shape


def _act_code(func: str, act) -> int:
    if act not in ACTIVATIONS:
        raise ValueError(f"{func}: act must be None, 'relu', 'sigmoid' or 'tanh', got {act!r}")
    return ACTIVATIONS[act]


def _geometry(func, x_shape, w_shape, stride, padding):
    """``(C, H, W, N, O, KH, KW, OH, OW, SH, SW, PH, PW)`` after checking the shapes."""
    C, H, Wd, N = x_shape
    O, Cw, KH, KW = w_shape
    SH, SW = _pair(stride, "stride", 1)
    PH, PW = _pair(padding, "padding", 0)
    if C != Cw:
        raise ValueError(f"{func}: the input has {C} channels (x shape {tuple(x_shape)}, CHWN) but "
                         f"the weights expect {Cw} (W shape {tuple(w_shape)}, OIHW)")
    if KH > MAX_KERNEL or KW > MAX_KERNEL:
        raise ValueError(f"{func}: kernel {KH}x{KW} is larger than the kernels support "
                         f"({MAX_KERNEL}x{MAX_KERNEL})")
    OH, OW = output_size(H, KH, SH, PH), output_size(Wd, KW, SW, PW)
    if OH < 1 or OW < 1:
        raise ValueError(f"{func}: kernel {KH}x{KW} does not fit the input {H}x{Wd} with padding "
                         f"{(PH, PW)} (output would be {OH}x{OW})")
    return C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW


def conv_output_shape(x_shape, w_shape, stride, padding) -> tuple[int, int, int, int]:
    """``(O, OH, OW, N)`` of the convolution of a BL input ``(C, H, W, N)`` with OIHW ``w_shape``."""
    func = "conv_output_shape"
    g = _geometry(func, _shape4(func, "x_shape", x_shape), _shape4(func, "w_shape", w_shape),
                  stride, padding)
    return (g[4], g[7], g[8], g[3])


def _check_out(func, name, a, shape, dtype, xp):
    """An ``out=`` array must have exactly the result's shape and dtype, be C-contiguous and writable."""
    if a is None:
        return None
    if not isinstance(a, xp.ndarray):
        raise TypeError(f"{func}: {name} must be a {xp.__name__} array like the inputs, "
                        f"got {type(a).__module__}.{type(a).__name__}")
    if tuple(a.shape) != tuple(shape):
        raise ValueError(f"{func}: {name} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    if a.dtype != dtype:
        raise TypeError(f"{func}: {name} has dtype {a.dtype}, expected {dtype} (the inputs' dtype)")
    _check_contiguous(func, **{name: a})
    if isinstance(a, np.ndarray) and not a.flags.writeable:
        raise ValueError(f"{func}: {name} is read-only")
    return a


# ---------------------------------------------------------------------------
# Launch shapes (functions of the shapes only)
# ---------------------------------------------------------------------------

def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _pick_tx(cols_tiles, m_tiles, tx=None) -> int:
    """The largest TX whose grid reaches MIN_BLOCKS (1 when none does); cols_tiles(bp) -> x blocks."""
    if tx is not None:
        if tx not in _TX_CHOICES:
            raise ValueError(f"tx must be one of {sorted(_TX_CHOICES)}, got {tx!r}")
        return tx
    for cand in _TX_CHOICES:
        if cols_tiles(_TP * cand) * m_tiles >= MIN_BLOCKS:
            return cand
    return 1


def _phase_cols(H, Wd, N, SH, SW, PH, PW) -> tuple[int, ...]:
    out = []
    for rh in range(SH):
        hf = (rh - PH) % SH
        nh = -(-(H - hf) // SH) if hf < H else 0
        for rw in range(SW):
            wf = (rw - PW) % SW
            nw = -(-(Wd - wf) // SW) if wf < Wd else 0
            out.append(nh * nw * N)
    return tuple(out)


def _rows(m: int) -> int:
    """Rows (channels) per block of the forward / backward-input tiles: 8 for at most 8 rows
    (a 6-channel layer would leave 10 of 16 rows empty), else 16; blockDim.y is rows / 4."""
    return _BM_SMALL if m <= _BM_SMALL else _BM


@functools.lru_cache(maxsize=1024)
def _forward_plan(g, tx):
    C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW = g
    P = OH * OW * N
    bm = _rows(O)
    m_tiles = _cdiv(O, bm)
    tx = _pick_tx(lambda bp: _cdiv(P, bp), m_tiles, tx)
    return (_cdiv(P, _TP * tx), m_tiles, 1), (tx, bm // 4, 1)


@functools.lru_cache(maxsize=1024)
def _input_plan(g, tx):
    C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW = g
    cols = _phase_cols(H, Wd, N, SH, SW, PH, PW)
    bm = _rows(C)
    m_tiles = _cdiv(C, bm)
    tx = _pick_tx(lambda bp: sum(_cdiv(c, bp) for c in cols), m_tiles, tx)
    return (sum(_cdiv(c, _TP * tx) for c in cols), m_tiles, 1), (tx, bm // 4, 1)


def _pow2_floor(v: int) -> int:
    return 1 << (max(1, int(v)).bit_length() - 1)


@functools.lru_cache(maxsize=1024)
def _weight_plan(g, slab, reduce_block):
    C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW = g
    P = OH * OW * N
    K1 = C * KH * KW + 1
    tiles = _cdiv(K1, _WG_BN) * _cdiv(O, _BM)
    if slab is None:
        want = _cdiv(TARGET_PARTIAL_BLOCKS, tiles)
        slab = min(MAX_SLAB, max(MIN_SLAB, _WG_SLICE * _cdiv(_cdiv(P, want), _WG_SLICE)))
        slab = max(slab, _WG_SLICE * _cdiv(_cdiv(P, _GRID_YZ_MAX), _WG_SLICE))   # S fits the grid's z
    elif not isinstance(slab, (int, np.integer)) or slab < 1:
        raise ValueError(f"slab must be a positive int, got {slab!r}")
    slab = int(slab)
    S = _cdiv(P, slab)
    if S > _GRID_YZ_MAX:
        raise ValueError(f"slab={slab} splits {P} columns into {S} slabs; at most {_GRID_YZ_MAX}")
    E = O * K1
    partial = ((_cdiv(K1, _WG_BN), _cdiv(O, _BM), S), _WG_BLOCK + (1,))
    return slab, S, S * E, partial, reduce_plan(E, S, reduce_block)


def reduce_plan(E: int, S: int, reduce_block=None):
    """``(grid, block)`` of ``conv_backward_weight_reduce`` summing ``S`` slabs of ``E`` elements:
    BX the largest power of two <= 32 with at least :data:`MIN_BLOCKS` blocks (1 when none), BY
    the largest power of two <= min(S, 256 / BX); or the given ``reduce_block`` (BX, BY)."""
    if reduce_block is None:
        bx = 32
        while bx > 1 and _cdiv(E, bx) < MIN_BLOCKS:
            bx //= 2
        by = _pow2_floor(min(S, _RED_MAX // bx))
    else:
        bx, by = (int(v) for v in reduce_block)
        if bx < 1 or by < 1 or by & (by - 1) or bx * by > _RED_MAX:
            raise ValueError(f"reduce_block must be (BX, BY) with BY a power of two and BX*BY <= "
                             f"{_RED_MAX}, got {reduce_block!r}")
    return (_cdiv(E, bx), 1, 1), (bx, by, 1)


def _g_from(func, x_shape, w_shape, stride, padding):
    return _geometry(func, _shape4(func, "x_shape", x_shape), _shape4(func, "w_shape", w_shape),
                     stride, padding)


def conv_backward_weight_workspace_size(x_shape, w_shape, stride, padding, *, slab=None) -> int:
    """Elements (of the data's dtype) the ``workspace`` of :func:`conv_backward_weight` needs.

    ``S * O * (C*KH*KW + 1)`` with ``S = ceil(OH*OW*N / slab)`` slabs; ``x_shape`` is BL
    ``(C, H, W, N)``, ``w_shape`` OIHW.  Any C-contiguous array of the dtype with at
    least this many elements will do (only the first ones are used).
    """
    g = _g_from("conv_backward_weight_workspace_size", x_shape, w_shape, stride, padding)
    return _weight_plan(g, slab, None)[2]


def launch_shapes(x_shape, w_shape, stride, padding, *, tx=None, slab=None, reduce_block=None) -> dict:
    """The launches of the four kernels for a BL input ``x_shape`` and OIHW ``w_shape``.

    Returns ``{kernel base name: {"grid": (gx, gy, gz), "block": (bx, by, bz), "blocks": int,
    "threads_per_block": int, "shared_mem": 0}}`` for ``conv_forward``, ``conv_backward_input``,
    ``conv_backward_weight_partial`` and ``conv_backward_weight_reduce`` (the last two also
    give ``slab``, ``slabs`` and ``workspace`` elements); the ``_f64`` twins launch the same.
    """
    g = _g_from("launch_shapes", x_shape, w_shape, stride, padding)
    slab_, S, ws, partial, reduce = _weight_plan(g, slab, reduce_block)
    out = {}
    for name, (grid, block) in (("conv_forward", _forward_plan(g, tx)),
                                ("conv_backward_input", _input_plan(g, tx)),
                                ("conv_backward_weight_partial", partial),
                                ("conv_backward_weight_reduce", reduce)):
        out[name] = {"grid": grid, "block": block, "blocks": grid[0] * grid[1] * grid[2],
                     "threads_per_block": block[0] * block[1] * block[2], "shared_mem": 0}
    for name in ("conv_backward_weight_partial", "conv_backward_weight_reduce"):
        out[name].update(slab=slab_, slabs=S, workspace=ws)
    return out


# ---------------------------------------------------------------------------
# The wrappers
# ---------------------------------------------------------------------------

def conv_forward(x, W, b, stride, padding, act=None, *, y_out=None, z_out=None, write_z=None, tx=None):
    """``y = act(conv(x, W) + b)`` and, when written, ``z = conv(x, W) + b``.

    Args:
        x: (C, H, W, N) BL input, float32 or float64, C-contiguous.
        W: (O, C, KH, KW) weights (KH, KW <= 31), same dtype, C-contiguous.
        b: (O,) bias of the same dtype, or None (no bias term).
        stride, padding: ints or (h, w) pairs (stride >= 1, padding >= 0).
        act: None, "relu", "sigmoid" or "tanh" (the shared activation rules).
        y_out, z_out: optional (O, OH, OW, N) arrays of the dtype to write into.
        write_z: also write z (default: ``act == "relu"``, whose backward needs z, or
            when ``z_out`` is given).
        tx: threads along the columns (16, 8, 4, 2 or 1); default from the shapes.
    Returns:
        ``(y, z)``: (O, OH, OW, N) arrays; ``z`` is None unless written (with act None
        and write_z, z is a second copy of y).
    Launches: ONE ``conv_forward[_f64]``, grid ``(ceil(OH*OW*N / (4*TX)), ceil(O / BM))``,
    block ``(TX, BM / 4)``, BM = 8 when O <= 8, else 16 (see :func:`launch_shapes`).
    """
    func = "conv_forward"
    xp = get_array_module(x=x, W=W, b=b, y_out=y_out, z_out=z_out)
    dtype = _check_dtype(func, x=x, W=W, b=b)
    _check_ndim(func, "x", x, 4, "(C, H, W, N) batch-last")
    _check_ndim(func, "W", W, 4, "OIHW")
    code = _act_code(func, act)
    g = _geometry(func, tuple(x.shape), tuple(W.shape), stride, padding)
    C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW = g
    if b is not None and tuple(b.shape) != (O,):
        raise ValueError(f"{func}: bias b must have shape ({O},) for W of shape {tuple(W.shape)}, "
                         f"got {tuple(b.shape)}")
    _check_contiguous(func, x=x, W=W, b=b)
    if write_z is None:
        write_z = act == "relu" or z_out is not None
    elif not write_z and z_out is not None:
        raise ValueError(f"{func}: z_out given but write_z is false")
    shape = (O, OH, OW, N)
    y = _check_out(func, "y_out", y_out, shape, dtype, xp)
    z = _check_out(func, "z_out", z_out, shape, dtype, xp) if write_z else None
    if y is None:
        y = xp.empty(shape, dtype=dtype)
    if write_z and z is None:
        z = xp.empty(shape, dtype=dtype)
    grid, block = _forward_plan(g, tx)
    loader.launch("conv_forward" + _SUFFIX[dtype],
                  (x, W, W if b is None else b, y, y if z is None else z,
                   C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW,
                   int(b is not None), code, int(bool(write_z))),
                  grid=grid, block=block)
    return y, z


def conv_backward_input(dz, W, x_shape, stride, padding, *, out=None, tx=None):
    """``dx = dL/dx`` of :func:`conv_forward` given ``dz = dL/dz`` (the seeds' gather).

    Args:
        dz: (O, OH, OW, N) BL gradient of the pre-activation, float32 or float64, C-contiguous.
        W: (O, C, KH, KW) weights of the same dtype, C-contiguous.
        x_shape: (C, H, W, N) of the forward input.
        stride, padding: as in the forward pass.
        out: optional (C, H, W, N) array of the dtype to write into.
        tx: threads along the columns (16, 8, 4, 2 or 1); default from the shapes.
    Returns:
        dx: (C, H, W, N); every element written (0 where no window reaches).
    Launches: ONE ``conv_backward_input[_f64]``, grid ``(sum over the SH*SW stride phases of
    ceil(cols / (4*TX)), ceil(C / BM))``, block ``(TX, BM / 4)``, BM = 8 when C <= 8, else 16
    (see :func:`launch_shapes`).
    """
    func = "conv_backward_input"
    xp = get_array_module(dz=dz, W=W, out=out)
    dtype = _check_dtype(func, dz=dz, W=W)
    _check_ndim(func, "dz", dz, 4, "(O, OH, OW, N) batch-last")
    _check_ndim(func, "W", W, 4, "OIHW")
    x_shape = _shape4(func, "x_shape", x_shape)
    g = _geometry(func, x_shape, tuple(W.shape), stride, padding)
    C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW = g
    if tuple(dz.shape) != (O, OH, OW, N):
        raise ValueError(f"{func}: dz has shape {tuple(dz.shape)}, expected {(O, OH, OW, N)} for "
                         f"x_shape {x_shape}, W shape {tuple(W.shape)}, stride {(SH, SW)}, "
                         f"padding {(PH, PW)}")
    _check_contiguous(func, dz=dz, W=W)
    dx = _check_out(func, "out", out, x_shape, dtype, xp)
    if dx is None:
        dx = xp.empty(x_shape, dtype=dtype)
    grid, block = _input_plan(g, tx)
    loader.launch("conv_backward_input" + _SUFFIX[dtype],
                  (dz, W, dx, C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW),
                  grid=grid, block=block)
    return dx


def conv_backward_weight(x, dz, w_shape, stride, padding, *, dW_out=None, db_out=None, has_bias=True,
                         workspace=None, slab=None, reduce_block=None):
    """``(dW, db)``: gradients of the weights and the bias given ``dz = dL/dz``.

    Args:
        x: (C, H, W, N) BL forward input, float32 or float64, C-contiguous.
        dz: (O, OH, OW, N) gradient of the pre-activation, same dtype, C-contiguous.
        w_shape: (O, C, KH, KW).
        stride, padding: as in the forward pass.
        dW_out: optional (O, C, KH, KW) array of the dtype; db_out: optional (O,) array.
        has_bias: compute db (else db is None and db_out must be None).
        workspace: optional C-contiguous array of the dtype with at least
            :func:`conv_backward_weight_workspace_size` elements, holding the per-slab
            partial sums (allocated per call when None).
        slab: columns per slab (default from the shapes, see the module docstring).
        reduce_block: (BX, BY) of the reduce launch (default from the shapes).
    Returns:
        ``(dW, db)``; db is None when ``has_bias`` is false.
    Launches: TWO: ``conv_backward_weight_partial[_f64]``, grid ``(ceil((K+1)/32),
    ceil(O/16), S)``, block ``(8, 4)``; then ``conv_backward_weight_reduce[_f64]``, grid
    ``ceil(O*(K+1) / BX)``, block ``(BX, BY)`` (see :func:`launch_shapes`).
    """
    func = "conv_backward_weight"
    xp = get_array_module(x=x, dz=dz, dW_out=dW_out, db_out=db_out, workspace=workspace)
    dtype = _check_dtype(func, x=x, dz=dz)
    _check_ndim(func, "x", x, 4, "(C, H, W, N) batch-last")
    _check_ndim(func, "dz", dz, 4, "(O, OH, OW, N) batch-last")
    w_shape = _shape4(func, "w_shape", w_shape)
    g = _geometry(func, tuple(x.shape), w_shape, stride, padding)
    C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW = g
    if tuple(dz.shape) != (O, OH, OW, N):
        raise ValueError(f"{func}: dz has shape {tuple(dz.shape)}, expected {(O, OH, OW, N)} for "
                         f"x shape {tuple(x.shape)}, w_shape {w_shape}, stride {(SH, SW)}, "
                         f"padding {(PH, PW)}")
    _check_contiguous(func, x=x, dz=dz)
    if not has_bias and db_out is not None:
        raise ValueError(f"{func}: db_out given but has_bias is false")
    slab, S, need, (pgrid, pblock), (rgrid, rblock) = _weight_plan(
        g, slab, None if reduce_block is None else tuple(reduce_block))
    dW = _check_out(func, "dW_out", dW_out, w_shape, dtype, xp)
    db = _check_out(func, "db_out", db_out, (O,), dtype, xp) if has_bias else None
    if workspace is not None:
        if not isinstance(workspace, xp.ndarray):
            raise TypeError(f"{func}: workspace must be a {xp.__name__} array like the inputs")
        if workspace.dtype != dtype:
            raise TypeError(f"{func}: workspace has dtype {workspace.dtype}, expected {dtype}")
        _check_contiguous(func, workspace=workspace)
        if workspace.size < need:
            raise ValueError(f"{func}: workspace has {workspace.size} elements, needs {need} "
                             f"(conv_backward_weight_workspace_size)")
    else:
        workspace = xp.empty((need,), dtype=dtype)
    if dW is None:
        dW = xp.empty(w_shape, dtype=dtype)
    if has_bias and db is None:
        db = xp.empty((O,), dtype=dtype)
    suffix = _SUFFIX[dtype]
    loader.launch("conv_backward_weight_partial" + suffix,
                  (x, dz, workspace, C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW, slab),
                  grid=pgrid, block=pblock)
    loader.launch("conv_backward_weight_reduce" + suffix,
                  (workspace, dW, dW if db is None else db, S, O, C * KH * KW, int(bool(has_bias))),
                  grid=rgrid, block=rblock)
    return dW, db

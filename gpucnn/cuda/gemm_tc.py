"""Tensor-core GEMMs on the GPU: host wrappers of ``kernels/gemm_tc_<mode>.cu``.

The precision modes tf32, 3xtf32, bf16 and fp16 (:mod:`gpucnn.precision`) run
every GEMM of a layer -- conv forward, backward-input and backward-weight,
and the dense layer's three products -- through one implicit-GEMM core on
the tensor cores (``mma.sync``, sm_80 and later; ``kernels/gemm_tc.cuh`` is
the contract): the operands are rounded to the mode's format while they are
staged into shared memory, so a mode costs no extra launch, and every sum,
the bias, the activation and the optimizer stay FP32.

Each GEMM is ``D[m, n] = sum_k P[m, k] Q[k, n]`` with ``m`` the long
(column) dimension of the batch-last layout and ``n`` the channels, stored
n-major, i.e. straight into the batch-last output:

==================  ===============  =================  ============  ===========
GEMM                P (m, k)         Q (k, n)           M             Nn
==================  ===============  =================  ============  ===========
conv forward        x, im2col        W (O, C*KH*KW)     OH*OW*N       O
conv backward-in    dz, gather       W by tap           H*W*N         C
conv backward-W     x, im2col^T + 1  dz (O, OH*OW*N)    C*KH*KW + 1   O  (split-K)
dense forward       x^T              W^T                N             Fout
dense dW            x                dz^T               Fin           Fout
dense dx            dz^T             W                  N             Fin
==================  ===============  =================  ============  ===========

The backward-weight GEMM sums its columns in slabs (one partial result per
slab, the bias as the "ones" row) that ``conv_backward_weight_reduce`` of
``kernels/conv_backward_weight.cu`` adds in a fixed order, as the FP32 path
does.  Tile: ``n8`` when ``Nn <= 8`` (lenet5's 6 channels fill 6 of 8
columns), else ``n64`` (:func:`tile_for`).

Launches per call: ONE, except conv backward-weight (TWO: the GEMM and the
reduce).  float32 arrays only (the modes round float32 operands).
"""
from __future__ import annotations

import functools

import numpy as np

from ..backend import get_array_module
from . import loader
from .conv import ACTIVATIONS, reduce_plan
from .conv import _geometry as _conv_geometry
from .conv import _shape4

__all__ = ["MODES", "TILES", "tile_for", "wgrad_slab", "kernel_name", "conv_forward", "conv_backward_input",
           "conv_backward_weight", "conv_backward_weight_workspace_size", "dense_forward", "dense_weight_grad",
           "dense_input_grad", "check_device", "require_tensor_cores"]

#: precision mode -> the kernels' mode tag (``kernels/gemm_tc_<tag>.cu``)
MODES = {"tf32": "tf32", "3xtf32": "3xtf32", "bf16": "bf16", "fp16": "f16"}

#: tile name -> (BM rows of m, BN columns of n) per block of 128 threads
TILES = {"n8": (128, 8), "n64": (64, 64)}

THREADS = 128
BK = 32                       # k per stage: a slab is a multiple of it
#: the weight-gradient split aims at about this many blocks (two per SM of an H200) ...
WGRAD_TARGET_BLOCKS = 264
#: ... with slabs of at least this many columns (a block's GEMM should outlast its launch)
WGRAD_MIN_SLAB = 256
_GRID_YZ_MAX = 65535
_INT32_MAX = 2**31 - 1
_FLAGS_BIAS, _FLAGS_Z = 1, 2
_OP_NOTHING = (0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)   # the geometry of a dense GEMM (unused)
#: KH + KW at most for the conv GEMMs (forward, backward-input, backward-weight): a window tap is two
#: bits of a 32-bit mask
#: (kernels/gemm_tc.cuh, TC_MAX_WINDOW)
MAX_WINDOW = 31


def tile_for(nn: int) -> str:
    """The tile for ``nn`` output channels (columns n): n8 (at most 8) or n64."""
    return "n8" if nn <= 8 else "n64"


def kernel_name(mode: str, gemm: str, nn: int) -> str:
    """``gemm_tc_<tag>_<gemm>_<tile>`` for precision ``mode`` and ``nn`` columns."""
    return f"gemm_tc_{MODES[mode]}_{gemm}_{tile_for(nn)}"


def _cdiv(a: int, b: int) -> int:
    return -(-int(a) // int(b))


def _grid(M: int, Nn: int, S: int = 1) -> tuple[int, int, int]:
    bm, bn = TILES[tile_for(Nn)]
    return (_cdiv(M, bm), _cdiv(Nn, bn), S)


def check_device(func: str, mode: str, *arrays) -> None:
    """Refuse a mode gpucnn has no tensor-core kernels for, a non-float32 array, or a GPU
    older than sm_80 (the ``mma.sync`` shapes used need Ampere or later)."""
    if mode not in MODES:
        raise ValueError(f"{func}: precision {mode!r} has no tensor-core kernels; they implement "
                         f"{', '.join(map(repr, MODES))} (fp32 runs the SIMT kernels)")
    for a in arrays:
        if a is not None and a.dtype != np.float32:
            raise TypeError(f"{func}: precision {mode!r} multiplies float32 arrays, got dtype {a.dtype} "
                            "(float64 runs in precision 'fp32' only)")
        if a is not None and a.size > _INT32_MAX:
            raise ValueError(f"{func}: an array of {a.size} elements is past the kernels' int32 offsets")
    if get_array_module(*[a for a in arrays if a is not None]) is not np:   # NumPy: the CPU emulator
        _check_capability(func, mode)


def require_tensor_cores(func: str, mode: str) -> None:
    """Refuse ``mode`` when the current CUDA device is older than sm_80 (no mma.sync .tf32/.bf16);
    nothing to check when CuPy sees no device."""
    from .. import backend

    if backend.cupy is not None and backend.cuda_available():
        _check_capability(func, mode)


def _check_capability(func: str, mode: str) -> None:
    """The current device's check (cached per device: this runs on every eager GEMM launch)."""
    major, minor = _capability()
    if major < 8:
        raise RuntimeError(f"{func}: precision {mode!r} needs tensor cores with mma.sync (sm_80 or later); "
                           f"this GPU is sm_{major}{minor}. Use precision 'fp32'")


@functools.lru_cache(maxsize=None)
def _capability_of(device: int) -> tuple[int, int]:
    from .. import backend

    cc = str(backend.cupy.cuda.Device(device).compute_capability)
    return int(cc[:-1]), int(cc[-1])


def _capability() -> tuple[int, int]:
    from .. import backend

    return _capability_of(int(backend.cupy.cuda.runtime.getDevice()))


def _geometry(func, x_shape, w_shape, stride, padding):
    """``(C, H, W, N, O, KH, KW, OH, OW, SH, SW, PH, PW)``: the SIMT wrappers' checks of the shapes."""
    return _conv_geometry(func, _shape4(func, "x_shape", x_shape), _shape4(func, "w_shape", w_shape),
                          stride, padding)


def _check_taps(func, g) -> None:
    """Refuse what the conv GEMMs' tap tables and masks cannot hold: a window with
    KH + KW > :data:`MAX_WINDOW`, or offsets into x or dz, padding and window overhang included,
    past int32 (a thread's and a tap's part of an offset are formed apart)."""
    C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW = g
    if KH + KW > MAX_WINDOW:
        raise ValueError(f"{func}: the tensor-core kernels hold a window tap as bits of a 32-bit mask, so "
                         f"KH + KW must be at most {MAX_WINDOW}; got a {KH}x{KW} kernel. Use precision 'fp32'")
    reach = max(C * (H + 2 * PH + KH) * (Wd + 2 * PW + KW), O * (OH + KH) * (OW + KW)) * N
    if reach > _INT32_MAX:
        raise ValueError(f"{func}: x (C={C}, H={H}, W={Wd}, N={N}) or dz (O={O}, OH={OH}, OW={OW}) with the "
                         f"padding and the {KH}x{KW} window's overhang spans {reach} elements, past the "
                         "kernels' int32 offsets")


def _out(func, name, a, shape, xp):
    if a is None:
        return xp.empty(shape, dtype=np.float32)
    if tuple(a.shape) != tuple(shape) or a.dtype != np.float32 or not a.flags.c_contiguous:
        raise ValueError(f"{func}: {name} must be a C-contiguous float32 array of shape {tuple(shape)}, got "
                         f"{a.dtype} {tuple(a.shape)}")
    return a


def _contiguous(func, **arrays):
    for name, a in arrays.items():
        if a is not None and not a.flags.c_contiguous:
            raise ValueError(f"{func}: {name} must be C-contiguous (shape {tuple(a.shape)}); the wrapper "
                             "does not copy")


def _launch(mode, gemm, P, Q, bias, out, zout, M, Nn, K, k_slab, ldo, out_z, ps, qs, act, flags, geom, S=1):
    loader.launch(kernel_name(mode, gemm, Nn),
                  (P, Q, bias, out, zout, M, Nn, K, k_slab, ldo, out_z, *ps, *qs, act, flags, *geom),
                  grid=_grid(M, Nn, S), block=(THREADS, 1, 1))


def _geom_args(g):
    C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW = g
    return (C, H, Wd, N, O, KH, KW, OH, OW, SH, SW, PH, PW)


def _k_all(K: int) -> int:
    """The k slab of an unsplit GEMM: all of K, rounded up to the stage."""
    return BK * _cdiv(max(K, 1), BK)


# ---------------------------------------------------------------------------
# convolution
# ---------------------------------------------------------------------------

def conv_forward(x, W, b, stride, padding, act=None, *, mode, y_out=None, z_out=None, write_z=None):
    """``y = act(conv(x, W) + b)`` (and ``z = conv(x, W) + b`` when written), in precision ``mode``.

    Same arguments and results as :func:`gpucnn.cuda.conv.conv_forward` (BL x (C, H, W, N),
    W (O, C, KH, KW), b (O,) or None), float32 only.  ONE launch of
    ``gemm_tc_<mode>_conv_fwd_<tile>``, grid (ceil(OH*OW*N / BM), ceil(O / BN)).
    """
    func = "conv_forward"
    check_device(func, mode, x, W, b)
    xp = get_array_module(x, W)
    if act not in ACTIVATIONS:
        raise ValueError(f"{func}: act must be None, 'relu', 'sigmoid' or 'tanh', got {act!r}")
    g = _geometry(func, x.shape, W.shape, stride, padding)
    C, H, Wd, N, O, KH, KW, OH, OW = g[:9]
    _check_taps(func, g)
    if b is not None and tuple(b.shape) != (O,):
        raise ValueError(f"{func}: bias b must have shape ({O},) for W of shape {tuple(W.shape)}, got {tuple(b.shape)}")
    _contiguous(func, x=x, W=W, b=b)
    if write_z is None:
        write_z = act == "relu" or z_out is not None
    shape = (O, OH, OW, N)
    y = _out(func, "y_out", y_out, shape, xp)
    z = _out(func, "z_out", z_out, shape, xp) if write_z else None
    M, K = OH * OW * N, C * KH * KW
    flags = (_FLAGS_BIAS if b is not None else 0) | (_FLAGS_Z if write_z else 0)
    _launch(mode, "conv_fwd", x, W, W if b is None else b, y, y if z is None else z,
            M, O, K, _k_all(K), M, 0, (0, 0), (1, K), ACTIVATIONS[act], flags, _geom_args(g))
    return y, z


def conv_backward_input(dz, W, x_shape, stride, padding, *, mode, out=None):
    """``dx`` of :func:`conv_forward` from ``dz`` (the gather with the rotated kernel), in ``mode``.

    ONE launch of ``gemm_tc_<mode>_conv_dgrad_<tile>``, grid (ceil(H*W*N / BM), ceil(C / BN)).
    """
    func = "conv_backward_input"
    check_device(func, mode, dz, W)
    xp = get_array_module(dz, W)
    g = _geometry(func, x_shape, W.shape, stride, padding)
    C, H, Wd, N, O, KH, KW, OH, OW = g[:9]
    if tuple(dz.shape) != (O, OH, OW, N):
        raise ValueError(f"{func}: dz has shape {tuple(dz.shape)}, expected {(O, OH, OW, N)}")
    _check_taps(func, g)
    _contiguous(func, dz=dz, W=W)
    dx = _out(func, "out", out, (C, H, Wd, N), xp)
    M, K = H * Wd * N, O * KH * KW
    _launch(mode, "conv_dgrad", dz, W, W, dx, dx, M, C, K, _k_all(K), M, 0, (0, 0), (0, 0), 0, 0, _geom_args(g))
    return dx


@functools.lru_cache(maxsize=1024)
def wgrad_slab(P: int, K1: int, O: int) -> tuple[int, int]:
    """``(slab, S)`` of the backward-weight split: columns per slab (a multiple of 32, at least
    :data:`WGRAD_MIN_SLAB`) so that the grid has about :data:`WGRAD_TARGET_BLOCKS` blocks."""
    gx, gy, _ = _grid(K1, O)
    tiles = gx * gy
    want = max(1, WGRAD_TARGET_BLOCKS // tiles)
    slab = max(WGRAD_MIN_SLAB, BK * _cdiv(_cdiv(P, want), BK))
    slab = max(slab, BK * _cdiv(_cdiv(P, _GRID_YZ_MAX), BK))
    return slab, _cdiv(P, slab)


def conv_backward_weight_workspace_size(x_shape, w_shape, stride, padding) -> int:
    """Elements (float32) the ``workspace`` of :func:`conv_backward_weight` needs: ``S * O * (K + 1)``."""
    g = _geometry("conv_backward_weight_workspace_size", x_shape, w_shape, stride, padding)
    C, H, Wd, N, O, KH, KW, OH, OW = g[:9]
    K1 = C * KH * KW + 1
    return wgrad_slab(OH * OW * N, K1, O)[1] * O * K1


def conv_backward_weight(x, dz, w_shape, stride, padding, *, mode, dW_out=None, db_out=None, has_bias=True,
                         workspace=None):
    """``(dW, db)`` from ``dz`` in ``mode``: the GEMM over slabs of the columns (the bias as the
    ones row), then the fixed-order sum of the slabs.

    TWO launches: ``gemm_tc_<mode>_conv_wgrad_<tile>``, grid (ceil((K+1) / BM), ceil(O / BN), S),
    then ``conv_backward_weight_reduce`` (:func:`gpucnn.cuda.conv.reduce_plan`).
    """
    func = "conv_backward_weight"
    check_device(func, mode, x, dz)
    xp = get_array_module(x, dz)
    g = _geometry(func, x.shape, w_shape, stride, padding)
    C, H, Wd, N, O, KH, KW, OH, OW = g[:9]
    if tuple(dz.shape) != (O, OH, OW, N):
        raise ValueError(f"{func}: dz has shape {tuple(dz.shape)}, expected {(O, OH, OW, N)}")
    _check_taps(func, g)
    _contiguous(func, x=x, dz=dz)
    if not has_bias and db_out is not None:
        raise ValueError(f"{func}: db_out given but has_bias is false")
    K = C * KH * KW
    P = OH * OW * N
    slab, S = wgrad_slab(P, K + 1, O)
    need = S * O * (K + 1)
    if workspace is None:
        workspace = xp.empty((need,), dtype=np.float32)
    elif workspace.dtype != np.float32 or workspace.size < need or not workspace.flags.c_contiguous:
        raise ValueError(f"{func}: workspace must be a C-contiguous float32 array of at least {need} elements "
                         f"(conv_backward_weight_workspace_size), got {workspace.dtype} of {workspace.size}")
    dW = _out(func, "dW_out", dW_out, tuple(int(s) for s in w_shape), xp)
    db = _out(func, "db_out", db_out, (O,), xp) if has_bias else None
    _launch(mode, "conv_wgrad", x, dz, dz, workspace, workspace, K + 1, O, P, slab, K + 1, O * (K + 1),
            (0, 0), (1, P), 0, 0, _geom_args(g), S=S)
    rgrid, rblock = reduce_plan(O * (K + 1), S)
    loader.launch("conv_backward_weight_reduce", (workspace, dW, dW if db is None else db, S, O, K,
                                                  int(bool(has_bias))), grid=rgrid, block=rblock)
    return dW, db


# ---------------------------------------------------------------------------
# dense
# ---------------------------------------------------------------------------

def _mat(func, name, a):
    if a.ndim != 2:
        raise ValueError(f"{func}: {name} must be 2-D, got shape {tuple(a.shape)}")
    return a.shape


def dense_forward(x, W, b, act=None, *, mode, y_out=None, z_out=None, write_z=None):
    """``y = act(W @ x + b)`` (and ``z``) for x (Fin, N), W (Fout, Fin), in ``mode``.

    ONE launch of ``gemm_tc_<mode>_dense_fwd_<tile>``, grid (ceil(N / BM), ceil(Fout / BN)).
    """
    func = "dense_forward"
    check_device(func, mode, x, W, b)
    xp = get_array_module(x, W)
    Fin, N = _mat(func, "x", x)
    Fout, Fw = _mat(func, "W", W)
    if Fw != Fin:
        raise ValueError(f"{func}: x has {Fin} features but W {tuple(W.shape)} expects {Fw}")
    if b is not None and tuple(b.shape) != (Fout,):
        raise ValueError(f"{func}: b must have shape ({Fout},), got {tuple(b.shape)}")
    if act not in ACTIVATIONS:
        raise ValueError(f"{func}: act must be None, 'relu', 'sigmoid' or 'tanh', got {act!r}")
    _contiguous(func, x=x, W=W, b=b)
    if write_z is None:
        write_z = act == "relu" or z_out is not None
    y = _out(func, "y_out", y_out, (Fout, N), xp)
    z = _out(func, "z_out", z_out, (Fout, N), xp) if write_z else None
    flags = (_FLAGS_BIAS if b is not None else 0) | (_FLAGS_Z if write_z else 0)
    _launch(mode, "dense_fwd", x, W, W if b is None else b, y, y if z is None else z, N, Fout, Fin, _k_all(Fin), N, 0,
            (1, N), (1, Fin), ACTIVATIONS[act], flags, _OP_NOTHING)
    return y, z


def dense_weight_grad(dz, x, *, mode, out=None):
    """``dW = dz @ x^T`` (Fout, Fin) in ``mode``: ONE launch of ``gemm_tc_<mode>_dense_wgrad_<tile>``,
    grid (ceil(Fin / BM), ceil(Fout / BN))."""
    func = "dense_weight_grad"
    check_device(func, mode, dz, x)
    xp = get_array_module(dz, x)
    Fout, N = _mat(func, "dz", dz)
    Fin, Nx = _mat(func, "x", x)
    if Nx != N:
        raise ValueError(f"{func}: dz has shape {(Fout, N)} and x {(Fin, Nx)}: the batch sizes differ")
    _contiguous(func, dz=dz, x=x)
    dW = _out(func, "out", out, (Fout, Fin), xp)
    _launch(mode, "dense_wgrad", x, dz, dz, dW, dW, Fin, Fout, N, _k_all(N), Fin, 0, (N, 1), (1, N), 0, 0, _OP_NOTHING)
    return dW


def dense_input_grad(W, dz, *, mode, out=None):
    """``dx = W^T @ dz`` (Fin, N) in ``mode``: ONE launch of ``gemm_tc_<mode>_dense_dgrad_<tile>``,
    grid (ceil(N / BM), ceil(Fin / BN))."""
    func = "dense_input_grad"
    check_device(func, mode, W, dz)
    xp = get_array_module(W, dz)
    Fout, Fin = _mat(func, "W", W)
    Fo, N = _mat(func, "dz", dz)
    if Fo != Fout:
        raise ValueError(f"{func}: W has shape {(Fout, Fin)} and dz {(Fo, N)}: the output features differ")
    _contiguous(func, W=W, dz=dz)
    dx = _out(func, "out", out, (Fin, N), xp)
    _launch(mode, "dense_dgrad", dz, W, W, dx, dx, N, Fin, Fout, _k_all(Fout), N, 0, (1, N), (Fin, 1), 0, 0,
            _OP_NOTHING)
    return dx

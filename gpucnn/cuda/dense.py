"""Dense layers on batch-last vectors (kernels/dense.cu).

Layout: x is (Fin, N), W (Fout, Fin), b (Fout,), y / z / dy / dz (Fout, N).
Forward ``y = act(W @ x + b)``; backward ``dz = dy * act'(saved)``,
``db = sum_n dz``, ``dW = dz @ x^T``, ``dx = W^T @ dz``.

The three products run on one shared-memory tiled GEMM kernel core: 32 x 32
output tiles per block, K in slices of 16, 4 x 4 outputs per thread in
registers, and ``KS`` k-groups of 64 threads per block that split the
reduction inside the block and combine in a fixed order (see the contract
comment of kernels/dense.cu).  :func:`gemm_launch` gives the grid, block and
KS of a product; KS is a function of the shapes only (:func:`gemm_k_groups`),
so a layer's results are the same bits at every step.  The ``ceil(M/32)`` row
tiles go on the grid's y axis, and past CUDA's 65535 for it (more than
2,097,120 rows) over y and z (:func:`gemm_launch`); every block still computes
one 32 x 32 tile the same way, so the bits do not depend on the split.
"""
from __future__ import annotations

from . import loader
from .elementwise import _contiguous, _dtype, _kernel, _ndim, _out, _positive, _same_shape, _xp, act_code

__all__ = ["GEMM_TILE", "GEMM_MAX_K_GROUPS", "gemm_k_groups", "gemm_launch", "reduce_block",
           "dense_forward", "dense_backward_act", "dense_weight_grad", "dense_input_grad"]

#: Output tile (rows, columns) of one GEMM block; K is consumed 16 at a time.
GEMM_TILE = (32, 32)
GEMM_K_SLICE = 16
GEMM_GROUP_THREADS = 64
GEMM_MAX_K_GROUPS = 4
#: Above this many blocks the grid fills an H100/H200 twice: no in-block split of K.
GEMM_FULL_GRID = 264
#: Largest (and the default's cap) block of dense_backward_act.
REDUCE_MAX_BLOCK = 256


def gemm_k_groups(M: int, Nc: int, K: int) -> int:
    """KS, the k-groups per block of a (M x K) @ (K x Nc) product: a function of the shapes only.

    1 when the grid already has >= 264 blocks; otherwise one group per 8 K-slices
    of 16 (128 terms), between 1 and 4.
    """
    blocks = loader.ceil_div(M, GEMM_TILE[0]) * loader.ceil_div(Nc, GEMM_TILE[1])
    if blocks >= GEMM_FULL_GRID:
        return 1
    slices = loader.ceil_div(K, GEMM_K_SLICE)
    return max(1, min(GEMM_MAX_K_GROUPS, slices // 8))


def gemm_launch(M: int, Nc: int, K: int, k_groups: int | None = None):
    """``(grid, block)`` of a GEMM-core launch producing an (M, Nc) result over K terms.

    grid = ``(ceil(Nc/32), GY, GZ)``: the ``ceil(M/32)`` row tiles as ``GY`` = all of
    them and ``GZ = 1`` when that fits CUDA's gridDim.y limit (:data:`loader.MAX_GRID`),
    else ``GZ = ceil(tiles / limit)`` and ``GY = ceil(tiles / GZ)`` (fewer than ``GZ``
    spare blocks per column tile, which exit at once: kernels/dense.cu's contract).
    """
    ks = gemm_k_groups(M, Nc, K) if k_groups is None else int(k_groups)
    if not 1 <= ks <= GEMM_MAX_K_GROUPS:
        raise ValueError(f"k_groups must be in 1..{GEMM_MAX_K_GROUPS}, got {k_groups!r}")
    largest = loader.INT32_MAX - GEMM_TILE[0]
    if max(M, Nc) > largest:
        raise ValueError(f"a GEMM result of {M} x {Nc}: the kernels take at most {largest} rows "
                         "and columns (their tile indices are int32)")
    row_tiles = loader.ceil_div(M, GEMM_TILE[0])
    gz = loader.ceil_div(row_tiles, loader.MAX_GRID[1])
    grid = (loader.ceil_div(Nc, GEMM_TILE[1]), loader.ceil_div(row_tiles, gz), gz)
    return grid, (GEMM_GROUP_THREADS, ks, 1)


def reduce_block(N: int) -> int:
    """Threads per block of :func:`dense_backward_act`: the smallest power of two >= N in [32, 256]."""
    block = 32
    while block < N and block < REDUCE_MAX_BLOCK:
        block *= 2
    return block


def _mat(func, name, a, layout):
    _ndim(func, name, a, 2, layout)
    _positive(func, name, a.shape)
    _contiguous(func, **{name: a})
    return tuple(int(s) for s in a.shape)


def dense_forward(x, W, b, act=None, *, y_out=None, z_out=None, write_z=None, k_groups=None):
    """``y = act(W @ x + b)`` on batch-last ``x``.

    Args:
        x: (Fin, N) float32 or float64, C-contiguous.
        W: (Fout, Fin), b: (Fout,) or None; the dtype of x.
        act: None, "relu", "sigmoid" or "tanh".
        y_out, z_out: optional outputs (Fout, N).
        write_z: also write the pre-activation z (default: act == "relu", whose
            backward needs z; sigmoid / tanh differentiate from y).
        k_groups: override of :func:`gemm_k_groups` (tests; changes the bits of
            the sums, as any other reduction order would).
    Returns:
        (y, z): z None unless written.
    Launches: 1, ``dense_forward[_f64]``, grid (ceil(N/32), ceil(Fout/32), 1) (past 65535 row
        tiles, i.e. 2,097,120 rows, the tiles fold over y and z: :func:`gemm_launch`), block (64, KS, 1) (:func:`gemm_launch` (Fout, N, Fin)).
    """
    func = "dense_forward"
    code = act_code(func, act)
    write_z = (act == "relu") if write_z is None else bool(write_z)
    if z_out is not None and not write_z:
        raise ValueError(f"{func}: z_out given but write_z is False")
    xp = _xp(x=x, W=W, b=b, y_out=y_out, z_out=z_out)
    dtype = _dtype(func, x=x, W=W, b=b)
    Fin, N = _mat(func, "x", x, "(Fin, N)")
    Fout, Fin_w = _mat(func, "W", W, "(Fout, Fin)")
    if Fin_w != Fin:
        raise ValueError(f"{func}: W has shape {(Fout, Fin_w)} (Fout, Fin) but x has shape {(Fin, N)} (Fin, N)")
    if b is not None:
        _same_shape(func, "b", b, (Fout,), f"W of shape {(Fout, Fin)}")
        _contiguous(func, b=b)
    y = _out(func, "y_out", y_out, xp, (Fout, N), dtype)
    z = _out(func, "z_out", z_out, xp, (Fout, N), dtype) if write_z else None
    grid, block = gemm_launch(Fout, N, Fin, k_groups)
    loader.launch(_kernel(func, dtype),
                  (W, x, b if b is not None else W, y, z if z is not None else y,
                   Fout, Fin, N, code, int(b is not None), int(write_z)),
                  grid=grid, block=block)
    return y, z


def dense_backward_act(dy, saved, act, *, dz_out=None, db_out=None, has_bias=True, block=None):
    """``dz = dy * act'(saved)`` and ``db[f] = sum_n dz[f, n]``, in ONE launch.

    Args:
        dy: (Fout, N) float32 or float64, C-contiguous.
        saved: same shape: z for "relu" (relu'(0) = 1/2), y for "sigmoid" /
            "tanh"; ignored (may be None) for act None (dz = dy).
        act: None, "relu", "sigmoid" or "tanh".
        dz_out, db_out: optional outputs (Fout, N) and (Fout,).
        has_bias: False skips db (returned as None).
        block: threads per block, a power of two in [32, 256] (default
            :func:`reduce_block` (N)); it fixes the order of the db sums.
    Returns:
        (dz, db).
    Launches: 1, ``dense_backward_act[_f64]``, one block per row:
        grid (Fout, 1, 1), block (B, 1, 1).
    """
    func = "dense_backward_act"
    code = act_code(func, act)
    if code and saved is None:
        raise ValueError(f"{func}: act={act!r} needs saved (z for relu, y for sigmoid/tanh)")
    saved_arr = saved if code else None
    if db_out is not None and not has_bias:
        raise ValueError(f"{func}: db_out given but has_bias is False")
    xp = _xp(dy=dy, saved=saved_arr, dz_out=dz_out, db_out=db_out)
    dtype = _dtype(func, dy=dy, saved=saved_arr)
    F, N = _mat(func, "dy", dy, "(Fout, N)")
    if saved_arr is not None:
        _same_shape(func, "saved", saved_arr, (F, N), "the shape of dy")
        _contiguous(func, saved=saved_arr)
    block = reduce_block(N) if block is None else int(block)
    if block < 32 or block > REDUCE_MAX_BLOCK or block & (block - 1):
        raise ValueError(f"{func}: block must be a power of two in [32, {REDUCE_MAX_BLOCK}], got {block}")
    dz = _out(func, "dz_out", dz_out, xp, (F, N), dtype)
    if dz is dy or (saved_arr is not None and dz is saved_arr):
        raise ValueError(f"{func}: dz_out may not alias dy or saved")
    db = _out(func, "db_out", db_out, xp, (F,), dtype) if has_bias else None
    loader.launch(_kernel(func, dtype),
                  (dy, saved_arr if saved_arr is not None else dy, dz, db if db is not None else dz,
                   F, N, code, int(bool(has_bias))),
                  n_blocks=F, block=block)
    return dz, db


def dense_weight_grad(dz, x, *, out=None, k_groups=None):
    """``dW = dz @ x^T`` (the reduction over the batch).

    Args:
        dz: (Fout, N), x: (Fin, N); float32 or float64, C-contiguous.
        out: optional output (Fout, Fin).
    Returns:
        dW (Fout, Fin).
    Launches: 1, ``gemm_nt[_f64]`` with M = Fout, Nc = Fin, K = N:
        grid (ceil(Fin/32), ceil(Fout/32), 1) (past 65535 row tiles folded over y and z),
        block (64, KS, 1) (:func:`gemm_launch`).
    """
    func = "dense_weight_grad"
    xp = _xp(dz=dz, x=x, out=out)
    dtype = _dtype(func, dz=dz, x=x)
    Fout, N = _mat(func, "dz", dz, "(Fout, N)")
    Fin, Nx = _mat(func, "x", x, "(Fin, N)")
    if Nx != N:
        raise ValueError(f"{func}: dz has shape {(Fout, N)} and x {(Fin, Nx)}: the batch sizes differ")
    dW = _out(func, "out", out, xp, (Fout, Fin), dtype)
    grid, block = gemm_launch(Fout, Fin, N, k_groups)
    loader.launch(_kernel("gemm_nt", dtype), (dz, x, dW, Fout, Fin, N), grid=grid, block=block)
    return dW


def dense_input_grad(W, dz, *, out=None, k_groups=None):
    """``dx = W^T @ dz``.

    Args:
        W: (Fout, Fin), dz: (Fout, N); float32 or float64, C-contiguous.
        out: optional output (Fin, N).
    Returns:
        dx (Fin, N).
    Launches: 1, ``gemm_tn[_f64]`` with M = Fin, Nc = N, K = Fout:
        grid (ceil(N/32), ceil(Fin/32), 1) (past 65535 row tiles folded over y and z),
        block (64, KS, 1) (:func:`gemm_launch`).
    """
    func = "dense_input_grad"
    xp = _xp(W=W, dz=dz, out=out)
    dtype = _dtype(func, W=W, dz=dz)
    Fout, Fin = _mat(func, "W", W, "(Fout, Fin)")
    Fout_d, N = _mat(func, "dz", dz, "(Fout, N)")
    if Fout_d != Fout:
        raise ValueError(f"{func}: W has shape {(Fout, Fin)} (Fout, Fin) but dz has shape {(Fout_d, N)} (Fout, N)")
    dx = _out(func, "out", out, xp, (Fin, N), dtype)
    grid, block = gemm_launch(Fin, N, Fout, k_groups)
    loader.launch(_kernel("gemm_tn", dtype), (W, dz, dx, Fin, N, Fout), grid=grid, block=block)
    return dx

"""Dense layers on batch-last vectors (kernels/dense.cu).

Layout: x is (Fin, N), W (Fout, Fin), b (Fout,), y / z / dy / dz (Fout, N).
Forward ``y = act(W @ x + b)``; backward ``dz = dy * act'(saved)``,
``db = sum_n dz``, ``dW = dz @ x^T``, ``dx = W^T @ dz``, all of it in one launch
(:func:`dense_backward`: dz is computed while the GEMMs stage it, never stored).
The unfused sequence (:func:`dense_backward_act`, :func:`dense_weight_grad`,
:func:`dense_input_grad`) stays: the tensor-core modes use the first, and the
fused kernel is tested bit for bit against the three.

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
           "dense_forward", "dense_backward", "dense_backward_act", "dense_weight_grad", "dense_input_grad"]

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


def dense_backward(dy, saved, act, x, W, *, dW_out=None, dx_out=None, db_out=None, has_bias=True,
                   input_grad=True, k_groups=None, red_block=None):
    """``dz = dy * act'(saved)``, ``dW = dz @ x^T``, ``db = sum_n dz`` and ``dx = W^T @ dz`` in ONE launch.

    The same bits as :func:`dense_backward_act` (block ``red_block``) followed by
    :func:`dense_weight_grad` and :func:`dense_input_grad` (see kernels/dense.cu,
    ``dense_backward``); dz itself is not written.

    Args:
        dy: (Fout, N) float32 or float64, C-contiguous.
        saved: same shape: z for "relu", y for "sigmoid" / "tanh"; ignored (may
            be None) for act None.
        act: None, "relu", "sigmoid" or "tanh".
        x: (Fin, N), the forward input; W: (Fout, Fin); the dtype of dy.
        dW_out, dx_out, db_out: optional outputs (Fout, Fin), (Fin, N), (Fout,).
        has_bias: False: no db (returned as None).  input_grad: False: no dx
            (returned as None) and no dx blocks.
        k_groups: ``(ks_w, ks_x)`` overriding :func:`gemm_k_groups` of the two
            products (tests); red_block: the db reduction's virtual block
            (default :func:`reduce_block` (N)).
    Returns:
        (dx, dW, db).
    Launches: 1, ``dense_backward[_f64]``, grid (TW + TX + Fout', 1, 1) with TW = ceil(Fout/32) *
        ceil(Fin/32) dW tiles, TX = ceil(Fin/32) * ceil(N/32) dx tiles (0 without input_grad) and
        Fout' = Fout db rows (0 without bias); block (64, max(ks_w, ks_x), 1).
    """
    func = "dense_backward"
    code = act_code(func, act)
    if code and saved is None:
        raise ValueError(f"{func}: act={act!r} needs saved (z for relu, y for sigmoid/tanh)")
    saved_arr = saved if code else None
    if db_out is not None and not has_bias:
        raise ValueError(f"{func}: db_out given but has_bias is False")
    if dx_out is not None and not input_grad:
        raise ValueError(f"{func}: dx_out given but input_grad is False")
    xp = _xp(dy=dy, saved=saved_arr, x=x, W=W, dW_out=dW_out, dx_out=dx_out, db_out=db_out)
    dtype = _dtype(func, dy=dy, saved=saved_arr, x=x, W=W)
    Fout, N = _mat(func, "dy", dy, "(Fout, N)")
    Fin, Nx = _mat(func, "x", x, "(Fin, N)")
    if Nx != N:
        raise ValueError(f"{func}: dy has shape {(Fout, N)} and x {(Fin, Nx)}: the batch sizes differ")
    if tuple(W.shape) != (Fout, Fin):
        raise ValueError(f"{func}: W has shape {tuple(W.shape)}, expected (Fout, Fin) = {(Fout, Fin)} "
                         f"from dy {(Fout, N)} and x {(Fin, N)}")
    _contiguous(func, W=W)
    if saved_arr is not None:
        _same_shape(func, "saved", saved_arr, (Fout, N), "the shape of dy")
        _contiguous(func, saved=saved_arr)
    ks_w, ks_x = ((gemm_k_groups(Fout, Fin, N), gemm_k_groups(Fin, N, Fout)) if k_groups is None
                  else (int(k_groups[0]), int(k_groups[1])))
    for name, ks in (("ks_w", ks_w), ("ks_x", ks_x)):
        if not 1 <= ks <= GEMM_MAX_K_GROUPS:
            raise ValueError(f"{func}: {name} must be in 1..{GEMM_MAX_K_GROUPS}, got {name}={ks}")
    red = reduce_block(N) if red_block is None else int(red_block)
    if red < 32 or red > REDUCE_MAX_BLOCK or red & (red - 1):
        raise ValueError(f"{func}: red_block must be a power of two in [32, {REDUCE_MAX_BLOCK}], got {red}")
    largest = loader.INT32_MAX - GEMM_TILE[0]
    if max(Fout, Fin, N) > largest:
        raise ValueError(f"{func}: Fout={Fout}, Fin={Fin}, N={N}: the kernel takes at most {largest} "
                         "(its tile indices are int32)")
    tiles_w = loader.ceil_div(Fout, GEMM_TILE[0]) * loader.ceil_div(Fin, GEMM_TILE[1])
    tiles_x = loader.ceil_div(Fin, GEMM_TILE[0]) * loader.ceil_div(N, GEMM_TILE[1]) if input_grad else 0
    blocks = tiles_w + tiles_x + (Fout if has_bias else 0)
    if blocks > loader.INT32_MAX:
        raise ValueError(f"{func}: {blocks} blocks for Fout={Fout}, Fin={Fin}, N={N}; "
                         f"the kernel's 1-D grid takes at most {loader.INT32_MAX}")
    dW = _out(func, "dW_out", dW_out, xp, (Fout, Fin), dtype)
    dx = _out(func, "dx_out", dx_out, xp, (Fin, N), dtype) if input_grad else None
    db = _out(func, "db_out", db_out, xp, (Fout,), dtype) if has_bias else None
    outs = [a for a in (dW, dx, db) if a is not None]
    for a in outs:
        if any(a is b for b in (dy, saved_arr, x, W)) or sum(a is b for b in outs) > 1:
            raise ValueError(f"{func}: the outputs may not alias the inputs or each other")
    loader.launch(_kernel(func, dtype),
                  (dy, saved_arr if saved_arr is not None else dy, x, W, dW,
                   dx if dx is not None else dW, db if db is not None else dW,
                   Fout, Fin, N, code, int(bool(has_bias)), int(bool(input_grad)), ks_w, ks_x, red),
                  grid=(blocks, 1, 1), block=(GEMM_GROUP_THREADS, max(ks_w, ks_x if input_grad else 1), 1))
    return dx, dW, db


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

"""Host-side wrappers of the CUDA kernels: what gpucnn.functional calls on CuPy arrays.

Each function validates its arguments (dtype, shapes, stride/padding), makes
the inputs C-contiguous, allocates the outputs with the arrays' own module
(``xp = get_array_module(...)``: CuPy on a GPU, NumPy under the test emulator)
and launches the kernels through :func:`gpucnn.cuda.loader.launch`.

Conventions (the same as the NumPy layer path):

* activations are NCHW, convolution weights OIHW; float32 or float64 (all
  arrays of one call share the dtype; float64 runs the ``*_f64`` kernels);
* convolution is a cross-correlation with zero padding,
  ``y[n,o,i,j] = b[o] + sum_{c,u,v} x[n,c,i*sh+u-ph, j*sw+v-pw] * W[o,c,u,v]``,
  output size ``(H + 2*ph - kh) // sh + 1``;
* max pooling has no padding, output size ``(H - kh) // sh + 1``, and its
  argmax is int32, the index ``h*W + w`` within the (n, c) input plane of the
  FIRST maximum in row-major window order (a NaN wins: first NaN).

Any other dtype, or mixed dtypes, raise :class:`TypeError` naming them (no
silent casts).  Every result is deterministic (no atomics).
"""
from __future__ import annotations

import numpy as np

from .._utils import pair as _pair
from ..backend import get_array_module
from . import loader

__all__ = [
    "SUPPORTED_DTYPES",
    "conv2d_output_size",
    "pool2d_output_size",
    "conv2d_forward",
    "conv2d_backward_input",
    "conv2d_backward_weight",
    "maxpool2d_forward",
    "maxpool2d_backward",
]

#: Dtypes the kernels implement, and the suffix of their entry points.
SUPPORTED_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
_KERNEL_SUFFIX = {np.dtype(np.float32): "", np.dtype(np.float64): "_f64"}

#: Largest block of the shared-memory reductions (kernels/conv2d_backward_weight.cu).
REDUCE_MAX_BLOCK = 256


# ---------------------------------------------------------------------------
# Argument checking helpers
# ---------------------------------------------------------------------------

def _check_dtype(func: str, **arrays) -> np.dtype:
    """The common dtype of ``arrays`` (``None`` values ignored), if supported."""
    supported = ", ".join(str(d) for d in SUPPORTED_DTYPES)
    dtypes = {}
    for name, a in arrays.items():
        if a is None:
            continue
        if a.dtype not in SUPPORTED_DTYPES:
            raise TypeError(
                f"{func}: {name} has dtype {a.dtype}, but the CUDA kernels implement "
                f"only {supported}; convert explicitly (e.g. {name}.astype('float32'))"
            )
        dtypes[name] = np.dtype(a.dtype)
    if len(set(dtypes.values())) > 1:
        desc = ", ".join(f"{name} is {dt}" for name, dt in dtypes.items())
        raise TypeError(f"{func}: arrays must share one dtype ({supported}), but {desc}")
    return next(iter(dtypes.values()))


def _kernel(base: str, dtype: np.dtype) -> str:
    return base + _KERNEL_SUFFIX[dtype]


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


def conv2d_output_size(size: int, kernel: int, stride: int, padding: int) -> int:
    """``(size + 2*padding - kernel) // stride + 1``."""
    return (size + 2 * padding - kernel) // stride + 1


def pool2d_output_size(size: int, kernel: int, stride: int) -> int:
    """``(size - kernel) // stride + 1`` (no padding)."""
    return (size - kernel) // stride + 1


def _conv_out(func, x_shape, w_shape, stride, padding) -> tuple[int, int]:
    (_, C, H, W), (_, Cw, KH, KW) = x_shape, w_shape
    if C != Cw:
        raise ValueError(f"{func}: input has {C} channels (x shape {tuple(x_shape)}) but the "
                         f"weights expect {Cw} (W shape {tuple(w_shape)}, OIHW)")
    OH = conv2d_output_size(H, KH, stride[0], padding[0])
    OW = conv2d_output_size(W, KW, stride[1], padding[1])
    if OH < 1 or OW < 1:
        raise ValueError(f"{func}: kernel {KH}x{KW} does not fit the input {H}x{W} with "
                         f"padding {tuple(padding)} (output would be {OH}x{OW})")
    return OH, OW


def _pool_out(func, x_shape, kernel, stride) -> tuple[int, int]:
    _, _, H, W = x_shape
    if kernel[0] > H or kernel[1] > W:
        raise ValueError(f"{func}: pooling kernel {tuple(kernel)} is larger than the "
                         f"input plane {H}x{W} (x shape {tuple(x_shape)})")
    return pool2d_output_size(H, kernel[0], stride[0]), pool2d_output_size(W, kernel[1], stride[1])


def _reduce_block(length: int) -> int:
    """Power-of-two block for a reduction of ``length`` terms, in [32, 256]."""
    block = 32
    while block < length and block < REDUCE_MAX_BLOCK:
        block *= 2
    return block


# ---------------------------------------------------------------------------
# Convolution
# ---------------------------------------------------------------------------

def conv2d_forward(x, W, b, stride, padding):
    """``y = conv2d(x, W) + b`` (cross-correlation, zero padding).

    Args:
        x: (N, C, H, W) float32 or float64 (one dtype per call).
        W: (O, C, KH, KW) float32 or float64 (one dtype per call).
        b: (O,) float32 or float64 (one dtype per call), or None for no bias.
        stride, padding: (h, w) pairs (or ints).
    Returns:
        y: (N, O, OH, OW) float32 or float64 (one dtype per call).
    """
    func = "conv2d_forward"
    xp = get_array_module(x=x, W=W, b=b)
    dtype = _check_dtype(func, x=x, W=W, b=b)
    _check_ndim(func, "x", x, 4, "NCHW")
    _check_ndim(func, "W", W, 4, "OIHW")
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    N, C, H, Wd = x.shape
    O, _, KH, KW = W.shape
    OH, OW = _conv_out(func, x.shape, W.shape, stride, padding)
    if b is not None and tuple(b.shape) != (O,):
        raise ValueError(f"{func}: bias b must have shape ({O},) for W of shape "
                         f"{tuple(W.shape)}, got {tuple(b.shape)}")

    x = xp.ascontiguousarray(x)
    W = xp.ascontiguousarray(W)
    # With no bias the kernel never reads b; pass a 1-element placeholder.
    bias = xp.ascontiguousarray(b) if b is not None else xp.zeros(1, dtype=dtype)
    y = xp.empty((N, O, OH, OW), dtype=dtype)
    loader.launch(_kernel("conv2d_forward", dtype),
                  (x, W, bias, y, N, C, H, Wd, O, KH, KW, OH, OW,
                   stride[0], stride[1], padding[0], padding[1], int(b is not None)),
                  n_threads=y.size)
    return y


def conv2d_backward_input(dy, W, x_shape, stride, padding):
    """``dx = dL/dx`` of :func:`conv2d_forward` (a deterministic gather).

    Args:
        dy: (N, O, OH, OW) float32 or float64 (one dtype per call), gradient of the output.
        W: (O, C, KH, KW) float32 or float64 (one dtype per call).
        x_shape: (N, C, H, W) of the forward input.
        stride, padding: as in the forward pass.
    Returns:
        dx: (N, C, H, W) float32 or float64 (one dtype per call).
    """
    func = "conv2d_backward_input"
    xp = get_array_module(dy=dy, W=W)
    dtype = _check_dtype(func, dy=dy, W=W)
    _check_ndim(func, "dy", dy, 4, "NCHW")
    _check_ndim(func, "W", W, 4, "OIHW")
    x_shape = _shape4(func, "x_shape", x_shape)
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    N, C, H, Wd = x_shape
    O, _, KH, KW = W.shape
    OH, OW = _conv_out(func, x_shape, W.shape, stride, padding)
    if tuple(dy.shape) != (N, O, OH, OW):
        raise ValueError(f"{func}: dy has shape {tuple(dy.shape)}, expected {(N, O, OH, OW)} "
                         f"for x_shape {x_shape}, W shape {tuple(W.shape)}, stride {stride}, "
                         f"padding {padding}")

    dy = xp.ascontiguousarray(dy)
    W = xp.ascontiguousarray(W)
    dx = xp.empty(x_shape, dtype=dtype)
    loader.launch(_kernel("conv2d_backward_input", dtype),
                  (dy, W, dx, N, C, H, Wd, O, KH, KW, OH, OW,
                   stride[0], stride[1], padding[0], padding[1]),
                  n_threads=dx.size)
    return dx


def conv2d_backward_weight(x, dy, w_shape, stride, padding):
    """``(dW, db)``: gradients of the weights and the bias.

    Args:
        x: (N, C, H, W) float32 or float64 (one dtype per call), the forward input.
        dy: (N, O, OH, OW) float32 or float64 (one dtype per call), gradient of the output.
        w_shape: (O, C, KH, KW).
        stride, padding: as in the forward pass.
    Returns:
        dW: (O, C, KH, KW);  db: (O,) of the same dtype (always computed).  One
        block per weight element with a fixed shared-memory reduction, and a
        one-block-per-channel kernel for db.  (The alternative, im2col plus one
        cuBLAS GEMM, is ``method="gemm"`` of gpucnn.functional.conv.)
    """
    func = "conv2d_backward_weight"
    xp = get_array_module(x=x, dy=dy)
    dtype = _check_dtype(func, x=x, dy=dy)
    _check_ndim(func, "x", x, 4, "NCHW")
    _check_ndim(func, "dy", dy, 4, "NCHW")
    w_shape = _shape4(func, "w_shape", w_shape)
    stride = _pair(stride, "stride", 1)
    padding = _pair(padding, "padding", 0)
    N, C, H, Wd = x.shape
    O, _, KH, KW = w_shape
    OH, OW = _conv_out(func, x.shape, w_shape, stride, padding)
    if tuple(dy.shape) != (N, O, OH, OW):
        raise ValueError(f"{func}: dy has shape {tuple(dy.shape)}, expected {(N, O, OH, OW)} "
                         f"for x shape {tuple(x.shape)}, w_shape {w_shape}, stride {stride}, "
                         f"padding {padding}")

    x = xp.ascontiguousarray(x)
    dy = xp.ascontiguousarray(dy)
    dW = xp.empty(w_shape, dtype=dtype)
    db = xp.empty((O,), dtype=dtype)
    loader.launch(_kernel("conv2d_backward_weight", dtype),
                  (x, dy, dW, N, C, H, Wd, O, KH, KW, OH, OW,
                   stride[0], stride[1], padding[0], padding[1]),
                  n_blocks=dW.size, block=_reduce_block(N * OH * OW))
    loader.launch(_kernel("conv2d_backward_bias", dtype), (dy, db, N, O, OH, OW),
                  n_blocks=O, block=_reduce_block(N * OH * OW))
    return dW, db


# ---------------------------------------------------------------------------
# Max pooling
# ---------------------------------------------------------------------------

def maxpool2d_forward(x, kernel, stride):
    """Max pooling without padding.

    Args:
        x: (N, C, H, W) float32 or float64 (one dtype per call).
        kernel, stride: (h, w) pairs (or ints).
    Returns:
        (y, argmax): y (N, C, OH, OW) float32 or float64 (one dtype per call); argmax int32 of the same shape,
        the index h*W + w within the (n, c) input plane of the first maximum in
        row-major window order (first NaN if the window holds one).
    """
    func = "maxpool2d_forward"
    xp = get_array_module(x=x)
    dtype = _check_dtype(func, x=x)
    _check_ndim(func, "x", x, 4, "NCHW")
    kernel = _pair(kernel, "kernel", 1)
    stride = _pair(stride, "stride", 1)
    N, C, H, Wd = x.shape
    OH, OW = _pool_out(func, x.shape, kernel, stride)

    x = xp.ascontiguousarray(x)
    y = xp.empty((N, C, OH, OW), dtype=dtype)
    argmax = xp.empty((N, C, OH, OW), dtype=np.int32)
    loader.launch(_kernel("maxpool2d_forward", dtype),
                  (x, y, argmax, N, C, H, Wd, kernel[0], kernel[1],
                   stride[0], stride[1], OH, OW),
                  n_threads=y.size)
    return y, argmax


def maxpool2d_backward(dy, argmax, x_shape, kernel, stride):
    """Route dy to each window's argmax (a deterministic gather).

    Args:
        dy: (N, C, OH, OW) float32 or float64 (one dtype per call).
        argmax: int32, same shape, from :func:`maxpool2d_forward`.
        x_shape: (N, C, H, W) of the forward input.
        kernel, stride: as in the forward pass.
    Returns:
        dx: (N, C, H, W) float32 or float64 (one dtype per call).
    """
    func = "maxpool2d_backward"
    xp = get_array_module(dy=dy, argmax=argmax)
    dtype = _check_dtype(func, dy=dy)
    if argmax.dtype != np.int32:
        raise TypeError(f"{func}: argmax has dtype {argmax.dtype}, expected int32 "
                        "(as returned by maxpool2d_forward)")
    _check_ndim(func, "dy", dy, 4, "NCHW")
    x_shape = _shape4(func, "x_shape", x_shape)
    kernel = _pair(kernel, "kernel", 1)
    stride = _pair(stride, "stride", 1)
    N, C, H, Wd = x_shape
    OH, OW = _pool_out(func, x_shape, kernel, stride)
    if tuple(dy.shape) != (N, C, OH, OW):
        raise ValueError(f"{func}: dy has shape {tuple(dy.shape)}, expected {(N, C, OH, OW)} "
                         f"for x_shape {x_shape}, kernel {kernel}, stride {stride}")
    if tuple(argmax.shape) != tuple(dy.shape):
        raise ValueError(f"{func}: argmax has shape {tuple(argmax.shape)}, expected the "
                         f"shape of dy {tuple(dy.shape)}")

    dy = xp.ascontiguousarray(dy)
    argmax = xp.ascontiguousarray(argmax)
    dx = xp.empty(x_shape, dtype=dtype)
    loader.launch(_kernel("maxpool2d_backward", dtype),
                  (dy, argmax, dx, N, C, H, Wd, kernel[0], kernel[1],
                   stride[0], stride[1], OH, OW),
                  n_threads=dx.size)
    return dx


# ---------------------------------------------------------------------------
# Softmax cross-entropy (kernels/softmax_xent.cu)
# ---------------------------------------------------------------------------

__all__ += ["softmax_xent_forward", "softmax_xent_backward"]

#: Label dtypes the softmax kernels read (int64 as pairs of int32 words).
LABEL_DTYPES = (np.dtype(np.int32), np.dtype(np.int64))

#: Threads per block of the row kernel (8 warps, one row per warp).
SOFTMAX_XENT_BLOCK = 256

#: Up to this many rows the forward pass is ONE launch: a single block of
#: 32 * min(N, 32) threads loops over the rows and writes the mean itself.
#: Above it: the row kernel over ceil(N / 8) blocks, then the one-warp mean
#: kernel (2 launches).  The results are bit-identical either way; the
#: threshold only trades launch count against rows per warp and was not
#: tuned on a GPU.
SOFTMAX_XENT_FUSED_MAX_ROWS = 128


def _check_logits_labels(func: str, name: str, logits, labels):
    """(dtype, N, K, label_words) after validating ``name`` (N, K) and labels (N,)."""
    dtype = _check_dtype(func, **{name: logits})
    _check_ndim(func, name, logits, 2, "(N, K)")
    N, K = (int(s) for s in logits.shape)
    if N < 1 or K < 1:
        raise ValueError(f"{func}: {name} must have N >= 1 rows and K >= 1 classes, "
                         f"got shape {tuple(logits.shape)}")
    if labels.dtype not in LABEL_DTYPES:
        raise TypeError(f"{func}: labels have dtype {labels.dtype}, but the kernels read only "
                        "int32 or int64 labels; convert explicitly (labels.astype('int64'))")
    if tuple(labels.shape) != (N,):
        raise ValueError(f"{func}: labels must have shape ({N},) for {name} of shape "
                         f"{tuple(logits.shape)}, got {tuple(labels.shape)}")
    return dtype, N, K, labels.dtype.itemsize // 4


def _label_words(xp, labels):
    """Labels as a C-contiguous int32 word array (int64: little-endian pairs)."""
    labels = xp.ascontiguousarray(labels)
    return labels if labels.dtype == np.int32 else labels.view(np.int32)


def softmax_xent_forward(logits, labels, *, fused_max_rows=None, block=None):
    """Softmax cross-entropy, batch mean, on the device, with no host sync.

    ``loss = -(1/N) sum_n log softmax(logits_n)[labels_n]``, computed row by
    row as ``logsumexp`` after subtracting the row maximum (one warp per row).

    Args:
        logits: (N, K) float32 or float64, N >= 1, K >= 1.
        labels: (N,) int32 or int64 on the same device (any other dtype raises
            TypeError).  Labels are NOT range-checked here (that needs a sync):
            a row whose label is outside [0, K) gets a NaN loss, so the mean
            loss is NaN, and a NaN gradient row in :func:`softmax_xent_backward`.
        fused_max_rows: rows up to which the whole pass is one launch
            (default :data:`SOFTMAX_XENT_FUSED_MAX_ROWS`).
        block: threads per block of the multi-block row kernel, a multiple of
            32 (default :data:`SOFTMAX_XENT_BLOCK`).  Neither option changes a
            single bit of the results.
    Returns:
        (loss, probs): loss a 0-d array of the logits' dtype (on the device:
        ``float(loss)`` syncs), probs (N, K) the softmax probabilities.
        One kernel launch for N <= fused_max_rows, two otherwise; deterministic
        (no atomics; fixed-order reductions independent of the launch shape).
    """
    func = "softmax_xent_forward"
    xp = get_array_module(logits=logits, labels=labels)
    dtype, N, K, words = _check_logits_labels(func, "logits", logits, labels)
    fused_max_rows = SOFTMAX_XENT_FUSED_MAX_ROWS if fused_max_rows is None else int(fused_max_rows)
    block = SOFTMAX_XENT_BLOCK if block is None else int(block)
    if block % 32 or not 32 <= block <= 1024:
        raise ValueError(f"{func}: block must be a multiple of 32 in [32, 1024], got {block}")
    if N > 1 << 30:  # the kernel's row loop adds a stride of up to ~N to a row index
        raise OverflowError(f"{func}: {N} rows; the kernel handles at most 2**30")

    logits = xp.ascontiguousarray(logits)
    label_words = _label_words(xp, labels)
    probs = xp.empty((N, K), dtype=dtype)
    row_loss = xp.empty((N,), dtype=dtype)
    loss = xp.empty((1,), dtype=dtype)
    args_fwd = (logits, label_words, words, probs, row_loss, loss, N, K)
    if N <= fused_max_rows:
        # One block, at most 32 warps; warp 0 writes the mean after __syncthreads.
        loader.launch(_kernel(func, dtype), args_fwd, n_blocks=1, block=32 * min(N, 32))
    else:
        loader.launch(_kernel(func, dtype), args_fwd,
                      n_blocks=loader.ceil_div(N, block // 32), block=block)
        loader.launch(_kernel("softmax_xent_mean", dtype), (row_loss, loss, N),
                      n_blocks=1, block=32)
    return loss.reshape(()), probs


def softmax_xent_backward(probs, labels, scale=1.0):
    """``dlogits = (probs - onehot(labels)) * (scale / N)``: one launch, no sync.

    Args:
        probs: (N, K) float32 or float64, from :func:`softmax_xent_forward`.
        labels: (N,) int32 or int64, the forward labels (out-of-range: NaN row).
        scale: a host number; ``scale / N`` is rounded to the probs' dtype, as
            the NumPy path does, so the result matches it bit for bit.
    Returns:
        dlogits: (N, K), a new array of the probs' dtype.
    """
    func = "softmax_xent_backward"
    xp = get_array_module(probs=probs, labels=labels)
    dtype, N, K, words = _check_logits_labels(func, "probs", probs, labels)
    if isinstance(scale, bool) or not isinstance(scale, (int, float, np.integer, np.floating)):
        raise TypeError(f"{func}: scale must be a host number, got {type(scale).__name__}")
    probs = xp.ascontiguousarray(probs)
    label_words = _label_words(xp, labels)
    dlogits = xp.empty((N, K), dtype=dtype)
    loader.launch(_kernel(func, dtype),
                  (probs, label_words, words, dlogits, N, K, float(scale) / N),
                  n_threads=N * K)
    return dlogits

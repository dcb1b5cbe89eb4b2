#!/usr/bin/env python3
"""Call every CUDA kernel through gpucnn.cuda.ops on odd shapes and check the results.

Meant to run under NVIDIA's Compute Sanitizer, once per tool::

    PYTHONPATH=. compute-sanitizer --tool memcheck  python3 tests/gpu/exercise_kernels.py
    PYTHONPATH=. compute-sanitizer --tool racecheck python3 tests/gpu/exercise_kernels.py
    PYTHONPATH=. compute-sanitizer --tool initcheck python3 tests/gpu/exercise_kernels.py
    PYTHONPATH=. compute-sanitizer --tool synccheck python3 tests/gpu/exercise_kernels.py

(tests/gpu/run_on_device.sh does exactly that), or alone as a quick smoke test.

Shapes: batch 1 and 3; H/W that are not multiples of anything (5..23);
kernels 1..5, square and not; strides 1-3; paddings 0-2; overlapping,
disjoint and gapped max pools, ties and NaN; softmax cross-entropy on 1..300
rows, int32/int64 labels, both of its launch paths; float32 and float64; both
``conv2d_backward_weight`` methods.  Every launch is followed by a device
synchronize (and ``GPUCNN_CUDA_SYNC_CHECK=1``), so an asynchronous fault is
reported at the call that caused it, and every result is compared with the
NumPy layers (``gpucnn.layers.Conv2D`` / ``MaxPool2D`` /
``gpucnn.losses.SoftmaxCrossEntropy`` on the CPU).

CuPy's memory pool is switched off by default (``--pool`` keeps it): with the
pool, arrays are carved out of larger blocks and memcheck cannot see a small
out-of-bounds access that stays inside the block.

``--backend cudasim`` runs the same checks through the test-only CPU emulator
(tests/cudasim) on NumPy arrays -- a dry run of this script without a GPU.

Exit status: 0 all checks passed; 1 a mismatch or an error (listed);
77 skipped: no GPU (CuPy missing or no CUDA device).
"""
from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time
import traceback

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[2]
for p in (str(ROOT), str(ROOT / "tests")):
    if p not in sys.path:
        sys.path.insert(0, p)

EXIT_SKIP = 77

# (N, C, H, W, O, (kh, kw), (sh, sw), (ph, pw), bias)
CONV_CASES = [
    (1, 1, 5, 5, 1, (3, 3), (1, 1), (0, 0), True),         # smallest, batch 1
    (3, 2, 13, 11, 3, (3, 3), (1, 1), (1, 1), True),       # "same" conv, several blocks
    (3, 3, 17, 19, 4, (5, 5), (2, 2), (2, 2), True),       # stride 2, padding 2
    (1, 2, 9, 14, 2, (2, 3), (3, 2), (0, 1), False),       # stride 3, non-square kernel, no bias
    (3, 1, 10, 7, 2, (4, 2), (3, 3), (2, 0), True),        # even kernel, stride 3, padding 2x0
    (1, 4, 7, 7, 3, (1, 1), (2, 3), (0, 0), True),         # 1x1, stride > kernel (gaps)
    (3, 2, 23, 21, 5, (5, 3), (1, 2), (2, 1), True),       # reduction N*OH*OW = 759 > 256
    (1, 6, 12, 12, 16, (5, 5), (1, 1), (0, 0), True),      # lenet5 conv2 at batch 1
    (3, 1, 6, 5, 2, (6, 5), (1, 1), (2, 2), True),         # kernel as big as the image
]
QUICK_CONV = [0, 3, 4, 5]

# (N, C, H, W, (kh, kw), (sh, sw))
POOL_CASES = [
    (1, 1, 5, 5, (2, 2), (2, 2)),      # floor drops the last row/col
    (3, 2, 7, 9, (3, 3), (2, 2)),      # overlapping
    (3, 3, 11, 10, (3, 2), (1, 2)),    # heavy overlap in rows
    (1, 2, 13, 13, (2, 2), (3, 3)),    # gaps: some inputs get no gradient
    (3, 1, 8, 9, (3, 3), (3, 2)),      # mixed
    (1, 3, 6, 6, (6, 6), (1, 1)),      # one window per plane
    (3, 2, 17, 15, (2, 3), (1, 1)),    # stride 1 both ways, > 256 outputs
    (3, 2, 28, 28, (2, 2), (2, 2)),    # lenet5
]
QUICK_POOL = [0, 1, 3, 5]


class Checker:
    def __init__(self, backend_name, put, get, sync, verbose):
        self.backend_name, self.put, self.get, self.sync = backend_name, put, get, sync
        self.verbose = verbose
        self.passed = 0
        self.failures: list[str] = []

    def check(self, label, fn):
        """Run ``fn()`` (which raises AssertionError on mismatch); record the outcome."""
        try:
            fn()
            self.sync()
        except Exception as exc:  # mismatch, or a CUDA error surfacing at the sync
            kind = "MISMATCH" if isinstance(exc, AssertionError) else f"ERROR {type(exc).__name__}"
            msg = str(exc).strip().splitlines()
            detail = " | ".join(line.strip() for line in msg[:8] if line.strip())
            self.failures.append(f"{label}: {kind}: {detail}")
            print(f"FAIL {label}: {kind}: {detail}", flush=True)
            if self.verbose:
                traceback.print_exc()
        else:
            self.passed += 1
            if self.verbose:
                print(f"ok   {label}", flush=True)


def _tol(dtype):
    return dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-10, atol=1e-10)


def _close(actual, desired, dtype, what):
    scale = max(1.0, float(np.max(np.abs(desired)))) if desired.size else 1.0
    t = _tol(dtype)
    np.testing.assert_allclose(actual, desired, rtol=t["rtol"], atol=t["atol"] * scale, err_msg=what)


def exercise_conv(ck: Checker, case, dtype, seed):
    from gpucnn.cuda import ops
    from gpucnn.layers import Conv2D

    N, C, H, W, O, k, s, p, bias = case
    label = f"conv N{N} C{C} {H}x{W} O{O} k{k[0]}x{k[1]} s{s[0]}{s[1]} p{p[0]}{p[1]} {np.dtype(dtype).name}"
    rng = np.random.default_rng(seed)
    layer = Conv2D(C, O, k, stride=s, padding=p, bias=bias, dtype=dtype)
    Wt = rng.standard_normal(layer.params["W"].shape).astype(dtype)
    layer.params["W"][...] = Wt
    b = rng.standard_normal(O).astype(dtype) if bias else None
    if bias:
        layer.params["b"][...] = b
    x = rng.standard_normal((N, C, H, W)).astype(dtype)
    y_ref = layer.forward(x)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref = layer.backward(dy)
    xd, Wd, dyd = ck.put(x), ck.put(Wt), ck.put(dy)
    bd = ck.put(b) if bias else None

    def fwd():
        y = ops.conv2d_forward(xd, Wd, bd, s, p)
        ck.sync()
        _close(ck.get(y), y_ref, dtype, "conv2d_forward")

    def bwd_input():
        dx = ops.conv2d_backward_input(dyd, Wd, x.shape, s, p)
        ck.sync()
        _close(ck.get(dx), dx_ref, dtype, "conv2d_backward_input")

    def bwd_weight(method):
        def run():
            dW, db = ops.conv2d_backward_weight(xd, dyd, Wt.shape, s, p, method=method)
            ck.sync()
            _close(ck.get(dW), layer.grads["W"], dtype, f"conv2d_backward_weight[{method}] dW")
            if bias:
                _close(ck.get(db), layer.grads["b"], dtype, f"conv2d_backward_weight[{method}] db")
        return run

    ck.check(f"{label} forward", fwd)
    ck.check(f"{label} backward_input", bwd_input)
    ck.check(f"{label} backward_weight[kernel]", bwd_weight("kernel"))
    ck.check(f"{label} backward_weight[gemm]", bwd_weight("gemm"))


def exercise_pool(ck: Checker, case, dtype, seed, ties=False, nan=False):
    from gpucnn.cuda import ops
    from gpucnn.layers import MaxPool2D

    N, C, H, W, k, s = case
    label = (f"maxpool N{N} C{C} {H}x{W} k{k[0]}x{k[1]} s{s[0]}{s[1]} {np.dtype(dtype).name}"
             + (" ties" if ties else "") + (" nan" if nan else ""))
    rng = np.random.default_rng(seed)
    x = (rng.integers(0, 3, size=(N, C, H, W)) if ties else rng.standard_normal((N, C, H, W))).astype(dtype)
    if nan:
        x.reshape(-1)[::11] = np.nan
        x.reshape(-1)[5::13] = -np.inf
    layer = MaxPool2D(k, s)
    y_ref = layer.forward(x)
    dy = rng.standard_normal(y_ref.shape).astype(dtype)
    dx_ref = layer.backward(dy)
    xd, dyd = ck.put(x), ck.put(dy)

    def run():
        y, arg = ops.maxpool2d_forward(xd, k, s)
        ck.sync()
        np.testing.assert_array_equal(ck.get(y), y_ref, err_msg="maxpool2d_forward y")
        np.testing.assert_array_equal(ck.get(arg), layer.argmax, err_msg="maxpool2d_forward argmax")
        dx = ops.maxpool2d_backward(dyd, arg, x.shape, k, s)
        ck.sync()
        np.testing.assert_allclose(ck.get(dx), dx_ref, rtol=1e-6, atol=1e-6, err_msg="maxpool2d_backward")

    ck.check(label, run)


# (N, K, label dtype, extra kwargs of softmax_xent_forward)
XENT_CASES = [
    (1, 10, np.int64, {}),                         # one row: a single warp
    (3, 1, np.int32, {}),                          # one class
    (37, 33, np.int64, {}),                        # K > warp size, fused single launch
    (129, 10, np.int32, {}),                       # > 128 rows: row kernel + mean kernel
    (300, 17, np.int64, {"block": 64}),            # multi-block with a small block
    (5, 10, np.int32, {"fused_max_rows": 0}),      # the two-launch path on a few rows
]
QUICK_XENT = [0, 3, 5]


def exercise_xent(ck: Checker, case, dtype, seed):
    from gpucnn import losses
    from gpucnn.cuda import ops

    if not hasattr(ops, "softmax_xent_forward"):
        return
    N, K, label_dtype, kwargs = case
    label = (f"softmax_xent N{N} K{K} labels {np.dtype(label_dtype).name} {np.dtype(dtype).name}"
             + "".join(f" {k}={v}" for k, v in kwargs.items()))
    rng = np.random.default_rng(seed)
    logits = (4 * rng.standard_normal((N, K))).astype(dtype)
    labels = rng.integers(0, K, N).astype(label_dtype)
    ref = losses.SoftmaxCrossEntropy()
    loss_ref = ref.forward(logits, labels)
    grad_ref = ref.backward(0.5)
    ld, yd = ck.put(logits), ck.put(labels)

    def run():
        loss, probs = ops.softmax_xent_forward(ld, yd, **kwargs)
        ck.sync()
        _close(ck.get(loss), np.asarray(loss_ref), dtype, "softmax_xent_forward loss")
        _close(ck.get(probs), ref.probs, dtype, "softmax_xent_forward probs")
        g = ops.softmax_xent_backward(probs, yd, 0.5)
        ck.sync()
        _close(ck.get(g), grad_ref, dtype, "softmax_xent_backward")

    ck.check(label, run)


def _setup_cupy(pool: bool):
    from gpucnn import backend

    if backend.cupy is None:
        return None, "CuPy is not installed"
    if not backend.cuda_available():
        return None, "CuPy sees no CUDA device"
    cp = backend.cupy
    if not pool:
        cp.cuda.set_allocator(None)               # one cudaMalloc per array: exact bounds for memcheck
        cp.cuda.set_pinned_memory_allocator(None)
    return cp, None


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", choices=("cupy", "cudasim"), default="cupy",
                    help="cupy (a real GPU, default) or cudasim (the CPU emulator: a dry run)")
    ap.add_argument("--quick", action="store_true", help="a few cases, float32 only (plus one float64)")
    ap.add_argument("--pool", action="store_true", help="keep CuPy's memory pool (default: off)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print every check and tracebacks")
    args = ap.parse_args(argv)

    os.environ["GPUCNN_CUDA_SYNC_CHECK"] = "1"
    from gpucnn.cuda import loader

    if args.backend == "cupy":
        cp, why = _setup_cupy(args.pool)
        if cp is None:
            print(f"exercise_kernels: skipped: no GPU ({why})")
            return EXIT_SKIP
        dev = cp.cuda.Device()

        def sync():
            dev.synchronize()

        ck = Checker("cupy", cp.asarray, cp.asnumpy, sync, args.verbose)
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        print(f"exercise_kernels: CuPy {cp.__version__} on {name} (pool {'on' if args.pool else 'off'})")
        builder = loader.cupy_module_builder
    else:
        import cudasim

        ck = Checker("cudasim", np.asarray, np.asarray, lambda: None, args.verbose)
        print("exercise_kernels: tests/cudasim emulator (CPU dry run, NumPy arrays)")

        def builder(code, name, options):
            return cudasim.load_module(code=code, name=name, options=options)

    t0 = time.perf_counter()
    with loader.use_module_builder(builder):
        try:
            loaded = loader.warmup()
            print(f"compiled {len(loaded)} kernels in {time.perf_counter() - t0:.1f} s")
        except Exception as exc:
            print(f"FAIL compiling the kernels: {type(exc).__name__}: {exc}")
            return 1
        conv = [CONV_CASES[i] for i in QUICK_CONV] if args.quick else CONV_CASES
        pools = [POOL_CASES[i] for i in QUICK_POOL] if args.quick else POOL_CASES
        dtypes = (np.float32,) if args.quick else (np.float32, np.float64)
        for i, case in enumerate(conv):
            for dtype in dtypes:
                exercise_conv(ck, case, dtype, seed=i)
        if args.quick:
            exercise_conv(ck, CONV_CASES[1], np.float64, seed=100)
        for i, case in enumerate(pools):
            for dtype in dtypes:
                exercise_pool(ck, case, dtype, seed=i)
            exercise_pool(ck, case, np.float32, seed=50 + i, ties=True)
        exercise_pool(ck, POOL_CASES[1], np.float32, seed=99, nan=True)
        if args.quick:
            exercise_pool(ck, POOL_CASES[2], np.float64, seed=98)
        xent = [XENT_CASES[i] for i in QUICK_XENT] if args.quick else XENT_CASES
        for i, case in enumerate(xent):
            for dtype in (np.float32, np.float64):
                exercise_xent(ck, case, dtype, seed=200 + i)

    total = ck.passed + len(ck.failures)
    print(f"exercise_kernels [{ck.backend_name}]: {ck.passed}/{total} checks passed "
          f"in {time.perf_counter() - t0:.1f} s")
    if ck.failures:
        print(f"{len(ck.failures)} FAILED:")
        for f in ck.failures:
            print(f"  {f}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

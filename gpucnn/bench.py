"""``gpucnn bench``: per-layer and whole-train-step timings against PyTorch.

Both sides are measured in the same run, on the same device, batch and
optimizer (SGD with momentum), after a correctness check of the step and a
warm-up; the printed ratio is ``PyTorch time / gpucnn time`` (> 1: gpucnn is
faster).

* CPU: ``time.perf_counter`` medians; PyTorch CPU with the same thread count.
* GPU: CUDA events around each repetition, medians after warm-up; PyTorch with
  ``cudnn.benchmark = True`` and TF32 off on both sides (FP32 parity).  The
  per-kernel table times gpucnn's hand-written kernels against the cuDNN
  calls that do the same job.

PyTorch is optional: without it only gpucnn's own times are printed.

Usage::

    gpucnn bench --device cpu --batch-sizes 64
    gpucnn bench --device cuda --batch-sizes 64 256 1024 --model lenet5
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import numpy as np

from . import backend, layers, losses, models, optim
from .random import seed as _seed


# ---------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------

class _Timer:
    """Median wall time of ``fn`` (CPU clock, or CUDA events on a GPU)."""

    def __init__(self, device: str, warmup: int, repeats: int):
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def __call__(self, fn) -> float:
        """Seconds per call, median of ``repeats`` after ``warmup`` calls."""
        for _ in range(self.warmup):
            fn()
        times = []
        if self.device == "cuda":
            cp = backend.cupy
            start, stop = cp.cuda.Event(), cp.cuda.Event()
            cp.cuda.Device().synchronize()
            for _ in range(self.repeats):
                start.record()
                fn()
                stop.record()
                stop.synchronize()
                times.append(cp.cuda.get_elapsed_time(start, stop) / 1e3)
        else:
            for _ in range(self.repeats):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
        return statistics.median(times)


class _TorchTimer(_Timer):
    def __call__(self, fn) -> float:
        if self.device != "cuda":
            return super().__call__(fn)
        import torch

        for _ in range(self.warmup):
            fn()
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        times = []
        for _ in range(self.repeats):
            start.record()
            fn()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 1e3)
        return statistics.median(times)


# ---------------------------------------------------------------------------
# the PyTorch twin of a gpucnn model
# ---------------------------------------------------------------------------

def _import_torch():
    try:
        import torch  # noqa: F401

        return torch
    except Exception:
        return None


def torch_twin(model, torch, device):
    """An ``nn.Sequential`` with the same layers and a copy of ``model``'s weights."""
    nn = torch.nn
    mods = []
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D):
            m = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size,
                          stride=layer.stride, padding=layer.padding, bias="b" in layer.params)
        elif isinstance(layer, layers.Dense):
            m = nn.Linear(layer.in_features, layer.out_features, bias="b" in layer.params)
        elif isinstance(layer, layers.MaxPool2D):
            m = nn.MaxPool2d(layer.kernel_size, layer.stride)
        elif isinstance(layer, layers.AvgPool2D):
            m = nn.AvgPool2d(layer.kernel_size, layer.stride)
        elif isinstance(layer, layers.Flatten):
            m = nn.Flatten()
        elif isinstance(layer, layers.ReLU):
            m = nn.ReLU()
        elif isinstance(layer, layers.Sigmoid):
            m = nn.Sigmoid()
        elif isinstance(layer, layers.Tanh):
            m = nn.Tanh()
        else:
            raise ValueError(f"no PyTorch twin for {type(layer).__name__}")
        if "W" in layer.params:
            with torch.no_grad():
                m.weight.copy_(torch.from_numpy(backend.asnumpy(layer.params["W"])))
                if "b" in layer.params:
                    m.bias.copy_(torch.from_numpy(backend.asnumpy(layer.params["b"])))
        mods.append(m)
    return nn.Sequential(*mods).to(device)


# ---------------------------------------------------------------------------
# whole train step
# ---------------------------------------------------------------------------

def _step_fns(name, batch, device, torch, lr=0.01, momentum=0.9):
    """Build (gpucnn_step, torch_step | None, check) for one model and batch."""
    _seed(0)
    model = models.build(name, device=device)
    loss = models.make_loss(name)
    opt = optim.SGD(model, lr=lr, momentum=momentum)
    rng = np.random.default_rng(0)
    x_np = rng.standard_normal((batch, 1, 28, 28)).astype(np.float32)
    y_np = rng.integers(0, 10, batch).astype(np.int64)
    x, y = backend.to_device(x_np, device), backend.to_device(y_np, device)
    mse = models.loss_name(name) == "mse"
    target = losses.one_hot(y, 10) if mse else y
    if isinstance(loss, losses.SoftmaxCrossEntropy):
        loss.check_labels = False  # no host sync inside the timed step

    def step():
        out = model.forward(x)
        value = loss.forward(out, target)
        model.backward(loss.backward(), input_grad=False)
        opt.step()
        return value

    tstep = None
    if torch is not None:
        tdev = "cuda" if device == "cuda" else "cpu"
        tmodel = torch_twin(model, torch, tdev)
        topt = torch.optim.SGD(tmodel.parameters(), lr=lr, momentum=momentum)
        tx = torch.from_numpy(x_np).to(tdev)
        ty = torch.from_numpy(y_np).to(tdev)
        tt = torch.nn.functional.one_hot(ty, 10).to(tx.dtype) if mse else ty

        def torch_step(zero_grad=True):
            if zero_grad:  # inside a graph capture the grads are already None
                topt.zero_grad(set_to_none=True)
            out = tmodel(tx)
            if mse:
                value = 0.5 * ((out - tt) ** 2).sum() / out.shape[0]
            else:
                value = torch.nn.functional.cross_entropy(out, tt)
            value.backward()
            topt.step()
            return value

        tstep = torch_step
    return step, tstep


def torch_graphed(tstep, torch, warmup=3):
    """Capture a PyTorch train step into one CUDA graph; returns its replay.

    The recipe of PyTorch's CUDA-graphs notes for a whole training step: warm
    up on a side stream (so the optimizer's state exists), drop the gradients,
    capture forward + backward + step, then time ``graph.replay()``.  Inputs
    are the step's static tensors, so every replay redoes the same batch.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(warmup):
            tstep()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        tstep(zero_grad=False)
    return graph.replay


def _check_step(step, tstep):
    """Correctness before timing: the first losses of both steps agree."""
    a = float(step())
    if tstep is None:
        return a, None
    b = float(tstep().detach())
    if not np.isclose(a, b, rtol=1e-3, atol=1e-4):
        raise RuntimeError(f"gpucnn and PyTorch disagree on the first loss: {a} vs {b}")
    return a, b


# ---------------------------------------------------------------------------
# per-layer / per-kernel
# ---------------------------------------------------------------------------

def _layer_rows(name, batch, device, torch, timer, ttimer):
    """Forward and backward of every layer of the model at its real input shape."""
    _seed(0)
    model = models.build(name, device=device)
    rng = np.random.default_rng(1)
    x = backend.to_device(rng.standard_normal((batch, 1, 28, 28)).astype(np.float32), device)
    tdev = "cuda" if device == "cuda" else "cpu"
    twin = torch_twin(model, torch, tdev) if torch is not None else None
    rows = []
    for i, layer in enumerate(model.layers):
        y = layer.forward(x)
        dy = backend.to_device(rng.standard_normal(y.shape).astype(np.float32), device)
        label = f"{i}:{type(layer).__name__}{tuple(x.shape[1:])}"
        fwd = timer(lambda: layer.forward(x))
        bwd = timer(lambda: layer.backward(dy))
        tf = tb = None
        if twin is not None:
            tl = twin[i]
            tx = torch.from_numpy(backend.asnumpy(x)).to(tdev).requires_grad_(True)
            tdy = torch.from_numpy(backend.asnumpy(dy)).to(tdev)
            with torch.no_grad():
                tf = ttimer(lambda: tl(tx))
            ty = tl(tx)
            tb = ttimer(lambda: torch.autograd.grad(ty, [tx] + list(tl.parameters()), tdy,
                                                    retain_graph=True))
        rows.append((label, fwd, tf, bwd, tb))
        x = y
    return rows


def _kernel_rows(name, batch, timer, ttimer, torch):
    """gpucnn's CUDA kernels vs the cuDNN calls doing the same job (GPU only)."""
    from .cuda import ops

    cp = backend.cupy
    _seed(0)
    model = models.build(name, device="cuda")
    x = cp.random.standard_normal((batch, 1, 28, 28), dtype=cp.float32)
    rows = []
    F = torch.nn.functional if torch is not None else None
    for i, layer in enumerate(model.layers):
        y = layer.forward(x)
        tag = f"{i}:{tuple(x.shape[1:])}"
        if isinstance(layer, layers.Conv2D):
            W, b = layer.params["W"], layer.params["b"]
            dy = cp.random.standard_normal(y.shape, dtype=cp.float32)
            s, p = layer.stride, layer.padding
            t = {}
            t["conv fwd"] = timer(lambda: ops.conv2d_forward(x, W, b, s, p))
            t["conv bwd-input"] = timer(lambda: ops.conv2d_backward_input(dy, W, x.shape, s, p))
            t["conv bwd-weight"] = timer(lambda: ops.conv2d_backward_weight(x, dy, W.shape, s, p))
            ref = {}
            if torch is not None:
                tx, tW, tb, tdy = (torch.as_tensor(a, device="cuda") for a in (x, W, b, dy))
                ref["conv fwd"] = ttimer(lambda: F.conv2d(tx, tW, tb, s, p))
                ref["conv bwd-input"] = ttimer(
                    lambda: torch.nn.grad.conv2d_input(tx.shape, tW, tdy, s, p))
                ref["conv bwd-weight"] = ttimer(
                    lambda: (torch.nn.grad.conv2d_weight(tx, tW.shape, tdy, s, p), tdy.sum((0, 2, 3))))
            rows += [(f"{k} {tag}", v, ref.get(k)) for k, v in t.items()]
        elif isinstance(layer, layers.MaxPool2D):
            k, s = layer.kernel_size, layer.stride
            yk, am = ops.maxpool2d_forward(x, k, s)
            dy = cp.random.standard_normal(yk.shape, dtype=cp.float32)
            t = {"maxpool fwd": timer(lambda: ops.maxpool2d_forward(x, k, s)),
                 "maxpool bwd": timer(lambda: ops.maxpool2d_backward(dy, am, x.shape, k, s))}
            ref = {}
            if torch is not None:
                tx = torch.as_tensor(x, device="cuda")
                tdy = torch.as_tensor(dy, device="cuda")
                ty, ti = F.max_pool2d(tx, k, s, return_indices=True)
                ref["maxpool fwd"] = ttimer(lambda: F.max_pool2d(tx, k, s))
                ref["maxpool bwd"] = ttimer(
                    lambda: torch.ops.aten.max_pool2d_with_indices_backward(
                        tdy, tx, list(k), list(s), [0, 0], [1, 1], False, ti))
            rows += [(f"{kk} {tag}", v, ref.get(kk)) for kk, v in t.items()]
        x = y
    return rows


# ---------------------------------------------------------------------------
# time to accuracy
# ---------------------------------------------------------------------------

def time_to_accuracy(target, seeds, device, epochs=3, eval_every=200, batch_size=64, log=print):
    """Training time until the test accuracy first reaches ``target``, per seed.

    The normalised MNIST arrays live on ``device``; the loop is
    :mod:`gpucnn.train`'s (same defaults, schedule, shuffling), but the test
    set is evaluated every ``eval_every`` steps with the clock stopped, so
    only training time counts (CUDA events on the GPU; kernels are compiled
    before the clock starts).

    Returns a list of ``(seed, seconds or None, steps, accuracy)``.
    """
    from . import train as train_mod

    x_tr, y_tr, x_te, y_te, _ = train_mod.load_arrays("mnist", device=device)
    cfg = train_mod.TrainConfig(model="lenet5", epochs=epochs, batch_size=batch_size).resolved()
    n = x_tr.shape[0]
    steps_per_epoch = -(-n // batch_size)
    timer = _Timer(device, 0, 1)
    rows = []
    for seed in seeds:
        _seed(seed)
        model = models.build(cfg.model, device=device)
        loss = models.make_loss(cfg.model)
        loss.check_labels = False
        opt = train_mod._make_optimizer(cfg, model)
        elapsed, steps, acc, reached = 0.0, 0, 0.0, None
        for epoch in range(cfg.epochs):
            order = train_mod._shuffle_rng(seed, epoch).permutation(n)
            idx_all = backend.to_device(order.astype(np.int64), device)
            step = 0
            while step < steps_per_epoch and reached is None:
                chunk = range(step, min(step + eval_every, steps_per_epoch))

                def run_chunk(chunk=chunk, epoch=epoch):
                    for s in chunk:
                        idx = idx_all[s * batch_size:(s + 1) * batch_size]
                        opt.lr = train_mod.learning_rate(cfg, epoch, s, steps_per_epoch)
                        loss.forward(model.forward(x_tr[idx]), y_tr[idx])
                        model.backward(loss.backward(), input_grad=False)
                        opt.step()

                model.train()
                elapsed += timer(run_chunk)
                step += len(chunk)
                steps += len(chunk)
                acc = train_mod.evaluate(model, x_te, y_te)["accuracy"]
                if acc >= target:
                    reached = elapsed
            if reached is not None:
                break
        log(f"  seed {seed}: " + (f"{target:.2%} after {reached:.2f} s ({steps} steps)" if reached is not None
                                  else f"not reached in {cfg.epochs} epochs (best so far {acc:.2%})"))
        rows.append((seed, reached, steps, acc))
    return rows


# ---------------------------------------------------------------------------
# printing
# ---------------------------------------------------------------------------

def _ms(t):
    return "-" if t is None else f"{t * 1e3:9.3f}"


def _ratio(mine, ref):
    return "-" if ref is None or not mine else f"{ref / mine:6.2f}x"


def environment(device: str, torch) -> dict:
    info = {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "device": device,
    }
    if torch is not None:
        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
    if device == "cuda":
        cp = backend.cupy
        info["cupy"] = cp.__version__
        props = cp.cuda.runtime.getDeviceProperties(0)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        info["driver"] = cp.cuda.runtime.driverGetVersion()
        info["cuda_runtime"] = cp.cuda.runtime.runtimeGetVersion()
        if torch is not None:
            info["cudnn"] = torch.backends.cudnn.version()
    return info


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="lenet5", choices=models.MODELS)
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[64], metavar="N")
    p.add_argument("--repeats", type=int, default=30, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="PyTorch CPU threads (default: PyTorch's own default, one per core, which is "
                        "also what OpenBLAS uses unless OPENBLAS_NUM_THREADS says otherwise)")
    p.add_argument("--no-torch", action="store_true", help="time gpucnn alone")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--time-to-accuracy", type=float, metavar="ACC", default=None,
                   help="instead: time lenet5 training until MNIST test accuracy >= ACC (e.g. 0.99)")
    p.add_argument("--seeds", type=int, default=5, help="seeds for --time-to-accuracy (mean reported)")
    p.add_argument("--eval-every", type=int, default=200,
                   help="--time-to-accuracy: steps between (untimed) test evaluations")


def run(args) -> int:
    for b in args.batch_sizes:
        if b < 1:
            print(f"gpucnn bench: --batch-sizes must be >= 1, got {b}", file=sys.stderr)
            return 2
    if args.repeats < 1 or args.warmup < 0:
        print(f"gpucnn bench: need --repeats >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}",
              file=sys.stderr)
        return 2
    device = args.device
    if device == "auto":
        device = "cuda" if backend.cuda_available() else "cpu"
    elif device == "cuda" and not backend.cuda_available():
        print("gpucnn bench: --device cuda but CuPy sees no CUDA device", file=sys.stderr)
        return 2
    torch = None if args.no_torch else _import_torch()
    if torch is not None:
        if args.threads:
            torch.set_num_threads(args.threads)
        if device == "cuda":
            torch.backends.cudnn.benchmark = True
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
    if device == "cuda":
        from .cuda import loader

        loader.warmup()  # kernel compilation is not timed
    timer = _Timer(device, args.warmup, args.repeats)
    ttimer = _TorchTimer(device, args.warmup, args.repeats)
    env = environment(device, torch)
    print("gpucnn bench  " + "  ".join(f"{k}={v}" for k, v in env.items()))
    if args.time_to_accuracy is not None:
        if not 0 < args.time_to_accuracy < 1 or args.seeds < 1 or args.eval_every < 1:
            print(f"gpucnn bench: need 0 < --time-to-accuracy < 1, --seeds >= 1, --eval-every >= 1; got "
                  f"{args.time_to_accuracy}, {args.seeds}, {args.eval_every}", file=sys.stderr)
            return 2
        print(f"[time to {args.time_to_accuracy:.2%} MNIST test accuracy, lenet5, batch 64, {device}; "
              f"evaluation every {args.eval_every} steps, untimed]")
        rows = time_to_accuracy(args.time_to_accuracy, range(args.seeds), device, eval_every=args.eval_every)
        times = [t for _, t, _, _ in rows if t is not None]
        print(f"  reached in {len(times)}/{len(rows)} seeds"
              + (f"; mean {statistics.mean(times):.2f} s" if times else ""))
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"env": env, "target": args.time_to_accuracy,
                           "runs": [dict(seed=a, seconds=b, steps=c, accuracy=d) for a, b, c, d in rows]}, f, indent=2)
        return 0 if len(times) == len(rows) else 1
    print("ratio = PyTorch time / gpucnn time (> 1 means gpucnn is faster)")
    results = {"env": env, "model": args.model, "steps": [], "layers": [], "kernels": []}
    for batch in args.batch_sizes:
        step, tstep = _step_fns(args.model, batch, device, torch)
        l0, t0 = _check_step(step, tstep)
        mine = timer(step)
        ref = ttimer(tstep) if tstep is not None else None
        print(f"\n[{args.model} train step, batch {batch}, {device}]  first loss gpucnn {l0:.5f}"
              + (f" / torch {t0:.5f}" if t0 is not None else ""))
        print(f"  {'':34s} {'gpucnn ms':>9s} {'torch ms':>9s}  ratio  gpucnn img/s")
        print(f"  {'forward+loss+backward+SGD':34s} {_ms(mine)} {_ms(ref)}  {_ratio(mine, ref)}  "
              f"{batch / mine:10.0f}")
        graphed = None
        if device == "cuda" and tstep is not None:
            try:
                graphed = ttimer(torch_graphed(tstep, torch))
            except Exception as exc:  # report, don't hide the other figures
                print(f"  PyTorch CUDA-graph capture failed: {type(exc).__name__}: {exc}")
            if graphed is not None:
                print(f"  {'same step, PyTorch as one CUDA graph':34s} {_ms(mine)} {_ms(graphed)}  "
                      f"{_ratio(mine, graphed)}")
        results["steps"].append({"batch": batch, "gpucnn_s": mine, "torch_s": ref,
                                 "torch_graph_s": graphed})
        if not args.no_layers:
            print(f"  {'layer (input shape)':34s} {'fwd':>9s} {'torch':>9s}  ratio  "
                  f"{'bwd':>9s} {'torch':>9s}  ratio")
            for label, f, tf, bw, tb in _layer_rows(args.model, batch, device, torch, timer, ttimer):
                print(f"  {label:34s} {_ms(f)} {_ms(tf)}  {_ratio(f, tf)}  {_ms(bw)} {_ms(tb)}  {_ratio(bw, tb)}")
                results["layers"].append({"batch": batch, "layer": label, "fwd_s": f, "torch_fwd_s": tf,
                                          "bwd_s": bw, "torch_bwd_s": tb})
            if device == "cuda":
                print(f"  {'kernel (input shape)':34s} {'gpucnn':>9s} {'cuDNN':>9s}  ratio")
                for label, t, r in _kernel_rows(args.model, batch, timer, ttimer, torch):
                    print(f"  {label:34s} {_ms(t)} {_ms(r)}  {_ratio(t, r)}")
                    results["kernels"].append({"batch": batch, "kernel": label, "gpucnn_s": t, "torch_s": r})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpucnn bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

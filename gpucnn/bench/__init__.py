"""``gpucnn bench``: per-layer and whole-train-step timings against PyTorch.

Modules: :mod:`.timing` (medians, CUDA events), :mod:`.twin` (the PyTorch
twin of a model), :mod:`.steps` (step, layer and kernel tables),
:mod:`.kernels` (``--kernels``: each GEMM of a train step per precision mode,
predicted and measured beside cuDNN), :mod:`.accuracy` (time to accuracy).

Both sides are measured in the same run, on the same device, batch and
optimizer (SGD with momentum), after a correctness check of the step and a
warm-up; the printed ratio is ``PyTorch time / gpucnn time`` (> 1: gpucnn is
faster).

* CPU: ``time.perf_counter`` medians; PyTorch CPU with the same thread count.
* GPU: CUDA events around each repetition, medians after warm-up; PyTorch with
  ``cudnn.benchmark = True`` and TF32 off (FP32 parity with gpucnn); one more line
  times PyTorch's eager step with its own default, TF32 convolutions.  The
  per-kernel table times gpucnn's hand-written kernels against the cuDNN
  calls that do the same job.

PyTorch is optional: without it only gpucnn's own times are printed.

Usage::

    gpucnn bench --device cpu --batch-sizes 64
    gpucnn bench --static --model all --batch-sizes 64 256 --json static.json   # no GPU needed
    gpucnn bench --device cuda --batch-sizes 64 256 1024 --model lenet5
    gpucnn bench --device cuda --kernels --precision fp32,tf32,bf16 --json kernels.json
    gpucnn bench --static --kernels                 # the same rows' predictions, no GPU needed
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
from pathlib import Path

import numpy as np

from .. import backend, models, precision
from ..train import workers
from .accuracy import time_to_accuracy
from .steps import check_step, kernel_rows, layer_rows, step_pair
from ..timing import Timer, TorchTimer
from .twin import torch_graphed, torch_twin, try_import_torch

__all__ = ["main", "run", "add_arguments", "environment", "time_to_accuracy", "torch_twin", "Timer"]

#: steps per timed repetition of the train-loop and CUDA-graph figures (their per-call upload
#: of the learning-rate table and read of the metrics are spread over them, as in training)
GRAPH_STEPS = 20


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
    if device == "cpu":
        from .. import threads

        info["gpucnn_threads"] = threads.get_num_threads()
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
    p.add_argument("--model", default="lenet5", choices=(*models.MODELS, "all"),
                   help="the model (\"all\": every model, with --static only)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--batch-sizes", type=int, nargs="+", default=None, metavar="N",
                   help="(default: 64; with --kernels: 64 1024)")
    p.add_argument("--repeats", type=int, default=30, help="timed repetitions (median reported)")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads of both sides: PyTorch's and gpucnn's NumPy path, at most the cores "
                        "this process may use (a larger N is capped, with a note) (default: each "
                        "library's own, one per core)")
    p.add_argument("--no-torch", action="store_true", help="time gpucnn alone")
    p.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    p.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    p.add_argument("--static", action="store_true",
                   help="no GPU needed: the launches of one CUDA train step (every launch with grid, block, "
                        "registers, spills, shared memory and SASS loop figures for sm_90), the launch count "
                        "and the host microseconds per step and per launch, kernels stubbed")
    p.add_argument("--optimizer", default="sgd", choices=("sgd", "adam"), help="--static: the optimizer")
    p.add_argument("--kernels", action="store_true",
                   help="instead: each GEMM kernel of a train step (conv forward, backward-input, backward-weight; "
                        "dense forward, backward-input, backward-weight) per --precision mode: shapes, predicted "
                        "us, measured us (CUDA graph replays, CUDA events) beside PyTorch + cuDNN on the same "
                        "shapes, and the ratio; needs --device cuda, or --static for the predictions alone")
    p.add_argument("--precision", default=None, metavar="MODES",
                   help="--kernels: comma-separated precision modes, or 'all' (default: all, "
                        f"{','.join(precision.MODES)})")
    p.add_argument("--time-to-accuracy", type=float, metavar="ACC", default=None,
                   help="instead: time lenet5 training until MNIST test accuracy >= ACC (e.g. 0.99)")
    p.add_argument("--seeds", type=int, default=5, help="seeds for --time-to-accuracy (mean reported)")
    p.add_argument("--eval-every", type=int, default=200,
                   help="--time-to-accuracy: steps between (untimed) test evaluations")


def _json_path_problem(path) -> str | None:
    """Why the results could not be written to ``--json path``, found before anything runs (None: no reason)."""
    p = Path(path)
    parent = p.parent if str(p.parent) else Path(".")
    if p.is_dir():
        return f"--json {p}: is a directory, not a file"
    if not parent.is_dir():
        return f"--json {p}: {parent} is not an existing directory"
    if not os.access(parent, os.W_OK | os.X_OK) or (p.exists() and not os.access(p, os.W_OK)):
        return f"--json {p}: not writable"
    return None


def _resolve_defaults(args) -> None:
    """Fill in the defaults that depend on other options (the batch sizes, the precision modes)."""
    from .kernels import DEFAULT_BATCHES

    if args.batch_sizes is None:
        args.batch_sizes = list(DEFAULT_BATCHES) if getattr(args, "kernels", False) else [64]


def _check_kernels(args):
    """An error message for bad ``--kernels`` / ``--precision`` arguments, or None."""
    from . import kernels

    if not args.kernels:
        return "--precision goes with --kernels" if args.precision is not None else None
    try:
        args.precisions = kernels.parse_precisions(args.precision or "all")
    except ValueError as exc:
        return str(exc)
    if args.time_to_accuracy is not None:
        return "--kernels and --time-to-accuracy are separate runs: give one"
    if args.model == "all":
        return "--kernels takes one model, not --model all"
    problem = kernels.check_model(args.model)
    if problem or args.static:
        return problem
    if args.device == "cpu":
        return ("--kernels times CUDA kernels: use --device cuda, or --static --kernels for the predictions "
                "without a GPU")
    if not backend.cuda_available():
        return (f"--kernels needs a CUDA GPU: {backend.cuda_unavailable_reason()}; "
                "`gpucnn bench --static --kernels` prints the predictions without one")
    return None


def _check_args(args):
    """An error message for bad arguments, or None."""
    for b in args.batch_sizes:
        if b < 1:
            return f"--batch-sizes must be >= 1, got {b}"
    if args.threads is not None and args.threads < 1:
        return f"--threads must be >= 1, got {args.threads}"
    if args.repeats < 1 or args.warmup < 0:
        return f"need --repeats >= 1 and --warmup >= 0, got {args.repeats}, {args.warmup}"
    if args.time_to_accuracy is not None and (not 0 < args.time_to_accuracy < 1 or args.seeds < 1
                                              or args.eval_every < 1):
        return (f"need 0 < --time-to-accuracy < 1, --seeds >= 1, --eval-every >= 1; got "
                f"{args.time_to_accuracy}, {args.seeds}, {args.eval_every}")
    if args.model == "all" and not args.static:
        return "--model all goes with --static only"
    if args.json and _json_path_problem(args.json):
        return _json_path_problem(args.json)
    problem = _check_kernels(args)
    if problem:
        return problem
    if args.static:
        return None
    if args.device == "cuda" and not backend.cuda_available():
        return f"--device cuda: {backend.cuda_unavailable_reason()}"
    return None


def _setup_torch(args, device):
    torch, why = (None, None) if args.no_torch else try_import_torch()
    if why is not None and args.time_to_accuracy is None:
        print(f"gpucnn bench: note: PyTorch's columns show '-': it cannot be imported ({why}); install it "
              f"to compare, or pass --no-torch", file=sys.stderr, flush=True)
    if args.threads:
        from .. import threads

        n = threads.set_threads_option(args.threads, "gpucnn bench")
        if torch is not None:
            torch.set_num_threads(n)
    if torch is not None and device == "cuda":
        _torch_fp32(torch, True)
    return torch


def _torch_fp32(torch, fp32: bool) -> None:
    """PyTorch's GPU settings for the comparison: cuDNN's autotuner on and, with ``fp32``,
    TF32 off (FP32 parity with gpucnn's kernels); without it, PyTorch's own default of TF32
    convolutions (``cudnn.allow_tf32`` is True out of the box; matmuls stay FP32)."""
    torch.backends.cudnn.benchmark = True
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = not fp32


def _write_json(path, obj):
    if path:
        with open(path, "w") as f:
            json.dump(obj, f, indent=2)


def _run_time_to_accuracy(args, device, env) -> int:
    print(f"[time to {args.time_to_accuracy:.2%} MNIST test accuracy, lenet5, batch 64, {device}; "
          f"evaluation every {args.eval_every} steps, untimed]")
    rows = time_to_accuracy(args.time_to_accuracy, range(args.seeds), device, eval_every=args.eval_every)
    times = [t for _, t, _, _ in rows if t is not None]
    print(f"  reached in {len(times)}/{len(rows)} seeds" + (f"; mean {statistics.mean(times):.2f} s" if times else ""))
    _write_json(args.json, {"env": env, "target": args.time_to_accuracy,
                            "runs": [dict(seed=a, seconds=b, steps=c, accuracy=d) for a, b, c, d in rows]})
    return 0 if len(times) == len(rows) else 1


def _step_table(args, batch, device, torch, timer, ttimer, results):
    pair = step_pair(args.model, batch, device, torch)
    l0, t0 = check_step(pair)
    mine = timer(pair.gpucnn)
    ref = ttimer(pair.torch) if pair.torch is not None else None
    print(f"\n[{args.model} train step, batch {batch}, {device}]  first loss gpucnn {l0:.5f}"
          + (f" / torch {t0:.5f}" if t0 is not None else ""))
    print(f"  gpucnn's step: {workers.describe(pair.model, pair.trainer.loss, batch, device)}")
    print(f"  {'':34s} {'gpucnn ms':>9s} {'torch ms':>9s}  ratio  gpucnn img/s")
    print(f"  {'forward+loss+backward+SGD':34s} {_ms(mine)} {_ms(ref)}  {_ratio(mine, ref)}  {batch / mine:10.0f}")
    graphed = mine_graph = mine_loop = ref_tf32 = None
    if device == "cuda":
        k = GRAPH_STEPS
        mine_loop = timer(pair.steps(k, cuda_graph=False)) / k
        try:
            mine_graph = timer(pair.steps(k, cuda_graph=True)) / k
        except Exception as exc:  # report, don't hide the other figures
            print(f"  gpucnn CUDA-graph steps failed: {type(exc).__name__}: {exc}")
        if pair.torch is not None:
            try:
                graphed = ttimer(torch_graphed(pair.torch, torch))
            except Exception as exc:
                print(f"  PyTorch CUDA-graph capture failed: {type(exc).__name__}: {exc}")
            _torch_fp32(torch, False)
            try:
                ref_tf32 = ttimer(pair.torch)
            finally:
                _torch_fp32(torch, True)
        print(f"  {'the train loop (run_steps), eager':34s} {_ms(mine_loop)} {_ms(ref)}  {_ratio(mine_loop, ref)}")
        if mine_graph is not None or graphed is not None:
            print(f"  {'both as CUDA graphs':34s} {_ms(mine_graph)} {_ms(graphed)}  {_ratio(mine_graph, graphed)}")
        if ref_tf32 is not None:
            print(f"  {'eager vs PyTorch default (TF32)':34s} {_ms(mine)} {_ms(ref_tf32)}  {_ratio(mine, ref_tf32)}")
    results["steps"].append({"batch": batch, "gpucnn_s": mine, "gpucnn_loop_s": mine_loop,
                             "gpucnn_graph_s": mine_graph, "torch_s": ref, "torch_graph_s": graphed,
                             "torch_tf32_s": ref_tf32})


def _layer_table(args, batch, device, torch, timer, ttimer, results):
    print(f"  {'stage (input shape)':34s} {'fwd':>9s} {'torch':>9s}  ratio  {'bwd':>9s} {'torch':>9s}  ratio")
    for label, f, tf, bw, tb in layer_rows(args.model, batch, device, torch, timer, ttimer):
        print(f"  {label:34s} {_ms(f)} {_ms(tf)}  {_ratio(f, tf)}  {_ms(bw)} {_ms(tb)}  {_ratio(bw, tb)}")
        results["layers"].append({"batch": batch, "layer": label, "fwd_s": f, "torch_fwd_s": tf,
                                  "bwd_s": bw, "torch_bwd_s": tb})
    if device == "cuda":
        print(f"  {'kernel (input shape)':34s} {'gpucnn':>9s} {'cuDNN':>9s}  ratio")
        for label, t, r in kernel_rows(args.model, batch, timer, ttimer, torch):
            print(f"  {label:34s} {_ms(t)} {_ms(r)}  {_ratio(t, r)}")
            results["kernels"].append({"batch": batch, "kernel": label, "gpucnn_s": t, "torch_s": r})


def run(args) -> int:
    """Run ``gpucnn bench`` with parsed arguments; returns the exit status."""
    _resolve_defaults(args)
    problem = _check_args(args)
    if problem:
        print(f"gpucnn bench: {problem}", file=sys.stderr)
        return 2
    if args.kernels and args.static:
        from . import kernels

        status, result = kernels.run(args.model, args.batch_sizes, args.precisions, warmup=args.warmup,
                                     repeats=args.repeats, torch=None, env={"device": "stand-in (no GPU)"},
                                     static=True)
        _write_json(args.json, result)
        return status
    if args.static:
        from .static import run_static

        names = models.MODELS if args.model == "all" else (args.model,)
        result = run_static(names, args.batch_sizes, optimizer=args.optimizer, repeats=max(1, min(args.repeats, 9)))
        _write_json(args.json, result)
        return 0
    device = args.device if args.device != "auto" else ("cuda" if backend.cuda_available() else "cpu")
    torch = _setup_torch(args, device)
    if device == "cuda":
        from ..cuda import loader

        loader.warmup()  # kernel compilation is not timed
    timer, ttimer = Timer(device, args.warmup, args.repeats), TorchTimer(device, args.warmup, args.repeats)
    env = environment(device, torch)
    print("gpucnn bench  " + "  ".join(f"{k}={v}" for k, v in env.items()))
    if args.time_to_accuracy is not None:
        return _run_time_to_accuracy(args, device, env)
    if args.kernels:
        from . import kernels

        status, result = kernels.run(args.model, args.batch_sizes, args.precisions, warmup=args.warmup,
                                     repeats=args.repeats, torch=torch, env=env)
        _write_json(args.json, result)
        return status
    print("ratio = PyTorch time / gpucnn time (> 1 means gpucnn is faster)")
    results = {"env": env, "model": args.model, "steps": [], "layers": [], "kernels": []}
    for batch in args.batch_sizes:
        _step_table(args, batch, device, torch, timer, ttimer, results)
        if not args.no_layers:
            _layer_table(args, batch, device, torch, timer, ttimer, results)
    _write_json(args.json, results)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="gpucnn bench", description=__doc__.split("\n\n")[0])
    add_arguments(p)
    return run(p.parse_args(argv))

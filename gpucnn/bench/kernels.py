"""``gpucnn bench --kernels``: each GEMM of a train step, predicted and measured, beside cuDNN.

For one model (lenet5 by default), at each batch size and precision mode, one
row per GEMM-like pass of every Conv2D and Dense layer, in this order:

* ``fwd`` -- :func:`gpucnn.functional.conv.conv2d_forward` /
  :func:`gpucnn.functional.dense.dense_forward` with the bias, without the
  activation and pooling a train step fuses in (neither side times those);
* ``bwd-input`` -- dL/dx: the launches that ``conv2d_backward`` /
  ``dense_backward`` with ``input_grad=True`` makes *beyond* the same call with
  ``input_grad=False``, recorded at gpucnn's kernel loader and replayed alone
  (an operand both gradients use, like the rounded ``dz`` in tf32, goes with
  ``bwd-weight``).  Where the two calls make the same kernels and dx comes
  from more blocks of them (fp32 dense: ``dense_backward`` computes dW, db and
  dx in one launch), the row has no launch of its own: it says ``fused``, and
  its predicted and measured times are the input_grad=True call's less the
  input_grad=False call's;
* ``bwd-weight`` -- dL/dW and dL/db: the backward call with ``input_grad=False``.

Every gpucnn call runs inside ``with gpucnn.precision.using(mode):``, so a row
times whatever kernels the mode dispatches to (on CUDA: the SIMT kernels in
fp32, the tensor-core GEMMs of gpucnn/cuda/gemm_tc.py in every other mode); a
mode gpucnn refuses on CUDA gives rows that say ``refused: <reason>``.

The columns:

* ``predicted``: :func:`gpucnn.bench.roofline.predict` of each launch the row
  makes, summed -- the launch records (kernel, grid, block, arguments) that
  ``gpucnn bench --static`` feeds the same model; an H200's figures, a floor;
* ``gpucnn us``, ``cuDNN us``: the row's calls, ``calls`` of them back to back
  captured in one CUDA graph, CUDA events around each replay, the median of
  ``repeats`` replays after ``warmup`` divided by ``calls`` (:class:`GraphClock`).
  The host's launch cost is out; the gaps between dependent kernels in a graph
  are in (the model's launch term).  A side whose capture fails is timed
  eagerly instead, and the row says so;
* PyTorch's side is the same job on the same data, in NCHW (``(N, F)`` for the
  dense layers): ``F.conv2d``, ``torch.nn.grad.conv2d_input``,
  ``torch.nn.grad.conv2d_weight`` plus the bias sum, ``F.linear``, ``dz @ W``,
  ``dz^T @ x`` plus the bias sum, with ``cudnn.benchmark`` on and, per mode,
  :data:`TORCH_MODES`;
* ``ratio`` = cuDNN time / gpucnn time (> 1: gpucnn is faster); ``check`` =
  ``max |gpucnn - PyTorch| / max |PyTorch|`` over the row's outputs, before
  anything is timed (over :data:`TOLERANCE` -> ``MISMATCH``, exit status 1).

Without a GPU, ``gpucnn bench --static --kernels`` runs the same calls on the
CuPy stand-in (:mod:`gpucnn.bench.standin`) and prints the predictions alone.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses

import numpy as np

from .. import backend, layers, models, precision
from ..functional import conv as fconv
from ..functional import dense as fdense
from ..functional.workspace import Workspace
from ..layers.base import run_forward
from ..random import seed
from ..timing import Timer, TorchTimer
from . import roofline, static

__all__ = ["DEFAULT_BATCHES", "CALLS_PER_GRAPH", "TOLERANCE", "TORCH_MODES", "OPS", "Launch", "recorded_launches",
           "gemm_layers", "collect", "GraphClock", "TorchReference", "ratio", "totals", "format_table",
           "method_lines", "parse_precisions"]

#: ``gpucnn bench --kernels`` batch sizes unless ``--batch-sizes`` says otherwise
DEFAULT_BATCHES = (64, 1024)
#: calls of a row captured back to back in the CUDA graph that one timed replay runs
CALLS_PER_GRAPH = 10
#: the passes of each layer, in the order the table prints them
OPS = ("fwd", "bwd-input", "bwd-weight")
#: ``check`` above this (max |gpucnn - PyTorch| / max |PyTorch|) is a MISMATCH: operands rounded
#: to TF32 (2^-11) or bfloat16 (2^-8, and PyTorch's bfloat16 outputs) leave ~1e-3 / ~1e-2; fp16
#: (2^-11, and PyTorch's float16 outputs) as TF32
TOLERANCE = {"fp32": 1e-3, "3xtf32": 1e-3, "tf32": 1e-2, "bf16": 5e-2, "fp16": 1e-2}
#: PyTorch's settings for each gpucnn mode: (operand dtype, TF32 allowed, in words)
TORCH_MODES = {
    "fp32": ("float32", False, "float32, TF32 off (cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False)"),
    "tf32": ("float32", True, "float32, TF32 on (cudnn.allow_tf32 = cuda.matmul.allow_tf32 = True)"),
    "3xtf32": ("float32", False, "float32, TF32 off: cuDNN has no 3xTF32, an FP32-accuracy mode"),
    "bf16": ("bfloat16", False, "bfloat16 operands and outputs, FP32 accumulation"),
    "fp16": ("float16", False, "float16 operands and outputs, FP32 accumulation (no loss scale: one GEMM)"),
}


def parse_precisions(text: str) -> list[str]:
    """``"fp32,tf32"`` -> ``["fp32", "tf32"]`` (``"all"``: every mode); ValueError names a bad one."""
    if text.strip() == "all":
        return list(precision.MODES)
    modes = [m.strip() for m in text.split(",") if m.strip()]
    if not modes:
        raise ValueError(f"--precision needs a comma-separated list of {', '.join(precision.MODES)}, got {text!r}")
    for m in modes:
        precision.check_mode(m)
    return list(dict.fromkeys(modes))


# --------------------------------------------------------------------------- the launches


@dataclasses.dataclass
class Launch:
    """One kernel launch through :func:`gpucnn.cuda.loader.launch`: the loader's own grid and block
    (what the kernel runs with, as the stand-in records them for ``--static``), and the call, to replay."""

    kernel: str
    grid: tuple
    block: tuple
    shared_mem: int
    args: tuple
    kwargs: dict

    def key(self):
        shapes = tuple(tuple(a.shape) for a in self.args if hasattr(a, "shape"))
        return self.kernel, self.grid, self.block, self.shared_mem, shapes

    def replay(self):
        from ..cuda import loader

        loader.launch(self.kernel, self.args, **self.kwargs)

    def describe(self, loops: dict) -> dict:
        """The JSON form, with the time model's figures (``model``: None when it cannot say; ``loops``:
        :func:`gpucnn.bench.static.kernel_resources`, for its issue floor where the SASS was read)."""
        try:
            model = roofline.predict(self.kernel, self.grid, self.block, roofline.launch_args(self.kernel, self.args),
                                     loop=loops.get(self.kernel))
        except Exception:            # a kernel the model does not know: no prediction, not a crash
            model = None
        return {"kernel": self.kernel, "grid": list(self.grid), "block": list(self.block),
                "shared_mem": self.shared_mem, "model": model}


@contextlib.contextmanager
def recorded_launches():
    """Every gpucnn kernel launch inside the block, appended to the yielded list as a :class:`Launch`
    (the grid and block computed by the loader's own rule, ``loader._prepare``)."""
    from ..cuda import loader

    real, out = loader.launch, []

    def launch(kernel, args, *, n_threads=None, n_blocks=None, grid=None, block=None, shared_mem=0,
               options=None):
        real(kernel, args, n_threads=n_threads, n_blocks=n_blocks, grid=grid, block=block,
             shared_mem=shared_mem, options=options)
        prep = loader._prepare(kernel, args, n_threads, n_blocks, grid, block, shared_mem)
        if prep is not None:                            # an empty launch runs nothing
            out.append(Launch(kernel, prep.grid, prep.block, prep.shared_mem, tuple(args),
                              dict(n_threads=n_threads, n_blocks=n_blocks, grid=grid, block=block,
                                   shared_mem=shared_mem, options=options)))

    loader.launch = launch
    try:
        yield out
    finally:
        loader.launch = real


def _same_kernels(more, base):
    """Whether two calls launch the same kernels in the same order (grids may differ)."""
    return bool(more) and [l.kernel for l in more] == [l.kernel for l in base]


def _extra(more, base):
    """The launches of ``more`` that ``base`` does not make (a multiset difference, in order), or
    None when ``base`` is not part of ``more``."""
    left = collections.Counter(l.key() for l in base)
    out = []
    for launch in more:
        if left[launch.key()] > 0:
            left[launch.key()] -= 1
        else:
            out.append(launch)
    return None if any(left.values()) else out


# --------------------------------------------------------------------------- the layers


@dataclasses.dataclass
class Gemm:
    """A Conv2D or Dense layer of the model at one batch size: its name (``conv1``, ``dense2``),
    the layer, its batch-last input shape, and whether a train step runs its input gradient."""

    name: str
    layer: object
    x_shape: tuple
    input_grad_in_step: bool

    @property
    def kind(self) -> str:
        return "conv" if isinstance(self.layer, layers.Conv2D) else "dense"

    def out_shape(self) -> tuple:
        W = self.layer.params["W"]
        if self.kind == "dense":
            return (W.shape[0], self.x_shape[1])
        return (W.shape[0], *fconv.conv_output_hw(self.x_shape, W.shape, self.layer.stride, self.layer.padding),
                self.x_shape[3])

    def shape_text(self) -> str:
        """Per sample: ``1x28x28 -> 6x28x28, 5x5 p2`` or ``400 -> 120``."""
        out = self.out_shape()
        if self.kind == "dense":
            return f"{self.x_shape[0]} -> {out[0]}"
        (kh, kw), (sh, sw), (ph, pw) = self.layer.params["W"].shape[2:], self.layer.stride, self.layer.padding
        text = f"{'x'.join(map(str, self.x_shape[:3]))} -> {'x'.join(map(str, out[:3]))}, {kh}x{kw}"
        if (sh, sw) != (1, 1):
            text += f" s{sh}" if sh == sw else f" s{sh},{sw}"
        if (ph, pw) != (0, 0):
            text += f" p{ph}" if ph == pw else f" p{ph},{pw}"
        return text

    def shapes(self) -> dict:
        """The row's shapes as PyTorch has them (NCHW / (N, F)), for the JSON."""
        W = self.layer.params["W"]
        def nchw(s):
            return [s[-1], *s[:-1]]
        out = {"x": nchw(self.x_shape), "W": list(W.shape), "y": nchw(self.out_shape())}
        if self.kind == "conv":
            out.update(stride=list(self.layer.stride), padding=list(self.layer.padding))
        return out


def check_model(name: str) -> str | None:
    """Why ``--kernels`` cannot take model ``name`` (None: it can): its layers must be a flat list."""
    model = models.build(name)
    nested = [type(l).__name__ for l in model.layers if isinstance(l, (layers.Sequential, layers.Residual))]
    if nested:
        return (f"--kernels takes a model of plain layers; {name} has {', '.join(sorted(set(nested)))} blocks "
                f"(use lenet5, zhang2016, seed001, seed002_c1 or seed002_c2)")
    return None


def gemm_layers(model, batch: int, device: str, in_shape=models.DEFAULT_IN_SHAPE) -> list[Gemm]:
    """The model's Conv2D and Dense layers with their batch-last input shapes at ``batch`` (found by
    running the model's forward layer by layer on random data)."""
    rng = np.random.default_rng(0)
    x = backend.to_device(rng.standard_normal((*in_shape, batch)).astype(np.float32), device)
    first = set(map(id, model.stages()[0].layers)) if model.layers else set()
    out, count = [], collections.Counter()
    for layer in model.layers:
        if isinstance(layer, (layers.Conv2D, layers.Dense)):
            kind = "conv" if isinstance(layer, layers.Conv2D) else "dense"
            count[kind] += 1
            out.append(Gemm(f"{kind}{count[kind]}", layer, tuple(x.shape), id(layer) not in first))
        x = run_forward(layer, x)
    return out


# --------------------------------------------------------------------------- the timing


def _refuse_allocation(size):
    raise RuntimeError(f"the call allocated {size} bytes of device memory while being captured")


class GraphClock:
    """Per-call GPU time: ``calls`` calls captured back to back in one CUDA graph, CUDA events
    around each replay (:class:`gpucnn.timing.Timer` / ``TorchTimer``: the median of ``repeats``
    after ``warmup``), divided by ``calls``.  Where a capture fails, the calls are timed eagerly
    (host launch cost included) and the method says why."""

    def __init__(self, warmup: int, repeats: int, calls: int = CALLS_PER_GRAPH):
        self.warmup, self.repeats, self.calls = warmup, repeats, calls

    def _eager(self, fn):
        def run():
            for _ in range(self.calls):
                fn()
        return run

    def gpucnn(self, fn) -> tuple[float, str]:
        """``(seconds per call, method)`` of ``fn``, gpucnn's calls on CuPy."""
        cp = backend.cupy
        for _ in range(max(1, self.warmup)):
            fn()
        cp.cuda.Device().synchronize()
        try:
            run, method = self._cupy_graph(fn).launch, "graph"
        except Exception as exc:
            cp.cuda.Device().synchronize()
            run, method = self._eager(fn), f"eager (graph capture failed: {type(exc).__name__}: {exc})"
        return Timer("cuda", self.warmup, self.repeats)(run) / self.calls, method

    def _cupy_graph(self, fn):
        cp = backend.cupy
        stream = cp.cuda.Stream(non_blocking=True)
        stream.wait_event(cp.cuda.get_current_stream().record())
        failure = graph = None
        with stream:
            stream.begin_capture()
            try:
                with cp.cuda.using_allocator(_refuse_allocation):
                    for _ in range(self.calls):
                        fn()
            except Exception as exc:
                failure = exc
            finally:
                try:
                    graph = stream.end_capture()
                except Exception as exc:
                    failure = failure or exc
        if failure is not None:
            raise failure
        return graph

    def torch(self, fn, torch) -> tuple[float, str]:
        """``(seconds per call, method)`` of ``fn``, PyTorch's calls: warmed up on a side stream
        (cuDNN's autotuning happens there), then captured (PyTorch's CUDA-graph recipe)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(max(3, self.warmup)):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        torch.cuda.synchronize()
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                for _ in range(self.calls):
                    fn()
            run, method = graph.replay, "graph"
        except Exception as exc:
            torch.cuda.synchronize()
            run, method = self._eager(fn), f"eager (graph capture failed: {type(exc).__name__}: {exc})"
        return TorchTimer("cuda", self.warmup, self.repeats)(run) / self.calls, method


class TorchReference:
    """PyTorch's side of each row: the same job on the same data, per :data:`TORCH_MODES`, timed
    by ``clock`` (None: outputs only, no time), cached per (batch, layer, pass, PyTorch settings).
    ``device``: ``"cuda"``; the tests use ``"cpu"`` for the outputs alone."""

    def __init__(self, torch, clock, device: str = "cuda"):
        self.torch, self.clock, self.device = torch, clock, device
        self._cache, self._tensors = {}, {}

    def settings(self, mode: str) -> tuple:
        dtype, tf32, _ = TORCH_MODES[mode]
        return dtype, tf32

    def _apply(self, mode):
        torch = self.torch
        _, tf32 = self.settings(mode)
        torch.backends.cudnn.benchmark = True
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32

    def _inputs(self, g: Gemm, data: dict, dtype: str):
        """The layer's x, W, b, dz as PyTorch tensors on the GPU (the last layer's only are kept)."""
        key = (g.name, g.x_shape, dtype)
        if key not in self._tensors:
            torch = self.torch
            dt = getattr(torch, dtype)

            def t(a):
                return torch.from_numpy(np.ascontiguousarray(a)).to(self.device).to(dt)
            if g.kind == "conv":
                x, dz = np.moveaxis(data["x"], -1, 0), np.moveaxis(data["dz"], -1, 0)
            else:
                x, dz = data["x"].T, data["dz"].T
            self._tensors = {key: (t(x), t(data["W"]), None if data["b"] is None else t(data["b"]), t(dz))}
        return self._tensors[key]

    def _op(self, g: Gemm, op: str, tensors):
        torch = self.torch
        F = torch.nn.functional
        x, W, b, dz = tensors
        if g.kind == "conv":
            s, p = g.layer.stride, g.layer.padding
            return {"fwd": lambda: F.conv2d(x, W, b, s, p),
                    "bwd-input": lambda: torch.nn.grad.conv2d_input(x.shape, W, dz, s, p),
                    "bwd-weight": lambda: (torch.nn.grad.conv2d_weight(x, W.shape, dz, s, p),
                                           dz.sum((0, 2, 3)) if b is not None else None)}[op]
        return {"fwd": lambda: F.linear(x, W, b),
                "bwd-input": lambda: dz @ W,
                "bwd-weight": lambda: (dz.t() @ x, dz.sum(0) if b is not None else None)}[op]

    def run(self, g: Gemm, batch: int, op: str, mode: str, data: dict) -> dict:
        """``{"us", "method", "outputs"}`` (outputs as NumPy float32 in gpucnn's layouts, computed
        before anything is timed; ``us`` None without a clock)."""
        key = (batch, g.name, op, self.settings(mode))
        if key not in self._cache:
            self._apply(mode)
            fn = self._op(g, op, self._inputs(g, data, self.settings(mode)[0]))
            outs = fn()
            outs = outs if isinstance(outs, tuple) else (outs,)
            host = [None if o is None else o.float().cpu().numpy() for o in outs]
            if op != "bwd-weight":          # back to gpucnn's batch-last layouts
                host = [np.moveaxis(h, 0, -1) if g.kind == "conv" else h.T for h in host]
            us = method = None
            if self.clock is not None:
                seconds, method = self.clock.torch(fn, self.torch)
                us = seconds * 1e6
            self._cache[key] = {"us": us, "method": method, "outputs": host}
        return self._cache[key]

    def restore(self):
        """PyTorch's settings as ``gpucnn bench`` keeps them between tables: FP32, the autotuner on."""
        self._apply("fp32")


# --------------------------------------------------------------------------- the rows


def _rel_err(mine, ref) -> float:
    mine, ref = np.asarray(mine, np.float64), np.asarray(ref, np.float64)
    scale = float(np.max(np.abs(ref))) if ref.size else 0.0
    return float(np.max(np.abs(mine - ref))) / (scale if scale > 0 else 1.0) if ref.size else 0.0


def _new_row(g: Gemm, batch: int, mode: str, op: str) -> dict:
    return {"batch": batch, "precision": mode, "layer": g.name, "op": op, "label": f"{g.name} {op}",
            "shape": g.shape_text(), "shapes": g.shapes(),
            "in_train_step": op != "bwd-input" or g.input_grad_in_step,
            "launches": [], "predicted_us": None, "gpucnn_us": None, "gpucnn_method": None,
            "torch_us": None, "torch_method": None, "torch_settings": TORCH_MODES[mode][2] if mode in TORCH_MODES
            else None, "ratio": None, "check": None, "mismatch": False, "refused": None, "failed": None,
            "fused": None}


def _calls(g: Gemm, x, W, b, dz, ws):
    """gpucnn's three public calls of the layer's passes: ``(forward, backward without dL/dx, backward
    with it)``; the backward calls need the ``saved`` of a forward (their first argument)."""
    if g.kind == "conv":
        s, p = g.layer.stride, g.layer.padding
        return (lambda: fconv.conv2d_forward(x, W, b, s, p, ws=ws),
                lambda saved: fconv.conv2d_backward(dz, saved, input_grad=False, ws=ws),
                lambda saved: fconv.conv2d_backward(dz, saved, input_grad=True, ws=ws))
    return (lambda: fdense.dense_forward(x, W, b, ws=ws),
            lambda saved: fdense.dense_backward(dz, saved, input_grad=False, ws=ws),
            lambda saved: fdense.dense_backward(dz, saved, input_grad=True, ws=ws))


def _in_mode(mode, fn):
    def run():
        with precision.using(mode):
            return fn()
    return run


def _host(*arrays):
    """NumPy copies of a call's outputs (taken at once: the workspace buffers are rewritten by later calls)."""
    return [backend.asnumpy(a).copy() for a in arrays if a is not None]


def _attempt(fn, *rows):
    """``fn()``, or None after marking ``rows`` refused (NotImplementedError: gpucnn refuses the mode
    here) or failed (anything else)."""
    try:
        return fn()
    except NotImplementedError as exc:
        for row in rows:
            row["refused"] = str(exc)
    except Exception as exc:
        for row in rows:
            row["failed"] = f"{type(exc).__name__}: {exc}"
    return None


def _gemm_rows(g: Gemm, batch: int, mode: str, data: dict, device: str, clock, reference) -> list[dict]:
    """The three rows of one layer in one mode (see the module docstring)."""
    rows = {op: _new_row(g, batch, mode, op) for op in OPS}
    x, W = backend.to_device(data["x"], device), g.layer.params["W"]
    b = g.layer.params.get("b")
    dz = backend.to_device(data["dz"], device)
    forward, weight_only, both = _calls(g, x, W, b, dz, Workspace())
    launches, mine, timed, fused = {}, {}, {}, {}
    timed["fwd"] = _in_mode(mode, forward)
    with recorded_launches() as launches["fwd"]:
        out = _attempt(timed["fwd"], rows["fwd"])
    saved = None
    if out is not None:
        mine["fwd"], saved = _host(out[0]), out[1]
    if saved is None:                                    # the backward passes need a forward's saved state
        saved = _attempt(lambda: _in_mode("fp32", forward)()[1], rows["bwd-weight"], rows["bwd-input"])
    if saved is not None:                                # dW, db
        timed["bwd-weight"] = _in_mode(mode, lambda: weight_only(saved))
        with recorded_launches() as launches["bwd-weight"]:
            out = _attempt(timed["bwd-weight"], rows["bwd-weight"])
        if out is not None:
            mine["bwd-weight"] = _host(*out[1:])
        with recorded_launches() as launches["both"]:     # dx: what input_grad=True adds
            out = _attempt(_in_mode(mode, lambda: both(saved)), rows["bwd-input"])
        if out is not None and "bwd-weight" in mine:
            extra = _extra(launches["both"], launches["bwd-weight"])
            if extra:
                launches["bwd-input"], mine["bwd-input"] = extra, _host(out[0])
                timed["bwd-input"] = lambda: [launch.replay() for launch in extra]
            elif _same_kernels(launches["both"], launches["bwd-weight"]):   # dx blocks in the same launches
                launches["bwd-input"], mine["bwd-input"] = [], _host(out[0])
                fused["bwd-input"] = (launches["both"], launches["bwd-weight"])
                timed["bwd-input"] = (_in_mode(mode, lambda: both(saved)), timed["bwd-weight"])
                kinds = ", ".join(launch.kernel for launch in launches["both"])
                rows["bwd-input"]["fused"] = (f"dx in bwd-weight's launches ({kinds}): "
                                              "the input_grad=True call less the input_grad=False one")
            else:
                rows["bwd-input"]["failed"] = ("could not tell the input gradient's launches apart: the backward "
                                               "with input_grad=True does not make those without it plus others")
        elif out is not None:
            rows["bwd-input"]["failed"] = "its launches are told apart from the weight gradient's, which failed"
    for op, row in rows.items():
        if op not in mine:
            continue
        every = list(launches[op]) + [launch for calls in fused.get(op, ()) for launch in calls]
        loops, _ = static.kernel_resources({launch.kernel for launch in every})
        row["launches"] = [launch.describe(loops) for launch in launches[op]]
        figures = [launch["model"] for launch in row["launches"]]
        if op in fused:                                  # the difference of two calls' launches
            more, base = ([launch.describe(loops)["model"] for launch in calls] for calls in fused[op])
            if all(f is not None for f in more + base):
                row["predicted_us"] = sum(f["predicted_us"] for f in more) - sum(f["predicted_us"] for f in base)
                if row["predicted_us"] < 0:
                    row["fused"] += ("; predicted below 0: the dx blocks widen the launch's grid, which the model "
                                     "spreads the same work over; only the two rows' sum is a launch's")
        elif figures and all(f is not None for f in figures):
            row["predicted_us"] = sum(f["predicted_us"] for f in figures)
        if reference is not None:                        # correctness first, then PyTorch's time
            try:
                ref = reference.run(g, batch, op, mode, data)
                row["torch_us"], row["torch_method"] = ref["us"], ref["method"]
                errors = [_rel_err(m, r) for m, r in zip(mine[op], ref["outputs"]) if r is not None]
                row["check"] = max(errors) if errors else None
                row["mismatch"] = bool(errors) and not row["check"] <= TOLERANCE[mode]     # NaN too
            except Exception as exc:
                row["torch_method"] = f"failed ({type(exc).__name__}: {_shorten(exc, 200)})"
        if clock is not None:
            try:
                if op in fused:
                    (more, row["gpucnn_method"]), (base, _) = (clock.gpucnn(fn) for fn in timed[op])
                    seconds = more - base
                else:
                    seconds, row["gpucnn_method"] = clock.gpucnn(timed[op])
                row["gpucnn_us"] = seconds * 1e6
            except NotImplementedError as exc:
                row["refused"] = str(exc)
            except Exception as exc:
                row["failed"] = f"{type(exc).__name__}: {exc}"
        row["ratio"] = ratio(row["gpucnn_us"], row["torch_us"])
    return [rows[op] for op in OPS]


def collect(model_name: str, batches, modes, *, device: str = "cuda", clock=None, reference=None,
            progress=None) -> list[dict]:
    """The rows for every batch, mode, layer and pass (see the module docstring).

    ``clock``: a :class:`GraphClock` (None: nothing is timed -- ``--static``); ``reference``: a
    :class:`TorchReference` (None: no PyTorch columns).  A row that gpucnn refuses in a mode says
    ``refused``; one that raises anything else says ``failed``, and the others still run.
    """
    rows = []
    for batch in batches:
        seed(0)
        model = models.build(model_name, device=device)
        gemms = gemm_layers(model, batch, device)
        rng = np.random.default_rng(batch)
        data = {}
        for g in gemms:
            data[g.name] = {"x": rng.standard_normal(g.x_shape).astype(np.float32),
                            "W": backend.asnumpy(g.layer.params["W"]),
                            "b": None if g.layer.params.get("b") is None else backend.asnumpy(g.layer.params["b"]),
                            "dz": rng.standard_normal(g.out_shape()).astype(np.float32)}
        for mode in modes:
            for g in gemms:
                rows += _gemm_rows(g, batch, mode, data[g.name], device, clock, reference)
            if progress is not None:
                progress(batch, mode, [r for r in rows if r["batch"] == batch and r["precision"] == mode])
    if reference is not None:
        reference.restore()
    return rows


# --------------------------------------------------------------------------- the table


def ratio(gpucnn_us, torch_us):
    """cuDNN time / gpucnn time (> 1: gpucnn is faster); None without both."""
    if gpucnn_us is None or torch_us is None or gpucnn_us <= 0:
        return None
    return torch_us / gpucnn_us


def totals(rows) -> dict:
    """The rows a train step runs (not the first layer's input gradient), summed: ``{"rows",
    "launches", "predicted_us", "gpucnn_us", "torch_us", "ratio"}``; a sum is None when a row lacks
    its figure."""
    step = [r for r in rows if r["in_train_step"]]

    def total(key):
        values = [r[key] for r in step]
        return sum(values) if step and all(v is not None for v in values) else None
    out = {"rows": len(step), "launches": sum(len(r["launches"]) for r in step)}
    out.update({k: total(k) for k in ("predicted_us", "gpucnn_us", "torch_us")})
    out["ratio"] = ratio(out["gpucnn_us"], out["torch_us"])
    return out


def _cell(v, spec: str, width: int, suffix: str = "") -> str:
    """``v`` formatted with ``spec`` (and ``suffix``), right-aligned in ``width``; ``-`` for None."""
    return format("-" if v is None else format(v, spec) + suffix, f">{width}s")


def _shorten(text, n: int = 90) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= n else text[:n - 3] + "..."


def _figures(launches, predicted, gpucnn_us, torch_us, ratio_, check="") -> str:
    return (f"{_cell(launches, 'd', 8)} {_cell(predicted, '.2f', 9)} {_cell(gpucnn_us, '.2f', 9)} "
            f"{_cell(torch_us, '.2f', 9)} {_cell(ratio_, '.2f', 7, 'x')} {check:>8s}").rstrip()


HEADER = (f"  {'kernel':22s} {'shape (per sample)':28s} {'launches':>8s} {'predicted':>9s} {'gpucnn us':>9s} "
          f"{'cuDNN us':>9s} {'ratio':>7s} {'check':>8s}")


def format_table(rows, model: str, batch: int, mode: str, *, torch_settings: str | None = None) -> list[str]:
    """The lines of one table: the rows of one batch and mode, their train-step total, footnotes.

    ``predicted``, ``gpucnn us`` and ``cuDNN us`` are microseconds per call; ``-`` where a figure is
    missing (no GPU, no PyTorch, a refused or failed row)."""
    rows = [r for r in rows if r["batch"] == batch and r["precision"] == mode]
    title = f"[{model} GEMM kernels, batch {batch}, precision {mode}"
    title += f"; PyTorch: {torch_settings}]" if torch_settings else "]"
    lines, notes = [title, HEADER], []
    for r in rows:
        label = r["label"] + ("" if r["in_train_step"] else " *")
        head = f"  {label:22s} {r['shape']:28s}"
        if r["refused"] or (r["failed"] and not r["launches"]):
            word, why = ("refused", r["refused"]) if r["refused"] else ("failed", r["failed"])
            lines.append(f"{head} {word}: {_shorten(why, 70)}")
            continue
        check = "" if r["check"] is None else format(r["check"], ".1e") + (" MISMATCH" if r["mismatch"] else "")
        lines.append(f"{head} " + _figures(len(r["launches"]), r["predicted_us"], r["gpucnn_us"], r["torch_us"],
                                           r["ratio"], check))
        if r["failed"]:
            notes.append(f"{r['label']}: failed: {r['failed']}")
        if r["fused"]:
            notes.append(f"{r['label']}: fused: {r['fused']}")
        for side, key in (("gpucnn", "gpucnn_method"), ("PyTorch", "torch_method")):
            if r[key] and r[key] != "graph":
                notes.append(f"{r['label']}: {side} timed {r[key]}" if r[key].startswith("eager")
                             else f"{r['label']}: {side} {r[key]}")
    t = totals(rows)
    counted = f"({t['rows']} rows)"
    lines.append(f"  {'GEMMs of a train step':22s} {counted:28s} "
                 + _figures(t["launches"], t["predicted_us"], t["gpucnn_us"], t["torch_us"], t["ratio"]))
    if any(not r["in_train_step"] for r in rows):
        lines.append("  * not run in a train step (the first layer needs no input gradient); not in the total")
    lines += [f"  refused: {why}" for why in dict.fromkeys(r["refused"] for r in rows if r["refused"])]
    lines += [f"  {n}" for n in notes]
    return lines


def method_lines(calls: int, warmup: int, repeats: int, measured: bool) -> list[str]:
    """How the table was made, printed above it and kept in the JSON."""
    lines = [
        "gpucnn: the public functional ops (gpucnn.functional.conv / dense) inside precision.using(mode), so a "
        "row runs the kernels its mode dispatches to; activations and pooling left out on both sides",
        "bwd-input: the launches a backward with input_grad=True adds to the same call without it (recorded at "
        "gpucnn's kernel loader, replayed alone; fused: no launch of its own, the difference of the two calls); "
        "bwd-weight: dW and db, the call with input_grad=False",
        "predicted: roofline.predict of each launch of the row, summed (an H200's figures: a floor, not a measurement)",
    ]
    if measured:
        lines += [
            f"measured: {calls} calls back to back captured in one CUDA graph, CUDA events around each replay, "
            f"median of {repeats} replays after {warmup}, divided by {calls}: GPU time per call with the gaps "
            "between kernels, without the host's launch cost",
            "PyTorch: F.conv2d, torch.nn.grad.conv2d_input, conv2d_weight + the bias sum, F.linear, dz @ W, "
            "dz^T @ x + the bias sum, on the same data in NCHW / (N, F), cudnn.benchmark on, timed the same way",
            "ratio = cuDNN time / gpucnn time (> 1: gpucnn is faster); check = max |gpucnn - PyTorch| / "
            "max |PyTorch| over the row's outputs (MISMATCH above "
            + ", ".join(f"{k} {v:g}" for k, v in TOLERANCE.items()) + ")",
        ]
    return lines


def result(rows, *, model, batches, modes, env, method, measured) -> dict:
    """The JSON of ``--kernels``."""
    tables = [{"batch": b, "precision": m, **totals([r for r in rows if r["batch"] == b and r["precision"] == m])}
              for b in batches for m in modes]
    return {"env": env, "model": model, "kind": "kernels", "measured": measured, "batches": list(batches),
            "precisions": list(modes), "method": method, "assumptions": roofline.assumptions(),
            "machine": roofline.H200, "calls_per_graph": CALLS_PER_GRAPH, "tolerance": TOLERANCE,
            "rows": rows, "totals": tables}



# --------------------------------------------------------------------------- the command


def _print(line: str = "") -> None:
    print(line, flush=True)     # each table as it is made: a run stopped by a timeout keeps the ones done


def run(model: str, batches, modes, *, warmup: int, repeats: int, torch, env: dict, static: bool = False,
        log=_print) -> tuple[int, dict]:
    """Print the tables (each as soon as it is measured); returns ``(exit status, JSON)``.

    ``static``: on the CuPy stand-in, predictions only (no GPU); else on the GPU, with PyTorch's
    columns when ``torch`` is not None.  The status is 1 when a row failed or its check is a
    MISMATCH, else 0 (a refused mode is not a failure).
    """
    measured = not static
    method = method_lines(CALLS_PER_GRAPH, warmup, repeats, measured)
    if static:
        log(f"gpucnn bench --static --kernels: {model}'s GEMM kernels on the CuPy stand-in (no GPU, kernels "
            "stubbed): the launches and their predicted times; nothing is measured")
    else:
        gpu = env.get("gpu", "?")
        log(f"gpucnn bench --kernels: {model}'s GEMM kernels on {gpu}, predicted and measured, beside "
            + (f"PyTorch {env.get('torch')} (cuDNN {env.get('cudnn')})" if torch is not None else "nothing")
            + f"; cupy {env.get('cupy')}, driver {env.get('driver')}, CUDA runtime {env.get('cuda_runtime')}")
        if "H200" not in str(gpu):
            log(f"  (the predictions are an H200's, the measurements this {gpu}'s)")
        if torch is None:
            log("  PyTorch is not available: the cuDNN, ratio and check columns show '-'")
    for line in method:
        log(f"  {line}")
    log("  time model (gpucnn/bench/roofline.py):")
    for line in roofline.assumptions():
        log(f"    {line}")

    def progress(batch, mode, rows):
        settings = TORCH_MODES[mode][2] if torch is not None and not static else None
        log("")
        for line in format_table(rows, model, batch, mode, torch_settings=settings):
            log(line)

    if static:
        from . import standin

        with standin.installed(standin.Recorder()):
            rows = collect(model, batches, modes, device="cuda", progress=progress)
    else:
        clock = GraphClock(warmup, repeats)
        reference = TorchReference(torch, clock) if torch is not None else None
        rows = collect(model, batches, modes, device="cuda", clock=clock, reference=reference, progress=progress)
    bad = [r["label"] + f" (batch {r['batch']}, {r['precision']})" for r in rows if r["failed"] or r["mismatch"]]
    if bad:
        log(f"\n{len(bad)} rows failed or do not match PyTorch: {', '.join(bad)}")
    return (1 if bad else 0), result(rows, model=model, batches=batches, modes=modes, env=env, method=method,
                                     measured=measured)

"""``gpucnn bench --static``: the launches of one train step, measured without a GPU.

For each model and batch size, one steady-state training step -- exactly what
``gpucnn train --device cuda`` runs per step (:meth:`gpucnn.train.Trainer.run_steps`:
gather, forward, loss, backward, optimizer) -- runs on the CuPy stand-in
(:mod:`gpucnn.bench.standin`), kernels stubbed, and is reported as:

* every launch: gpucnn's kernels with grid, block and dynamic shared memory,
  and each CuPy operation that would be a kernel of its own;
* per kernel, from NVRTC + ptxas for sm_90 (when ``cuda-bindings`` and
  ``nvidia-cuda-nvrtc`` are installed; ``nvidia-cuda-nvdisasm`` for the loop
  figures): registers, spills, static shared memory, and the innermost FMA
  loop's instructions and global loads per FMA;
* host cost: wall time of the step on the host with every kernel stubbed out
  (the Python work of the step: checks, launch preparation, argument tuples),
  per step and per launch -- median of several repetitions of ``steps`` steps;
* host synchronisations inside the step (there should be none);
* per launch, a predicted GPU time from a static model (:mod:`gpucnn.bench.roofline`:
  FLOPs, bytes, blocks, waves on an H200, launch cost; its assumptions are
  printed), and the step's total.

Everything is static or host-side: no GPU time is measured; the predictions are
a model's.  The figures that need a GPU come from ``gpucnn bench --device cuda``.
"""
from __future__ import annotations

import collections
import statistics
import time

import numpy as np

from .. import losses, models, optim
from ..data.batching import epoch_permutation
from ..data.dataset import normalize
from ..random import seed as seed_all
from ..train import MODEL_DEFAULTS, Trainer
from . import roofline, standin

__all__ = ["STEP_LAUNCH_BUDGET", "static_step", "kernel_resources", "run_static"]

#: the issue's budget for lenet5 at batch 64: launches per train step, host microseconds per launch
STEP_LAUNCH_BUDGET = {"launches": 30, "host_us_per_launch": 10.0}
DATASET_SIZE = 4096


def _trainer(name, batch, optimizer, cuda_graph=False):
    """The trainer ``gpucnn train --model name`` builds on a GPU, with the model's default recipe's
    augmentation (MNIST's background as the fill)."""
    seed_all(0)
    model = models.build(name, device="cuda")
    loss = models.make_loss(name)
    if isinstance(loss, losses.SoftmaxCrossEntropy):
        loss.check_labels = False     # what `gpucnn train` does on a GPU: no host sync per step
    opt = optim.SGD(model, lr=0.01, momentum=0.9) if optimizer == "sgd" else optim.Adam(model, lr=1e-3)
    augment = None
    if MODEL_DEFAULTS.get(name, {}).get("augment"):
        fill = float(normalize(np.zeros((1, 1, 1), np.uint8), "mnist")[0, 0, 0, 0])
        augment = {"seed": 0, "fill": fill, "flip": False}
    return Trainer(model, loss, opt, batch_size=batch, sync_every=10**9, cuda_graph=cuda_graph, augment=augment)


def _dataset(cp, batch, steps):
    """A random MNIST-shaped dataset on the stand-in, with an epoch order: ``(x, y, order, steps per epoch)``."""
    n = max(DATASET_SIZE, batch * steps)
    rng = np.random.default_rng(0)
    x = cp.asarray(rng.standard_normal((n, 1, 28, 28)).astype(np.float32))
    y = cp.asarray(rng.integers(0, 10, n).astype(np.int64))
    return x, y, cp.asarray(epoch_permutation(0, 0, n)), n // batch


def static_step(name: str, batch: int, *, optimizer: str = "sgd", steps: int = 20, repeats: int = 5) -> dict:
    """Record one steady-state train step of ``name`` at ``batch`` on the stand-in.

    Returns ``{"model", "batch", "optimizer", "launches", "gpucnn_launches", "xp_ops",
    "syncs", "copies", "allocations", "host_us", "host_us_per_launch", "launcher_us_per_launch",
    "kernels": [...], "per_epoch": [...]}``;
    ``kernels`` lists every launch of the step in order (``kind``: ``kernel`` for gpucnn's own,
    ``xp`` for a CuPy operation).  ``per_epoch`` lists what runs once per ``run_steps`` call
    (the learning-rate table upload) and is not part of a step.
    """
    if batch < 1 or steps < 2 or repeats < 1:
        raise ValueError(f"need batch >= 1, steps >= 2, repeats >= 1; got {batch}, {steps}, {repeats}")
    rec = standin.Recorder()
    with standin.installed(rec) as cp:
        trainer = _trainer(name, batch, optimizer)
        x, y, order, spe = _dataset(cp, batch, steps + 2)
        trainer.run_steps(x, y, order, 0, range(2), spe)      # warm-up: buffers, slots, prepared launches
        rec.take()
        marks = []
        real_gather = trainer._gather

        def marked(*a):
            marks.append(len(rec.events))
            return real_gather(*a)

        trainer._gather = marked
        trainer.run_steps(x, y, order, 0, range(2, 2 + steps), spe)
        events = rec.take()
        trainer._gather = real_gather
        # Host time of the same steps, recording paused (stubs only) ...
        times = []
        for r in range(repeats):
            with rec.pause():
                t0 = time.perf_counter()
                trainer.run_steps(x, y, order, 0, range(2, 2 + steps), spe)
                times.append((time.perf_counter() - t0) / steps)
        # ... and of the launcher alone inside them (loader.launch, kernel stubbed).
        launcher = _timed_launches(lambda: trainer.run_steps(x, y, order, 0, range(2, 2 + steps), spe),
                                   rec, repeats)
    per_epoch = events[:marks[0]]
    step_events = events[marks[1]:marks[2]]            # a step in the middle: steady state
    sizes = {marks[i + 1] - marks[i] for i in range(len(marks) - 1)}
    if len(sizes) != 1:
        raise RuntimeError(f"{name} batch {batch}: steps differ in their launches ({sorted(sizes)}); "
                           "the step is not static")
    launches = [e for e in step_events if e.kind in ("kernel", "xp")]
    loops, _ = kernel_resources({e.name for e in launches if e.kind == "kernel"})
    host_us = statistics.median(times) * 1e6
    return {
        "model": name, "batch": batch, "optimizer": optimizer,
        "launches": len(launches),
        "gpucnn_launches": sum(e.kind == "kernel" for e in launches),
        "xp_ops": sum(e.kind == "xp" for e in launches),
        "syncs": [e.name for e in step_events if e.kind == "sync"],
        "copies": [e.name for e in step_events if e.kind == "copy"],
        "host_us": host_us,
        "host_us_per_launch": host_us / max(1, len(launches)),
        "launcher_us_per_launch": launcher,
        "kernels": [{"kind": e.kind, "name": e.name, "grid": e.grid, "block": e.block,
                     "shared_mem": e.shared_mem, "model": _model(e, loops)} for e in launches],
        "allocations": sum(e.kind == "alloc" for e in step_events),
        "per_epoch": [e.name for e in per_epoch if e.kind not in ("sync", "alloc")],
    }


def _model(event, loops):
    """The time model's figures for a gpucnn kernel launch (None for a CuPy operation); ``loops``:
    :func:`kernel_resources`, for the issue floor."""
    if event.kind != "kernel":
        return None
    return roofline.predict(event.name, event.grid, event.block, roofline.launch_args(event.name, event.args),
                            loop=loops.get(event.name))


def _timed_launches(run, rec, repeats) -> float:
    """Median microseconds one ``loader.launch`` call takes inside ``run()`` (kernels stubbed)."""
    from ..cuda import loader

    real = loader.launch
    per_rep = []
    for _ in range(repeats):
        spent = [0.0, 0]

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            real(*args, **kwargs)
            spent[0] += time.perf_counter() - t0
            spent[1] += 1

        loader.launch = timed
        try:
            with rec.pause():
                run()
        finally:
            loader.launch = real
        per_rep.append(spent[0] / max(1, spent[1]))
    return statistics.median(per_rep) * 1e6


def graph_step(name: str, batch: int, *, optimizer: str = "sgd", steps: int = 20, repeats: int = 5) -> dict:
    """The same step replayed as a CUDA graph (the default on a GPU), on the stand-in: what the
    host does per replayed step.

    Returns ``{"captured": bool, "graph_launches", "copies", "launches", "syncs", "host_us",
    "host_us_per_launch"}`` per step (``captured`` False: the step could not be captured -- see
    the warning -- and runs eagerly).
    """
    import warnings

    rec = standin.Recorder()
    with standin.installed(rec) as cp, warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer = _trainer(name, batch, optimizer, cuda_graph=True)
        x, y, order, spe = _dataset(cp, batch, steps + 4)
        trainer.run_steps(x, y, order, 0, range(4), spe)   # 2 eager warm-ups, 2 captures checked
        rec.take()
        trainer.run_steps(x, y, order, 0, range(4, 4 + steps), spe)
        # per step: kernels, CuPy ops, syncs, device-to-device copies (not the per-call table uploads)
        events = [e for e in rec.take() if e.kind != "alloc" and not (e.kind == "copy" and "host" in e.name)]
        times = []
        for _ in range(repeats):
            with rec.pause():
                t0 = time.perf_counter()
                trainer.run_steps(x, y, order, 0, range(4, 4 + steps), spe)
                times.append((time.perf_counter() - t0) / steps)
        replayed = any(g is not None and g.validated for g in trainer._graphs.values())
    last = max((i for i, e in enumerate(events) if e.kind in ("kernel", "graph", "xp")), default=-1)
    events = [e for i, e in enumerate(events) if i <= last or e.kind != "sync"]   # not the one read at the end
    per = lambda kind: sum(e.kind == kind for e in events) / steps  # noqa: E731
    host_us = statistics.median(times) * 1e6
    launches = per("kernel") + per("xp")
    return {"model": name, "batch": batch, "captured": replayed and per("graph") == 1,
            "graph_launches": per("graph"), "copies": per("copy"), "launches": launches, "syncs": per("sync"),
            "host_us": host_us, "host_us_per_launch": host_us / max(1.0, launches + per("copy") + per("graph"))}


def kernel_resources(names, arch: str = "sm_90") -> tuple[dict, str | None]:
    """``({kernel: figures}, None)`` from :func:`gpucnn.cuda.sass.report`, or ``({}, why not)``."""
    from ..cuda import loader, sass

    try:
        sass._nvrtc()
    except sass.ToolMissingError as exc:
        return {}, str(exc)
    out, note = {}, None
    by_file = collections.defaultdict(set)
    for k in names:
        by_file[loader.kernel_file_of(k)].add(k)
    for filename, kernels in sorted(by_file.items()):
        try:
            figures = sass.report(filename, arch)
        except sass.ToolMissingError as exc:       # no disassembler: ptxas figures only
            note = str(exc)
            cubin, log = sass.compile_cubin(filename, arch)
            figures = {k: dict(v, loop_ffma=None) for k, v in sass.parse_ptxas(log).items()}
        out.update({k: figures.get(k, {}) for k in kernels})
    return out, note


def _fmt(v, spec=""):
    return "-" if v is None else format(v, spec)


def _print_step(row, resources):
    print(f"\n[{row['model']} train step, batch {row['batch']}, {row['optimizer']}: {row['launches']} launches "
          f"({row['gpucnn_launches']} gpucnn kernels + {row['xp_ops']} CuPy ops), host "
          f"{row['host_us']:.0f} us/step = {row['host_us_per_launch']:.1f} us/launch, of which the launcher "
          f"{row['launcher_us_per_launch']:.1f} us/launch (kernels stubbed), {len(row['syncs'])} host syncs, "
          f"{row['allocations']} allocations]")
    print(f"  {'kernel':28s} {'grid':>16s} {'block':>12s} {'dyn smem':>8s} {'regs':>4s} {'spill':>5s} "
          f"{'smem':>6s} {'instr/FMA':>9s} {'LDG/FMA':>7s}")
    for k in row["kernels"]:
        f = resources.get(k["name"], {})
        spill = None if f.get("spill_stores") is None else f["spill_stores"] + f["spill_loads"]
        grid = "x".join(map(str, k["grid"])) if k["grid"] else "-"
        block = "x".join(map(str, k["block"])) if k["block"] else "-"
        name = k["name"] if k["kind"] == "kernel" else f"cupy: {k['name']}"
        print(f"  {name:28s} {grid:>16s} {block:>12s} {k['shared_mem']:>8d} {_fmt(f.get('registers')):>4s} "
              f"{_fmt(spill):>5s} {_fmt(f.get('smem')):>6s} {_fmt(f.get('instructions_per_ffma'), '.2f'):>9s} "
              f"{_fmt(f.get('ldg_per_ffma'), '.3f'):>7s}")
    _print_prediction(row)
    if row["syncs"] or row["copies"]:
        print(f"  inside the step: syncs {row['syncs']}, copies {row['copies']}")
    if row["per_epoch"]:
        print(f"  once per run_steps call, not per step: {', '.join(row['per_epoch'])}")
    g = row.get("graph")
    if g is not None:
        if g["captured"]:
            print(f"  as a CUDA graph (the default on a GPU): per step {g['graph_launches']:.0f} graph launch + {g['copies']:.0f} "
                  f"device-to-device copies, {g['launches']:.0f} kernel launches from Python, host "
                  f"{g['host_us']:.0f} us/step")
        else:
            print("  as a CUDA graph: the step is not captured (CuPy operations or allocations in it); "
                  "it runs eagerly")


def _print_prediction(row):
    """The time model's table for the step's launches, and its total."""
    print(f"  predicted on an {roofline.H200['name']} (static model, assumptions above):")
    print(f"  {'kernel':28s} {'MFLOP':>9s} {'KB moved':>9s} {'blocks':>7s} {'waves':>5s} {'compute':>8s} "
          f"{'memory':>8s} {'issue':>8s} {'launch':>6s} {'predicted':>9s}   (us)")
    for k in row["kernels"]:
        p = k["model"]
        if p is None:
            print(f"  {'cupy: ' + k['name']:28s} {'-':>9s} {'-':>9s} {'-':>7s} {'-':>5s} {'-':>8s} {'-':>8s} "
                  f"{'-':>8s} {roofline.H200['launch_us']:6.2f} {roofline.H200['launch_us']:9.2f}")
            continue
        print(f"  {k['name']:28s} {p['flops'] / 1e6:9.3f} {p['bytes'] / 1e3:9.1f} {p['blocks']:7d} {p['waves']:5d} "
              f"{p['compute_us']:8.2f} {p['memory_us']:8.2f} {_fmt(p['issue_us'], '8.2f'):>8s} {p['launch_us']:6.2f} "
              f"{p['predicted_us']:9.2f}")
    t = row["predicted"]
    print(f"  predicted step total: {t['predicted_us']:.1f} us for {t['launches']} launches per step "
          f"({t['launch_us']:.1f} us of it launch cost; {t['flops'] / 1e9:.3f} GFLOP, {t['bytes'] / 1e6:.2f} MB)"
          + (f"; {t['unmodelled']} CuPy operations counted at their launch cost only" if t["unmodelled"] else ""))


def run_static(model_names, batches, *, optimizer="sgd", steps=20, repeats=5, arch="sm_90") -> dict:
    """Print the static table for every model and batch; returns ``{"steps": [...], "arch", "note"}``."""
    rows = [static_step(m, b, optimizer=optimizer, steps=steps, repeats=repeats)
            for m in model_names for b in batches]
    names = sorted({k["name"] for r in rows for k in r["kernels"] if k["kind"] == "kernel"})
    resources, note = kernel_resources(names, arch)
    print(f"gpucnn bench --static: one steady-state train step per model and batch on the CuPy stand-in "
          f"(no GPU, kernels stubbed); kernel resources from NVRTC/ptxas for {arch}")
    if note:
        print(f"  ({note})")
    print("time model (gpucnn/bench/roofline.py), assumptions:")
    for line in roofline.assumptions():
        print(f"  {line}")
    for row in rows:
        row["predicted"] = roofline.step_totals(row["kernels"])
        row["graph"] = graph_step(row["model"], row["batch"], optimizer=optimizer, steps=steps, repeats=repeats)
        _print_step(row, resources)
        for k in row["kernels"]:
            if k["kind"] == "kernel":
                k.update({key: resources.get(k["name"], {}).get(key) for key in
                          ("registers", "spill_stores", "spill_loads", "smem", "instructions_per_ffma",
                           "ldg_per_ffma")})
    budget = STEP_LAUNCH_BUDGET
    for row in rows:
        if row["model"] == "lenet5" and row["batch"] == 64:
            graph = row["graph"]
            per_launch = graph["host_us"] / row["launches"] if graph["captured"] else row["host_us_per_launch"]
            ok = row["launches"] <= budget["launches"] and per_launch <= budget["host_us_per_launch"]
            print(f"\nlenet5 batch 64: {row['launches']} launches (budget {budget['launches']}); host work per "
                  f"launch {per_launch:.1f} us with the CUDA graph (budget {budget['host_us_per_launch']:g}): "
                  f"{'within budget' if ok else 'OVER BUDGET'}.  Eager (--no-cuda-graph) "
                  f"{row['host_us_per_launch']:.1f} us/launch, of which the launcher "
                  f"{row['launcher_us_per_launch']:.1f}; as a CUDA graph {graph['host_us']:.0f} us/step")
    return {"arch": arch, "note": note, "machine": roofline.H200, "assumptions": roofline.assumptions(),
            "steps": rows}

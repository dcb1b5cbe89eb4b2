"""A static time model of one kernel launch: FLOPs, bytes, blocks, waves, and a predicted time.

For every launch ``gpucnn bench --static`` records (kernel, grid, block and
the arguments, named by the kernel's signature), :func:`predict` gives::

    compute_us   = flops / (peak FP32 SIMT rate x the fraction of the GPU's FP32 lanes the grid can fill)
    memory_us    = bytes / HBM bandwidth
    issue_us     = the main loop's warp instructions / (warp schedulers the grid fills x clock)
    predicted_us = max(compute_us, memory_us, issue_us) + launch_us

with the machine's figures in :data:`H200` (printed by :func:`assumptions`):

* ``flops``: the useful arithmetic, 2 per multiply-add of the GEMMs -- conv
  forward, backward-input and backward-weight ``2 O C KH KW OH OW N`` (plus
  the bias sum), the dense GEMMs ``2 M N K``, the slab reduction one add per
  partial element, a max pooling one compare per window tap -- and, for the
  element-wise kernels, one operation per element of their largest array
  (the batch gather: of the batch it writes; they are memory-bound by orders
  of magnitude either way).
* ``bytes``: every array argument read or written once (the compulsory
  traffic); the batch gather counts the rows it copies (twice), not the whole
  dataset it indexes.  Re-reads through L1/L2 are not counted.
* ``blocks``, ``waves``: waves = ceil(blocks / (SMs x resident blocks per SM)),
  residency limited by threads (2048 per SM) and blocks (32 per SM) only --
  registers and shared memory are not modelled.
* the lane fraction: threads of the first wave over the SMs' FP32 lanes
  (132 x 128), at most 1 -- a grid of 2 blocks of 64 threads gets 2 x 64 lanes.
* ``launch_us``: the cost of one kernel inside a replayed CUDA graph (the gap
  between dependent kernels: drain, launch, ramp), the same for every kernel.
* ``issue_us`` (when the kernel's sm_90 SASS is at hand, ``loop``):
  the useful multiply-adds over those of one warp instruction of its hot loop
  (FFMA / DFMA 32; HMMA m16n8k8 tf32 1024, m16n8k16 bf16/f16 2048, a third
  of tf32's for 3xtf32's three products), times the loop's instructions per
  such instruction, issued at one warp instruction per clock by each of the
  4 schedulers of an SM -- at most one per warp, so a grid of few small
  blocks fills few.  This is what limits the tensor-core GEMMs, whose
  staging takes 10-211 instructions per HMMA.  Still a floor: empty tile
  rows and columns, the prologue and epilogue, and stalls are not counted.

It is a roofline with a launch floor: no latency chains (a serial L2 round
trip per load, issue 25's fix 1), no tail effects inside a wave.  Real kernels take longer; the model shows where a step's time
can go at best and what a change could save, before a GPU run.
"""
from __future__ import annotations

import math

from ..cuda import sources

__all__ = ["H200", "predict", "step_totals", "assumptions", "launch_args"]

#: the machine the prediction is for (an H200 SXM)
H200 = {
    "name": "H200",
    "sms": 132,
    "clock_ghz": 1.98,
    "fp32_lanes_per_sm": 128,
    "hbm_tb_s": 4.8,
    "launch_us": 1.5,
    "max_threads_per_sm": 2048,
    "max_blocks_per_sm": 32,
    "schedulers_per_sm": 4,
    # dense tensor-core FLOP per clock per SM (mma.sync, FP32 accumulation; Hopper's wgmma is not used)
    "tc_flop_per_clock_sm": {"tf32": 2048, "bf16": 4096, "f16": 4096},
}


def peak_fp32_tflops(machine=H200) -> float:
    """SMs x FP32 lanes x 2 FLOPs per FMA x clock, in TFLOP/s (66.9 for the H200)."""
    return machine["sms"] * machine["fp32_lanes_per_sm"] * 2 * machine["clock_ghz"] / 1e3


def peak_tc_tflops(tag: str, machine=H200) -> float:
    """Dense tensor-core TFLOP/s of mode tag ``tf32``/``bf16``/``f16`` (3xtf32: tf32's over three
    products): SMs x FLOP per clock per SM x clock."""
    per_clock = machine["tc_flop_per_clock_sm"]["tf32" if tag == "3xtf32" else tag]
    return machine["sms"] * per_clock * machine["clock_ghz"] / 1e3 / (3 if tag == "3xtf32" else 1)


def _tc_tag(kernel: str) -> str | None:
    """The mode tag of a tensor-core GEMM entry point (gemm_tc_<tag>_...), else None."""
    return kernel.split("_")[2] if kernel.startswith("gemm_tc_") else None


def assumptions(machine=H200) -> list[str]:
    """The model's assumptions, one line each, as the table prints them."""
    m = machine
    return [
        f"{m['name']}: {m['sms']} SMs at {m['clock_ghz']:g} GHz, FP32 SIMT peak {m['sms']} x "
        f"{m['fp32_lanes_per_sm']} lanes x 2 FLOP/FMA = {peak_fp32_tflops(m):.1f} TFLOP/s, HBM "
        f"{m['hbm_tb_s']:g} TB/s, {m['launch_us']:g} us launch cost per kernel in a replayed CUDA graph",
        "predicted = max(FLOPs / (peak x lanes the grid fills), bytes / HBM, issue) + launch; bytes = each array "
        "argument once; waves = blocks / (SMs x resident blocks, by threads "
        f"<= {m['max_threads_per_sm']} and blocks <= {m['max_blocks_per_sm']} per SM)",
        "tensor-core GEMMs (gemm_tc_*): FLOPs / (dense mma.sync peak x the SMs the grid fills); peaks "
        + ", ".join(f"{t} {peak_tc_tflops(t, m):.0f}" for t in ("tf32", "3xtf32", "bf16", "f16")) + " TFLOP/s",
        "issue = the useful multiply-adds / those of one FFMA (32) or HMMA (tf32 1024, bf16/f16 2048, 3xtf32 "
        f"1024/3) x the hot loop's SASS instructions per FFMA/HMMA, at 1 per clock per warp scheduler "
        f"({m['schedulers_per_sm']} per SM, one per warp); '-' where no SASS was read",
        "not modelled: latency chains, stalls, empty tile rows, registers/shared memory, L2 reuse: "
        "a floor, not a measurement",
    ]


def launch_args(kernel: str, args) -> dict:
    """``{"arrays": {name: nbytes}, "scalars": {name: value}}`` of one launch, named by the signature."""
    params = sources.kernel_signature(kernel)
    arrays, scalars = {}, {}
    for p, a in zip(params, args):
        if p.is_array:
            arrays[p.name] = int(a.nbytes)
        else:
            scalars[p.name] = a.item() if hasattr(a, "item") else a
    return {"arrays": arrays, "scalars": scalars}


def _conv_macs(s) -> int:
    return s["O"] * s["C"] * s["KH"] * s["KW"] * s["OH"] * s["OW"] * s["N"]


def _flops(kernel: str, arrays: dict, s: dict) -> int:
    base = kernel.removesuffix("_f64")
    if base in ("conv_forward", "conv_backward_input"):
        return 2 * _conv_macs(s)
    if base == "conv_backward_weight_partial":
        return 2 * _conv_macs(s) + s["O"] * s["OH"] * s["OW"] * s["N"]
    if base == "conv_backward_weight_reduce":
        return arrays["partial"] // 4
    if base == "dense_forward":
        return 2 * s["Fout"] * s["Fin"] * s["N"]
    if base in ("gemm_nt", "gemm_tn"):
        return 2 * s["M"] * s["Nc"] * s["K"]
    if base == "dense_backward":                # dW, and dx when input_grad (dz and db: not counted)
        return 2 * s["Fout"] * s["Fin"] * s["N"] * (1 + (s["input_grad"] != 0))
    if base == "pool_max_forward":
        return s["C"] * s["OH"] * s["OW"] * s["N"] * s["KH"] * s["KW"]
    if base.startswith("gather_batch"):
        return arrays["x"] // 4
    if base.startswith("gemm_tc_"):            # D (M x Nn) over K: every multiply-add the GEMM runs
        return 2 * s["M"] * s["Nn"] * s["K"]
    return max(arrays.values(), default=0) // 4


def _bytes(kernel: str, arrays: dict, s: dict) -> int:
    if kernel.startswith("gather_batch"):            # indexes the whole dataset, copies N rows
        rows = arrays["x"] + arrays.get("y", 0)
        return 2 * rows + 4 * s["N"]
    if kernel.removesuffix("_f64") == "dense_backward":   # the dummies of what it does not read or write
        unused = {"saved": s["act"] == 0, "dx": s["input_grad"] == 0, "db": s["has_bias"] == 0}
        return sum(v for k, v in arrays.items() if not unused.get(k))
    return sum(arrays.values())


def predict(kernel: str, grid, block, args: dict, machine=H200, loop: dict | None = None) -> dict:
    """The model's figures for one launch of ``kernel`` (``args`` from :func:`launch_args`); ``loop``:
    the kernel's figures from :func:`gpucnn.cuda.sass.report` for the issue floor (None: no issue term)."""
    m = machine
    arrays, s = args["arrays"], args["scalars"]
    flops, nbytes = _flops(kernel, arrays, s), _bytes(kernel, arrays, s)
    blocks, threads = math.prod(grid), math.prod(block)
    per_sm = max(1, min(m["max_blocks_per_sm"], m["max_threads_per_sm"] // threads))
    waves = math.ceil(blocks / (m["sms"] * per_sm))
    tag = _tc_tag(kernel)
    if tag:                                    # a block keeps one SM's four tensor cores busy
        fill = min(1.0, blocks / m["sms"])
        compute_us = flops / (peak_tc_tflops(tag, m) * 1e6 * fill)
    else:
        lanes = m["sms"] * m["fp32_lanes_per_sm"]
        fill = min(1.0, min(blocks, m["sms"] * per_sm) * threads / lanes)
        compute_us = flops / (peak_fp32_tflops(m) * 1e6 * fill)
    memory_us = nbytes / (m["hbm_tb_s"] * 1e6)
    warps = blocks * math.ceil(threads / 32)
    issue_us = _issue_us(kernel, flops, warps, loop, m)
    return {"flops": flops, "bytes": nbytes, "blocks": blocks, "waves": waves, "lane_fill": fill,
            "compute_us": compute_us, "memory_us": memory_us, "issue_us": issue_us, "launch_us": m["launch_us"],
            "predicted_us": max(compute_us, memory_us, issue_us or 0.0) + m["launch_us"]}


def _macs_per_instruction(kernel: str) -> float:
    """Multiply-adds of one warp instruction of ``kernel``'s hot loop (FFMA/DFMA or its mode's HMMA)."""
    tag = _tc_tag(kernel)
    if tag is None:
        return 32.0
    k = 8 if tag in ("tf32", "3xtf32") else 16
    return 16 * 8 * k / (3 if tag == "3xtf32" else 1)


def _issue_us(kernel: str, flops: int, warps: int, loop: dict | None, m) -> float | None:
    """The issue floor: the hot loop's warp instructions over the schedulers the grid fills."""
    per_op = (loop or {}).get("instructions_per_ffma")
    if not per_op:
        return None
    warp_instructions = flops / 2 / _macs_per_instruction(kernel) * per_op
    schedulers = min(m["sms"] * m["schedulers_per_sm"], warps)
    return warp_instructions / (schedulers * m["clock_ghz"] * 1e3)


def step_totals(kernels, machine=H200) -> dict:
    """Totals of a step's launches (CuPy operations, not modelled, count their launch cost only)."""
    modelled = [k["model"] for k in kernels if k.get("model")]
    unmodelled = len(kernels) - len(modelled)
    return {"launches": len(kernels), "unmodelled": unmodelled,
            "flops": sum(p["flops"] for p in modelled), "bytes": sum(p["bytes"] for p in modelled),
            "launch_us": machine["launch_us"] * len(kernels),
            "predicted_us": sum(p["predicted_us"] for p in modelled) + machine["launch_us"] * unmodelled}

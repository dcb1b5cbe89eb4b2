"""``gpucnn bench --kernels`` without a GPU (gpucnn/bench/kernels.py).

The rows are built on the CuPy stand-in, the same launch records ``--static``
uses; timings are injected (a fake clock and a fake PyTorch side) or, for
the capture path, taken with the CPU clock on the stand-in's graphs; the
PyTorch comparison's layouts are checked against PyTorch on the CPU with the
kernels running on the emulator.  What only a GPU can show -- CuPy's and
PyTorch's CUDA-graph captures, cuDNN's times -- runs in the device check's
``bench-kernels`` step (tests/gpu/run_on_device.sh).  No timing is asserted.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from gpucnn import backend, bench, models
from gpucnn.bench import kernels, standin
from gpucnn.bench.static import static_step
from gpucnn.functional.workspace import Workspace
from gpucnn.timing import Timer

REFUSAL = "precision '3xtf32' has no CUDA kernels yet (planted)"


class FakeClock:
    """Injected timings: every gpucnn call takes ``us[op]`` microseconds (it runs once, for real)."""

    def __init__(self, us):
        self.us = us

    def gpucnn(self, fn):
        fn()
        return self.us, "graph"


class FakeReference:
    """PyTorch's side, injected: ``us`` per row; ``outputs`` (default none: no check)."""

    def __init__(self, us, outputs=(None,)):
        self.us, self.outputs = us, list(outputs)
        self.restored = False

    def run(self, g, batch, op, mode, data):
        return {"us": self.us, "method": "graph", "outputs": self.outputs}

    def restore(self):
        self.restored = True


def _collect(batches=(8,), modes=("fp32",), clock=None, reference=None, model="lenet5"):
    with standin.installed(standin.Recorder()):
        return kernels.collect(model, list(batches), list(modes), clock=clock, reference=reference)


# -- the ratio, the totals and the table ---------------------------------------------------------


def test_ratio_is_cudnn_over_gpucnn():
    assert kernels.ratio(10.0, 15.0) == pytest.approx(1.5)       # gpucnn 1.5x faster
    assert kernels.ratio(20.0, 10.0) == pytest.approx(0.5)
    assert kernels.ratio(None, 10.0) is None and kernels.ratio(10.0, None) is None
    assert kernels.ratio(0.0, 10.0) is None


def test_table_with_injected_timings():
    rows = _collect(clock=FakeClock(4e-6), reference=FakeReference(6.0))
    assert [r["label"] for r in rows[:3]] == ["conv1 fwd", "conv1 bwd-input", "conv1 bwd-weight"]
    # fp32 dense: dx comes from the bwd-weight launch (dense_backward), its time the difference: 4 - 4
    fused = [r for r in rows if r["fused"]]
    assert [r["label"] for r in fused] == [f"dense{i} bwd-input" for i in (1, 2, 3)]
    assert all(r["gpucnn_us"] == 0.0 and r["ratio"] is None and r["launches"] == [] for r in fused)
    rows_alone = [r for r in rows if not r["fused"]]
    assert len(rows) == 15 and all(r["gpucnn_us"] == pytest.approx(4.0) and r["torch_us"] == 6.0 for r in rows_alone)
    assert all(r["ratio"] == pytest.approx(1.5) for r in rows_alone)
    assert all(r["check"] is None and not r["mismatch"] for r in rows)
    lines = kernels.format_table(rows, "lenet5", 8, "fp32", torch_settings=kernels.TORCH_MODES["fp32"][2])
    assert lines[0] == ("[lenet5 GEMM kernels, batch 8, precision fp32; PyTorch: float32, TF32 off "
                        "(cudnn.allow_tf32 = cuda.matmul.allow_tf32 = False)]")
    assert lines[1].split() == ["kernel", "shape", "(per", "sample)", "launches", "predicted", "gpucnn", "us",
                                "cuDNN", "us", "ratio", "check"]
    conv1 = lines[2].split()
    assert conv1[:8] == ["conv1", "fwd", "1x28x28", "->", "6x28x28,", "5x5", "p2", "1"]
    assert conv1[9:] == ["4.00", "6.00", "1.50x"]
    assert lines[3].startswith("  conv1 bwd-input *")          # the first layer's dx: not in a step
    dense = next(line for line in lines if line.startswith("  dense1 bwd-weight")).split()
    assert dense[2:6] == ["400", "->", "120", "1"]              # dense_backward: dW, db (and dx) in one launch
    assert any(line.startswith("  dense1 bwd-input: fused: dx in bwd-weight's launches (dense_backward)")
               for line in lines)
    total = next(line for line in lines if line.startswith("  GEMMs of a train step")).split()
    t = kernels.totals(rows)
    assert t["rows"] == 14 and total[5:7] == ["(14", "rows)"]
    assert total[9:] == [f"{11 * 4.0:.2f}", f"{14 * 6.0:.2f}", f"{14 * 6.0 / (11 * 4.0):.2f}x"]
    assert t["predicted_us"] == pytest.approx(sum(r["predicted_us"] for r in rows if r["label"] != "conv1 bwd-input"))
    assert any("* not run in a train step" in line for line in lines)


def test_totals_need_every_row_of_the_step():
    row = {"in_train_step": True, "launches": [{}], "predicted_us": 2.0, "gpucnn_us": 4.0, "torch_us": 8.0}
    first_dx = dict(row, in_train_step=False, gpucnn_us=100.0)
    t = kernels.totals([row, row, first_dx])
    assert (t["rows"], t["launches"], t["gpucnn_us"], t["torch_us"], t["ratio"]) == (2, 2, 8.0, 16.0, 2.0)
    t = kernels.totals([row, dict(row, torch_us=None)])
    assert t["torch_us"] is None and t["ratio"] is None and t["gpucnn_us"] == 8.0


def test_a_refused_mode_gives_refused_rows_not_a_crash(monkeypatch):
    """Every mode has kernels today: a refusal (NotImplementedError) is planted for 3xtf32."""
    from gpucnn.cuda import gemm_tc

    real = gemm_tc.check_device

    def refuse(func, mode, *arrays):
        if mode == "3xtf32":
            raise NotImplementedError(REFUSAL)
        return real(func, mode, *arrays)

    monkeypatch.setattr(gemm_tc, "check_device", refuse)
    rows = _collect(modes=("3xtf32", "bf16"), clock=FakeClock(1e-6), reference=FakeReference(2.0))
    refused = [r for r in rows if r["precision"] == "3xtf32"]
    assert len(refused) == 15 and all(REFUSAL in r["refused"] for r in refused)
    assert all(r["gpucnn_us"] is None and r["torch_us"] is None and r["launches"] == [] for r in refused)
    assert all(r["refused"] is None and r["gpucnn_us"] is not None for r in rows if r["precision"] == "bf16")
    lines = kernels.format_table(rows, "lenet5", 8, "3xtf32")
    assert lines[2].split()[:8] == ["conv1", "fwd", "1x28x28", "->", "6x28x28,", "5x5", "p2", "refused:"]
    assert sum(line.strip().startswith("refused: precision '3xtf32'") for line in lines) == 1   # the full reason, once


def test_a_failing_call_fails_its_rows_and_the_others_run(monkeypatch):
    from gpucnn.functional import dense as fdense

    def broken(*args, **kwargs):
        raise RuntimeError("planted")

    monkeypatch.setattr(fdense, "dense_backward", broken)
    rows = _collect(clock=FakeClock(1e-6))
    failed = {r["label"] for r in rows if r["failed"]}
    assert failed == {f"dense{i} {op}" for i in (1, 2, 3) for op in ("bwd-input", "bwd-weight")}
    assert all("RuntimeError: planted" in r["failed"] for r in rows if r["failed"])
    assert all(r["gpucnn_us"] is not None for r in rows if not r["failed"])
    lines = kernels.format_table(rows, "lenet5", 8, "fp32")
    assert any(line.startswith("  dense1 bwd-weight") and "failed: RuntimeError: planted" in line for line in lines)


def test_the_input_gradient_is_what_input_grad_adds():
    rows = {(r["precision"], r["label"]): r for r in _collect(modes=("fp32", "tf32"))}
    kinds = {key: [launch["kernel"] for launch in r["launches"]] for key, r in rows.items()}
    assert kinds["fp32", "conv2 bwd-input"] == ["conv_backward_input"]
    assert kinds["fp32", "conv2 bwd-weight"] == ["conv_backward_weight_partial", "conv_backward_weight_reduce"]
    # tf32: the tensor-core GEMMs, which round as they load (the weight gradient keeps the reduce)
    assert kinds["tf32", "conv2 bwd-input"] == ["gemm_tc_tf32_conv_dgrad_n8"]
    assert kinds["tf32", "conv2 bwd-weight"] == ["gemm_tc_tf32_conv_wgrad_n64", "conv_backward_weight_reduce"]
    assert kinds["tf32", "dense1 fwd"] == ["gemm_tc_tf32_dense_fwd_n64"]
    # fp32 dense: one launch for dW, db and dx; the input gradient has none of its own
    assert kinds["fp32", "dense1 bwd-input"] == [] and rows["fp32", "dense1 bwd-input"]["fused"]
    assert kinds["fp32", "dense1 bwd-weight"] == ["dense_backward"]
    assert rows["fp32", "dense1 bwd-input"]["predicted_us"] > 0          # the dx blocks' share
    assert "below 0" not in rows["fp32", "dense1 bwd-input"]["fused"]


def test_a_fused_row_predicted_below_zero_says_why():
    """At batch 1024 dense3's dx blocks fill more SMs than dW's alone, so the model predicts the launch
    with dx faster than without: the difference is negative, and the row's note says what it means."""
    rows = {r["label"]: r for r in _collect(batches=(1024,))}
    dx = rows["dense3 bwd-input"]
    assert dx["predicted_us"] < 0 and "predicted below 0" in dx["fused"]
    assert dx["predicted_us"] + rows["dense3 bwd-weight"]["predicted_us"] > 0
    lines = kernels.format_table(list(rows.values()), "lenet5", 1024, "fp32")
    assert any(line.startswith("  dense3 bwd-input: fused:") and "below 0" in line for line in lines)


def test_predictions_come_from_the_launch_records_static_uses():
    """conv1's forward at batch 8: the launch and the prediction ``bench --static`` shows for the step."""
    step = static_step("lenet5", 8, steps=4, repeats=1)
    static_conv1 = next(k for k in step["kernels"] if k["name"] == "conv_forward")
    (row,) = [r for r in _collect() if r["label"] == "conv1 fwd"]
    (launch,) = row["launches"]
    assert tuple(launch["grid"]) == tuple(static_conv1["grid"])
    assert tuple(launch["block"]) == tuple(static_conv1["block"])
    assert launch["model"] == static_conv1["model"]
    assert row["predicted_us"] == pytest.approx(static_conv1["model"]["predicted_us"])


# -- the command ---------------------------------------------------------------------------------


def test_static_kernels_json(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    assert bench.main(["--static", "--kernels", "--precision", "fp32,3xtf32", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["kind"] == "kernels" and result["batches"] == [64, 1024]     # --kernels' default batches
    assert result["precisions"] == ["fp32", "3xtf32"] and not result["measured"]
    assert len(result["rows"]) == 2 * 2 * 15 and result["assumptions"] and result["machine"]["sms"] == 132
    row = result["rows"][0]
    assert (row["batch"], row["precision"], row["label"], row["shape"]) == (64, "fp32", "conv1 fwd",
                                                                          "1x28x28 -> 6x28x28, 5x5 p2")
    assert row["shapes"] == {"x": [64, 1, 28, 28], "W": [6, 1, 5, 5], "y": [64, 6, 28, 28],
                             "stride": [1, 1], "padding": [2, 2]}
    assert row["predicted_us"] > 0 and row["gpucnn_us"] is None and row["launches"][0]["kernel"] == "conv_forward"
    assert {(t["batch"], t["precision"]) for t in result["totals"]} == {(64, "fp32"), (64, "3xtf32"),
                                                                        (1024, "fp32"), (1024, "3xtf32")}
    assert "[lenet5 GEMM kernels, batch 1024, precision 3xtf32]" in text and "no GPU" in text
    assert "66.9 TFLOP/s" in text                                     # the model's assumptions


@pytest.mark.parametrize("argv, message", [
    (["--static", "--kernels", "--precision", "fp8"],
     "precision must be one of 'fp32', 'tf32', '3xtf32', 'bf16', 'fp16'"),
    (["--static", "--kernels", "--precision", ","], "--precision needs a comma-separated list"),
    (["--static", "--precision", "fp32"], "--precision goes with --kernels"),
    (["--static", "--kernels", "--model", "resnet_mini"], "--kernels takes a model of plain layers; resnet_mini"),
    (["--static", "--kernels", "--model", "all"], "--kernels takes one model"),
    (["--kernels", "--device", "cpu"], "--kernels times CUDA kernels: use --device cuda"),
    (["--kernels", "--time-to-accuracy", "0.9"], "--kernels and --time-to-accuracy are separate runs"),
])
def test_kernels_arguments(argv, message, capsys):
    assert bench.main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("device", ["auto", "cuda"])
def test_kernels_without_a_gpu_says_what_is_missing(device, monkeypatch, capsys):
    monkeypatch.setattr(backend, "cuda_available", lambda: False)
    why = "CuPy is not installed: pip install 'gpucnn[cuda12]'"
    monkeypatch.setattr(backend, "cuda_unavailable_reason", lambda: why)
    assert bench.main(["--kernels", "--device", device]) == 2
    err = capsys.readouterr().err
    assert "CuPy is not installed: pip install 'gpucnn[cuda12]'" in err
    if device == "auto":
        assert "--kernels needs a CUDA GPU" in err and "gpucnn bench --static --kernels" in err


def test_kernels_parse_in_the_cli():
    from gpucnn import cli

    with pytest.raises(SystemExit) as info:
        cli.main(["bench", "--kernels", "--precision", "fp32,bf16", "--batch-sizes", "64", "1024", "--help"])
    assert info.value.code == 0
    assert kernels.parse_precisions("all") == ["fp32", "tf32", "3xtf32", "bf16", "fp16"]
    assert kernels.parse_precisions(" bf16, fp32,bf16") == ["bf16", "fp32"]


# -- measured on the stand-in: the capture path, PyTorch missing ---------------------------------


class CpuTimer(Timer):
    """The CPU clock in place of CUDA events (the stand-in has none)."""

    def __init__(self, device, warmup, repeats):
        super().__init__("cpu", warmup, repeats)


def test_every_row_is_captured_as_a_graph_and_torch_missing_leaves_its_columns_empty(monkeypatch):
    """Run as on a GPU but on the stand-in: each row's calls are captured (no allocation, no CuPy
    operation, no sync in them, in every mode) and replayed; without PyTorch, a note and '-'."""
    monkeypatch.setattr(kernels, "Timer", CpuTimer)
    lines = []
    with standin.installed(standin.Recorder()):
        status, result = kernels.run("lenet5", [4], ["fp32", "tf32", "bf16", "3xtf32"], warmup=1, repeats=2,
                                     torch=None, env={"gpu": "stand-in"}, log=lines.append)
    assert status == 0
    measured = [r for r in result["rows"] if not r["refused"]]
    assert len(measured) == 60 and all(r["gpucnn_method"] == "graph" and r["gpucnn_us"] is not None
                                       for r in measured)
    assert all(r["gpucnn_us"] > 0 for r in measured if not r["fused"])   # a fused row's is a difference
    assert all(r["torch_us"] is None and r["ratio"] is None for r in result["rows"])
    assert "  PyTorch is not available: the cuDNN, ratio and check columns show '-'" in lines
    assert any(line.startswith("  (the predictions are an H200's") for line in lines)
    table = lines[lines.index("[lenet5 GEMM kernels, batch 4, precision fp32]") + 2].split()
    assert table[10:] == ["-", "-"]                                    # cuDNN us, ratio


def test_a_call_that_cannot_be_captured_is_timed_eagerly_and_says_why(monkeypatch):
    monkeypatch.setattr(kernels, "Timer", CpuTimer)
    calls = []
    with standin.installed(standin.Recorder()) as cp:
        def allocates():
            calls.append(1)
            return cp.empty(4, np.float32)
        seconds, method = kernels.GraphClock(warmup=1, repeats=2, calls=3).gpucnn(allocates)
    assert seconds >= 0 and method.startswith("eager (graph capture failed: RuntimeError: the call allocated 16 bytes")
    assert len(calls) == 1 + 1 + (1 + 2) * 3     # warm-up, the capture (refused at once), 3 timed x 3 calls


@pytest.mark.parametrize("value", [1.0, np.nan], ids=["off", "nan"])
def test_outputs_unlike_pytorchs_are_a_mismatch_and_fail_the_run(value, monkeypatch):
    """The stand-in's stubbed kernels leave zeros; a PyTorch side of ones (or NaN) is far off."""
    monkeypatch.setattr(kernels, "Timer", CpuTimer)
    monkeypatch.setattr(kernels, "TorchReference", lambda torch, clock: FakeReference(3.0, [np.float32(value)]))
    lines = []
    with standin.installed(standin.Recorder()):
        status, result = kernels.run("seed002_c1", [2], ["fp32"], warmup=0, repeats=1, torch=object(),
                                     env={"gpu": "NVIDIA H200"}, log=lines.append)
    assert status == 1 and all(r["mismatch"] for r in result["rows"])
    assert sum(line.endswith(" MISMATCH") for line in lines) == len(result["rows"]) == 6
    assert lines[-1].startswith("\n6 rows failed or do not match PyTorch: conv1 fwd (batch 2, fp32), ")


# -- on the emulator, against PyTorch on the CPU ---------------------------------------------------


@pytest.mark.cudasim
def test_rows_match_pytorch_in_every_mode_and_dx_replays():
    """The kernels on the emulator against PyTorch (CPU): the layouts and outputs of every row agree
    within the mode's tolerance, and the replayed input-gradient launches alone rewrite dL/dx."""
    torch = pytest.importorskip("torch")
    from backends import emulator_builder, skip_without_emulator

    skip_without_emulator()
    with standin.installed(standin.Recorder(), builder=emulator_builder):
        ref = kernels.TorchReference(torch, None, device="cpu")
        rows = kernels.collect("lenet5", [2], ["fp32", "tf32", "bf16"], reference=ref)
        checks = {(r["precision"], r["label"]): r["check"] for r in rows}
        assert len(checks) == 45 and not any(r["mismatch"] or r["failed"] for r in rows), checks
        assert max(v for (m, _), v in checks.items() if m == "fp32") < 1e-5

        g = kernels.gemm_layers(models.build("lenet5", device="cuda"), 2, "cuda")[1]           # conv2
        rng = np.random.default_rng(0)
        x = backend.to_device(rng.standard_normal(g.x_shape).astype(np.float32), "cuda")
        dz = backend.to_device(rng.standard_normal(g.out_shape()).astype(np.float32), "cuda")
        forward, weight_only, both = kernels._calls(g, x, g.layer.params["W"], g.layer.params["b"], dz, Workspace())
        saved = forward()[1]
        with kernels.recorded_launches() as w:
            weight_only(saved)
        with kernels.recorded_launches() as wx:
            dx = both(saved)[0]
        want = backend.asnumpy(dx).copy()
        extra = kernels._extra(wx, w)
        assert [launch.kernel for launch in extra] == ["conv_backward_input"]
        dx[...] = 0
        for launch in extra:
            launch.replay()
        np.testing.assert_array_equal(backend.asnumpy(dx), want)

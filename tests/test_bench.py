"""gpucnn bench runs end to end on the CPU (timings themselves are never asserted)."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

from gpucnn import bench


def test_step_table_with_torch_reference(capsys, tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    rc = bench.main(["--device", "cpu", "--batch-sizes", "8", "--repeats", "2", "--warmup", "1",
                     "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "forward+loss+backward+SGD" in text and "x " in text  # a ratio was printed
    assert "0:Conv2D+ReLU+MaxPool2D(1, 28, 28)" in text and "7:Dense+ReLU(400,)" in text
    result = json.loads(out.read_text())
    assert result["steps"][0]["batch"] == 8 and result["steps"][0]["torch_s"] > 0


@pytest.mark.parametrize("model", ["zhang2016", "seed002_c2"])
def test_first_losses_agree_with_torch_for_other_models(model, capsys):
    pytest.importorskip("torch")
    assert bench.main(["--device", "cpu", "--model", model, "--batch-sizes", "4", "--repeats", "1",
                       "--warmup", "0", "--no-layers"]) == 0


def test_time_to_accuracy_reports_each_seed(capsys):
    rc = bench.main(["--device", "cpu", "--time-to-accuracy", "0.5", "--seeds", "2",
                     "--eval-every", "20", "--no-torch"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "seed 0: 50.00% after" in text and "seed 1:" in text and "mean" in text


def test_time_to_accuracy_trains_with_the_shifts_gpucnn_train_uses(monkeypatch):
    """The figure is for ``gpucnn train``'s recipe, its random shifts included (its first H200 runs
    trained without them)."""
    from gpucnn.bench import accuracy
    from gpucnn.train import TrainConfig
    from gpucnn.train.loop import augment_spec

    class Seen(Exception):
        pass

    def spy(*args, **kwargs):
        raise Seen(kwargs.get("augment"))

    monkeypatch.setattr(accuracy, "Trainer", spy)
    with pytest.raises(Seen) as got:
        accuracy.time_to_accuracy(0.5, [3], "cpu", log=lambda s: None)
    want = augment_spec(TrainConfig(model="lenet5", seed=3).resolved())
    assert want is not None and got.value.args[0] == want


@pytest.mark.parametrize("argv, message", [
    (["--batch-sizes", "0"], "--batch-sizes must be >= 1, got 0"),
    (["--repeats", "0"], "need --repeats >= 1"),
    (["--time-to-accuracy", "1.5"], "need 0 < --time-to-accuracy < 1"),
])
def test_bad_arguments(argv, message, capsys):
    assert bench.main(["--device", "cpu", "--no-torch"] + argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("where, message", [
    ("missing/out.json", "missing is not an existing directory"),
    (".", "is a directory, not a file"),
])
def test_a_bad_json_path_is_refused_before_the_benchmark_runs(where, message, capsys, tmp_path):
    """--json into a missing directory failed only after the whole benchmark had run."""
    path = tmp_path / where
    assert bench.main(["--device", "cpu", "--no-torch", "--batch-sizes", "4", "--repeats", "1", "--warmup", "0",
                       "--no-layers", "--json", str(path)]) == 2
    out, err = capsys.readouterr()
    assert f"gpucnn bench: --json {path}: " in err and message in err
    assert "train step" not in out                     # nothing was measured


def test_missing_torch_is_said_once(monkeypatch, capsys):
    """Without PyTorch its columns were "-" with no word why."""
    monkeypatch.setattr(bench, "try_import_torch", lambda: (None, "ModuleNotFoundError: No module named 'torch'"))
    argv = ["--device", "cpu", "--batch-sizes", "4", "8", "--repeats", "1", "--warmup", "0", "--no-layers"]
    assert bench.main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("note: PyTorch's columns show '-': it cannot be imported (ModuleNotFoundError: "
                     "No module named 'torch')") == 1, err
    assert bench.main(argv + ["--no-torch"]) == 0
    assert "PyTorch" not in capsys.readouterr().err


def test_threads_above_the_cores_are_capped_with_a_note(monkeypatch, capsys):
    from gpucnn import threads

    before = threads.get_num_threads()
    monkeypatch.setattr(threads, "usable_cores", lambda: 2)
    try:
        assert bench.main(["--device", "cpu", "--no-torch", "--batch-sizes", "4", "--repeats", "1", "--warmup", "0",
                           "--no-layers", "--threads", "300"]) == 0
        assert "gpucnn bench: note: --threads 300 is more than the 2 CPU core(s)" in capsys.readouterr().err
        assert threads.get_num_threads() == 2
        assert bench.main(["--device", "cpu", "--no-torch", "--threads", "0"]) == 2
        assert "--threads must be >= 1, got 0" in capsys.readouterr().err
    finally:
        monkeypatch.undo()
        threads.set_num_threads(before)


# -- gpucnn bench --static: the CUDA step's launches without a GPU ---------------------------


@pytest.fixture(scope="module")
def lenet5_static(tmp_path_factory):
    out = tmp_path_factory.mktemp("static") / "static.json"
    text = io.StringIO()
    with contextlib.redirect_stdout(text):
        assert bench.main(["--static", "--batch-sizes", "64", "--repeats", "2", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    result["printed"] = text.getvalue()
    return result


def test_static_predicted_time_of_conv1_forward_by_hand(lenet5_static):
    """lenet5's conv1 forward at batch 64, worked by hand: 1 -> 6 channels, 5x5, 28x28 out (padding 2)."""
    row = lenet5_static["steps"][0]
    k = next(k for k in row["kernels"] if k["name"] == "conv_forward")
    p = k["model"]
    assert p["flops"] == 2 * 6 * 1 * 5 * 5 * 28 * 28 * 64 == 15_052_800
    # x (1, 28, 28, 64), W (6, 1, 5, 5), b (6), y and z (6, 28, 28, 64), float32, each once
    assert p["bytes"] == 4 * (28 * 28 * 64 + 150 + 6 + 2 * 6 * 28 * 28 * 64) == 2_609_776
    assert tuple(k["grid"]) == (784, 1, 1) and tuple(k["block"]) == (16, 2, 1)   # 8-row tiles: 6 channels
    # 32-thread blocks: 32 resident per SM (the block limit), 132 x 32 >= 784: one wave;
    # 784 x 32 threads >= 132 x 128 lanes: every lane busy
    assert p["blocks"] == 784 and p["waves"] == 1 and p["lane_fill"] == 1.0
    peak = 132 * 128 * 2 * 1.98e9                                    # 66.9 TFLOP/s
    assert p["compute_us"] == pytest.approx(15_052_800 / peak * 1e6, rel=1e-12)   # 0.225 us
    assert p["memory_us"] == pytest.approx(2_609_776 / 4.8e12 * 1e6, rel=1e-12)  # 0.544 us
    assert p["predicted_us"] == pytest.approx(2_609_776 / 4.8e12 * 1e6 + 1.5, rel=1e-12)
    total = row["predicted"]
    assert total["launches"] == row["launches"] and total["unmodelled"] == 0
    assert total["predicted_us"] == pytest.approx(sum(k["model"]["predicted_us"] for k in row["kernels"]))
    assert total["launch_us"] == pytest.approx(1.5 * row["launches"])


def test_predicted_time_of_a_tensor_core_gemm_by_hand():
    """conv2's forward at batch 1024 in bf16 on the tensor cores: 16 x 150 x (10*10*1024) MACs,
    the dense bf16 peak of 132 SMs x 4096 FLOP per clock x 1.98 GHz over the SMs the grid fills."""
    from gpucnn.bench import roofline

    M, Nn, K = 10 * 10 * 1024, 16, 6 * 5 * 5
    args = {"arrays": {"P": 4 * 6 * 14 * 14 * 1024, "Q": 4 * 16 * 150, "bias": 64, "out": 4 * M * Nn,
                       "zout": 4 * M * Nn},
            "scalars": {"M": M, "Nn": Nn, "K": K}}
    p = roofline.predict("gemm_tc_bf16_conv_fwd_n64", (1600, 1, 1), (128, 1, 1), args)
    assert p["flops"] == 2 * M * Nn * K
    assert p["lane_fill"] == 1.0 and p["compute_us"] == pytest.approx(
        2 * M * Nn * K / (132 * 4096 * 1.98e9) * 1e6, rel=1e-12)
    assert roofline.peak_tc_tflops("3xtf32") == pytest.approx(roofline.peak_tc_tflops("tf32") / 3)
    small = roofline.predict("gemm_tc_tf32_conv_fwd_n64", (33, 1, 1), (128, 1, 1), args)   # 33 of 132 SMs
    assert small["lane_fill"] == pytest.approx(0.25) and small["compute_us"] == pytest.approx(
        2 * M * Nn * K / (132 * 2048 * 1.98e9 * 0.25) * 1e6, rel=1e-12)
    # The issue floor from the main loop's SASS: 57.9 instructions per m16n8k16 HMMA (2048 MACs);
    # 1600 blocks x 4 warps fill all 528 schedulers; 3xtf32's HMMA does a third of tf32's 1024.
    assert p["issue_us"] is None                                             # no SASS figures given
    q = roofline.predict("gemm_tc_bf16_conv_fwd_n64", (1600, 1, 1), (128, 1, 1), args,
                         loop={"instructions_per_ffma": 57.9})
    issue = M * Nn * K / 2048 * 57.9 / (528 * 1.98e9) * 1e6                # 1.35 us, 6.6 x the compute
    assert q["issue_us"] == pytest.approx(issue, rel=1e-12) and issue > 6 * p["compute_us"]
    assert q["predicted_us"] == pytest.approx(issue + 1.5, rel=1e-12)
    few = roofline.predict("gemm_tc_3xtf32_conv_fwd_n64", (33, 1, 1), (128, 1, 1), args,
                           loop={"instructions_per_ffma": 44.0})
    assert few["issue_us"] == pytest.approx(M * Nn * K / (1024 / 3) * 44.0 / (33 * 4 * 1.98e9) * 1e6, rel=1e-12)


def test_static_prints_the_time_model_and_its_assumptions(lenet5_static):
    text = lenet5_static["printed"]
    for needle in ("132 SMs at 1.98 GHz", "FP32 SIMT peak 132 x 128 lanes x 2 FLOP/FMA = 66.9 TFLOP/s",
                   "HBM 4.8 TB/s", "1.5 us launch cost per kernel", "predicted = max(FLOPs",
                   "not modelled: latency chains"):
        assert needle in text, needle
    assert lenet5_static["assumptions"] and lenet5_static["machine"]["sms"] == 132
    assert "predicted step total:" in text and "for 20 launches per step" in text   # 27 before issue 25's fix 7
    line = next(s for s in text.splitlines() if s.strip().startswith("conv_forward") and "2.04" in s)
    # the issue floor, when the SASS was read: 7,526,400 MACs / 32 per FFMA x ~1.66 instructions per
    # FFMA over 528 schedulers (784 one-warp blocks, 4 schedulers on each of 132 SMs) at 1.98 GHz
    cols = line.split()[1:]
    assert cols[:6] + cols[7:] == ["15.053", "2609.8", "784", "1", "0.22", "0.54", "1.50", "2.04"]
    if cols[6] != "-":
        assert float(cols[6]) == pytest.approx(7_526_400 / 32 * 1.66 / (528 * 1980), abs=0.02)   # 0.37 us


def test_static_lenet5_step_is_within_the_launch_budget(lenet5_static):
    from gpucnn.bench.static import STEP_LAUNCH_BUDGET

    (row,) = lenet5_static["steps"]
    assert (row["model"], row["batch"]) == ("lenet5", 64)
    assert row["launches"] == len(row["kernels"]) <= STEP_LAUNCH_BUDGET["launches"]
    assert row["xp_ops"] == 0 and row["syncs"] == [] and row["copies"] == []   # nothing but gpucnn's kernels
    assert row["allocations"] == 0                      # every buffer reused: the step can be a CUDA graph
    names = [k["name"] for k in row["kernels"]]
    # lenet5's recipe shifts its batches: gathered and shifted in one launch; one optimizer launch in all
    assert names[0] == "gather_batch_augment" and names[-1] == "sgd_update"
    assert names.count("conv_forward") == 2 and names.count("conv_backward_input") == 1  # conv1 skips dx
    assert row["host_us"] > 0 and row["launcher_us_per_launch"] > 0
    assert row["per_epoch"] == ["asarray (host to device)"] * 2     # the learning-rate and augmentation-key tables
    g = row["graph"]                  # the CUDA graph: one graph launch, 5 copies in and out, nothing else
    assert g["captured"] and g["graph_launches"] == 1 and g["launches"] == 0 and g["copies"] == 5
    assert g["syncs"] == 0 and 0 < g["host_us"] < row["host_us"]


def test_static_report_reads_kernel_resources(lenet5_static):
    conv = [k for k in lenet5_static["steps"][0]["kernels"] if k["name"] == "conv_forward"]
    assert all(k["grid"][0] * k["grid"][1] * k["grid"][2] >= 132 for k in conv)  # fills an H200's SMs
    if lenet5_static["note"] is None and conv[0]["registers"] is not None:   # NVRTC + nvdisasm present
        assert conv[0]["spill_stores"] == 0 and conv[0]["instructions_per_ffma"] <= 2.0


def test_static_counts_cupy_operations_and_syncs():
    """The stand-in sees what CuPy would launch: a step with an xp op and a host read is reported so."""
    from gpucnn.bench import standin

    rec = standin.Recorder()
    with standin.installed(rec) as cp:
        a = cp.asarray(np.ones((3, 4), np.float32))
        b = (a * 2).sum(axis=0)
        a[0] = b
        float(b[0])
        c = a.reshape(12)          # a view: nothing
    kinds = [(e.kind, e.name) for e in rec.events]
    assert kinds == [("copy", "asarray (host to device)"), ("xp", "multiply"), ("xp", "add.reduce"),
                     ("xp", "copy (setitem)"), ("sync", "float(array)")]
    assert isinstance(c, standin.DeviceArray)


def test_static_all_models(capsys):
    assert bench.main(["--static", "--model", "all", "--batch-sizes", "8", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    for name in ("lenet5", "zhang2016", "resnet_mini"):
        assert f"[{name} train step, batch 8" in text


def test_model_all_needs_static(capsys):
    assert bench.main(["--model", "all", "--device", "cpu"]) == 2
    assert "--model all goes with --static only" in capsys.readouterr().err

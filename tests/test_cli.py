"""The command line: train / evaluate / predict / plot, and clear errors for bad input."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from gpucnn import cli
from gpucnn import data as gdata

ROOT = Path(__file__).resolve().parents[1]


def gpucnn(*args, check=True):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "gpucnn", *map(str, args)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"gpucnn {' '.join(map(str, args))} exited {proc.returncode}\n"
                             f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    # Adam at a constant lr on small batches learns enough from 2000 images for predict to work
    proc = gpucnn("train", "--epochs", "1", "--subset", "2000", "--device", "cpu", "--out", out,
                  "--optimizer", "adam", "--lr-schedule", "constant", "--batch-size", "16")
    return out, proc


def test_train_smoke(run_dir):
    out, proc = run_dir
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("device: cpu")
    last = lines[-1]
    assert last.startswith("done: lenet5 on mnist, 1 epoch, test accuracy "), last
    assert "images/s (cpu)" in last and f"checkpoint {out / 'checkpoint.npz'}" in last
    acc = float(last.split("test accuracy ")[1].split("%")[0])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1
    row = rows[0]
    for key in ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                "images_per_sec", "seconds", "lr"):
        assert key in row, key
    assert row["epoch"] == 1 and 0 <= row["test_accuracy"] <= 1
    assert row["test_accuracy"] * 100 == pytest.approx(acc, abs=0.006)
    assert row["test_accuracy"] > 0.6  # 2000 images, one epoch (measured: 83%)
    assert (out / "checkpoint.npz").is_file() and (out / "config.json").is_file()


def test_evaluate(run_dir):
    out, _ = run_dir
    proc = gpucnn("evaluate", out, "--device", "cpu")
    text = proc.stdout
    acc = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"]
    assert f"accuracy {100 * acc:.2f}%" in text
    assert "per-class accuracy" in text and "confusion matrix" in text
    rows = [line.split() for line in text.splitlines() if line[:9].strip().isdigit() and len(line.split()) == 11]
    assert len(rows) == 10
    cm = np.array([[int(v) for v in r[1:]] for r in rows])
    assert cm.sum() == 10000
    assert np.trace(cm) / 10000 == pytest.approx(acc)


def test_evaluate_a_float64_checkpoint(run_dir, tmp_path, capsys):
    """The dataset's float32 images are converted to a float64 model's dtype (they were a TypeError)."""
    from gpucnn import checkpoint, models

    out, _ = run_dir
    model, _ = checkpoint.restore_model(out)
    twin = models.build("lenet5", dtype=np.float64)
    twin.load_state_dict({k: v.astype(np.float64) for k, v in model.state_dict().items()})
    checkpoint.save_checkpoint(tmp_path, twin, model_name="lenet5", epoch=1, config={"dataset": "mnist"})
    assert cli.main(["evaluate", str(tmp_path), "--device", "cpu"]) == 0
    acc = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["test_accuracy"]
    assert f"accuracy {100 * acc:.2f}%" in capsys.readouterr().out


def test_a_closed_stdout_ends_quietly_as_unix_tools_do(tmp_path):
    """`gpucnn predict ... | head -1` printed "gpucnn: error: BrokenPipeError" and exited 1."""
    from PIL import Image

    from gpucnn import checkpoint, models

    checkpoint.save_checkpoint(tmp_path, models.build("lenet5"), model_name="lenet5", config={"dataset": "mnist"})
    Image.fromarray(gdata.load_dataset("mnist").test_images[0]).save(tmp_path / "digit.png")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for command in (["-m", "gpucnn", "predict"], ["-m", "gpucnn.inference"]):
        proc = subprocess.Popen([sys.executable, "-W", "ignore", *command, str(tmp_path), str(tmp_path / "digit.png")],
                                cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        proc.stdout.close()                 # the reader is gone before anything is written
        err = proc.stderr.read()
        assert proc.wait(timeout=120) == 128 + 13, err      # 141: as if killed by SIGPIPE
        assert err == "", err


def test_predict_png_of_another_size(run_dir, tmp_path):
    from PIL import Image

    out, _ = run_dir
    ds = gdata.load_dataset("mnist")
    img = ds.test_images[0]  # a 7
    label = int(ds.test_labels[0])
    Image.fromarray(img).resize((64, 64), Image.Resampling.BICUBIC).save(tmp_path / "digit.png")
    # dark ink on white paper, RGB: inverted automatically
    Image.fromarray(255 - img).resize((90, 90)).convert("RGB").save(tmp_path / "paper.png")
    proc = gpucnn("predict", out / "checkpoint.npz", tmp_path / "digit.png", tmp_path / "paper.png")
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 4
    for head, probs in ((lines[0], lines[1]), (lines[2], lines[3])):
        assert f"class {label}, probability " in head and f"({label})" not in head
        values = [float(tok.split(":")[1]) for tok in probs.split()]
        assert len(values) == 10 and sum(values) == pytest.approx(1, abs=1e-3)
        assert int(np.argmax(values)) == label


def test_load_image_inversion_and_centering(tmp_path):
    from PIL import Image

    from gpucnn.images import load_image

    a = np.zeros((50, 40), np.uint8)
    a[5:20, 3:10] = 255  # an off-centre white blob on black
    Image.fromarray(255 - a).save(tmp_path / "paper.png")  # black on white
    plain = load_image(tmp_path / "paper.png")
    assert plain.shape == (28, 28) and plain.dtype == np.uint8
    assert plain[0, 0] == 0 and plain.max() > 200  # inverted back to white on black
    with pytest.warns(UserWarning, match="no ink found"):   # forced not to invert: white paper, no ink
        assert load_image(tmp_path / "paper.png", invert="no", center=False)[0, 0] == 255
    c = load_image(tmp_path / "paper.png", center=True).astype(float)
    ys, xs = np.indices(c.shape)
    assert abs((c * ys).sum() / c.sum() - 14) < 1.5 and abs((c * xs).sum() / c.sum() - 14) < 1.5
    assert max(np.ptp(np.nonzero(c > 30)[0]), np.ptp(np.nonzero(c > 30)[1])) <= 21  # fits 20x20
    (tmp_path / "junk.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not an image"):
        load_image(tmp_path / "junk.png")


def test_plot_writes_pngs(run_dir, tmp_path):
    out, _ = run_dir
    proc = gpucnn("plot", out, "--out", tmp_path / "plots")
    for name in ("curves.png", "filters.png"):
        p = tmp_path / "plots" / name
        assert p.is_file() and p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(p) in proc.stdout


def test_nan_exit_status(tmp_path):
    proc = gpucnn("train", "--epochs", "1", "--subset", "256", "--test-subset", "100", "--lr", "1e30",
                  "--lr-schedule", "constant", "--momentum", "0", "--out", tmp_path / "nan", "--no-progress",
                  check=False)
    assert proc.returncode == cli.EXIT_NONFINITE
    assert "training loss is nan at epoch 1, step" in proc.stderr.lower()
    assert not (tmp_path / "nan" / "checkpoint.npz").exists()


# -- bad input, in process (fast) ---------------------------------------------------------------


@pytest.mark.parametrize("args,needle", [
    (["train", "--model", "resnet"], "argument --model: invalid choice: 'resnet'"),
    (["train", "--epochs", "0"], "argument --epochs: must be a positive integer, got '0'"),
    (["train", "--batch-size", "-1"], "argument --batch-size: must be a positive integer, got '-1'"),
    (["train", "--lr", "abc"], "argument --lr: must be a positive number, got 'abc'"),
    (["train", "--momentum", "1.5"], "argument --momentum: must be in [0, 1), got '1.5'"),
    (["train", "--optimizer", "adam", "--momentum", "0.9"], "momentum applies to sgd only"),
    (["train", "--dataset", "imagenet"], "argument --dataset: invalid choice: 'imagenet'"),
    (["train", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    (["train", "--precision", "fp8"], "argument --precision: precision must be one of 'fp32', 'tf32', '3xtf32', "
                                      "'bf16', 'fp16', got precision='fp8'"),
    (["train", "--precision", "FP32"], "argument --precision: precision must be one of"),
    (["train", "--resume", "/nonexistent/run"], "argument --resume: checkpoint not found: /nonexistent/run"),
    (["train", "--comm", "mpi"], "argument --comm: needs --distributed"),
    (["train", "--distributed", "--comm", "tcp"], "argument --comm: invalid choice: 'tcp'"),
    (["train", "--collective-timeout", "60"], "argument --collective-timeout: needs --distributed"),
    (["train", "--distributed", "--collective-timeout", "0"],
     "argument --collective-timeout: must be a positive number, got '0'"),
    (["train", "--distributed", "--collective-timeout", "inf"],
     "argument --collective-timeout: must be a positive number, got 'inf'"),
    (["train", "--distributed", "--resume", "/nonexistent/run"],
     "argument --resume: checkpoint not found: /nonexistent/run"),
    (["evaluate", "/nonexistent/checkpoint.npz"], "checkpoint not found: /nonexistent/checkpoint.npz"),
    (["plot", "/nonexistent/run"], "run directory not found: /nonexistent/run"),
    ([], "required: COMMAND"),
])
def test_bad_arguments(args, needle, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert needle in err, err
    assert "error:" in err


def _usage_error(args, capsys) -> str:
    """stderr of a ``gpucnn`` call that must end with a usage error (exit status 2)."""
    with pytest.raises(SystemExit) as info:
        cli.main([str(a) for a in args])
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    return err


def test_plot_says_what_it_cannot_draw(tmp_path, capsys):
    """An empty metrics.jsonl printed nothing and exited 0; a file as the run directory said "not found"."""
    from gpucnn import checkpoint, models

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    err = _usage_error(["plot", run], capsys)
    assert f"argument dir: nothing to plot: {run / 'metrics.jsonl'} holds no epochs and there is no checkpoint.npz" in err
    assert not (run / "curves.png").exists()
    checkpoint.save_checkpoint(run, models.build("lenet5"), model_name="lenet5", config={"dataset": "mnist"})
    assert cli.main(["plot", str(run)]) == 0                        # the filters still, and a note for the curves
    out, err = capsys.readouterr()
    assert f"wrote {run / 'filters.png'}" in out
    assert f"gpucnn plot: note: no curves.png: {run / 'metrics.jsonl'} holds no epochs" in err
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    err = _usage_error(["plot", a_file], capsys)
    assert f"argument dir: {a_file} is a file, not a run directory" in err and "not found" not in err
    err = _usage_error(["plot", run, "--out", a_file], capsys)
    assert f"argument --out: {a_file} is a file, not a directory" in err and "FileExistsError" not in err


def test_out_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    """--out naming a file gave a raw FileExistsError (exit 1)."""
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    common = ["train", "--subset", "64", "--test-subset", "32", "--epochs", "1", "--no-progress", "--out"]
    err = _usage_error([*common, a_file], capsys)
    assert f"the run directory (--out) {a_file} is a file, not a directory" in err and "FileExistsError" not in err
    err = _usage_error([*common, a_file / "run"], capsys)
    assert f"(--out) {a_file / 'run'} cannot be a directory: {a_file} is a file" in err
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("args,needle", [
    (["--subset", "999999"], "subset=999999 is larger than the mnist split it cuts (60000 images)"),
    (["--data-dir", "{empty}"], "does not hold it"),
])
def test_a_refused_run_leaves_no_run_directory(tmp_path, capsys, args, needle):
    """Errors found while loading the data used to leave an empty run directory behind."""
    (tmp_path / "empty").mkdir()
    args = [a.format(empty=tmp_path / "empty") for a in args]
    out = tmp_path / "runs" / "refused"
    with pytest.raises(SystemExit) if "--subset" in args else contextlib.nullcontext():
        code = cli.main(["train", *args, "--epochs", "1", "--no-progress", "--out", str(out)])
        assert code == 1
    assert needle in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "runs").exists()


def test_train_precision_flag_runs_the_mode_and_records_it(tmp_path, capsys):
    import json

    assert cli.main(["train", "--model", "seed002_c1", "--subset", "128", "--test-subset", "32", "--epochs", "1",
                     "--precision", "bf16", "--no-progress", "--out", str(tmp_path / "run")]) == 0
    assert "precision bf16;" in capsys.readouterr().out
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["precision"] for r in rows] == ["bf16"]


def test_a_batch_larger_than_the_data_says_the_batch_used(tmp_path, capsys):
    """--batch-size 5000 on 2000 images ran one step of 2000 while the header said "batch 5000"."""
    assert cli.main(["train", "--subset", "100", "--test-subset", "32", "--batch-size", "500", "--epochs", "1",
                     "--no-progress", "--out", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert ("batch 100 (batch_size 500 is more than the 100 training images: one step of all of them)"
            in out), out
    assert "batch 500," not in out


def test_predict_with_a_missing_checkpoint(capsys):
    assert cli.main(["predict", "/nonexistent/checkpoint.npz", "x.png"]) == 2
    err = capsys.readouterr().err
    assert "gpucnn predict: error: argument checkpoint: checkpoint not found" in err, err


def test_cuda_requested_without_gpu(capsys):
    from gpucnn import backend

    if backend.cuda_available():
        pytest.skip("a GPU is available")
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--device", "cuda", "--subset", "64", "--epochs", "1"])
    assert info.value.code == 2
    assert "argument --device: device='cuda' but CUDA is not available" in capsys.readouterr().err


def test_resume_refuses_config_change_and_tampering(run_dir, tmp_path, capsys):
    out, _ = run_dir
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--resume", str(out), "--lr", "0.5", "--epochs", "2"])
    assert info.value.code == 2
    assert "cannot change the run's configuration when resuming: --lr 0.5 (checkpoint: 0.001)" in capsys.readouterr().err

    with np.load(out / "checkpoint.npz", allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    arrays["param/0.b"][0] += 1
    bad = tmp_path / "bad"
    bad.mkdir()
    with open(bad / "checkpoint.npz", "wb") as f:
        np.savez(f, **arrays)
    for argv in (["evaluate", str(bad)], ["train", "--resume", str(bad)]):
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 2
        assert "SHA-256 mismatch" in capsys.readouterr().err


def test_bench_is_wired(capsys):
    try:
        import gpucnn.bench  # noqa: F401
    except ModuleNotFoundError:
        with pytest.raises(SystemExit) as info:
            cli.main(["bench"])
        assert info.value.code == 2
        assert "gpucnn.bench is not available" in capsys.readouterr().err
    else:
        with pytest.raises(SystemExit) as info:
            cli.main(["bench", "--help"])
        assert info.value.code == 0


def test_cli_resume_bit_for_bit(tmp_path, capsys):
    common = ["--model", "seed002_c1", "--subset", "256", "--test-subset", "100", "--epochs", "2",
              "--no-progress", "--device", "cpu"]
    assert cli.main(["train", *common, "--out", str(tmp_path / "full")]) == 0
    assert cli.main(["train", *common, "--out", str(tmp_path / "part"), "--stop-after", "1"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "stopping after epoch 1 as asked; continue with --resume" in out[-2]
    assert out[-1].startswith("done: seed002_c1 on mnist, 1 epoch, 1 of 2 done,")
    assert cli.main(["train", "--resume", str(tmp_path / "part"), "--no-progress"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("resumed from") for line in out)
    assert out[-1].startswith("done: seed002_c1 on mnist, 1 epoch now (2), 2 of 2 done,")

    def stable(d):
        rows = [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("images_per_sec", "train_seconds", "seconds")} for r in rows]

    assert stable(tmp_path / "part") == stable(tmp_path / "full")
    with np.load(tmp_path / "part" / "checkpoint.npz") as a, np.load(tmp_path / "full" / "checkpoint.npz") as b:
        for k in b.files:
            if k != "__meta__":
                assert a[k].tobytes() == b[k].tobytes(), k


def test_the_issue_smoke_command_exactly(tmp_path):
    """`gpucnn train --epochs 1 --subset 2000`, defaults otherwise, ends with the summary line."""
    proc = gpucnn("train", "--epochs", "1", "--subset", "2000", "--out", tmp_path / "run")
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("done: lenet5 on mnist, 1 epoch, test accuracy ") and "images/s" in last


def test_distributed_without_mpiexec_is_one_process_bit_for_bit(tmp_path, capsys):
    """`gpucnn train --distributed` outside mpiexec runs as one process and equals the plain run."""
    common = ["--model", "seed002_c1", "--subset", "256", "--test-subset", "100", "--epochs", "1",
              "--no-progress", "--device", "cpu"]
    assert cli.main(["train", *common, "--out", str(tmp_path / "plain")]) == 0
    assert cli.main(["train", *common, "--distributed", "--out", str(tmp_path / "dist")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert "distributed: single, 1 rank; global batch 64" in out
    assert out[-1].startswith("done: seed002_c1 on mnist, 1 epoch,") and "images/s (cpu)," in out[-1]
    with np.load(tmp_path / "plain" / "checkpoint.npz") as a, np.load(tmp_path / "dist" / "checkpoint.npz") as b:
        for k in a.files:
            if k != "__meta__":
                assert a[k].tobytes() == b[k].tobytes(), k


@pytest.mark.parametrize("flags, expected", [([], True), (["--no-cuda-graph"], False)])
def test_cuda_graph_flag_reaches_the_trainer(flags, expected, monkeypatch, tmp_path):
    """CUDA graphs are on unless --no-cuda-graph (they matter on a GPU; the CPU steps are eager anyway)."""
    from gpucnn.train import trainer as trainer_mod

    seen = []
    real_init = trainer_mod.Trainer.__init__

    def init(self, *a, **k):
        real_init(self, *a, **k)
        seen.append(self.cuda_graph)

    monkeypatch.setattr(trainer_mod.Trainer, "__init__", init)
    assert cli.main(["train", "--device", "cpu", "--subset", "64", "--test-subset", "64", "--epochs", "1",
                     "--no-progress", "--out", str(tmp_path / "run")] + flags) == 0
    assert seen == [expected]


@pytest.mark.parametrize("old", ["--cuda-graph", "--no-launch-plan"])
def test_the_old_replay_flags_are_gone(old, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", old])
    assert info.value.code == 2 and f"unrecognized arguments: {old}" in capsys.readouterr().err


def _interrupt_at_epoch(monkeypatch, which):
    """Ctrl-C in the middle of epoch ``which`` (1-based) of the next training run."""
    from gpucnn.train import Trainer

    real = Trainer.run_steps

    def run_steps(self, x, y, order, epoch, *args, **kwargs):
        if epoch + 1 == which:
            raise KeyboardInterrupt
        return real(self, x, y, order, epoch, *args, **kwargs)

    monkeypatch.setattr(Trainer, "run_steps", run_steps)


def test_ctrl_c_in_the_first_epoch_says_nothing_was_saved(monkeypatch, capsys, tmp_path):
    _interrupt_at_epoch(monkeypatch, 1)
    rc = cli.main(["train", "--subset", "64", "--test-subset", "64", "--epochs", "2", "--no-progress",
                   "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 130
    assert "interrupted during epoch 1, before any checkpoint was written: there is nothing to resume" in err
    assert not (tmp_path / "run" / "checkpoint.npz").exists()


def test_ctrl_c_later_names_the_checkpoint_kept(monkeypatch, capsys, tmp_path):
    _interrupt_at_epoch(monkeypatch, 2)
    rc = cli.main(["train", "--subset", "64", "--test-subset", "64", "--epochs", "3", "--no-progress",
                   "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 130
    assert "interrupted during epoch 2;" in err and "(after epoch 1) is kept" in err
    assert f"gpucnn train --resume {tmp_path / 'run'}" in err


def test_resuming_a_cosine_run_with_more_epochs_says_what_the_schedule_does(capsys, tmp_path):
    out = tmp_path / "run"
    assert cli.main(["train", "--subset", "64", "--test-subset", "64", "--epochs", "2", "--no-progress",
                     "--out", str(out)]) == 0
    capsys.readouterr()
    assert cli.main(["train", "--resume", str(out), "--epochs", "4", "--no-progress"]) == 0
    text = capsys.readouterr().out
    # lr 0.05: the 2-epoch schedule had decayed to 0; the 4-epoch one is back at half of lr
    assert ("note: epochs changed from 2 to 4: the cosine schedule now spans 4 epochs, so epoch 3 starts "
            "at lr 0.025 (the 2-epoch schedule was at 0 there) and decays to 0 by epoch 4") in text


def test_data_line_names_the_copy_used(capsys, tmp_path):
    assert cli.main(["train", "--subset", "64", "--test-subset", "64", "--epochs", "1", "--no-progress",
                     "--out", str(tmp_path / "run")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("data: "))
    assert "data: mnist, 64 training / 64 test images of 1x28x28, 10 classes (first 64 training images), from " in line
    assert Path(line.rsplit(", from ", 1)[1]).is_dir()


def test_sigterm_stops_like_ctrl_c_and_names_the_checkpoint(tmp_path):
    """timeout, Slurm, systemd and docker stop send SIGTERM: the run says what is kept and how to go on,
    exits 143 (128 + SIGTERM), and no micro-batch worker prints a traceback."""
    import signal

    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-m", "gpucnn", "train", "--subset", "1024", "--test-subset", "64",
                             "--epochs", "100", "--batch-size", "256", "--no-progress", "--out", str(out)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for line in proc.stdout:
            if line.startswith("epoch 1/100"):
                break
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == cli.EXIT_TERMINATED == 143, err
    assert "gpucnn: error: stopped by SIGTERM during epoch " in err
    assert f"is kept: continue with gpucnn train --resume {out}" in err
    assert "Traceback" not in err


def test_a_broken_pipe_that_is_not_stdout_is_an_error(tmp_path):
    """Only standard output's reader going away ends quietly; an EPIPE from any other pipe is a failure
    and says so (a review found every BrokenPipeError turned into a silent exit 141)."""
    code = ("import sys\nfrom gpucnn import cli\n"
            "def broken(args, parser):\n    raise BrokenPipeError(32, 'Broken pipe')\n"
            "cli._cmd_evaluate = broken\n"
            "p = cli.build_parser\n"
            "def build(argv):\n    parser = p(argv)\n    for a in parser._actions:\n"
            "        if hasattr(a, 'choices') and isinstance(a.choices, dict) and 'evaluate' in a.choices:\n"
            "            a.choices['evaluate'].set_defaults(func=broken)\n    return parser\n"
            "cli.build_parser = build\n"
            "sys.exit(cli.main(['evaluate', 'nowhere']))\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "BrokenPipeError" in proc.stderr


@pytest.mark.parametrize("distributed", [[], ["--distributed"]], ids=["single", "distributed"])
def test_threads_apply_to_the_run_and_are_put_back(tmp_path, monkeypatch, distributed):
    """`--threads` sets the NumPy path's threads for the run (with `--distributed` too: it was once
    parsed and ignored there), and the run puts the previous count back when it ends."""
    from gpucnn import threads
    from gpucnn.train import Trainer

    before = threads.get_num_threads()
    monkeypatch.setattr(threads, "usable_cores", lambda: 8)
    seen = []
    real = Trainer.run_steps

    def run_steps(self, *a, **k):
        seen.append(threads.get_num_threads())
        return real(self, *a, **k)

    monkeypatch.setattr(Trainer, "run_steps", run_steps)
    try:
        threads.set_num_threads(1)
        assert cli.main(["train", "--model", "seed002_c1", "--subset", "128", "--test-subset", "50", "--epochs", "1",
                         "--no-progress", "--device", "cpu", "--threads", "3",
                         "--out", str(tmp_path / "run")] + distributed) == 0
        assert seen == [3] and threads.get_num_threads() == 1
    finally:
        threads.set_num_threads(before)


def test_collective_timeout_covers_the_config_broadcast(tmp_path, monkeypatch):
    """`--collective-timeout` applies from the first collective on: rank 0's configuration broadcast
    (a rank 0 stuck reading its config used to be waited for under the default timeout)."""
    from gpucnn.train import parallel

    seen, make = [], parallel.communicator

    def communicator(*args, **kwargs):
        comm = make(*args, **kwargs)
        broadcast = comm.broadcast

        def recording(buf, root=0):
            seen.append(comm.timeout)
            return broadcast(buf, root)

        comm.broadcast = recording
        return comm

    monkeypatch.setattr(parallel, "communicator", communicator)
    assert cli.main(["train", "--model", "seed002_c1", "--subset", "128", "--test-subset", "64", "--epochs", "1",
                     "--no-progress", "--device", "cpu", "--distributed", "--collective-timeout", "7",
                     "--out", str(tmp_path / "run")]) == 0
    assert seen and seen[0] == 7.0, seen

"""The run directory under a hostile user: two runs on one directory, a damaged metrics.jsonl, a full
disk, the temporary files of a killed run (gpucnn/train/rundir.py, loop.py, plots.py, inference.py)."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections import namedtuple

import numpy as np
import pytest

from gpucnn import checkpoint as ck
from gpucnn import cli
from gpucnn import data as gdata
from gpucnn.train import (MetricsWarning, RunDir, RunDirInUse, RunDirWriteError, TrainConfig, Trainer,
                          default_out_dir, read_metrics, rundir, train)


@pytest.fixture(scope="module")
def mnist():
    return gdata.load_dataset("mnist")


def _cfg(**kw):
    base = dict(model="seed002_c1", epochs=2, batch_size=64, subset=256, test_subset=100, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def _train(mnist, out, config=None, **kw):
    return train(config, data=mnist, device="cpu", out_dir=out, progress=False, log=None, **kw)


def _no_steps(monkeypatch):
    """Make any training step fail the test: what must stop before training stops before it."""
    def run_steps(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(Trainer, "run_steps", run_steps)


# -- one owner per run directory --------------------------------------------------------------------


def test_a_second_run_on_an_owned_directory_stops_at_once(mnist, tmp_path, monkeypatch):
    out = tmp_path / "dup"
    with RunDir(out, model="lenet5"):                       # a run owns the directory
        assert f"pid {os.getpid()} on " in (out / rundir.LOCK_NAME).read_text()
        _no_steps(monkeypatch)
        with pytest.raises(RunDirInUse, match=rf"{out} is in use by another training run \(pid {os.getpid()} on "):
            _train(mnist, out, _cfg(seed=2))
        assert sorted(os.listdir(out)) == [rundir.LOCK_NAME]     # nothing written by the second run
        with pytest.raises(RunDirInUse, match="is in use"):
            RunDir(out, model="lenet5")
    monkeypatch.undo()
    assert _train(mnist, out, _cfg(epochs=1)).epochs_run == 1     # the owner gone, the directory is free
    with RunDir(None, resumed=ck.load_checkpoint(out)):       # --resume claims the directory it continues
        with pytest.raises(RunDirInUse, match="is in use"):
            _train(mnist, None, _cfg(epochs=2), resume=out)


def test_the_cli_names_the_directory_and_the_owners_pid(tmp_path, capsys):
    out = tmp_path / "dup"
    with RunDir(out, model="lenet5"):
        with pytest.raises(SystemExit) as info:
            cli.main(["train", "--subset", "64", "--test-subset", "64", "--epochs", "1", "--no-progress",
                      "--out", str(out)])
    assert info.value.code == cli.EXIT_USAGE
    assert f"{out} is in use by another training run (pid {os.getpid()} on " in capsys.readouterr().err


_HOLDER = textwrap.dedent("""
    import os, sys, time
    from gpucnn.train import RunDir
    run = RunDir(sys.argv[1], model="x")
    if os.fork() == 0:          # a child (a micro-batch worker) must not keep the claim alive
        print("child", flush=True)   # after the fork hooks ran in it (they close its copy of the lock)
        time.sleep(60)
        os._exit(0)
    print("claimed", flush=True)
    time.sleep(60)
""")


def test_the_claim_dies_with_its_process_not_with_its_children(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                            env=env, start_new_session=True)
    try:
        assert sorted(proc.stdout.readline().strip() for _ in range(2)) == ["child", "claimed"]
        with pytest.raises(RunDirInUse, match=f"pid {proc.pid} on "):
            RunDir(out)
        proc.kill()                          # SIGKILL: no cleanup runs; its forked child lives on
        proc.wait()
        with RunDir(out):                    # the kernel released the lock with the process
            pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_default_directories_are_claimed_atomically(tmp_path):
    """Two runs started in the same second get two directories (an exclusive mkdir each)."""
    a = default_out_dir("lenet5", tmp_path)
    b = default_out_dir("lenet5", tmp_path)
    assert a != b and a.is_dir() and b.is_dir() and b.name == f"{a.name}-2"


# -- a damaged metrics.jsonl ------------------------------------------------------------------------


def test_a_cut_metrics_line_is_set_aside_and_the_checkpoint_decides(mnist, tmp_path):
    out = tmp_path / "run"
    _train(mnist, out, _cfg(epochs=2))
    metrics = out / "metrics.jsonl"
    whole, saved = metrics.read_bytes(), ck.load_checkpoint(out).metrics
    metrics.write_bytes(whole[:-40])                     # a crash (or a full disk) cut the last line
    with pytest.warns(MetricsWarning, match=rf"{metrics}, line 2: not a JSON object .* the line is cut short; "
                                            rf"set aside in {out / rundir.SET_ASIDE_NAME}"):
        res = _train(mnist, None, _cfg(epochs=3), resume=out)
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3] == [r["epoch"] for r in res.metrics]
    assert read_metrics(out)[1] == saved                 # epoch 2's row, from the checkpoint
    assert (out / rundir.SET_ASIDE_NAME).read_bytes() == whole.splitlines(keepends=True)[1][:-40] + b"\n"


def test_metrics_rows_after_the_checkpoint_or_repeated_are_set_aside(mnist, tmp_path):
    """Two runs interleaved in one metrics.jsonl (before runs owned their directory): the resumed run
    keeps one row per epoch up to the checkpoint's and counts its epochs right."""
    out = tmp_path / "run"
    _train(mnist, out, _cfg(epochs=2))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    (out / "metrics.jsonl").write_text("\n".join([lines[0], lines[0], lines[1], lines[1],
                                                  lines[1].replace('"epoch": 2', '"epoch": 3')]) + "\n")
    with pytest.warns(MetricsWarning) as caught:
        res = _train(mnist, None, _cfg(epochs=3), resume=out)
    said = [str(w.message) for w in caught]
    assert any("line 2: epoch 1 again after epoch 1" in s for s in said)
    assert any("line 4: epoch 2 again after epoch 2" in s for s in said)
    assert any("line 5: epoch 3 is after the checkpoint's epoch 2" in s for s in said)
    assert [r["epoch"] for r in read_metrics(out)] == [1, 2, 3]
    assert res.summary().startswith("done: seed002_c1 on mnist, 1 epoch now (3), 3 of 3 done")
    assert len((out / rundir.SET_ASIDE_NAME).read_text().splitlines()) == 3


def test_cli_resume_and_plot_survive_a_cut_metrics_file(tmp_path, capsys):
    out = tmp_path / "run"
    args = ["--subset", "64", "--test-subset", "64", "--no-progress"]
    assert cli.main(["train", "--epochs", "2", "--out", str(out)] + args) == 0
    metrics = out / "metrics.jsonl"
    metrics.write_bytes(metrics.read_bytes()[:-40])
    assert cli.main(["plot", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"gpucnn: warning: {metrics}, line 2: not a JSON object" in err and "left out" in err
    assert err.count(f"{metrics}, line 2") == 1, err          # said once, not once per reading
    assert (out / "curves.png").stat().st_size > 0
    assert cli.main(["train", "--resume", str(out), "--stop-after", "2"] + args) == 0
    assert f"gpucnn: warning: {metrics}, line 2: not a JSON object" in capsys.readouterr().err


# -- a full disk, temporary files of killed runs ------------------------------------------------------

_Usage = namedtuple("_Usage", "total used free")


def _disk_free(monkeypatch, free):
    """Make the run directory's file system report ``free()`` bytes free."""
    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda path: _Usage(10 ** 12, 0, free()))


def test_no_room_for_a_checkpoint_stops_before_training(mnist, tmp_path, monkeypatch):
    _disk_free(monkeypatch, lambda: 100_000)        # seed002_c1 with momentum: a checkpoint takes more
    _no_steps(monkeypatch)
    with pytest.raises(RunDirWriteError, match=rf"no room for a checkpoint in {tmp_path / 'run'}: 0.1 MiB free, "
                                               r"a checkpoint takes about .* MiB; no checkpoint was written yet"):
        _train(mnist, tmp_path / "run", _cfg())


def test_a_disk_that_fills_up_is_found_before_the_write_and_the_last_checkpoint_named(mnist, tmp_path, monkeypatch):
    writes = []
    real = ck.save_checkpoint
    monkeypatch.setattr(ck, "save_checkpoint", lambda *a, **k: writes.append(1) or real(*a, **k))
    _disk_free(monkeypatch, lambda: 0 if writes else 10 ** 12)    # full after the first checkpoint
    out = tmp_path / "run"
    with pytest.raises(RunDirWriteError) as info:
        _train(mnist, out, _cfg(epochs=3))
    msg = str(info.value)
    assert f"no room for a checkpoint in {out}: 0.0 MiB free" in msg
    assert f"the last good checkpoint {out / 'checkpoint.npz'} (epoch 1) is kept" in msg
    assert f"continue with gpucnn train --resume {out}" in msg
    assert ck.load_checkpoint(out).epoch == 1 and len(writes) == 1


def test_a_failing_checkpoint_write_names_the_file_and_what_was_kept(tmp_path, monkeypatch, capsys):
    real = np.savez
    calls = []

    def savez(file, **arrays):      # the second checkpoint hits a full disk half-way
        calls.append(1)
        if len(calls) == 2:
            file.write(b"PK partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        real(file, **arrays)

    monkeypatch.setattr(ck.np, "savez", savez)
    out = tmp_path / "run"
    rc = cli.main(["train", "--subset", "64", "--test-subset", "64", "--epochs", "3", "--no-progress",
                   "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == cli.EXIT_FAILURE
    assert (f"gpucnn: error: cannot write {out / 'checkpoint.npz'} (No space left on device); the last good "
            f"checkpoint {out / 'checkpoint.npz'} (epoch 1) is kept") in err
    monkeypatch.undo()
    assert ck.load_checkpoint(out).epoch == 1
    assert sorted(os.listdir(out)) == sorted([rundir.LOCK_NAME, "checkpoint.npz", "config.json", "metrics.jsonl",
                                              "layers.jsonl"])


def test_a_failing_metrics_append_says_the_checkpoint_holds_the_row(mnist, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = open

    def full_open(path, mode="r", *args, **kwargs):
        if str(path) == str(out / "metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, mode, *args, **kwargs)

    monkeypatch.setattr("builtins.open", full_open)
    with pytest.raises(RunDirWriteError, match=rf"cannot write {out / 'metrics.jsonl'} \(No space left on device\); "
                                               rf"the checkpoint {out / 'checkpoint.npz'} \(epoch 1\) holds this "
                                               r"epoch's row, and --resume restores it"):
        _train(mnist, out, _cfg())


def test_claiming_a_directory_removes_the_temporary_files_of_killed_runs(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    stale = [out / ".checkpoint.npz.k1b2x9.tmp", out / ".metrics.jsonl.a8f0q.tmp"]
    for p in stale:
        p.write_bytes(b"half a file")
    other = out / ".curves.png.z9.tmp"          # not the run's own file (gpucnn plot may be writing it)
    other.write_bytes(b"x")
    said = []
    with RunDir(out, log=said.append):
        assert not any(p.exists() for p in stale) and other.exists()
    assert said == [f"note: removed 2 temporary file(s) a killed run left in {out}: .checkpoint.npz.k1b2x9.tmp, "
                    ".metrics.jsonl.a8f0q.tmp"]


def _full_disk_save(self, target, *args, **kwargs):
    """A figure's or image's save that writes the first bytes and then finds the disk full."""
    if isinstance(target, (str, os.PathLike)):
        with open(target, "wb") as f:
            f.write(b"\x89PNG")
    else:
        target.write(b"\x89PNG")
    raise OSError(errno.ENOSPC, "No space left on device")


def test_plot_leaves_no_empty_png_on_a_full_disk(tmp_path, monkeypatch, capsys):
    from matplotlib.figure import Figure

    out = tmp_path / "run"
    assert cli.main(["train", "--subset", "64", "--test-subset", "64", "--epochs", "1", "--no-progress",
                     "--out", str(out)]) == 0
    monkeypatch.setattr(Figure, "savefig", _full_disk_save)
    rc = cli.main(["plot", str(out)])
    monkeypatch.undo()
    assert rc == cli.EXIT_FAILURE
    assert f"No space left on device: '{out / 'curves.png'}'" in capsys.readouterr().err
    assert not any(p.name.endswith(".png") or p.name.endswith(".tmp") for p in out.iterdir())


def test_predict_save_input_leaves_no_empty_png_on_a_full_disk(mnist, tmp_path, monkeypatch, capsys):
    from PIL import Image

    import gpucnn as gc
    from gpucnn import inference

    Image.fromarray(mnist.test_images[0]).save(tmp_path / "digit.png")
    ck.save_checkpoint(tmp_path / "c.npz", gc.models.build("seed002_c1"), None, model_name="seed002_c1",
                       config={"dataset": "mnist"})
    monkeypatch.setattr(Image.Image, "save", _full_disk_save)
    rc = cli.main(["predict", str(tmp_path / "c.npz"), str(tmp_path / "digit.png"),
                   "--save-input", str(tmp_path / "seen")])
    monkeypatch.undo()
    assert rc == inference.EXIT_FAILURE
    assert f"No space left on device: '{tmp_path / 'seen' / 'digit_28x28.png'}'" in capsys.readouterr().err
    assert os.listdir(tmp_path / "seen") == []


def _have_mpi() -> bool:
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return False
    return shutil.which("mpiexec") is not None


@pytest.mark.skipif(not _have_mpi(), reason="needs mpiexec and mpi4py")
def test_every_rank_of_a_distributed_run_stops_cleanly_on_an_owned_directory(tmp_path):
    """Rank 0 finds the directory in use; every rank exits 2 with no traceback (the error is collective)."""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    with RunDir(out, model="lenet5"):
        proc = subprocess.run(["mpiexec", "-n", "2", sys.executable, "-m", "gpucnn", "train", "--distributed",
                               "--subset", "64", "--test-subset", "64", "--epochs", "1", "--no-progress",
                               "--out", str(out)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == cli.EXIT_USAGE, proc.stderr
    assert f"{out} is in use by another training run (pid {os.getpid()} on " in proc.stderr
    assert "Traceback" not in proc.stderr and "rank 1" not in proc.stderr

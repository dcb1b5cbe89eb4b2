"""The run directory under a hostile user: two runs on one directory (gpucnn/train/rundir.py, loop.py)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest

from gpucnn import checkpoint as ck
from gpucnn import cli
from gpucnn import data as gdata
from gpucnn.train import RunDir, RunDirInUse, TrainConfig, Trainer, default_out_dir, rundir, train


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


# -- item 1: one owner per run directory ----------------------------------------------------------


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
        assert proc.stdout.readline().strip() == "claimed"
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

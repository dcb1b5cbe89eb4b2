"""The device check's rehearsal, run by CI on every change (no GPU needed).

A lent GPU box has Python, NumPy, CuPy, PyTorch, pytest and pytest-timeout and
nothing else (no package index).  ``tests/gpu/bare/sitecustomize.py`` hides
every other package from a subprocess, so these tests see what that box sees:

* every command of ``tests/gpu/run_on_device.sh`` rehearses cleanly
  (``--rehearse``: each pytest command collects without an error -- the
  ``-m gpu`` suite, the parity files, the sanitizers' listed node ids -- each
  ``gpucnn bench`` command line parses, the ncu script parses);
* ``gpucnn train`` runs an epoch without tqdm, Pillow, matplotlib or threadpoolctl;
* the caps of the script's steps add up to its budget, and its results are
  named for ``bench/results/<gpu>-<date>/``.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "gpu" / "run_on_device.sh"
BARE = ROOT / "tests" / "gpu" / "bare"

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="the device check is a bash script")


def _bare_env(**extra):
    env = dict(os.environ, PYTHONPATH=f"{BARE}{os.pathsep}{ROOT}", PYTHONDONTWRITEBYTECODE="1", **extra)
    env.pop("GPUCNN_REQUIRE_MPI", None)
    return env


def test_the_bare_box_hides_the_optional_packages():
    """The simulation itself: a planted import of each hidden package fails, NumPy still imports."""
    code = ("import importlib.util, sys\n"
            "hidden = ['hypothesis', 'PIL', 'tqdm', 'matplotlib', 'threadpoolctl', 'onnx']\n"
            "assert all(importlib.util.find_spec(m) is None for m in hidden), hidden\n"
            "import numpy, gpucnn\n"
            "try:\n    import tqdm\nexcept ImportError:\n    print('hidden')\n")
    out = subprocess.run([sys.executable, "-c", code], env=_bare_env(), capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "hidden", out.stderr


def test_every_step_of_the_device_check_rehearses(tmp_path):
    out = subprocess.run(["bash", str(SCRIPT), "--rehearse"], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=_bare_env(OUT=str(tmp_path), PYTHON=sys.executable))
    summary = (tmp_path / "summary.txt").read_text()
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    steps = subprocess.run(["bash", str(SCRIPT), "--list"], capture_output=True, text=True).stdout.split()
    assert steps and all(re.search(rf"^{re.escape(s)}\s+ok\s", summary, re.M) for s in steps), summary
    assert "REHEARSAL: nothing ran on a GPU" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs.tar.gz", "run.txt", "summary.txt", "versions.txt"]


def test_the_caps_add_up_to_the_budget_and_the_files_fit_the_device_tool():
    text = SCRIPT.read_text()
    caps = {k: int(v) for k, v in re.findall(r"\[([a-z-]+)\]=(\d+)", re.search(r"declare -A CAP=\((.*?)\)", text).group(1))}
    steps = re.search(r"ALL_STEPS=\((.*?)\)", text).group(1).split()
    assert sorted(caps) == sorted(steps)
    assert sum(caps.values()) <= 480     # leaves a 15-minute lease room for a machine start and a rerun
    # the files $OUT holds after a full run: at most 8 come back from the device tool
    outputs = {"summary.txt", "run.txt", "versions.txt", "bench.json", "bench-kernels.json", "tta.json",
               "ncu-conv.txt", "logs.tar.gz"}
    assert all(name in text for name in outputs) and len(outputs) <= 8


def test_training_runs_on_the_bare_box(tmp_path):
    out = subprocess.run([sys.executable, "-m", "gpucnn", "train", "--epochs", "1", "--subset", "500", "--device",
                          "cpu", "--no-progress", "--out", str(tmp_path / "run")],
                         cwd=ROOT, env=_bare_env(), capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "done: lenet5 on mnist, 1 epoch" in out.stdout
    assert (tmp_path / "run" / "checkpoint.npz").exists()

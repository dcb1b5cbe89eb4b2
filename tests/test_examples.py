"""The scripts in examples/ run as documented (a quick subset), and do what their docstrings say."""
from __future__ import annotations

import json
import runpy
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _run_example(name, argv):
    return runpy.run_path(str(EXAMPLES / name), run_name="__example__")["main"](argv)


def test_zhang2016_example_is_the_seeds_plain_sgd(tmp_path, capsys):
    res = _run_example("train_zhang2016.py", ["--epochs", "1", "--subset", "8000", "--device", "cpu",
                                              "--out", str(tmp_path / "z")])
    cfg = json.loads((tmp_path / "z" / "config.json").read_text())
    assert (cfg["model"], cfg["optimizer"], cfg["momentum"], cfg["weight_decay"]) == ("zhang2016", "sgd", 0.0, 0.0)
    assert (cfg["lr"], cfg["lr_schedule"], cfg["warmup"], cfg["batch_size"]) == (2.0, "constant", 0, 16)
    assert cfg["augment"] is False                          # the seed's data, unshifted
    assert res.test_accuracy > 0.7         # 500 steps of plain SGD on the slow MSE loss: 87% on this machine
    assert "done: zhang2016 on mnist, 1 epoch," in capsys.readouterr().out


def test_custom_network_example_trains(tmp_path):
    res = _run_example("custom_network.py", ["--epochs", "1", "--subset", "1000", "--device", "cpu",
                                             "--out", str(tmp_path / "c")])
    assert res.epochs_run == 1 and (tmp_path / "c" / "checkpoint.npz").is_file()
    assert res.test_accuracy > 0.5


def test_idx_to_png_folder_writes_the_same_pixels(tmp_path, monkeypatch):
    import numpy as np

    import gpucnn as gc

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = _run_example("idx_to_png_folder.py", ["--train", "30", "--test", "10", "--out", str(tmp_path / "png")])
    folder = gc.data.folder.load_folder(out, progress=False, log=lambda m: None)
    mnist = gc.data.load_dataset("mnist")
    assert folder.in_shape == (1, 28, 28) and folder.classes == [str(d) for d in range(10)]
    order = np.argsort(mnist.train_labels[:30], kind="stable")     # the folder lists class by class
    np.testing.assert_array_equal(folder.train_images[:, 0], mnist.train_images[:30][order])
    np.testing.assert_array_equal(folder.train_labels, mnist.train_labels[:30][order])

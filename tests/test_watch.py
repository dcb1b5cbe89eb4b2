"""Watching a run (gpucnn/train/watch.py, views.py, plots.py): layers.jsonl, the TensorBoard event files read back
with TensorBoard's own reader, a real `tensorboard` server, and `gpucnn plot` on runs with and without the stats."""
from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from gpucnn import backend, cli, models
from gpucnn import checkpoint as ck
from gpucnn import random as grandom
from gpucnn.train import Trainer, read_metrics, train
from gpucnn.train.config import TrainConfig
from gpucnn.train.loop import make_optimizer
from gpucnn.train.options import RunOptions
from gpucnn.train.watch import DEFAULT_LOG_EVERY, HIST_BINS, LAYERS_NAME, Watch, read_layer_stats

pytest.importorskip("tensorboardX")
event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")

# 256 images, batch 64: 4 steps an epoch, 8 in all; --log-every 2 logs global steps 2, 4, 6, 8
TRAIN = ["train", "--subset", "256", "--test-subset", "100", "--epochs", "2", "--batch-size", "64", "--device", "cpu",
         "--no-progress", "--log-every", "2"]
LOGGED = [2, 4, 6, 8]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("watched") / "run"
    assert cli.main(TRAIN + ["--out", str(out), "--tensorboard"]) == 0
    return out


@pytest.fixture(scope="module")
def events(run):
    acc = event_accumulator.EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "histograms": 0,
                                                                              "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def _scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_epoch_scalars_equal_metrics_jsonl(run, events):
    rows = read_metrics(run)
    assert [r["epoch"] for r in rows] == [1, 2]
    for tag, key in (("loss/train", "train_loss"), ("accuracy/train", "train_accuracy"), ("loss/test", "test_loss"),
                     ("accuracy/test", "test_accuracy"), ("lr/epoch", "lr"), ("speed/images_per_sec", "images_per_sec")):
        got = _scalars(events, tag)
        assert [s for s, _ in got] == [4, 8], tag                      # the epoch's last global step
        np.testing.assert_allclose([v for _, v in got], [r[key] for r in rows], rtol=1e-6, err_msg=tag)


def test_per_step_records_equal_layers_jsonl(run, events):
    stats = read_layer_stats(run)
    assert [r["step"] for r in stats] == LOGGED and [r["epoch"] for r in stats] == [1, 1, 2, 2]
    names = [n for n, _, _ in models.build("lenet5").named_parameters()]
    assert all(list(r["layers"]) == names for r in stats)
    np.testing.assert_allclose([v for _, v in _scalars(events, "loss/step")], [r["loss"] for r in stats], rtol=1e-6)
    assert [s for s, _ in _scalars(events, "loss/step")] == LOGGED
    for name in names:
        got = _scalars(events, f"update_ratio/{name}")
        assert [s for s, _ in got] == LOGGED
        np.testing.assert_allclose([v for _, v in got], [r["layers"][name]["update_ratio"] for r in stats], rtol=1e-6)
    # the last logged step is the last step: its weight norms are the checkpoint's, and a step moved them
    params = ck.load_checkpoint(run).params
    for name in names:
        layer = stats[-1]["layers"][name]
        assert layer["size"] == params[name].size
        assert math.isclose(layer["weight_norm"], float(np.linalg.norm(params[name].astype(np.float64))), rel_tol=1e-5)
        assert layer["grad_norm"] > 0 and 0 < layer["update_ratio"] < 1


def test_histograms_are_the_weights(run, events):
    W = ck.load_checkpoint(run).params["0.W"].astype(np.float64)
    for tag in ("weights/0.W", "grads/0.W", "weights/11.b", "grads/11.b"):
        assert [h.step for h in events.Histograms(tag)] == LOGGED, tag
    h = events.Histograms("weights/0.W")[-1].histogram_value          # step 8: the checkpoint's weights
    assert h.num == W.size and sum(h.bucket) == W.size and len(h.bucket) == HIST_BINS
    assert math.isclose(h.min, W.min(), rel_tol=1e-6) and math.isclose(h.max, W.max(), rel_tol=1e-6)
    assert math.isclose(h.sum, W.sum(), rel_tol=1e-4, abs_tol=1e-5)
    assert math.isclose(h.sum_squares, (W ** 2).sum(), rel_tol=1e-5)
    expected, _ = np.histogram(W, bins=HIST_BINS, range=(W.min(), W.max()))
    assert np.abs(np.asarray(h.bucket) - expected).max() <= 1      # the same buckets (an edge value may move)


def test_images_text_hparams_and_stage_times(events):
    tags = events.Tags()
    assert {"filters", "confusion_matrix"} <= set(tags["images"])
    features = [t for t in tags["images"] if t.startswith("features/")]
    assert features == ["features/0_Conv2D_ReLU_MaxPool2D", "features/3_Conv2D_ReLU_MaxPool2D"]
    for tag in ["filters", "confusion_matrix"] + features:
        assert [i.step for i in events.Images(tag)] == [4, 8], tag
    f = events.Images("filters")[-1]
    assert (f.width, f.height) == (6 * 6 + 1, 5 + 2)                  # 6 grey 5x5 tiles in a row, 1-pixel borders
    fm = events.Images("features/0_Conv2D_ReLU_MaxPool2D")[-1]
    assert (fm.width, fm.height) == (6 * 15 + 1, 4 * 15 + 1)          # 4 test images x 6 channels of 14x14
    assert "config/text_summary" in tags["tensors"]
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert '"model": "lenet5"' in config and '"subset": 256' in config
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")
    for stage in ("0_Conv2D_ReLU_MaxPool2D", "7_Dense_ReLU", "11_Dense"):
        for pass_ in ("forward", "backward"):
            got = _scalars(events, f"time/{pass_}/{stage}")
            assert [s for s, _ in got] == [4, 8] and all(v > 0 for _, v in got)


def test_watching_changes_no_bits(run, tmp_path):
    """The statistics and the stage timing touch nothing the run computes: the same checkpoint without them."""
    cfg = TrainConfig(**{k: v for k, v in json.loads((run / "config.json").read_text()).items()})
    res = train(cfg, out_dir=tmp_path / "plain", progress=False, log=None,
                options=RunOptions(device="cpu", log_every=0))
    a, b = ck.load_checkpoint(run).params, ck.load_checkpoint(res.checkpoint).params
    assert sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    assert not (tmp_path / "plain" / LAYERS_NAME).exists()           # --log-every 0: no statistics
    assert not (tmp_path / "plain" / "tb").exists()


def test_a_resumed_run_continues_layers_jsonl(run, tmp_path):
    """Stopped after epoch 1, a row of the lost epoch 2 left behind, resumed: the rows of the uninterrupted run."""
    out = tmp_path / "r"
    assert cli.main(TRAIN + ["--out", str(out), "--stop-after", "1"]) == 0
    assert [r["step"] for r in read_layer_stats(out)] == [2, 4]
    with open(out / LAYERS_NAME, "a", encoding="utf-8") as f:
        f.write(json.dumps({"epoch": 2, "step": 6, "layers": {}}) + "\n")
    assert cli.main(["train", "--resume", str(out), "--no-progress", "--device", "cpu", "--log-every", "2"]) == 0
    assert read_layer_stats(out) == read_layer_stats(run)


def test_statistics_are_read_back_only_at_the_trainer_syncs(monkeypatch, tmp_path):
    """10 steps, a host read every 5, a logged step every 2: the 5 logged steps come back in 2 copies, made in
    at_sync, none in the step hooks."""
    from gpucnn.train import watch as watch_mod

    grandom.seed(0)
    model = models.build("lenet5")
    opt = make_optimizer(TrainConfig().resolved(), model)
    trainer = Trainer(model, models.make_loss("lenet5"), opt, batch_size=8, sync_every=5)
    watch = Watch(tmp_path, model, opt, steps_per_epoch=10, log_every=2)
    reads, where = [], []
    real = watch_mod.backend.asnumpy
    monkeypatch.setattr(watch_mod.backend, "asnumpy", lambda a: reads.append(where[-1] if where else "?") or real(a))
    for hook in ("before_step", "after_step", "at_sync"):
        fn = getattr(watch, hook)
        monkeypatch.setattr(watch, hook, lambda *a, _fn=fn, _h=hook: (where.append(_h), _fn(*a), where.pop()))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((80, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 80)
    try:
        trainer.run_steps(x, y, np.arange(80), 0, range(10), 10, watch=watch)
    finally:
        trainer.close()
        watch.close()
    assert reads == ["at_sync", "at_sync"]
    assert [r["step"] for r in read_layer_stats(tmp_path)] == [2, 4, 6, 8, 10]


@pytest.mark.parametrize("tensorboard", [None, True], ids=["layers.jsonl", "tensorboard"])
def test_on_the_gpu_path_watching_adds_no_synchronisation(tensorboard, tmp_path, capsys):
    """The CUDA path on the CuPy stand-in (gpucnn/bench/standin.py records every host synchronisation):
    10 steps, a host read every 5, a logged step every 2.  The trainer alone waits for the device twice
    (its two reads of the metric ring, at steps 5 and 10); watched, the statistics of the five logged steps
    come back in one more copy at each of those two points, right after the trainer's, with no device work
    between them: the host never waits anywhere else."""
    import re

    from gpucnn.bench import standin
    from gpucnn.bench.static import _dataset, _trainer

    def syncs(watched):
        rec = standin.Recorder()
        with standin.installed(rec) as cp:
            trainer = _trainer("lenet5", 16, "sgd")
            trainer.sync_every = 5
            x, y, order, spe = _dataset(cp, 16, 10)
            watch = Watch(tmp_path / str(watched), trainer.model, trainer.optimizer, steps_per_epoch=spe,
                          log_every=2, tensorboard=tensorboard) if watched else None
            rec.take()
            try:
                trainer.run_steps(x, y, order, 0, range(10), spe, watch=watch)
            finally:
                if watch is not None:
                    watch.close()
            events = rec.take()
        return re.findall("S+", "".join("S" if e.kind == "sync" else "." for e in events))

    (tmp_path / "True").mkdir()
    assert syncs(False) == ["SS", "SS"]
    assert syncs(True) == ["SSS", "SSS"]
    assert [r["step"] for r in read_layer_stats(tmp_path / "True")] == [2, 4, 6, 8, 10]
    capsys.readouterr()          # tensorboardX's notes on the stand-in's unwritten (garbage) memory


def test_default_log_every_is_the_cli_default():
    args = cli.build_parser(["train"]).parse_args(["train"])
    assert args.log_every is None and RunOptions().log_every == DEFAULT_LOG_EVERY
    assert cli._run_options(args).log_every == DEFAULT_LOG_EVERY


def test_missing_tensorboardx_fails_before_training(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "tensorboardX", None)             # import tensorboardX -> ImportError
    with pytest.raises(SystemExit) as exc:
        cli.main(TRAIN + ["--out", str(tmp_path / "run"), "--tensorboard"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "argument --tensorboard: --tensorboard needs tensorboardX" in err
    assert 'pip install "gpucnn[tensorboard]"' in err
    assert not (tmp_path / "run").exists()                             # nothing trained, no directory


def test_tensorboard_dir_may_be_given(tmp_path):
    assert cli.main(["train", "--subset", "64", "--test-subset", "20", "--epochs", "1", "--device", "cpu",
                     "--no-progress", "--out", str(tmp_path / "run"), "--tensorboard", str(tmp_path / "logs")]) == 0
    assert list((tmp_path / "logs").glob("events.out.tfevents.*")) and not (tmp_path / "run" / "tb").exists()
    assert read_layer_stats(tmp_path / "run") == []                    # 1 step: none logged at the default


def test_plot_draws_every_view(run, tmp_path, capsys):
    from PIL import Image

    assert cli.main(["plot", str(run), "--out", str(tmp_path)]) == 0
    names = ["curves.png", "filters.png", "features.png", "confusion.png", "gradflow.png"]
    out = capsys.readouterr()
    assert out.out.split() == [w for n in names for w in ("wrote", str(tmp_path / n))]
    assert "note" not in out.err
    for n in names:
        with Image.open(tmp_path / n) as im:
            assert im.size[0] > 300 and im.size[1] > 150, n


def test_plot_on_an_old_run_says_what_is_missing(run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(run, old, ignore=shutil.ignore_patterns("tb", LAYERS_NAME, ".gpucnn-run.lock"))
    assert cli.main(["plot", str(old)]) == 0
    out = capsys.readouterr()
    assert [line.split()[-1] for line in out.out.splitlines()] == [
        str(old / n) for n in ("curves.png", "filters.png", "features.png", "confusion.png")]
    assert out.err.splitlines() == [f"gpucnn plot: note: no gradflow.png: {old} has no layers.jsonl (a run from "
                                    f"before per-layer statistics, or trained with --log-every 0)"]


def test_plot_says_when_the_test_set_is_not_found(run, tmp_path, capsys):
    """features.png and confusion.png need the run's test set: a --data-dir without it is said, not
    silently skipped."""
    empty = tmp_path / "nodata"
    empty.mkdir()
    assert cli.main(["plot", str(run), "--out", str(tmp_path / "p"), "--data-dir", str(empty)]) == 0
    out = capsys.readouterr()
    assert [line.split()[-1] for line in out.out.splitlines()] == [
        str(tmp_path / "p" / n) for n in ("curves.png", "filters.png", "gradflow.png")]
    (note,) = out.err.splitlines()
    assert note.startswith("gpucnn plot: note: no features.png, confusion.png: the run's test set (mnist) "
                           "was not found: ") and str(empty) in note and note.endswith("(--data-dir names where it is)")


def test_a_real_tensorboard_serves_the_scalar_tags(run):
    proc = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(run / "tb"),
                             "--host", "127.0.0.1", "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline, url, seen = time.monotonic() + 60, None, []
        while url is None and time.monotonic() < deadline and proc.poll() is None:
            line = proc.stderr.readline()
            seen.append(line)
            m = re.search(r"(http://127\.0\.0\.1:\d+)/", line)
            url = m.group(1) if m else None
        assert url is not None, "tensorboard did not say where it serves:\n" + "".join(seen)
        tags = None
        while time.monotonic() < deadline:
            with urllib.request.urlopen(url + "/data/plugin/scalars/tags", timeout=10) as r:
                tags = json.load(r)
            if tags.get(".", {}).get("accuracy/test"):
                break
            time.sleep(0.5)                                         # the first load of the logdir may still run
        assert {"loss/train", "loss/test", "accuracy/train", "accuracy/test", "lr/epoch", "speed/images_per_sec",
                "loss/step", "lr/step"} <= set(tags["."]), tags
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()

"""The training loop: determinism, bit-for-bit resume, NaN stop, schedules, evaluation."""
from __future__ import annotations

import json
import math

import warnings

import numpy as np
import pytest

import gpucnn as gc
from gpucnn import checkpoint as ck
from gpucnn import data as gdata
from gpucnn import losses
from gpucnn.train.rundir import MetricsWarning
from gpucnn.train import (NonFiniteLossError, TrainConfig, confusion_matrix, evaluate, learning_rate,
                          read_metrics, train)

TIMING = {"images_per_sec", "train_seconds", "seconds"}


@pytest.fixture(scope="module")
def mnist():
    return gdata.load_dataset("mnist")


def _cfg(**kw):
    base = dict(model="seed002_c1", epochs=2, batch_size=64, subset=512, test_subset=300, seed=5)
    base.update(kw)
    return TrainConfig(**base)


def _run(mnist, out, **kw):
    extra = {k: kw.pop(k) for k in ("resume", "stop_after", "loss") if k in kw}
    if "model" in kw and not isinstance(kw["model"], str):  # a custom network object
        extra["model"] = kw.pop("model")
        kw["model"] = "custom"
    return train(_cfg(**kw) if kw or "resume" not in extra else None, data=mnist, device="cpu",
                 out_dir=out, progress=False, log=None, **extra)


def _stable(rows):
    return [{k: v for k, v in r.items() if k not in TIMING} for r in rows]


def _weights(path):
    return ck.load_checkpoint(path).params


def _assert_same_weights(a, b):
    assert set(a) == set(b)
    for k in a:
        assert a[k].tobytes() == b[k].tobytes(), k


def test_metrics_file_and_fields(mnist, tmp_path):
    res = _run(mnist, tmp_path / "a", lr=0.05)
    rows = read_metrics(tmp_path / "a")
    assert [r["epoch"] for r in rows] == [1, 2]
    for r in rows:
        for key in ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                    "images_per_sec", "seconds", "lr"):
            assert key in r
        assert 0 <= r["test_accuracy"] <= 1 and 0 <= r["train_accuracy"] <= 1
        assert r["images_per_sec"] > 0 and r["seconds"] > 0
    assert rows[1]["test_accuracy"] > 0.3  # it learns something from 512 images
    assert res.test_accuracy == rows[-1]["test_accuracy"]
    assert res.epochs_run == 2 and res.checkpoint == tmp_path / "a" / "checkpoint.npz"
    assert ck.load_checkpoint(res.checkpoint).epoch == 2
    saved = json.loads((tmp_path / "a" / "config.json").read_text())
    assert (saved["lr"], saved["momentum"], saved["weight_decay"]) == (0.05, 0.9, 0.0)  # seed002_c1: no decay
    s = res.summary()
    assert s.startswith("done: seed002_c1 on mnist, 2 epochs, test accuracy ") and "images/s (cpu)" in s


def test_summary_counts_epochs_not_metrics_rows(mnist, tmp_path):
    """The summary said "len(metrics) epochs": "3 epochs" after resuming 2 more to 4 when metrics.jsonl was lost."""
    part = _run(mnist, tmp_path / "r", epochs=4, subset=128, test_subset=64, stop_after=2)
    assert ", 2 epochs, 2 of 4 done, test accuracy " in part.summary()
    assert (part.epochs_run, part.epochs_done) == (2, 2)
    (tmp_path / "r" / "metrics.jsonl").unlink()           # only the checkpoint's own row survives
    with pytest.warns(MetricsWarning, match=r"no metrics row for epoch\(s\) 1"):  # and says so, once
        rest = train(None, data=mnist, device="cpu", resume=tmp_path / "r", progress=False, log=None)
    assert rest.summary().startswith("done: seed002_c1 on mnist, 2 epochs now (3-4), 4 of 4 done, test accuracy ")
    assert len(rest.metrics) == 3 and (rest.epochs_run, rest.epochs_done) == (2, 4)
    with pytest.warns(MetricsWarning, match=r"no metrics row for epoch\(s\) 1"):  # still missing: said again
        again = train(None, data=mnist, device="cpu", resume=tmp_path / "r", progress=False, log=None)
    assert ", 0 epochs now, 4 of 4 done, " in again.summary()


def test_same_seed_same_run(mnist, tmp_path):
    a = _run(mnist, tmp_path / "a", optimizer="adam")
    b = _run(mnist, tmp_path / "b", optimizer="adam")
    assert _stable(a.metrics) == _stable(b.metrics)
    _assert_same_weights(_weights(a.checkpoint), _weights(b.checkpoint))
    c = _run(mnist, tmp_path / "c", optimizer="adam", seed=6)
    assert _stable(c.metrics) != _stable(a.metrics)


@pytest.mark.parametrize("schedule", ["cosine", "step", "constant"])
def test_resume_is_bit_for_bit(mnist, tmp_path, schedule):
    kw = dict(lr_schedule=schedule, lr_step=1)
    _run(mnist, tmp_path / "full", **kw)
    # 1 epoch of the same 2-epoch run, "interrupted", then --resume for the second
    first = _run(mnist, tmp_path / "part", stop_after=1, **kw)
    assert first.epochs_run == 1 and ck.load_checkpoint(tmp_path / "part").epoch == 1
    second = train(None, data=mnist, device="cpu", resume=tmp_path / "part", progress=False, log=None)
    assert second.epochs_run == 1
    assert _stable(read_metrics(tmp_path / "part")) == _stable(read_metrics(tmp_path / "full"))
    _assert_same_weights(_weights(tmp_path / "part"), _weights(tmp_path / "full"))
    a, b = ck.load_checkpoint(tmp_path / "part"), ck.load_checkpoint(tmp_path / "full")
    for k in b.optimizer["slots"]:
        assert a.optimizer["slots"][k].tobytes() == b.optimizer["slots"][k].tobytes()
    assert a.optimizer["step_count"] == b.optimizer["step_count"] == 16
    assert a.rng == b.rng


def test_resume_one_epoch_run_with_constant_lr(mnist, tmp_path):
    """`--epochs 1` then `--resume --epochs 2` equals `--epochs 2` (horizon-free schedule)."""
    full = _run(mnist, tmp_path / "full", lr_schedule="constant", optimizer="adam")
    _run(mnist, tmp_path / "part", lr_schedule="constant", optimizer="adam", epochs=1)
    cfg = TrainConfig.from_dict(ck.load_checkpoint(tmp_path / "part").config)
    cfg.epochs = 2
    train(cfg, data=mnist, device="cpu", resume=tmp_path / "part", progress=False, log=None)
    assert _stable(read_metrics(tmp_path / "part")) == _stable(full.metrics)
    _assert_same_weights(_weights(tmp_path / "part"), _weights(tmp_path / "full"))


def test_resume_into_other_dir_and_conflicts(mnist, tmp_path):
    _run(mnist, tmp_path / "part", stop_after=1)
    res = train(None, data=mnist, device="cpu", resume=tmp_path / "part", out_dir=tmp_path / "new",
                progress=False, log=None)
    assert [r["epoch"] for r in read_metrics(tmp_path / "new")] == [1, 2]
    assert ck.load_checkpoint(tmp_path / "part").epoch == 1  # the old run is left alone
    assert res.test_accuracy == read_metrics(tmp_path / "new")[-1]["test_accuracy"]
    with pytest.raises(ValueError, match="cannot change the run's configuration when resuming: lr=0.1"):
        train(_cfg(lr=0.1), data=mnist, device="cpu", resume=tmp_path / "part", progress=False, log=None)
    with pytest.raises(ValueError, match="already holds a checkpoint"):
        _run(mnist, tmp_path / "part")


@pytest.fixture(scope="module")
def one_epoch(mnist, tmp_path_factory):
    """A run stopped after its first epoch (a checkpoint to resume)."""
    out = tmp_path_factory.mktemp("one-epoch") / "run"
    _run(mnist, out, stop_after=1)
    return out / "checkpoint.npz"


def _with_rng(src, dst, rng):
    """``src`` with its metadata's ``rng`` replaced and the SHA-256 recomputed (a careful forger)."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    meta = json.loads(str(arrays.pop("__meta__")[()]))
    meta["rng"] = rng
    meta.pop("sha256")
    meta["sha256"] = ck._digest(meta, arrays)
    arrays["__meta__"] = np.array(json.dumps(meta, sort_keys=True))
    np.savez(dst, **arrays)
    return dst


_GOOD_STREAM = {"key": 1, "counter": 0}
_PCG64 = {"bit_generator": "PCG64", "state": {"state": 1, "inc": 3}, "has_uint32": 0, "uinteger": 0}


@pytest.mark.parametrize("rng,fragment", [
    ({"gpucnn": {"numpy": {"bit_generator": "PCG64", "state": "garbage"}, "stream": _GOOD_STREAM}},
     "rng 'gpucnn' is not a valid random state: 'numpy': expected a PCG64 generator state"),
    ({"gpucnn": {"numpy": dict(_PCG64, state={"state": 1.5, "inc": 3}), "stream": _GOOD_STREAM}},
     "rng 'gpucnn' is not a valid random state: 'numpy': 'state'.'state' must be an integer in [0, 2**128), got 1.5"),
    ({"gpucnn": {"numpy": _PCG64, "stream": {"key": -1, "counter": 0}}},
     "'stream'.'key' must be an integer in [0, 2**64), got -1"),
    ({"gpucnn": {"numpy": _PCG64, "stream": {"key": 1, "counter": "7"}}},
     "'stream'.'counter' must be an integer in [0, 2**64), got '7'"),
    ({"gpucnn": {"numpy": _PCG64, "stream": _GOOD_STREAM}, "shuffle": 5},
     "rng 'shuffle' is not a valid random state: expected a PCG64 generator state"),
    ({"gpucnm": 1}, "cannot resume: the checkpoint's rng has no 'gpucnn' state (it has ['gpucnm'])"),
    ("garbage", "malformed checkpoint metadata: 'rng' must be a JSON object, got str 'garbage'"),
], ids=["numpy-garbage", "numpy-float", "stream-negative", "stream-str", "shuffle", "missing", "not-an-object"])
def test_resume_refuses_an_rng_state_that_does_not_validate(mnist, one_epoch, tmp_path, rng, fragment):
    """Not silently ignored (the run would not be the one resumed), not a raw TypeError: the key is named."""
    bad = _with_rng(one_epoch, tmp_path / "checkpoint.npz", rng)
    with pytest.raises(ck.CheckpointError) as info:
        train(None, data=mnist, device="cpu", resume=bad, progress=False, log=None)
    assert str(info.value).startswith(f"{bad}: ") and fragment in str(info.value), str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.npz"]   # nothing written


def test_set_state_refuses_a_bad_state_and_changes_nothing():
    from gpucnn import random as grandom

    gc.seed(3)
    before = grandom.get_state()
    bad = {"numpy": before["numpy"], "stream": {"key": 1, "counter": True}}
    with pytest.raises(ValueError, match=r"'stream'.'counter' must be an integer in \[0, 2\*\*64\), got True"):
        grandom.set_state(bad)
    assert grandom.get_state() == before
    grandom.set_state(before)          # a state get_state wrote, and a bare generator state (format 1), load
    grandom.set_state(before["numpy"])


def test_nan_loss_stops_and_keeps_last_good_checkpoint(mnist, tmp_path, monkeypatch):
    real = losses.SoftmaxCrossEntropy._forward   # what training and evaluation both call
    calls = {"n": 0}

    def poisoned(self, logits, labels):
        calls["n"] += 1
        out = real(self, logits, labels)
        # epoch 1: 8 train steps + 1 eval batch; poison epoch 2's third step
        return out * np.float32("nan") if calls["n"] == 12 else out

    monkeypatch.setattr(losses.SoftmaxCrossEntropy, "_forward", poisoned)
    out = tmp_path / "run"
    with pytest.raises(NonFiniteLossError) as info:
        _run(mnist, out)
    err = info.value
    assert err.epoch == 2 and err.step == 3
    assert "epoch 2, step 3/8" in str(err) and "nan" in str(err).lower()
    assert str(out / "checkpoint.npz") in str(err)
    c = ck.load_checkpoint(out)
    assert c.epoch == 1  # the last good checkpoint, not overwritten
    assert [r["epoch"] for r in read_metrics(out)] == [1]
    assert all(np.isfinite(v).all() for v in c.params.values())


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_nan_before_first_checkpoint(mnist, tmp_path):
    with pytest.raises(NonFiniteLossError, match="epoch 1, step .*no checkpoint was written yet"):
        _run(mnist, tmp_path / "boom", model="lenet5", lr=1e30, lr_schedule="constant", momentum=0.0)
    assert not (tmp_path / "boom" / "checkpoint.npz").exists()


def test_zhang2016_trains_against_one_hot_targets(mnist, tmp_path):
    res = _run(mnist, tmp_path / "z", model="zhang2016", optimizer="sgd", lr=1.0, momentum=0.0,
               lr_schedule="constant", batch_size=16, epochs=2)
    first, second = res.metrics
    # squared error 1/2 ||sigmoid(z) - onehot||^2 summed over 10 outputs: below 10 * 1/2 and falling
    assert 0 < second["train_loss"] < first["train_loss"] < 5
    assert math.isfinite(second["test_loss"]) and second["test_accuracy"] > 0.1


def test_custom_model(mnist, tmp_path):
    from gpucnn.layers import Conv2D, Dense, Flatten, MaxPool2D, PReLU, Sequential

    gc.seed(0)
    net = Sequential(Conv2D(1, 4, 5), PReLU(4), MaxPool2D(2), Flatten(), Dense(4 * 12 * 12, 10))
    res = _run(mnist, tmp_path / "c", model=net, **{})
    assert res.metrics[-1]["test_accuracy"] > 0.3
    c = ck.load_checkpoint(tmp_path / "c")
    assert "2.a" not in c.params and "1.a" in c.params  # PReLU's slope is saved


def test_learning_rate_schedules():
    cfg = TrainConfig(lr=0.1, epochs=4, lr_schedule="cosine", warmup=0).resolved()
    assert learning_rate(cfg, 0, 0, 10) == pytest.approx(0.1)
    assert learning_rate(cfg, 2, 0, 10) == pytest.approx(0.05)
    assert learning_rate(cfg, 3, 9, 10) < 0.001
    cfg = TrainConfig(lr=0.1, lr_schedule="step", lr_step=2, lr_gamma=0.5, warmup=0).resolved()
    assert [learning_rate(cfg, e, 3, 10) for e in range(5)] == pytest.approx([0.1, 0.1, 0.05, 0.05, 0.025])
    cfg = TrainConfig(lr=0.1, lr_schedule="constant", warmup=0.5).resolved()  # 5 of 10 steps
    assert [learning_rate(cfg, 0, s, 10) for s in range(7)] == pytest.approx([0.02, 0.04, 0.06, 0.08, 0.1, 0.1, 0.1])
    assert learning_rate(cfg, 1, 0, 10) == 0.1
    assert TrainConfig(optimizer="adam").resolved().lr == 1e-3
    sgd = TrainConfig().resolved()
    assert (sgd.lr, sgd.momentum, sgd.weight_decay, sgd.warmup) == (0.05, 0.9, 2e-3, 0.25)
    assert TrainConfig(optimizer="adam").resolved().weight_decay == 0
    z = TrainConfig(model="zhang2016").resolved()
    assert (z.lr, z.momentum, z.weight_decay) == (1.0, 0.9, 0.0)
    assert TrainConfig(model="zhang2016", optimizer="adam").resolved().lr == 1e-3


@pytest.mark.parametrize("kw,match", [
    (dict(epochs=0), "epochs must be a positive integer"),
    (dict(batch_size=-1), "batch_size must be a positive integer"),
    (dict(lr=-1.0), "lr must be a positive number"),
    (dict(optimizer="rmsprop"), "optimizer must be one of"),
    (dict(lr_schedule="linear"), "lr_schedule must be one of"),
    (dict(dataset="cifar"), "unknown dataset"),
    (dict(optimizer="adam", momentum=0.9), "momentum applies to sgd only"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kw).resolved()


def test_evaluate_and_confusion_matrix(mnist):
    gc.seed(0)
    model = gc.models.build("seed002_c1")
    x = gdata.normalize(mnist.test_images[:250])
    y = mnist.test_labels[:250].astype(np.int64)
    model.train()
    res = evaluate(model, x, y, gc.losses.SoftmaxCrossEntropy(), batch_size=100, return_predictions=True)
    assert model.training  # mode restored
    assert res["n"] == 250 and res["predictions"].shape == (250,)
    cm = confusion_matrix(y, res["predictions"], 10)
    assert cm.sum() == 250 and np.trace(cm) / 250 == pytest.approx(res["accuracy"])
    full = model.forward(x)
    assert res["accuracy"] == pytest.approx(float((full.argmax(1) == y).mean()))


def test_resume_recovers_metrics_line_lost_after_checkpoint(mnist, tmp_path):
    _run(mnist, tmp_path / "part", stop_after=1)
    (tmp_path / "part" / "metrics.jsonl").write_text("")  # crash between checkpoint and metrics append
    train(None, data=mnist, device="cpu", resume=tmp_path / "part", progress=False, log=None)
    assert [r["epoch"] for r in read_metrics(tmp_path / "part")] == [1, 2]


@pytest.mark.filterwarnings("ignore:overflow encountered", "ignore:invalid value encountered")
def test_debug_names_the_layer_epoch_and_step(mnist, tmp_path):
    cfg = _cfg(model="lenet5", lr=1e30, lr_schedule="constant", momentum=0.0, warmup=0, epochs=1)
    with pytest.raises(NonFiniteLossError, match=r"layer \d+ \(\w+\) (forward|backward).* at epoch 1, step \d+/8"):
        train(cfg, data=mnist, device="cpu", out_dir=tmp_path / "d", debug=True, progress=False, log=None)
    assert not gc.debug.is_enabled()  # restored afterwards


def test_subset_larger_than_the_dataset_is_an_error():
    from gpucnn.data import load_arrays

    with pytest.raises(ValueError, match="subset=70000 is larger than the mnist split it cuts"):
        load_arrays("mnist", subset=70000)


def test_resume_under_another_augmentation_scheme_says_it_is_not_bit_for_bit(mnist, tmp_path):
    """The shifts were re-keyed (by position in the epoch's order) in this version; a checkpoint written
    before records no augment_scheme, and its resume cannot be the run it continues: said, not hidden."""
    _run(mnist, tmp_path / "src", augment=True, stop_after=1)
    rng = ck.load_checkpoint(tmp_path / "src").rng
    assert rng["augment_scheme"]
    old = _with_rng(tmp_path / "src" / "checkpoint.npz", tmp_path / "checkpoint.npz",
                    {k: v for k, v in rng.items() if k != "augment_scheme"})
    with pytest.warns(RuntimeWarning, match="another augment scheme .* not bit for bit"):
        train(None, data=mnist, device="cpu", resume=old, progress=False, log=None, out_dir=tmp_path / "resumed")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)       # the same scheme: no word
        train(None, data=mnist, device="cpu", resume=tmp_path / "src", progress=False, log=None)


def test_run_options_name_a_bad_precision_and_travel_as_one_object(tmp_path):
    """How a run runs is one RunOptions; precision names the modes it takes, and a shorthand beside
    options= is refused rather than silently dropped."""
    from gpucnn.train.options import RunOptions

    with pytest.raises(ValueError, match=r"precision must be one of 'fp32', 'tf32', '3xtf32', 'bf16', 'fp16', "
                                         r"got precision='fp64'"):
        RunOptions(precision="fp64")
    with pytest.raises(ValueError, match=r"collective_timeout=5 needs distributed=True"):
        RunOptions(collective_timeout=5)
    with pytest.raises(ValueError, match=r"got debug beside it"):
        train(None, options=RunOptions(device="cpu"), debug=True, out_dir=tmp_path / "r")
    with pytest.raises(ValueError, match=r"got precision beside it"):
        train(None, options=RunOptions(device="cpu"), precision="bf16", out_dir=tmp_path / "r")


def test_replacing_the_model_loss_or_optimizer_drops_what_was_made_for_the_old_ones():
    """A captured CUDA graph points into the old model's and optimizer's buffers: it must go with them."""
    model = gc.models.build("lenet5")
    trainer = gc.train.Trainer(model, losses.SoftmaxCrossEntropy(), gc.optim.SGD(model, lr=0.1), batch_size=8)
    for attr, value in (("model", gc.models.build("lenet5")), ("loss", losses.SoftmaxCrossEntropy()),
                        ("optimizer", gc.optim.SGD(model, lr=0.2))):
        trainer._graphs[(1, 2, 8)], trainer._eager_steps[(1, 2, 8)] = object(), 2
        setattr(trainer, attr, value)
        assert getattr(trainer, attr) is value and not trainer._graphs and not trainer._eager_steps


def test_fashion_mnist_recipe_is_flips_without_shifts():
    """The per-dataset recipe measured on Fashion-MNIST (train/config.py): flips, no shifts; MNIST keeps
    its 2-pixel shifts and no flips; the run's augment line says what it does, nothing more."""
    from gpucnn.train.config import TrainConfig
    from gpucnn.train.loop import augment_phrase

    fm = TrainConfig(model="lenet5", dataset="fashion-mnist").resolved()
    assert (fm.augment, fm.flip, fm.max_shift) == (True, True, 0)
    mn = TrainConfig(model="lenet5", dataset="mnist").resolved()
    assert (mn.augment, mn.flip, mn.max_shift) == (True, False, 2)
    assert augment_phrase({"max_shift": 0, "flip": True}) == "left-right flips"
    assert augment_phrase({"max_shift": 1, "flip": False}) == "random shifts of up to 1 pixel"
    assert augment_phrase({"max_shift": 4, "flip": True}) == "random shifts of up to 4 pixels and left-right flips"

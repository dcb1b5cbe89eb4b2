"""Checkpoints: round trip, validation, tamper detection, atomic writes, no pickle."""
from __future__ import annotations

import json
import os
import zipfile

import numpy as np
import pytest

import gpucnn as gc
from gpucnn import checkpoint as ck
from gpucnn import optim


def _trained(name="seed002_c1", opt_cls=optim.SGD, **kw):
    gc.seed(3)
    model = gc.models.build(name)
    opt = opt_cls(model, lr=0.01, **kw)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 1, 28, 28)).astype(np.float32)
    y = rng.integers(0, 10, 8)
    loss = gc.losses.SoftmaxCrossEntropy()
    for _ in range(2):
        loss.forward(model.forward(x), y)
        model.backward(loss.backward(), input_grad=False)
        opt.step()
    return model, opt


@pytest.mark.parametrize("opt_cls,kw", [(optim.SGD, {"momentum": 0.9}), (optim.Adam, {})])
def test_round_trip(tmp_path, opt_cls, kw):
    model, opt = _trained(opt_cls=opt_cls, **kw)
    rng_state = {"gpucnn": gc.random.get_state(), "shuffle": np.random.default_rng([0, 1]).bit_generator.state}
    path = ck.save_checkpoint(tmp_path, model, opt, epoch=4, config={"model": "seed002_c1", "lr": 0.01},
                              rng=rng_state, metrics={"test_accuracy": 0.5})
    assert path == tmp_path / "checkpoint.npz"
    c = ck.load_checkpoint(tmp_path)  # a directory resolves to its checkpoint.npz
    assert c.model == "seed002_c1" and c.epoch == 4
    assert c.config == {"model": "seed002_c1", "lr": 0.01}
    assert c.metrics == {"test_accuracy": 0.5}
    assert c.rng["gpucnn"] == gc.random.get_state()
    assert c.meta["version"] == ck.FORMAT_VERSION
    assert set(c.meta["tensors"]) == {f"param/{k}" for k in model.state_dict()} | {f"optim/{k}" for k in opt.state_dict()["slots"]}
    for k, v in model.state_dict().items():
        assert c.params[k].dtype == v.dtype and np.array_equal(c.params[k], v)

    gc.seed(99)
    other = gc.models.build("seed002_c1")
    other_opt = opt_cls(other, lr=0.5, **kw)
    ck.load_into(c, other, other_opt)
    for k, v in model.state_dict().items():
        assert np.array_equal(other.state_dict()[k], v)
    want, got = opt.state_dict(), other_opt.state_dict()
    assert got["type"] == want["type"] and got["step_count"] == want["step_count"] == 2
    assert got["hyper"] == want["hyper"]
    assert set(got["slots"]) == set(want["slots"]) and want["slots"]
    for k in want["slots"]:
        assert np.array_equal(got["slots"][k], want["slots"][k])

    # no pickle anywhere: every entry loads with allow_pickle=False and none is an object array
    with np.load(path, allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
        meta = json.loads(str(z["__meta__"][()]))
        assert meta["format"] == "gpucnn-checkpoint" and len(meta["sha256"]) == 64


def test_restore_model_builds_named_model(tmp_path):
    model, opt = _trained()
    ck.save_checkpoint(tmp_path / "c.npz", model, opt, model_name="seed002_c1")
    restored, c = ck.restore_model(tmp_path / "c.npz")
    x = np.random.default_rng(1).standard_normal((3, 1, 28, 28)).astype(np.float32)
    model.eval()
    restored.eval()
    assert np.array_equal(restored.forward(x), model.forward(x))


def test_mismatched_architecture_is_refused_with_the_list(tmp_path):
    model, opt = _trained("lenet5")
    ck.save_checkpoint(tmp_path, model, opt)
    c = ck.load_checkpoint(tmp_path)
    other = gc.models.build("seed001")  # dense 256->100->10 instead of 400->120->84->10
    before = other.state_dict()
    with pytest.raises(ck.CheckpointError) as info:
        ck.load_into(c, other)
    msg = str(info.value)
    assert "does not fit" in msg and "lenet5" in msg and "seed001" in msg
    assert "unexpected keys: ['11.W', '11.b']" in msg  # names every mismatch
    assert "7.W: shape (120, 400) in state, (100, 256) in model" in msg
    assert "9.W: shape (84, 120) in state, (10, 100) in model" in msg
    for k, v in other.state_dict().items():  # nothing was loaded
        assert np.array_equal(v, before[k])


def test_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        ck.load_checkpoint(tmp_path / "nope.npz")


def _rewrite_npz(src, dst, edit):
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    edit(arrays)
    with open(dst, "wb") as f:
        np.savez(f, **arrays)


def test_tampered_tensor_is_refused(tmp_path):
    model, opt = _trained()
    path = ck.save_checkpoint(tmp_path / "c.npz", model, opt)

    def bump(arrays):
        arrays["param/0.W"][0, 0, 0, 0] += 1e-3

    _rewrite_npz(path, tmp_path / "t.npz", bump)
    with pytest.raises(ck.CheckpointError, match="SHA-256 mismatch"):
        ck.load_checkpoint(tmp_path / "t.npz")


def test_tampered_metadata_is_refused(tmp_path):
    model, opt = _trained()
    path = ck.save_checkpoint(tmp_path / "c.npz", model, opt, epoch=1)

    def edit(arrays):
        meta = json.loads(str(arrays["__meta__"][()]))
        meta["epoch"] = 7
        arrays["__meta__"] = np.array(json.dumps(meta))

    _rewrite_npz(path, tmp_path / "t.npz", edit)
    with pytest.raises(ck.CheckpointError, match="SHA-256 mismatch"):
        ck.load_checkpoint(tmp_path / "t.npz")


def test_shape_not_matching_metadata_is_refused(tmp_path):
    model, opt = _trained()
    path = ck.save_checkpoint(tmp_path / "c.npz", model, opt)

    def edit(arrays):
        arrays["param/0.b"] = np.zeros(7, np.float32)

    _rewrite_npz(path, tmp_path / "t.npz", edit)
    with pytest.raises(ck.CheckpointError, match=r"param/0\.b: shape \(7,\) but metadata says \(6,\)"):
        ck.load_checkpoint(tmp_path / "t.npz")


def test_not_a_checkpoint(tmp_path):
    p = tmp_path / "x.npz"
    np.savez(p, a=np.zeros(3))
    with pytest.raises(ck.CheckpointError, match="not a gpucnn checkpoint"):
        ck.load_checkpoint(p)
    (tmp_path / "junk.npz").write_bytes(b"not a zip file")
    with pytest.raises(ck.CheckpointError, match="not a gpucnn checkpoint .*starts with b'not '"):
        ck.load_checkpoint(tmp_path / "junk.npz")


@pytest.mark.parametrize("where", ["savez", "replace"])
def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch, where):
    model, opt = _trained()
    path = ck.save_checkpoint(tmp_path, model, opt, epoch=1)
    before = path.read_bytes()
    for _, layer, k in model.named_parameters():  # the model moves on
        layer.params[k] += 1

    if where == "savez":
        real = np.savez

        def crash(file, **arrays):  # write part of the archive, then die
            with zipfile.ZipFile(file, "w") as zf:
                zf.writestr("param/0.W.npy", b"\x93NUMPY partial")
            raise KeyboardInterrupt("simulated crash in the middle of np.savez")

        monkeypatch.setattr(ck.np, "savez", crash)
        exc = KeyboardInterrupt
    else:
        def crash(src, dst):
            raise OSError("simulated crash before os.replace")

        monkeypatch.setattr(ck.os, "replace", crash)
        exc = OSError
    with pytest.raises(exc):
        ck.save_checkpoint(tmp_path, model, opt, epoch=2)
    monkeypatch.undo()
    if where == "savez":
        assert np.savez is real
    assert path.read_bytes() == before
    c = ck.load_checkpoint(path)
    assert c.epoch == 1
    assert sorted(os.listdir(tmp_path)) == ["checkpoint.npz"]  # no temporary file left behind


def test_malformed_metadata_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "bad.npz"
    meta = {"format": ck.FORMAT, "version": ck.FORMAT_VERSION, "tensors": {"param/0.W": 5}}
    np.savez(path, **{"param/0.W": np.zeros(3), ck._META_KEY: np.array(json.dumps(meta))})
    with pytest.raises(ck.CheckpointError, match="malformed checkpoint metadata"):
        ck.load_checkpoint(path)


def test_unreadable_files_say_what_they_are(tmp_path):
    """Not 'BadZipFile', never NumPy's advice to allow pickle: what the file is, in words."""
    import gpucnn as gc

    good = ck.save_checkpoint(tmp_path / "c.npz", gc.models.build("seed002_c1"), None, model_name="seed002_c1")
    raw = good.read_bytes()
    cases = {
        "trunc.npz": (raw[: len(raw) // 2], "truncated or damaged checkpoint"),
        "notes.txt": (b"some text, not a checkpoint", "not a gpucnn checkpoint"),
        "empty.npz": (b"", "not a gpucnn checkpoint"),
    }
    for name, (content, needle) in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(ck.CheckpointError, match=needle) as info:
            ck.load_checkpoint(tmp_path / name)
        assert "pickle" not in str(info.value) and "BadZipFile" not in str(info.value)
    np.savez(tmp_path / "objects.npz", a=np.array([{"x": 1}], dtype=object))
    with pytest.raises(ck.CheckpointError, match="not a gpucnn checkpoint .*Python objects") as info:
        ck.load_checkpoint(tmp_path / "objects.npz")
    assert "allow_pickle" not in str(info.value)
    np.save(tmp_path / "array.npy", np.zeros(3))
    with pytest.raises(ck.CheckpointError, match="not a gpucnn checkpoint"):
        ck.load_checkpoint(tmp_path / "array.npy")

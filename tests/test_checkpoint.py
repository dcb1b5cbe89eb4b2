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
from helpers import peak_bytes


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


# --------------------------------------------------------------------------- #
# hostile files: sizes are checked before anything is inflated or allocated,
# and every refusal is a one-line CheckpointError naming the file
# --------------------------------------------------------------------------- #
_BOMB_BYTES = 64 * 1024 * 1024   # what a bomb below inflates to: harmless even if the checks regress


def _npy_header(shape, descr="|u1") -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": descr, "fortran_order": False, "shape": tuple(shape)})
    return buf.getvalue()


def _lenet5_checkpoint(path):
    gc.seed(0)
    return ck.save_checkpoint(path, gc.models.build("lenet5"), None, model_name="lenet5",
                              config={"dataset": "mnist"})


def _with_member(src, dst, name, header: bytes, size: int):
    """``src`` with one more deflated member ``name``: ``header`` and zeros, ``size`` bytes in all."""
    dst.write_bytes(src.read_bytes())
    with zipfile.ZipFile(dst, "a", compression=zipfile.ZIP_DEFLATED) as zf:
        with zf.open(name, "w", force_zip64=True) as m:
            m.write(header)
            zeros, left = bytes(1 << 20), size - len(header)
            while left > 0:
                m.write(zeros[:min(left, len(zeros))])
                left -= len(zeros)
    return dst


def _replace_member(src, dst, name, content: bytes):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as zout:
        for info in zin.infolist():
            zout.writestr(info.filename, content if info.filename == name else zin.read(info))
    return dst


def _rehashed(src, dst, edit):
    """``src`` with its arrays/metadata edited by ``edit(arrays, meta)``, tensor list and SHA-256 recomputed."""
    with np.load(src, allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    meta = json.loads(str(arrays.pop(ck._META_KEY)[()]))
    edit(arrays, meta)
    meta["tensors"] = {k: {"shape": list(v.shape), "dtype": v.dtype.str} for k, v in sorted(arrays.items())}
    meta.pop("sha256", None)
    meta["sha256"] = ck._digest(meta, arrays)
    arrays[ck._META_KEY] = np.array(json.dumps(meta, sort_keys=True))
    with open(dst, "wb") as f:
        np.savez(f, **arrays)
    return dst


def test_zip_bomb_member_is_refused_before_it_is_inflated(tmp_path):
    """An undeclared member inflating to 64 MiB: refused by name, having read its header only."""
    good = _lenet5_checkpoint(tmp_path / "c.npz")
    bomb = _with_member(good, tmp_path / "bomb.npz", "junk.npy", _npy_header((_BOMB_BYTES,)), _BOMB_BYTES)
    assert bomb.stat().st_size < good.stat().st_size + _BOMB_BYTES // 100
    for load in (ck.load_checkpoint, ck.restore_model, gc.load):
        with pytest.raises(ck.CheckpointError, match=r"undeclared tensors \['junk'\]") as info:
            load(bomb)
        assert str(bomb) in str(info.value)
        assert peak_bytes(lambda: load(bomb)) < 4 * 1024 * 1024, load


def test_zip_members_over_the_size_limit_are_refused_unread(tmp_path, monkeypatch):
    """The zip's declared sizes and each .npy header's shape are checked against the limit first."""
    good = _lenet5_checkpoint(tmp_path / "c.npz")
    bomb = _with_member(good, tmp_path / "bomb.npz", "junk.npy", _npy_header((_BOMB_BYTES,)), _BOMB_BYTES)
    monkeypatch.setattr(ck, "MAX_CHECKPOINT_BYTES", 1024 * 1024)
    with pytest.raises(ck.CheckpointError, match=r"too large: .*'junk\.npy'.*limit") as info:
        ck.load_checkpoint(bomb)
    assert str(bomb) in str(info.value)
    assert peak_bytes(lambda: ck.load_checkpoint(bomb)) < 1024 * 1024
    # a .npy header over the limit, in a member whose zip size is small
    small = _with_member(good, tmp_path / "hdr.npz", "junk.npy", _npy_header((2 * 1024 * 1024,)), 4096)
    with pytest.raises(ck.CheckpointError, match=r"too large: junk declares shape \(2097152,\)"):
        ck.load_checkpoint(small)


@pytest.mark.parametrize("load", [ck.load_checkpoint, ck.restore_model, gc.load])
def test_huge_declared_shape_is_refused_before_allocation(tmp_path, load):
    """A .npy header declaring (10**11,) float64: not 'Unable to allocate 745. GiB'."""
    good = _lenet5_checkpoint(tmp_path / "c.npz")
    huge = _replace_member(good, tmp_path / "huge.npz", "param/0.b.npy", _npy_header((10**11,), "<f8") + bytes(64))
    with pytest.raises(ck.CheckpointError, match=r"huge\.npz: too large: param/0\.b declares shape "
                                                 r"\(100000000000,\) of float64 \(800000000000 bytes\)"):
        load(huge)


def test_member_longer_than_its_header_is_refused(tmp_path):
    good = _lenet5_checkpoint(tmp_path / "c.npz")
    with zipfile.ZipFile(good) as z:
        member = z.read("param/0.b.npy")
    longer = _replace_member(good, tmp_path / "long.npz", "param/0.b.npy", member + bytes(1024))
    with pytest.raises(ck.CheckpointError, match=r"long\.npz: damaged checkpoint: param/0\.b\.npy holds more "
                                                 r"bytes than the 24 its header declares"):
        ck.load_checkpoint(longer)


def test_deeply_nested_metadata_is_refused_before_parsing(tmp_path, monkeypatch):
    """200k nested brackets in __meta__: a CheckpointError, not a RecursionError."""
    good = _lenet5_checkpoint(tmp_path / "c.npz")
    with np.load(good, allow_pickle=False) as z:
        arrays = {k: z[k].copy() for k in z.files}
    text = str(arrays[ck._META_KEY][()])
    arrays[ck._META_KEY] = np.array(text[:-1] + ', "x": ' + "[" * 200_000 + "]" * 200_000 + "}")
    np.savez(tmp_path / "deep.npz", **arrays)
    for load in (ck.load_checkpoint, gc.load):
        with pytest.raises(ck.CheckpointError, match=r"deep\.npz: malformed checkpoint metadata: its JSON "
                                                     r"nests 200001 levels deep, more than the 64"):
            load(tmp_path / "deep.npz")
    monkeypatch.setattr(ck, "MAX_META_DEPTH", 3)   # the tensor list nests 4 levels: {"tensors": {k: {"shape": []}}}
    with pytest.raises(ck.CheckpointError, match="nests 4 levels deep, more than the 3"):
        ck.load_checkpoint(good)


@pytest.mark.parametrize("dtype,fragment", [
    (np.int32, r"the checkpoint holds no floating-point parameters \(0\.W int32, 0\.b int32, 11\.W int32\); a parameter's "
               r"dtype must be float32 or float64"),
    (np.float16, r"parameter 0\.W has dtype float16; a parameter's dtype must be float32 or float64"),
])
def test_parameter_dtypes_must_be_float32_or_float64(tmp_path, dtype, fragment):
    """int32/float16 parameters (re-hashed): a CheckpointError naming the dtype, not a TypeError."""
    good = _lenet5_checkpoint(tmp_path / "c.npz")

    def cast(arrays, meta):
        for k in arrays:
            arrays[k] = arrays[k].astype(dtype)

    bad = _rehashed(good, tmp_path / "bad.npz", cast)
    for load in (ck.restore_model, gc.load):
        with pytest.raises(ck.CheckpointError, match=r"bad\.npz: " + fragment):
            load(bad)


def test_mixed_dtypes_and_shapes_checked_against_the_architecture_before_reading(tmp_path, monkeypatch):
    good = _lenet5_checkpoint(tmp_path / "c.npz")

    def edit(arrays, meta):
        arrays["param/0.b"] = arrays["param/0.b"].astype(np.float64)
        arrays["param/3.W"] = np.zeros((16, 6, 3, 3), np.float32)
        arrays["param/99.W"] = np.zeros(2, np.float32)

    bad = _rehashed(good, tmp_path / "bad.npz", edit)
    read = []
    real = ck._read_array
    monkeypatch.setattr(ck, "_read_array", lambda path, zf, info, header: read.append(info.filename)
                        or real(path, zf, info, header))
    with pytest.raises(ck.CheckpointError) as info:
        ck.restore_model(bad)
    msg = str(info.value)
    assert msg.startswith(f"{bad}: checkpoint of model 'lenet5' does not fit that model's architecture: ")
    assert "unexpected keys: ['99.W']" in msg
    assert "0.b: dtype float64 in the checkpoint, float32 in the model" in msg
    assert "3.W: shape (16, 6, 3, 3) in the checkpoint, (16, 6, 5, 5) in the model" in msg
    assert read == ["__meta__.npy"]   # no tensor was read


@pytest.mark.parametrize("where", ["param/0.W", "param/11.b"])
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_non_finite_tensors_are_refused_by_name(tmp_path, where, value):
    """NaN weights, re-hashed: refused at load (not 'loss nan, accuracy 9.80%')."""
    good = _lenet5_checkpoint(tmp_path / "c.npz")

    def poison(arrays, meta):
        arrays[where].flat[0] = value

    bad = _rehashed(good, tmp_path / "bad.npz", poison)
    with pytest.raises(ck.CheckpointError, match=rf"bad\.npz: tensor {where} holds 1 non-finite value"):
        ck.load_checkpoint(bad)


def _exit_status(argv, capsys):
    """``gpucnn ARGV``'s exit status and its stderr."""
    from gpucnn import cli

    try:
        status = cli.main([str(a) for a in argv])
    except SystemExit as exc:
        status = exc.code
    return status, capsys.readouterr().err


def test_hostile_checkpoints_fail_every_command_in_one_line(tmp_path, capsys):
    """evaluate / predict / export exit 2 with one line naming the file and the problem."""
    from PIL import Image

    good = _lenet5_checkpoint(tmp_path / "c.npz")
    image = tmp_path / "one.png"
    Image.fromarray(np.pad(np.full((18, 4), 255, np.uint8), 5)).save(image)

    def nan(arrays, meta):
        arrays["param/0.W"].flat[0] = np.nan

    cases = {
        _rehashed(good, tmp_path / "nan.npz", nan): "tensor param/0.W holds 1 non-finite value",
        _replace_member(good, tmp_path / "huge.npz", "param/0.b.npy",
                        _npy_header((10**11,), "<f8")): "too large: param/0.b declares shape (100000000000,)",
        _rehashed(good, tmp_path / "i32.npz", lambda a, m: a.update({k: v.astype(np.int32) for k, v in a.items()})):
            "a parameter's dtype must be float32 or float64",
    }
    for path, fragment in cases.items():
        for argv in (["evaluate", path, "--device", "cpu"], ["predict", path, image],
                     ["export", path, "-o", tmp_path / "out.safetensors"]):
            status, err = _exit_status(argv, capsys)
            errors = [line for line in err.splitlines() if line.startswith("gpucnn ")]   # after argparse's usage
            assert status == 2, (argv, err)
            assert len(errors) == 1 and str(path) in errors[0] and fragment in errors[0], (argv, err)
            assert "Traceback" not in err

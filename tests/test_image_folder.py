"""Training on one's own images: models built for a shape, image folders (layouts, decoding,
the cache, bad files), and the commands on a colour folder.  Tiny folders of 8x8 / 12x12 images."""
from __future__ import annotations

import os

import numpy as np
import pytest

Image = pytest.importorskip("PIL.Image", reason="image folders need Pillow (a dependency of gpucnn; absent on the bare GPU box)")

import gpucnn as gc
import gpucnn.cli
from gpucnn import checkpoint as ck
from gpucnn.data import folder as fo


@pytest.fixture(autouse=True)
def _isolated_env(tmp_path, monkeypatch):
    monkeypatch.delenv("GPUCNN_DATA", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def save(path, array, fmt=None, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.fromarray(array)
    (im.convert(mode) if mode else im).save(path, format=fmt)


def colour_folder(root, n_train=6, n_test=2, size=12, classes=("cat", "dog")):
    """Class k's images are mostly channel k bright: learnable in a step or two."""
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for k, c in enumerate(classes):
            for i in range(n):
                a = rng.integers(0, 60, (size, size, 3), dtype=np.uint8)
                a[..., k] += 180
                save(root / split / c / f"{i}.png", a)
    return root


# -- models for a shape ------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["lenet5", "resnet_mini", "resnet_cifar"])
def test_models_adapt_to_the_shape(name):
    gc.seed(0)
    model = gc.models.build(name, in_shape=(3, 12, 16), num_classes=5)
    assert model.in_shape == (3, 12, 16) and model.num_classes == 5
    x = np.random.default_rng(0).standard_normal((2, 3, 12, 16)).astype(np.float32)
    y = model.forward(x)
    assert y.shape == (2, 5)
    assert model.backward(np.ones_like(y)).shape == x.shape


def test_resnet_cifar_trains_one_step():
    gc.seed(0)
    model = gc.models.build("resnet_cifar", in_shape=(3, 8, 8), num_classes=3)
    loss = gc.models.make_loss("resnet_cifar")
    opt = gc.optim.SGD(model, lr=0.1)
    x = np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)
    y = np.array([0, 1, 2, 0])
    before = float(loss.forward(model.forward(x), y))
    model.backward(loss.backward())
    opt.step()
    assert float(loss.forward(model.forward(x), y)) != before


@pytest.mark.parametrize("name", ["seed001", "zhang2016", "seed002_c1", "seed002_c2"])
def test_seed_networks_refuse_other_shapes(name):
    gc.models.build(name, in_shape=(1, 28, 28), num_classes=10)
    with pytest.raises(ValueError, match=rf"model '{name}' .* input 3x32x32 with 10 classes"):
        gc.models.build(name, in_shape=(3, 32, 32))
    with pytest.raises(ValueError, match="1x28x28 with 4 classes"):
        gc.models.build(name, num_classes=4)


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match=r"in_shape must be \(C, H, W\).*\(3, 32\)"):
        gc.models.build("lenet5", in_shape=(3, 32))
    with pytest.raises(ValueError, match="num_classes must be an integer >= 2, got num_classes=1"):
        gc.models.build("lenet5", num_classes=1)
    with pytest.raises(ValueError, match="at least 12x12 pixels"):
        gc.models.build("lenet5", in_shape=(1, 8, 8))


def test_checkpoint_keeps_the_shape_and_old_ones_load_as_mnist(tmp_path):
    model = gc.models.build("lenet5", in_shape=(3, 16, 16), num_classes=3)
    model.classes, model.mean, model.std = ("a", "b", "c"), (0.1, 0.2, 0.3), (0.3, 0.3, 0.3)
    ck.save_checkpoint(tmp_path / "new.npz", model)
    back, _ = ck.restore_model(tmp_path / "new.npz")
    assert (back.in_shape, back.num_classes, back.classes, back.mean) == ((3, 16, 16), 3, ("a", "b", "c"),
                                                                         (0.1, 0.2, 0.3))
    old = gc.models.build("lenet5")
    del old.in_shape, old.num_classes          # what a checkpoint written before issue 26 records
    ck.save_checkpoint(tmp_path / "old.npz", old)
    assert ck.read_metadata(tmp_path / "old.npz")["data"] == {}
    back, _ = ck.restore_model(tmp_path / "old.npz")
    assert back.in_shape == (1, 28, 28) and back.num_classes == 10


# -- image folders -----------------------------------------------------------------------------


def test_formats_and_modes_decode(tmp_path):
    rng = np.random.default_rng(3)
    rgb = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    d = tmp_path / "f"
    save(d / "a" / "rgb.png", rgb)
    save(d / "a" / "gray.bmp", rgb[..., 0])
    save(d / "a" / "pal.gif", rgb, mode="P")
    save(d / "b" / "rgba.png", np.dstack([rgb, np.full((8, 8), 128, np.uint8)]))
    save(d / "b" / "photo.jpg", rgb)
    save(d / "b" / "x.webp", rgb, fmt="WEBP", mode=None)
    ds = fo.load_folder(d, val_split=0.5, progress=False)
    assert ds.in_shape == (3, 8, 8) and ds.classes == ["a", "b"]
    assert len(ds.train_labels) + len(ds.test_labels) == 6
    np.testing.assert_array_equal(fo.decode(d / "a" / "rgb.png", 8, 3), rgb.transpose(2, 0, 1))
    np.testing.assert_array_equal(fo.decode(d / "b" / "rgba.png", 8, 3), rgb.transpose(2, 0, 1))  # alpha dropped
    np.testing.assert_array_equal(fo.decode(d / "a" / "gray.bmp", 8, 3), np.stack([rgb[..., 0]] * 3))
    assert fo.decode(d / "a" / "rgb.png", 8, 1).shape == (1, 8, 8)


def test_resize_keeps_aspect_then_centre_crops(tmp_path):
    a = np.zeros((8, 24), np.uint8)
    a[:, 8:16] = 200                    # a bright centre third
    save(tmp_path / "wide.png", a)
    out = fo.decode(tmp_path / "wide.png", 4, 1)
    assert out.shape == (1, 4, 4) and out.min() >= 150        # the centre survived, not squashed
    b = np.arange(16 * 16, dtype=np.uint8).reshape(16, 16)
    save(tmp_path / "sq.png", b)
    np.testing.assert_array_equal(fo.decode(tmp_path / "sq.png", 16, 1)[0], b)


def test_defaults_most_common_size_and_gray(tmp_path):
    d = tmp_path / "f"
    for i, side in enumerate((10, 10, 10, 16)):
        save(d / ("a" if i % 2 else "b") / f"{i}.png", np.full((side, side), 9 * i, np.uint8))
    ds = fo.load_folder(d, val_split=0.5, progress=False)
    assert ds.in_shape == (1, 10, 10)      # all gray: one channel; most common side: 10
    assert fo.load_folder(d, val_split=0.5, channels=3, image_size=6, progress=False).in_shape == (3, 6, 6)


def test_val_split_is_fixed_and_seeded(tmp_path):
    d = tmp_path / "f"
    for c in ("a", "b"):
        for i in range(10):
            save(d / c / f"{i}.png", np.full((4, 4), i * 20, np.uint8))
    _, tr1, te1 = fo.scan(d, 0.3, seed=0)
    _, tr2, te2 = fo.scan(d, 0.3, seed=0)
    _, _, te3 = fo.scan(d, 0.3, seed=1)
    assert te1 == te2 and tr1 == tr2 and len(te1) == 6 and len(tr1) == 14
    assert te1 != te3
    assert not set(tr1) & set(te1)


def test_cache_is_reused_and_a_changed_folder_noticed(tmp_path):
    d = colour_folder(tmp_path / "f", n_train=2, n_test=1, size=8)
    lines = []
    ds1 = fo.load_folder(d, progress=False, log=lines.append)
    assert "decoding" in lines[-1]
    cached = list((tmp_path / "xdg-cache" / "gpucnn" / "folder").glob("*.u8"))
    assert len(cached) == 1 and cached[0].stat().st_size == ds1.train_images.size + ds1.test_images.size
    assert isinstance(ds1.train_images, np.memmap)
    ds2 = fo.load_folder(d, progress=False, log=lines.append)
    assert "from the cache" in lines[-1]
    np.testing.assert_array_equal(ds1.train_images, ds2.train_images)
    p = d / "train" / "cat" / "0.png"
    save(p, np.zeros((8, 8, 3), np.uint8))
    os.utime(p, ns=(1, 1))                    # a changed file: other bytes, other mtime
    ds3 = fo.load_folder(d, progress=False, log=lines.append)
    assert "decoding" in lines[-1] and ds3.train_images[0].max() == 0


def test_bad_files_are_named_and_skipped_with_a_count(tmp_path):
    d = colour_folder(tmp_path / "f", n_train=2, n_test=1, size=8)
    (d / "train" / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (d / "test" / "cat" / "text.jpg").write_bytes(b"hello")
    with pytest.raises(fo.FolderError) as exc:
        fo.load_folder(d, progress=False)
    msg = str(exc.value)
    assert "2 image files cannot be used" in msg and "--skip-bad-images" in msg
    assert f"{d / 'train' / 'dog' / 'broken.png'}: " in msg and f"{d / 'test' / 'cat' / 'text.jpg'}: " in msg
    lines = []
    ds = fo.load_folder(d, skip_bad=True, progress=False, log=lines.append)
    assert any("skipped 2 bad image files" in ln for ln in lines)
    assert len(ds.train_labels) == 4 and len(ds.test_labels) == 2


@pytest.mark.parametrize("layout, match", [
    ("empty class", "hold[s]? no images"),
    ("test only", r"class \['bird'\] is only in test/"),
    ("one class", "only one class \\('cat'\\)"),
    ("no split", "pass --val-split"),
    ("missing test", "test.*no such directory"),
])
def test_folder_layout_errors(tmp_path, layout, match):
    d = tmp_path / "f"
    px = np.zeros((4, 4), np.uint8)
    if layout == "empty class":
        save(d / "train" / "cat" / "0.png", px)
        (d / "train" / "dog").mkdir(parents=True)
        save(d / "test" / "cat" / "0.png", px)
    elif layout == "test only":
        for s in ("train", "test"):
            save(d / s / "cat" / "0.png", px)
            save(d / s / "dog" / "0.png", px)
        save(d / "test" / "bird" / "0.png", px)
    elif layout == "one class":
        save(d / "cat" / "0.png", px)
        save(d / "cat" / "1.png", px)
        save(d / "cat" / "2.png", px)
    elif layout == "no split":
        save(d / "cat" / "0.png", px)
    else:
        save(d / "train" / "cat" / "0.png", px)
    with pytest.raises(fo.FolderError, match=match):
        fo.load_folder(d, val_split=0.34 if layout == "one class" else None, progress=False)


# -- the commands ------------------------------------------------------------------------------


def test_train_evaluate_predict_export_plot_on_a_colour_folder(tmp_path, capsys):
    d = colour_folder(tmp_path / "f")
    run = tmp_path / "run"
    rc = gc.cli.main(["train", "--data-dir", str(d), "--epochs", "2", "--batch-size", "4", "--lr", "0.05",
                      "--out", str(run), "--no-progress", "--device", "cpu", "--model", "lenet5"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "data: folder, 12 training / 4 test images of 3x12x12, 2 classes" in out
    assert "random shifts of up to 1 pixel\n" in out          # a folder's default: 12 / 14 rounds to 1
    meta = ck.read_metadata(run)
    assert meta["config"]["dataset"] == "folder" and meta["data"]["classes"] == ["cat", "dog"]
    assert meta["data"]["in_shape"] == [3, 12, 12] and len(meta["data"]["mean"]) == 3

    assert gc.cli.main(["evaluate", str(run), "--data-dir", str(d)]) == 0
    out = capsys.readouterr().out
    assert "folder test set: 4 images" in out and " 0 cat " in out and " 1 dog " in out

    img = tmp_path / "q.png"
    a = np.full((30, 20, 3), 30, np.uint8)
    a[..., 1] = 230                              # a "dog" (green), another size than the training images
    save(img, a)
    assert gc.cli.main(["predict", str(run), str(img), "--save-input", str(tmp_path / "seen")]) == 0
    out = capsys.readouterr().out
    assert "(cat)" in out or "(dog)" in out
    assert Image.open(tmp_path / "seen" / "q_12x12.png").size == (12, 12)

    onnx = pytest.importorskip("onnx")
    assert gc.cli.main(["export", str(run), "--output", str(tmp_path / "m.onnx")]) == 0
    dims = onnx.load(str(tmp_path / "m.onnx")).graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param and [x.dim_value for x in dims[1:]] == [3, 12, 12]

    pytest.importorskip("matplotlib")
    capsys.readouterr()
    assert gc.cli.main(["plot", str(run), "--out", str(tmp_path / "plots")]) == 0
    assert (tmp_path / "plots" / "filters.png").is_file()
    assert not (tmp_path / "plots" / "features.png").exists()     # the folder is needed for those, and said
    assert "no features.png, confusion.png: the run's test set (folder) was not found: " in capsys.readouterr().err
    assert gc.cli.main(["plot", str(run), "--out", str(tmp_path / "plots"), "--data-dir", str(d)]) == 0
    for name in ("features.png", "confusion.png"):
        assert Image.open(tmp_path / "plots" / name).mode in ("RGB", "RGBA"), name


def test_cli_folder_flags_are_checked(tmp_path, capsys):
    with pytest.raises(SystemExit):
        gc.cli.main(["train", "--val-split", "1.5", "--data-dir", str(tmp_path)])
    assert "--val-split" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gc.cli.main(["train", "--dataset", "mnist", "--image-size", "32", "--out", str(tmp_path / "r")])
    assert "image_size apply to image folders" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        gc.cli.main(["evaluate", str(tmp_path / "nope")])


def test_a_class_left_without_training_images_by_skipping_is_an_error(tmp_path):
    d = tmp_path / "f"
    save(d / "train" / "cat" / "0.png", np.zeros((4, 4), np.uint8))
    (d / "train" / "dog").mkdir(parents=True)
    (d / "train" / "dog" / "0.png").write_bytes(b"broken")
    save(d / "test" / "cat" / "0.png", np.zeros((4, 4), np.uint8))
    with pytest.raises(fo.FolderError, match=r"class \['dog'\] has no usable training image"):
        fo.load_folder(d, skip_bad=True, progress=False, log=lambda m: None)


def test_predict_refuses_mnist_framing_flags_for_a_folder_run(tmp_path, capsys):
    d = colour_folder(tmp_path / "f", n_train=2, n_test=1)
    assert gc.cli.main(["train", "--data-dir", str(d), "--epochs", "1", "--batch-size", "4", "--out",
                        str(tmp_path / "run"), "--no-progress", "--device", "cpu"]) == 0
    capsys.readouterr()
    assert gc.cli.main(["predict", str(tmp_path / "run"), str(d / "test" / "cat" / "0.png"), "--invert", "yes"]) == 2
    assert "MNIST framing only" in capsys.readouterr().err

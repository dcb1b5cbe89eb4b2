"""`gpucnn predict` and gc.load / gc.predict on real drawings made from MNIST test digits.

Every image is generated here (tmp_path) from real MNIST test digits: dark ink on
a transparent canvas, off-centre on a wide canvas, scaled up on white paper, in
light pencil, ...  A small LeNet-5 is trained once per module (about 3 s on 2 cores).
"""
from __future__ import annotations

import argparse
import importlib
import warnings

import numpy as np
import pytest
pytest.importorskip("PIL", reason="image tests need Pillow (pip install -e .)")
from PIL import Image  # noqa: E402

import gpucnn as gc  # noqa: E402
from gpucnn import backend, checkpoint, data, images, inference, models  # noqa: E402
from gpucnn.images import BlankImageWarning, preprocess  # noqa: E402

predict = inference   # predict_images, class_label, add_arguments, run

ROWS, COLS = np.indices((28, 28))


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return data.load_dataset("mnist")


@pytest.fixture(scope="module")
def trained(mnist, tmp_path_factory):
    """A LeNet-5 trained on 15000 images (one pass, Adam, batch 32: ~95% test accuracy) and its run dir."""
    gc.seed(0)
    model = models.build("lenet5")
    loss, opt = gc.losses.SoftmaxCrossEntropy(), gc.optim.Adam(model, lr=2e-3)
    x = data.normalize(mnist.train_images[:15000])
    y = mnist.train_labels[:15000].astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    for i in range(0, len(order), 32):
        idx = order[i:i + 32]
        loss.forward(model.forward(x[idx]), y[idx])
        model.backward(loss.backward(), input_grad=False)
        opt.step()
    run = tmp_path_factory.mktemp("predict") / "run"
    run.mkdir()
    checkpoint.save_checkpoint(run, model, None, model_name="lenet5", epoch=1, config={"dataset": "mnist"})
    model.eval()
    return run, model


@pytest.fixture(scope="module")
def digits(mnist, trained):
    """Eight test digits (distinct labels) the model classifies confidently as they are."""
    _, model = trained
    x, y = mnist.test_images[:300], mnist.test_labels[:300]
    probs = predict.predict_images(model, x)
    chosen, seen = [], set()
    for i in range(len(x)):
        label = int(y[i])
        if label not in seen and probs[i].argmax() == label and probs[i, label] > 0.95:
            chosen.append(i)
            seen.add(label)
        if len(chosen) == 8:
            break
    assert len(chosen) == 8
    return [(x[i], int(y[i])) for i in chosen]


def gpucnn_predict(*argv):
    """`gpucnn predict ...` registered the way gpucnn/cli.py registers it; returns the exit status."""
    parser = argparse.ArgumentParser(prog="gpucnn")
    sub = parser.add_subparsers(dest="command")
    p = sub.add_parser("predict", help="classify image files")
    predict.add_arguments(p)
    p.set_defaults(func=lambda args, parser: predict.run(args))
    args = parser.parse_args(["predict", *map(str, argv)])
    return args.func(args, parser)


def predicted(stdout: str):
    """[(label, class, probability, [10 probabilities])] from gpucnn predict's output."""
    lines = stdout.strip().splitlines()
    assert len(lines) % 2 == 0, stdout
    out = []
    for head, tail in zip(lines[::2], lines[1::2]):
        label, rest = head.rsplit(": class ", 1)
        cls, prob = rest.split(", probability ")
        values = [float(tok.split(":")[1]) for tok in tail.split()]
        out.append((label, cls, float(prob), values))
    return out


def com(a):
    a = a.astype(np.float64)
    return (a * ROWS).sum() / a.sum(), (a * COLS).sum() / a.sum()


def ink_side(a, thr=30):
    ys, xs = np.nonzero(a > thr)
    return max(np.ptp(ys), np.ptp(xs)) + 1


# -- drawings ------------------------------------------------------------------------------------


def rgba_canvas(digit, ink=(20, 20, 60)):
    """Dark ink on a transparent canvas, as web canvases save it (transparent pixels are (0, 0, 0, 0))."""
    alpha = np.asarray(Image.fromarray(digit).resize((112, 112), Image.Resampling.BICUBIC))
    a = np.zeros(alpha.shape + (4,), np.uint8)
    a[..., :3] = np.array(ink, np.uint8)
    a[..., :3] *= (alpha > 0)[..., None]
    a[..., 3] = alpha
    return Image.fromarray(a, "RGBA")


def wide_canvas(digit, x0=130):
    """The digit, doubled in size, dark on white, off-centre on a 200x80 canvas."""
    canvas = np.full((80, 200), 255, np.uint8)
    big = np.asarray(Image.fromarray(255 - digit).resize((56, 56), Image.Resampling.BICUBIC))
    canvas[14:70, x0:x0 + 56] = big
    return canvas


# -- Task A: the preprocessing -------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["RGBA", "LA", "P"])
def test_transparent_canvas_is_read_as_ink(kind, trained, digits, tmp_path):
    run, _ = trained
    paths, labels = [], []
    for k, (digit, label) in enumerate(digits):
        path = tmp_path / f"{kind}{k}.png"
        if kind == "RGBA":
            rgba_canvas(digit).save(path)
        elif kind == "LA":
            a = np.stack([np.zeros_like(digit), digit], axis=-1)  # black ink, alpha = coverage
            Image.fromarray(a, "LA").save(path)
        else:  # palette PNG: every entry black, the tRNS chunk gives entry k alpha k
            im = Image.fromarray(digit, "L").convert("P")
            im.putpalette([0, 0, 0] * 256)
            im.save(path, transparency=bytes(range(256)))
        with Image.open(path) as im, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow: "Palette images with Transparency ..."
            assert im.mode == kind
            naive = np.asarray(im.convert("L"))
            alpha = np.asarray(im.convert("RGBA"))[..., 3]
        # what gpucnn predict did before: convert("L") drops the alpha: no ink above 30 anywhere
        assert naive.max() <= 30
        x = preprocess(path)
        assert x.max() >= 250 and np.count_nonzero(x > 128) >= 30
        # the same as the drawing on white paper
        assert np.abs(x.astype(int) - preprocess(255 - alpha).astype(int)).max() <= 3
        paths.append(path)
        labels.append(label)
    probs = inference.predict(inference.load(run), paths)
    assert list(probs.argmax(axis=1)) == labels


def test_white_ink_on_transparent_canvas(digits):
    digit, _ = digits[0]
    a = np.zeros(digit.shape + (4,), np.uint8)
    a[..., :3] = 255
    a[..., 3] = digit
    x = preprocess(Image.fromarray(a, "RGBA"))
    assert np.abs(x.astype(int) - preprocess(digit).astype(int)).max() <= 2


def test_premultiplied_and_sixteen_bit_inputs(digits):
    digit, _ = digits[1]
    ref = preprocess(digit).astype(int)
    paper16 = (65535 - digit.astype(np.uint32) * 257).astype(np.uint16)  # dark ink on white, 16 bits
    im16 = Image.fromarray(paper16)
    assert im16.mode == "I;16"
    assert np.abs(preprocess(im16).astype(int) - ref).max() <= 2
    im32 = Image.fromarray(paper16.astype(np.int32))
    assert im32.mode == "I"
    assert np.abs(preprocess(im32).astype(int) - ref).max() <= 2
    # premultiplied gray + alpha: black ink premultiplies to 0 everywhere
    la = Image.fromarray(np.stack([np.zeros_like(digit), digit], axis=-1), "LA").convert("La")
    assert la.mode == "La"
    assert np.abs(preprocess(la).astype(int) - ref).max() <= 2


def test_off_centre_digit_on_wide_canvas(trained, digits, tmp_path, capsys):
    run, _ = trained
    paths = []
    for k, (digit, _) in enumerate(digits):
        path = tmp_path / f"wide{k}.png"
        Image.fromarray(wide_canvas(digit, x0=10 + 17 * k)).save(path)
        paths.append(path)
        x = preprocess(path)
        cy, cx = com(x)
        assert abs(cy - 14) <= 0.6 and abs(cx - 14) <= 0.6, (cy, cx)
        assert ink_side(x) <= 21  # fitted into 20x20
    assert gpucnn_predict(run, *paths) == 0
    out = predicted(capsys.readouterr().out)
    assert [cls for _, cls, _, _ in out] == [str(label) for _, label in digits]
    assert [lbl for lbl, _, _, _ in out] == [str(p) for p in paths]


def test_no_center_is_the_plain_resize(digits, tmp_path):
    digit, _ = digits[2]
    canvas = wide_canvas(digit)
    path = tmp_path / "wide.png"
    Image.fromarray(canvas).save(path)
    plain = np.asarray(Image.fromarray(255 - canvas).resize((28, 28), Image.Resampling.LANCZOS))
    assert np.array_equal(preprocess(path, center=False), plain)
    assert np.array_equal(images.load_image(path, center=False), plain)
    # and a 28x28 image passes through --no-center untouched (inverted if it is dark on light)
    assert np.array_equal(preprocess(digit, center=False), digit)
    assert np.array_equal(preprocess(255 - digit, center=False), digit)
    with pytest.warns(BlankImageWarning, match=r"nothing stands out from its background \(gray level 255 "
                                                r"of 255\) as light ink \(check invert='no'\)"):
        assert np.array_equal(preprocess(255 - digit, center=False, invert="no"), 255 - digit)


def test_no_center_flag(trained, digits, tmp_path, capsys):
    run, model = trained
    digit, _ = digits[3]
    path = tmp_path / "wide.png"
    Image.fromarray(wide_canvas(digit)).save(path)
    assert gpucnn_predict(run, path, "--no-center") == 0
    (_, _, _, values), = predicted(capsys.readouterr().out)
    expect = predict.predict_images(model, preprocess(path, center=False)[None])[0]
    assert np.allclose(values, expect, atol=6e-5)


def test_scaled_up_on_white_paper_and_light_pencil(trained, digits, tmp_path, capsys):
    run, _ = trained
    paths = []
    for k, (digit, _) in enumerate(digits):
        big = Image.fromarray(255 - digit).resize((140, 140), Image.Resampling.BICUBIC).convert("RGB")
        big.save(tmp_path / f"paper{k}.png")
        # light pencil: strokes only 70 gray levels darker than the paper, with noise, as a JPEG
        rng = np.random.default_rng(k)
        ink = np.asarray(Image.fromarray(digit).resize((112, 112), Image.Resampling.BILINEAR)) / 255.0
        pencil = np.clip(240 - 70 * ink + rng.normal(0, 3, ink.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pencil).save(tmp_path / f"pencil{k}.jpg", quality=90)
        paths += [tmp_path / f"paper{k}.png", tmp_path / f"pencil{k}.jpg"]
        for p in paths[-2:]:
            x = preprocess(p)
            assert x.max() >= 250 and x[0].max() == 0 and x[:, 0].max() == 0  # strokes white, paper black
    assert gpucnn_predict(run, *paths) == 0
    out = predicted(capsys.readouterr().out)
    assert [cls for _, cls, _, _ in out] == [str(label) for _, label in digits for _ in range(2)]


def test_real_mnist_digit_is_not_damaged(trained, mnist, tmp_path, capsys):
    run, model = trained
    x = mnist.test_images[:300]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a real digit has ink: no warning
        pre = np.stack([preprocess(a) for a in x])
    diff = np.abs(pre.astype(int) - x.astype(int))
    assert diff.mean() < 0.5 and np.percentile(diff.reshape(len(x), -1).max(axis=1), 90) <= 4
    assert np.array_equal(predict.predict_images(model, pre).argmax(1), predict.predict_images(model, x).argmax(1))
    # the same through a PNG file and the command line
    Image.fromarray(x[0]).save(tmp_path / "mnist0.png")
    assert np.array_equal(preprocess(tmp_path / "mnist0.png"), pre[0])
    assert gpucnn_predict(run, tmp_path / "mnist0.png") == 0
    (_, cls, _, _), = predicted(capsys.readouterr().out)
    assert cls == str(int(predict.predict_images(model, x[:1]).argmax()))


def test_dust_on_a_scan_is_left_out(digits):
    digit, _ = digits[4]
    scan = np.full((200, 200), 255, np.uint8)
    scan[50:106, 50:106] = np.asarray(Image.fromarray(255 - digit).resize((56, 56), Image.Resampling.BICUBIC))
    clean = preprocess(scan)
    scan[188:192, 3:7] = 0  # a 4x4 speck far from the digit
    scan[10, 180] = 0       # and a single dark pixel
    assert np.array_equal(preprocess(scan), clean)


def test_connected_components_match_scipy():
    ndimage = pytest.importorskip("scipy.ndimage")
    rng = np.random.default_rng(0)
    for _ in range(100):
        m = rng.random((int(rng.integers(1, 30)), int(rng.integers(1, 30)))) < rng.random() * 0.6
        lab, n = ndimage.label(m, structure=np.ones((3, 3)))
        expect = []
        for k in range(1, n + 1):
            ys, xs = np.nonzero(lab == k)
            expect.append((len(ys), ys.min(), ys.max() + 1, xs.min(), xs.max() + 1))
        assert sorted(images._components(m)) == sorted(expect)


@pytest.mark.parametrize("fill", ["white", "black", "gray", "transparent", "faint"])
def test_blank_or_uniform_image_warns(fill, trained, tmp_path, capsys):
    run, _ = trained
    path = tmp_path / f"{fill}.png"
    if fill == "transparent":
        Image.new("RGBA", (64, 48), (0, 0, 0, 0)).save(path)
    elif fill == "faint":  # 5 gray levels of "ink": nothing a person would call a drawing
        a = np.full((64, 64), 250, np.uint8)
        a[20:40, 30:34] = 245
        Image.fromarray(a).save(path)
    else:
        Image.new("L", (64, 48), {"white": 255, "black": 0, "gray": 128}[fill]).save(path)
    with pytest.warns(BlankImageWarning, match="no ink found"):
        x = preprocess(path)
    assert x.shape == (28, 28) and x.max() == 0
    assert gpucnn_predict(run, path) == 0
    cap = capsys.readouterr()
    assert f"gpucnn predict: warning: {path}: no ink found" in cap.err
    assert len(predicted(cap.out)) == 1  # still predicted, but not silently


def test_fashion_framing(tmp_path):
    a = np.zeros((60, 30), np.uint8)
    a[5:55, 10:20] = 200  # a tall object, off-centre, not white
    x = preprocess(a, dataset="fashion-mnist")
    ys, xs = np.nonzero(x)
    assert np.ptp(ys) + 1 == 28 and abs(xs.mean() - 13.5) <= 1  # longer side 28, box centred
    assert abs(int(x.max()) - 200) <= 2  # no contrast stretch for Fashion-MNIST


# -- Task A: the command line ---------------------------------------------------------------------


def test_printed_line_format(trained, digits, tmp_path, capsys):
    run, model = trained
    digit, label = digits[0]
    path = tmp_path / "digit.png"
    Image.fromarray(255 - digit).save(path)
    assert gpucnn_predict(run, path) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2
    assert lines[0].startswith(f"{path}: class {label}, probability ") and "(" not in lines[0]
    assert [tok.split(":")[0] for tok in lines[1].split()] == [str(i) for i in range(10)]
    # a Fashion-MNIST checkpoint (the same weights, the dataset faked in the config): names shown
    fashion = tmp_path / "fashion"
    fashion.mkdir()
    checkpoint.save_checkpoint(fashion, model, None, model_name="lenet5", epoch=1,
                               config={"dataset": "fashion-mnist"})
    assert gpucnn_predict(fashion / "checkpoint.npz", path) == 0
    (_, cls, _, values), = predicted(capsys.readouterr().out)
    k = int(np.argmax(values))
    assert cls == f"{k} ({data.DATASETS['fashion-mnist'].classes[k]})"
    assert predict.class_label(data.DATASETS["fashion-mnist"].classes, 9) == "class 9 (Ankle boot)"
    assert predict.class_label(data.DATASETS["mnist"].classes, 7) == "class 7"


def test_save_input(trained, digits, tmp_path, capsys):
    run, _ = trained
    path = tmp_path / "wide.png"
    Image.fromarray(wide_canvas(digits[0][0])).save(path)
    assert gpucnn_predict(run, path, "--save-input", tmp_path / "seen") == 0
    with Image.open(tmp_path / "seen" / "wide_28x28.png") as im:
        assert np.array_equal(np.asarray(im), preprocess(path))


def test_cli_errors(trained, tmp_path, capsys):
    run, _ = trained
    good = tmp_path / "good.png"
    Image.new("L", (28, 28), 0).save(good)
    junk = tmp_path / "notes.txt"
    junk.write_text("not an image\n")
    for argv, needle in [
        ([run, tmp_path / "missing.png"], f"argument IMAGE: image not found: {tmp_path / 'missing.png'}"),
        ([run, good, junk], f"argument IMAGE: {junk}: not an image Pillow can read"),
        ([run, tmp_path], f"argument IMAGE: {tmp_path}: is a directory"),
        ([tmp_path / "nowhere", good], "argument checkpoint: checkpoint not found"),
        ([junk, good], f"argument checkpoint: {junk}: not a gpucnn checkpoint"),
    ]:
        assert gpucnn_predict(*argv) == 2
        cap = capsys.readouterr()
        assert cap.out == ""  # nothing predicted
        lines = cap.err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("gpucnn predict: error: ") and needle in lines[0], cap.err
    with pytest.raises(SystemExit) as info:
        gpucnn_predict(run, good, "--invert", "maybe")
    assert info.value.code == 2
    assert "argument --invert: invalid choice: 'maybe'" in capsys.readouterr().err
    if not backend.cuda_available():
        assert gpucnn_predict(run, good, "--device", "cuda") == 2
        assert "gpucnn predict: error: argument --device: device='cuda' but CUDA is not available" in \
            capsys.readouterr().err


def test_standalone_main_and_help(trained, digits, tmp_path, capsys):
    run, _ = trained
    path = tmp_path / "d.png"
    Image.fromarray(digits[0][0]).save(path)
    assert predict.main([str(run), str(path), "--invert", "no"]) == 0
    assert predicted(capsys.readouterr().out)[0][1] == str(digits[0][1])
    with pytest.raises(SystemExit):
        predict.main(["--help"])
    text = capsys.readouterr().out
    for flag in ("--invert {auto,yes,no}", "--center, --no-center", "--device {auto,cpu,cuda}", "--save-input"):
        assert flag in text, text


def test_registered_in_gpucnn_cli(trained, digits, tmp_path, capsys):
    from gpucnn import cli

    sub = next(a for a in cli.build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "--save-input" not in sub.choices["predict"].format_help():
        pytest.skip("gpucnn/cli.py does not register gpucnn.predict.add_arguments/run yet")
    run, _ = trained
    path = tmp_path / "d.png"
    Image.fromarray(255 - digits[0][0]).save(path)
    assert cli.main(["predict", str(run), str(path)]) == 0
    assert capsys.readouterr().out.startswith(f"{path}: class {digits[0][1]}, probability ")


# -- Task B: gc.load / gc.predict from Python ----------------------------------------------------


def test_load_and_predict_paths_arrays_pil(trained, digits, tmp_path):
    run, trained_model = trained
    model = inference.load(run)
    assert model.training is False and all(not layer.training for layer in model)
    assert model.dataset == "mnist" and model.loss_name == "softmax_cross_entropy"
    again = inference.load(run / "checkpoint.npz")
    for a, b in zip(model.parameters(), again.parameters()):
        assert np.array_equal(a, b)
    stack = np.stack([d for d, _ in digits])
    labels = [label for _, label in digits]
    paths = []
    for k, d in enumerate(stack):
        paths.append(tmp_path / f"{k}.png")
        Image.fromarray(255 - d).save(paths[-1])
    p_arr = inference.predict(model, stack)
    assert p_arr.shape == (8, 10) and p_arr.dtype == np.float64
    assert np.allclose(p_arr.sum(axis=1), 1) and list(p_arr.argmax(1)) == labels
    assert np.allclose(inference.predict(model, paths), p_arr, atol=1e-6)
    assert np.allclose(inference.predict(model, [str(p) for p in paths]), p_arr, atol=1e-6)
    pil = [Image.fromarray(255 - d) for d in stack]
    assert np.allclose(inference.predict(model, pil), p_arr, atol=1e-6)
    assert np.allclose(inference.predict(model, pil[0]), p_arr[:1], atol=1e-6)
    assert np.allclose(inference.predict(model, stack[0]), p_arr[:1])           # one (H, W) array
    assert np.allclose(inference.predict(model, paths[1]), p_arr[1:2], atol=1e-6)
    mixed = inference.predict(model, [paths[0], pil[1], stack[2], np.stack([stack[3]] * 3, axis=-1)])
    assert list(mixed.argmax(1)) == labels[:4]
    probs, names = inference.predict(model, stack, return_classes=True)
    assert names == [str(label) for label in labels] and np.allclose(probs, p_arr)
    # the same numbers as the command line (same preprocessing, same normalisation)
    assert np.allclose(inference.predict(trained_model, paths),
                       predict.predict_images(trained_model, np.stack([images.load_image(p) for p in paths])))


def test_predict_restores_training_mode(trained, digits):
    run, _ = trained
    model = inference.load(run)
    model.train()
    model[1].training = False  # a mixed state is restored layer by layer
    before = [layer.training for layer in model]
    inference.predict(model, digits[0][0])
    assert model.training is True and [layer.training for layer in model] == before
    model.eval()
    inference.predict(model, digits[0][0])
    assert model.training is False


def test_load_errors_and_device(trained, tmp_path):
    run, _ = trained
    with pytest.raises(ValueError, match="device must be auto, cpu or cuda, got device='tpu'"):
        inference.load(run, device="tpu")
    if not backend.cuda_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            inference.load(run, device="cuda")
        assert inference.load(run, device="auto").device == "cpu"
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        inference.load(tmp_path / "nothing")
    (tmp_path / "bad.npz").write_bytes(b"garbage")
    with pytest.raises(checkpoint.CheckpointError):
        inference.load(tmp_path / "bad.npz")


def test_predict_arguments_validated(trained, digits):
    run, _ = trained
    model = inference.load(run)
    d = digits[0][0]
    with pytest.raises(ValueError, match="invert must be auto, yes or no"):
        inference.predict(model, d, invert="maybe")
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'"):
        inference.predict(model, d, dataset="imagenet")
    with pytest.raises(ValueError, match="trained on 'mnist', not on 'cifar10'"):
        inference.predict(model, d, dataset="cifar10")
    with pytest.raises(TypeError, match="integer pixel values 0..255"):
        inference.predict(model, d.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="look like one"):
        inference.predict(model, np.zeros((40, 30, 3), np.uint8))
    with pytest.raises(FileNotFoundError, match="image not found"):
        inference.predict(model, ["/nonexistent/digit.png"])
    with pytest.raises(TypeError, match="expected an image file path"):
        inference.predict(model, [42])
    with pytest.raises(ValueError, match="no images"):
        inference.predict(model, [])
    custom = gc.layers.Sequential(*model.layers)  # no loss_name
    with pytest.raises(ValueError, match="pass loss_name="):
        inference.predict(custom, d)
    assert np.allclose(inference.predict(custom, d, loss_name="softmax_cross_entropy"), inference.predict(model, d))
    with pytest.warns(BlankImageWarning, match="image 1: no ink found"):
        inference.predict(model, np.stack([d, np.zeros_like(d)]))


def test_mse_model_scores_scaled_to_sum_to_one(digits):
    gc.seed(1)
    model = models.build("zhang2016")
    x = np.stack([d for d, _ in digits[:3]])
    probs = inference.predict(model, x)
    scores = backend.asnumpy(model.forward(data.normalize(np.stack([preprocess(a) for a in x])))).astype(np.float64)
    assert np.allclose(probs, scores / scores.sum(axis=1, keepdims=True))
    assert np.allclose(probs.sum(axis=1), 1)


def test_exported_as_gc_load_and_gc_predict(trained, digits):
    run, _ = trained
    model = gc.load(run)
    first = gc.predict(model, digits[0][0])
    # gc.predict is the function (there is no gpucnn.predict module to shadow it), also after the CLI
    importlib.import_module("gpucnn.cli").build_parser(["predict"])
    assert gc.predict is inference.predict and gc.load is inference.load
    assert np.allclose(gc.predict(model, digits[0][0]), first)


def test_float64_checkpoint_predicts_like_its_float32_twin(trained, digits, tmp_path, capsys):
    """A float64 model's inputs are converted to float64 at the boundary (they were float32: TypeError)."""
    _, model = trained
    run = tmp_path / "f64"
    run.mkdir()
    twin = models.build("lenet5", dtype=np.float64)
    twin.load_state_dict({k: v.astype(np.float64) for k, v in model.state_dict().items()})
    checkpoint.save_checkpoint(run, twin, None, model_name="lenet5", epoch=1, config={"dataset": "mnist"})
    x = np.stack([d for d, _ in digits])
    loaded = gc.load(run)
    assert loaded.dtype == np.float64
    assert np.allclose(gc.predict(loaded, x), gc.predict(model, x), atol=1e-5)
    path = tmp_path / "digit.png"
    Image.fromarray(digits[0][0]).save(path)
    assert gpucnn_predict(run, path) == 0, capsys.readouterr().err
    assert predicted(capsys.readouterr().out)[0][1] == str(digits[0][1])


def test_importing_inference_is_light():
    import subprocess
    import sys

    code = ("import sys, gpucnn; before = set(sys.modules); from gpucnn.inference import load, predict; "
            "print(sorted(set(sys.modules) - before))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    # nothing beyond the module itself (already there when gpucnn/__init__.py exports gc.predict);
    # Pillow is imported only when an image is read
    assert out.strip() in ("[]", "['gpucnn.inference']"), out

"""Load a trained model and classify images: ``gc.load``, ``gc.predict`` and ``gpucnn predict``.

:func:`predict` preprocesses images exactly as ``gpucnn predict`` does
(:func:`gpucnn.images.preprocess`: transparency composited onto white,
polarity detected, the ink cropped, fitted into 20x20 and centred by its
centre of mass in 28x28, normalised with the training dataset's statistics)
and returns class probabilities.

>>> import tempfile, numpy as np
>>> from gpucnn import checkpoint, data, models
>>> from gpucnn.inference import load, predict
>>> run = tempfile.mkdtemp()   # stands for a run directory written by `gpucnn train`
>>> _ = checkpoint.save_checkpoint(run, models.build("lenet5"), model_name="lenet5",
...                                config={"dataset": "mnist"})
>>> model = load(run)          # a run directory or its checkpoint.npz; eval mode, on the CPU
>>> digits = data.load_dataset("mnist").test_images[:3]       # (3, 28, 28) uint8
>>> probs = predict(model, digits)                             # also file paths or PIL images
>>> probs.shape, bool(np.allclose(probs.sum(axis=1), 1.0))
((3, 10), True)
>>> probs, names = predict(model, [digits[0]], return_classes=True)
>>> names[0] in data.DATASETS["mnist"].classes   # the most probable class's name
True

Nothing heavy is imported with this module; Pillow is imported when an image
is read.

``gpucnn predict CHECKPOINT IMAGE...`` (:func:`add_arguments`, :func:`run`)
prints, per image, the class and its probability and then all class
probabilities::

    digit.png: class 7, probability 0.9876
      0:0.0001  1:0.0002  2:0.0050  ...

The class name is added only for datasets whose classes are not the digits
(Fashion-MNIST: ``shoe.png: class 9 (Ankle boot), probability 0.9102``).
Warnings (no ink found) go to stderr as ``gpucnn predict: warning: ...``;
errors as ``gpucnn predict: error: ...`` with exit status 2 (bad arguments:
a missing or unreadable image, an unusable checkpoint, an unavailable device)
or 1 (a runtime failure such as an unwritable ``--save-input`` directory).
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings
from pathlib import Path

import numpy as np

from . import backend
from ._io import atomic_open, stdout_closed, stdout_gone
from ._utils import inputs_for
from .images import INVERT_CHOICES, preprocess

__all__ = ["load", "predict", "predict_images", "inputs_for", "probabilities", "class_label",
           "format_prediction", "add_arguments", "run", "main"]

EXIT_FAILURE, EXIT_USAGE = 1, 2


def load(source: str | os.PathLike, device: str = "cpu"):
    """The trained model of a run directory or checkpoint file, in eval mode, on ``device``.

    Args:
        source: a run directory (holding ``checkpoint.npz``) or a checkpoint file.
        device: ``"cpu"`` (default), ``"cuda"``, or ``"auto"`` (CUDA when CuPy
            sees a GPU).

    Returns:
        The :class:`~gpucnn.layers.Sequential` with its trained weights.  Its
        ``loss_name`` says how to read its outputs and ``dataset`` is the
        dataset it was trained on (the checkpoint's ``config["dataset"]``),
        which :func:`predict` uses by default.

    Raises:
        ValueError: an unknown device, or ``"cuda"`` without a usable GPU.
        FileNotFoundError: no checkpoint at ``source``.
        gpucnn.checkpoint.CheckpointError: an unreadable, tampered or
            unknown-model checkpoint (a ``ValueError``).
    """
    from . import checkpoint

    dev = backend.resolve_device(device)[0]
    model, ckpt = checkpoint.restore_model(source, device=dev)
    model.dataset = ckpt.config.get("dataset", "mnist")
    model.eval()
    return model


def _as_list(images):
    """images -> (list of single images, names for messages)."""
    if isinstance(images, (str, os.PathLike)):
        return [images], [str(images)]
    if isinstance(images, np.ndarray) or type(images).__module__.startswith("cupy"):
        if images.ndim == 2:
            return [images], ["image 0"]
        if images.ndim == 3:
            if images.shape[-1] <= 4 < images.shape[1]:
                raise ValueError(f"images of shape {images.shape} look like one (H, W, C) colour image; a 3-d "
                                 f"array is a stack (N, H, W) of gray images: pass a colour image in a list, "
                                 f"predict(model, [image])")
            return list(images), [f"image {i}" for i in range(len(images))]
        raise ValueError(f"images must be a list of images, an (N, H, W) array or one (H, W) array, "
                         f"got an array of shape {images.shape}")
    if type(images).__module__.startswith("PIL."):
        return [images], ["image 0"]
    try:
        items = list(images)
    except TypeError:
        raise TypeError(f"images must be a list of file paths, PIL images or uint8 arrays, got "
                        f"{type(images).__name__}") from None
    return items, [str(x) if isinstance(x, (str, os.PathLike)) else f"image {i}" for i, x in enumerate(items)]


def predict(model, images, *, dataset: str | None = None, center: bool = True, invert: str = "auto",
            return_classes: bool = False, loss_name: str | None = None, batch_size: int = 256):
    """Class probabilities for images, preprocessed as by ``gpucnn predict``.

    Args:
        model: a model from :func:`load` or :func:`gpucnn.models.build` (any
            device and float dtype; the inputs follow it: float64 models get
            float64 inputs).  It runs in eval mode; every
            layer's training flag is restored afterwards.
        images: a list of file paths, PIL images and/or integer arrays
            (0..255) of shape ``(H, W)`` (gray) or ``(H, W, C)`` (C = 2 gray +
            alpha, 3 RGB, 4 RGBA); or one ``(N, H, W)`` uint8 array, one
            ``(H, W)`` array, one path or one PIL image.  Any sizes.
        dataset: the training dataset, for the normalisation, the framing
            and the class names: default ``model.dataset`` (set by
            :func:`load`), else ``"mnist"``.
        center: MNIST-style framing (the default); ``False``: a plain resize
            to 28x28 (``--no-center``).
        invert: ``"auto"`` (invert when the border is light), ``"yes"``, ``"no"``.
        return_classes: also return the predicted classes' names.
        loss_name: ``"softmax_cross_entropy"`` (outputs are logits) or
            ``"mse"`` (sigmoid scores); default ``model.loss_name`` (set by
            :func:`gpucnn.models.build`).  Required for a model without one.
        batch_size: images per forward pass.

    Returns:
        ``(N, K)`` float64 NumPy probabilities (rows sum to 1): the softmax of
        the logits, or for MSE models (``zhang2016``) the sigmoid scores
        scaled to sum to 1.  With ``return_classes=True``, ``(probs, names)``
        where ``names[i]`` is the name of image ``i``'s most probable class
        (``"7"`` for MNIST, ``"Ankle boot"`` for Fashion-MNIST class 9).

    Warns:
        gpucnn.images.BlankImageWarning: an image has no ink (blank or
        uniform); its row is still computed.

    Raises:
        FileNotFoundError: an image file is missing.
        ValueError: an unreadable image, a bad array shape or value range, a
            bad ``invert``, an unknown ``dataset`` or ``loss_name``, or no
            ``loss_name`` known for the model.
        TypeError: an unsupported image object or array dtype.
    """
    from . import data

    if invert not in INVERT_CHOICES:
        raise ValueError(f"invert must be auto, yes or no, got invert={invert!r}")
    if dataset is None:
        dataset = getattr(model, "dataset", None) or "mnist"
    plain = dataset in ("cifar10", "folder")
    if not plain and dataset not in data.DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known datasets: {', '.join(data.DATASET_NAMES)}")
    if loss_name is None:
        loss_name = getattr(model, "loss_name", None)
    if loss_name is None:
        raise ValueError("the model has no loss_name attribute (it was not built by gpucnn.models.build); "
                         "pass loss_name='softmax_cross_entropy' (logits) or 'mse' (sigmoid scores)")
    if loss_name not in ("softmax_cross_entropy", "mse"):
        raise ValueError(f"loss_name must be 'softmax_cross_entropy' or 'mse', got loss_name={loss_name!r}")
    if not (isinstance(batch_size, (int, np.integer)) and not isinstance(batch_size, bool) and batch_size > 0):
        raise ValueError(f"batch_size must be a positive integer, got batch_size={batch_size!r}")
    items, names = _as_list(images)
    if not items:
        raise ValueError("no images given")
    if plain:
        shape = getattr(model, "in_shape", None)
        trained_on = getattr(model, "dataset", None)
        if trained_on is not None and trained_on != dataset:
            raise ValueError(f"the model was trained on {trained_on!r}, not on {dataset!r}: its images are "
                             f"prepared as {trained_on}'s")
        if shape is None or getattr(model, "mean", None) is None:
            raise ValueError(f"a model trained on {dataset!r} must carry in_shape, mean and std (load it "
                             f"with gpucnn.inference.load)")
        arrays = np.stack([prepare_plain(im, shape, nm) for im, nm in zip(items, names)])
    else:
        arrays = np.stack([preprocess(im, dataset=dataset, invert=invert, center=center, name=nm)
                           for im, nm in zip(items, names)])
    probs = predict_images(model, arrays, dataset, loss_name, batch_size=int(batch_size),
                           stats=(model.mean, model.std) if plain else None)
    if not return_classes:
        return probs
    classes = getattr(model, "classes", None) or data.DATASETS[dataset].classes
    if probs.shape[1] != len(classes):
        raise ValueError(f"the model has {probs.shape[1]} outputs but {dataset} has {len(classes)} classes")
    return probs, [classes[int(c)] for c in probs.argmax(axis=1)]


def prepare_plain(image, in_shape, name: str) -> np.ndarray:
    """One image for a model trained on CIFAR-10 or an image folder: uint8 ``in_shape`` ``(C, H, W)``,
    prepared as its training images were (:func:`gpucnn.data.folder.fit`: resized with the aspect
    ratio kept, centre-cropped, converted to gray or RGB) -- no MNIST framing or inversion."""
    from PIL import Image

    from .data.folder import fit
    from .images import _open

    c, h, w = (int(v) for v in in_shape)
    if isinstance(image, (str, os.PathLike)):
        im = _open(image)
    elif isinstance(image, Image.Image):
        im = image
    elif isinstance(image, np.ndarray):
        a = np.asarray(image)
        if a.dtype != np.uint8 or not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] in (3, 4))):
            raise ValueError(f"{name}: expected a uint8 array (H, W) or (H, W, 3|4), got {a.dtype} {a.shape}")
        im = Image.fromarray(a)
    else:
        raise TypeError(f"{name}: expected an image file path, a PIL image or a uint8 array, got "
                        f"{type(image).__name__}")
    if h != w:
        raise ValueError(f"{name}: the model takes {h}x{w} images; only square inputs are prepared here")
    return fit(im, h, c)


# -- the model: probabilities ---------------------------------------------------------------------------------


def probabilities(outputs, loss_name: str) -> np.ndarray:
    """Class probabilities from model outputs: softmax of logits, or (MSE models,
    whose sigmoid outputs are per-class scores) the scores scaled to sum to 1."""
    out = np.asarray(backend.asnumpy(outputs), dtype=np.float64)
    if loss_name == "mse":
        s = np.clip(out, 0, None)
        return s / np.maximum(s.sum(axis=1, keepdims=True), 1e-12)
    z = out - out.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _modules(model):
    out, stack = [], [model]
    while stack:
        m = stack.pop()
        out.append(m)
        inner = getattr(m, "layers", None)
        if isinstance(inner, (list, tuple)):
            stack.extend(inner)
    return out


def predict_images(model, images: np.ndarray, dataset: str = "mnist", loss_name: str = "softmax_cross_entropy",
                   device: str | None = None, batch_size: int = 256, stats=None) -> np.ndarray:
    """``(N, 28, 28)`` or ``(N, C, H, W)`` uint8 images (already preprocessed) -> ``(N, K)`` class
    probabilities (NumPy).

    Normalised with ``dataset``'s statistics (``stats``: ``(mean, std)`` per channel instead) and converted to the model's
    parameter dtype (:func:`inputs_for`), run in eval mode (every layer's
    training flag is restored afterwards), in batches of ``batch_size``, on
    ``device`` (default: where the model's parameters are).
    """
    from . import data

    u8 = np.asarray(images, dtype=np.uint8)
    x = inputs_for(model, data.normalize(u8, dataset) if stats is None else
                   data.normalize(u8, mean=stats[0], std=stats[1]))
    if device is None:
        device = getattr(model, "device", "cpu")
        device = device if device in backend.DEVICES else "cpu"
    modes = [(m, m.training) for m in _modules(model) if hasattr(m, "training")]
    model.eval()
    try:
        outs = [probabilities(model.forward(backend.to_device(x[i:i + batch_size], device)), loss_name)
                for i in range(0, len(x), batch_size)]
    finally:
        for m, was in modes:
            m.training = was
    return np.concatenate(outs) if outs else np.zeros((0, 0))


# -- printing ----------------------------------------------------------------------------------


def _digit_classes(classes) -> bool:
    return all(c == str(i) for i, c in enumerate(classes))


def class_label(classes, c: int) -> str:
    """``"class 7"``, or ``"class 9 (Ankle boot)"`` when the classes are not the digits."""
    return f"class {c}" if _digit_classes(classes) else f"class {c} ({classes[c]})"


def format_prediction(label: str, probs: np.ndarray, classes) -> str:
    """The two lines ``gpucnn predict`` prints for one image."""
    c = int(np.argmax(probs))
    return (f"{label}: {class_label(classes, c)}, probability {probs[c]:.4f}\n"
            + "  " + "  ".join(f"{i}:{v:.4f}" for i, v in enumerate(probs)))


# -- the command -------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add ``gpucnn predict``'s arguments to ``parser``."""
    parser.description = parser.description or (
        "Classify image files (any size; gray, colour or transparent; drawn dark on light or light on "
        "dark): composited onto white, inverted when the border is light, the ink cropped, scaled to fit "
        "20x20 and centred by its centre of mass in 28x28 as MNIST was made (--no-center: a plain resize), "
        "normalised like the training data.  Prints each image's class and the class probabilities.")
    parser.add_argument("checkpoint", help="checkpoint.npz or the run directory holding it")
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files (PNG, JPEG, BMP, GIF, ...)")
    parser.add_argument("--invert", choices=INVERT_CHOICES, default="auto",
                        help="invert gray levels (MNIST digits are white on black): auto = when the image's "
                             "border is light (default: auto)")
    parser.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
                        help="frame like MNIST: ink cropped, fitted into 20x20 and centred by its centre of "
                             "mass in 28x28 (default); --no-center: a plain resize to 28x28, for images "
                             "already framed like MNIST")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="cpu",
                        help="where to run the model (default: cpu)")
    parser.add_argument("--save-input", metavar="DIR", default=None,
                        help="also write the 28x28 image the model sees for each IMAGE as "
                             "DIR/<name>_28x28.png (to check the preprocessing)")
    return parser


def _say(kind: str, msg: str) -> None:
    print(f"gpucnn predict: {kind}: {msg}", file=sys.stderr, flush=True)


def _save_inputs(directory: str, paths, arrays) -> None:
    from PIL import Image

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    used = set()
    for path, a in zip(paths, arrays):
        if a.ndim == 3:     # (C, H, W): gray or RGB as Pillow takes it
            a = a[0] if a.shape[0] == 1 else a.transpose(1, 2, 0)
        stem, size = Path(path).stem or "image", f"{a.shape[0]}x{a.shape[1]}"
        target, k = out / f"{stem}_{size}.png", 2
        while target in used:
            target, k = out / f"{stem}_{size}-{k}.png", k + 1
        used.add(target)
        with atomic_open(target) as f:      # a full disk leaves no empty or half-written PNG
            Image.fromarray(a).save(f, format="PNG")


def run(args) -> int:
    """Run ``gpucnn predict`` with parsed ``args`` (see :func:`add_arguments`); returns the exit status."""
    from . import checkpoint as ck
    from . import data, models

    invert = getattr(args, "invert", "auto")
    center = getattr(args, "center", True)
    if invert not in INVERT_CHOICES:
        _say("error", f"argument --invert: must be auto, yes or no, got {invert!r}")
        return EXIT_USAGE
    try:
        device = backend.resolve_device(getattr(args, "device", "cpu"))[0]
    except ValueError as exc:
        _say("error", f"argument --device: {exc}")
        return EXIT_USAGE
    try:
        model, ckpt = ck.restore_model(args.checkpoint, device=device)
    except (FileNotFoundError, ck.CheckpointError) as exc:
        _say("error", f"argument checkpoint: {exc}")
        return EXIT_USAGE
    dataset = ckpt.config.get("dataset", "mnist")
    plain = dataset in ("cifar10", "folder")
    if not plain and dataset not in data.DATASETS:
        _say("error", f"argument checkpoint: {ckpt.path}: trained on an unknown dataset {dataset!r} "
                      f"(known: {', '.join(data.DATASET_NAMES)})")
        return EXIT_USAGE
    if plain and getattr(model, "mean", None) is None:
        _say("error", f"argument checkpoint: {ckpt.path}: trained on {dataset!r} but records no data "
                      f"statistics (data.mean / data.std)")
        return EXIT_USAGE
    classes = getattr(model, "classes", None) or data.DATASETS[dataset].classes
    loss = getattr(model, "loss_name", None) or models.loss_name(ckpt.model)
    if plain and (invert != "auto" or not center):
        _say("error", f"argument --invert/--no-center: MNIST framing only; {ckpt.path} was trained on {dataset!r}, "
                      f"whose images are resized and centre-cropped to {'x'.join(map(str, model.in_shape))} as in "
                      f"training")
        return EXIT_USAGE

    arrays, errors = [], []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for path in args.images:
            try:
                arrays.append(prepare_plain(path, model.in_shape, str(path)) if plain else
                              preprocess(path, dataset=dataset, invert=invert, center=center, name=str(path)))
            except FileNotFoundError as exc:
                errors.append(f"argument IMAGE: {exc}")
            except (ValueError, TypeError) as exc:
                errors.append(f"argument IMAGE: {exc}")
    if errors:
        for e in errors:
            _say("error", e)
        return EXIT_USAGE
    for w in caught:
        if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning)):
            _say("warning", str(w.message))
    if getattr(args, "save_input", None):
        try:
            _save_inputs(args.save_input, args.images, arrays)
        except OSError as exc:
            _say("error", f"argument --save-input: cannot write to {args.save_input}: {exc}")
            return EXIT_FAILURE
    probs = predict_images(model, np.stack(arrays), dataset, loss, device,
                           stats=(model.mean, model.std) if plain else None)
    for path, pr in zip(args.images, probs):
        print(format_prediction(str(path), pr, classes))
    sys.stdout.flush()
    return 0


def main(argv=None) -> int:
    """``python -m gpucnn.inference CHECKPOINT IMAGE...`` (the same as ``gpucnn predict``)."""
    parser = add_arguments(argparse.ArgumentParser(prog="gpucnn predict"))
    try:
        return run(parser.parse_args(argv))
    except BrokenPipeError:
        if stdout_closed():
            return stdout_gone()
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

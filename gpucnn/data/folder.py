"""Image folders of one's own: ``DIR/train/<class>/`` + ``DIR/test/<class>/``, or ``DIR/<class>/``.

Layouts (:func:`scan`)
    ``DIR/train/<class>/*`` and ``DIR/test/<class>/*``: the two splits as
    given; every class of ``test/`` must be one of ``train/``'s.  Or
    ``DIR/<class>/*`` alone, split by ``val_split`` (a fraction of every class,
    drawn by ``numpy.random.default_rng([seed, 26])``: the same files whatever
    the machine).  Class names are the folder names, sorted; label ``i`` is
    ``classes[i]``.  Files are those with the suffixes of :data:`SUFFIXES`
    (any case); hidden files are ignored.

Decoding (:func:`decode`)
    Pillow opens PNG, JPEG, BMP, GIF (the first frame) and WebP; palette,
    alpha (dropped, as Pillow's ``convert("RGB")`` does) and 16-bit images
    become ``L`` (one channel) or ``RGB`` (three).  Each image is resized with its aspect
    ratio kept so that its shorter side is ``image_size`` (bilinear, Pillow's
    antialiasing filter when shrinking), then centre-cropped to
    ``image_size`` x ``image_size``.  ``image_size`` defaults to the most
    common ``min(width, height)`` in the folder; ``channels`` to 1 when every
    image is grayscale (mode ``L``/``LA``/``I``/``I;16``/``1``; a palette
    image counts as colour), else 3.

The cache (:func:`load_folder`)
    The decoded folder is written once, in parallel (a thread pool: Pillow
    releases the GIL while it decodes) with a progress bar, to
    ``cache_dir("folder")/<key>.u8`` (raw uint8, ``(N, C, S, S)``, train then
    test, memory-mapped when read) beside ``<key>.json`` (the header: shape,
    labels, classes, statistics).  The key is the SHA-256 of every file's
    relative path, size and modification time and of the options, so a
    second run starts at once and any changed, added or removed file is
    noticed.  No pickle: JSON and raw bytes only.

Bad files
    A file Pillow cannot read is named with its reason; with ``skip_bad`` it is
    left out and counted, otherwise :class:`FolderError` stops the run before
    any training, listing them.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from .._io import atomic_open
from .idx import DataError

__all__ = ["FolderError", "SUFFIXES", "is_image_folder", "scan", "decode", "fit", "load_folder", "CACHE_VERSION"]

#: The image files looked at (their suffix, any case).
SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
#: Bumped whenever the cache's bytes for the same files would change.
CACHE_VERSION = 1
_GRAY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}
_SPLIT_SEED = 26


class FolderError(DataError):
    """An image folder that cannot be used; the message names the folder or file and what was expected."""


def _images_in(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in SUFFIXES)


def _class_dirs(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith("."))


def is_image_folder(directory) -> bool:
    """Whether ``directory`` has the layout of an image folder (``train/<class>/`` or ``<class>/``
    holding image files) -- what ``gpucnn train --data-dir`` recognises without ``--dataset``."""
    d = Path(directory).expanduser()
    if not d.is_dir():
        return False
    root = d / "train" if (d / "train").is_dir() else d
    return any(_images_in(c) for c in _class_dirs(root))


def _classes_of(root: Path, what: str) -> dict[str, list[Path]]:
    if not root.is_dir():
        raise FolderError(f"{root}: no such directory; expected {what} with one sub-folder per class")
    out = {c.name: _images_in(c) for c in _class_dirs(root)}
    if not out:
        raise FolderError(f"{root}: no class folders; expected {what} with one sub-folder per class, "
                          f"each holding images ({', '.join(SUFFIXES)})")
    empty = [n for n, files in out.items() if not files]
    if empty:
        raise FolderError(f"{root}: class folder{'s' if len(empty) > 1 else ''} "
                          f"{', '.join(repr(str(root / n)) for n in empty)} hold{'' if len(empty) > 1 else 's'} "
                          f"no images ({', '.join(SUFFIXES)}); remove {'them' if len(empty) > 1 else 'it'} or add images")
    return out


def scan(directory, val_split: float | None = None, seed: int = 0):
    """``(classes, train, test)``: the class names and the ``[(path, label), ...]`` of each split.

    Raises:
        FolderError: no such folder, no class folders, an empty class folder, a class only in
            ``test/``, fewer than two classes, ``val_split`` with a ``train/``+``test/`` layout or
            missing without one, or a split that leaves a class without training images.
    """
    d = Path(directory).expanduser()
    if not d.is_dir():
        raise FolderError(f"{d}: no such directory; expected an image folder (DIR/train/<class>/ and "
                          f"DIR/test/<class>/, or DIR/<class>/ with --val-split)")
    if (d / "train").is_dir():
        if val_split is not None:
            raise FolderError(f"{d} has train/ and test/ folders: its split is given, so --val-split "
                              f"(val_split={val_split}) does not apply")
        tr = _classes_of(d / "train", f"{d / 'train'}")
        te = _classes_of(d / "test", f"{d / 'test'} (the test split)")
        only_test = sorted(set(te) - set(tr))
        if only_test:
            raise FolderError(f"{d / 'test'}: class{'es' if len(only_test) > 1 else ''} {only_test} "
                              f"{'are' if len(only_test) > 1 else 'is'} only in test/, not in train/ "
                              f"(the classes are train/'s folders: {sorted(tr)})")
        classes = sorted(tr)
        train = [(p, i) for i, c in enumerate(classes) for p in tr[c]]
        test = [(p, i) for i, c in enumerate(classes) for p in te.get(c, [])]
    else:
        if val_split is None:
            raise FolderError(f"{d} has no train/ folder, so it is DIR/<class>/ alone: pass --val-split "
                              f"FRACTION (e.g. 0.1) to hold out that share of every class for testing")
        if not 0 < val_split < 1:
            raise FolderError(f"val_split must be a fraction in (0, 1), got val_split={val_split!r}")
        per = _classes_of(d, str(d))
        classes = sorted(per)
        rng = np.random.default_rng([int(seed), _SPLIT_SEED])
        train, test = [], []
        for i, c in enumerate(classes):
            files = per[c]
            order = rng.permutation(len(files))
            n_test = int(round(val_split * len(files)))
            if n_test >= len(files):
                raise FolderError(f"{d / c}: --val-split {val_split} of its {len(files)} images leaves none "
                                  f"to train on; add images or lower --val-split")
            held = set(order[:n_test].tolist())
            train += [(files[j], i) for j in range(len(files)) if j not in held]
            test += [(files[j], i) for j in range(len(files)) if j in held]
    if len(classes) < 2:
        raise FolderError(f"{d}: only one class ({classes[0]!r}); a classifier needs at least two class "
                          f"folders")
    return classes, train, test


def _open(path: Path):
    """The decoded Pillow image (first frame), or an OSError/ValueError saying why not."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            im.load()
            return im.copy() if getattr(im, "n_frames", 1) == 1 else im.convert(im.mode)
    except UnidentifiedImageError:
        raise ValueError("not an image Pillow can read (PNG, JPEG, BMP, GIF, WebP)") from None
    except Image.DecompressionBombError as exc:
        raise ValueError(f"too large ({exc})") from None
    except (OSError, SyntaxError, EOFError) as exc:
        raise ValueError(f"cannot be decoded: {exc or type(exc).__name__}") from None


def _probe(path: Path):
    """``(min side, gray?)`` from the header alone, or the reason it cannot be read."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return min(im.size), im.mode in _GRAY_MODES
    except UnidentifiedImageError:
        return "not an image Pillow can read (PNG, JPEG, BMP, GIF, WebP)"
    except (OSError, SyntaxError, EOFError, ValueError) as exc:
        return f"cannot be read: {exc or type(exc).__name__}"


def decode(path, image_size: int, channels: int) -> np.ndarray:
    """One file as uint8 ``(channels, image_size, image_size)`` (see the module docstring)."""
    return fit(_open(Path(path)), image_size, channels)


def fit(im, image_size: int, channels: int) -> np.ndarray:
    """A Pillow image as uint8 ``(channels, image_size, image_size)``: converted to ``L`` or ``RGB``,
    resized with its aspect ratio kept so that its shorter side is ``image_size``, centre-cropped.
    ``gpucnn predict`` prepares images for a folder- or CIFAR-trained model with it too."""
    from PIL import Image

    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        im = im.point(lambda v: v / 256).convert("L") if im.mode != "I" else im.convert("L")
    im = im.convert("L" if channels == 1 else "RGB")
    w, h = im.size
    scale = image_size / min(w, h)
    nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
    if (nw, nh) != (w, h):
        im = im.resize((nw, nh), Image.BILINEAR, reducing_gap=None)
    left, top = (nw - image_size) // 2, (nh - image_size) // 2
    im = im.crop((left, top, left + image_size, top + image_size))
    a = np.asarray(im, dtype=np.uint8)
    return a[None] if a.ndim == 2 else a.transpose(2, 0, 1)


def _key(directory: Path, files, options: dict) -> str:
    h = hashlib.sha256(json.dumps({"version": CACHE_VERSION, "options": options}, sort_keys=True).encode())
    for p in files:
        st = p.stat()
        h.update(f"{p.relative_to(directory).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


def _bar(progress: bool, total: int, desc: str):
    if progress:
        try:
            from tqdm.auto import tqdm
            return tqdm(total=total, desc=desc, unit="image", disable=None, file=sys.stderr, leave=False)
        except ImportError:
            pass
    return None


def _parallel(fn, items, progress: bool, desc: str, workers: int | None):
    """``[fn(item) or its exception, ...]`` in order, from a thread pool, with a progress bar."""
    bar = _bar(progress, len(items), desc)
    out = [None] * len(items)

    def run(i):
        try:
            out[i] = fn(items[i])
        except (ValueError, OSError) as exc:
            out[i] = exc
        return i

    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        for _ in pool.map(run, range(len(items))):
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    return out


def _check_int(name, value, allowed=None):
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1 or (
            allowed is not None and value not in allowed):
        want = f"one of {allowed}" if allowed else "a positive integer"
        raise FolderError(f"{name} must be {want}, got {name}={value!r}")


def load_folder(directory, *, image_size: int | None = None, channels: int | None = None,
                val_split: float | None = None, seed: int = 0, skip_bad: bool = False,
                progress: bool = True, cache: str | os.PathLike | None = None, workers: int | None = None,
                log=None):
    """An image folder as a :class:`~gpucnn.data.Dataset` (``name="folder"``), decoded once and cached.

    Args:
        directory: the folder (see the module docstring for its layouts).
        image_size: the side of the square images (default: the most common shorter side).
        channels: 1 or 3 (default: 1 when every image is grayscale, else 3).
        val_split: for the ``DIR/<class>/`` layout, the share of each class held out for testing.
        seed: picks the held-out files (with ``val_split``).
        skip_bad: leave unreadable files out (counted in the log) instead of raising.
        progress: a progress bar while decoding (on stderr, when it is a terminal).
        cache: the cache directory (default ``cache_dir("folder")``).
        workers: decoding threads (default: the CPUs, at most 8).
        log: a function taking one line (default: print to stderr).

    Raises:
        FolderError: see :func:`scan`; unreadable files (without ``skip_bad``), every one named
            with its reason; a bad ``image_size`` / ``channels``.
    """
    from .dataset import Dataset
    from .lookup import cache_dir

    say = log or (lambda msg: print(msg, file=sys.stderr))
    _check_int("image_size", image_size)
    _check_int("channels", channels, (1, 3))
    d = Path(directory).expanduser().resolve()
    classes, train, test = scan(d, val_split, seed)
    files = [p for p, _ in train + test]
    options = {"image_size": image_size, "channels": channels, "val_split": val_split,
               "seed": int(seed) if val_split is not None else None, "skip_bad": bool(skip_bad)}
    root = Path(cache) if cache is not None else cache_dir("folder")
    key = _key(d, sorted(set(files)), options)
    header_path, data_path = root / f"{key}.json", root / f"{key}.u8"
    header = _read_header(header_path, data_path)
    if header is None:
        header = _build_cache(d, classes, train, test, options, header_path, data_path, progress, workers, say)
    else:
        say(f"image folder {d}: decoded copy from the cache, {header_path}")
    n_tr, n_te = header["train"], header["test"]
    shape = tuple(header["shape"])
    arr = np.memmap(data_path, dtype=np.uint8, mode="r", shape=(n_tr + n_te,) + shape)
    labels = np.asarray(header["labels"], dtype=np.int64)
    return Dataset(name="folder", classes=list(header["classes"]), train_images=arr[:n_tr],
                   train_labels=labels[:n_tr], test_images=arr[n_tr:], test_labels=labels[n_tr:],
                   source=d, mean=tuple(header["mean"]), std=tuple(header["std"]))


def _read_header(header_path: Path, data_path: Path):
    """The cache's header when it and its data file agree, else None (the folder is decoded again)."""
    try:
        header = json.loads(header_path.read_text(encoding="utf-8"))
        size = (header["train"] + header["test"]) * int(np.prod(header["shape"]))
        if header.get("version") != CACHE_VERSION or data_path.stat().st_size != size:
            return None
        return header
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _channel_stats(images: np.ndarray, chunk: int = 2048):
    """Per-channel mean and std of ``images / 255`` (N, C, H, W), in float64 chunks (never a float
    copy of the whole set); a constant channel gets std 1e-3, so it still normalises."""
    c = images.shape[1]
    s1, s2 = np.zeros(c), np.zeros(c)
    for i in range(0, len(images), chunk):
        b = images[i:i + chunk].astype(np.float64) / 255.0
        s1 += b.sum(axis=(0, 2, 3))
        s2 += (b * b).sum(axis=(0, 2, 3))
    n = max(1, len(images) * images.shape[2] * images.shape[3])
    mean = s1 / n
    return mean, np.maximum(np.sqrt(np.maximum(s2 / n - mean * mean, 0.0)), 1e-3)


def _build_cache(d, classes, train, test, options, header_path, data_path, progress, workers, say):
    probes = _parallel(_probe, [p for p, _ in train + test], False, "", workers)
    bad = {p: r for (p, _), r in zip(train + test, probes) if isinstance(r, str)}
    bad.update({p: f"cannot be read: {r}" for (p, _), r in zip(train + test, probes) if isinstance(r, Exception)})
    good = [r for r in probes if isinstance(r, tuple)]
    if not good:
        raise FolderError(f"{d}: none of its {len(probes)} image files can be read; first: "
                          + "; ".join(f"{p}: {r}" for p, r in list(bad.items())[:3]))
    size = options["image_size"] or Counter(s for s, _ in good).most_common(1)[0][0]
    channels = options["channels"] or (1 if all(g for _, g in good) else 3)
    say(f"image folder {d}: {len(classes)} classes, {len(train)} training / {len(test)} test files; "
        f"decoding to {channels}x{size}x{size} into {data_path.parent}")
    items = [(p, y) for p, y in train + test if p not in bad]
    decoded = _parallel(lambda it: decode(it[0], size, channels), items, progress, "decoding", workers)
    for (p, _), r in zip(items, decoded):
        if isinstance(r, Exception):
            bad[p] = str(r)
    if bad:
        listed = "\n  ".join(f"{p}: {r}" for p, r in sorted(bad.items())[:20])
        more = f"\n  ... and {len(bad) - 20} more" if len(bad) > 20 else ""
        if not options["skip_bad"]:
            raise FolderError(f"{d}: {len(bad)} image file{'s' if len(bad) > 1 else ''} cannot be used:\n  "
                              f"{listed}{more}\nFix or remove {'them' if len(bad) > 1 else 'it'}, or pass "
                              f"--skip-bad-images to train without {'them' if len(bad) > 1 else 'it'}")
        say(f"skipped {len(bad)} bad image file{'s' if len(bad) > 1 else ''} (--skip-bad-images):\n  "
            f"{listed}{more}")
    train_paths = {q for q, _ in train}
    keep = [(y, r, p in train_paths) for (p, y), r in zip(items, decoded) if not isinstance(r, Exception)]
    tr = [(y, r) for y, r, is_tr in keep if is_tr]
    te = [(y, r) for y, r, is_tr in keep if not is_tr]
    missing = sorted(set(range(len(classes))) - {y for y, _ in tr})
    if missing:     # every file of a class was bad and skipped
        raise FolderError(f"{d}: class{'es' if len(missing) > 1 else ''} {[classes[i] for i in missing]} "
                          f"{'have' if len(missing) > 1 else 'has'} no usable training image")
    images = np.stack([r for _, r in tr + te]) if tr + te else np.zeros((0, channels, size, size), np.uint8)
    mean, std = _channel_stats(images[:len(tr)])
    header = {"version": CACHE_VERSION, "folder": str(d), "shape": [channels, size, size], "train": len(tr),
              "test": len(te), "classes": list(classes), "labels": [int(y) for y, _ in tr + te],
              "mean": mean.tolist(), "std": std.tolist(), "skipped": len(bad), "options": options}
    header_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(data_path) as f:
        f.write(np.ascontiguousarray(images).tobytes())
    with atomic_open(header_path, "w") as f:      # written last: a header names a complete data file
        f.write(json.dumps(header, indent=1))
    return header

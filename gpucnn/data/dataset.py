"""Loading a dataset by name, and normalising its images for a model."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import backend
from .._utils import check_integer_labels
from . import fetch as _fetch_module
from .idx import fail, read_idx
from .lookup import ENV_VAR, cache_dir, candidates, find_file, locate
from .specs import ROLES, DatasetSpec, canonical_name, get_spec

__all__ = ["Dataset", "load_dataset", "normalize", "channel_affine", "load_arrays"]

@dataclass
class Dataset:
    """A loaded dataset: uint8 images ``(N, C, H, W)`` (or ``(N, H, W)``: one channel, as the IDX
    files of MNIST and Fashion-MNIST hold them) and integer labels ``(N,)``.

    ``mean`` and ``std`` are the per-channel statistics of the training pixels
    scaled to [0, 1] (None: the spec's, for MNIST and Fashion-MNIST);
    :attr:`in_shape` is one image's ``(C, H, W)``.

    Labels of a non-integer dtype are refused (``TypeError`` naming the first
    value that is not a whole number), never truncated.

    Attributes:
        name: Dataset name.
        classes: Class names, index = label.
        source: Directory the files were read from (``None`` if built in memory).
        train_images, train_labels, test_images, test_labels: The arrays.
    """

    name: str
    classes: list[str]
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    source: Path | None = None
    spec: DatasetSpec | None = field(default=None, repr=False)
    mean: tuple | None = None
    std: tuple | None = None

    def __post_init__(self) -> None:
        shapes = set()
        for split in ("train", "test"):
            x = getattr(self, f"{split}_images")
            y = getattr(self, f"{split}_labels")
            if x.ndim not in (3, 4):
                raise ValueError(f"{split}_images must be (N, C, H, W) or (N, H, W), got shape {x.shape}")
            shapes.add(tuple(x.shape[1:]) if x.ndim == 4 else (1,) + tuple(x.shape[1:]))
            if y.ndim != 1:
                raise ValueError(f"{split}_labels must be (N,), got shape {y.shape}")
            if len(x) != len(y):
                raise ValueError(
                    f"{split}: {len(x)} images but {len(y)} labels; the counts must match"
                )
            check_integer_labels(y, f"{split}_labels")
            if y.size and int(y.min()) < 0:
                raise ValueError(f"{split}_labels has label {int(y.min())}; labels are class indices >= 0")
            if y.size and int(y.max()) >= len(self.classes):
                raise ValueError(
                    f"{split}_labels has label {int(y.max())} but there are only "
                    f"{len(self.classes)} classes"
                )
        if len(shapes) != 1:
            raise ValueError(f"train and test images differ in shape: {sorted(shapes)}; they must be alike")
        if self.mean is None and self.spec is not None:
            self.mean, self.std = (self.spec.mean,), (self.spec.std,)
        if self.mean is not None:
            self.mean, self.std = tuple(float(m) for m in self.mean), tuple(float(v) for v in self.std)
            if len(self.mean) != self.in_shape[0] or len(self.std) != self.in_shape[0]:
                raise ValueError(f"mean and std need one value per channel ({self.in_shape[0]}), got "
                                 f"mean={self.mean} std={self.std}")

    @property
    def in_shape(self) -> tuple[int, int, int]:
        """One image's ``(C, H, W)``."""
        x = self.train_images
        return tuple(int(v) for v in (x.shape[1:] if x.ndim == 4 else (1,) + x.shape[1:]))

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.train_images.shape}, "
            f"test={self.test_images.shape}, source={str(self.source)!r})"
        )


def _load_from(spec: DatasetSpec, directory: Path) -> Dataset:
    arrays = {}
    for role in ROLES:
        f = spec.files[role]
        path = find_file(directory, f)
        if path is None:  # pragma: no cover - locate() checked, but files can vanish
            raise FileNotFoundError(f"{directory / f.name} is missing")
        arrays[role] = read_idx(path, expected=f, dataset=spec.name)
    try:
        return Dataset(name=spec.name, classes=list(spec.classes), source=directory,
                       spec=spec, **arrays)
    except ValueError as exc:
        raise fail(directory, str(exc)) from None


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = True,
                 *, mirrors: Sequence[str] | None = None, timeout: float = 30, **folder_options) -> Dataset:
    """Load a dataset by name, downloading it into the cache if needed.

    Args:
        name: ``"mnist"``, ``"fashion-mnist"``, ``"cifar10"`` (:mod:`.cifar`) or
            ``"folder"`` (an image folder, ``data_dir``: :mod:`.folder`).
        data_dir: The directory that holds the files (the CLI's ``--data-dir``;
            else ``$GPUCNN_DATA``): then it must hold them, nothing else is
            used.  Without one: the shipped copy, the cache, a download.
        download: When the files are found nowhere, fetch them into the
            per-user cache (:func:`cache_dir`).
        mirrors: Base URLs to download from instead of the dataset's own.
        timeout: Socket timeout in seconds for downloads.
        folder_options: for ``"folder"`` only: :func:`gpucnn.data.folder.load_folder`'s
            ``image_size``, ``channels``, ``val_split``, ``seed``, ``skip_bad``, ``progress``.

    Returns:
        The :class:`Dataset`, verified, with ``source`` set to its directory.

    Raises:
        ValueError: Unknown dataset name (the message lists the known ones).
        DataError: A file is corrupt, truncated or fails its checksum.
        DownloadError: Downloading failed from every mirror.
        DataDirError: ``data_dir`` / ``$GPUCNN_DATA`` does not hold the dataset
            (a ``FileNotFoundError`` naming the directory and the files expected).
        FileNotFoundError: Not found anywhere and ``download`` is false.
    """
    key = canonical_name(name)
    if key != "folder" and folder_options:
        raise ValueError(f"{sorted(folder_options)} apply to image folders (dataset 'folder') only, "
                         f"not to dataset {key!r}")
    if key == "folder":
        from .folder import load_folder
        if data_dir is None:
            raise ValueError("dataset 'folder' needs the folder: pass data_dir (the CLI's --data-dir)")
        return load_folder(data_dir, **folder_options)
    if key == "cifar10":
        from .cifar import load_cifar10
        return load_cifar10(data_dir, download, url=mirrors[0] if mirrors else None, timeout=timeout)
    spec = get_spec(name)
    directory = locate(spec.name, data_dir)
    if directory is None:
        if not download:
            searched = "\n  ".join(f"{label}: {d}" for label, d in candidates(spec, None))
            raise FileNotFoundError(
                f"dataset {spec.name!r} not found; looked for "
                f"{', '.join(f.name for f in spec.files.values())} in:\n  {searched}\n"
                f"Pass download=True, or point data_dir / --data-dir / ${ENV_VAR} at the files."
            )
        directory = _fetch_module.download(spec.name, cache_dir(spec.name), mirrors=mirrors,
                                        timeout=timeout)
    return _load_from(spec, directory)


def normalize(images, dataset: str | DatasetSpec | Dataset = "mnist", *,
              mean: float | None = None, std: float | None = None) -> np.ndarray:
    """Scale pixels to [0, 1] and standardise them with the dataset's train statistics, per channel.

    Args:
        images: Integer pixel values 0..255, shape ``(N, H, W)`` or ``(N, C, H, W)``.
        dataset: Whose mean/std to use: a name, a :class:`DatasetSpec` or a
            :class:`Dataset` (MNIST 0.1307/0.3081, Fashion-MNIST 0.2860/0.3530;
            a Dataset's own per-channel ``mean``/``std``).
        mean: Override the mean (of pixel/255): one number, or one per channel.
        std: Override the standard deviation (of pixel/255): likewise.

    Returns:
        ``float32`` array ``(N, C, H, W)``: ``pixel * scale[c] - shift[c]`` in
        float32, with ``scale = float32(1 / (255 std))`` and ``shift =
        float32(mean / std)`` (:func:`channel_affine`; the device batch kernel
        computes exactly this).

    Raises:
        TypeError: ``images`` is not an integer array.
        ValueError: Wrong shape, values outside 0..255, or ``std <= 0``.
    """
    x = np.asarray(images)
    if x.dtype.kind not in "ui":
        raise TypeError(
            f"normalize expects integer pixel values 0..255 (e.g. uint8), got dtype {x.dtype}"
        )
    if x.ndim == 3:
        x = x[:, None, :, :]
    elif x.ndim != 4:
        raise ValueError(f"images must be (N, H, W) or (N, C, H, W), got shape {x.shape}")
    if x.dtype != np.uint8 and x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError(
            f"pixel values must lie in 0..255, got range [{x.min()}, {x.max()}]"
        )
    if isinstance(dataset, Dataset) and dataset.mean is not None:
        m0, s0 = dataset.mean, dataset.std
    elif mean is None or std is None:
        spec = get_spec(dataset.spec or dataset.name if isinstance(dataset, Dataset) else dataset)
        m0, s0 = (spec.mean,), (spec.std,)
    m0 = m0 if mean is None else mean
    s0 = s0 if std is None else std
    scale, shift = channel_affine(m0, s0, x.shape[1])
    out = x.astype(np.float32)
    out *= scale[:, None, None]
    out -= shift[:, None, None]
    return out


def channel_affine(mean, std, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scale, shift)``, float32 ``(C,)``: a pixel ``p`` of channel ``c`` normalises to
    ``float32(p) * scale[c] - shift[c]`` (two float32 roundings, in that order), with
    ``scale = float32(1 / (255 std))`` and ``shift = float32(mean / std)``.

    ``mean`` / ``std``: one number for every channel, or one per channel.
    """
    m = np.atleast_1d(np.asarray(mean, dtype=np.float64))
    s = np.atleast_1d(np.asarray(std, dtype=np.float64))
    for what, v in (("mean", m), ("std", s)):
        if v.ndim != 1 or len(v) not in (1, channels):
            raise ValueError(f"{what} must be one number or one per channel ({channels}), got {what}={v.tolist()}")
    if not (np.all(s > 0) and np.all(np.isfinite(s)) and np.all(np.isfinite(m))):
        raise ValueError(f"std must be positive and mean finite, got mean={m.tolist()} std={s.tolist()}")
    m, s = np.broadcast_to(m, (channels,)), np.broadcast_to(s, (channels,))
    return (1.0 / (255.0 * s)).astype(np.float32), (m / s).astype(np.float32)


def load_arrays(dataset: str = "mnist", data_dir=None, subset=None, test_subset=None, device="cpu",
                data=None):
    """Load, normalise, cut and move a dataset: ``(x_train, y_train, x_test, y_test, classes)``.

    Images are float32 ``(N, C, H, W)`` normalised with the dataset's
    statistics; labels int64; all on ``device``.  ``data`` may be an already
    loaded :class:`Dataset`.
    """
    ds = data if data is not None else load_dataset(dataset, data_dir)
    tr_x, tr_y = ds.train_images, ds.train_labels
    te_x, te_y = ds.test_images, ds.test_labels
    for name, value, n in (("subset", subset, len(tr_x)), ("test_subset", test_subset, len(te_x))):
        if value is not None and value > n:
            raise ValueError(f"{name}={value} is larger than the {dataset} split it cuts ({n} images)")
    if subset is not None:
        tr_x, tr_y = tr_x[:subset], tr_y[:subset]
    if test_subset is not None:
        te_x, te_y = te_x[:test_subset], te_y[:test_subset]
    arrays = (normalize(tr_x, ds), tr_y.astype(np.int64), normalize(te_x, ds), te_y.astype(np.int64))
    arrays = tuple(backend.to_device(a, device) for a in arrays)
    return arrays + (list(ds.classes),)

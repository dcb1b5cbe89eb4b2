"""Loading a dataset by name: the IDX datasets from their files (shipped, cached or downloaded),
CIFAR-10 (:mod:`.cifar`) and image folders (:mod:`.folder`); and the arrays a run trains on."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from .. import backend
from . import fetch as _fetch_module
from .cifar import load_cifar10
from .dataset import Dataset, normalize
from .folder import load_folder
from .idx import fail, read_idx
from .lookup import ENV_VAR, cache_dir, candidates, find_file, locate
from .specs import ROLES, DatasetSpec, canonical_name, get_spec

__all__ = ["load_dataset", "load_arrays"]


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
        if data_dir is None:
            raise ValueError("dataset 'folder' needs the folder: pass data_dir (the CLI's --data-dir)")
        return load_folder(data_dir, **folder_options)
    if key == "cifar10":
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

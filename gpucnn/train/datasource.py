"""Where a run's data come from: the dataset a :class:`~gpucnn.train.TrainConfig` names, its
augmentation, and the raw uint8 training set a GPU run keeps on the device."""
from __future__ import annotations

import os

import numpy as np

from .. import backend
from ..data import load_dataset, normalize
from ..data.augment import FLIP_DATASETS
from .config import TrainConfig, folder_max_shift

__all__ = ["augment_spec", "dataset_for", "raw_train_images", "DEVICE_DATA_MAX_BYTES"]


def augment_spec(cfg: TrainConfig, data=None):
    """The trainer's augmentation for ``cfg`` (``Trainer(augment=...)``), as ``gpucnn train`` uses it:
    shifts of up to ``cfg.max_shift`` pixels (an image folder's: :func:`folder_max_shift` of its
    size), flips as ``cfg.flip`` says; None when ``cfg.augment`` is off.

    The uncovered border is filled with the normalised value of a black pixel for one-channel data
    (MNIST's background), and with 0 -- each channel's mean colour -- for colour data (``data``, the
    loaded :class:`~gpucnn.data.Dataset`, says which; None: the dataset's spec)."""
    if not cfg.augment:
        return None
    shape = data.in_shape if data is not None else (1, 28, 28)
    if shape[0] == 1:
        fill = float(normalize(np.zeros((1, 1, 1), np.uint8), data if data is not None else cfg.dataset)[0, 0, 0, 0])
    else:
        fill = 0.0
    shift = cfg.max_shift if cfg.max_shift is not None else folder_max_shift(shape[1])
    flip = cfg.flip if cfg.flip is not None else cfg.dataset in FLIP_DATASETS
    return {"seed": cfg.seed, "fill": fill, "flip": bool(flip), "max_shift": int(shift)}


#: The most bytes of raw training images kept on a GPU (beyond it, the float32 set is used as before).
DEVICE_DATA_MAX_BYTES = 4 << 30


def raw_train_images(ds, cfg, dev):
    """The uint8 training images ``(N, C, H, W)`` on the GPU, when they fit and the run is on one
    (else None): each batch is then gathered, augmented and normalised there by one kernel
    (``gather_batch_augment_u8``), from a quarter of the float32 set's memory.
    ``GPUCNN_DEVICE_DATA=0`` keeps the float32 set instead."""
    if dev != "cuda" or os.environ.get("GPUCNN_DEVICE_DATA", "1") == "0" or ds.mean is None:
        return None
    x = ds.train_images[:cfg.subset] if cfg.subset else ds.train_images
    x = np.ascontiguousarray(x[:, None] if x.ndim == 3 else x, dtype=np.uint8)
    if x.nbytes > DEVICE_DATA_MAX_BYTES:
        return None
    return backend.to_device(x, dev)


def dataset_for(cfg, data_dir=None, say=None):
    """The dataset ``cfg`` names; an image folder with its options (decoding progress on stderr)."""
    if cfg.dataset != "folder":
        return load_dataset(cfg.dataset, data_dir)
    return load_dataset("folder", data_dir, image_size=cfg.image_size, channels=cfg.channels,
                        val_split=cfg.val_split, seed=cfg.seed, skip_bad=cfg.skip_bad_images,
                        log=say or (lambda m: None))

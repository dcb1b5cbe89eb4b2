"""A loaded dataset (:class:`Dataset`), and normalising its images for a model (loading by name:
:mod:`.load`)."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .._utils import check_integer_labels
from .specs import DatasetSpec, get_spec

__all__ = ["Dataset", "normalize", "channel_affine"]

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

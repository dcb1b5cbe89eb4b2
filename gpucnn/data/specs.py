"""What each known dataset is: its files, shapes, checksums, mirrors, statistics, classes.

:data:`DATASETS` maps a name to its :class:`DatasetSpec`; :func:`get_spec`
resolves a user-given name (case-insensitive, ``_`` = ``-``) and lists the
known ones when it fails.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

__all__ = ["FileSpec", "DatasetSpec", "DATASETS", "DATASET_NAMES", "ROLES", "get_spec", "canonical_name",
           "MNIST_MEAN", "MNIST_STD", "FASHION_MNIST_MEAN", "FASHION_MNIST_STD"]


@dataclass(frozen=True)
class FileSpec:
    """One file of a dataset and what it must contain.

    Attributes:
        name: File name as distributed, e.g. ``"train-images-idx3-ubyte.gz"``.
        shape: Array shape the file must hold, e.g. ``(60000, 28, 28)``.
        sha256: Accepted SHA-256 digests of the file as stored (gzip bytes).
        idx_sha256: SHA-256 of the decompressed IDX bytes, or ``None`` where
            no such published/verified digest is available.
    """

    name: str
    shape: tuple[int, ...]
    sha256: tuple[str, ...]
    idx_sha256: str | None = None

    @property
    def raw_name(self) -> str:
        """The file name without its ``.gz`` suffix (an un-gzipped copy)."""
        return self.name[:-3] if self.name.endswith(".gz") else self.name


@dataclass(frozen=True)
class DatasetSpec:
    """Everything needed to find, fetch, verify and normalise one dataset.

    Attributes:
        name: Dataset name, e.g. ``"mnist"``.
        files: Role (``train_images``, ``train_labels``, ``test_images``,
            ``test_labels``) -> :class:`FileSpec`.
        mirrors: Base URLs tried in order by :func:`download`.
        mean: Mean of the training pixels scaled to [0, 1].
        std: Standard deviation of the training pixels scaled to [0, 1].
        classes: Class names, index = label.
    """

    name: str
    files: Mapping[str, FileSpec]
    mirrors: tuple[str, ...]
    mean: float
    std: float
    classes: tuple[str, ...]

    @property
    def sha256(self) -> dict[str, tuple[str, ...]]:
        """File name -> accepted SHA-256 digests of the file as stored."""
        return {f.name: f.sha256 for f in self.files.values()}

ROLES = ("train_images", "train_labels", "test_images", "test_labels")

MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2860, 0.3530

# MNIST.  ``sha256`` holds two digests per file:
#   1. the upstream .gz as served by the mirrors below (the same digests are
#      published in TensorFlow Datasets' url_checksums/mnist.txt, with sizes
#      9912422 / 28881 / 1648877 / 4542 bytes);
#   2. the re-compressed copy shipped in gpucnn/_data/mnist/.
# ``idx_sha256`` was computed from the shipped files' decompressed bytes and
# agrees with the digests of the un-gzipped IDX files published by several
# third parties, so the shipped copy is the upstream data.
_MNIST = DatasetSpec(
    name="mnist",
    files={
        "train_images": FileSpec(
            "train-images-idx3-ubyte.gz",
            (60000, 28, 28),
            (
                "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                "0b367032e93c5d0cea0925647cfdb18614af8ee15f83e6f2fc2ad904a6835971",
            ),
            "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db",
        ),
        "train_labels": FileSpec(
            "train-labels-idx1-ubyte.gz",
            (60000,),
            (
                "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                "1787548bbe0bff1ec2ecdc0ef292b02df999e2d1a6002d27500982c652b17203",
            ),
            "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5",
        ),
        "test_images": FileSpec(
            "t10k-images-idx3-ubyte.gz",
            (10000, 28, 28),
            (
                "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                "1a1a05eab793c14bb050b398624a11b0ffd1a2953baed553b1b9bd079e2a20be",
            ),
            "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7",
        ),
        "test_labels": FileSpec(
            "t10k-labels-idx1-ubyte.gz",
            (10000,),
            (
                "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                "b91679a0acfe4ba0e50a2437a903084cba1f5f92592b016a25a7dfd00455798b",
            ),
            "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2",
        ),
    },
    mirrors=(
        "https://ossci-datasets.s3.amazonaws.com/mnist/",
        "https://storage.googleapis.com/cvdf-datasets/mnist/",
        "http://yann.lecun.com/exdb/mnist/",
    ),
    mean=MNIST_MEAN,
    std=MNIST_STD,
    classes=tuple(str(d) for d in range(10)),
)

# Fashion-MNIST.  The .gz digests are those published in TensorFlow Datasets'
# tensorflow_datasets/url_checksums/fashion_mnist.txt for the files on the
# canonical S3 mirror (sizes 26421880 / 29515 / 4422102 / 5148 bytes); the
# upstream README publishes MD5s for the same files (8d4fb7e6c68d591d4c3dfef9ec88bf0d,
# 25c81989df183df01b3e8a0aad5dffbe, bef4ecab320f06d8554ea6380940ec79,
# bb300cfdad3c16e7a12a480ee83cd310).
# ``idx_sha256``, the digests of the DECOMPRESSED files (47040016 / 60008 /
# 7840016 / 10008 bytes), agree in two independent public sources: the
# Makefile of github.com/EntroMorphic/sstt (its SHA256F_* variables, for the
# files after `gunzip -k`; its MNIST values equal ours above) and
# crates/dataset-ml/src/dataset/fashion_mnist.rs of
# github.com/SomeB1oody/dataset-core; for the two label files they were also
# checked against the upstream repository's own .gz files decompressed here.
# A third, independent check: Debian's package dataset-fashion-mnist
# (0.0~git20200523.55506a9-1, /usr/share/datasets/fashion-mnist) holds .gz files
# whose own digests differ from the ones above, and all four decompress to
# exactly these idx_sha256 values (checked 2026-12-01; gpucnn trains on it).
# So a re-compressed copy (a distribution's package, `gzip -n`) or an
# un-gzipped one is verified by its content.  (An older, different release --
# before upstream commit 658ec8c removed duplicate samples in August 2017 --
# has other digests and is rejected.)
_FASHION = DatasetSpec(
    name="fashion-mnist",
    files={
        "train_images": FileSpec(
            "train-images-idx3-ubyte.gz",
            (60000, 28, 28),
            ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",),
            "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
        ),
        "train_labels": FileSpec(
            "train-labels-idx1-ubyte.gz",
            (60000,),
            ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",),
            "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
        ),
        "test_images": FileSpec(
            "t10k-images-idx3-ubyte.gz",
            (10000, 28, 28),
            ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",),
            "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
        ),
        "test_labels": FileSpec(
            "t10k-labels-idx1-ubyte.gz",
            (10000,),
            ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",),
            "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
        ),
    },
    mirrors=(
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    mean=FASHION_MNIST_MEAN,
    std=FASHION_MNIST_STD,
    classes=(
        "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
        "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
    ),
)

#: Known datasets by name.
DATASETS: dict[str, DatasetSpec] = {_MNIST.name: _MNIST, _FASHION.name: _FASHION}

#: Every dataset ``gpucnn train --dataset`` knows: the IDX ones above, CIFAR-10 (:mod:`.cifar`) and
#: an image folder of one's own (:mod:`.folder`).
DATASET_NAMES = (*sorted(DATASETS), "cifar10", "folder")


def canonical_name(name: str) -> str:
    """A dataset name (case-insensitive, ``_`` = ``-``; ``cifar-10`` = ``cifar10``) as in
    :data:`DATASET_NAMES`, or a ValueError listing them."""
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__} {name!r}")
    key = name.strip().lower().replace("_", "-")
    key = "cifar10" if key == "cifar-10" else key
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    return key


def get_spec(name: str | DatasetSpec) -> DatasetSpec:
    """Resolve a dataset name (case-insensitive, ``_`` = ``-``) to its spec."""
    if isinstance(name, DatasetSpec):
        return name
    if not isinstance(name, str):
        raise TypeError(f"dataset name must be a str, got {type(name).__name__} {name!r}")
    key = name.strip().lower().replace("_", "-")
    if key not in DATASETS:
        raise ValueError(
            f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}"
        )
    return DATASETS[key]

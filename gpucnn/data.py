"""Datasets: an IDX reader, MNIST / Fashion-MNIST by name, normalisation, minibatches.

Reading
    :func:`read_idx` parses one IDX file (the format of MNIST and Fashion-MNIST),
    gzipped or raw -- told apart by the gzip magic bytes, never by the file
    name.  It checks the magic number, that the header's dimensions account for
    exactly the bytes in the file, and, for the files of a known dataset, their
    SHA-256.  Anything wrong raises :class:`DataError` naming the file and
    saying to delete it and download it again.

Finding the files (:func:`locate`), in this order:

1. the explicit ``data_dir`` argument (the CLI's ``--data-dir``);
2. the ``GPUCNN_DATA`` environment variable;
3. the copy shipped inside the package, ``gpucnn/_data/<name>/`` (MNIST only);
4. the per-user cache, ``$XDG_CACHE_HOME/gpucnn/<name>`` or
   ``~/.cache/gpucnn/<name>``.

For (1) and (2) both ``<dir>/<name>/`` and ``<dir>`` itself are looked at, in
that order.  A directory counts only when it holds all four files (each under
its ``.gz`` name or its un-gzipped name).  When none does and
``download=True``, :func:`download` fetches the files from the dataset's
mirrors into the cache: each mirror in turn, checksum verified, written to a
temporary file in the cache directory, fsynced and then ``os.replace``-d into
place, so a failed or corrupt download leaves nothing behind.

Checksums
    Each file has two kinds of pin.  ``sha256`` lists the digests of the file
    *as distributed* (the gzip file); ``idx_sha256`` is the digest of the
    decompressed IDX bytes, which does not depend on how the file was
    compressed.  A file is accepted when either matches.  This matters for
    MNIST: the copy shipped in this repository is byte-for-byte the upstream
    data but re-compressed, so its ``.gz`` digests differ from those of the
    upstream mirrors while its decompressed digests are the same.
"""
from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import urllib.error
import urllib.request
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping, Sequence

import numpy as np

from ._io import atomic_open

__all__ = [
    "DataError",
    "DownloadError",
    "FileSpec",
    "DatasetSpec",
    "Dataset",
    "DATASETS",
    "read_idx",
    "locate",
    "cache_dir",
    "download",
    "load_dataset",
    "normalize",
    "iterate_minibatches",
]

#: Environment variable naming a data root (``$GPUCNN_DATA/<name>/`` or the files directly).
ENV_VAR = "GPUCNN_DATA"

#: Where the package keeps its shipped copies: ``_PACKAGE_DATA/<name>/``.
_PACKAGE_DATA = Path(__file__).resolve().parent / "_data"

#: No dataset file is anywhere near this big; a download past it is cut off.
_MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024

_GZIP_MAGIC = b"\x1f\x8b"

#: IDX type codes (third byte of the magic number) -> big-endian NumPy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """A data file is corrupt, truncated, of the wrong format or fails its checksum."""


class DownloadError(DataError):
    """No mirror delivered a file that passed verification."""


# --------------------------------------------------------------------------- #
# Dataset specifications
# --------------------------------------------------------------------------- #
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


_ROLES = ("train_images", "train_labels", "test_images", "test_labels")

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
# bb300cfdad3c16e7a12a480ee83cd310).  No digest of the decompressed bytes was
# available to verify, so ``idx_sha256`` is None: an un-gzipped Fashion-MNIST
# file cannot be verified and is rejected.
_FASHION = DatasetSpec(
    name="fashion-mnist",
    files={
        "train_images": FileSpec(
            "train-images-idx3-ubyte.gz",
            (60000, 28, 28),
            ("3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",),
        ),
        "train_labels": FileSpec(
            "train-labels-idx1-ubyte.gz",
            (60000,),
            ("a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",),
        ),
        "test_images": FileSpec(
            "t10k-images-idx3-ubyte.gz",
            (10000, 28, 28),
            ("346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",),
        ),
        "test_labels": FileSpec(
            "t10k-labels-idx1-ubyte.gz",
            (10000,),
            ("67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",),
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


def _spec(name: str | DatasetSpec) -> DatasetSpec:
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


# --------------------------------------------------------------------------- #
# IDX parsing and verification
# --------------------------------------------------------------------------- #
def _fail(path: str | os.PathLike, problem: str) -> DataError:
    """Build the standard error for a bad data file (``.problem`` keeps the short reason)."""
    err = DataError(
        f"{os.fspath(path)}: {problem}. The file is corrupt, truncated or not the "
        f"expected file: delete it and re-download it "
        f"(gpucnn.data.load_dataset(name, download=True) fetches missing files)."
    )
    err.problem = problem
    return err


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _decompress(raw: bytes, path: str | os.PathLike) -> bytes:
    """Gunzip ``raw`` when it starts with the gzip magic bytes, else return it."""
    if raw[:2] != _GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise _fail(path, f"invalid gzip data ({exc})") from None


def _parse_idx(payload: bytes, path: str | os.PathLike) -> np.ndarray:
    """Parse decompressed IDX bytes into an array (copy, native byte order)."""
    if len(payload) < 4:
        raise _fail(path, f"too short for an IDX header ({len(payload)} bytes)")
    zero0, zero1, code, ndim = payload[0], payload[1], payload[2], payload[3]
    if zero0 != 0 or zero1 != 0:
        raise _fail(
            path,
            f"bad IDX magic number 0x{payload[:4].hex()} (must start with 0x0000)",
        )
    if code not in _IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in sorted(_IDX_DTYPES))
        raise _fail(path, f"unsupported IDX data type code 0x{code:02X} (supported: {known})")
    if ndim == 0:
        raise _fail(path, "IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(payload) < header_len:
        raise _fail(
            path,
            f"truncated IDX header: {ndim} dimensions need {header_len} bytes, "
            f"the data has {len(payload)}",
        )
    shape = tuple(int(d) for d in np.frombuffer(payload, ">u4", ndim, 4))
    dtype = _IDX_DTYPES[code]
    count = 1
    for d in shape:
        count *= d
    expected_len = header_len + count * dtype.itemsize
    if len(payload) < expected_len:
        raise _fail(
            path,
            f"truncated: the header declares shape {shape} ({expected_len} bytes "
            f"with header), the data has only {len(payload)} bytes",
        )
    if len(payload) > expected_len:
        raise _fail(
            path,
            f"oversize: the header declares shape {shape} ({expected_len} bytes "
            f"with header), the data has {len(payload)} bytes "
            f"({len(payload) - expected_len} unexpected trailing bytes)",
        )
    arr = np.frombuffer(payload, dtype, count, header_len).reshape(shape)
    # A copy makes the result writable and native-endian.
    return arr.astype(dtype.newbyteorder("="), copy=True)


def _verify(raw: bytes, payload: bytes, expected: FileSpec, path, dataset: str | None) -> None:
    """Check ``raw`` (file bytes) / ``payload`` (decompressed) against ``expected``."""
    file_digest = _sha256(raw)
    if file_digest in expected.sha256:
        return
    idx_digest = None
    if expected.idx_sha256 is not None:
        idx_digest = _sha256(payload)
        if idx_digest == expected.idx_sha256:
            return
    what = f"{dataset}'s {expected.name}" if dataset else expected.name
    problem = f"SHA-256 mismatch: {file_digest} is not a known digest of {what}"
    if idx_digest is not None:
        problem += f" (decompressed: {idx_digest}, expected {expected.idx_sha256})"
    elif raw[:2] != _GZIP_MAGIC:
        problem += " (an un-gzipped copy of this dataset cannot be verified; use the .gz file)"
    # Say so when the file is a known file of another dataset.
    for other in DATASETS.values():
        if other.name == dataset:
            continue
        for f in other.files.values():
            if file_digest in f.sha256 or (
                idx_digest is not None and idx_digest == f.idx_sha256
            ):
                problem += f"; it is {other.name}'s {f.name}"
    raise _fail(path, problem)


def read_idx(path: str | os.PathLike, *, expected: FileSpec | None = None,
             dataset: str | None = None) -> np.ndarray:
    """Read one IDX file, gzipped or raw (detected by the gzip magic bytes).

    Args:
        path: The file.
        expected: When given, the file must match this spec: its SHA-256 (of
            the stored bytes, or of the decompressed bytes where the spec has
            one) and its array shape.
        dataset: Dataset name used in error messages only.

    Returns:
        The array with the shape from the IDX header, in native byte order
        (``np.uint8`` for MNIST-style files).

    Raises:
        DataError: Bad magic number, unsupported type code, header/size
            mismatch (truncated or oversize), invalid gzip data, checksum or
            shape mismatch.  The message names the file and says to delete it
            and re-download it.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    raw = path.read_bytes()
    payload = _decompress(raw, path)
    arr = _parse_idx(payload, path)
    if expected is not None:
        _verify(raw, payload, expected, path, dataset)
        if arr.shape != tuple(expected.shape):
            raise _fail(path, f"shape {arr.shape} differs from the expected {tuple(expected.shape)}")
    return arr


# --------------------------------------------------------------------------- #
# Locating files
# --------------------------------------------------------------------------- #
def cache_dir(name: str | None = None) -> Path:
    """The per-user cache directory (``$XDG_CACHE_HOME/gpucnn`` or ``~/.cache/gpucnn``).

    Args:
        name: Dataset name; when given the dataset's sub-directory is returned.

    Returns:
        The directory (not created).
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    root = base / "gpucnn"
    return root / _spec(name).name if name is not None else root


def _find_file(directory: Path, f: FileSpec) -> Path | None:
    """The file ``f`` in ``directory`` under its .gz or un-gzipped name, if any."""
    for candidate in (f.name, f.raw_name):
        p = directory / candidate
        if p.is_file():
            return p
    return None


def _has_all(directory: Path, spec: DatasetSpec) -> bool:
    return directory.is_dir() and all(_find_file(directory, f) for f in spec.files.values())


def _candidates(spec: DatasetSpec, data_dir: str | os.PathLike | None) -> list[tuple[str, Path]]:
    """Directories to search, in lookup order, each with a label for messages."""
    out: list[tuple[str, Path]] = []
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        out += [("data_dir", d / spec.name), ("data_dir", d)]
    env = os.environ.get(ENV_VAR, "")
    if env:
        d = Path(env).expanduser()
        out += [(ENV_VAR, d / spec.name), (ENV_VAR, d)]
    out.append(("shipped", _PACKAGE_DATA / spec.name))
    out.append(("cache", cache_dir(spec.name)))
    return out


def locate(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """Find the directory holding all four files of a dataset.

    Lookup order: ``data_dir`` (``<data_dir>/<name>/`` then ``<data_dir>``),
    ``$GPUCNN_DATA`` (likewise), the copy shipped in the package, then the
    per-user cache.  Only existence is checked here; contents are verified
    when read.

    Args:
        name: Dataset name (see :data:`DATASETS`).
        data_dir: Explicit directory to look in first.

    Returns:
        The first directory holding every file, or ``None``.
    """
    spec = _spec(name)
    for _, d in _candidates(spec, data_dir):
        if _has_all(d, spec):
            return d
    return None


# --------------------------------------------------------------------------- #
# Downloading
# --------------------------------------------------------------------------- #
def _fetch(url: str, timeout: float) -> bytes:
    """GET ``url`` and return the whole body; raise on any short or oversize body."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 (http/https only)
        length = resp.headers.get("Content-Length")
        declared = int(length) if length is not None and length.isdigit() else None
        if declared is not None and declared > _MAX_DOWNLOAD_BYTES:
            raise DataError(f"Content-Length {declared} exceeds the {_MAX_DOWNLOAD_BYTES}-byte limit")
        chunks, total = [], 0
        while True:
            chunk = resp.read(1 << 20)
            if not chunk:
                break
            total += len(chunk)
            if total > _MAX_DOWNLOAD_BYTES:
                raise DataError(f"body exceeds the {_MAX_DOWNLOAD_BYTES}-byte limit")
            chunks.append(chunk)
    if declared is not None and total != declared:
        raise DataError(f"received {total} bytes, Content-Length said {declared}")
    return b"".join(chunks)


def _file_ok(path: Path, f: FileSpec, dataset: str) -> bool:
    try:
        read_idx(path, expected=f, dataset=dataset)
    except (DataError, OSError):
        return False
    return True


def download(name: str, dest_dir: str | os.PathLike, mirrors: Sequence[str] | None = None,
             timeout: float = 30) -> Path:
    """Download a dataset's files into ``dest_dir``, verifying each one.

    Files already in ``dest_dir`` that pass verification are kept; others are
    fetched from each mirror in turn until one copy verifies (SHA-256, IDX
    structure and shape).  Each file is written to a temporary file in
    ``dest_dir``, fsynced and atomically renamed, so a failed download leaves
    no file behind.

    Args:
        name: Dataset name (see :data:`DATASETS`).
        dest_dir: Directory to store the files in (created if missing).
        mirrors: Base URLs to try in order; defaults to the dataset's mirrors.
        timeout: Socket timeout in seconds for each request.

    Returns:
        ``dest_dir`` as a :class:`pathlib.Path`.

    Raises:
        DownloadError: Some file could not be fetched and verified from any
            mirror; the message lists every URL tried and why it failed.
        ValueError: Unknown dataset name, empty mirror list or bad timeout.
    """
    spec = _spec(name)
    if isinstance(mirrors, (str, bytes)):
        raise TypeError(f"mirrors must be a sequence of base URLs, not a single string {mirrors!r}")
    mirrors = tuple(spec.mirrors if mirrors is None else mirrors)
    if not mirrors:
        raise ValueError("mirrors must name at least one base URL, got an empty list")
    if not all(isinstance(m, str) for m in mirrors):
        raise TypeError(f"mirrors must be a sequence of URL strings, got {mirrors!r}")
    if not (isinstance(timeout, (int, float)) and timeout > 0):
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    dest = Path(dest_dir).expanduser()
    dest.mkdir(parents=True, exist_ok=True)

    for f in spec.files.values():
        target = dest / f.name
        if target.is_file() and _file_ok(target, f, spec.name):
            continue
        tried: list[str] = []
        for base in mirrors:
            url = base.rstrip("/") + "/" + f.name
            try:
                body = _fetch(url, timeout)
                payload = _decompress(body, url)
                arr = _parse_idx(payload, url)
                _verify(body, payload, f, url, spec.name)
                if arr.shape != tuple(f.shape):
                    raise DataError(f"shape {arr.shape} differs from the expected {f.shape}")
            except urllib.error.HTTPError as exc:
                tried.append(f"{url}: HTTP {exc.code} {exc.reason}")
                continue
            except urllib.error.URLError as exc:
                tried.append(f"{url}: {exc.reason}")
                continue
            except DataError as exc:
                tried.append(f"{url}: {getattr(exc, 'problem', exc)}")
                continue
            except (http.client.HTTPException, OSError, ValueError) as exc:
                tried.append(f"{url}: {type(exc).__name__}: {exc}")
                continue
            with atomic_open(target) as fh:
                fh.write(body)
            break
        else:
            raise DownloadError(
                f"could not download {spec.name}'s {f.name} into {dest}; tried:\n  "
                + "\n  ".join(tried)
                + f"\nDownload the file by hand into {dest} or pass another mirror "
                f"(mirrors=...) or a directory holding the files (data_dir=... / --data-dir "
                f"/ ${ENV_VAR})."
            )
    return dest


# --------------------------------------------------------------------------- #
# Loading
# --------------------------------------------------------------------------- #
@dataclass
class Dataset:
    """A loaded dataset: uint8 images ``(N, H, W)`` and uint8 labels ``(N,)``.

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

    def __post_init__(self) -> None:
        for split in ("train", "test"):
            x = getattr(self, f"{split}_images")
            y = getattr(self, f"{split}_labels")
            if x.ndim != 3:
                raise ValueError(f"{split}_images must be (N, H, W), got shape {x.shape}")
            if y.ndim != 1:
                raise ValueError(f"{split}_labels must be (N,), got shape {y.shape}")
            if len(x) != len(y):
                raise ValueError(
                    f"{split}: {len(x)} images but {len(y)} labels; the counts must match"
                )
            if y.size and int(y.max()) >= len(self.classes):
                raise ValueError(
                    f"{split}_labels has label {int(y.max())} but there are only "
                    f"{len(self.classes)} classes"
                )

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={self.train_images.shape}, "
            f"test={self.test_images.shape}, source={str(self.source)!r})"
        )


def _load_from(spec: DatasetSpec, directory: Path) -> Dataset:
    arrays = {}
    for role in _ROLES:
        f = spec.files[role]
        path = _find_file(directory, f)
        if path is None:  # pragma: no cover - locate() checked, but files can vanish
            raise FileNotFoundError(f"{directory / f.name} is missing")
        arrays[role] = read_idx(path, expected=f, dataset=spec.name)
    try:
        return Dataset(name=spec.name, classes=list(spec.classes), source=directory,
                       spec=spec, **arrays)
    except ValueError as exc:
        raise _fail(directory, str(exc)) from None


def load_dataset(name: str, data_dir: str | os.PathLike | None = None, download: bool = True,
                 *, mirrors: Sequence[str] | None = None, timeout: float = 30) -> Dataset:
    """Load a dataset by name, downloading it into the cache if needed.

    Args:
        name: ``"mnist"`` or ``"fashion-mnist"``.
        data_dir: Directory to look in first (the CLI's ``--data-dir``).
        download: When the files are found nowhere, fetch them into the
            per-user cache (:func:`cache_dir`).
        mirrors: Base URLs to download from instead of the dataset's own.
        timeout: Socket timeout in seconds for downloads.

    Returns:
        The :class:`Dataset`, verified, with ``source`` set to its directory.

    Raises:
        ValueError: Unknown dataset name (the message lists the known ones).
        DataError: A file is corrupt, truncated or fails its checksum.
        DownloadError: Downloading failed from every mirror.
        FileNotFoundError: Not found anywhere and ``download`` is false.
    """
    spec = _spec(name)
    directory = locate(spec.name, data_dir)
    if directory is None:
        if not download:
            searched = "\n  ".join(f"{label}: {d}" for label, d in _candidates(spec, data_dir))
            raise FileNotFoundError(
                f"dataset {spec.name!r} not found; looked for "
                f"{', '.join(f.name for f in spec.files.values())} in:\n  {searched}\n"
                f"Pass download=True, or point data_dir / --data-dir / ${ENV_VAR} at the files."
            )
        directory = _download_module_fn(spec.name, cache_dir(spec.name), mirrors=mirrors,
                                        timeout=timeout)
    return _load_from(spec, directory)


# ``load_dataset`` has a parameter called ``download``; keep a handle on the function.
_download_module_fn = download


# --------------------------------------------------------------------------- #
# Preprocessing and batching
# --------------------------------------------------------------------------- #
def normalize(images, dataset: str | DatasetSpec | Dataset = "mnist", *,
              mean: float | None = None, std: float | None = None) -> np.ndarray:
    """Scale pixels to [0, 1] and standardise them with the dataset's train statistics.

    Args:
        images: Integer pixel values 0..255, shape ``(N, H, W)`` or ``(N, 1, H, W)``.
        dataset: Whose mean/std to use: a name, a :class:`DatasetSpec` or a
            :class:`Dataset` (MNIST 0.1307/0.3081, Fashion-MNIST 0.2860/0.3530).
        mean: Override the mean (of pixel/255).
        std: Override the standard deviation (of pixel/255).

    Returns:
        ``float32`` array ``(N, 1, H, W)``: ``(pixel / 255 - mean) / std``.

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
    elif not (x.ndim == 4 and x.shape[1] == 1):
        raise ValueError(f"images must be (N, H, W) or (N, 1, H, W), got shape {x.shape}")
    if x.dtype != np.uint8 and x.size and (x.min() < 0 or x.max() > 255):
        raise ValueError(
            f"pixel values must lie in 0..255, got range [{x.min()}, {x.max()}]"
        )
    if isinstance(dataset, Dataset):
        spec = dataset.spec or _spec(dataset.name)
    else:
        spec = _spec(dataset)
    m = spec.mean if mean is None else float(mean)
    s = spec.std if std is None else float(std)
    if not s > 0:
        raise ValueError(f"std must be positive, got {s}")
    scale = np.float32(1.0 / (255.0 * s))
    shift = np.float32(m / s)
    out = x.astype(np.float32)
    out *= scale
    out -= shift
    return out


def iterate_minibatches(n: int, batch_size: int, rng: np.random.Generator | None,
                        shuffle: bool = True) -> Iterator[np.ndarray]:
    """Yield index arrays covering ``range(n)`` once, in minibatches.

    Args:
        n: Number of examples (>= 0).
        batch_size: Examples per batch (> 0); the last batch may be smaller.
        rng: Source of the shuffle order; required when ``shuffle`` is true.
        shuffle: Random order (from ``rng``) instead of ``0..n-1``.

    Yields:
        ``np.int64`` index arrays; together they hold every index exactly once.

    Raises:
        ValueError: ``n < 0`` or ``batch_size <= 0``.
        TypeError: Non-integer ``n``/``batch_size``, or ``rng`` not a
            :class:`numpy.random.Generator` while shuffling.
    """
    for label, v in (("n", n), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise TypeError(f"{label} must be an int, got {type(v).__name__} {v!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if batch_size <= 0:
        raise ValueError(f"batch_size must be > 0, got {batch_size}")
    if shuffle:
        if not isinstance(rng, np.random.Generator):
            raise TypeError(
                f"rng must be a numpy.random.Generator (np.random.default_rng(seed)), "
                f"got {type(rng).__name__}"
            )
        order = rng.permutation(int(n)).astype(np.int64, copy=False)
    else:
        order = np.arange(int(n), dtype=np.int64)
    # Arguments are checked (and the permutation drawn) at call time; only the
    # slicing is lazy.
    return _batches(order, int(batch_size))


def _batches(order: np.ndarray, batch_size: int) -> Iterator[np.ndarray]:
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]

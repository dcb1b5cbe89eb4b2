"""CIFAR-10 from its binary archive (no pickle): fetched, verified, extracted safely, 3x32x32.

The archive is the "binary version" on the dataset's page,
:data:`URL` (170,052,171 bytes).  It is verified by its SHA-256,
:data:`ARCHIVE_SHA256`, as published in TensorFlow Datasets'
``tensorflow_datasets/url_checksums/cifar10.txt`` (for this exact URL and
size); the page itself publishes the MD5 ``c32a1d4ab5d03f1284b67883e8d87530``.

Extraction reads the archive with :mod:`tarfile` and writes only the seven
expected members of ``cifar-10-batches-bin/`` (:data:`MEMBERS`), after
checking every member of the archive: a name that is absolute or holds
``..``, a link or device, or a member larger than :data:`MAX_MEMBER_BYTES`
is refused (:class:`DataError`) before anything is written.  Each ``.bin`` is
records of one label byte and 3072 pixel bytes (1024 red, 1024 green, 1024
blue, row-major 32x32), so a file whose size is not a multiple of 3073, or a
label above 9, is refused too.

Lookup: ``data_dir`` (the CLI's ``--data-dir``), when given, must hold
``cifar-10-batches-bin/`` or the archive (as ``<dir>`` or ``<dir>/cifar10``);
otherwise the per-user cache ``cache_dir("cifar10")``, then a download into
it (atomic: a temporary file, verified, then renamed).
"""
from __future__ import annotations

import hashlib
import io
import os
import tarfile
import urllib.error
from pathlib import Path

import numpy as np

from .._io import atomic_open
from .idx import DataError

__all__ = ["URL", "ARCHIVE", "ARCHIVE_SHA256", "CLASSES", "MEAN", "STD", "MEMBERS", "MAX_MEMBER_BYTES",
           "download_cifar10", "extract", "read_batches", "load_cifar10"]

#: The canonical address of the binary version (https://www.cs.toronto.edu/~kriz/cifar.html).
URL = "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz"
ARCHIVE = "cifar-10-binary.tar.gz"
#: SHA-256 of the archive, from TensorFlow Datasets' url_checksums/cifar10.txt (size 170052171).
ARCHIVE_SHA256 = "c4a38c50a1bc5f3a1c5537f2155ab9d68f9f25eb1ed8d9ddda3db29a59bca1dd"
CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
#: Per-channel mean and std of the 50,000 training images scaled to [0, 1] -- the values the fast
#: CIFAR-10 training work and torchvision's examples use (not measured here: the archive cannot be
#: downloaded on the machines this was written on).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)
_DIR = "cifar-10-batches-bin"
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILES = ("test_batch.bin",)
#: The members written out of the archive (everything else in it is checked, then ignored).
MEMBERS = tuple(f"{_DIR}/{n}" for n in TRAIN_FILES + TEST_FILES + ("batches.meta.txt",))
RECORD = 1 + 3 * 32 * 32
#: No member of the real archive is larger (10,000 records of 3073 bytes).
MAX_MEMBER_BYTES = 10000 * RECORD


def _checked_members(tar: tarfile.TarFile, where: str) -> dict[str, tarfile.TarInfo]:
    """Every member's name and kind checked; the expected ones by name."""
    found = {}
    for m in tar.getmembers():
        name = m.name
        parts = Path(name).parts
        if name.startswith(("/", "\\")) or os.path.isabs(name) or ".." in parts or ":" in name:
            raise DataError(f"{where}: archive member {name!r} has an unsafe path (absolute or with '..'); "
                            f"refusing to extract it")
        if not (m.isfile() or m.isdir()):
            raise DataError(f"{where}: archive member {name!r} is a link or special file; expected only "
                            f"regular files and folders")
        if m.size > MAX_MEMBER_BYTES:
            raise DataError(f"{where}: archive member {name!r} is {m.size} bytes, more than the "
                            f"{MAX_MEMBER_BYTES} bytes any CIFAR-10 file has")
        if name in MEMBERS:
            found[name] = m
    missing = [n for n in MEMBERS if n not in found]
    if missing:
        raise DataError(f"{where}: the archive lacks {missing}; expected the CIFAR-10 binary version "
                        f"({URL})")
    return found


def extract(archive, dest) -> Path:
    """Write the :data:`MEMBERS` of ``archive`` (a path or bytes) under ``dest``; returns
    ``dest/cifar-10-batches-bin``.  Raises :class:`DataError` for an unsafe or unexpected archive."""
    where = str(archive) if not isinstance(archive, (bytes, bytearray)) else "the downloaded archive"
    src = io.BytesIO(archive) if isinstance(archive, (bytes, bytearray)) else open(archive, "rb")
    try:
        with tarfile.open(fileobj=src, mode="r:gz") as tar:
            members = _checked_members(tar, where)
            out = Path(dest) / _DIR
            for name, m in members.items():
                f = tar.extractfile(m)
                body = f.read(MAX_MEMBER_BYTES + 1)
                if len(body) != m.size:
                    raise DataError(f"{where}: archive member {name!r} is truncated ({len(body)} of {m.size} bytes)")
                with atomic_open(Path(dest) / name) as fh:
                    fh.write(body)
    except (tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, DataError):
            raise
        raise DataError(f"{where}: not a readable .tar.gz ({type(exc).__name__}: {exc}); it is corrupt or "
                        f"truncated: delete it and download it again") from None
    finally:
        src.close()
    return out


def read_batches(directory, names) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 3, 32, 32) uint8, labels (N,) int64)`` from binary batch files."""
    xs, ys = [], []
    for n in names:
        path = Path(directory) / n
        raw = np.fromfile(path, dtype=np.uint8)
        if raw.size == 0 or raw.size % RECORD or raw.size > MAX_MEMBER_BYTES:
            raise DataError(f"{path}: {raw.size} bytes is not a whole number of 3073-byte CIFAR-10 records "
                            f"(at most 10000); delete it and download the archive again")
        rec = raw.reshape(-1, RECORD)
        if rec[:, 0].max() > 9:
            raise DataError(f"{path}: label {int(rec[:, 0].max())} in a record; CIFAR-10 labels are 0..9")
        ys.append(rec[:, 0].astype(np.int64))
        xs.append(rec[:, 1:].reshape(-1, 3, 32, 32))
    return np.concatenate(xs), np.concatenate(ys)


def download_cifar10(dest, url: str | None = None, timeout: float = 30, sha256: str | None = None) -> Path:
    """Fetch the archive into ``dest`` (verified, atomic) and extract it; returns the batches' folder.

    Args:
        dest: the directory (created if missing).
        url: where to fetch from (default :data:`URL`).
        timeout: socket timeout in seconds.
        sha256: the digest to verify against (default :data:`ARCHIVE_SHA256`).

    Raises:
        gpucnn.data.DownloadError: the fetch failed (HTTP error, timeout, short body) or the
            digest does not match; the message names the URL and why.
    """
    from .fetch import DownloadError, _fetch

    url = url or URL
    want = (sha256 or ARCHIVE_SHA256).lower()
    dest = Path(dest).expanduser()
    try:
        body = _fetch(url, timeout)
    except urllib.error.HTTPError as exc:
        raise DownloadError(f"could not download CIFAR-10 from {url}: HTTP {exc.code} {exc.reason}") from None
    except urllib.error.URLError as exc:
        raise DownloadError(f"could not download CIFAR-10 from {url}: {exc.reason}") from None
    except (OSError, ValueError) as exc:   # timeouts, short bodies (DataError), connection resets
        raise DownloadError(f"could not download CIFAR-10 from {url}: {type(exc).__name__}: {exc}") from None
    got = hashlib.sha256(body).hexdigest()
    if got != want:
        raise DownloadError(f"could not download CIFAR-10 from {url}: SHA-256 {got} of the {len(body)} bytes "
                            f"received is not the published {want}; nothing was kept")
    out = extract(bytes(body), dest)
    with atomic_open(dest / ARCHIVE) as fh:
        fh.write(body)
    return out


def _found(directory: Path) -> Path | None:
    for d in (directory / "cifar10", directory):
        if all((d / _DIR / n).is_file() for n in TRAIN_FILES + TEST_FILES):
            return d / _DIR
        if (d / ARCHIVE).is_file():
            return extract(d / ARCHIVE, d)
    return None


def load_cifar10(data_dir=None, download: bool = True, *, url: str | None = None, timeout: float = 30,
                 sha256: str | None = None, cache=None):
    """CIFAR-10 as a :class:`~gpucnn.data.Dataset`: 50,000 / 10,000 images ``(N, 3, 32, 32)`` uint8.

    See the module docstring for where it is looked up.  ``url``, ``timeout`` and ``sha256`` are
    :func:`download_cifar10`'s; ``cache`` replaces ``cache_dir("cifar10")``.
    """
    from .dataset import Dataset
    from .lookup import ENV_VAR, cache_dir

    if data_dir is None and os.environ.get(ENV_VAR):
        data_dir = os.environ[ENV_VAR]
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        where = _found(d)
        if where is None:
            raise FileNotFoundError(f"--data-dir {d}: holds neither {_DIR}/ (with {', '.join(TRAIN_FILES)}, "
                                    f"{TEST_FILES[0]}) nor {ARCHIVE}, in {d / 'cifar10'} or {d} itself")
    else:
        root = Path(cache) if cache is not None else cache_dir("cifar10")
        where = _found(root)
        if where is None:
            if not download:
                raise FileNotFoundError(f"CIFAR-10 not found in {root}; pass download=True or --data-dir")
            where = download_cifar10(root, url, timeout, sha256)
    tr_x, tr_y = read_batches(where, TRAIN_FILES)
    te_x, te_y = read_batches(where, TEST_FILES)
    return Dataset(name="cifar10", classes=list(CLASSES), train_images=tr_x, train_labels=tr_y,
                   test_images=te_x, test_labels=te_y, source=where, mean=MEAN, std=STD)

"""The IDX file format (MNIST, Fashion-MNIST): parse, decompress and verify one file.

:func:`read_idx` reads a gzipped or raw file -- told apart by the gzip magic
bytes, never by the file name -- checks the magic number, that the header's
dimensions account for exactly the bytes in the file and, for a file of a
known dataset, its SHA-256.  Anything wrong raises :class:`DataError` naming
the file and saying to delete it and download it again.

A gzip bomb is refused before it is inflated: :func:`read_payload` reads the
header first, refuses a declared shape other than the expected one or a
declared size over :data:`MAX_IDX_BYTES`, then decompresses only the declared
bytes plus one: a stream that goes on is "oversize".
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import zlib
from pathlib import Path

import numpy as np

from .._io import read_into
from .specs import DATASETS, FileSpec

__all__ = ["DataError", "read_idx", "read_payload", "parse_idx", "sha256", "verify",
           "verify_digest", "fail", "MAX_IDX_BYTES"]

GZIP_MAGIC = b"\x1f\x8b"

#: The most decompressed bytes an IDX header may declare (the largest known
#: file, the training images of MNIST and Fashion-MNIST, is 47 MB).
MAX_IDX_BYTES = 256 * 1024 * 1024
_GZIP_ERRORS = (gzip.BadGzipFile, EOFError, zlib.error)

#: IDX type codes (third byte of the magic number) -> big-endian NumPy dtype.
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


class DataError(ValueError):
    """A data file is corrupt, truncated, of the wrong format or fails its checksum."""


def fail(path: str | os.PathLike, problem: str) -> DataError:
    """Build the standard error for a bad data file (``.problem`` keeps the short reason)."""
    err = DataError(
        f"{os.fspath(path)}: {problem}. The file is corrupt, truncated or not the "
        f"expected file: delete it and re-download it "
        f"(gpucnn.data.load_dataset(name, download=True) fetches missing files)."
    )
    err.problem = problem
    return err


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _inflating(fileobj):
    """``fileobj`` (seekable, binary) itself, or a gzip reader over it when it starts with the gzip magic."""
    head = fileobj.read(2)
    fileobj.seek(0)
    return gzip.GzipFile(fileobj=fileobj, mode="rb") if head == GZIP_MAGIC else fileobj


def _read_upto(stream, n: int, path) -> bytearray:
    """The next ``n`` bytes of ``stream`` (fewer only where it ends); bad gzip data is a DataError."""
    buf = bytearray(n)
    try:
        got = read_into(stream, buf)
    except _GZIP_ERRORS as exc:
        raise fail(path, f"invalid gzip data ({exc})") from None
    del buf[got:]
    return buf


def _declared(head: bytes, path) -> tuple:
    """``(header length, shape, dtype)`` from the first bytes of an IDX file (at least 4), checked."""
    if len(head) < 4:
        raise fail(path, f"too short for an IDX header ({len(head)} bytes)")
    zero0, zero1, code, ndim = head[0], head[1], head[2], head[3]
    if zero0 != 0 or zero1 != 0:
        raise fail(path, f"bad IDX magic number 0x{head[:4].hex()} (must start with 0x0000)")
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in sorted(IDX_DTYPES))
        raise fail(path, f"unsupported IDX data type code 0x{code:02X} (supported: {known})")
    if ndim == 0:
        raise fail(path, "IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(head) < header_len:
        raise fail(path, f"truncated IDX header: {ndim} dimensions need {header_len} bytes, "
                         f"the data has {len(head)}")
    shape = tuple(int(d) for d in np.frombuffer(head, ">u4", ndim, 4))
    return header_len, shape, IDX_DTYPES[code]


def read_payload(fileobj, path: str | os.PathLike, *, shape: tuple | None = None,
                 max_bytes: int | None = None) -> bytes:
    """The decompressed IDX bytes of ``fileobj``, inflated no further than its header declares.

    Args:
        fileobj: a seekable binary file of the stored bytes, gzipped or raw
            (told apart by the gzip magic bytes).
        path: the file or URL, for messages.
        shape: the shape the file must declare (a :class:`FileSpec`'s); a
            header declaring another one is refused before any data is read.
        max_bytes: the most bytes (header included) the header may
            declare; default :data:`MAX_IDX_BYTES`.

    Returns:
        Header and data, exactly as many bytes as the header declares.

    Raises:
        DataError: a bad header, a declared shape or size over the limit, a
            stream shorter ("truncated") or longer ("oversize") than declared,
            or invalid gzip data.
    """
    stream = _inflating(fileobj)
    head = bytes(_read_upto(stream, 4, path))
    if len(head) == 4:
        head += _read_upto(stream, 4 * head[3], path)
    header_len, declared, dtype = _declared(head, path)
    expected_len = header_len + math.prod(declared) * dtype.itemsize
    if shape is not None and declared != tuple(shape):
        raise fail(path, f"shape {declared} differs from the expected {tuple(shape)}")
    limit = MAX_IDX_BYTES if max_bytes is None else max_bytes
    if expected_len > limit:
        raise fail(path, f"oversize: the header declares shape {declared} ({expected_len} bytes with "
                         f"header), more than the {limit}-byte limit for an IDX file")
    body = _read_upto(stream, expected_len - header_len, path)
    if header_len + len(body) < expected_len:
        raise fail(path, f"truncated: the header declares shape {declared} ({expected_len} bytes "
                         f"with header), the data has only {header_len + len(body)} bytes")
    if _read_upto(stream, 1, path):
        raise fail(path, f"oversize: the header declares shape {declared} ({expected_len} bytes with "
                         f"header), the data goes on past them (unexpected trailing bytes)")
    return head + bytes(body)


def parse_idx(payload: bytes, path: str | os.PathLike) -> np.ndarray:
    """Parse decompressed IDX bytes into an array (copy, native byte order)."""
    header_len, shape, dtype = _declared(payload, path)
    count = 1
    for d in shape:
        count *= d
    expected_len = header_len + count * dtype.itemsize
    if len(payload) < expected_len:
        raise fail(
            path,
            f"truncated: the header declares shape {shape} ({expected_len} bytes "
            f"with header), the data has only {len(payload)} bytes",
        )
    if len(payload) > expected_len:
        raise fail(
            path,
            f"oversize: the header declares shape {shape} ({expected_len} bytes "
            f"with header), the data has {len(payload)} bytes "
            f"({len(payload) - expected_len} unexpected trailing bytes)",
        )
    arr = np.frombuffer(payload, dtype, count, header_len).reshape(shape)
    # A copy makes the result writable and native-endian.
    return arr.astype(dtype.newbyteorder("="), copy=True)


def verify(raw: bytes, payload: bytes, expected: FileSpec, path, dataset: str | None) -> None:
    """Check ``raw`` (file bytes) / ``payload`` (decompressed) against ``expected``."""
    verify_digest(sha256(raw), payload, expected, path, dataset)


def verify_digest(file_digest: str, payload: bytes, expected: FileSpec, path, dataset: str | None) -> None:
    """:func:`verify` for a file whose SHA-256 ``file_digest`` is already known (it was hashed as a stream)."""
    if file_digest in expected.sha256:
        return
    idx_digest = None
    if expected.idx_sha256 is not None:
        idx_digest = sha256(payload)
        if idx_digest == expected.idx_sha256:
            return
    what = f"{dataset}'s {expected.name}" if dataset else expected.name
    problem = f"SHA-256 mismatch: {file_digest} is not a known digest of {what}"
    if idx_digest is not None:
        problem += f" (decompressed: {idx_digest}, expected {expected.idx_sha256})"
    # Say so when the file is a known file of another dataset.
    for other in DATASETS.values():
        if other.name == dataset:
            continue
        for f in other.files.values():
            if file_digest in f.sha256 or (
                idx_digest is not None and idx_digest == f.idx_sha256
            ):
                problem += f"; it is {other.name}'s {f.name}"
    raise fail(path, problem)


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
            mismatch (truncated or oversize), a declared shape other than
            ``expected``'s or a declared size over :data:`MAX_IDX_BYTES`
            (both refused before the data is inflated), invalid gzip data,
            checksum mismatch.  The message names the file and says to delete it
            and re-download it.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    with open(path, "rb") as f:
        payload = read_payload(f, path, shape=None if expected is None else expected.shape)
        if expected is not None:
            f.seek(0)
            h = hashlib.sha256()           # hashlib.file_digest is Python 3.11+; we support 3.10
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
            file_digest = h.hexdigest()
    arr = parse_idx(payload, path)
    if expected is not None:
        verify_digest(file_digest, payload, expected, path, dataset)
    return arr

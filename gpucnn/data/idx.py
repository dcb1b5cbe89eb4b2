"""The IDX file format (MNIST, Fashion-MNIST): parse, decompress and verify one file.

:func:`read_idx` reads a gzipped or raw file -- told apart by the gzip magic
bytes, never by the file name -- checks the magic number, that the header's
dimensions account for exactly the bytes in the file and, for a file of a
known dataset, its SHA-256.  Anything wrong raises :class:`DataError` naming
the file and saying to delete it and download it again.
"""
from __future__ import annotations

import gzip
import hashlib
import os
import zlib
from pathlib import Path

import numpy as np

from .specs import DATASETS, FileSpec

__all__ = ["DataError", "read_idx", "parse_idx", "decompress", "sha256", "verify", "fail"]

GZIP_MAGIC = b"\x1f\x8b"

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


def decompress(raw: bytes, path: str | os.PathLike) -> bytes:
    """Gunzip ``raw`` when it starts with the gzip magic bytes, else return it."""
    if raw[:2] != GZIP_MAGIC:
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as exc:
        raise fail(path, f"invalid gzip data ({exc})") from None


def parse_idx(payload: bytes, path: str | os.PathLike) -> np.ndarray:
    """Parse decompressed IDX bytes into an array (copy, native byte order)."""
    if len(payload) < 4:
        raise fail(path, f"too short for an IDX header ({len(payload)} bytes)")
    zero0, zero1, code, ndim = payload[0], payload[1], payload[2], payload[3]
    if zero0 != 0 or zero1 != 0:
        raise fail(
            path,
            f"bad IDX magic number 0x{payload[:4].hex()} (must start with 0x0000)",
        )
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in sorted(IDX_DTYPES))
        raise fail(path, f"unsupported IDX data type code 0x{code:02X} (supported: {known})")
    if ndim == 0:
        raise fail(path, "IDX header declares 0 dimensions")
    header_len = 4 + 4 * ndim
    if len(payload) < header_len:
        raise fail(
            path,
            f"truncated IDX header: {ndim} dimensions need {header_len} bytes, "
            f"the data has {len(payload)}",
        )
    shape = tuple(int(d) for d in np.frombuffer(payload, ">u4", ndim, 4))
    dtype = IDX_DTYPES[code]
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
    file_digest = sha256(raw)
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
            mismatch (truncated or oversize), invalid gzip data, checksum or
            shape mismatch.  The message names the file and says to delete it
            and re-download it.
        FileNotFoundError: ``path`` does not exist.
    """
    path = Path(path)
    raw = path.read_bytes()
    payload = decompress(raw, path)
    arr = parse_idx(payload, path)
    if expected is not None:
        verify(raw, payload, expected, path, dataset)
        if arr.shape != tuple(expected.shape):
            raise fail(path, f"shape {arr.shape} differs from the expected {tuple(expected.shape)}")
    return arr

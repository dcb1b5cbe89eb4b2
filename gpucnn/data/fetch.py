"""Downloading a dataset from its mirrors into the cache, verified and atomic."""
from __future__ import annotations

import http.client
import io
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Sequence

from .._io import atomic_open
from .idx import DataError, parse_idx, read_idx, read_payload, verify
from .lookup import ENV_VAR
from .specs import FileSpec, get_spec

__all__ = ["DownloadError", "download"]

#: No dataset file is anywhere near this big; a download past it is cut off.
_MAX_DOWNLOAD_BYTES = 256 * 1024 * 1024


class DownloadError(DataError):
    """No mirror delivered a file that passed verification."""


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
    spec = get_spec(name)
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
                payload = read_payload(io.BytesIO(body), url, shape=f.shape)
                parse_idx(payload, url)
                verify(body, payload, f, url, spec.name)
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

"""Where a dataset's files are looked up (see :mod:`gpucnn.data` for the order)."""
from __future__ import annotations

import os
from pathlib import Path

from .specs import DatasetSpec, FileSpec, canonical_name, get_spec

__all__ = ["ENV_VAR", "PACKAGE_DATA", "DataDirError", "cache_dir", "find_file", "has_all", "candidates", "locate"]

#: Environment variable naming a data root (``$GPUCNN_DATA/<name>/`` or the files directly).
ENV_VAR = "GPUCNN_DATA"

#: Where the package keeps its shipped copies: ``PACKAGE_DATA/<name>/``.
PACKAGE_DATA = Path(__file__).resolve().parent.parent / "_data"


def cache_dir(name: str | None = None) -> Path:
    """The per-user cache directory (``$XDG_CACHE_HOME/gpucnn`` or ``~/.cache/gpucnn``).

    Args:
        name: Dataset name; when given the dataset's sub-directory is returned
            (``folder``: where decoded image folders are cached).

    Returns:
        The directory (not created).
    """
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if xdg and os.path.isabs(xdg) else Path.home() / ".cache"
    root = base / "gpucnn"
    return root / canonical_name(name) if name is not None else root


def find_file(directory: Path, f: FileSpec) -> Path | None:
    """The file ``f`` in ``directory`` under its .gz or un-gzipped name, if any."""
    for candidate in (f.name, f.raw_name):
        p = directory / candidate
        if p.is_file():
            return p
    return None


def has_all(directory: Path, spec: DatasetSpec) -> bool:
    return directory.is_dir() and all(find_file(directory, f) for f in spec.files.values())


def candidates(spec: DatasetSpec, data_dir: str | os.PathLike | None) -> list[tuple[str, Path]]:
    """Directories to search, in lookup order, each with a label for messages."""
    out: list[tuple[str, Path]] = []
    if data_dir is not None:
        d = Path(data_dir).expanduser()
        out += [("data_dir", d / spec.name), ("data_dir", d)]
    env = os.environ.get(ENV_VAR, "")
    if env:
        d = Path(env).expanduser()
        out += [(ENV_VAR, d / spec.name), (ENV_VAR, d)]
    out.append(("shipped", PACKAGE_DATA / spec.name))
    out.append(("cache", cache_dir(spec.name)))
    return out


def _explicit(spec: DatasetSpec, data_dir) -> tuple[str, Path] | None:
    """The directory the user named (``data_dir``, else ``$GPUCNN_DATA``), with how it was named."""
    if data_dir is not None:
        return "--data-dir", Path(data_dir).expanduser()
    env = os.environ.get(ENV_VAR, "")
    return (f"${ENV_VAR}", Path(env).expanduser()) if env else None


def locate(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """Find the directory holding all four files of a dataset.

    A directory the user named -- ``data_dir`` (the CLI's ``--data-dir``), else
    ``$GPUCNN_DATA`` -- must hold the dataset (as ``<dir>/<name>/`` or
    ``<dir>`` itself): nothing else is looked at then, and a directory that
    does not hold it is an error.  Without one: the copy shipped in the
    package, then the per-user cache.  Only existence is checked here;
    contents are verified when read.

    Args:
        name: Dataset name (see :data:`DATASETS`).
        data_dir: Explicit directory to look in.

    Returns:
        The directory holding every file, or ``None`` (nothing named, nothing
        shipped or cached: the caller may download).

    Raises:
        DataDirError: a named directory does not hold the dataset; the message
            names it and lists the files expected.
    """
    spec = get_spec(name)
    named = _explicit(spec, data_dir)
    if named is not None:
        how, d = named
        for candidate in (d / spec.name, d):
            if has_all(candidate, spec):
                return candidate
        raise DataDirError(spec, how, d)
    for _, d in candidates(spec, None):
        if has_all(d, spec):
            return d
    return None


class DataDirError(FileNotFoundError):
    """A directory the user named (``--data-dir``, ``$GPUCNN_DATA``) does not hold the dataset."""

    def __init__(self, spec: DatasetSpec, how: str, directory: Path):
        folders = _folders_named_like_files(spec, directory)
        where = "does not exist" if not directory.exists() else (
            "is not a directory" if not directory.is_dir() else
            _is_are(folders) + " a directory, not a file" if folders else "does not hold it")
        names = ", ".join(f.name for f in spec.files.values())
        present = []
        for d in (directory / spec.name, directory):
            present += [p.name for p in sorted(d.iterdir()) if p.is_file()] if d.is_dir() else []
        super().__init__(
            f"{how} {directory}: {where}: expected {spec.name}'s four files {names} (each gzipped or "
            f"not) in {directory / spec.name} or in {directory} itself"
            + (f"; found only the files {sorted(set(present))[:12]}" if present else "")
            + ". Point it at the files, or leave it out to use "
            + ("the copy shipped with gpucnn" if spec.name == "mnist" else "the cache or a download"))
        self.directory = directory


def _folders_named_like_files(spec: DatasetSpec, directory: Path) -> list[Path]:
    """The directories that stand where one of ``spec``'s files is looked for (``<dir>[/<name>]/<file>``)."""
    out = []
    for d in (directory / spec.name, directory):
        for f in spec.files.values():
            out += [d / n for n in (f.name, f.raw_name) if (d / n).is_dir()]
    return out


def _is_are(paths: list[Path]) -> str:
    """``"<path> is"`` or ``"<path>, <path> are"``, for a message."""
    return ", ".join(map(str, paths)) + (" is" if len(paths) == 1 else " are")

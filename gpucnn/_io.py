"""File helpers shared by checkpoints, dataset files, exports and metrics.

Atomic writes (:func:`atomic_open`), reading a stream no further than asked
(:func:`read_into`), the nesting depth of a JSON text, measured before it
is parsed (:func:`json_depth`), and a standard output whose reader went away
(:func:`stdout_closed`, :func:`stdout_gone`: ``gpucnn predict ... | head -1``).
"""
from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import tempfile
from pathlib import Path

import numpy as np

_CHUNK = 1 << 20
_JSON_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")

#: exit status when standard output's reader went away: 128 + SIGPIPE, as a Unix tool killed by it
EXIT_BROKEN_PIPE = 128 + signal.SIGPIPE


@contextlib.contextmanager
def atomic_open(path, mode: str = "wb"):
    """Open a temporary file beside ``path``; on success it replaces ``path``.

    The data are flushed and fsynced, the temporary file is renamed over
    ``path`` with ``os.replace`` (atomic on POSIX) and the directory is fsynced
    so the rename survives a crash.  If the body raises, the temporary file is
    removed and ``path`` is left exactly as it was; an OSError that names no
    file (``[Errno 28] No space left on device``) is raised again naming ``path``.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    directory.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the usual permissions
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        if isinstance(exc, OSError) and exc.filename is None and exc.errno is not None:
            raise OSError(exc.errno, exc.strerror, str(path)) from exc
        raise
    try:  # make the rename itself durable (POSIX; not possible everywhere)
        dfd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def read_into(stream, buffer) -> int:
    """Fill ``buffer`` (a writable bytes-like object) from the binary ``stream``, a megabyte at a time.

    Returns the number of bytes read: ``len(buffer)``, or fewer only where the
    stream ends.  Nothing past ``buffer`` is read, so a stream that inflates
    (gzip, a zip member) is inflated no further than that.
    """
    view = memoryview(buffer).cast("B")
    got = 0
    try:
        while got < len(view):
            k = stream.readinto(view[got:got + _CHUNK])
            if not k:
                break
            got += k
    finally:
        view.release()
    return got


def json_depth(text: str) -> int:
    """How deeply the arrays and objects of the JSON ``text`` nest (0 for a scalar), without parsing it.

    Strings are skipped, so brackets inside them do not count.  Meant to be
    checked against a limit before ``json.loads``, whose recursion a deeply
    nested text (``[[[[...``) would exhaust.
    """
    brackets = _NOT_BRACKET.sub("", _JSON_STRING.sub("", text)).encode("ascii")
    depth = deepest = 0
    for start in range(0, len(brackets), _CHUNK):   # a megabyte at a time: little memory for a long text
        codes = np.frombuffer(brackets, np.uint8, min(_CHUNK, len(brackets) - start), start)
        levels = np.cumsum(np.where((codes == ord("[")) | (codes == ord("{")), 1, -1), dtype=np.int64) + depth
        deepest, depth = max(deepest, int(levels.max())), int(levels[-1])
    return deepest


def stdout_gone() -> int:
    """The reader of standard output went away (``| head``): stop quietly, as Unix tools do.

    Standard output is pointed at /dev/null so that the interpreter's final
    flush raises nothing either; returns :data:`EXIT_BROKEN_PIPE`.
    """
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # pragma: no cover - stdout without a file descriptor
        pass
    return EXIT_BROKEN_PIPE


def stdout_closed() -> bool:
    """Standard output is a pipe whose reader went away (poll reports an error on its write end).
    True also when that cannot be told (no file descriptor, no poll): the old, quiet behaviour."""
    import select

    try:
        poller = select.poll()
        poller.register(sys.stdout.fileno(), select.POLLOUT)
        return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))
    except (AttributeError, OSError, ValueError):
        return True

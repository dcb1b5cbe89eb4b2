"""Communicators for data-parallel training: one process, MPI (``mpi4py``) and NCCL (CuPy).

gpucnn opens no sockets of its own: processes are started by the cluster's
MPI launcher (``mpiexec -n 4 gpucnn train --distributed ...``) and talk
through MPI, or through NCCL between GPUs (bootstrapped over MPI).

A :class:`Communicator` offers what data-parallel training needs:

* ``rank``, ``size`` (and ``local_rank``, ``local_size``: the ranks on this node);
* :meth:`~Communicator.broadcast` -- a flat buffer from ``root``, in place;
* :meth:`~Communicator.allreduce_sum` -- in-place sum of a flat buffer over all ranks;
* :meth:`~Communicator.allreduce_scalars` -- sum (or max) of a few host scalars (metrics);
* :meth:`~Communicator.barrier`, :meth:`~Communicator.abort` (ends every rank);
* :meth:`~Communicator.broadcast_bytes` / :meth:`~Communicator.broadcast_json`
  -- small metadata as a ``uint8`` buffer (nothing is pickled).

Implementations:

* :class:`SingleProcess` -- size 1, every operation a no-op;
* :class:`MPICommunicator` -- ``mpi4py``'s non-blocking buffer methods
  (``Ibcast``, ``Iallreduce``, ``Ibarrier``), polled until they complete or the
  collective timeout passes, on NumPy arrays; CuPy arrays go straight to MPI when it is
  CUDA-aware (MPI 4.1's ``mpi_memory_alloc_kinds`` info lists ``cuda``, or
  ``GPUCNN_MPI_CUDA_AWARE=1``), else they are staged through host memory;
* :class:`NCCLCommunicator` -- ``cupy.cuda.nccl`` for CuPy buffers (one GPU
  per rank, chosen by the local rank; the NCCL unique id is broadcast over
  MPI), MPI for host scalars, the barrier and abort.

:func:`init` picks one (``"auto"``: NCCL between GPUs, MPI on the CPU, one
process when no MPI launcher started this one), selects this rank's GPU,
limits BLAS threads per rank (:func:`limit_blas_threads`) and installs an
excepthook that aborts the whole job when any rank dies of an exception
(:func:`install_excepthook`), so a failure never leaves the others hanging
in a collective.

A rank that stops without dying (``SIGSTOP``, a deadlock, a hung file system)
is caught by the collectives' timeout (:attr:`Communicator.timeout`,
``--collective-timeout``, default :data:`DEFAULT_COLLECTIVE_TIMEOUT_S`): the
MPI communicator posts each collective non-blocking and polls it; a rank whose
collective has not completed by then calls the roll -- a small message to
every other rank, answered by each rank that is waiting in a collective
itself -- and aborts the job naming the ranks that did not answer
(:class:`CollectiveTimeout`).
"""
from __future__ import annotations

import atexit
import json
import math
import os
import sys
import time
import traceback

import numpy as np

from . import backend

__all__ = ["Communicator", "SingleProcess", "MPICommunicator", "NCCLCommunicator", "BACKENDS", "init",
           "launched_size", "limit_blas_threads", "install_excepthook", "fail", "exit_code", "report",
           "CollectiveTimeout", "DEFAULT_COLLECTIVE_TIMEOUT_S", "check_timeout"]

#: ``init(backend=...)`` choices.
BACKENDS = ("auto", "single", "mpi", "nccl")
#: Environment variables MPI launchers set (MPICH/Intel MPI/Slurm PMI, Open MPI, PMIx, MVAPICH).
LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
LAUNCHER_RANK_VARS = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "MV2_COMM_WORLD_RANK")
BLAS_ENV_VARS = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS")
#: seconds a rank waits after printing its error before ``MPI_Abort`` ends the job
ABORT_GRACE_S = 0.5
_INSTALL_MPI = "pip install 'gpucnn[mpi]' (mpi4py; add the mpich wheel if the machine has no MPI)"
#: seconds a collective waits for the slowest rank before the job is aborted (``--collective-timeout``)
DEFAULT_COLLECTIVE_TIMEOUT_S = 600.0
#: a rank waiting in a collective polls it this long yielding the core between polls (as MPICH's
#: blocking calls do: spinning alone slows the ranks it waits for when cores are shared), then
#: every POLL_PAUSE_S (a long wait: a checkpoint being written, a stopped rank)
SPIN_S = 0.05
POLL_PAUSE_S = 0.001
_yield = getattr(os, "sched_yield", lambda: time.sleep(0))
#: how long (at most; never longer than the timeout) a timed-out rank waits for answers to its roll call
ROLL_CALL_S = 5.0


class CollectiveTimeout(TimeoutError):
    """A collective did not complete within the communicator's :attr:`~Communicator.timeout`."""


def check_timeout(value, name: str = "collective_timeout") -> float:
    """``value`` as seconds, if it is a positive finite number; else a ValueError naming it."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
    if not ok or not (0 < value < math.inf):
        raise ValueError(f"{name} must be a positive number of seconds, got {name}={value!r}")
    return float(value)


class Communicator:
    """The interface; :class:`SingleProcess` is the size-1 implementation."""

    backend = "single"
    rank, size, local_rank, local_size = 0, 1, 0, 1
    #: BLAS threads per rank set by :func:`init` (None: left alone)
    blas_threads: int | None = None
    _timeout = DEFAULT_COLLECTIVE_TIMEOUT_S

    @property
    def is_root(self) -> bool:
        return self.rank == 0

    @property
    def timeout(self) -> float:
        """Seconds a collective waits for every rank to arrive; then the job is aborted, naming
        the ranks that did not (a positive number; default :data:`DEFAULT_COLLECTIVE_TIMEOUT_S`)."""
        return self._timeout

    @timeout.setter
    def timeout(self, seconds) -> None:
        self._timeout = check_timeout(seconds)

    def broadcast(self, buf, root: int = 0) -> None:
        """Overwrite ``buf`` (a contiguous NumPy/CuPy array) with rank ``root``'s, in place."""

    def allreduce_sum(self, buf) -> None:
        """Replace ``buf`` (a contiguous NumPy/CuPy array) by its sum over all ranks, in place."""

    def allreduce_scalars(self, values, op: str = "sum") -> np.ndarray:
        """Sum (``op="max"``: maximum) of host scalars over all ranks, as float64."""
        _check_op(op)
        return np.array(values, dtype=np.float64).reshape(-1)

    def barrier(self) -> None:
        """Wait until every rank has arrived."""

    def abort(self, code: int = 1):
        """End every rank of the job with exit status ``code`` (does not return)."""
        _flush()
        os._exit(code)

    def broadcast_bytes(self, data: bytes | None, root: int = 0) -> bytes:
        """Rank ``root``'s ``data`` on every rank (a length, then a ``uint8`` buffer)."""
        mine = self.rank == root
        length = np.array([len(data) if mine else 0], dtype=np.int64)
        self.broadcast(length, root)
        buf = np.frombuffer(data, dtype=np.uint8).copy() if mine else np.empty(int(length[0]), np.uint8)
        if buf.size:
            self.broadcast(buf, root)
        return buf.tobytes()

    def broadcast_json(self, obj=None, root: int = 0):
        """Rank ``root``'s JSON-able ``obj`` on every rank."""
        data = json.dumps(obj).encode() if self.rank == root else None
        return json.loads(self.broadcast_bytes(data, root).decode())

    def describe(self) -> str:
        text = f"{self.backend}, {self.size} rank{'s' if self.size != 1 else ''}"
        if self.size > 1:
            text += f" ({self.local_size} on this node)"
        if self.blas_threads:
            text += f", {self.blas_threads} BLAS thread{'s' if self.blas_threads != 1 else ''} per rank"
        if self.size > 1:
            text += f", collectives time out after {self.timeout:g} s"
        return text

    def __repr__(self):
        return f"{type(self).__name__}(rank={self.rank}, size={self.size})"


class SingleProcess(Communicator):
    """One process: size 1, every operation a no-op."""


def _check_op(op):
    if op not in ("sum", "max"):
        raise ValueError(f"op must be 'sum' or 'max', got op={op!r}")


def _check_buffer(buf, what: str):
    if not isinstance(buf, np.ndarray) and not backend.is_cupy(buf):
        raise TypeError(f"{what}: expected a NumPy or CuPy array, got {type(buf).__name__}")
    if not buf.flags.c_contiguous:
        raise ValueError(f"{what}: the buffer must be contiguous (got shape {tuple(buf.shape)}, "
                         f"strides {tuple(buf.strides)}); pass the flat buffer itself")


def _flush():
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except Exception:
            pass


def _mpi_cuda_aware(comm) -> bool:
    """Whether MPI accepts CUDA device buffers (override: ``GPUCNN_MPI_CUDA_AWARE=0/1``)."""
    forced = os.environ.get("GPUCNN_MPI_CUDA_AWARE")
    if forced is not None:
        if forced not in ("0", "1"):
            raise ValueError(f"GPUCNN_MPI_CUDA_AWARE must be 0 or 1, got {forced!r}")
        return forced == "1"
    try:  # MPI 4.1 memory allocation kinds, e.g. "mpi,system,cuda:device"
        info = comm.Get_info()
        kinds = info.Get("mpi_memory_alloc_kinds") or ""
        info.Free()
    except Exception:
        return False
    return any(k.split(":")[0] == "cuda" for k in kinds.split(","))


#: the collectives, as a roll call names them (their index travels in the messages)
_COLLECTIVES = ("allreduce", "broadcast", "barrier")
_TAG_CALL, _TAG_ANSWER = 1, 2


class MPICommunicator(Communicator):
    """MPI through ``mpi4py`` (``MPI.COMM_WORLD`` unless ``comm`` is given).

    NumPy buffers go straight to ``Ibcast``/``Iallreduce``.  CuPy buffers go
    straight to MPI too when it is CUDA-aware (``cuda_aware``; default: ask
    MPI), after the current stream is synchronised; otherwise they are copied
    to a reused host buffer, reduced there and copied back.

    Every collective is posted non-blocking and polled (:meth:`_wait`) until
    it completes or ``timeout`` seconds pass.  Then this rank calls the roll
    on a duplicate of the communicator: every other rank that is polling a
    collective answers where it waits; those that do not answer within
    :data:`ROLL_CALL_S` are named as the ranks that did not arrive, and the
    job is aborted (:func:`fail`, :class:`CollectiveTimeout`).
    """

    backend = "mpi"

    def __init__(self, comm=None, cuda_aware: bool | None = None, timeout: float | None = None):
        try:
            from mpi4py import MPI
        except ImportError as exc:
            raise ImportError(f"the MPI communicator needs mpi4py ({exc}); {_INSTALL_MPI}") from None
        self.MPI = MPI
        self.comm = MPI.COMM_WORLD if comm is None else comm
        self.rank, self.size = self.comm.Get_rank(), self.comm.Get_size()
        local = self.comm.Split_type(MPI.COMM_TYPE_SHARED, key=self.rank)
        self.local_rank, self.local_size = local.Get_rank(), local.Get_size()
        local.Free()
        self.cuda_aware = _mpi_cuda_aware(self.comm) if cuda_aware is None else bool(cuda_aware)
        self._host: dict = {}
        if timeout is not None:
            self.timeout = timeout
        # the roll call: its own communicator (no message of it can match anything else), a
        # receive for a call always posted, the collectives posted so far, the one waited in
        self._roll = self.comm.Dup()
        self._call = np.zeros(2, np.int64)
        self._call_status = MPI.Status()
        self._call_req = self._roll.Irecv(self._call, source=MPI.ANY_SOURCE, tag=_TAG_CALL)
        self._answers: list = []           # (request, buffer) of answers in flight
        self._callers: dict = {}           # rank -> (collective, number) of the calls received
        self._posted = 0
        self._waiting_in = (0, 0)          # (index in _COLLECTIVES, number); number 0: none
        atexit.register(self._close)

    def _close(self) -> None:
        """Withdraw the standing receive of the roll call (MPI must not finalize with it posted)."""
        MPI = self.MPI
        if self._call_req is None or MPI.Is_finalized():
            return
        self._call_req.Cancel()
        self._call_req.Wait()
        self._call_req = None

    def _wait(self, request, collective: str) -> None:
        """Poll ``request`` (a non-blocking collective) until it completes; abort the job when it
        has not after :attr:`timeout` seconds, naming the ranks that did not arrive."""
        self._posted += 1
        if request.Test():
            return
        self._waiting_in = (_COLLECTIVES.index(collective), self._posted)
        start = time.monotonic()
        while not request.Test():
            self._answer_calls()
            waited = time.monotonic() - start
            if waited >= self._timeout:
                self._timed_out()
            if waited > SPIN_S:
                time.sleep(POLL_PAUSE_S)
            else:
                _yield()
        self._waiting_in = (0, 0)

    def _answer_calls(self) -> None:
        """Answer every roll call received: where this rank waits (it is alive and arrived)."""
        while self._call_req is not None and self._call_req.Test(self._call_status):
            caller = self._call_status.Get_source()
            self._callers[caller] = (int(self._call[0]), int(self._call[1]))
            self._call_req = self._roll.Irecv(self._call, source=self.MPI.ANY_SOURCE, tag=_TAG_CALL)
            answer = np.array(self._waiting_in, np.int64)
            self._answers = [(r, b) for r, b in self._answers if not r.Test()]
            self._answers.append((self._roll.Isend(answer, dest=caller, tag=_TAG_ANSWER), answer))

    @staticmethod
    def _where(position) -> str:
        kind, number = position
        return f"{_COLLECTIVES[kind]} #{number}" if number else "no collective"

    def _timed_out(self):
        """Call the roll, then abort the job naming the ranks that did not answer (does not return)."""
        peers = [p for p in range(self.size) if p != self.rank]
        mine = np.array(self._waiting_in, np.int64)
        self._calls = [(self._roll.Isend(mine, dest=p, tag=_TAG_CALL), mine) for p in peers]  # kept till the end
        replies = {p: np.zeros(2, np.int64) for p in peers}
        pending = {p: self._roll.Irecv(replies[p], source=p, tag=_TAG_ANSWER) for p in peers}
        heard: dict = {}
        end = time.monotonic() + min(self._timeout, ROLL_CALL_S)
        while len(heard) < len(peers) and time.monotonic() < end:
            self._answer_calls()                       # the others may be calling the roll too
            for p in peers:
                if p not in heard and pending[p].Test():
                    heard[p] = (int(replies[p][0]), int(replies[p][1]))
                elif p not in heard and p in self._callers:
                    heard[p] = self._callers[p]
            time.sleep(POLL_PAUSE_S)
        missing = [p for p in peers if p not in heard]
        here = self._where(self._waiting_in)
        if missing:
            names = ", ".join(map(str, missing))
            text = (f"{here} did not complete within {self._timeout:g} s: rank{'s' if len(missing) > 1 else ''} "
                    f"{names} did not arrive (stopped, hung, or busy outside the collectives that long)")
        else:
            text = (f"{here} did not complete within {self._timeout:g} s although every rank answered the "
                    f"roll call: the collective itself is stuck (the MPI transport?)")
        elsewhere = [f"rank {p} waits in {self._where(w)}" for p, w in sorted(heard.items())
                     if w != tuple(self._waiting_in)]
        if elsewhere:
            text += "; " + ", ".join(elsewhere)
        fail(self, CollectiveTimeout(f"{text}; aborting the job (--collective-timeout sets the limit)"))

    def _staged(self, buf, fn):
        """Run ``fn(mpi_buffer)`` on ``buf``, staging a CuPy array through the host if needed."""
        if not backend.is_cupy(buf):
            fn(buf)
            return
        backend.cupy.cuda.get_current_stream().synchronize()
        if self.cuda_aware:
            fn(buf)
            return
        key = (buf.size, buf.dtype.str)
        host = self._host.get(key)
        if host is None:
            host = self._host[key] = np.empty(buf.shape, dtype=buf.dtype)
        host = host.reshape(buf.shape)
        buf.get(out=host)
        fn(host)
        buf.set(host)

    def broadcast(self, buf, root: int = 0) -> None:
        _check_buffer(buf, "broadcast")
        self._staged(buf, lambda b: self._wait(self.comm.Ibcast(b, root=root), "broadcast"))

    def allreduce_sum(self, buf) -> None:
        _check_buffer(buf, "allreduce_sum")
        MPI = self.MPI
        self._staged(buf, lambda b: self._wait(self.comm.Iallreduce(MPI.IN_PLACE, b, op=MPI.SUM), "allreduce"))

    def allreduce_scalars(self, values, op: str = "sum") -> np.ndarray:
        _check_op(op)
        a = np.array(values, dtype=np.float64).reshape(-1)
        MPI = self.MPI
        self._wait(self.comm.Iallreduce(MPI.IN_PLACE, a, op=MPI.SUM if op == "sum" else MPI.MAX), "allreduce")
        return a

    def barrier(self) -> None:
        self._wait(self.comm.Ibarrier(), "barrier")

    def abort(self, code: int = 1):
        _flush()
        time.sleep(ABORT_GRACE_S)  # let the launcher forward what this rank printed last
        self.comm.Abort(int(code))
        os._exit(code)  # pragma: no cover - Abort does not return


def _nccl_dtype(nccl, dtype):
    table = {"float16": "NCCL_FLOAT16", "float32": "NCCL_FLOAT32", "float64": "NCCL_FLOAT64",
             "int8": "NCCL_INT8", "uint8": "NCCL_UINT8", "int32": "NCCL_INT32", "int64": "NCCL_INT64"}
    name = table.get(np.dtype(dtype).name)
    if name is None:
        raise TypeError(f"NCCL: unsupported dtype {np.dtype(dtype)} (supported: {', '.join(table)})")
    return getattr(nccl, name)


def _encode_nccl_id(uid) -> np.ndarray:
    """``[kind, 128 bytes]``: kind 2 = bytes (newer CuPy), 1/0 = tuple of unsigned/signed chars."""
    if isinstance(uid, (bytes, bytearray)):
        return np.frombuffer(bytes([2]) + bytes(uid), dtype=np.uint8).copy()
    values = [int(v) for v in uid]
    kind = 0 if any(v < 0 for v in values) else 1
    return np.array([kind] + [v & 0xFF for v in values], dtype=np.uint8)


def _decode_nccl_id(buf: np.ndarray):
    kind, raw = int(buf[0]), buf[1:]
    if kind == 2:
        return raw.tobytes()
    return tuple(int(v) for v in (raw.view(np.int8) if kind == 0 else raw))


class NCCLCommunicator(Communicator):
    """NCCL (``cupy.cuda.nccl``) between GPUs, one GPU per rank; MPI for the rest.

    Rank 0 creates the NCCL unique id, MPI broadcasts it, every rank then
    joins with ``NcclCommunicator(size, id, rank)`` on its current device
    (:func:`init` selects it from the local rank).  CuPy buffers are reduced
    and broadcast by NCCL on the current stream (no host sync); NumPy buffers,
    the metric scalars, the barrier and abort go through ``mpi``.
    """

    backend = "nccl"

    def __init__(self, mpi: MPICommunicator | None = None):
        try:
            from cupy.cuda import nccl
        except Exception as exc:
            raise ImportError(f"the NCCL communicator needs CuPy with NCCL (cupy.cuda.nccl): {exc}") from None
        if not getattr(nccl, "available", True):
            raise ImportError("the NCCL communicator needs CuPy built with NCCL (cupy.cuda.nccl.available is False)")
        self.nccl = nccl
        self.mpi = mpi if mpi is not None else MPICommunicator()
        self.rank, self.size = self.mpi.rank, self.mpi.size
        self.local_rank, self.local_size = self.mpi.local_rank, self.mpi.local_size
        ident = _encode_nccl_id(nccl.get_unique_id()) if self.rank == 0 else np.empty(129, np.uint8)
        self.mpi.broadcast(ident)
        self.comm = nccl.NcclCommunicator(self.size, _decode_nccl_id(ident), self.rank)

    @staticmethod
    def _stream():
        return backend.cupy.cuda.get_current_stream().ptr

    def broadcast(self, buf, root: int = 0) -> None:
        _check_buffer(buf, "broadcast")
        if not backend.is_cupy(buf):
            self.mpi.broadcast(buf, root)
            return
        self.comm.bcast(buf.data.ptr, buf.size, _nccl_dtype(self.nccl, buf.dtype), root, self._stream())

    def allreduce_sum(self, buf) -> None:
        _check_buffer(buf, "allreduce_sum")
        if not backend.is_cupy(buf):
            self.mpi.allreduce_sum(buf)
            return
        ptr = buf.data.ptr
        self.comm.allReduce(ptr, ptr, buf.size, _nccl_dtype(self.nccl, buf.dtype), self.nccl.NCCL_SUM,
                            self._stream())

    def allreduce_scalars(self, values, op: str = "sum") -> np.ndarray:
        return self.mpi.allreduce_scalars(values, op)

    @property
    def timeout(self) -> float:
        """The timeout of the MPI collectives (the metrics, the barrier, host buffers); NCCL's own
        collectives on the GPU are not covered by it."""
        return self.mpi.timeout

    @timeout.setter
    def timeout(self, seconds) -> None:
        self.mpi.timeout = seconds

    def barrier(self) -> None:
        backend.cupy.cuda.get_current_stream().synchronize()
        self.mpi.barrier()

    def abort(self, code: int = 1):
        try:
            self.comm.abort()
        except Exception:
            pass
        self.mpi.abort(code)


# -- set-up ---------------------------------------------------------------------------------------


def launched_size(env=None) -> int | None:
    """The job size an MPI launcher announced in the environment (None: not launched by one)."""
    env = os.environ if env is None else env
    for var in LAUNCHER_SIZE_VARS:
        if env.get(var, "").strip().isdigit():
            return int(env[var])
    return 1 if any(var in env for var in LAUNCHER_RANK_VARS) else None


def limit_blas_threads(local_size: int, env=None) -> int | None:
    """Limit BLAS -- and gpucnn's own threads, unless ``GPUCNN_NUM_THREADS`` is set -- to
    ``cores // local_size`` threads (at least 1) with threadpoolctl.

    Left alone (returns None) when one of :data:`BLAS_ENV_VARS` is set or
    threadpoolctl is not installed.  ``cores`` is this node's CPU count,
    bounded by this process's affinity mask.
    """
    env = os.environ if env is None else env
    if any(env.get(v) for v in BLAS_ENV_VARS):
        return None
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return None
    cores = os.cpu_count() or 1
    n = max(1, cores // max(1, int(local_size)))
    if hasattr(os, "sched_getaffinity"):
        n = min(n, max(1, len(os.sched_getaffinity(0))))
    threadpool_limits(limits=n, user_api="blas")
    from . import threads

    if not env.get(threads.ENV_VAR):       # the NumPy path's own threads share the cores the same way
        threads.set_num_threads(n)
    return n


def _select_gpu(comm: Communicator, exclusive: bool) -> None:
    cp = backend.cupy
    count = cp.cuda.runtime.getDeviceCount()
    if exclusive and comm.local_size > count:
        raise ValueError(f"NCCL needs one GPU per rank: {comm.local_size} ranks on this node but {count} "
                         f"GPU{'s' if count != 1 else ''}; start at most {count} ranks per node, or use "
                         f"--comm mpi (ranks share GPUs, gradients staged through the host)")
    cp.cuda.Device(comm.local_rank % count).use()


_WORLD: dict = {}


def init(backend_name: str = "auto", device: str = "cpu") -> Communicator:
    """The communicator of this process for ``backend_name`` (see :data:`BACKENDS`); created once.

    ``"auto"``: one process (:class:`SingleProcess`) when no MPI launcher
    started this one or it started one process; else NCCL when ``device`` is
    ``"cuda"``, CuPy has NCCL and this node has a GPU per rank, else MPI.  On ``"cuda"`` this rank's GPU
    (local rank, modulo the GPU count for MPI) becomes the current device.
    With more than one rank, BLAS threads are limited per rank and the
    excepthook of :func:`install_excepthook` is installed.
    """
    if backend_name not in BACKENDS:
        raise ValueError(f"distributed backend must be one of {', '.join(BACKENDS)}, got {backend_name!r}")
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda' (resolved), got device={device!r}")
    key = (backend_name, device)
    if key not in _WORLD:
        _WORLD[key] = _create(backend_name, device)
    return _WORLD[key]


def _create(name: str, device: str) -> Communicator:
    if name == "auto":
        size = launched_size()
        if size is None or size == 1:
            return SingleProcess()
        try:
            import mpi4py  # noqa: F401
        except ImportError:
            raise ImportError(f"this process was started by an MPI launcher ({size} processes) but mpi4py "
                              f"is not installed; {_INSTALL_MPI}") from None
    if name == "single":
        return SingleProcess()
    if name == "nccl" and device != "cuda":
        raise ValueError("the NCCL communicator needs device='cuda'")
    mpi = MPICommunicator()
    if mpi.size > 1:
        install_excepthook(mpi)
        mpi.blas_threads = limit_blas_threads(mpi.local_size)
    if name == "auto":  # NCCL when every rank of this node has a GPU of its own
        name = "nccl" if device == "cuda" and _nccl_available() and \
            mpi.local_size <= backend.cupy.cuda.runtime.getDeviceCount() else "mpi"
    if device == "cuda":
        _select_gpu(mpi, exclusive=name == "nccl")
    if name != "nccl":
        return mpi
    comm = NCCLCommunicator(mpi)  # joins NCCL on the GPU selected above
    comm.blas_threads = mpi.blas_threads
    if comm.size > 1:
        install_excepthook(comm)
    return comm


def _nccl_available() -> bool:
    try:
        from cupy.cuda import nccl
    except Exception:
        return False
    return bool(getattr(nccl, "available", True))


# -- failures -------------------------------------------------------------------------------------


def exit_code(exc: BaseException) -> int:
    """The exit status ``gpucnn`` uses for ``exc``: 3 NaN/Inf loss, 130 interrupted, else 1."""
    if isinstance(exc, KeyboardInterrupt):
        return 130
    if isinstance(exc, FloatingPointError) and type(exc).__name__ == "NonFiniteLossError":
        return 3
    return 1


def report(comm: Communicator, exc: BaseException, tb: bool = True) -> None:
    """Print ``gpucnn: rank R: <Type>: <message>`` (after the traceback when ``tb``) to stderr.

    One ``write`` to file descriptor 2, so the launcher forwards it whole.
    """
    text = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)) if tb else ""
    text += f"gpucnn: rank {comm.rank}: {type(exc).__name__}: {exc}\n"
    _flush()
    try:
        os.write(2, text.encode("utf-8", "replace"))
    except OSError:
        pass


def fail(comm: Communicator, exc: BaseException, tb: bool | None = None):
    """Report ``exc`` on this rank and abort the whole job (does not return when ``size > 1``)."""
    if tb is None:
        tb = not isinstance(exc, (ValueError, OSError, FloatingPointError, KeyboardInterrupt))
    report(comm, exc, tb)
    comm.abort(exit_code(exc))


_HOOK: dict = {}


def install_excepthook(comm: Communicator) -> None:
    """Make an uncaught exception on this rank abort every rank (``MPI_Abort``), naming the rank.

    Installing again only changes the communicator used.
    """
    if "previous" not in _HOOK:
        _HOOK["previous"] = sys.excepthook

        def hook(tp, value, tb):
            target = _HOOK.get("comm")
            if value is None or target is None or target.size <= 1:
                _HOOK["previous"](tp, value, tb)
                return
            fail(target, value, tb=True)

        sys.excepthook = hook
    _HOOK["comm"] = comm

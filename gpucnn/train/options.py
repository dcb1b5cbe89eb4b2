"""How a run runs, as one object: :class:`RunOptions`.

What a run computes is its :class:`~gpucnn.train.TrainConfig` (stored in
checkpoints); how it runs -- where, on how many threads, profiled or checked,
replayed as CUDA graphs, over how many ranks, at which precision -- is a
``RunOptions``, built once (by ``gpucnn train`` from its flags, or by a
caller of :func:`~gpucnn.train.train`) and handed to the loop as it is;
the loop applies it (device, threads, NVTX, anomaly detection, the
communicator and its timeout) and gives the :class:`~gpucnn.train.Trainer`
the one field a step reads, ``cuda_graph``.  Nothing in it changes the numbers of a run, except
``precision``: the arithmetic of every GEMM (:mod:`gpucnn.precision`), held for the run by
:meth:`RunOptions.applied` and put back afterwards.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass

from .. import debug as debug_mod
from .. import distributed as dist
from .. import nvtx as nvtx_mod
from .. import precision as precision_mod
from .. import threads as threads_mod
from .watch import DEFAULT_LOG_EVERY

__all__ = ["RunOptions", "PRECISIONS"]

#: the precisions a run may ask for (the operands of every GEMM; :mod:`gpucnn.precision`)
PRECISIONS = precision_mod.MODES


@dataclass(frozen=True)
class RunOptions:
    """How a run runs.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        threads: threads of the NumPy path for this run (None: as they are,
            :mod:`gpucnn.threads`); capped at the usable cores with a note,
            and put back when the run ends.
        nvtx: NVTX ranges for Nsight Systems.
        debug: anomaly detection (name the first layer producing NaN/Inf).
        cuda_graph: on a GPU, replay full-size steps as CUDA graphs
            (:mod:`gpucnn.train.graph`); False: every step eager.
        distributed: None (this process alone), True (``"auto"``), a backend
            name of :data:`gpucnn.distributed.BACKENDS` or a
            :class:`~gpucnn.distributed.Communicator`.
        collective_timeout: with ``distributed``, seconds a collective waits
            for every rank (None: the communicator's).
        precision: the GEMMs' arithmetic, one of :data:`PRECISIONS`: ``"fp32"``
            (the default), ``"tf32"``, ``"3xtf32"``, ``"bf16"`` or ``"fp16"``
            (operands rounded, FP32 accumulation and master weights; see
            :mod:`gpucnn.precision`); fp16 runs with dynamic loss scaling
            (:class:`~gpucnn.train.LossScaler`).  On CUDA every mode but fp32
            runs the tensor-core GEMMs (gpucnn/cuda/gemm_tc.py; sm_80 or later).
        log_every: steps between the per-layer statistics of ``layers.jsonl``
            (and the per-step TensorBoard records); 0: none
            (:mod:`gpucnn.train.watch`).
        tensorboard: None (no TensorBoard log), True (``RUN_DIR/tb``) or a
            directory: TensorBoard event files, written live (needs
            tensorboardX: ``pip install "gpucnn[tensorboard]"``).
    """

    device: str = "auto"
    threads: int | None = None
    nvtx: bool = False
    debug: bool = False
    cuda_graph: bool = True
    distributed: object = None
    collective_timeout: float | None = None
    precision: str = "fp32"
    log_every: int = DEFAULT_LOG_EVERY
    tensorboard: object = None

    def __post_init__(self):
        precision_mod.check_mode(self.precision)
        if self.device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got device={self.device!r}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)
                                         or self.threads < 1):
            raise ValueError(f"threads must be a positive integer or None, got threads={self.threads!r}")
        if isinstance(self.log_every, bool) or not isinstance(self.log_every, int) or self.log_every < 0:
            raise ValueError(f"log_every must be a non-negative integer, got log_every={self.log_every!r}")
        if self.tensorboard is not None and self.tensorboard is not True \
                and not isinstance(self.tensorboard, (str, os.PathLike)):
            raise ValueError(f"tensorboard must be None, True or a directory, got tensorboard={self.tensorboard!r}")
        if self.collective_timeout is not None:
            if not self.is_distributed:
                raise ValueError(f"collective_timeout={self.collective_timeout!r} needs distributed=True "
                                 "(or a backend)")
            dist.check_timeout(self.collective_timeout)

    @property
    def is_distributed(self) -> bool:
        return self.distributed is not None and self.distributed is not False

    @classmethod
    def resolve(cls, options: "RunOptions | None", **shorthands) -> "RunOptions":
        """``options``, or one built from ``shorthands`` (keyword arguments named as the fields, as
        :func:`~gpucnn.train.train` takes them); a shorthand set beside ``options`` is refused."""
        if options is None:
            return cls(**shorthands)
        extra = sorted(k for k, v in shorthands.items() if v != getattr(cls, k))
        if extra:
            raise ValueError(f"train(options=...) takes the run options in one object; got {', '.join(extra)} "
                             "beside it (set them in the RunOptions)")
        return options

    def check_device(self, device: str) -> None:
        """Refuse a precision ``device`` cannot run, before anything is loaded: on CUDA the modes
        other than fp32 need tensor cores with mma.sync (sm_80 or later)."""
        if device == "cuda" and self.precision != "fp32":
            from ..cuda import gemm_tc

            gemm_tc.require_tensor_cores("--precision", self.precision)

    def replace(self, **changes) -> "RunOptions":
        return dataclasses.replace(self, **changes)

    @contextlib.contextmanager
    def applied(self, say=None, prog: str = "gpucnn train", note: bool = True):
        """Apply the options that are process state for the run -- threads, NVTX, anomaly detection,
        the precision of the GEMMs -- and put them back afterwards.  ``say(line)`` is told when NVTX
        has no implementation; the threads' cap note goes to stderr as ``"<prog>: note: ..."`` when ``note``."""
        with contextlib.ExitStack() as stack:
            if self.threads is not None:
                before = threads_mod.get_num_threads()
                threads_mod.set_threads_option(self.threads, prog, note)
                stack.callback(threads_mod.set_num_threads, before)
            if self.nvtx and not stack.enter_context(nvtx_mod.enabled(True)) and say is not None:
                say("note: --nvtx: no NVTX implementation importable (pip install nvtx, or CuPy); ranges are no-ops")
            if self.debug:
                stack.enter_context(debug_mod.detect_anomaly())
            stack.enter_context(precision_mod.using(self.precision))
            yield self

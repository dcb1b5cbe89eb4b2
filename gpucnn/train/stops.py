"""How a training run stops on a signal: Ctrl-C (SIGINT) and SIGTERM end it the same way, saying
which epoch was cut short and what the run directory holds (:class:`TrainingInterrupted`)."""
from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path

__all__ = ["stopped_by", "Terminated", "TrainingInterrupted", "sigterm_stops_like_ctrl_c"]


def stopped_by(signum: int) -> str:
    """``"interrupted"`` (Ctrl-C, SIGINT) or ``"stopped by SIGTERM"``: how a stop is said."""
    return "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"


class Terminated(KeyboardInterrupt):
    """SIGTERM during :func:`train` (``timeout``, Slurm, systemd, ``docker stop``): the run stops as on Ctrl-C."""

    signum = signal.SIGTERM


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during :func:`train`: which epoch was cut short and what the run directory holds.

    ``saved_epoch`` is the epoch of the checkpoint at ``checkpoint`` (0: none
    was written yet, nothing to resume); ``signum`` the signal that stopped it
    (``signal.SIGINT`` for Ctrl-C, ``signal.SIGTERM``).
    """

    def __init__(self, epoch: int, saved_epoch: int, checkpoint, signum: int = signal.SIGINT):
        super().__init__(f"interrupted during epoch {epoch}")
        self.epoch, self.saved_epoch, self.checkpoint = epoch, saved_epoch, Path(checkpoint)
        self.signum = signum

    def describe(self) -> str:
        what = stopped_by(self.signum)
        if self.saved_epoch == 0:
            return (f"{what} during epoch {self.epoch}, before any checkpoint was written: "
                    "there is nothing to resume")
        return (f"{what} during epoch {self.epoch}; {self.checkpoint} (after epoch {self.saved_epoch}) is "
                f"kept: continue with gpucnn train --resume {self.checkpoint.parent}")


@contextlib.contextmanager
def sigterm_stops_like_ctrl_c():
    """While training, SIGTERM raises :class:`Terminated` in the main thread, as SIGINT raises
    KeyboardInterrupt, so the run stops the same way.  Only where SIGTERM has its default action
    (nobody else handles or ignores it) and in the main thread; a second SIGTERM ends the process
    at once; the previous action comes back afterwards."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated(stopped_by(signum))

    signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)

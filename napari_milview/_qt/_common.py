"""Helpers shared by the dock widgets: background jobs, one-line errors, small controls.

A :class:`Job` is a plain generator (no Qt in it) that a widget wraps in napari's
``create_worker`` (through :func:`relay`); cancelling sets its ``threading.Event`` and
quits the worker, and :func:`stop_jobs` cancels and joins every job of a widget (from its
teardown or its ``destroyed`` signal).
"""

from __future__ import annotations

import logging
import threading
from collections import Counter
from collections.abc import Generator
from typing import Any

from qtpy.QtWidgets import QDoubleSpinBox

__all__ = ["JOIN_TIMEOUT_S", "Job", "one_line", "real_viewer", "relay", "slide_mpp", "spin",
           "stop_jobs"]

log = logging.getLogger(__name__)

#: How long closing a widget waits for a run's thread to end (seconds).
JOIN_TIMEOUT_S = 30.0


def real_viewer(napari_viewer):
    """The viewer itself. napari's Plugins menu hands a dock widget a ``PublicOnlyProxy``
    whose every attribute access is inspected and whose layers are new proxy objects each
    time (so ``is`` comparisons between layers never match)."""
    return getattr(napari_viewer, "__wrapped__", napari_viewer)


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, at most 300 characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


def slide_mpp(layer) -> float | None:
    """Microns per level-0 pixel along x of a slide layer, None when unknown."""
    mpp = layer.metadata.get("mpp") if layer is not None else None
    return float(mpp[-1]) if mpp else None


def spin(lo: float, hi: float, value: float, decimals: int = 4, step: float = 0.01,
         suffix: str = "") -> QDoubleSpinBox:
    """A float spin box that reports a value only when editing is finished."""
    s = QDoubleSpinBox()
    s.setRange(lo, hi)
    s.setDecimals(decimals)
    s.setSingleStep(step)
    s.setValue(value)
    if suffix:
        s.setSuffix(suffix)
    s.setKeyboardTracking(False)
    return s


class Job:
    """One background run: :meth:`steps` is the generator a worker drives; the outcome is
    read after. Subclasses implement :meth:`_steps` (a generator returning the result).

    Attributes
    ----------
    config : Any
        What the run needs, gathered in the main thread.
    cancel : threading.Event
        Set to stop the run between batches.
    done : threading.Event
        Set by the worker thread when its ``run`` is over (joined by :meth:`join`).
    outcome : str
        ``"pending"``, ``"done"``, ``"cancelled"`` or ``"failed"``.
    result, error : the result (done) or the readable error line (failed).
    progress : (int, int)
        Work done so far and its total (patches).
    calls : Counter
        How many times each step ran (the subclass counts what it wants).
    """

    def __init__(self, config: Any):
        self.config = config
        self.cancel = threading.Event()
        self.done = threading.Event()
        self.started = False
        self.orphaned = False  # its widget stopped it (closing or deleted): ignore its signals
        self.outcome = "pending"
        self.result = None
        self.error = ""
        self.progress = (0, 0)
        self.calls: Counter = Counter()
        self.gen = self.steps()

    # -- driving ------------------------------------------------------------------------
    def steps(self) -> Generator[Any, None, Any]:
        """The run; catches every ``Exception`` into :attr:`outcome` / :attr:`error`."""
        from ..pipeline import Cancelled

        self.started = True
        try:
            self.result = yield from self._steps()
            self.outcome = "done"
        except Cancelled:
            self.outcome = "cancelled"
        except Exception as e:  # noqa: BLE001 - shown to the user as one line
            log.debug("%s failed", type(self).__name__, exc_info=True)
            self.outcome, self.error = "failed", one_line(e)
        return self.result

    def _steps(self) -> Generator[Any, None, Any]:  # pragma: no cover - abstract
        raise NotImplementedError
        yield

    def close(self) -> None:
        """Close the generator if it is suspended (ends the extraction's reader threads)."""
        try:
            self.gen.close()
        except ValueError:  # still executing in the worker: wait for it, then close
            self.done.wait(JOIN_TIMEOUT_S)
            if not self.gen.gi_running:
                self.gen.close()

    def stop(self) -> None:
        """Ask the run to stop at the next batch."""
        self.cancel.set()

    def join(self, timeout: float = JOIN_TIMEOUT_S) -> bool:
        """Wait for the worker thread (if it started) and close the generator."""
        ok = self.done.wait(timeout) if self.started else True
        self.close()
        return ok

    def _check(self) -> None:
        from ..pipeline import Cancelled

        if self.cancel.is_set():
            raise Cancelled("run cancelled")


def relay(gen):
    """A generator function around an existing generator (``create_worker`` wants one)."""
    return (yield from gen)


def stop_jobs(jobs: list, wait: bool = True) -> None:
    """Cancel every (job, worker) in ``jobs`` and join them; safe from ``destroyed``."""
    for job, worker in list(jobs):
        job.orphaned = True
        job.stop()
        try:
            worker.quit()
        except RuntimeError:  # the worker's Qt object is already gone
            pass
    if wait:
        for job, _ in list(jobs):
            job.join()
    jobs.clear()

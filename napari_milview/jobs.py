"""Background runs, Qt-free: what the docks' worker threads drive.

A :class:`Job` wraps a generator (:meth:`Job._steps`) with its cancel event, outcome and
error line; the docks (``_qt``) run it in napari's ``create_worker`` through :func:`relay`
and show its updates. :class:`Interaction` lets a run wait between batches while the view
moves. The MIL dock runs a :class:`MILJob` (:func:`napari_milview.pipeline.run`), the staining
dock a :class:`PrepareJob` (staining estimate) and a :class:`RobustnessJob`
(:func:`napari_milview.stain.robustness.robustness`), the MIL dock's Evidence section a
:class:`FaithfulnessJob` (:func:`napari_milview.evidence.faithfulness.deletion_insertion`) and
a :class:`DisagreementJob` (:func:`napari_milview.evidence.disagreement.disagreement`).
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import Counter
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

from .pipeline import PAUSED, Progress

__all__ = ["JOIN_TIMEOUT_S", "DisagreementConfig", "DisagreementJob", "EvidenceUpdate",
           "FaithfulnessConfig", "FaithfulnessJob", "Inputs", "Interaction", "Job", "MILConfig",
           "MILJob", "PrepareJob", "RobustnessConfig", "RobustnessJob", "StainUpdate",
           "gui_readers", "gui_torch_threads", "make_perturbation", "one_line",
           "prepare_inputs", "relay"]

log = logging.getLogger(__name__)

#: How long closing a dock waits for a run's thread to end (seconds).
JOIN_TIMEOUT_S = 30.0


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, at most 300 characters."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    text = lines[0] if lines else type(exc).__name__
    return text if len(text) <= 300 else text[:297] + "..."


class Interaction:
    """When the user last moved the view. A run pauses between batches while
    :meth:`active`, so on a machine with few cores panning and zooming keep the CPU.

    :meth:`touch` is connected to the camera's events (GUI thread); the worker thread only
    reads :attr:`until` (one float: no lock needed).
    """

    #: Seconds after the last camera move during which the view counts as moving.
    HOLD_S = 0.3

    def __init__(self) -> None:
        self.until = 0.0

    def touch(self, *_) -> None:
        self.until = time.monotonic() + self.HOLD_S

    def active(self) -> bool:
        return time.monotonic() < self.until

    def wait(self, cancel: threading.Event, poll_s: float = 0.02) -> None:
        """Block while the view moves, or until ``cancel`` is set."""
        while self.active() and not cancel.wait(poll_s):
            pass


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
        from .pipeline import Cancelled

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
        from .pipeline import Cancelled

        if self.cancel.is_set():
            raise Cancelled("run cancelled")

    def _paused(self, pause: Interaction | None, update: Any) -> Generator[Any, None, None]:
        """A pause point between batches: while the view moves (``pause`` active), yield
        ``update`` (saying so) once and wait; Cancel still acts. ``pause=None``: no pause."""
        if pause is not None and pause.active():
            yield update
            pause.wait(self.cancel)


def relay(gen):
    """A generator function around an existing generator (``create_worker`` wants one)."""
    return (yield from gen)


# --------------------------------------------------------------------------------------------
# the MIL dock
# --------------------------------------------------------------------------------------------
def gui_torch_threads() -> int:
    """torch intra-op threads for a run inside napari: every core but one (at least one)."""

    return max(1, (os.cpu_count() or 2) - 1)


def gui_readers(device: str) -> int:
    """Reader threads of an extraction inside napari. On a GPU the readers bound the run
    (the GPU waits on decoded tiles): as many as the command line's default, leaving napari
    and the thread feeding the GPU a core each. On the CPU 2, each running the forward on
    its own batches with half of torch's threads (``pipeline.extract_bag``)."""

    from .pipeline import resolve_device

    if resolve_device(device).type != "cuda":
        return 2
    return max(2, min(8, (os.cpu_count() or 2) - 2))


# --------------------------------------------------------------------------------------------
# the job (no Qt: runs in a worker thread)
# --------------------------------------------------------------------------------------------
@dataclass
class MILConfig:
    """A run the MIL dock's controls describe, gathered in the main thread: the slide and model, and
    how features are got (:class:`napari_milview.pipeline.RunSpec`)."""

    slide: Any
    model: Any
    card: Any
    spec: Any  # pipeline.RunSpec

    @property
    def pause(self):
        """What extraction waits on while the view moves (None: no pause)."""
        return self.spec.pause


class MILJob(Job):
    """One MIL run (:class:`Job`) driving :func:`napari_milview.pipeline.run`.

    ``calls`` counts what ran: ``batches`` (encoded), ``partial`` (partial heatmaps),
    ``attend`` (the final model run). ``bag`` is the run's bag once done (its cached
    features: the MIL dock's Evidence section re-runs the model on them).
    """

    config: MILConfig
    bag: Any = None

    def _steps(self) -> Generator[Progress, None, Any]:
        """The run with torch on all cores but one: napari draws and answers on the other."""
        from .pipeline import run, tap, torch_threads

        def count(p: Progress) -> Progress:
            if p.stage == "extract":
                self.progress = (p.done, p.total)
                self.calls["batches"] += p.features is not None
            self.calls["partial"] += p.partial is not None
            self.calls["attend"] += p.stage == "attend"
            return p

        cfg = self.config
        with torch_threads(gui_torch_threads()):
            self.bag, result = yield from tap(run(cfg.slide, cfg.model, cfg.card, cfg.spec,
                                                  self.cancel), count)
        # loaded here, off the GUI thread: 'rank' normalisation needs scipy.stats, and napari
        # builds the top-K layer's features table with pandas (~0.3 s to import the first
        # time, which would stall the viewer at the moment the result is shown)
        import pandas  # noqa: F401
        import scipy.stats  # noqa: F401

        return result


# --------------------------------------------------------------------------------------------
# the staining dock
# --------------------------------------------------------------------------------------------
@dataclass
class Inputs:
    """What the conditions are built from: the slide's staining and the optional targets.

    ``key`` says what they were made for: (slide path, reference path, PLISM folder).
    """

    key: tuple
    stain: Any = None
    reference: Any = None
    library: Any = None


def prepare_inputs(slide, reference: str = "", folder: str = "") -> Inputs:
    """Estimate the slide's staining (cached per file) and load the reference and folder.

    Parameters
    ----------
    slide : Slide
    reference : str
        A tile image, reference JSON or slide for ``macenko``/``reinhard`` ('' = built-in).
    folder : str
        A PLISM / reference folder (``stain.load_reference``), '' = the presets.
    """
    from .stain import estimate_slide, load_reference, normalise_to

    stain = estimate_slide(slide)
    ref = normalise_to(reference) if reference else None
    lib = load_reference(folder) if folder else None
    return Inputs((str(slide.path), reference, folder), stain, ref, lib)


def make_perturbation(name: str, inputs: Inputs | None, params: dict, seed: int = 0):
    """The condition ``name`` with the widget's parameter overrides ``params`` (may be {})."""
    from .stain.robustness import build_condition

    kw = {"ratio": params.get("ratio"), "angle_factor": params.get("angle"),
          "sigma": params.get("sigma")}
    if inputs is None:
        return build_condition(name, None)  # only the reference needs no inputs
    return build_condition(name, inputs.stain, seed=seed, reference=inputs.reference,
                           library=inputs.library, **kw)


@dataclass
class StainUpdate:
    """What a running staining job tells the dock (``stage``, counts, a line, a finished result)."""

    stage: str
    done: int = 0
    total: int = 0
    message: str = ""
    condition: str = ""
    result: Any = None


class PrepareJob(Job):
    """Estimate the staining and load the targets (``config`` = kwargs of
    :func:`prepare_inputs`)."""

    def _steps(self) -> Generator[StainUpdate, None, Any]:
        yield StainUpdate("stain", message="estimating the slide's staining")
        return prepare_inputs(**self.config)


@dataclass
class RobustnessConfig:
    """A robustness run, gathered in the main thread."""

    slide: Any
    model: Any
    card: Any
    model_name: str
    encoder: str
    conditions: list[str]
    params: dict[str, dict] = field(default_factory=dict)
    reference: str = ""
    folder: str = ""
    seed: int = 0
    encoder_weights: str | None = None
    patch_um: float | None = None
    top_k: int = 20
    batch_size: int = 32
    device: str = "auto"
    pause: Any = None  # a _common.Interaction: wait between batches while the view moves


class RobustnessJob(Job):
    """Encoder + grid + :func:`~napari_milview.stain.robustness.robustness`."""

    config: RobustnessConfig

    def _steps(self) -> Generator[StainUpdate, None, Any]:
        from .pipeline import RunSpec
        from .pipeline import prepare as prepare_run
        from .stain.robustness import robustness

        cfg = self.config
        yield StainUpdate("prepare", message=f"loading encoder {cfg.encoder}, finding tissue")
        spec = RunSpec(encoder=cfg.encoder, weights=cfg.encoder_weights,
                       patch_um=cfg.patch_um, model_name=cfg.model_name)
        encoder, grid = prepare_run(cfg.slide, spec, cfg.card)  # as every run
        self._check()
        yield StainUpdate("prepare", message="estimating the staining")
        inputs = prepare_inputs(cfg.slide, cfg.reference, cfg.folder)
        perts = [make_perturbation(c, inputs, cfg.params.get(c, {}), cfg.seed)
                 for c in cfg.conditions]
        self._check()
        self.calls["robustness"] += 1
        gen = robustness(cfg.slide, grid, encoder, cfg.model, cfg.card, perts,
                         stain=inputs.stain, top_k=cfg.top_k, batch_size=cfg.batch_size,
                         device=cfg.device, cancel=self.cancel, model_name=cfg.model_name)
        try:
            while True:
                yield from self._paused(cfg.pause, StainUpdate("extract", *self.progress, PAUSED))
                try:
                    p = next(gen)
                except StopIteration as stop:
                    return stop.value
                self.progress = (p.done, p.total)
                if p.stage == "extract" and p.cache == "extracted":
                    self.calls["extract_batches"] += 1
                yield StainUpdate(p.stage, p.done, p.total, p.message, p.condition, p.result)
        finally:
            gen.close()


# --------------------------------------------------------------------------------------------
# the MIL dock's Evidence section
# --------------------------------------------------------------------------------------------
@dataclass
class FaithfulnessConfig:
    """A faithfulness run: the model and the run's cached features [N, D], the scores [N] of
    each source to rank by (the picked one first), K of the top-K prediction, curve steps,
    random orders and seed (``evidence.faithfulness.deletion_insertion``); ``plots``: draw
    the curves (``evidence.plots.curves_png``, ``plot_size`` inches at 100 dpi) with the
    tracked class named from ``classes``."""

    model: Any
    features: Any
    scores: dict[str, Any]
    k: int | None = None
    steps: int = 50
    random_orders: int = 5
    seed: int = 0
    plots: bool = True
    classes: list[str] | None = None
    plot_size: tuple[float, float] = (5.2, 2.5)


@dataclass
class EvidenceUpdate:
    """What a running evidence job tells the section: work done of total, a line, and (for
    faithfulness) a finished source and its dict."""

    done: int
    total: int
    message: str = ""
    source: str = ""
    value: Any = None


class FaithfulnessJob(Job):
    """Deletion / insertion of every source of a result, on the run's cached features.

    One ``deletion_insertion(model, x, descending(scores), k=K, steps=S, random_orders=R,
    seed=s)`` for the first source, cancelled between sub-bag evaluations (its ``cancel`` is
    this job's event); the other sources share its random baseline (the same orders, the same
    target: one call each with ``random_orders=0``), as ``evidence.report.evaluate`` does.
    ``progress`` counts sub-bags over all calls. ``result``: source -> the dict of
    ``deletion_insertion`` (+ ``png`` with the curves when ``plots``).
    """

    config: FaithfulnessConfig

    def _steps(self) -> Generator[EvidenceUpdate, None, dict]:
        from .evidence.faithfulness import deletion_insertion, descending
        from .pipeline import torch_threads

        cfg = self.config
        names = list(cfg.scores)
        steps, r = int(cfg.steps), int(cfg.random_orders)
        first_total = (r + 1) * 2 * (steps + 1) + 1
        per_source = 2 * (steps + 1) + 1
        total = first_total + (len(names) - 1) * per_source
        out: dict[str, dict] = {}
        shared: dict[str, Any] = {}
        offset = 0

        def report(done: int, _total: int) -> None:
            self.progress = (offset + done, total)

        with torch_threads(gui_torch_threads()):
            for j, name in enumerate(names):
                self._check()
                what = (f"the ranking by {name} and {r} random orders" if j == 0 and r
                        else f"the ranking by {name}")
                yield EvidenceUpdate(offset, total, f"faithfulness: {what}")
                f = deletion_insertion(
                    cfg.model, cfg.features, descending(cfg.scores[name]),
                    target=shared.get("target"), k=cfg.k, steps=steps,
                    random_orders=r if j == 0 else 0, seed=cfg.seed, cancel=self.cancel,
                    progress=report)
                if j == 0:
                    shared = {key: f[key] for key in f if key.startswith("random")}
                    shared["target"] = f["target"]
                else:
                    f.update({key: v for key, v in shared.items() if key != "target"})
                self.calls["deletion_insertion"] += 1
                if cfg.plots:
                    from .evidence.plots import curves_png

                    f["png"] = curves_png(f, name, classes=cfg.classes, width=cfg.plot_size[0],
                                          height=cfg.plot_size[1])
                out[name] = f
                offset += first_total if j == 0 else per_source
                self.progress = (offset, total)
                yield EvidenceUpdate(offset, total, f"faithfulness: {name}", name, f)
        return out


@dataclass
class DisagreementConfig:
    """Checkpoints (paths) of one model run on one bag; ``source``: the source compared
    (None: the first model's default); ``classes``: the class names shown."""

    paths: list[str]
    bag: Any
    source: str | None = None
    classes: list[str] = field(default_factory=list)


class DisagreementJob(Job):
    """Load each checkpoint (safely), run it on the bag (``evidence.folds.fold_maps``, cancel
    checked between checkpoints) and compare their maps (``evidence.disagreement``).
    ``result``: that dict plus ``maps`` [M, N], ``probabilities`` [M, C], ``classes``,
    ``names``, ``source``."""

    config: DisagreementConfig

    def _steps(self) -> Generator[EvidenceUpdate, None, dict]:
        from .evidence.disagreement import disagreement
        from .evidence.folds import fold_maps
        from .pipeline import torch_threads

        cfg = self.config
        m = len(cfg.paths)
        if m < 2:
            raise ValueError(f"disagreement needs 2 or more checkpoints, got {m}")
        yield EvidenceUpdate(0, m, f"folds: {m} checkpoints")

        def step(done: int, total: int, name: str) -> None:
            self.progress = (done, total)

        with torch_threads(gui_torch_threads()):
            maps, probs, names = fold_maps(cfg.bag, list(cfg.paths), cfg.source,
                                           cancel=self.cancel, progress=step)
        out = dict(disagreement(list(maps), list(probs)))
        out.update(maps=maps, probabilities=probs, classes=list(cfg.classes), names=names,
                   source=cfg.source)
        return out

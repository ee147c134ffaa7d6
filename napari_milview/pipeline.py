"""Slide + encoder + model -> result, as generators the GUI and the CLI drive alike.

:func:`extract_bag` turns the patches of a :class:`~napari_milview.tissue.PatchGrid` into a
:class:`~napari_milview.features.bag.Bag`. It is a generator: one :class:`Progress` per batch
(with that batch's features), the bag as its return value (``StopIteration.value``; use
:func:`collect`). It checks a ``threading.Event`` between batches and, inside a batch,
between the encoder's forward calls, and raises :class:`Cancelled` when it is set.

Throughput: batches follow the slide's tiles (``tissue.tile_order``), so each tile is
decoded once and all its patches are cut out in one copy; a small pool of worker threads
reads and decodes them (libjpeg releases the GIL) into uint8 batches; the encoder's input
step (``features.encoders.normalise_batch``) runs on the device, and the encoder in
``channels_last`` on every device. On the CPU each worker also runs the forward on its own
batch, torch's thread budget shared out among the workers (batch parallelism beats intra-op
threads for small networks, and no reader stalls a forward's OpenMP threads), in forward
calls sized to cost about :data:`SUB_FORWARD_S` each (:class:`_Pace`: a whole batch for a
small network, a few rows for ResNet-50), so a cancel reaches the encoder within one such
call rather than one batch. On CUDA the workers read ahead while the main thread feeds the
GPU from pinned memory under bf16 autocast, one forward call per batch, and a CUDA
out-of-memory error halves the forward batch and retries (said once in a :class:`Progress`
message). The pool is shut down whenever the generator ends: finished, failed, cancelled or
closed; the workers see that (and the cancel event) before reading a batch and before each
forward call, so the shutdown waits for one forward call at most.

:func:`attend` runs a MIL model on a bag and returns a :class:`~napari_milview.result.Result`.
torch is imported inside the functions.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .features.bag import Bag, BagError

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .mil.base import MILModel, ModelCard
    from .result import Result
    from .tissue import PatchGrid

__all__ = ["PAUSED", "Cancelled", "PredictionError", "Progress", "RunSpec", "attend",
           "check_bag_fits", "collect", "demo_note", "extract", "extract_bag", "prepare",
           "resolve_device", "resolve_patch", "run", "tap", "torch_threads"]

#: The message of a run that waits while the view moves (:attr:`RunSpec.pause`).
PAUSED = "paused while the view moves"

#: Name prefix of the reader threads (tests check that none outlives a run).
THREAD_PREFIX = "milview-extract"

#: Seconds one CPU forward call should cost at most: a cancel (or the generator closing)
#: waits for the call in flight, never for the rest of its batch.
SUB_FORWARD_S = 0.2
#: Rows of a run's first CPU forward call, before the encoder's cost is known.
SUB_FORWARD_START = 4


class Cancelled(Exception):
    """The run was cancelled (its ``cancel`` event was set); nothing was returned."""


@dataclass
class Progress:
    """One step of a run.

    Attributes
    ----------
    stage : str
        ``"prepare"``, ``"load"``, ``"extract"`` or ``"attend"``.
    done, total : int
        Patches (extract) finished so far, out of ``total``.
    features : np.ndarray or None
        [b, D] float32, the features of the batch just finished (extract stage).
    indices : np.ndarray or None
        [b] int64, their rows in grid (= bag) order.
    message : str
        Something the user should read (device in use, an out-of-memory retry, bad tiles,
        :data:`PAUSED`).
    partial : Result or None
        :func:`run` with ``stream_s``: the model on the patches encoded so far, over the
        whole grid (NaN sources for the patches not yet encoded).
    """

    stage: str
    done: int = 0
    total: int = 0
    features: np.ndarray | None = None
    indices: np.ndarray | None = None
    message: str = ""
    partial: Any = None


def resolve_device(device: Any = "auto") -> torch.device:
    """The torch device to run on.

    ``"auto"`` (or None) is CUDA when available, else the CPU; anything else is passed to
    ``torch.device``. Asking for CUDA on a machine without it is a ``ValueError``.
    """
    import torch

    if device is None or (isinstance(device, str) and device.strip().lower() == "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N): {e}"
                         ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available here")
    return dev


_threads_lock = threading.Lock()
_threads_held = [0, 0]  # [runs holding a setting, torch's thread count before the first]


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op thread count set to ``n`` for the block (process-wide, as torch
    has it). Runs may overlap (two docks, dask threads): the count before the first of
    them comes back when the last one ends, whatever order they end in."""
    import torch

    with _threads_lock:
        if _threads_held[0] == 0:
            _threads_held[1] = torch.get_num_threads()
        _threads_held[0] += 1
        torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        with _threads_lock:
            _threads_held[0] -= 1
            if _threads_held[0] == 0:
                torch.set_num_threads(_threads_held[1])


def tap(gen: Generator[Any, None, Any], fn: Callable[[Any], Any]) -> Generator[Any, None, Any]:
    """Yield what ``gen`` yields, each item through ``fn`` first (``fn`` returns what to
    yield, None to pass nothing on); return ``gen``'s return value. ``gen`` is closed however
    this ends (finished, failed, or this generator closed)."""
    try:
        while True:
            try:
                item = next(gen)
            except StopIteration as stop:
                return stop.value
            out = fn(item)
            if out is not None:
                yield out
    finally:
        gen.close()


def collect(gen: Generator[Any, None, Any],
            callback: Callable[[Any], None] | None = None) -> Any:
    """Drive a generator to its end and return its return value.

    Parameters
    ----------
    gen
        e.g. ``extract_bag(...)``.
    callback
        Called with every yielded item (a :class:`Progress`), e.g. to update a progress bar.
    """
    while True:
        try:
            item = next(gen)
        except StopIteration as stop:
            return stop.value
        if callback is not None:
            callback(item)


# --------------------------------------------------------------------------------------------
# extraction
# --------------------------------------------------------------------------------------------
class _Pace:
    """Rows per CPU forward call, so that one call costs about ``target_s`` at most.

    The first call takes ``start`` rows; each call's wall-clock cost per row (the contention
    of the moment included) updates a running estimate (the mean of the old one and the
    new), and later calls take ``floor(target_s / estimate)`` rows, between 1 and the batch.
    One per run, shared by its worker threads (a race only mixes two estimates).
    """

    def __init__(self, target_s: float, start: int):
        self.target_s = float(target_s)
        self.rows = max(1, int(start))
        self.per_row: float | None = None

    def size(self, limit: int) -> int:
        """Rows for the next call, at most ``limit`` (>= 1)."""
        return max(1, min(self.rows, int(limit)))

    def record(self, rows: int, seconds: float) -> None:
        """A call of ``rows`` rows took ``seconds``."""
        cost = max(0.0, seconds) / max(1, rows)
        self.per_row = cost if self.per_row is None else 0.5 * (self.per_row + cost)
        self.rows = max(1, int(min(self.target_s / max(self.per_row, 1e-9), 1 << 20)))


def _forward(encoder: torch.nn.Module, x: torch.Tensor, chunk: int, device: torch.device,
             *, stop: Callable[[], bool] | None = None, pace: _Pace | None = None
             ) -> tuple[np.ndarray, int, list[str]]:
    """Encoder forward over ``x`` in calls of at most ``chunk`` rows; on CUDA out-of-memory
    halve the rows of the failed call and retry.

    Parameters
    ----------
    x : Tensor
        [B, H, W, 3] uint8 patches (CPU, pinned on CUDA runs).
    chunk : int
        Rows per forward call at most.
    stop : callable, optional
        Asked before every call; when it returns True, :class:`Cancelled` is raised.
    pace : _Pace, optional
        CPU runs: the rows of each call (at most ``chunk``) come from it, and each call's
        cost goes back to it.

    Returns
    -------
    features : np.ndarray
        [B, D] float32.
    chunk : int
        The chunk size that worked (smaller after an out-of-memory retry).
    messages : list[str]
        One line per retry.
    """
    import torch

    cuda = device.type == "cuda"
    outs: list[np.ndarray] = []
    messages: list[str] = []
    i = 0
    while i < len(x):
        if stop is not None and stop():
            raise Cancelled("extraction cancelled")
        n = min(chunk, len(x) - i) if pace is None else pace.size(min(chunk, len(x) - i))
        try:
            t = time.perf_counter()
            outs.append(_run(encoder, x[i:i + n], device))
            if pace is not None:
                pace.record(n, time.perf_counter() - t)
            i += n
            continue
        except torch.cuda.OutOfMemoryError:
            if n <= 1:
                raise
        # outside the except block: its traceback no longer pins the failed activations
        chunk = max(1, n // 2)
        if cuda:
            torch.cuda.empty_cache()
        messages.append(f"CUDA out of memory: retrying with batch size {chunk}")
    return np.concatenate(outs, axis=0), chunk, messages


def _run(encoder: torch.nn.Module, x: torch.Tensor, device: torch.device) -> np.ndarray:
    """One forward: [b, H, W, 3] uint8 -> [b, D] float32 numpy. The input step
    (``normalise_batch``: float, resize, mean/std) runs on the device; the encoder runs
    channels_last, under bf16 autocast on CUDA."""
    import torch

    from .features.encoders import normalise_batch

    with torch.inference_mode():
        x = normalise_batch(x.to(device, non_blocking=True), encoder.spec)
        if device.type != "cuda":
            return encoder(x).float().numpy()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y = encoder(x)
        return y.float().cpu().numpy()


def build_encoder_for(card: Any, name: str, weights: str | None = None,
                      model_name: str = "the model") -> torch.nn.Module:
    """Build encoder ``name`` and check that its feature dimension is the one ``card`` (a
    :class:`~napari_milview.mil.ModelCard`) expects, before any patch is read.

    Raises
    ------
    ValueError
        Naming both dimensions.
    """
    from .features.encoders import build_encoder

    encoder = build_encoder(name, weights=weights or None)
    check_encoder(card, encoder, model_name)
    return encoder


def check_encoder(card: Any, encoder: Any, model_name: str = "the model") -> None:
    """ValueError naming both dimensions when ``encoder``'s features are not the size
    ``card`` (None: no model) expects."""
    spec = encoder.spec
    want = None if card is None else card.feature_dim
    if want is not None and int(want) != spec.dim:
        raise ValueError(f"encoder {spec.name!r} gives {spec.dim}-d features but the model "
                         f"{model_name!r} expects {int(want)}-d: pick the encoder the model was "
                         "trained on")


def _reader_thread() -> None:
    """A reader thread decodes its batch's tiles itself: the readers are the parallelism, and
    handing each strip's tiles on to the slide's shared decode threads (which also serve the
    viewer's redraws) only adds hand-offs."""
    from .slide import decode_in_this_thread

    decode_in_this_thread()


def extract_bag(slide: Any, grid: PatchGrid, encoder: torch.nn.Module, *, batch_size: int = 64,
                device: Any = "auto", workers: int = 2,
                cancel: threading.Event | None = None, slide_id: str | None = None,
                transform: Callable[[np.ndarray], np.ndarray] | None = None,
                ) -> Generator[Progress, None, Bag]:
    """Encode every patch of ``grid``: a generator of :class:`Progress`, returning the bag.

    Long on purpose: the reader pool, the CPU and CUDA forward paths and the shutdown share
    the run's state (pending futures, the forward chunk, the paced sub-batch, the cancel
    checks), which split functions would have to pass around; what stands alone is apart
    (:func:`_forward`, :func:`_run`, :class:`_Pace`).

    Parameters
    ----------
    slide : napari_milview.slide.Slide
        The open slide the grid was made on.
    grid : PatchGrid
        ``coords`` [N, 2] int64 level-0 (x, y) top-left corners; the bag keeps this order.
    encoder : torch.nn.Module
        From ``features.encoders.build_encoder``: has ``.spec`` (an ``EncoderSpec``) and maps
        [B, 3, S, S] normalised float to [B, D]. It is moved to ``device`` and to
        ``channels_last``.
    batch_size : int
        Patches read and encoded together; on CUDA out-of-memory the forward batch is halved
        (down to 1) for the rest of the run.
    device : str or torch.device
        ``"auto"``: CUDA when available, else CPU.
    workers : int
        Worker threads, each reading one whole batch (``workers + 1``
        batches in flight). On the CPU each also runs the forward on its batch: at most
        ``torch.get_num_threads()`` workers, each with an equal share of those threads for
        the run (restored afterwards), so the caller's thread budget is never exceeded. On a
        many-core GPU machine use more (the CLI defaults to ``min(8, cores)``).
    cancel : threading.Event, optional
        Checked between batches, by the workers before reading a batch, and between forward
        calls (on the CPU each costs about :data:`SUB_FORWARD_S`; on CUDA one call per
        ``batch_size`` rows); when set the run stops with :class:`Cancelled`, pending
        batches are dropped and the workers end after the call in flight.
    slide_id : str, optional
        Stored in the bag (default: the slide file's stem).
    transform : callable, optional
        Applied to each batch of patches between reading and the input step, in the worker
        threads: [b, S, S, 3] uint8 -> the same shape and dtype (e.g. a staining condition,
        ``stain.make_condition``). It must be thread-safe and a pure function of the pixels.

    Yields
    ------
    Progress
        First ``done=0`` (a message naming encoder, device and patch count), then one per
        batch with its ``features`` [b, D] and ``indices`` [b]: the batches follow the
        slide's tiles (``tissue.tile_order``), so ``indices`` are the bag rows to put the
        features in, not a running range.

    Returns
    -------
    Bag
        features [N, D] float32 in grid order, coords [N, 2] = ``grid.coords``, the grid's
        extent and mpp, ``meta`` with ``slide``, ``bad_tiles``, ``device``, ``timings``,
        ``forward_batch`` (rows per call after any out-of-memory retry) and ``sub_batch``
        (the CPU's paced rows per call at the end; None on CUDA).

    Raises
    ------
    BagError
        The grid is empty (no tissue) or the encoder's output has the wrong shape.
    Cancelled
        ``cancel`` was set.
    """
    import torch

    from .tissue import read_patches, tile_order, tile_uses

    path = str(getattr(slide, "path", "slide"))
    coords = np.asarray(grid.coords)
    n = int(coords.shape[0])
    if n == 0:
        notes = "; ".join(getattr(grid, "notes", ()) or ())
        raise BagError(path, "no patches to extract (no tissue found)" +
                       (f": {notes}" if notes else ""))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    spec = encoder.spec
    dev = resolve_device(device)
    cuda = dev.type == "cuda"
    # channels_last on every device: normalise_batch gives NHWC-ordered batches, and oneDNN's
    # CPU convolutions are faster on them too (~25 % for the demo encoder)
    encoder = encoder.to(dev).eval().to(memory_format=torch.channels_last)

    # On the CPU every worker thread reads its batch *and* runs the forward on it, with
    # torch's thread budget shared out among the workers: a small network gains far more
    # from batches in parallel than from intra-op threads (the demo encoder ~1.4x, ResNet-50
    # ~1.1x on 2 cores), and reading never stalls a forward's OpenMP threads. On CUDA the
    # workers read while the main thread feeds the GPU.
    n_workers = max(1, int(workers))
    threads_before = torch.get_num_threads()
    if not cuda:
        n_workers = min(n_workers, threads_before)

    chunk = batch_size  # forward rows per call; halved for good on an out-of-memory error
    # CPU: rows per forward call paced to ~SUB_FORWARD_S, so a cancel waits for one call
    pace = None if cuda else _Pace(SUB_FORWARD_S, SUB_FORWARD_START)
    ended = threading.Event()  # set when the generator ends, however it ends

    def stopped() -> bool:
        """The run is over for the workers: cancelled, or the generator has ended."""
        return ended.is_set() or (cancel is not None and cancel.is_set())

    def load(idx: np.ndarray) -> Any:
        # one batch per worker thread: whole tiles (tile order), their patches cut out; a
        # tile that no other read needs stays out of the tile cache (the viewer's tiles stay
        # in it, and each decoded tile's memory is reused at once)
        if stopped():
            raise Cancelled("extraction cancelled")
        patches = read_patches(slide, grid, idx, uses=uses)
        if transform is not None:
            out = transform(patches)
            if getattr(out, "shape", None) != patches.shape or out.dtype != np.uint8:
                raise BagError(path, f"transform {transform!r} returned "
                                     f"{getattr(out, 'dtype', type(out).__name__)} "
                                     f"{list(getattr(out, 'shape', []))} for uint8 patches "
                                     f"{list(patches.shape)}")
            patches = out
        x = torch.from_numpy(patches)  # uint8: normalised on the device, in _run
        if cuda:
            return x.pin_memory()
        nonlocal chunk
        # (features [b, D], chunk, messages); Cancelled between calls once stopped()
        got = _forward(encoder, x, chunk, dev, stop=stopped, pace=pace)
        chunk = min(chunk, got[1])  # the next batches start at the size that worked
        return got

    t0 = time.perf_counter()
    bad0 = int(getattr(slide, "bad_tiles", 0))
    # batches follow the slide's tiles (each tile decoded once, its patches cut in one copy);
    # the features go back to grid order
    order = tile_order(slide, grid)
    uses = tile_uses(slide, grid)
    batches = iter([order[s:s + batch_size] for s in range(0, n, batch_size)])
    pool = ThreadPoolExecutor(n_workers, thread_name_prefix=THREAD_PREFIX,
                              initializer=_reader_thread)
    pending: deque = deque()

    def submit() -> None:
        idx = next(batches, None)
        if idx is not None:
            pending.append((idx, pool.submit(load, idx)))

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"{path}: extraction cancelled")

    feats: np.ndarray | None = None  # [N, D] float32, filled batch by batch
    done, bad_seen = 0, bad0
    t_wait = t_fwd = 0.0
    share = (torch_threads(max(1, threads_before // n_workers)) if not cuda
             else contextlib.nullcontext())  # CPU: the budget shared out among the workers
    with share:
        try:
            yield Progress("extract", 0, n, message=f"encoding {n} patches with {spec.name} "
                                                    f"({spec.dim}-d) on {dev}")
            for _ in range(n_workers + 1):
                submit()
            while pending:
                check_cancel()
                idx, fut = pending.popleft()
                try:
                    t = time.perf_counter()
                    got = fut.result()  # a worker stopped by the cancel raises Cancelled
                    t_wait += time.perf_counter() - t
                    check_cancel()
                    submit()
                    if cuda:
                        t = time.perf_counter()
                        got = _forward(encoder, got, chunk, dev, stop=stopped)
                        t_fwd += time.perf_counter() - t
                except Cancelled:
                    raise Cancelled(f"{path}: extraction cancelled") from None
                y, used, messages = got
                chunk = min(chunk, used)
                if y.ndim != 2 or y.shape[0] != len(idx) or y.shape[1] != spec.dim:
                    raise BagError(path, f"encoder {spec.name!r} returned shape {list(y.shape)} "
                                         f"for {len(idx)} patches; expected [{len(idx)}, "
                                         f"{spec.dim}]")
                if feats is None:
                    feats = np.empty((n, y.shape[1]), np.float32)
                feats[idx] = y
                done += len(idx)
                bad = int(getattr(slide, "bad_tiles", 0))
                if bad > bad_seen:
                    messages.append(f"{bad - bad0} unreadable tile(s) so far: read as "
                                    "placeholders, the patches on them have unreliable features")
                    bad_seen = bad
                check_cancel()
                yield Progress("extract", done, n, features=y, indices=idx,
                               message="; ".join(messages))
        finally:
            # the workers stop before their next read or forward call; batches not started
            # are dropped, so the shutdown waits for the calls in flight only
            ended.set()
            for _, fut in pending:
                fut.cancel()
            pending.clear()
            pool.shutdown(wait=True, cancel_futures=True)
    total = time.perf_counter() - t0
    meta = {"slide": path, "bad_tiles": int(getattr(slide, "bad_tiles", 0)) - bad0,
            "device": str(dev), "patch_px": int(grid.patch_px),
            "target_mpp": getattr(grid, "target_mpp", None),
            # forward: the main thread's (CUDA); wait: the main thread waiting for workers
            "timings": {"extract": total, "forward": t_fwd, "wait_read": t_wait},
            "extent_source": "patch grid", "forward_batch": chunk,
            "sub_batch": None if pace is None else pace.size(chunk)}
    return Bag(features=feats, coords=coords,
               patch_size_level0=int(grid.patch_size_level0), mpp=grid.mpp, encoder=spec.name,
               slide_id=slide_id or Path(path).stem, source=f"{path} (extracted)", meta=meta)


# --------------------------------------------------------------------------------------------
# attention
# --------------------------------------------------------------------------------------------
class PredictionError(ValueError):
    """A model produced no usable prediction (non-finite logits, probabilities or attention)."""


def _check_finite_output(logits: Any, probs: Any, sources: dict, bag: Bag,
                         model_name: str) -> None:
    """Refuse a non-finite model output: it is never reported as a prediction.

    Raises
    ------
    PredictionError
        ``"{bag}: the model 'x' gave non-finite logits [nan, nan] (...)"``, one line.
    """
    import numpy as np

    bad = [what for what, arr in (("logits", logits), ("probabilities", probs))
           if not np.isfinite(arr).all()]
    bad += [f"attention {k!r}" for k, v in sources.items() if not np.isfinite(v).all()]
    if bad:
        shown = np.array2string(np.asarray(logits), precision=4, separator=", ")
        raise PredictionError(
            f"{bag.where}: the model {model_name!r} gave non-finite {', '.join(bad)} "
            f"(logits {shown}): no prediction. Its weights or these features overflow "
            "float32; check the checkpoint and the bag")


def attend(bag: Bag, model: MILModel, card: ModelCard, *, device: Any = "auto",
           model_name: str | None = None) -> Result:
    """Run a MIL model on a bag: slide prediction and every attention source.

    Parameters
    ----------
    bag : Bag
        features [N, D] float32, coords [N, 2]; its extent must be known.
    model : MILModel
        In eval mode (``mil.checkpoint.load_model``); moved to ``device``.
    card : ModelCard
        Class names, feature dimension, encoder and patch size the model expects.
    device : str or torch.device
        ``"auto"``: CUDA when available, else CPU.
    model_name : str, optional
        Stored as ``Result.model`` (the checkpoint path, or ``"demo"``).

    Returns
    -------
    Result
        coords [N, 2], sources name -> [N] float32 in bag order, logits and probabilities
        [C] float32.

    Raises
    ------
    BagError
        The bag's feature dimension is not the model's, or its patch extent is unknown.
    PredictionError
        The model's logits, probabilities or attention are not finite (never returned).
    """
    import warnings

    import torch

    from .result import Result

    expected = card.feature_dim if card.feature_dim is not None else model.required_dim
    bag.check_dim(int(expected), model_name or card.arch)
    extent = bag.require_extent()
    notes = []
    if card.encoder and bag.encoder and card.encoder != bag.encoder:
        notes.append(f"the model was trained on {card.encoder!r} features, the bag holds "
                     f"{bag.encoder!r} features")
    if card.patch_size_um and bag.patch_size_um and \
            abs(bag.patch_size_um / card.patch_size_um - 1) > 0.1:
        notes.append(f"the model expects {card.patch_size_um:g} um patches, the bag's are "
                     f"{bag.patch_size_um:g} um")
    for note in notes:
        warnings.warn(f"{bag.where}: {note}", UserWarning, stacklevel=2)
    dev = resolve_device(device)
    model = model.to(dev).eval()
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.forward_attention(bag.to_torch(dev))
        logits = out.logits.float().reshape(-1)
        probs = out.probs.float().reshape(-1).cpu().numpy()
        sources = {k: v.float().reshape(-1).cpu().numpy() for k, v in out.sources.items()}
        logits = logits.cpu().numpy()
    seconds = time.perf_counter() - t0
    _check_finite_output(logits, probs, sources, bag, model_name or card.arch)
    classes = list(card.classes) or [f"class_{i}" for i in range(len(logits))]
    meta = {"bag_source": bag.source, "dropped": bag.dropped}
    meta.update(model_provenance(card))
    thresholds, assumed = None, False
    if "positive" in out.aux:  # DSMIL: each class decided against the training thresholds
        meta["positive"] = [c for c, v in zip(classes, out.aux["positive"].tolist()) if v]
        meta["thresholds"] = [float(t) for t in out.aux["thresholds"].tolist()]
        thresholds = meta["thresholds"]
        assumed = getattr(model, "hparams", {}).get("thresholds") is None
    if notes:
        meta["notes"] = notes
    for k in ("bad_tiles", "extent_source", "mpp_source"):
        if k in bag.meta:
            meta[k] = bag.meta[k]
    timings = {"attend": seconds}
    if isinstance(bag.meta.get("timings"), dict) and "extract" in bag.meta["timings"]:
        timings["extract"] = float(bag.meta["timings"]["extract"])
    slide = bag.meta.get("slide")
    return Result(coords=bag.coords, patch_size_level0=extent, sources=sources,
                  default_source=out.default_source, classes=classes, logits=logits,
                  probabilities=probs, arch=card.arch, mpp=bag.mpp,
                  slide=None if slide is None else str(slide), slide_id=bag.slide_id,
                  encoder=bag.encoder, model=model_name, device=str(dev), timings=timings,
                  meta=meta, thresholds=thresholds, thresholds_assumed=assumed)


def model_provenance(card: ModelCard) -> dict[str, str]:
    """What a result should record about how the model was run beyond its weights.

    TransMIL family: ``{"nystrom": "0.0.9" | "current", "nystrom_why": <the card's note>}``
    (the nystrom-attention variant changes the probabilities and the heatmap); empty for
    other models.
    """
    variant = getattr(card, "nystrom", None)
    if variant is None:
        return {}
    out = {"nystrom": str(variant)}
    why = [n for n in str(getattr(card, "notes", "") or "").split("; ")
           if n.startswith("nystrom ")]
    if why:
        out["nystrom_why"] = why[-1]
    return out


# --------------------------------------------------------------------------------------------
# checks before a bag meets a slide
# --------------------------------------------------------------------------------------------
def check_bag_fits(bag: Bag, slide: Any, *, allow: bool = False) -> list[str]:
    """Refuse a bag that cannot have been made on ``slide``, before any inference.

    Two signs: a patch lies outside the slide's level-0 extent by more than one patch
    (``coords`` [N, 2] level-0 (x, y) beyond (width, height), or below -patch), or the bag
    stores the slide file it was made from (``bag.meta["slide"]``: our own h5) and its name
    is not this slide's.

    Parameters
    ----------
    bag : Bag
        coords [N, 2] int64.
    slide : napari_milview.slide.Slide
        The slide the user runs on.
    allow : bool
        The user knows better: the problems come back as notes instead of an error.

    Returns
    -------
    list[str]
        The problems found (empty when the bag fits); only returned when ``allow``.

    Raises
    ------
    BagError
        Naming both files and the problem, and how to run anyway.
    """
    w, h = slide.info.dimensions
    slide_path = Path(str(slide.path))
    problems = []
    if len(bag.coords):
        ps = int(bag.patch_size_level0 or 0)
        (x0, y0), (x1, y1) = bag.coords.min(axis=0), bag.coords.max(axis=0)
        if x1 > w or y1 > h or x0 < -ps or y0 < -ps:
            problems.append(f"its patches reach level-0 ({int(x1)}, {int(y1)}) "
                            f"[from ({int(x0)}, {int(y0)})], outside the slide's "
                            f"{w} x {h} px")
    stored = bag.meta.get("slide")
    if stored and Path(str(stored)).name != slide_path.name:
        problems.append(f"it was made from {Path(str(stored)).name}")
    if problems and not allow:
        raise BagError(bag.where, f"does not fit the slide {slide_path.name}: "
                       f"{'; '.join(problems)} (is the bag from another slide? to run it "
                       "anyway, tick 'Run a bag that does not fit the slide')")
    return problems


#: The note a demo-model result carries on a slide the demo model was not trained on.
DEMO_NOTE = ("demo model: trained on napari-milview's synthetic slides only; on this slide "
             "its output is a demonstration, not a prediction")


def demo_note(model_name: str | None, slide: Any) -> str | None:
    """:data:`DEMO_NOTE` when ``model_name`` is the bundled demo model and ``slide`` (a
    Slide, or None when unknown) is not one of the package's synthetic slides."""
    if model_name != "demo":
        return None
    return None if slide is not None and is_synthetic(slide) else DEMO_NOTE


def is_synthetic(slide: Any) -> bool:
    """True for a slide ``synthetic.write_synthetic_slide`` wrote: its Aperio title says so,
    or the JSON it writes beside the slide (``NAME.json`` for ``NAME.svs`` and
    ``NAME.ome.zarr``) names the generator."""
    import json

    title = slide.info.properties.get("aperio.Title", "")
    if title.startswith("napari-milview synthetic"):
        return True
    path = Path(str(slide.path))
    stem = path.name.split(".")[0]
    try:
        doc = json.loads((path.parent / f"{stem}.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(doc, dict) and doc.get("generator") == "napari_milview.synthetic"


# --------------------------------------------------------------------------------------------
# the run path: slide or bag + encoder + model -> progress -> result
# --------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """How a run gets its features and runs, besides the slide and the model.

    Attributes
    ----------
    bag : str, path or Bag, optional
        Features from a bag file (CLAM / TRIDENT / ACMIL / our h5, ``.pt``) or a Bag; None:
        extracted now with ``encoder``.
    encoder : str or torch.nn.Module, optional
        A registry name (built with ``weights``) or a built encoder (``.spec``).
    weights : str, optional
        Local weights of a named encoder.
    grid : PatchGrid, optional
        The patches to encode (default: cut by :func:`prepare`).
    patch_um, mag : float, optional
        What the user asked for (``patch_um`` wins); see :func:`resolve_patch`.
    min_tissue : float
        Keep patches with at least this tissue fraction.
    batch_size, device, workers, transform
        As in :func:`extract_bag`.
    stream_s : float
        Every ``stream_s`` seconds of extraction the model also runs on the patches encoded
        so far (:attr:`Progress.partial`); < 0: never.
    pause : object, optional
        With ``active()`` and ``wait(cancel)`` (``_qt._common.Interaction``): extraction waits
        between batches while it is active, saying :data:`PAUSED` once.
    allow_foreign_bag : bool
        Run a bag that does not fit the slide (:func:`check_bag_fits`) with a note.
    model_name : str, optional
        The checkpoint path, or ``"demo"`` (results, messages, :func:`demo_note`).
    slide_id : str, optional
        Stored in an extracted bag (default: the slide file's stem).
    """

    bag: Any = None
    encoder: Any = None
    weights: str | None = None
    grid: Any = None
    patch_um: float | None = None
    mag: float | None = None
    min_tissue: float = 0.25
    batch_size: int = 64
    device: Any = "auto"
    workers: int = 2
    transform: Callable[[np.ndarray], np.ndarray] | None = None
    stream_s: float = -1.0
    pause: Any = None
    allow_foreign_bag: bool = False
    model_name: str | None = None
    slide_id: str | None = None


def resolve_patch(card: Any, spec: Any, *, patch_um: float | None = None,
                  mag: float | None = None) -> tuple[float | None, float | None]:
    """``(patch_um, mag)`` of a run, the one place that decides it: what the user asked for
    (``patch_um`` wins over ``mag``), else the model card's patch size, else the encoder's own
    (``spec.patch_px * spec.mpp``), else 20x."""
    if patch_um is not None:
        return float(patch_um), None
    if mag is not None:
        return None, float(mag)
    if card is not None and getattr(card, "patch_size_um", None):
        return float(card.patch_size_um), None
    if spec is not None and spec.mpp is not None:
        return float(spec.patch_px * spec.mpp), None
    return None, 20.0


def prepare(slide: Any, spec: RunSpec, card: Any = None) -> tuple[Any, Any]:
    """``(encoder, grid)`` for extracting ``slide``: the encoder built (a name) and checked
    against ``card``'s feature dimension before any patch is read, the patch grid cut at the
    size :func:`resolve_patch` gives (unless ``spec.grid``)."""
    from .tissue import patch_grid

    encoder = spec.encoder
    if encoder is None:
        raise ValueError("no encoder: name one, or give a bag")
    if isinstance(encoder, str):
        encoder = build_encoder_for(card, encoder, spec.weights, spec.model_name or "the model")
    else:
        check_encoder(card, encoder, spec.model_name or "the model")
    grid = spec.grid
    if grid is None:
        es = encoder.spec
        patch_um, mag = resolve_patch(card, es, patch_um=spec.patch_um, mag=spec.mag)
        grid = patch_grid(slide, patch_px=es.patch_px, patch_um=patch_um, mag=mag,
                          min_tissue=spec.min_tissue)
    return encoder, grid


def _prepared(slide: Any, spec: RunSpec, card: Any) -> Generator[Progress, None, RunSpec]:
    """``spec`` with its encoder built and checked and its grid cut (:func:`prepare`; a
    built encoder and a given grid are only checked), saying so when that is work to do."""
    from dataclasses import replace

    if isinstance(spec.encoder, str) or spec.grid is None:
        yield Progress("prepare", message=f"loading encoder {_name(spec.encoder)}, finding "
                                          "tissue")
    encoder, grid = prepare(slide, spec, card)
    return replace(spec, encoder=encoder, grid=grid)


def extract(slide: Any, spec: RunSpec, card: Any = None,
            cancel: threading.Event | None = None) -> Generator[Progress, None, Bag]:
    """:func:`prepare` then :func:`extract_bag`, waiting while ``spec.pause`` is active: a
    generator of :class:`Progress` returning the bag (what ``milview extract`` writes)."""
    spec = yield from _prepared(slide, spec, card)
    _check(cancel, slide)
    gen = extract_bag(slide, spec.grid, spec.encoder, batch_size=spec.batch_size,
                      device=spec.device, workers=spec.workers, cancel=cancel,
                      slide_id=spec.slide_id, transform=spec.transform)
    done = (0, len(spec.grid))
    try:
        while True:
            pause = spec.pause
            if pause is not None and pause.active():
                yield Progress("extract", *done, message=PAUSED)
                pause.wait(cancel if cancel is not None else threading.Event())
            try:
                p = next(gen)
            except StopIteration as stop:
                return stop.value
            done = (p.done, p.total)
            yield p
    finally:
        gen.close()


def run(slide: Any, model: Any, card: Any, spec: RunSpec,
        cancel: threading.Event | None = None) -> Generator[Progress, None, tuple[Bag, Result]]:
    """Slide or bag + encoder + model -> progress -> ``(bag, result)``: THE run path that the
    MIL dock, ``milview run`` (each cohort task), ``milview extract`` + ``attend`` and the
    robustness runs all drive.

    Parameters
    ----------
    slide : Slide or None
        The open slide (None: a bag alone; no fit check, no extraction).
    model, card : MILModel, ModelCard
        From ``mil.checkpoint.load_model``.
    spec : RunSpec
    cancel : threading.Event, optional
        Checked between batches (and inside them, see :func:`extract_bag`) and before the
        model runs: :class:`Cancelled`.

    Yields
    ------
    Progress
        ``prepare`` / ``load``, one ``extract`` per batch (with ``partial`` every
        ``spec.stream_s`` seconds), ``attend``.

    Returns
    -------
    (Bag, Result)
        The bag (features [N, D], coords [N, 2]) and the model's result on it; the result's
        ``meta["notes"]`` says what the user should know (a bag run on a slide it does not
        fit, the demo model on a real slide).
    """
    notes: list[str] = []
    if spec.bag is not None:
        bag = spec.bag
        if not isinstance(bag, Bag):
            from .features.io import load_bag

            yield Progress("load", message=f"reading {Path(str(bag)).name}")
            bag = load_bag(bag)
        if slide is not None:
            notes += check_bag_fits(bag, slide, allow=spec.allow_foreign_bag)
    else:
        bag = yield from _streamed(slide, model, card, spec, cancel)
    _check(cancel, slide)
    yield Progress("attend", bag.n, bag.n, message=f"running {card.arch} on {bag.n} patches")
    result = attend(bag, model, card, device=spec.device, model_name=spec.model_name)
    notes += [n for n in [demo_note(spec.model_name, slide)] if n]
    if notes:
        result.meta["notes"] = [*result.meta.get("notes", []), *notes]
    return bag, result


def _streamed(slide, model, card, spec: RunSpec, cancel) -> Generator[Progress, None, Bag]:
    """:func:`extract`, with the model run on the patches encoded so far every
    ``spec.stream_s`` seconds (:attr:`Progress.partial`)."""
    spec = yield from _prepared(slide, spec, card)  # the grid, for the partial results
    feats = have = None
    last = time.perf_counter()

    def with_partial(p: Progress) -> Progress:
        nonlocal feats, have, last
        if p.features is not None:
            if feats is None:
                feats = np.zeros((p.total, p.features.shape[1]), np.float32)
                have = np.zeros(p.total, bool)
            feats[p.indices] = p.features
            have[p.indices] = True
            if 0 <= spec.stream_s <= time.perf_counter() - last and p.done < p.total:
                p.partial = _partial(slide, model, card, spec, feats, have)
                last = time.perf_counter()
        return p

    return (yield from tap(extract(slide, spec, card, cancel), with_partial))


def _partial(slide, model, card, spec: RunSpec, feats: np.ndarray, have: np.ndarray):
    """The model on the patches encoded so far, spread back over the whole grid.

    Parameters
    ----------
    feats : np.ndarray
        [N, D] float32, rows of ``have`` filled.
    have : np.ndarray
        [N] bool.
    """
    import warnings

    from .result import Result

    grid = spec.grid
    bag = Bag.from_arrays(feats[have], grid.coords[have],
                          patch_size_level0=grid.patch_size_level0, mpp=grid.mpp,
                          encoder=_name(spec.encoder), source="partial bag")
    with warnings.catch_warnings():  # said once, by the final run
        warnings.simplefilter("ignore")
        r = attend(bag, model, card, device=spec.device, model_name=spec.model_name)
    sources = {}
    for k, v in r.sources.items():
        full = np.full(len(have), np.nan, np.float32)
        full[have] = v
        sources[k] = full
    return Result(coords=grid.coords, patch_size_level0=grid.patch_size_level0,
                  sources=sources, default_source=r.default_source, classes=r.classes,
                  logits=r.logits, probabilities=r.probabilities, arch=r.arch, mpp=r.mpp,
                  slide=str(getattr(slide, "path", "")), encoder=bag.encoder, model=r.model,
                  device=r.device, timings=r.timings,
                  meta={"partial": True, "n_done": int(have.sum()),
                        **model_provenance(card)},
                  thresholds=r.thresholds, thresholds_assumed=r.thresholds_assumed)


def _name(encoder: Any) -> str:
    """An encoder's name, whether given by name or built."""
    return encoder if isinstance(encoder, str) else getattr(getattr(encoder, "spec", None),
                                                            "name", "encoder")


def _check(cancel: threading.Event | None, slide: Any) -> None:
    if cancel is not None and cancel.is_set():
        raise Cancelled(f"{getattr(slide, 'path', 'run')}: cancelled")

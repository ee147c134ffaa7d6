"""Cohort runs: one slide per task on dask.distributed; resumable and failure-isolated.

>>> from napari_milview.cohort import CohortConfig, run_cohort
>>> report = run_cohort(["slides/*.svs"], "out", CohortConfig(encoder="demo", model="demo"),
...                     workers=2)                                     # doctest: +SKIP

Per slide (``<id>`` = the file name without its extension) the task writes into ``out``:

* ``<id>.bag.h5`` - the feature bag (:func:`napari_milview.features.milview_h5.save_bag`);
* ``<id>.result.h5`` - prediction and every attention source (:func:`~napari_milview.
  result.save_result`);
* ``<id>.geojson`` - QuPath detections + top-K annotations (:func:`~napari_milview.overlay.
  geojson.to_geojson`);
* ``<id>.heatmap.ome.tif`` - the heatmap grid as a pyramidal OME-TIFF
  (:func:`~napari_milview.overlay.export.write_heatmap_tiff`);
* ``<id>.milview.json`` - the viewer's sidecar (:func:`~napari_milview.overlay.export.
  write_sidecar`): opening it restores slide, heatmap and top-K; its ``extra`` holds the
  absolute paths of the slide and the result h5;
* ``<id>.done.json`` - the "done" marker, written last: the slide's fingerprint, the hash of
  the run's configuration, the outputs with their sizes, and the summary row.

Every file is written to a temporary name in ``out`` and renamed into place, so a crash never
leaves a half file under a final name; a slide counts as done only when its marker matches
the slide's fingerprint and the configuration's hash and every output exists with the size
the marker records. Such slides are skipped by the next run; any other is (re)computed. A
slide that failed has no marker and is retried by the next run.

Failure isolation: :func:`process_slide` turns every exception into a ``status="error"``
:class:`Row` naming the file; a worker process that dies (killed, segfault, out of memory) has
its task rescheduled by dask on another worker up to ``allowed-failures`` times (set to
:data:`ALLOWED_FAILURES` for the ``LocalCluster`` started here; a remote scheduler uses its own
setting), after which the slide gets an error row.

``out/summary.csv`` holds one row per slide (:data:`SUMMARY_COLUMNS`) and is rewritten
atomically after every finished slide: rows of this run, rows of the slides it skipped (from
their markers) and the previous summary's rows of slides not in this run.

With ``scheduler=ADDRESS`` the workers must see the slides and ``out`` under the same paths
(a shared file system). Workers started by hand get distributed's default environment, whose
``MALLOC_TRIM_THRESHOLD_=65536`` made torch CPU inference about 2x slower here: unset it
(config ``distributed.nanny.pre-spawn-environ``) for CPU workers; the local cluster does.

Qt-free; torch, openslide and distributed are imported inside the functions.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import io
import json
import logging
import os
import socket
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from ._io import atomic_write, fingerprint

__all__ = ["ALLOWED_FAILURES", "OUTPUTS", "SUMMARY_COLUMNS", "CohortConfig", "Job", "Report",
           "Row", "expand_inputs", "fingerprint", "outputs", "plan", "process_slide",
           "run_cohort"]

#: bumped when the outputs' layout changes: every slide is then recomputed
COHORT_FORMAT = 1
#: how many worker deaths a task survives (dask's ``distributed.scheduler.allowed-failures``)
ALLOWED_FAILURES = 3
#: output kinds -> file name suffix after ``<id>``; the marker (``.done.json``) comes last
OUTPUTS = {"bag": ".bag.h5", "result": ".result.h5", "geojson": ".geojson",
           "heatmap": ".heatmap.ome.tif", "sidecar": ".milview.json"}
DONE_SUFFIX = ".done.json"
SUMMARY = "summary.csv"
STAGES = ("open", "tissue", "extract", "attend", "export", "total")
SUMMARY_COLUMNS = ("slide", "slide_id", "status", "message", "predicted", "probabilities",
                   "n_patches", *(f"seconds_{s}" for s in STAGES), "worker", "skipped")


# --------------------------------------------------------------------------------------------
# configuration (``fingerprint`` lives in ``_io``: the robustness run keys its cache on it)
# --------------------------------------------------------------------------------------------
def _content_id(path: str | os.PathLike | None) -> dict | None:
    """Size + hash of a weights file (and its ``<stem>.json`` card), not its mtime."""
    if path is None:
        return None
    p = Path(path)
    if not p.exists():
        return {"path": str(p), "missing": True}
    fp = fingerprint(p)
    out = {"size": fp["size"], "sha256": fp["sha256"]}
    card = p.with_suffix(".json")
    if p.is_file() and card.is_file():
        out["card"] = hashlib.sha256(card.read_bytes()).hexdigest()
    return out


@dataclass(frozen=True)
class CohortConfig:
    """Everything that decides a slide's outputs (plus a few speed knobs left out of the hash).

    Attributes
    ----------
    encoder : str
        Encoder registry name (``features.encoders.available_encoders()``) or TorchScript file.
    weights : str, optional
        Local encoder weights (default: the shipped ones for ``demo``).
    model : str
        MIL checkpoint path, or ``"demo"`` for the shipped demo model.
    arch : str, optional
        MIL architecture (default: detected from the checkpoint).
    nystrom : {"0.0.9", "current"}, optional
        TransMIL only: the nystrom-attention variant (default: the card's, else what the
        checkpoint's container shows; ``mil.checkpoint.load_model``). Hashed only when set.
    patch_um, mag : float, optional
        Patch side in microns, or magnification (``patch_um`` wins); neither: the model
        card's patch size, else the encoder's own (``pipeline.resolve_patch``).
    min_tissue : float
        Keep patches with at least this tissue fraction.
    mpp : float, optional
        Microns per pixel for slides that do not say (an override for every slide).
    device : str
        ``"auto"`` (CUDA when a worker has it, else CPU), ``"cpu"``, ``"cuda"``...
    source : str, optional
        Attention source of the GeoJSON, heatmap and sidecar (default: the model's default).
    method : str
        Heatmap normalisation (``overlay.normalise.METHODS``).
    top_k : int
        Top-K patches in the GeoJSON annotations and the sidecar.
    batch_size, readers : int
        Patches per encoder batch and reader threads per task (speed only; not hashed).
    """

    encoder: str = "demo"
    weights: str | None = None
    model: str = "demo"
    arch: str | None = None
    nystrom: str | None = None
    patch_um: float | None = None
    mag: float | None = None
    min_tissue: float = 0.25
    mpp: float | None = None
    device: str = "auto"
    source: str | None = None
    method: str = "raw"
    top_k: int = 20
    batch_size: int = 64
    readers: int = 2

    #: fields that only change speed, not the outputs
    SPEED_ONLY = ("batch_size", "readers")

    def __post_init__(self) -> None:
        for name in ("weights", "model"):
            value = getattr(self, name)
            if value is not None and value != "demo":
                object.__setattr__(self, name, str(Path(value).expanduser().resolve()))
        if self.nystrom is not None and self.nystrom not in ("0.0.9", "current"):
            raise ValueError(f"nystrom must be '0.0.9' or 'current', got {self.nystrom!r}")
        if not 0 <= self.min_tissue <= 1:
            raise ValueError(f"min_tissue must be within [0, 1], got {self.min_tissue!r}")
        if self.batch_size < 1 or self.readers < 1 or self.top_k < 0:
            raise ValueError("batch_size and readers must be >= 1 and top_k >= 0")

    def to_dict(self) -> dict:
        """Every field (JSON-ready)."""
        return asdict(self)

    def files(self) -> dict[str, Path | None]:
        """The weight files the outputs depend on: ``{"weights": ..., "model": ...}``."""
        weights = self.weights
        if weights is None and self.encoder.strip().lower() in ("demo", "milview_demo"):
            from .assets import demo_encoder_path

            weights = demo_encoder_path()
        model = self.model
        if model == "demo":
            from .assets import demo_model_path

            model = demo_model_path()
        return {"weights": None if weights is None else Path(weights), "model": Path(model)}

    def hash(self) -> str:
        """SHA-256 (hex, 16 chars) of the fields that decide the outputs and of the content
        (size + end hashes) of the encoder weights and the model checkpoint: equal configs on
        equal weight files give equal hashes, on any machine."""
        d = {k: v for k, v in self.to_dict().items() if k not in self.SPEED_ONLY}
        if d.get("nystrom") is None:  # unset: the hashes of earlier runs stay valid
            d.pop("nystrom", None)
        d["files"] = {k: _content_id(v) for k, v in self.files().items()}
        d["format"] = COHORT_FORMAT
        text = json.dumps(d, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


# --------------------------------------------------------------------------------------------
# rows and reports
# --------------------------------------------------------------------------------------------
@dataclass
class Row:
    """One slide's line of ``summary.csv``.

    Attributes
    ----------
    slide : str
        Absolute slide path.
    slide_id : str
        The ``<id>`` of its output files.
    status : str
        ``"ok"`` or ``"error"``.
    message : str
        One line: the error, or warnings of a finished slide (unreadable tiles...).
    predicted : str
        Predicted class name (empty on error).
    probabilities : dict[str, float]
        Class name -> probability.
    n_patches : int
        Patches in the bag.
    seconds : dict[str, float]
        Per stage: ``open, tissue, extract, attend, export, total``.
    worker : str
        ``host:pid`` of the process that made it.
    skipped : bool
        True when this run skipped the slide (row taken from its marker).
    """

    slide: str
    slide_id: str
    status: str
    message: str = ""
    predicted: str = ""
    probabilities: dict[str, float] = field(default_factory=dict)
    n_patches: int = 0
    seconds: dict[str, float] = field(default_factory=dict)
    worker: str = ""
    skipped: bool = False

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_csv(self) -> dict[str, str]:
        """The row as strings, keyed by :data:`SUMMARY_COLUMNS`."""
        d = {"slide": self.slide, "slide_id": self.slide_id, "status": self.status,
             "message": self.message, "predicted": self.predicted,
             "probabilities": json.dumps(self.probabilities) if self.probabilities else "",
             "n_patches": str(self.n_patches), "worker": self.worker,
             "skipped": "yes" if self.skipped else "no"}
        for s in STAGES:
            v = self.seconds.get(s)
            d[f"seconds_{s}"] = "" if v is None else f"{v:.3f}"
        return d

    @classmethod
    def from_dict(cls, d: dict) -> Row:
        """Inverse of :func:`dataclasses.asdict` (unknown keys ignored)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class Report:
    """What a cohort run did.

    Attributes
    ----------
    total, done, skipped, failed : int
        Slides planned; finished ok by this run; skipped (already done); in error.
    seconds : float
        Wall time of the whole call (planning, cluster start and shutdown included).
    seconds_startup : float
        Time to start (or connect to) the cluster.
    seconds_processing : float
        From the first task submitted to the last one finished.
    slides_per_hour : float
        Slides processed (ok or error) per hour of ``seconds_processing``.
    summary : Path
        ``out/summary.csv``.
    rows : list[Row]
        This run's rows in input order (skipped ones included).
    """

    total: int
    done: int
    skipped: int
    failed: int
    seconds: float
    seconds_startup: float
    seconds_processing: float
    slides_per_hour: float
    summary: Path
    rows: list[Row] = field(default_factory=list)

    def to_dict(self) -> dict:
        """The counters and timings (no rows), JSON-ready."""
        return {"total": self.total, "done": self.done, "skipped": self.skipped,
                "failed": self.failed, "seconds": round(self.seconds, 3),
                "seconds_startup": round(self.seconds_startup, 3),
                "seconds_processing": round(self.seconds_processing, 3),
                "slides_per_hour": round(self.slides_per_hour, 2), "summary": str(self.summary)}


# --------------------------------------------------------------------------------------------
# planning
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """One slide of a run (picklable: it travels to a worker).

    Attributes
    ----------
    slide : str
        Absolute path.
    slide_id : str
        Output name stem in ``out``.
    out : str
        Absolute output folder.
    config : CohortConfig
    config_hash : str
    fingerprint : dict or None
        The slide's :func:`fingerprint` at planning time (None: unreadable).
    skip : bool
        Already done with this fingerprint and configuration.
    reason : str
        Why it runs (``"new"``, ``"slide changed"``, ``"configuration changed"``, ``"output
        missing: ..."``) or ``"done"``.
    threads : int
        torch threads the task may use.
    """

    slide: str
    slide_id: str
    out: str
    config: CohortConfig
    config_hash: str
    fingerprint: dict | None
    skip: bool = False
    reason: str = "new"
    threads: int = 1

    def path(self, kind: str) -> Path:
        """``out/<id><suffix>`` of an output kind (a key of :data:`OUTPUTS`, or ``"done"``)."""
        suffix = DONE_SUFFIX if kind == "done" else OUTPUTS[kind]
        return Path(self.out) / f"{self.slide_id}{suffix}"


def outputs(out: str | os.PathLike, slide_id: str) -> dict[str, Path]:
    """The output files of one slide: kind -> path (the marker under ``"done"``)."""
    d = Path(out)
    return {**{k: d / f"{slide_id}{s}" for k, s in OUTPUTS.items()},
            "done": d / f"{slide_id}{DONE_SUFFIX}"}


def _is_glob(s: str) -> bool:
    return any(c in s for c in "*?[")


def _read_csv(path: Path) -> list[str]:
    """The ``slide`` column of a CSV (relative paths are relative to the CSV's folder)."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as fh:
            reader = csv.DictReader(fh)
            cols = [c.strip() for c in (reader.fieldnames or [])]
            if "slide" not in cols:
                raise ValueError(f"{path}: no 'slide' column (columns: "
                                 f"{', '.join(cols) or 'none'})")
            key = (reader.fieldnames or [])[cols.index("slide")]
            vals = [(r.get(key) or "").strip() for r in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ValueError(f"{path}: cannot read the CSV ({e})") from None
    return [v if os.path.isabs(v) else str(path.parent / v) for v in vals if v]


def expand_inputs(inputs: Iterable[str | os.PathLike]) -> list[str]:
    """Slides, globs and CSV files (``slide`` column) -> absolute slide paths, de-duplicated,
    in order. A path that does not exist is kept (its task reports the error); a glob that
    matches nothing is a ``ValueError``."""
    paths: list[str] = []
    for item in inputs:
        s = os.fspath(item)
        if s.lower().endswith(".csv") and Path(s).is_file():
            paths += _read_csv(Path(s))
        elif _is_glob(s) and not Path(s).exists():
            hits = sorted(glob.glob(os.path.expanduser(s), recursive=True))
            if not hits:
                raise ValueError(f"{s}: the pattern matches no file")
            paths += hits
        else:
            paths.append(s)
    seen: dict[str, None] = {}
    for p in paths:
        seen.setdefault(os.path.realpath(os.path.expanduser(p)), None)
    return list(seen)


def _stem(path: str) -> str:
    name = Path(path).name
    for multi in (".ome.zarr", ".ome.tiff", ".ome.tif"):
        if name.lower().endswith(multi):
            return name[: -len(multi)]
    return Path(name).stem or name


def _ids(paths: Sequence[str]) -> list[str]:
    """Output stems; slides sharing a stem get ``-<8 hex of their path>`` appended."""
    stems = [_stem(p) for p in paths]
    count: dict[str, int] = {}
    for s in stems:
        count[s] = count.get(s, 0) + 1
    return [s if count[s] == 1 else f"{s}-{hashlib.sha1(p.encode()).hexdigest()[:8]}"
            for s, p in zip(stems, paths, strict=True)]


def _read_marker(path: Path) -> dict | None:
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _skip_reason(out: Path, slide_id: str, fp: dict | None, config_hash: str) -> str:
    """``"done"`` when the slide's outputs are complete and current, else why it must run."""
    files = outputs(out, slide_id)
    if not files["done"].is_file():
        return "new" if not any(p.exists() for p in files.values()) else "not finished"
    marker = _read_marker(files["done"])
    if marker is None or not isinstance(marker.get("outputs"), dict):
        return "done marker unreadable"
    if fp is None or marker.get("fingerprint") != fp:
        return "slide changed"
    if marker.get("config_hash") != config_hash:
        return "configuration changed"
    for kind in OUTPUTS:
        p = files[kind]
        if not p.is_file():
            return f"output missing: {p.name}"
        if marker["outputs"].get(kind) != p.stat().st_size:
            return f"output changed: {p.name}"
    return "done"


def plan(inputs: Iterable[str | os.PathLike], out: str | os.PathLike, config: CohortConfig,
         *, threads: int = 1) -> list[Job]:
    """The jobs of a run: one per distinct slide, each marked ``skip`` when already done.

    Parameters
    ----------
    inputs
        Slide paths, glob patterns, CSV files with a ``slide`` column.
    out
        Output folder (created if missing).
    config
        The run's configuration; its :meth:`CohortConfig.hash` goes into every marker.
    threads
        torch threads per task.

    Returns
    -------
    list[Job]
        In input order.
    """
    paths = expand_inputs(inputs)
    if not paths:
        raise ValueError("no slides given")
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    chash = config.hash()
    jobs = []
    for path, sid in zip(paths, _ids(paths), strict=True):
        try:
            fp = fingerprint(path)
        except OSError:
            fp = None
        reason = _skip_reason(out, sid, fp, chash)
        jobs.append(Job(slide=path, slide_id=sid, out=str(out), config=config,
                        config_hash=chash, fingerprint=fp, skip=reason == "done",
                        reason=reason, threads=int(threads)))
    return jobs


def _remove_temps(job: Job) -> None:
    """Delete temporary files a crashed task left for this slide (``.<name>.*.tmp``)."""
    for p in outputs(job.out, job.slide_id).values():
        for tmp in Path(job.out).glob(f".{glob.escape(p.name)}.*.tmp"):
            with contextlib.suppress(OSError):
                tmp.unlink()


# --------------------------------------------------------------------------------------------
# the per-slide task
# --------------------------------------------------------------------------------------------
_MODELS: dict[str, tuple] = {}
_MODELS_LOCK = threading.Lock()


def _models(config: CohortConfig, key: str) -> tuple:
    """(encoder, model, card, model_name), built once per process and configuration."""
    with _MODELS_LOCK:
        if key not in _MODELS:
            from .features.encoders import build_encoder
            from .mil.checkpoint import load_model

            encoder = build_encoder(config.encoder, weights=config.weights)
            model, card = load_model(config.files()["model"], arch=config.arch,
                                     nystrom=config.nystrom)
            _MODELS.clear()  # one configuration per run: keep memory flat
            _MODELS[key] = (encoder, model, card, config.model)
        return _MODELS[key]


def _one_line(e: BaseException, slide: str) -> str:
    msg = " ".join(str(e).split()) or type(e).__name__
    if type(e).__name__ == "KilledWorker":  # distributed gave up after repeated worker deaths
        msg = ("KilledWorker: every worker process that ran this slide died (killed, crashed "
               "or out of memory); see the workers' logs")
    elif not isinstance(e, ValueError | OSError):
        msg = f"{type(e).__name__}: {msg}"
    if slide not in msg and Path(slide).name not in msg:
        msg = f"{slide}: {msg}"
    return msg


def process_slide(job: Job) -> Row:
    """Run one slide end to end and write its outputs; never raises.

    Open the slide, cut the tissue patch grid at the size the model card asks for
    (``pipeline.prepare``), encode it and run the MIL model (``pipeline.run``, the one run
    path), then write bag, result, GeoJSON, heatmap OME-TIFF,
    sidecar and - last - the ``.done.json`` marker, each atomically. The encoder and model are
    loaded once per process (cached by configuration hash).

    Returns
    -------
    Row
        ``status="ok"`` with prediction and timings, or ``status="error"`` with a one-line
        message naming the slide.
    """
    t_start = time.perf_counter()
    worker = f"{socket.gethostname()}:{os.getpid()}"
    seconds: dict[str, float] = {}
    row = Row(slide=job.slide, slide_id=job.slide_id, status="error", worker=worker)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            row = _process(job, row, seconds)
        notes = list(dict.fromkeys(" ".join(str(w.message).split()) for w in caught
                                   if issubclass(w.category, UserWarning)))
        if notes:
            row.message = "; ".join([row.message, *notes] if row.message else notes)[:2000]
    except Exception as e:  # noqa: BLE001 - one slide must never stop the run
        row.status, row.message = "error", _one_line(e, job.slide)
    seconds["total"] = time.perf_counter() - t_start
    row.seconds = {k: round(v, 4) for k, v in seconds.items()}
    if row.ok:
        try:
            _write_marker(job, row)
        except Exception as e:  # noqa: BLE001
            row.status, row.message = "error", _one_line(e, job.slide)
    return row


def _process(job: Job, row: Row, seconds: dict[str, float]) -> Row:
    import torch

    from ._malloc import tune_for_batches
    from .features.milview_h5 import save_bag
    from .overlay.export import write_heatmap_tiff, write_sidecar
    from .overlay.geojson import to_geojson
    from .pipeline import DEMO_NOTE, RunSpec, collect, prepare, run
    from .result import save_result
    from .slide import open_slide

    cfg = job.config
    files = outputs(job.out, job.slide_id)
    if not Path(job.out).is_dir():
        raise FileNotFoundError(f"{job.out}: the output folder does not exist")
    files["done"].unlink(missing_ok=True)  # the old marker never vouches for new files
    if torch.get_num_threads() != job.threads:
        torch.set_num_threads(job.threads)
    tune_for_batches()  # a worker process runs batch after batch (see _malloc)
    t = time.perf_counter()
    encoder, model, card, model_name = _models(cfg, job.config_hash)
    spec = RunSpec(encoder=encoder, patch_um=cfg.patch_um, mag=cfg.mag,
                   min_tissue=cfg.min_tissue, batch_size=cfg.batch_size, device=cfg.device,
                   workers=cfg.readers, model_name=model_name, slide_id=job.slide_id)
    with open_slide(job.slide, mpp=cfg.mpp, remember_mpp=False) as slide:
        seconds["open"] = time.perf_counter() - t
        t = time.perf_counter()
        # the encoder checked against the model, the patch size the card asks for
        spec.encoder, spec.grid = prepare(slide, spec, card)
        seconds["tissue"] = time.perf_counter() - t
        bag, result = collect(run(slide, model, card, spec))
    seconds["extract"] = float(bag.meta["timings"]["extract"])
    seconds["attend"] = float(result.timings["attend"])
    if DEMO_NOTE in result.meta.get("notes", []):  # the row's message says it too
        warnings.warn(f"{job.slide}: {DEMO_NOTE}", UserWarning, stacklevel=2)
    if cfg.source is not None and cfg.source not in result.sources:
        raise ValueError(f"{model_name}: no attention source {cfg.source!r}; this model has "
                         f"{', '.join(result.sources)}")
    t = time.perf_counter()
    result.slide = job.slide
    result.timings.update({k: float(v) for k, v in seconds.items()})
    result.meta.update(bag=str(files["bag"]), fingerprint=job.fingerprint,
                       config_hash=job.config_hash)
    save_bag(bag, files["bag"], slide=job.slide)
    save_result(result, files["result"])
    to_geojson(result, files["geojson"], source=cfg.source, top_k=cfg.top_k)
    write_heatmap_tiff(result, files["heatmap"], source=cfg.source, method=cfg.method)
    write_sidecar(files["sidecar"], result, source=cfg.source, method=cfg.method,
                  bag_source=str(files["bag"]), result_path=files["result"],
                  topk={"k": cfg.top_k},
                  extra={"slide": job.slide, "result": str(files["result"]),
                         "bag": str(files["bag"]), "geojson": str(files["geojson"]),
                         "heatmap_tiff": str(files["heatmap"]),
                         "config": cfg.to_dict(), "config_hash": job.config_hash})
    seconds["export"] = time.perf_counter() - t
    row.status = "ok"
    row.predicted = result.predicted_class
    row.probabilities = {c: round(float(p), 6)
                         for c, p in zip(result.classes, result.probabilities, strict=True)}
    row.n_patches = int(result.n)
    bad = int(bag.meta.get("bad_tiles", 0) or 0)
    if bad:
        row.message = (f"{bad} unreadable tile(s) read as placeholders: the patches on them "
                       "have unreliable features")
    return row


def _write_marker(job: Job, row: Row) -> None:
    """The ``.done.json`` marker: fingerprint, config hash, output sizes, the row."""
    files = outputs(job.out, job.slide_id)
    fp = fingerprint(job.slide)
    doc = {"format": "napari-milview-cohort-done", "version": COHORT_FORMAT,
           "slide": job.slide, "slide_id": job.slide_id, "fingerprint": fp,
           "config_hash": job.config_hash, "config": job.config.to_dict(),
           "outputs": {k: files[k].stat().st_size for k in OUTPUTS},
           "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "row": asdict(row)}
    text = json.dumps(doc, indent=1, default=str)
    atomic_write(files["done"], lambda tmp: tmp.write_text(text, encoding="utf-8"))


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
def _previous_rows(path: Path, planned: set[str]) -> list[dict[str, str]]:
    """Rows of an existing summary whose slide is not part of this run."""
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            return [r for r in csv.DictReader(fh) if r.get("slide") not in planned]
    except (OSError, csv.Error, UnicodeDecodeError):
        return []


def _write_summary(path: Path, rows: list[dict[str, str]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(SUMMARY_COLUMNS), extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    text = buf.getvalue()
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def _skipped_row(job: Job) -> Row:
    marker = _read_marker(job.path("done")) or {}
    d = marker.get("row") if isinstance(marker.get("row"), dict) else {}
    row = Row.from_dict({**d, "slide": job.slide, "slide_id": job.slide_id,
                         "status": "ok"}) if d else Row(job.slide, job.slide_id, "ok")
    row.skipped = True
    return row


def _client(scheduler: str | None, workers: int, threads_per_worker: int):
    """(client, cluster or None): a LocalCluster of processes on loopback, or a connection."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler is not None:
        try:
            return Client(scheduler, timeout="20s"), None
        except (OSError, TimeoutError) as e:
            raise ValueError(f"cannot reach the dask scheduler at {scheduler}: {e}") from None
    t = str(threads_per_worker)
    # distributed's default MALLOC_TRIM_THRESHOLD_=65536 makes glibc mmap every large block:
    # torch CPU inference ran 2x slower with it here (bench/cohort.py), so it is left out
    env = {"OMP_NUM_THREADS": t, "MKL_NUM_THREADS": t, "OPENBLAS_NUM_THREADS": t}
    with dask.config.set({"distributed.scheduler.allowed-failures": ALLOWED_FAILURES,
                          "distributed.nanny.pre-spawn-environ": env}), _sigint_ignored():
        # the worker processes inherit SIGINT ignored: Ctrl-C in a terminal signals the whole
        # process group, and only this process acts on it (it closes the cluster); workers
        # would each print a KeyboardInterrupt traceback
        cluster = LocalCluster(n_workers=workers, threads_per_worker=threads_per_worker,
                               processes=True, host="127.0.0.1", dashboard_address=None,
                               silence_logs=logging.ERROR)  # a lost task is in its row
    return Client(cluster), cluster


@contextlib.contextmanager
def _sigint_ignored():
    """SIGINT ignored while the block runs (in the main thread; elsewhere a no-op), so the
    processes started in it inherit the ignore (it survives exec, and neither Python nor
    asyncio replaces an ignored SIGINT). A Ctrl-C during the cluster's start-up (seconds) is
    therefore lost; one after it interrupts the run."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def run_cohort(inputs: Iterable[str | os.PathLike], out: str | os.PathLike,
               config: CohortConfig, *, scheduler: str | None = None,
               workers: int | None = None, threads_per_worker: int = 1,
               progress: Callable[[Row | None, int, int], None] | None = None) -> Report:
    """Process every slide not yet done, one dask task each, and write ``out/summary.csv``.

    Parameters
    ----------
    inputs
        Slide paths, glob patterns, CSV files with a ``slide`` column.
    out
        Output folder (created if missing).
    config
        Encoder, model and everything else that decides the outputs.
    scheduler
        Address of a running dask scheduler (``tcp://host:8786``); default: start a
        ``LocalCluster`` of worker processes on 127.0.0.1 for this run.
    workers
        Worker processes of the local cluster (default: ``cpu_count // threads_per_worker``,
        at most one per slide to run). Not with ``scheduler``.
    threads_per_worker
        Threads per worker, and torch threads per task.
    progress
        Called in this process with ``(None, 0, to_run)`` once the tasks are submitted, then
        after every finished slide with ``(row, finished, to_run)``.

    Returns
    -------
    Report
    """
    from distributed import as_completed

    t0 = time.perf_counter()
    if scheduler is not None and workers is not None:
        raise ValueError("give either a scheduler address or a number of workers, not both")
    if (workers is not None and workers < 1) or threads_per_worker < 1:
        raise ValueError("workers and threads_per_worker must be >= 1")
    jobs = plan(inputs, out, config, threads=threads_per_worker)
    out = Path(jobs[0].out)
    summary = out / SUMMARY
    previous = _previous_rows(summary, {j.slide for j in jobs})
    rows: dict[str, Row] = {j.slide: _skipped_row(j) for j in jobs if j.skip}
    todo = [j for j in jobs if not j.skip]

    def flush() -> None:
        ordered = [rows[j.slide].to_csv() for j in jobs if j.slide in rows]
        _write_summary(summary, previous + ordered)

    flush()
    t_start = t_proc = time.perf_counter()
    seconds_startup = seconds_processing = 0.0
    if todo:
        for j in todo:
            _remove_temps(j)
        n = workers or max(1, min(len(todo), (os.cpu_count() or 1) // threads_per_worker))
        client, cluster = _client(scheduler, n, threads_per_worker)
        try:
            seconds_startup = time.perf_counter() - t_start
            t_proc = time.perf_counter()
            token = hashlib.sha1(f"{time.time_ns()}{os.getpid()}".encode()).hexdigest()[:8]
            futures = {client.submit(process_slide, j, key=f"milview-{j.slide_id}-{token}",
                                     retries=2, pure=False): j for j in todo}
            if progress is not None:
                progress(None, 0, len(todo))
            for finished, fut in enumerate(as_completed(futures), start=1):
                job = futures[fut]
                try:
                    row = fut.result()
                except Exception as e:  # noqa: BLE001 - e.g. KilledWorker after N deaths
                    row = Row(job.slide, job.slide_id, "error",
                              message=_one_line(e, job.slide))
                rows[job.slide] = row
                flush()
                if progress is not None:
                    progress(row, finished, len(todo))
            seconds_processing = time.perf_counter() - t_proc
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
        for j in todo:
            _remove_temps(j)
    ordered = [rows[j.slide] for j in jobs]
    processed = [r for r in ordered if not r.skipped]
    rate = len(processed) / seconds_processing * 3600 if seconds_processing > 0 else 0.0
    return Report(total=len(jobs), done=sum(r.ok for r in processed),
                  skipped=sum(r.skipped for r in ordered),
                  failed=sum(not r.ok for r in processed), seconds=time.perf_counter() - t0,
                  seconds_startup=seconds_startup, seconds_processing=seconds_processing,
                  slides_per_hour=rate, summary=summary, rows=ordered)

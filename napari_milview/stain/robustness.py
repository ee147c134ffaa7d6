"""The staining-robustness protocol on one slide: re-encode under each condition, re-run the model.

For every condition (``reference/algorithms.md`` 5.1, CTPLab's step 3, plus our extra
conditions) the bag's patches are read again, perturbed per pixel by the condition (after the
resize to the encoder's patch size, before its normalisation: ``pipeline.extract_bag``'s
``transform``), encoded, and the MIL model is run on the new bag. The report gives:

* the prediction under each condition (probabilities [C], predicted class) and, per class,
  the min-max range of the probability across conditions (the protocol's robustness measure
  on one slide; 0 = no change);
* the **attention stability** per patch: the spread (max - min) across conditions of the
  rank-percentile attention (CLAM's ``rank`` normalisation, in (0, 1]); 0 = the patch keeps
  its rank under every condition, 0.5 = it moved by half the bag;
* the **top-K overlap** of each condition with the reference (Jaccard index of the K most
  attended patches, 1 = the same patches).

Features are cached per condition: in memory (bounded, :data:`MEMORY_CACHE_BYTES`) and, with
``cache_dir``, as our bag h5 (``features.milview_h5``) named by a key over the slide's
fingerprint (``_io.fingerprint``), the patch grid, the condition's token (its name and
every parameter, including the slide's stain estimate) and the encoder (spec and weights), so
a second run re-uses them and only re-runs the (fast) MIL model.

>>> gen = robustness(slide, grid, encoder, model, card)        # doctest: +SKIP
>>> report = collect(gen, print)                               # doctest: +SKIP
>>> report.summary()["range"]                                  # doctest: +SKIP
{'normal': 0.012, 'lesion': 0.012}

Qt-free; torch is imported inside the functions (through the pipeline).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import threading
import warnings
from collections import OrderedDict
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..pipeline import Cancelled, Progress
from .perturb import Perturbation

if TYPE_CHECKING:  # pragma: no cover
    from ..features.bag import Bag
    from ..result import Result

__all__ = ["DEFAULT_CONDITIONS", "MEMORY_CACHE_BYTES", "TOP_K", "RobustnessProgress",
           "RobustnessReport", "build_condition", "clear_cache", "robustness"]

#: the protocol's conditions: the reference and the four simulated ones
DEFAULT_CONDITIONS = ("reference", "low-intensity", "high-intensity", "low-similarity",
                      "high-similarity")
#: K of the top-K overlap
TOP_K = 20
#: the in-memory feature cache holds at most this many bytes of features (least recently
#: used bags are dropped first)
MEMORY_CACHE_BYTES = 512 << 20
#: ``format`` of the JSON report
FORMAT_NAME = "napari-milview-robustness"
#: what the stability values are
STABILITY = "max - min across conditions of the rank-percentile attention"

_cache: OrderedDict[str, Bag] = OrderedDict()
_cache_lock = threading.Lock()


def clear_cache() -> None:
    """Forget every bag held in memory (the files in a ``cache_dir`` stay)."""
    with _cache_lock:
        _cache.clear()


# --------------------------------------------------------------------------------------------
# conditions
# --------------------------------------------------------------------------------------------
def build_condition(name: str, stain, *, ratio: float | Sequence[float] | None = None,
                    angle_factor: float | None = None, sigma: float | None = None,
                    seed: int = 0, reference=None, library=None) -> Perturbation:
    """A named condition, optionally with its main parameter changed.

    Parameters
    ----------
    name : str
        One of :data:`~napari_milview.stain.CONDITIONS`.
    stain : SlideStain or None
        The slide's staining (None only for ``reference``).
    ratio : float or (float, float), optional
        ``low-intensity`` / ``high-intensity``: the H and E concentration ratio(s) instead of
        the preset (or the PLISM value).
    angle_factor : float, optional
        ``low-similarity`` / ``high-similarity``: the H-E angle is multiplied by this
        (``conditions.scale_he_angle``) instead of the preset.
    sigma : float, optional
        ``hed-light`` / ``hed-strong``: the jitter's sigma instead of the preset.
    seed : int
        Seed of the HED draw.
    reference, library
        As in :func:`~napari_milview.stain.make_condition` (``macenko``/``reinhard`` target;
        PLISM folder of the protocol's four conditions).

    A parameter that does not belong to ``name`` is ignored.

    Returns
    -------
    Perturbation
        ``[..., 3] uint8 -> same``.
    """
    from .conditions import make_condition, scale_he_angle
    from .hed import hed_jitter
    from .perturb import StainPerturbation

    if name in ("low-intensity", "high-intensity") and ratio is not None:
        r = np.broadcast_to(np.asarray(ratio, np.float64), (2,))
        return StainPerturbation(name, stain.matrix, stain.i0, ratio=r,
                                 params={"preset": False})
    if name in ("low-similarity", "high-similarity") and angle_factor is not None:
        target = scale_he_angle(stain.matrix, float(angle_factor))
        return StainPerturbation(name, stain.matrix, stain.i0, target=target,
                                 params={"preset": False, "angle_factor": float(angle_factor)})
    if name in ("hed-light", "hed-strong") and sigma is not None:
        return hed_jitter(float(sigma), seed=seed, i0=stain.i0, name=name)
    return make_condition(name, stain, reference=reference, library=library, seed=seed)


def _names(conditions) -> list:
    """Conditions (names or perturbations) as a list, ``reference`` first, names unique."""
    from .conditions import CONDITIONS

    items = list(conditions)
    if not items:
        raise ValueError("robustness: no conditions given")
    names = []
    for c in items:
        if isinstance(c, Perturbation):
            names.append(c.name)
        elif isinstance(c, str) and c in CONDITIONS:
            names.append(c)
        else:
            raise ValueError(f"robustness: unknown condition {c!r}; choose from "
                             f"{', '.join(CONDITIONS)}")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"robustness: condition(s) given twice: {', '.join(dup)}")
    if "reference" in names:
        i = names.index("reference")
        items.insert(0, items.pop(i))
    else:
        items.insert(0, "reference")
    return items


# --------------------------------------------------------------------------------------------
# cache keys
# --------------------------------------------------------------------------------------------
def _encoder_id(encoder) -> str:
    """Hash of an encoder's spec and weights (names, shapes, the first 4096 values of each)."""
    h = hashlib.sha1(repr(encoder.spec).encode())
    for name, t in encoder.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}{t.dtype}".encode())
        flat = t.detach().reshape(-1)[:4096]
        h.update(flat.float().cpu().numpy().tobytes() if flat.is_floating_point()
                 else flat.cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def _grid_id(grid) -> str:
    h = hashlib.sha1(np.ascontiguousarray(grid.coords, np.int64).tobytes())
    h.update(json.dumps([int(grid.patch_size_level0), int(grid.read_level),
                         int(grid.read_size), int(grid.patch_px)]).encode())
    return h.hexdigest()[:16]


def _slide_id(slide) -> str:
    from .._io import fingerprint

    try:
        fp = fingerprint(slide.path)
    except (OSError, TypeError):  # not a file: no disk cache key across processes
        return f"mem-{id(slide)}"
    return fp["sha256"][:16] + f"-{fp['size']}-{fp['mtime_ns']}"


def _cache_key(slide_id: str, grid_id: str, encoder_id: str, pert: Perturbation) -> str:
    raw = json.dumps([slide_id, grid_id, encoder_id, pert.name, pert.token])
    return hashlib.sha1(raw.encode()).hexdigest()[:20]


def _remember(key: str, bag: Bag) -> None:
    with _cache_lock:
        _cache[key] = bag
        _cache.move_to_end(key)
        while len(_cache) > 1 and sum(b.features.nbytes for b in _cache.values()) > \
                MEMORY_CACHE_BYTES:
            _cache.popitem(last=False)


def _cache_file(cache_dir, slide, name: str, key: str) -> Path:
    stem = Path(str(getattr(slide, "path", "slide"))).name.split(".")[0] or "slide"
    return Path(cache_dir) / f"{stem}.{name}.{key}.h5"


def _lookup(key: str, path: Path | None, grid) -> tuple[Bag | None, str]:
    """(bag, "memory" / "disk") from the caches, (None, "") on a miss."""
    with _cache_lock:
        bag = _cache.get(key)
        if bag is not None:
            _cache.move_to_end(key)
            return bag, "memory"
    if path is None or not path.is_file():
        return None, ""
    from ..features.milview_h5 import read_milview_h5

    try:
        bag = read_milview_h5(path)
    except (OSError, ValueError):  # unreadable or truncated: extract again, overwrite it
        return None, ""
    if bag.n != len(grid) or not np.array_equal(bag.coords, grid.coords):
        return None, ""
    _remember(key, bag)
    return bag, "disk"


# --------------------------------------------------------------------------------------------
# the run
# --------------------------------------------------------------------------------------------
@dataclass
class RobustnessProgress(Progress):
    """One step of a robustness run (a :class:`~napari_milview.pipeline.Progress`).

    ``done`` / ``total`` count patches over all conditions (``total`` = conditions x N);
    ``stage`` is ``"stain"`` (estimating the slide's staining), ``"extract"`` or ``"attend"``.

    Attributes
    ----------
    condition : str
        The condition being run ('' while estimating the stain).
    index, n_conditions : int
        Its position (0-based) and how many conditions there are.
    result : Result or None
        Set on the ``"attend"`` step: the model's result under ``condition``.
    cache : str
        Where the condition's features came from: ``"extracted"``, ``"memory"``, ``"disk"``.
    """

    condition: str = ""
    index: int = 0
    n_conditions: int = 0
    result: Any = None
    cache: str = ""


def robustness(slide: Any, grid: Any, encoder: Any, model: Any, card: Any,
               conditions: Sequence[str | Perturbation] = DEFAULT_CONDITIONS, *,
               stain=None, reference=None, library=None, seed: int = 0,
               source: str | None = None, top_k: int = TOP_K, batch_size: int = 64,
               device: Any = "auto", workers: int = 2, cancel: threading.Event | None = None,
               cache_dir: str | os.PathLike | None = None, model_name: str | None = None,
               ) -> Generator[RobustnessProgress, None, RobustnessReport]:
    """Run the model under each staining condition: a generator of progress, returning a report.

    Parameters
    ----------
    slide : napari_milview.slide.Slide
        The open slide.
    grid : PatchGrid
        ``coords`` [N, 2] level-0 (x, y); every condition encodes the same patches.
    encoder : torch.nn.Module
        From ``features.encoders.build_encoder`` (has ``.spec``).
    model, card : MILModel, ModelCard
        From ``mil.checkpoint.load_model``.
    conditions : sequence of str or Perturbation
        Names from :data:`~napari_milview.stain.CONDITIONS` (built with
        :func:`build_condition` and ``reference`` / ``library`` / ``seed``) or ready
        perturbations (e.g. with changed parameters); ``reference`` is added first when
        missing (everything is compared with it). Default :data:`DEFAULT_CONDITIONS`.
    stain : SlideStain, optional
        The slide's staining; estimated (``estimate_slide``, cached) when a named condition
        needs it.
    source : str, optional
        Attention source of the stability and top-K (default: the model's default source).
    top_k : int
        K of the top-K Jaccard index (capped at N).
    batch_size, device, workers
        As in :func:`~napari_milview.pipeline.extract_bag`.
    cancel : threading.Event, optional
        Checked between batches and conditions; set -> :class:`~napari_milview.pipeline.
        Cancelled`.
    cache_dir : path, optional
        Folder for the per-condition bag files (created if missing).
    model_name : str, optional
        Stored in the results (the checkpoint, or ``"demo"``).

    Yields
    ------
    RobustnessProgress
        ``"stain"`` (when estimating), then per condition its ``"extract"`` steps (one per
        batch; one step when the features come from a cache) and one ``"attend"`` step with
        the condition's :class:`~napari_milview.result.Result`.

    Returns
    -------
    RobustnessReport
    """
    from ..features.milview_h5 import save_bag
    from ..pipeline import RunSpec, run, tap
    from .estimate import estimate_slide

    items = _names(conditions)
    if int(top_k) != top_k or top_k < 1:
        raise ValueError(f"robustness: top_k must be a whole number >= 1, got {top_k!r}")
    n = len(grid)
    k_cond = len(items)
    total = k_cond * n

    def check_cancel() -> None:
        if cancel is not None and cancel.is_set():
            raise Cancelled(f"{getattr(slide, 'path', 'slide')}: robustness run cancelled")

    if stain is None and any(isinstance(c, str) and c != "reference" for c in items):
        yield RobustnessProgress("stain", 0, total, message="estimating the slide's staining",
                                 n_conditions=k_cond)
        stain = estimate_slide(slide)
        check_cancel()
    perts = [c if isinstance(c, Perturbation) else
             build_condition(c, stain, reference=reference, library=library, seed=seed)
             for c in items]
    sid, gid, eid = _slide_id(slide), _grid_id(grid), _encoder_id(encoder)
    folder = None
    if cache_dir is not None:
        folder = Path(cache_dir)
        folder.mkdir(parents=True, exist_ok=True)
    results: dict[str, Result] = {}
    where: dict[str, str] = {}
    for i, pert in enumerate(perts):
        check_cancel()
        key = _cache_key(sid, gid, eid, pert)
        path = None if folder is None else _cache_file(folder, slide, pert.name, key)
        bag, hit = _lookup(key, path, grid)
        step = {"condition": pert.name, "index": i, "n_conditions": k_cond}
        # the one run path: the condition's patches encoded (or its cached bag), the model
        spec = RunSpec(bag=bag, encoder=encoder, grid=grid, batch_size=batch_size,
                       device=device, workers=workers, model_name=model_name,
                       transform=None if pert.is_identity else pert)
        if bag is None:
            hit = "extracted"
        else:
            yield RobustnessProgress("extract", (i + 1) * n, total,
                                     message=f"{pert.name} ({i + 1}/{k_cond}): features from "
                                             f"the {hit} cache", cache=hit, **step)

        def progress(p, i=i, pert=pert, hit=hit, step=step):
            if p.stage != "extract":
                return None
            msg = f"{pert.name} ({i + 1}/{k_cond})" + (f": {p.message}" if p.message else "")
            return RobustnessProgress("extract", i * n + p.done, total, p.features, p.indices,
                                      msg, cache=hit, **step)

        bag, r = yield from tap(run(slide, model, card, spec, cancel), progress)
        if hit == "extracted":
            bag.meta["condition"] = pert.name
            bag.meta["condition_params"] = pert.params
            _remember(key, bag)
            if path is not None:
                save_bag(bag, path, slide=getattr(slide, "path", None))
        r.meta.update(condition=pert.name, features=hit)
        results[pert.name] = r
        where[pert.name] = hit
        yield RobustnessProgress("attend", (i + 1) * n, total,
                                 message=f"{pert.name}: {r.decision}",
                                 result=r, cache=hit, **step)
    return RobustnessReport.from_results(
        results, source=source, top_k=int(top_k), cache=where,
        params={p.name: p.params for p in perts},
        stain=None if stain is None else stain.to_dict())


# --------------------------------------------------------------------------------------------
# the report
# --------------------------------------------------------------------------------------------
def _jaccard(a: np.ndarray, b: np.ndarray) -> float:
    sa, sb = set(a.tolist()), set(b.tolist())
    return 1.0 if not sa and not sb else len(sa & sb) / len(sa | sb)


@dataclass
class RobustnessReport:
    """Predictions and attention of one slide under each staining condition.

    Attributes
    ----------
    conditions : list[str]
        K condition names, ``reference`` first.
    classes : list[str]
        C class names.
    probabilities : np.ndarray
        [K, C] float32, row k = the model's probabilities under ``conditions[k]``.
    stability : np.ndarray
        [N] float32 in [0, 1): per patch, :data:`STABILITY` (0 = stable), bag order.
    jaccard : dict[str, float]
        Condition -> Jaccard index of its top-K patches with the reference's (1 = same).
    results : dict[str, Result]
        Condition -> the full result (every attention source).
    source : str
        The attention source of ``stability`` and ``jaccard``.
    top_k : int
        K actually used (at most N).
    cache : dict[str, str]
        Condition -> where its features came from (``extracted``, ``memory``, ``disk``).
    params : dict[str, dict]
        Condition -> its perturbation's parameters.
    stain : dict or None
        The slide's stain estimate (``SlideStain.to_dict``).
    """

    conditions: list[str]
    classes: list[str]
    probabilities: np.ndarray
    stability: np.ndarray
    jaccard: dict[str, float]
    results: dict[str, Any]
    source: str
    top_k: int
    cache: dict[str, str] = field(default_factory=dict)
    params: dict[str, dict] = field(default_factory=dict)
    stain: dict | None = None

    @classmethod
    def from_results(cls, results: dict[str, Result], *, source: str | None = None,
                     top_k: int = TOP_K, **kw) -> RobustnessReport:
        """The report of per-condition results (same bag; the first one is the reference).

        Parameters
        ----------
        results : dict
            Condition -> :class:`~napari_milview.result.Result`, all over the same coords.
        """
        from ..overlay.normalise import normalise
        from ..overlay.topk import select

        names = list(results)
        ref = results[names[0]]
        for name, r in results.items():
            if r.n != ref.n or not np.array_equal(r.coords, ref.coords):
                raise ValueError(f"robustness: the {name!r} result is not over the same "
                                 "patches as the reference")
        src = ref.default_source if source is None else source
        k = min(int(top_k), ref.n)
        att = {name: r.attention(src) for name, r in results.items()}
        ranks = np.stack([normalise(a, "rank") for a in att.values()])  # [K, N]
        with warnings.catch_warnings():  # a patch without any score stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            stability = (np.nanmax(ranks, 0) - np.nanmin(ranks, 0)).astype(np.float32)
        top_ref = select(att[names[0]], k, "top")
        jaccard = {name: _jaccard(top_ref, select(a, k, "top")) for name, a in att.items()}
        probs = np.stack([r.probabilities for r in results.values()]).astype(np.float32)
        return cls(conditions=names, classes=list(ref.classes), probabilities=probs,
                   stability=stability, jaccard=jaccard, results=dict(results), source=src,
                   top_k=k, **kw)

    # -- numbers ---------------------------------------------------------------------------
    @property
    def reference(self) -> Result:
        """The reference condition's result."""
        return self.results[self.conditions[0]]

    @property
    def predicted(self) -> np.ndarray:
        """[K] int64, the most probable class index under each condition (the argmax: for
        independent per-class scores the decision is in :meth:`rows`)."""
        return np.argmax(self.probabilities, axis=1).astype(np.int64)

    @property
    def prob_range(self) -> np.ndarray:
        """[C] float32, per class max - min of the probability across conditions (>= 0)."""
        return self.probabilities.max(0) - self.probabilities.min(0)

    def range_dict(self) -> dict[str, dict[str, float]]:
        """Class -> ``{"min", "max", "range"}`` of its probability across conditions."""
        lo, hi = self.probabilities.min(0), self.probabilities.max(0)
        return {c: {"min": float(lo[i]), "max": float(hi[i]), "range": float(hi[i] - lo[i])}
                for i, c in enumerate(self.classes)}

    def _decided(self, k: int) -> tuple[int | None, str]:
        """(index, name) of what condition k predicts: its result's decision (independent
        per-class scores are decided against their thresholds), else the argmax."""
        r = self.results.get(self.conditions[k])
        if r is not None:
            return r.predicted, r.predicted_class
        p = int(self.predicted[k])
        return p, self._cls(p)

    def rows(self) -> list[dict]:
        """One dict per condition: ``condition``, ``classes``, ``probabilities``,
        ``predicted`` (index; None when no class of independent scores is positive),
        ``predicted_class`` (:attr:`Result.predicted_class`), ``jaccard``, ``features``."""
        out = []
        for k, name in enumerate(self.conditions):
            p, label = self._decided(k)
            out.append({"condition": name, "classes": list(self.classes),
                        "probabilities": [float(v) for v in self.probabilities[k]],
                        "predicted": p, "predicted_class": label,
                        "jaccard": float(self.jaccard[name]), "top_k": self.top_k,
                        "features": self.cache.get(name, "")})
        return out

    def _cls(self, i: int) -> str:
        return self.classes[i] if i < len(self.classes) else str(i)

    def summary(self) -> dict:
        """``{"range": {class: max - min}, "jaccard": {condition: J}, "stability": {...},
        "predicted_changes", "conditions", "source", "top_k"}`` (plain Python)."""
        s = self.stability[np.isfinite(self.stability)]
        stats = ({"mean": float(s.mean()), "median": float(np.median(s)),
                  "max": float(s.max())} if s.size else {"mean": None, "median": None,
                                                         "max": None})
        return {"range": {c: float(r) for c, r in zip(self.classes, self.prob_range)},
                "jaccard": {k: float(v) for k, v in self.jaccard.items()},
                "stability": {**stats, "what": STABILITY},
                "predicted_changes": bool(len({self._decided(k)[1]
                                               for k in range(len(self.conditions))}) > 1),
                "conditions": list(self.conditions), "source": self.source,
                "top_k": self.top_k}

    def stability_result(self) -> Result:
        """The stability as a :class:`~napari_milview.result.Result` with one source,
        ``"stability"`` [N] (for ``overlay.heatmap_layer``: same coords and extent)."""
        from ..result import Result

        ref = self.reference
        return Result(coords=ref.coords, patch_size_level0=ref.patch_size_level0,
                      sources={"stability": self.stability}, default_source="stability",
                      classes=ref.classes, logits=ref.logits, probabilities=ref.probabilities,
                      arch=ref.arch, mpp=ref.mpp, slide=ref.slide, slide_id=ref.slide_id,
                      encoder=ref.encoder, model=ref.model, device=ref.device,
                      thresholds=ref.thresholds, thresholds_assumed=ref.thresholds_assumed,
                      meta={"what": STABILITY, "attention_source": self.source,
                            "conditions": list(self.conditions)})

    # -- files -----------------------------------------------------------------------------
    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write the table atomically: one row per condition (``condition``,
        ``predicted``, ``p_<class>`` ..., ``jaccard_top<K>``, ``features``), then a last row
        ``min-max range`` with each class's range. Returns the path."""
        from .._io import atomic_write

        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        jcol = f"jaccard_top{self.top_k}"
        w.writerow(["condition", "predicted", *(f"p_{c}" for c in self.classes), jcol,
                    "features"])
        for row in self.rows():
            w.writerow([row["condition"], row["predicted_class"],
                        *(f"{v:.6f}" for v in row["probabilities"]),
                        f"{row['jaccard']:.4f}", row["features"]])
        w.writerow(["min-max range", "", *(f"{v:.6f}" for v in self.prob_range), "", ""])
        text = buf.getvalue()
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))

    def to_dict(self) -> dict:
        """Everything as plain Python (what :meth:`to_json` writes)."""
        ref = self.reference
        return {"format": FORMAT_NAME, "version": 1, "slide": ref.slide,
                "slide_id": ref.slide_id, "model": ref.model, "arch": ref.arch,
                "encoder": ref.encoder, "classes": list(self.classes),
                "source": self.source, "top_k": self.top_k,
                "conditions": [{**row, "params": self.params.get(row["condition"], {})}
                               for row in self.rows()],
                "range": self.range_dict(), "summary": self.summary(), "stain": self.stain,
                "patch_size_level0": ref.patch_size_level0, "mpp": ref.mpp,
                "coords": ref.coords.tolist(),
                "stability": [None if not np.isfinite(v) else round(float(v), 6)
                              for v in self.stability]}

    def to_json(self, path: str | os.PathLike) -> Path:
        """Write :meth:`to_dict` as JSON atomically; returns the path."""
        from .._io import atomic_write

        text = json.dumps(self.to_dict(), default=_json_default) + "\n"
        return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def _json_default(o):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    return str(o)

"""One slide's evidence: every metric of every attention source, as rows for CSV / JSON.

>>> rep = evaluate(result, "slide.xml", model=model, bag=bag)        # doctest: +SKIP
>>> rep.to_row()["auroc"], rep.to_row()["deletion_auc"]                # doctest: +SKIP

:func:`evaluate` measures localisation against the annotation (patch labels: overlap >=
``fraction``), concentration, and - with the model and the bag's cached features -
deletion / insertion faithfulness, for each source of the result. With other checkpoints of
the same model (``folds``) it adds their disagreement (:func:`add_disagreement`), with a
file of regions (``what_if``) the prediction without each region and from it alone
(:func:`add_what_if`). The model and bag of a result written by ``milview attend`` /
``milview run`` are found with :func:`model_for` and :func:`bag_for`. :func:`summarise`
reduces many slides to the mean / median of each metric.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .faithfulness import deletion_insertion, descending
from .metrics import concentration, localisation, softmax

__all__ = ["ROW_COLUMNS", "SUMMARY_METRICS", "WHAT_IF_COLUMNS", "EvidenceReport",
           "add_disagreement", "add_what_if", "bag_for", "concentration_input", "evaluate",
           "model_for", "slide_stem", "summarise", "write_summary"]

#: The columns of :meth:`EvidenceReport.to_row` (CSV order).
ROW_COLUMNS = ("slide", "source", "n", "n_positive", "fraction", "auroc", "average_precision",
               "topk_precision", "k", "mass_inside", "dice", "dice_threshold", "dice_rule",
               "entropy", "effective_n", "normalised_entropy", "top1pct_mass", "topk_mass",
               "target", "baseline", "deletion_auc", "random_deletion_auc", "insertion_auc",
               "random_insertion_auc", "topk_probability", "faithfulness_k", "steps",
               "random_orders", "faithfulness_path", "folds", "prediction_mean",
               "prediction_std", "prediction_range", "rank_spread_mean", "rank_spread_p95",
               "spearman_mean", "what_if_regions", "what_if_without", "what_if_alone",
               "what_if_change", "note")
#: The numbers :func:`summarise` reduces over slides.
SUMMARY_METRICS = ("auroc", "average_precision", "topk_precision", "mass_inside", "dice",
                   "entropy", "effective_n", "normalised_entropy", "top1pct_mass",
                   "topk_mass", "deletion_auc", "random_deletion_auc", "insertion_auc",
                   "random_insertion_auc", "topk_probability", "prediction_mean",
                   "prediction_std", "rank_spread_mean", "spearman_mean", "what_if_change")
#: Columns of ``<stem>.what_if.csv`` (one row per region and class).
WHAT_IF_COLUMNS = ("slide", "region", "label", "n_patches", "class", "baseline", "without",
                   "alone", "change_without", "change_alone", "note")


def slide_stem(result: Any, path: str | os.PathLike | None = None) -> str:
    """The name annotations are matched by: the slide file's name up to its first dot, else
    the result's ``slide_id``, else the result file's name without ``.result.h5`` / ``.h5``."""
    if getattr(result, "slide", None):
        return Path(str(result.slide)).name.split(".")[0]
    if getattr(result, "slide_id", None):
        return str(result.slide_id)
    if path is not None:
        name = Path(path).name
        for suffix in (".result.h5", ".h5"):
            if name.endswith(suffix):
                return name[: -len(suffix)]
        return name.split(".")[0]
    return "slide"


def model_for(result: Any, model: str | os.PathLike | None = None):
    """``(model, card)`` that made ``result``: ``model`` when given (a checkpoint or
    ``"demo"``), else ``result.model``.

    Raises
    ------
    ValueError
        When the result does not say which model made it, or its checkpoint is gone.
    """
    from ..mil.checkpoint import load_model

    name = str(model) if model is not None else result.model
    if not name:
        raise ValueError("the result does not name its model: pass the checkpoint (--model) "
                         "or skip faithfulness (--no-faithfulness)")
    if name == "demo":
        from ..assets import demo_model_path

        return load_model(demo_model_path())
    if not Path(name).exists():
        raise ValueError(f"{name}: the result's model checkpoint is not there: pass it "
                         "(--model) or skip faithfulness (--no-faithfulness)")
    return load_model(name, arch=result.arch or None)


def bag_for(result: Any, result_path: str | os.PathLike | None = None,
            bag: str | os.PathLike | None = None):
    """The feature bag ``result`` was computed on: ``bag`` when given, else the result's
    ``meta["bag"]``, else ``<id>.bag.h5`` beside a ``<id>.result.h5`` (``milview run``'s
    layout). Its coordinates must be the result's, in the same order.

    Raises
    ------
    ValueError
        When no bag is found or it does not match the result.
    """
    from ..features.io import load_bag

    cands = []
    if bag is not None:
        cands.append(Path(bag))
    else:
        if result.meta.get("bag"):
            cands.append(Path(str(result.meta["bag"])))
        if result_path is not None:
            p = Path(result_path)
            if p.name.endswith(".result.h5"):
                cands.append(p.with_name(p.name[: -len(".result.h5")] + ".bag.h5"))
    found = next((c for c in cands if c.is_file()), None)
    if found is None:
        tried = ", ".join(str(c) for c in cands) or "nothing recorded"
        raise ValueError(f"no feature bag for {slide_stem(result, result_path)} (tried "
                         f"{tried}): pass it (--bag) or skip faithfulness (--no-faithfulness)")
    b = load_bag(found, patch_size_level0=result.patch_size_level0)
    if b.n != result.n or not np.array_equal(np.asarray(b.coords), result.coords):
        raise ValueError(f"{found}: its {b.n} patches are not the result's {result.n} (another "
                         "slide or another grid)")
    return b


def _overlap(result: Any, annotations: Any, labels: set[str] | None) -> np.ndarray:
    if isinstance(annotations, np.ndarray | list | tuple):
        ov = np.asarray(annotations, dtype=np.float64).reshape(-1)
        if ov.shape[0] != result.n:
            raise ValueError(f"{ov.shape[0]} overlap values for {result.n} patches")
        return ov
    from .annotations import patch_overlap, read_annotations

    ann = annotations if hasattr(annotations, "regions") else read_annotations(annotations)
    return np.asarray(patch_overlap(ann, result.coords, result.patch_size_level0,
                                    labels=labels), dtype=np.float64)


def _patch_labels(overlap: np.ndarray, fraction: float) -> np.ndarray:
    from .annotations import patch_labels

    return np.asarray(patch_labels(overlap, fraction), dtype=bool)


@dataclass
class EvidenceReport:
    """Evidence for one slide.

    Attributes
    ----------
    slide : str
        The slide's stem (:func:`slide_stem`).
    classes : list[str]
    probabilities : list[float]
        The result's slide probabilities [C].
    default_source : str
    fraction : float
        A patch is positive when its overlap with the annotation is >= ``fraction``.
    overlap : np.ndarray
        [N] float64 in [0, 1], fraction of each patch inside the annotation.
    positive : np.ndarray
        [N] bool patch labels.
    sources : dict[str, dict]
        Per source: ``{"localisation": ..., "concentration": ..., "faithfulness": ... or
        None}`` (the dicts of :func:`~.metrics.localisation`, :func:`~.metrics.concentration`
        and :func:`~.faithfulness.deletion_insertion`).
    notes : list[str]
    disagreement : dict[str, dict]
        Per compared source, the :func:`~.disagreement.disagreement` dict of the members
        (empty when no other checkpoint was given; :func:`add_disagreement`).
    members : list[str]
        The members compared, with ``member_probabilities`` [M][C].
    what_if : list[dict]
        :func:`~.faithfulness.what_if_regions` entries, "all" first (:func:`add_what_if`).
    """

    slide: str
    classes: list[str]
    probabilities: list[float]
    default_source: str
    fraction: float
    overlap: np.ndarray
    positive: np.ndarray
    sources: dict[str, dict] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    disagreement: dict[str, dict] = field(default_factory=dict)
    members: list[str] = field(default_factory=list)
    member_probabilities: list[list[float]] = field(default_factory=list)
    what_if: list[dict] = field(default_factory=list)

    @property
    def predicted(self) -> int:
        """Index of the class the result predicts (the per-slide scalars' class)."""
        return int(np.argmax(self.probabilities))

    def to_row(self, source: str | None = None) -> dict[str, Any]:
        """One flat row (:data:`ROW_COLUMNS`) for ``source`` (default: the default source);
        undefined numbers are NaN (``None`` in JSON, see :meth:`json_row`)."""
        name = self.default_source if source is None else source
        ev = self.sources[name]
        loc, con, fa = ev["localisation"], ev["concentration"], ev.get("faithfulness")
        nan = float("nan")
        row = {"slide": self.slide, "source": name, "n": loc["n"],
               "n_positive": loc["n_positive"], "fraction": self.fraction}
        for key in ("auroc", "average_precision", "topk_precision", "k", "mass_inside", "dice",
                    "dice_threshold", "dice_rule"):
            row[key] = loc[key]
        for key in ("entropy", "effective_n", "normalised_entropy", "top1pct_mass",
                    "topk_mass"):
            row[key] = con.get(key, nan)
        for key in ("target", "baseline", "deletion_auc", "random_deletion_auc",
                    "insertion_auc", "random_insertion_auc", "topk_probability", "steps",
                    "random_orders"):
            row[key] = nan if fa is None else fa[key]
        row["faithfulness_k"] = nan if fa is None else fa["k"]
        row["faithfulness_path"] = "" if fa is None else fa["path"]
        c = self.predicted
        dis = self.disagreement.get(name)
        first = next(iter(self.disagreement.values()), None)
        row["folds"] = first["m"] if first is not None else 0
        for key in ("prediction_mean", "prediction_std", "prediction_range"):
            row[key] = float(first[key][c]) if first is not None and key in first else nan
        for key in ("rank_spread_mean", "rank_spread_p95", "spearman_mean"):
            row[key] = dis[key] if dis is not None else nan
        whole = self.what_if[0] if self.what_if else None
        row["what_if_regions"] = len(self.what_if) - 1 if whole is not None else 0
        for key, col in (("without", "what_if_without"), ("alone", "what_if_alone"),
                         ("change_without", "what_if_change")):
            v = None if whole is None else whole[key]
            row[col] = nan if v is None else float(v[c])
        row["note"] = "; ".join(n for n in [loc.get("note", ""), con.get("note", ""),
                                            *self.notes] if n)
        return {k: row[k] for k in ROW_COLUMNS}

    def rows(self) -> list[dict[str, Any]]:
        """:meth:`to_row` of every source, the default source first."""
        names = [self.default_source, *[s for s in self.sources if s != self.default_source]]
        return [self.to_row(s) for s in names]

    def json_row(self, source: str | None = None) -> dict[str, Any]:
        """:meth:`to_row` with NaN as None and numbers rounded to 6 significant digits."""
        return {k: _jsonable(v) for k, v in self.to_row(source).items()}

    def json_details(self) -> dict[str, Any]:
        """The per-class detail the flat row leaves out, JSON-ready: ``fold_members``
        (``[{"name", "probabilities" [C]}]``), ``fold_prediction_mean`` and
        ``fold_prediction_std`` [C] when checkpoints were compared; ``what_if`` (the
        :func:`~.faithfulness.what_if_regions` entries, lists [C] or None) when regions
        were given."""
        out: dict[str, Any] = {}
        if self.disagreement:
            first = next(iter(self.disagreement.values()))
            out["fold_members"] = [{"name": n, "probabilities": [_jsonable(float(v))
                                                                 for v in p]}
                                   for n, p in zip(self.members, self.member_probabilities,
                                                   strict=True)]
            out["fold_prediction_mean"] = _jsonable_list(first["prediction_mean"])
            out["fold_prediction_std"] = _jsonable_list(first["prediction_std"])
        if self.what_if:
            out["what_if"] = [{k: (_jsonable_list(v) if isinstance(v, np.ndarray)
                                   else _jsonable(v)) for k, v in e.items()}
                              for e in self.what_if]
        return out

    def what_if_rows(self) -> list[dict[str, Any]]:
        """:data:`WHAT_IF_COLUMNS` rows: one per region (``all`` first) and class."""
        nan = float("nan")
        rows = []
        for e in self.what_if:
            for j, cls in enumerate(self.classes or [str(i) for i in
                                                     range(len(e["baseline"]))]):
                rows.append({"slide": self.slide, "region": e["region"], "label": e["label"],
                             "n_patches": e["n_patches"], "class": cls, "note": e["note"],
                             **{k: (nan if e[k] is None else float(e[k][j]))
                                for k in ("baseline", "without", "alone", "change_without",
                                          "change_alone")}})
        return rows

    def what_if_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`what_if_rows` as CSV (atomically); return the path."""
        return _write_csv(Path(path), list(WHAT_IF_COLUMNS), self.what_if_rows())

    def to_csv(self, path: str | os.PathLike) -> Path:
        """Write :meth:`rows` as CSV (atomically); return the path."""
        return _write_csv(Path(path), list(ROW_COLUMNS), self.rows())


def _jsonable(v: Any) -> Any:
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float):
        return None if not math.isfinite(v) else float(f"{v:.6g}")
    return v


def _jsonable_list(a: Any) -> list:
    return [_jsonable(float(v)) for v in np.asarray(a).reshape(-1)]


def _write_csv(path: Path, columns: list[str], rows: list[dict[str, Any]]) -> Path:
    from .._io import atomic_write

    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=columns, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and not math.isfinite(v) else v)
                    for k, v in r.items()})
    text = buf.getvalue()
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8", newline=""))


def concentration_input(name: str, scores: np.ndarray) -> tuple[np.ndarray, str]:
    """(scores [N] to measure the concentration of, note) of the source ``name``: ``raw/...``
    sources (pre-softmax logits) through softmax, the others as they are (note "")."""
    if name.startswith("raw/"):
        return softmax(scores), "raw logits: softmax before concentration"
    return scores, ""


def evaluate(result: Any, annotations: Any, *, model: Any = None, bag: Any = None,
             fraction: float = 0.5, k: int | None = None, steps: int = 50,
             random_orders: int = 5, seed: int = 0, dice_rule: str | float = "otsu",
             sources: list[str] | None = None, labels: set[str] | None = None,
             faithfulness_k: int | None = None, path: str = "auto", faithfulness: bool = True,
             folds: list[Any] | None = None, folds_sources: list[str] | None = None,
             folds_include_result: bool = True, what_if: Any = None,
             what_if_fraction: float | None = None) -> EvidenceReport:
    """Every metric of every source of one result.

    Parameters
    ----------
    result : Result
        ``napari_milview.result.Result`` (coords [N, 2], sources name -> [N]).
    annotations : Annotations, path, or array [N]
        Regions (``annotations.Annotations`` or a GeoJSON / ASAP XML file), or directly the
        overlap [N] in [0, 1] of each patch with the lesion.
    model : MILModel, optional
        The model that made ``result``; with ``bag``, faithfulness is measured.
    bag : Bag, Tensor or array [N, D], optional
        The cached features, in the result's patch order.
    fraction : float
        A patch is positive when its overlap is >= ``fraction`` (0: any overlap), 0.5 as in
        the CAMELYON16 patch-level literature.
    k : int, optional
        K of the top-K precision (default: the number of positive patches) and of the
        top-K mass (default :data:`~.metrics.DEFAULT_TOPK`).
    steps, random_orders, seed, faithfulness_k, path
        Of :func:`~.faithfulness.deletion_insertion` (``faithfulness_k``: its top-K; default
        ``k``, else :data:`~.metrics.DEFAULT_TOPK`).
    faithfulness : bool
        False: no deletion / insertion even with a model and a bag (they may be given for
        ``what_if`` / ``folds`` only).
    dice_rule : "otsu", "top_fraction" or float
    sources : list[str], optional
        The sources to measure (default: all of them).
    labels : set[str], optional
        The annotation classes counted as positive (default: every non-excluded region).
    folds, folds_sources, folds_include_result
        Other checkpoints of the same model: their disagreement with each other and with
        the result (:func:`add_disagreement`; needs ``bag``).
    what_if, what_if_fraction
        Regions (Annotations or a GeoJSON / ASAP XML file): the prediction without each and
        from it alone (:func:`add_what_if`; needs ``model`` and ``bag``).

    Returns
    -------
    EvidenceReport
    """
    overlap = _overlap(result, annotations, labels)
    positive = _patch_labels(overlap, fraction)
    names = list(result.sources) if sources is None else list(sources)
    for s in names:
        if s not in result.sources:
            raise ValueError(f"no attention source {s!r}; available: {list(result.sources)}")
    default = result.default_source if result.default_source in names else names[0]
    features = None
    if model is not None and bag is not None and faithfulness:
        features = getattr(bag, "features", bag)
        if len(features) != result.n:
            raise ValueError(f"the bag has {len(features)} patches, the result {result.n}")
    report = EvidenceReport(
        slide=slide_stem(result), classes=list(result.classes),
        probabilities=[float(p) for p in result.probabilities], default_source=default,
        fraction=float(fraction), overlap=overlap, positive=positive)
    if features is None:
        report.notes.append("no model/bag: faithfulness not measured")
    random_done: dict[str, Any] | None = None
    by_order: dict[bytes, dict] = {}
    for name in [default, *[s for s in names if s != default]]:
        scores = np.asarray(result.sources[name], dtype=np.float64)
        loc = localisation(scores, positive, overlap=overlap, k=k, dice_rule=dice_rule)
        dist, note = concentration_input(name, scores)
        try:
            con = concentration(dist, k=k)
            con["note"] = note
        except ValueError as e:
            con = {"note": f"concentration undefined: {e}"}
        fa = None
        if features is not None:
            order = descending(scores)
            key = order.tobytes()
            if key in by_order:  # e.g. raw/branch/0 ranks as branch/0
                fa = by_order[key]
            else:
                fa = deletion_insertion(
                    model, features, order, steps=steps, seed=seed,
                    random_orders=random_orders if random_done is None else 0,
                    k=faithfulness_k if faithfulness_k is not None else k, path=path)
                if random_done is None:
                    random_done = {key2: fa[key2] for key2 in fa if key2.startswith("random")}
                else:
                    fa.update(random_done)
                by_order[key] = fa
        report.sources[name] = {"localisation": loc, "concentration": con, "faithfulness": fa}
    if folds:
        if bag is None:
            raise ValueError("comparing checkpoints needs the bag's features")
        add_disagreement(report, result, bag, folds, sources=folds_sources,
                         include_result=folds_include_result)
    if what_if is not None:
        if model is None or bag is None:
            raise ValueError("what-if needs the model and the bag's features")
        add_what_if(report, result, model, bag, what_if, fraction=what_if_fraction)
    return report


def _same_file(a: Any, b: Any) -> bool:
    if a is None or b is None or not isinstance(b, str | os.PathLike):
        return False
    if str(a) == "demo" or os.fspath(b) == "demo":
        return str(a) == os.fspath(b)
    try:
        return Path(str(a)).resolve() == Path(b).resolve()
    except OSError:
        return False


def add_disagreement(report: EvidenceReport, result: Any, bag: Any, checkpoints: list[Any], *,
                     sources: list[str] | None = None, include_result: bool = True,
                     device: str = "cpu") -> dict[str, dict]:
    """Compare the maps of several checkpoints of the result's model on its bag; store the
    :func:`~.disagreement.disagreement` dict of each source in ``report.disagreement``.

    Parameters
    ----------
    report : EvidenceReport
        Of ``result`` (:func:`evaluate`).
    result : Result
    bag : Bag, array or Tensor [N, D]
        The result's features, in its patch order.
    checkpoints : list
        Other checkpoints (:func:`~.folds.fold_maps`: paths, ``"demo"``, models).
    sources : list[str], optional
        The sources compared (default: the result's default source).
    include_result : bool
        The result itself is a member (its stored map and probabilities), unless its own
        checkpoint is among ``checkpoints`` (then it is counted once).

    Returns
    -------
    dict
        ``report.disagreement``. Members: ``report.members`` and
        ``report.member_probabilities``.

    Raises
    ------
    ValueError
        Fewer than two members; a checkpoint that does not fit the bag (one line naming it);
        a source the result lacks.
    """
    from .disagreement import disagreement
    from .folds import fold_sources

    names = [result.default_source] if not sources else list(dict.fromkeys(sources))
    own = include_result and not any(_same_file(result.model, c) for c in checkpoints)
    if own:
        for src in names:
            if src not in result.sources:
                raise ValueError(f"no attention source {src!r} in the result; available: "
                                 f"{list(result.sources)}")
    m = len(checkpoints) + int(own)
    if m < 2:
        raise ValueError(f"comparing checkpoints needs at least 2 members, got {m} (give more "
                         "checkpoints, or count the result's own model)")
    maps, probs, members = fold_sources(bag, list(checkpoints), names, device=device)
    if next(iter(maps.values())).shape[1] != result.n:
        raise ValueError(f"the bag has {next(iter(maps.values())).shape[1]} patches, the "
                         f"result {result.n}")
    if probs.shape[1] != len(result.probabilities):
        raise ValueError(f"{members[0]}: {probs.shape[1]} classes, the result has "
                         f"{len(result.probabilities)}")
    if own:
        maps = {k: np.vstack([np.asarray(result.sources[k], dtype=np.float64)[None], v])
                for k, v in maps.items()}
        probs = np.vstack([np.asarray(result.probabilities, dtype=np.float64)[None], probs])
        label = Path(str(result.model)).name if result.model else "result"
        members = [f"{label} (result)", *members]
    report.disagreement = {k: disagreement(list(v), list(probs)) for k, v in maps.items()}
    report.members = members
    report.member_probabilities = [[float(x) for x in p] for p in probs]
    return report.disagreement


def add_what_if(report: EvidenceReport, result: Any, model: Any, bag: Any, regions: Any, *,
                fraction: float | None = None) -> list[dict]:
    """The prediction without each region of ``regions`` and from it alone, and for all of
    them together (:func:`~.faithfulness.what_if_regions`), into ``report.what_if``.

    ``fraction``: a patch is in a region when that share of it is covered (default: the
    report's ``fraction``, the rule of its patch labels)."""
    from .faithfulness import what_if_regions

    features = getattr(bag, "features", bag)
    if len(features) != result.n:
        raise ValueError(f"the bag has {len(features)} patches, the result {result.n}")
    report.what_if = what_if_regions(
        model, features, result.coords, result.patch_size_level0, regions,
        fraction=report.fraction if fraction is None else float(fraction))
    return report.what_if


def summarise(reports: list[EvidenceReport], source: str | None = None) -> dict[str, Any]:
    """Mean, median and count (finite values only) of :data:`SUMMARY_METRICS` over slides,
    for ``source`` (default: each slide's default source)."""
    rows = [r.to_row(source if source in r.sources else None) for r in reports]
    out: dict[str, Any] = {"slides": len(rows), "source": source or "default", "metrics": {}}
    for m in SUMMARY_METRICS:
        v = np.array([r[m] for r in rows], dtype=np.float64)
        v = v[np.isfinite(v)]
        out["metrics"][m] = {"mean": float(v.mean()) if v.size else None,
                             "median": float(np.median(v)) if v.size else None,
                             "n": int(v.size)}
    return out


def write_summary(summary: dict[str, Any], csv_path: str | os.PathLike,
                  json_path: str | os.PathLike) -> tuple[Path, Path]:
    """The :func:`summarise` dict as CSV (metric, mean, median, n) and JSON."""
    from .._io import atomic_write

    rows = [{"metric": m, **v} for m, v in summary["metrics"].items()]
    rows = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows]
    c = _write_csv(Path(csv_path), ["metric", "mean", "median", "n"], rows)
    text = json.dumps(summary, indent=1)
    j = atomic_write(Path(json_path), lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return c, j

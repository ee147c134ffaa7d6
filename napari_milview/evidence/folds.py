"""Several checkpoints of one model (cross-validation folds, an ensemble) on one cached bag.

>>> maps, probs, names = fold_maps(bag, ["fold0.pt", "fold1.pt", "fold2.pt"])  # doctest: +SKIP
>>> d = disagreement(list(maps), list(probs))                                  # doctest: +SKIP

:func:`fold_maps` runs each checkpoint on the bag's features (one forward each, no patch is
read again) and returns one map per checkpoint; :func:`~.disagreement.disagreement` compares
them. :func:`disagreement_result` turns the comparison into a
:class:`~napari_milview.result.Result` whose sources (``disagreement/mean``,
``disagreement/std``, ``disagreement/rank_spread``) open as heatmap layers;
:func:`write_disagreement` writes it with a per-patch CSV and a sidecar that napari opens.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["DISAGREEMENT_COLUMNS", "disagreement_result", "fold_maps", "fold_sources",
           "load_member", "write_disagreement"]

#: Columns of ``<stem>.disagreement.csv`` (one row per source and patch).
DISAGREEMENT_COLUMNS = ("source", "index", "x", "y", "mean", "std", "rank_spread")
#: What the disagreement result's sidecar shows first.
SIDECAR_SOURCE = "disagreement/rank_spread"


def load_member(checkpoint: Any) -> tuple[Any, Any, str]:
    """``(model, card, name)`` of one member: a checkpoint path, ``"demo"`` (the shipped demo
    model), a loaded ``(model, card)`` pair or a bare :class:`~napari_milview.mil.base.
    MILModel` (its card is then None). ``name`` is the file's name, ``"demo"``, or the
    model's class name for objects."""
    from ..mil.base import MILModel
    from ..mil.checkpoint import load_model

    if isinstance(checkpoint, MILModel):
        return checkpoint, None, type(checkpoint).__name__
    if isinstance(checkpoint, tuple) and len(checkpoint) == 2 and \
            isinstance(checkpoint[0], MILModel):
        return checkpoint[0], checkpoint[1], type(checkpoint[0]).__name__
    name = os.fspath(checkpoint)
    if name == "demo":
        from ..assets import demo_model_path

        model, card = load_model(demo_model_path())
        return model, card, "demo"
    p = Path(name)
    if not p.is_file():
        raise ValueError(f"{p}: no such checkpoint")
    model, card = load_model(p)
    return model, card, p.name


def _features(bag: Any):
    """(features Tensor [N, D] float32 on the CPU, where) of a Bag, an array or a Tensor."""
    import torch

    where = getattr(bag, "where", None) or getattr(bag, "source", None) or "the bag"
    f = getattr(bag, "features", bag)
    x = f if isinstance(f, torch.Tensor) else torch.as_tensor(np.asarray(f))
    if x.dim() == 3 and x.shape[0] == 1:
        x = x[0]
    if x.dim() != 2 or x.shape[0] == 0:
        raise ValueError(f"{where}: features must be [N, D] with N > 0, got {tuple(x.shape)}")
    return x.float(), str(where)


def fold_maps(bag: Any, checkpoints: list[Any], source: str | None = None, *,
              device: str = "cpu", cancel: Any = None, progress: Any = None
              ) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Each checkpoint's map of ``source`` and its slide probabilities on one bag.

    Parameters
    ----------
    bag : Bag, array or Tensor [N, D]
        The cached features (``napari_milview.features.Bag``: its ``features``).
    checkpoints : list
        Checkpoint paths (any layout :func:`~napari_milview.mil.checkpoint.load_model`
        reads), ``"demo"``, ``(model, card)`` pairs or models; M >= 1. They must all take
        the bag's feature dimension and predict the same number of classes.
    source : str, optional
        The attention source compared (default: the first checkpoint's default source,
        which is every checkpoint's for one architecture). Every checkpoint must have it.
    device : str
        Where the models run.
    cancel : threading.Event or callable, optional
        Checked before each checkpoint; once set, :class:`~napari_milview.pipeline.Cancelled`.
    progress : callable, optional
        ``progress(done, total, name)`` after each checkpoint.

    Returns
    -------
    maps : np.ndarray
        [M, N] float64, the raw scores of ``source`` (as in ``Result.sources``).
    probabilities : np.ndarray
        [M, C] float64 slide probabilities.
    names : list[str]
        [M] file names (:func:`load_member`); the paths as given where two files share a
        name (``fold0/model.pt``, ``fold1/model.pt``), ``<name>#<i>`` for objects alike.

    Raises
    ------
    ValueError
        One line naming the checkpoint: a missing file, another feature dimension or number
        of classes, an unknown source, non-finite output (also the loader's
        :class:`~napari_milview.mil.checkpoint.CheckpointError`, a ValueError).
    """
    maps, probs, names = fold_sources(bag, checkpoints, None if source is None else [source],
                                      device=device, cancel=cancel, progress=progress)
    return next(iter(maps.values())), probs, names


def fold_sources(bag: Any, checkpoints: list[Any], sources: list[str] | None = None, *,
                 device: str = "cpu", cancel: Any = None, progress: Any = None
                 ) -> tuple[dict[str, np.ndarray], np.ndarray, list[str]]:
    """:func:`fold_maps` for several sources at once (one forward per checkpoint):
    ``({source: maps [M, N] float64}, probabilities [M, C], names)``; ``sources=None`` is
    the first checkpoint's default source."""
    import torch

    from .faithfulness import stopper

    if not checkpoints:
        raise ValueError("no checkpoints to compare")
    check = stopper(cancel, "folds")
    x, where = _features(bag)
    dim = int(x.shape[1])
    want = None if sources is None else list(dict.fromkeys(sources))
    maps: dict[str, list[np.ndarray]] = {}
    probs: list[np.ndarray] = []
    names: list[str] = []
    labels: list[str] = []
    for ckpt in checkpoints:
        check()
        label = os.fspath(ckpt) if isinstance(ckpt, str | os.PathLike) else None
        model, card, name = load_member(ckpt)
        label = label or name
        expected = card.feature_dim if card is not None and card.feature_dim is not None \
            else model.required_dim
        if int(expected) != dim:
            raise ValueError(f"{label}: the model expects {int(expected)}-d features, the bag "
                             f"{where} holds {dim}-d (a checkpoint of another model?)")
        model = model.to(device).eval()
        with torch.inference_mode():
            out = model.forward_attention(x.to(device))
        if want is None:
            want = [out.default_source]
        p = out.probs.double().reshape(-1).cpu().numpy()
        if probs and p.shape[0] != probs[0].shape[0]:
            raise ValueError(f"{label}: {p.shape[0]} classes, {names[0]} has "
                             f"{probs[0].shape[0]} (a checkpoint of another model?)")
        for src in want:
            if src not in out.sources:
                raise ValueError(f"{label}: no attention source {src!r}; it has "
                                 f"{list(out.sources)}")
            m = out.sources[src].double().reshape(-1).cpu().numpy()
            if not np.all(np.isfinite(m)):
                raise ValueError(f"{label}: non-finite {src} on {where}")
            maps.setdefault(src, []).append(m)
        if not np.all(np.isfinite(p)):
            raise ValueError(f"{label}: non-finite probabilities on {where}")
        probs.append(p)
        names.append(name)
        labels.append(label if label != name else f"{name}#{len(names) - 1}")
        if progress is not None:
            progress(len(names), len(checkpoints), name)
    seen = [n for n in names if names.count(n) > 1]
    names = [lab if n in seen else n for n, lab in zip(names, labels, strict=True)]
    return {k: np.stack(v) for k, v in maps.items()}, np.stack(probs), names


def disagreement_result(result: Any, per_source: dict[str, dict], members: list[str]) -> Any:
    """A :class:`~napari_milview.result.Result` on ``result``'s patches whose sources are the
    per-patch disagreement: ``disagreement/mean``, ``disagreement/std`` and
    ``disagreement/rank_spread`` for the first source of ``per_source`` (source name ->
    :func:`~.disagreement.disagreement` dict), ``disagreement/<source>/...`` for the others.
    Its default source is ``disagreement/rank_spread``; its probabilities are the members'
    mean (``prediction_mean``) and its logits their logarithm; ``meta`` names the members."""
    from ..result import Result

    sources: dict[str, np.ndarray] = {}
    first = next(iter(per_source))
    for name, d in per_source.items():
        prefix = "disagreement" if name == first else f"disagreement/{name}"
        for key in ("mean", "std", "rank_spread"):
            sources[f"{prefix}/{key}"] = np.asarray(d[key], dtype=np.float32)
    d0 = per_source[first]
    p = np.asarray(d0.get("prediction_mean", result.probabilities), dtype=np.float64)
    return Result(
        coords=result.coords, patch_size_level0=result.patch_size_level0, sources=sources,
        default_source=SIDECAR_SOURCE, classes=list(result.classes),
        logits=np.log(np.clip(p, 1e-12, None)), probabilities=p, arch=result.arch,
        mpp=result.mpp, slide=result.slide, slide_id=result.slide_id, encoder=result.encoder,
        model=None, device="cpu",
        meta={"disagreement": {"members": list(members), "sources": list(per_source),
                               "m": int(d0["m"]),
                               "rank_spread_mean": float(d0["rank_spread_mean"]),
                               "spearman_mean": float(d0["spearman_mean"])}})


def write_disagreement(out: str | os.PathLike, stem: str, result: Any,
                       per_source: dict[str, dict], members: list[str]) -> dict[str, Path]:
    """Write ``<stem>.disagreement.csv`` (:data:`DISAGREEMENT_COLUMNS`, one row per source and
    patch), ``<stem>.disagreement.h5`` (:func:`disagreement_result`) and
    ``<stem>.disagreement.milview.json`` (a sidecar: opening it in napari shows the slide,
    when its file is there, and the rank-spread heatmap; the other sources are in the
    result). Returns the three paths by kind ``csv``, ``h5``, ``sidecar``.

    The h5 is not named ``*.result.h5`` so that a results folder read again
    (``milview evaluate DIR``) never takes it for a slide's result."""
    from ..overlay.export import write_sidecar
    from ..result import save_result
    from .report import _write_csv

    folder = Path(out)
    rows = []
    for name, d in per_source.items():
        for i, ((x, y), mu, sd, rs) in enumerate(zip(result.coords, d["mean"], d["std"],
                                                     d["rank_spread"], strict=True)):
            rows.append({"source": name, "index": i, "x": int(x), "y": int(y),
                         "mean": float(mu), "std": float(sd), "rank_spread": float(rs)})
    csv_path = _write_csv(folder / f"{stem}.disagreement.csv", list(DISAGREEMENT_COLUMNS),
                          rows)
    res = disagreement_result(result, per_source, members)
    h5 = save_result(res, folder / f"{stem}.disagreement.h5")
    sidecar = write_sidecar(folder / f"{stem}.disagreement.milview.json", res,
                            source=SIDECAR_SOURCE, result_path=h5, method="raw",
                            extra={"disagreement": res.meta["disagreement"]})
    return {"csv": csv_path, "h5": h5, "sidecar": sidecar}

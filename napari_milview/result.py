"""What a MIL model said about one slide, and its h5 file (``RESULT.h5``).

Layout (version 1):

* dataset ``coords`` [N, 2] int64 (level-0 top-left x, y, bag order);
* dataset ``attention`` [N] float32: the default source (what CLAM-style readers look for);
* group ``sources/``: one [N] float32 dataset per named source. Source names contain ``/``
  (``"branch/0"``); in the file ``%`` becomes ``%25``, ``/`` ``%2F`` and ``.`` ``%2E``, and the
  exact name is also kept in the dataset's ``name`` attribute; the group's ``order`` attribute
  (JSON) keeps the order of ``Result.sources``;
* root attributes: ``format = "napari-milview-result"``, ``version``, ``patch_size_level0``,
  ``default_source``, ``arch``, ``device``, ``mpp`` / ``slide`` / ``slide_id`` / ``encoder`` /
  ``model`` when known, ``classes``, ``timings`` and ``meta`` as JSON text; ``nystrom``
  (TransMIL's nystrom-attention variant, also in ``meta``) when the run recorded it;
  datasets ``logits`` and ``probabilities`` [C] float32;
* optional dataset ``thresholds`` [C] float32 (per-class decision thresholds of a model that
  scores each class on its own, DSMIL) with the root attribute ``thresholds_assumed``
  (true: the model came without thresholds and 0.5 is used).

Decision
--------
Mutually exclusive classes (``probabilities`` a softmax distribution, summing to 1): the
predicted class is the most probable one. Independent per-class scores (each in 0..1, a
sigmoid; they need not sum to 1): each class is decided on its own, positive when its score
is ``>=`` its threshold. A result holds independent scores when it has ``thresholds``, when
C is 1, or when its probabilities do not sum to 1; without thresholds 0.5 is used and the
result says so (:attr:`Result.thresholds_assumed`).

Writes go to a temporary name in the same folder and are renamed into place (atomic).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import OneLineError, atomic_write

__all__ = ["FORMAT_NAME", "VERSION", "Result", "ResultError", "load_result", "save_result"]

FORMAT_NAME = "napari-milview-result"
VERSION = 1
#: the decision threshold of an independent per-class score when the model gave none
DEFAULT_THRESHOLD = 0.5
#: how far from 1 the probabilities may sum and still be taken as one distribution
_SUM_TOLERANCE = 1e-4


class ResultError(OneLineError):
    """A result is invalid or its file cannot be read; the message names the file."""

    default_where = "result"


@dataclass
class Result:
    """What a MIL model said about one slide (bag order everywhere).

    Attributes
    ----------
    coords : np.ndarray
        [N, 2] int64, level-0 (x, y) of each patch's top-left corner.
    patch_size_level0 : int
        Patch side in level-0 pixels.
    sources : dict[str, np.ndarray]
        Every attention source by name (see :mod:`napari_milview.mil.base`), each [N] float32.
    default_source : str
        Key of ``sources`` shown by default.
    classes : list[str]
        Class names, C of them.
    logits, probabilities : np.ndarray
        [C] float32 slide logits and the class probabilities: their softmax, or the model's
        own scoring (DSMIL: a sigmoid per class, independent scores that need not sum to 1).
    arch : str
        Model architecture (``"clam_sb"``, ``"abmil"``, ...).
    meta : dict
        Provenance and notes (JSON-ready): ``bag_source``, ``dropped``, ``notes`` ...;
        TransMIL family: ``nystrom`` (``"0.0.9"`` or ``"current"``) and ``nystrom_why``.
    thresholds : np.ndarray, optional
        [C] float32 per-class decision thresholds on ``probabilities`` for a model that
        decides each class on its own (DSMIL: its training script's thresholds). Having them
        makes the scores independent (module docstring "Decision").
    thresholds_assumed : bool
        True when the model came without thresholds and ``thresholds`` are the default 0.5.
    """

    coords: np.ndarray
    patch_size_level0: int
    sources: dict[str, np.ndarray]
    default_source: str
    classes: list[str]
    logits: np.ndarray
    probabilities: np.ndarray
    arch: str
    mpp: float | None = None
    slide: str | None = None
    slide_id: str | None = None
    encoder: str | None = None
    model: str | None = None
    device: str = "cpu"
    timings: dict[str, float] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    thresholds: np.ndarray | None = None
    thresholds_assumed: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check shapes and names, and convert arrays to their dtypes (in place).

        Raises
        ------
        ResultError
            Naming the slide (or "result") and what is wrong.
        """
        where = self.slide_id or self.slide or "result"
        self.coords = np.asarray(self.coords).astype(np.int64, copy=False)
        if self.coords.ndim != 2 or self.coords.shape[1] != 2 or self.coords.shape[0] == 0:
            raise ResultError(where, f"coords must be [N, 2] with N > 0, got "
                                     f"{list(self.coords.shape)}")
        n = self.coords.shape[0]
        self.patch_size_level0 = int(self.patch_size_level0)
        if self.patch_size_level0 <= 0:
            raise ResultError(where, f"patch_size_level0 must be positive, got "
                                     f"{self.patch_size_level0}")
        if not self.sources:
            raise ResultError(where, "no attention sources")
        srcs = {}
        for k, v in self.sources.items():
            a = np.asarray(v, dtype=np.float32).reshape(-1)
            if a.shape[0] != n:
                raise ResultError(where, f"source {k!r} has {a.shape[0]} values for {n} patches")
            srcs[str(k)] = a
        self.sources = srcs
        if self.default_source not in self.sources:
            raise ResultError(where, f"default source {self.default_source!r} is not one of "
                                     f"{list(self.sources)}")
        self.classes = [str(c) for c in self.classes]
        self.logits = np.asarray(self.logits, dtype=np.float32).reshape(-1)
        self.probabilities = np.asarray(self.probabilities, dtype=np.float32).reshape(-1)
        if self.thresholds is not None:
            self.thresholds = np.asarray(self.thresholds, dtype=np.float32).reshape(-1)
            if self.thresholds.shape != self.probabilities.shape:
                raise ResultError(where, f"{self.thresholds.shape[0]} threshold(s) for "
                                         f"{self.probabilities.shape[0]} class probabilities")
            if not np.isfinite(self.thresholds).all():
                raise ResultError(where, f"thresholds must be finite numbers, got "
                                         f"{self.thresholds.tolist()}")
        self.thresholds_assumed = bool(self.thresholds_assumed)
        if self.mpp is not None:
            self.mpp = float(self.mpp)

    @property
    def n(self) -> int:
        """Number of instances (patches)."""
        return int(self.coords.shape[0])

    # -- the decision -------------------------------------------------------------------------
    @property
    def independent(self) -> bool:
        """True when ``probabilities`` are independent per-class scores (each class decided
        against its threshold), False for one distribution over exclusive classes (argmax).

        Independent: the result has ``thresholds``, or C is 1, or the probabilities do not
        sum to 1."""
        p = self.probabilities
        return (self.thresholds is not None or p.shape[0] == 1
                or abs(float(np.sum(p, dtype=np.float64)) - 1.0) > _SUM_TOLERANCE)

    @property
    def decision_thresholds(self) -> np.ndarray | None:
        """[C] float32 thresholds the classes are decided with (0.5 each for independent
        scores without thresholds); None for exclusive classes."""
        if self.thresholds is not None:
            return self.thresholds
        if self.independent:
            return np.full(self.probabilities.shape, DEFAULT_THRESHOLD, np.float32)
        return None

    @property
    def assumed_thresholds(self) -> bool:
        """True when independent scores are decided with the default 0.5: no thresholds
        came with the model."""
        return self.independent and (self.thresholds is None or self.thresholds_assumed)

    @property
    def positive(self) -> list[int]:
        """Indices of the positive classes, most probable first: each class whose score
        reaches its threshold (independent scores), else the most probable class."""
        thr = self.decision_thresholds
        if thr is None:
            return [int(np.argmax(self.probabilities))]
        hits = [i for i in range(len(thr)) if self.probabilities[i] >= thr[i]]
        return sorted(hits, key=lambda i: -float(self.probabilities[i]))

    @property
    def predicted(self) -> int | None:
        """Index of the predicted class: the most probable class (exclusive classes), else
        the most probable positive class, None when no class is positive."""
        pos = self.positive
        return pos[0] if pos else None

    @property
    def predicted_class(self) -> str:
        """The decision in a few words: the predicted class's name (its index as text when
        classes are unnamed); for independent scores the positive classes joined by ", ",
        ``"not <class>"`` for a negative one-class model, ``"none positive"`` otherwise."""
        pos = self.positive
        if pos:
            return ", ".join(self._name(i) for i in pos)
        return f"not {self._name(0)}" if self.probabilities.shape[0] == 1 else "none positive"

    @property
    def decision(self) -> str:
        """The decision in one line with its numbers.

        Exclusive classes: ``"tumour (p = 0.75)"``. Independent scores, one class:
        ``"positive for tumor (p = 0.83 >= threshold 0.41)"`` or
        ``"negative for tumor (p = 0.12 < threshold 0.41)"``; several: ``"positive for A
        (p = 0.91 >= threshold 0.40), B (...)"`` or ``"no class positive (A p = 0.31 <
        threshold 0.40, ...)"``. Without thresholds the line ends with
        ``"; threshold 0.5 assumed: the model came without thresholds"``.
        """
        p, thr = self.probabilities, self.decision_thresholds
        if thr is None:
            i = int(np.argmax(p))
            return f"{self._name(i)} (p = {float(p[i]):.2f})"

        def why(i: int) -> str:
            op = ">=" if p[i] >= thr[i] else "<"
            return f"p = {float(p[i]):.2f} {op} threshold {float(thr[i]):.2f}"

        pos = self.positive
        if p.shape[0] == 1:
            text = f"{'positive' if pos else 'negative'} for {self._name(0)} ({why(0)})"
        elif pos:
            text = "positive for " + ", ".join(f"{self._name(i)} ({why(i)})" for i in pos)
        else:
            order = sorted(range(len(p)), key=lambda i: -float(p[i]))
            text = ("no class positive ("
                    + ", ".join(f"{self._name(i)} {why(i)}" for i in order) + ")")
        if self.assumed_thresholds:
            text += (f"; threshold {DEFAULT_THRESHOLD:g} assumed: the model came without "
                     "thresholds")
        return text

    def _name(self, i: int) -> str:
        return self.classes[i] if i < len(self.classes) else str(i)

    def attention(self, source: str | None = None) -> np.ndarray:
        """The scores of ``source`` (the default source when None), shape [N] float32."""
        key = self.default_source if source is None else source
        try:
            return self.sources[key]
        except KeyError:
            raise KeyError(f"no attention source {key!r}; available: {list(self.sources)}"
                           ) from None

    def summary(self) -> dict:
        """``{"classes", "probabilities", "predicted", "n_instances", "arch"}`` (plain Python),
        plus ``"nystrom"`` (TransMIL's nystrom-attention variant) when the run recorded it.

        Independent per-class scores add ``"scores": "independent"``, ``"thresholds"`` [C],
        ``"thresholds_assumed"``, ``"positive"`` (class names, most probable first) and
        ``"decision"`` (:attr:`decision`); their ``"predicted"`` is None when no class is
        positive."""
        out = {"classes": list(self.classes),
               "probabilities": [float(p) for p in self.probabilities],
               "predicted": self.predicted, "n_instances": self.n, "arch": self.arch}
        thr = self.decision_thresholds
        if thr is not None:
            out.update(scores="independent", thresholds=[float(f"{t:.7g}") for t in thr],
                       thresholds_assumed=self.assumed_thresholds,
                       positive=[self._name(i) for i in self.positive],
                       decision=self.decision)
        if self.meta.get("nystrom") is not None:
            out["nystrom"] = str(self.meta["nystrom"])
        return out


# --------------------------------------------------------------------------------------------
# h5
# --------------------------------------------------------------------------------------------
def _escape(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F").replace(".", "%2E")


def _unescape(name: str) -> str:
    return name.replace("%2E", ".").replace("%2F", "/").replace("%25", "%")


def save_result(result: Result, path: str | os.PathLike) -> Path:
    """Write ``result`` to ``path`` (h5) atomically; return the path. See the module doc."""
    import h5py

    dest = Path(path)
    if not dest.parent.is_dir():
        raise ResultError(dest, f"folder {dest.parent} does not exist")
    try:
        result.validate()
    except ResultError as e:
        raise ResultError(dest, f"not written: {e.problem}") from None

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("coords", data=result.coords.astype(np.int64, copy=False))
            f.create_dataset("attention", data=result.attention())
            f.create_dataset("logits", data=result.logits)
            f.create_dataset("probabilities", data=result.probabilities)
            if result.thresholds is not None:
                f.create_dataset("thresholds", data=result.thresholds)
            g = f.create_group("sources")
            g.attrs["order"] = json.dumps(list(result.sources))
            for name, values in result.sources.items():
                ds = g.create_dataset(_escape(name), data=values)
                ds.attrs["name"] = name
            a = f.attrs
            a["format"] = FORMAT_NAME
            a["version"] = VERSION
            a["patch_size_level0"] = int(result.patch_size_level0)
            a["default_source"] = result.default_source
            a["arch"] = str(result.arch)
            a["device"] = str(result.device)
            a["classes"] = json.dumps(list(result.classes))
            a["timings"] = json.dumps({str(k): float(v) for k, v in result.timings.items()})
            a["meta"] = json.dumps(result.meta, default=_json_default)
            if result.mpp is not None:
                a["mpp"] = float(result.mpp)
            if result.thresholds is not None:
                a["thresholds_assumed"] = bool(result.thresholds_assumed)
            for key in ("slide", "slide_id", "encoder", "model"):
                value = getattr(result, key)
                if value is not None:
                    a[key] = str(value)
            if result.meta.get("nystrom") is not None:  # also in meta; here for h5 readers
                a["nystrom"] = str(result.meta["nystrom"])

    return atomic_write(dest, write)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, os.PathLike):
        return os.fspath(o)
    return str(o)


def load_result(path: str | os.PathLike) -> Result:
    """Read a file written by :func:`save_result`; every field comes back exactly."""
    import h5py

    from ._io import decode_attr as decode
    from ._io import file_problem

    p = Path(path)
    problem = file_problem(p)  # by type, before opening: a named pipe would block h5py
    if problem is not None:
        raise ResultError(p, "no such file" if problem == "no such file or folder" else problem)
    try:
        f = h5py.File(p, "r", locking=False)
    except Exception as e:  # noqa: BLE001 - h5py raises OSError, RuntimeError, ...
        raise ResultError(p, f"not a readable HDF5 file ({e})") from None
    try:
        with f:
            a = {k: decode(f.attrs[k]) for k in f.attrs}
            if a.get("format") != FORMAT_NAME:
                raise ResultError(p, f"not a napari-milview result (format attribute "
                                     f"{a.get('format')!r})")
            if int(a.get("version", 0)) > VERSION:
                raise ResultError(p, f"written by a newer napari-milview (result version "
                                     f"{a['version']}); upgrade napari-milview")
            for need in ("coords", "sources", "logits", "probabilities"):
                if need not in f:
                    raise ResultError(p, f"no {need!r} in the file; found {list(f)}")
            g = f["sources"]
            by_name = {}
            for key in g:
                ds = g[key]
                name = decode(ds.attrs["name"]) if "name" in ds.attrs else _unescape(key)
                by_name[str(name)] = np.asarray(ds[()], dtype=np.float32)
            order = json.loads(decode(g.attrs["order"])) if "order" in g.attrs else []
            sources = {k: by_name[k] for k in order if k in by_name}
            sources.update({k: v for k, v in by_name.items() if k not in sources})
            opt = {k: (None if a.get(k) is None else str(a[k]))
                   for k in ("slide", "slide_id", "encoder", "model")}
            meta = json.loads(a.get("meta", "{}"))
            if "thresholds" in f:
                thresholds = f["thresholds"][()]
            else:  # written before the dataset: DSMIL's thresholds only in meta, unless
                thresholds = None  # its classes were exclusive (AEM's softmax scoring)
                probs = np.asarray(f["probabilities"][()], dtype=np.float64).reshape(-1)
                if isinstance(meta, dict) and meta.get("thresholds") is not None and (
                        probs.shape[0] == 1 or abs(probs.sum() - 1.0) > _SUM_TOLERANCE):
                    thresholds = meta["thresholds"]
            return Result(
                coords=f["coords"][()], patch_size_level0=int(a["patch_size_level0"]),
                sources=sources, default_source=str(a["default_source"]),
                classes=json.loads(a.get("classes", "[]")), logits=f["logits"][()],
                probabilities=f["probabilities"][()], arch=str(a.get("arch", "")),
                mpp=None if a.get("mpp") is None else float(a["mpp"]),
                device=str(a.get("device", "cpu")),
                timings=json.loads(a.get("timings", "{}")), meta=meta,
                thresholds=thresholds,
                thresholds_assumed=bool(a.get("thresholds_assumed", False)), **opt)
    except ResultError as e:
        if e.where == str(p):
            raise
        raise ResultError(p, e.problem) from None
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ResultError(p, f"corrupt or incomplete result file ({type(e).__name__}: {e})"
                          ) from None

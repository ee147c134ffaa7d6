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
  datasets ``logits`` and ``probabilities`` [C] float32.

Writes go to a temporary name in the same folder and are renamed into place (atomic).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ._io import atomic_write

__all__ = ["FORMAT_NAME", "VERSION", "Result", "ResultError", "load_result", "save_result"]

FORMAT_NAME = "napari-milview-result"
VERSION = 1


class ResultError(ValueError):
    """A result is invalid or its file cannot be read; the message names the file."""

    def __init__(self, where: Any, problem: str):
        self.where = str(where) if str(where) else "result"
        self.problem = " ".join(str(problem).split())
        super().__init__(f"{self.where}: {self.problem}")


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
        [C] float32 slide logits and their softmax.
    arch : str
        Model architecture (``"clam_sb"``, ``"abmil"``, ...).
    meta : dict
        Provenance and notes (JSON-ready): ``bag_source``, ``dropped``, ``notes`` ...;
        TransMIL family: ``nystrom`` (``"0.0.9"`` or ``"current"``) and ``nystrom_why``.
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
        if self.mpp is not None:
            self.mpp = float(self.mpp)

    @property
    def n(self) -> int:
        """Number of instances (patches)."""
        return int(self.coords.shape[0])

    @property
    def predicted(self) -> int:
        """Index of the most probable class."""
        return int(np.argmax(self.probabilities))

    @property
    def predicted_class(self) -> str:
        """Name of the most probable class (its index as text when classes are unnamed)."""
        i = self.predicted
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
        plus ``"nystrom"`` (TransMIL's nystrom-attention variant) when the run recorded it."""
        out = {"classes": list(self.classes),
               "probabilities": [float(p) for p in self.probabilities],
               "predicted": self.predicted, "n_instances": self.n, "arch": self.arch}
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
            return Result(
                coords=f["coords"][()], patch_size_level0=int(a["patch_size_level0"]),
                sources=sources, default_source=str(a["default_source"]),
                classes=json.loads(a.get("classes", "[]")), logits=f["logits"][()],
                probabilities=f["probabilities"][()], arch=str(a.get("arch", "")),
                mpp=None if a.get("mpp") is None else float(a["mpp"]),
                device=str(a.get("device", "cpu")),
                timings=json.loads(a.get("timings", "{}")), meta=json.loads(a.get("meta", "{}")),
                **opt)
    except ResultError as e:
        if e.where == str(p):
            raise
        raise ResultError(p, e.problem) from None
    except (OSError, RuntimeError, KeyError, ValueError, TypeError) as e:
        raise ResultError(p, f"corrupt or incomplete result file ({type(e).__name__}: {e})"
                          ) from None

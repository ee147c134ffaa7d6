"""Named staining conditions of the robustness protocol, references, and their parameters.

The conditions (``reference/algorithms.md`` 5.1, CTPLab's protocol, plus normalisers and
HED jitter); every one is a per-pixel :class:`~.perturb.Perturbation` built from the
slide's :class:`~.estimate.SlideStain`:

=================  ==========================================================================
name               what changes (preset without a reference folder / with the PLISM folder)
=================  ==========================================================================
reference          nothing (identity)
low-intensity      H and E concentrations x :data:`LOW_INTENSITY_RATIO` (0.6) / x the ratio
                   of ``KRH_GT450``'s 95th-percentile intensities to the slide's
high-intensity     x :data:`HIGH_INTENSITY_RATIO` (1.5) / ``GV_AT2``'s
low-similarity     H-E angle x :data:`LOW_SIMILARITY_ANGLE` (1.5, distinct stains), rotated in
                   their plane about the bisector / H, E vectors of ``HRH_S60``
high-similarity    H-E angle x :data:`HIGH_SIMILARITY_ANGLE` (0.5, similar stains) /
                   H, E vectors of ``GV_GT450``
hed-light          Tellez HED jitter, sigma 0.05 (seeded, one draw per slide), the bias
                   bounded to sigma / 2 OD (:data:`~.hed.HED_BIAS_SCALE`)
hed-strong         Tellez HED jitter, sigma 0.2, the same bound: at most 3 % more tissue
                   pixels saturated (measured, ``docs/STAINING.md``)
macenko            normalise to a reference: H, E vectors replaced by the reference's and
                   concentrations x ``max_conc_ref / max_conc_slide`` (Macenko)
reinhard           LAB mean/std of the tissue matched to the reference's (Reinhard)
=================  ==========================================================================

The ratios and angle factors without a folder are **our presets**, chosen to span the
range of the protocol's conditions; ``reference/algorithms.md`` names the PLISM sources but
not their numbers, and the published values are data we do not ship. Point
``library=load_reference(folder)`` at the downloaded files to use them.

**Reference folder format** (:func:`load_reference`), any mix of:

* CTPLab's published files (Hugging Face ``CTPLab-DBE-UniBas/staining-robustness-evaluation``):
  ``{STAIN}_{DEVICE}_median.npz`` with key ``stainMatrix`` (3 x 3, columns H, E, residual
  in OD space) and ``median_intensities_per_condition.csv`` with columns ``stain``,
  ``device``, ``H_95th``, ``E_95th``. Each becomes the reference ``{STAIN}_{DEVICE}``.
* our JSON (:func:`save_reference` writes it), one reference per ``*.json`` file::

      {"name": "my-lab", "stain_matrix": [[r, g, b], [r, g, b]],      # rows H, E
       "max_conc": [h, e], "intensity_95": [h, e],
       "lab_mean": [L, a, b], "lab_std": [L, a, b]}                    # all but name optional

The default reference (:data:`DEFAULT_REFERENCE`) for ``macenko`` and ``reinhard`` is the
CC0 Aperio slide CMU-1-Small-Region as :func:`~.estimate.estimate_slide` characterises it
with its defaults (recomputed in ``tests/stain/test_conditions.py`` when the file is there).
"""

from __future__ import annotations

import csv
import json
import math
import os
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from ._common import angle_deg, check_matrix
from .perturb import Perturbation, StainPerturbation

__all__ = ["CONDITIONS", "DEFAULT_REFERENCE", "HIGH_INTENSITY_RATIO", "HIGH_SIMILARITY_ANGLE",
           "LOW_INTENSITY_RATIO", "LOW_SIMILARITY_ANGLE", "PLISM_SOURCES", "Reference",
           "load_reference", "make_condition", "normalise_to", "save_reference",
           "scale_he_angle"]

#: H and E concentration ratio of ``low-intensity`` without a reference folder
LOW_INTENSITY_RATIO = 0.6
#: ... of ``high-intensity``
HIGH_INTENSITY_RATIO = 1.5
#: the H-E angle is multiplied by this in ``low-similarity`` (distinct stains)
LOW_SIMILARITY_ANGLE = 1.5
#: ... in ``high-similarity`` (similar stains)
HIGH_SIMILARITY_ANGLE = 0.5
#: PLISM ``{STAIN}_{DEVICE}`` used by each protocol condition with a reference folder
PLISM_SOURCES = {"low-intensity": "KRH_GT450", "high-intensity": "GV_AT2",
                 "low-similarity": "HRH_S60", "high-similarity": "GV_GT450"}

CONDITIONS: dict[str, str] = {
    "reference": "unchanged (identity)",
    "low-intensity": f"H and E concentrations x {LOW_INTENSITY_RATIO} (PLISM: "
                     f"{PLISM_SOURCES['low-intensity']} intensities)",
    "high-intensity": f"H and E concentrations x {HIGH_INTENSITY_RATIO} (PLISM: "
                      f"{PLISM_SOURCES['high-intensity']} intensities)",
    "low-similarity": f"H-E angle x {LOW_SIMILARITY_ANGLE}, distinct stains (PLISM: "
                      f"{PLISM_SOURCES['low-similarity']} stain vectors)",
    "high-similarity": f"H-E angle x {HIGH_SIMILARITY_ANGLE}, similar stains (PLISM: "
                       f"{PLISM_SOURCES['high-similarity']} stain vectors)",
    "hed-light": "Tellez HED jitter, sigma 0.05 (bias bounded to sigma/2 OD)",
    "hed-strong": "Tellez HED jitter, sigma 0.2 (bias bounded to sigma/2 OD)",
    "macenko": "Macenko normalisation to the reference",
    "reinhard": "Reinhard LAB normalisation to the reference",
}


@dataclass(frozen=True)
class Reference:
    """Target staining values; any field may be missing (None).

    Attributes
    ----------
    name : str
    matrix : np.ndarray or None
        [2, 3] rows H, E (OD vectors, R G B).
    max_conc : np.ndarray or None
        [2] 99th-percentile H and E concentrations.
    intensity_95 : np.ndarray or None
        [2] 95th percentile of H and E concentrations above 0.1.
    lab_mean, lab_std : np.ndarray or None
        [3] LAB statistics of the tissue.
    source : str
        Where the values come from (file, slide, tile).
    """

    name: str
    matrix: np.ndarray | None = None
    max_conc: np.ndarray | None = None
    intensity_95: np.ndarray | None = None
    lab_mean: np.ndarray | None = None
    lab_std: np.ndarray | None = None
    source: str = ""

    @classmethod
    def from_stain(cls, stain, name: str, source: str = "") -> Reference:
        """The reference values of a :class:`~.estimate.SlideStain`."""
        return cls(name=name, matrix=stain.matrix, max_conc=stain.max_conc,
                   intensity_95=stain.intensity_95, lab_mean=stain.lab_mean,
                   lab_std=stain.lab_std, source=source or stain.path)

    def to_dict(self) -> dict:
        """Our JSON reference format (None fields left out)."""
        d: dict = {"name": self.name}
        for key, attr in (("stain_matrix", "matrix"), ("max_conc", "max_conc"),
                          ("intensity_95", "intensity_95"), ("lab_mean", "lab_mean"),
                          ("lab_std", "lab_std")):
            v = getattr(self, attr)
            if v is not None:
                d[key] = np.round(np.asarray(v, np.float64), 6).tolist()
        if self.source:
            d["source"] = self.source
        return d

    def need(self, field: str, condition: str):
        v = getattr(self, field)
        if v is None:
            raise ValueError(f"condition {condition!r}: the reference {self.name!r} "
                             f"({self.source or 'no source'}) has no {field}")
        return v


#: CMU-1-Small-Region (CC0 Aperio H&E, 0.499 um/px) characterised by ``estimate_slide``.
DEFAULT_REFERENCE = Reference(
    name="CMU-1-Small-Region",
    matrix=np.array([[0.69121, 0.64227, 0.33123], [0.04678, 0.93313, 0.35648]]),
    max_conc=np.array([3.7558, 2.3314]),
    intensity_95=np.array([2.481, 1.3858]),
    lab_mean=np.array([47.975, 29.29, -12.435]),
    lab_std=np.array([19.991, 11.654, 10.143]),
    source="estimate_slide(CMU-1-Small-Region.svs), built in",
)


# --------------------------------------------------------------------------- references
def _vec(d: dict, key: str, n: int, where: str, positive: bool = False):
    if key not in d:
        return None
    a = np.asarray(d[key], np.float64)
    if a.shape != (n,) or not np.all(np.isfinite(a)) or (positive and np.any(a <= 0)):
        raise ValueError(f"{where}: {key!r} must be {n} finite "
                         f"{'positive ' if positive else ''}numbers, got {d[key]!r}")
    return a


def _reference_from_json(path: Path) -> Reference:
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: not a readable JSON reference ({e})") from None
    if not isinstance(d, dict):
        raise ValueError(f"{path}: a JSON reference must be an object")
    matrix = None
    if "stain_matrix" in d:
        try:
            matrix = check_matrix(d["stain_matrix"], f"{path}: stain_matrix")
        except (TypeError, ValueError) as e:
            raise ValueError(str(e)) from None
    ref = Reference(name=str(d.get("name", path.stem)), matrix=matrix,
                    max_conc=_vec(d, "max_conc", 2, str(path), True),
                    intensity_95=_vec(d, "intensity_95", 2, str(path), True),
                    lab_mean=_vec(d, "lab_mean", 3, str(path)),
                    lab_std=_vec(d, "lab_std", 3, str(path), True), source=str(path))
    if all(getattr(ref, f) is None for f in ("matrix", "max_conc", "intensity_95",
                                             "lab_mean", "lab_std")):
        raise ValueError(f"{path}: no reference values (stain_matrix, max_conc, "
                         "intensity_95, lab_mean, lab_std)")
    return ref


def load_reference(folder: str | os.PathLike) -> dict[str, Reference]:
    """Load published reference matrices and intensities from a local folder.

    Parameters
    ----------
    folder : path
        A folder with CTPLab's ``*_median.npz`` / ``median_intensities_per_condition.csv``
        and/or our ``*.json`` references (format in the module docstring).

    Returns
    -------
    dict
        Reference name (``{STAIN}_{DEVICE}`` or the JSON ``name``) -> :class:`Reference`.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder}: reference folder does not exist or is not a folder")
    refs: dict[str, Reference] = {}
    for f in sorted(folder.glob("*_median.npz")):
        name = f.name[: -len("_median.npz")]
        try:
            with np.load(f, allow_pickle=False) as z:
                s = np.asarray(z["stainMatrix"], np.float64)
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise ValueError(f"{f}: not a CTPLab stain matrix file (npz with key "
                             f"'stainMatrix'): {e}") from None
        if s.shape != (3, 3):
            raise ValueError(f"{f}: stainMatrix must be 3 x 3, got {s.shape}")
        matrix = check_matrix(s[:, :2].T, f"{f}: stainMatrix")  # columns H, E -> rows
        refs[name] = Reference(name=name, matrix=matrix, source=str(f))
    csv_path = folder / "median_intensities_per_condition.csv"
    if csv_path.exists():
        try:
            with open(csv_path, newline="") as fh:
                rows = list(csv.DictReader(fh))
            for r in rows:
                name = f"{r['stain']}_{r['device']}"
                i95 = _vec({"i": [float(r["H_95th"]), float(r["E_95th"])]}, "i", 2,
                           str(csv_path), True)
                old = refs.get(name, Reference(name=name, source=str(csv_path)))
                src = f"{old.source}, {csv_path}" if old.matrix is not None else str(csv_path)
                refs[name] = replace(old, intensity_95=i95, source=src)
        except (KeyError, ValueError, TypeError) as e:
            raise ValueError(f"{csv_path}: expected columns stain, device, H_95th, E_95th "
                             f"with numbers ({e})") from None
    for f in sorted(folder.glob("*.json")):
        ref = _reference_from_json(f)
        refs[ref.name] = ref
    if not refs:
        raise ValueError(f"{folder}: no reference files (*_median.npz, "
                         "median_intensities_per_condition.csv or *.json)")
    return refs


def save_reference(ref: Reference, path: str | os.PathLike) -> Path:
    """Write ``ref`` as our JSON reference format (readable by :func:`load_reference`)."""
    path = Path(path)
    if not path.parent.is_dir():
        raise ValueError(f"{path}: folder {path.parent} does not exist")
    path.write_text(json.dumps(ref.to_dict(), indent=1) + "\n")
    return path


def normalise_to(target, *, name: str | None = None) -> Reference:
    """A reference taken from a tile, an image file, a JSON reference or a slide.

    Parameters
    ----------
    target : np.ndarray, path or Slide
        [H, W, 3] uint8 tile (its background ``i0`` is its per-channel maximum, as in
        CTPLab); a ``.png``/``.jpg``/``.jpeg``/``.bmp`` image (read as a tile); a ``.json``
        reference; or a slide (path or opened :class:`~napari_milview.slide.Slide`),
        characterised by :func:`~.estimate.estimate_slide`.
    name : str, optional

    Returns
    -------
    Reference
    """
    from .estimate import estimate_slide, estimate_tiles

    if isinstance(target, np.ndarray):
        tile, source = target, "tile"
    elif isinstance(target, (str, os.PathLike)):
        p = Path(target)
        if not p.exists():
            raise FileNotFoundError(f"{p}: reference does not exist")
        suffix = p.suffix.lower()
        if suffix == ".json":
            return _reference_from_json(p)
        if suffix in (".png", ".jpg", ".jpeg", ".bmp"):
            from PIL import Image

            try:
                with Image.open(p) as im:
                    tile = np.asarray(im.convert("RGB"))
            except OSError as e:
                raise ValueError(f"{p}: not a readable image ({e})") from None
            source = str(p)
        else:
            stain = estimate_slide(p)
            if stain.fallback:
                raise ValueError(f"{p}: no stain could be estimated from this slide "
                                 f"({'; '.join(stain.notes)})")
            return Reference.from_stain(stain, name or p.stem)
    else:  # an opened Slide
        stain = estimate_slide(target)
        if stain.fallback:
            raise ValueError(f"{target.path}: no stain could be estimated from this slide "
                             f"({'; '.join(stain.notes)})")
        return Reference.from_stain(stain, name or Path(target.path).stem)
    if tile.ndim != 3 or tile.shape[-1] != 3 or tile.dtype != np.uint8:
        raise ValueError(f"{source}: a reference tile must be [H, W, 3] uint8, got "
                         f"{tile.dtype} {tile.shape}")
    i0 = np.clip(tile.reshape(-1, 3).max(axis=0), 128, 255)
    try:
        stain, _ = estimate_tiles(tile, i0=i0)
    except ValueError as e:
        raise ValueError(f"{source}: cannot be a reference: {e}") from None
    return Reference.from_stain(stain, name or Path(source).stem, source=source)


# --------------------------------------------------------------------------- conditions
def scale_he_angle(matrix, factor: float) -> np.ndarray:
    """Rotate H and E apart (factor > 1) or together (< 1) within their plane.

    Both vectors turn symmetrically about their bisector so that the H-E angle becomes
    ``factor`` times the original; the plane and the bisector are kept. Components that
    would turn negative are clipped to 0 and the vectors re-normalised.

    Parameters
    ----------
    matrix : array-like
        [2, 3] rows H, E.
    factor : float
        > 0; the new angle is capped below 180 degrees.

    Returns
    -------
    np.ndarray
        [2, 3] float64 unit rows H, E.
    """
    m = check_matrix(matrix)
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"angle factor must be a positive number, got {factor!r}")
    h, e = m[0] / np.linalg.norm(m[0]), m[1] / np.linalg.norm(m[1])
    theta = math.radians(angle_deg(h, e))
    u = (h + e) / np.linalg.norm(h + e)
    w = (h - e) / np.linalg.norm(h - e)
    half = min(theta * factor, math.radians(179)) / 2
    out = np.vstack([math.cos(half) * u + math.sin(half) * w,
                     math.cos(half) * u - math.sin(half) * w])
    out = np.maximum(out, 0.0)
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def _from_library(library, condition: str) -> Reference:
    key = PLISM_SOURCES[condition]
    if key not in library:
        have = ", ".join(sorted(library)) or "none"
        raise ValueError(f"condition {condition!r} needs the PLISM reference {key!r} "
                         f"({key}_median.npz / median_intensities_per_condition.csv); "
                         f"the reference folder has: {have}")
    return library[key]


def make_condition(name: str, stain, *, reference: Reference | None = None,
                   library: dict[str, Reference] | None = None, seed: int = 0
                   ) -> Perturbation:
    """The per-pixel perturbation of a named condition for one slide.

    Parameters
    ----------
    name : str
        One of :data:`CONDITIONS`.
    stain : SlideStain
        The slide's staining (:func:`~.estimate.estimate_slide`); unused (may be None) for
        ``reference``.
    reference : Reference, optional
        Target of ``macenko`` and ``reinhard``; default :data:`DEFAULT_REFERENCE`.
    library : dict, optional
        :func:`load_reference` of the PLISM folder: the protocol's four conditions then
        use the published values (:data:`PLISM_SOURCES`) instead of our presets.
    seed : int
        Seed of the HED jitter draw.

    Returns
    -------
    Perturbation
        ``[..., 3] uint8 -> same``; the identity for ``reference``.
    """
    from .hed import HED_PRESETS, hed_jitter
    from .reinhard import Reinhard

    if name not in CONDITIONS:
        raise ValueError(f"unknown condition {name!r}; choose one of {', '.join(CONDITIONS)}")
    if name == "reference":  # needs no stain: stain may be None
        return Perturbation("reference", {"description": CONDITIONS[name]})
    src, i0 = stain.matrix, stain.i0
    ref = reference if reference is not None else DEFAULT_REFERENCE
    if name in ("low-intensity", "high-intensity"):
        if library is not None:
            lib = _from_library(library, name)
            tgt = lib.need("intensity_95", name)
            ratio = tgt / np.maximum(stain.intensity_95, 1e-6)
            extra = {"target_name": lib.name, "target_intensity_95": tgt.round(4).tolist()}
        else:
            r = LOW_INTENSITY_RATIO if name == "low-intensity" else HIGH_INTENSITY_RATIO
            ratio, extra = np.array([r, r]), {"preset": True}
        return StainPerturbation(name, src, i0, ratio=ratio, params=extra)
    if name in ("low-similarity", "high-similarity"):
        if library is not None:
            lib = _from_library(library, name)
            target = lib.need("matrix", name)
            extra = {"target_name": lib.name}
        else:
            k = LOW_SIMILARITY_ANGLE if name == "low-similarity" else HIGH_SIMILARITY_ANGLE
            target, extra = scale_he_angle(src, k), {"preset": True, "angle_factor": k}
        extra.update(angle_src=round(angle_deg(*src), 3), angle_tgt=round(angle_deg(*target), 3))
        return StainPerturbation(name, src, i0, target=target, params=extra)
    if name in HED_PRESETS:
        return hed_jitter(name, seed=seed, i0=i0)
    if name == "macenko":
        target = ref.need("matrix", name)
        ratio = ref.need("max_conc", name) / np.maximum(stain.max_conc, 1e-6)
        return StainPerturbation(name, src, i0, ratio=ratio, target=target,
                                 params={"target_name": ref.name})
    # reinhard
    return Reinhard(stain.lab_mean, stain.lab_std, ref.need("lab_mean", name),
                    ref.need("lab_std", name), i0=i0, name=name,
                    params={"target_name": ref.name})

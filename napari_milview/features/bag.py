"""The one bag type: patch features plus the geometry that places them on the slide.

A bag is what every feature file becomes once read (CLAM, TRIDENT, ACMIL, ``.pt``, our own
h5) and what the encoders produce: ``features`` [N, D], level-0 ``coords`` [N, 2] of each
patch's top-left corner (x = column, y = row, as in CLAM and TRIDENT), the patch extent in
level-0 pixels and the slide's microns per pixel.

Construction validates and cleans: features become float32, coords int64, rows whose
features are not finite or exceed :data:`FEATURE_LIMIT` in magnitude (finite, but they
overflow in a model) refuse the whole bag with :class:`BagError` naming the first such row;
rows whose coords are not finite are dropped with a counted :class:`BagWarning`; an empty
bag is refused. Qt-free; torch is imported only by
:meth:`Bag.to_torch`.
"""

from __future__ import annotations

import math
import numbers
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .._io import OneLineError

__all__ = ["Bag", "BagError", "BagWarning", "EXTENT_HINT", "FEATURE_LIMIT"]

#: What to tell a user whose bag has no patch extent (overridden per format via
#: ``meta["extent_hint"]``).
EXTENT_HINT = "pass --patch-size-level0 or the CLAM patches .h5"

#: Coordinates beyond this are a corrupt file, not a slide (and would overflow int64 maths).
MAX_COORD = 2**40

#: Feature values beyond this are no encoder's output but a damaged file: finite in float32
#: (up to 3.4e38), they overflow to Inf/NaN in the model's first matrix product or norm.
#: A bag holding such a value is refused like a non-finite one, never scored.
FEATURE_LIMIT = 1e8


class BagError(OneLineError):
    """A bag cannot be read or used; the message names the file (or bag) and the problem."""

    default_where = "bag"


class BagWarning(UserWarning):
    """Something in a bag was repaired (rows dropped, a value ignored); the bag is usable."""


def _positive_int(value: Any, what: str, where: str) -> int | None:
    """``value`` as a positive Python int (accepts 1024, np.int32(1024), 1024.0), or None."""
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BagError(where, f"{what} must be a positive whole number of pixels, got {value!r}")
    if not math.isfinite(value) or value != int(value) or int(value) <= 0:
        raise BagError(where, f"{what} must be a positive whole number of pixels, got {value!r}")
    return int(value)


def _positive_float(value: Any, what: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise BagError(where, f"{what} must be a positive number, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise BagError(where, f"{what} must be a positive number, got {value!r}")
    return float(value)


def _as_features(features: Any, where: str) -> np.ndarray:
    """[N, D] float32 (a new array only when a conversion is needed)."""
    arr = np.asarray(features)
    if arr.ndim == 3 and arr.shape[0] == 1:  # [1, N, D]: a batch of one bag
        arr = arr[0]
    if arr.ndim != 2:
        hint = (" (a single vector: a slide-level embedding, not a patch bag?)"
                if arr.ndim == 1 else "")
        raise BagError(where, f"features must be 2-D [N patches, D], got shape "
                              f"{tuple(arr.shape)}{hint}")
    if arr.dtype.kind not in "fiu":
        raise BagError(where, f"features must be numbers, got dtype {arr.dtype}")
    if arr.shape[1] == 0:
        raise BagError(where, f"features have no dimensions (shape {tuple(arr.shape)})")
    with np.errstate(over="ignore", invalid="ignore"):  # float64 -> float32 overflow: inf, refused
        return np.ascontiguousarray(arr, dtype=np.float32)


def _as_coords(coords: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """[N, 2] int64 coords and a [N] mask of rows with finite coords."""
    arr = np.asarray(coords)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise BagError(where, f"coords must be [N, 2] level-0 (x, y), got shape "
                              f"{tuple(arr.shape)}")
    if arr.dtype.kind in "iu":
        if arr.size and (int(arr.max()) > MAX_COORD or int(arr.min()) < -MAX_COORD):
            raise BagError(where, f"coords out of range (min {arr.min()}, max {arr.max()}): "
                                  "not level-0 pixels of a slide")
        return arr.astype(np.int64), np.ones(len(arr), dtype=bool)
    if arr.dtype.kind == "b" or arr.dtype.kind not in "f":
        raise BagError(where, f"coords must be whole level-0 pixels, got dtype {arr.dtype}")
    finite = np.isfinite(arr).all(axis=1)
    good = arr[finite]
    if good.size:
        if np.abs(good).max() > MAX_COORD:
            raise BagError(where, f"coords out of range (max |value| {np.abs(good).max():g}): "
                                  "not level-0 pixels of a slide")
        frac = good != np.round(good)
        if frac.any():
            first = tuple(good[frac.any(axis=1)][0].tolist())
            raise BagError(where, f"coords must be whole level-0 pixels, got fractional "
                                  f"values such as {first}")
    out = np.zeros(arr.shape, dtype=np.int64)
    out[finite] = good.astype(np.int64)
    return out, finite


def _refuse_damaged_features(feats: np.ndarray, where: str) -> None:
    """Refuse a bag with any non-finite feature or one beyond :data:`FEATURE_LIMIT`.

    Such values are a damaged file, never an encoder's output; scoring the other rows would
    report a prediction on a bag that is not the one the file was meant to hold.

    Parameters
    ----------
    feats : np.ndarray
        [N, D] float32.

    Raises
    ------
    BagError
        Naming how many rows are damaged, the first one and its worst value.
    """
    with np.errstate(invalid="ignore"):
        bad = ~np.isfinite(feats).all(axis=1) | (np.abs(feats) > FEATURE_LIMIT).any(axis=1)
    if not bad.any():
        return
    rows = np.flatnonzero(bad)
    first = feats[rows[0]]
    worst = first[~np.isfinite(first)][:1] if not np.isfinite(first).all() else \
        first[np.argmax(np.abs(first))][None]
    raise BagError(where, f"{len(rows)} of {len(feats)} patches have damaged features "
                          f"(non-finite, or beyond +-{FEATURE_LIMIT:g}, which overflow in a "
                          f"model): first row {int(rows[0])} holds {float(worst[0]):.3g}; the "
                          "bag is refused rather than scored without them")


@dataclass(eq=False, repr=False)
class Bag:
    """Patch features of one slide and where the patches lie.

    Attributes
    ----------
    features : np.ndarray
        [N, D] float32, one row per patch.
    coords : np.ndarray
        [N, 2] int64, level-0 (x, y) of each patch's top-left corner (x = column).
    patch_size_level0 : int or None
        Side of a (square) patch in level-0 pixels; None when the file does not say.
    mpp : float or None
        The slide's microns per level-0 pixel.
    encoder : str or None
        Name of the patch encoder that produced the features.
    slide_id : str or None
        Which slide the bag belongs to (file stem, group name, stored attribute).
    source : str
        Where it came from (path and format), used as the prefix of every message.
    dropped : int
        Rows dropped because their coords were not finite.
    meta : dict
        Extra, informational facts from the file (``label``, magnifications,
        ``extent_source``, ``mpp_source``, ``extent_hint``, ``slide``); never required.
    """

    features: np.ndarray
    coords: np.ndarray
    patch_size_level0: int | None = None
    mpp: float | None = None
    encoder: str | None = None
    slide_id: str | None = None
    source: str = ""
    dropped: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        where = self.source or "bag"
        feats = _as_features(self.features, where)
        coords, coords_ok = _as_coords(self.coords, where)
        if len(coords) != len(feats):
            raise BagError(where, f"{len(feats)} feature rows but {len(coords)} coords")
        if len(feats) == 0:
            raise BagError(where, "the bag is empty (0 patches)")
        _refuse_damaged_features(feats, where)
        n_bad = int(len(coords_ok) - coords_ok.sum())
        if n_bad:
            if n_bad == len(coords_ok):
                raise BagError(where, f"all {n_bad} patches have non-finite coords (NaN/Inf): "
                                      "nothing can be placed on the slide")
            warnings.warn(f"{where}: dropped {n_bad} of {len(coords_ok)} patches with "
                          f"non-finite coords (first row {int(np.flatnonzero(~coords_ok)[0])})",
                          BagWarning, stacklevel=3)
            feats, coords = feats[coords_ok], coords[coords_ok]
        self.features = feats
        self.coords = coords
        self.dropped = int(self.dropped) + n_bad
        self.patch_size_level0 = _positive_int(self.patch_size_level0, "patch_size_level0",
                                               where)
        self.mpp = _positive_float(self.mpp, "mpp", where)
        self.encoder = None if self.encoder in (None, "") else str(self.encoder)
        self.slide_id = None if self.slide_id in (None, "") else str(self.slide_id)
        self.meta = dict(self.meta or {})

    @classmethod
    def from_arrays(cls, features: Any, coords: Any, *, patch_size_level0: int | None = None,
                    mpp: float | None = None, encoder: str | None = None,
                    slide_id: str | None = None, source: str = "",
                    meta: dict[str, Any] | None = None) -> Bag:
        """Build a validated bag from array-likes.

        Parameters
        ----------
        features : array-like
            [N, D] numbers (any float/int dtype; [1, N, D] is squeezed). Becomes float32.
        coords : array-like
            [N, 2] level-0 (x, y) top-left corners, whole pixels. Becomes int64.

        Raises
        ------
        BagError
            Bad shapes or types, an empty bag, or no finite row.
        """
        return cls(features=features, coords=coords, patch_size_level0=patch_size_level0,
                   mpp=mpp, encoder=encoder, slide_id=slide_id, source=source,
                   meta=dict(meta or {}))

    # -- facts -------------------------------------------------------------------------
    @property
    def n(self) -> int:
        """Number of patches N."""
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        """Feature dimension D."""
        return int(self.features.shape[1])

    @property
    def patch_size_um(self) -> float | None:
        """Patch side in microns (extent x mpp), or None when either is unknown."""
        if self.patch_size_level0 is None or self.mpp is None:
            return None
        return self.patch_size_level0 * self.mpp

    @property
    def where(self) -> str:
        """How messages name this bag: its source, or 'bag'."""
        return self.source or "bag"

    def __repr__(self) -> str:
        return (f"Bag(n={self.n}, dim={self.dim}, patch_size_level0={self.patch_size_level0}, "
                f"mpp={self.mpp}, encoder={self.encoder!r}, slide_id={self.slide_id!r}, "
                f"dropped={self.dropped}, source={self.source!r})")

    # -- checks ------------------------------------------------------------------------
    def validate(self) -> Bag:
        """Re-check every invariant (after fields were assigned by hand); return self.

        Raises
        ------
        BagError
            Shapes, dtypes, non-finite values, extent or mpp out of order.
        """
        where = self.where
        f, c = self.features, self.coords
        if not isinstance(f, np.ndarray) or f.ndim != 2 or f.dtype != np.float32:
            raise BagError(where, "features must be a [N, D] float32 array")
        if not isinstance(c, np.ndarray) or c.shape != (f.shape[0], 2) or c.dtype != np.int64:
            raise BagError(where, f"coords must be a [{f.shape[0]}, 2] int64 array, got "
                                  f"{getattr(c, 'shape', None)} {getattr(c, 'dtype', None)}")
        if f.shape[0] == 0:
            raise BagError(where, "the bag is empty (0 patches)")
        if f.shape[1] == 0:
            raise BagError(where, "features have no dimensions")
        _refuse_damaged_features(f, where)
        _positive_int(self.patch_size_level0, "patch_size_level0", where)
        _positive_float(self.mpp, "mpp", where)
        return self

    def check_dim(self, expected: int, model_name: str = "") -> None:
        """Refuse a bag whose feature dimension is not the model's.

        Raises
        ------
        BagError
            e.g. "bag.h5: features are 768-d but the model expects 1024-d".
        """
        if self.dim != int(expected):
            model = f"the model {model_name!r}" if model_name else "the model"
            raise BagError(self.where, f"features are {self.dim}-d but {model} expects "
                                       f"{int(expected)}-d (features from another encoder?)")

    def require_extent(self) -> int:
        """The patch extent in level-0 pixels, or a BagError naming what to supply."""
        if self.patch_size_level0 is None:
            hint = self.meta.get("extent_hint") or EXTENT_HINT
            raise BagError(self.where, f"patch extent unknown: {hint}")
        return self.patch_size_level0

    # -- conversion --------------------------------------------------------------------
    def to_torch(self, device: Any = "cpu") -> Any:
        """Features as a torch tensor [N, D] float32 on ``device`` (coords stay numpy)."""
        import torch

        return torch.from_numpy(np.ascontiguousarray(self.features)).to(device)

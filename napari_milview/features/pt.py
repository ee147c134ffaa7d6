"""``.pt`` feature bags, loaded through torch's safe unpickler only.

A ``.pt`` file is a pickle, and a pickle can run code when loaded. Bags are therefore read
through ``_weights.torch_load`` (``torch.load(path, map_location="cpu", weights_only=True)``
with the package's one allowlist of inert containers) and nothing else: never the
unrestricted unpickler, no fallback. A file that needs anything else is refused with a
:class:`BagError` naming the global it asked for (``_weights.unsafe_globals``, read without
importing anything).

Accepted contents:

* a bare tensor [N, D] (CLAM ``pt_files/{slide}.pt``: coords then come from the matching
  CLAM h5, see :func:`napari_milview.features.clam.read_clam_pt`);
* a dict with ``features`` (or ``feats`` / ``feat``) [N, D], optional ``coords`` [N, 2] and
  optional ``patch_size_level0``, ``mpp``, ``encoder``, ``slide_id``.

torch is imported inside the functions that need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .bag import Bag, BagError, _as_features
from .patches import find_patches_h5, resolve_extent, resolve_mpp

__all__ = ["FORMAT", "PtContents", "bag_from_contents", "is_pt", "load_pt_contents",
           "load_pt_safe", "read_pt"]

FORMAT = "torch .pt bag"

ZIP_MAGIC = b"PK\x03\x04"
FEATURE_KEYS = ("features", "feats", "feat")
SCALAR_KEYS = ("patch_size_level0", "mpp", "encoder", "slide_id")
#: Read at most this much of a raw pickle when naming the globals it asks for.
_SCAN_LIMIT = 64 * 2**20


def is_pt(path: str | os.PathLike) -> bool:
    """A torch archive (zip) or a legacy torch / raw pickle, by its first bytes."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head == ZIP_MAGIC or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def load_pt_safe(path: str | os.PathLike) -> Any:
    """``_weights.torch_load`` (``weights_only=True``), errors as BagError.

    Raises
    ------
    BagError
        "refused to unpickle: it contains code (global X.Y)" when the pickle asks for a
        global outside torch's safe set; "not a torch .pt file" for other failures.
    """
    from .._io import file_problem
    from .._weights import WeightsError, torch_load, unsafe_globals

    p = Path(path)
    where = f"{p} ({FORMAT})"
    problem = file_problem(p)
    if problem is not None:
        raise BagError(p, "no such file" if problem == "no such file or folder" else problem)
    try:
        return torch_load(p)  # weights_only=True, the shared allowlist, no fallback
    except WeightsError as e:
        names = unsafe_globals(p)
        if names:
            shown = ", ".join(names[:5]) + (f", ... ({len(names) - 5} more)"
                                            if len(names) > 5 else "")
            raise BagError(where, f"refused to unpickle: it contains code (global {shown}); "
                                  "feature .pt files are loaded with weights_only=True only "
                                  "- re-save the features as plain tensors, or as an .h5 "
                                  "bag") from None
        detail = str(e).split(": ", 1)[-1]
        raise BagError(where, f"not a readable torch .pt file ({detail})") from None


def _to_numpy(value: Any, key: str, where: str) -> np.ndarray:
    import torch

    if isinstance(value, torch.Tensor):
        if value.layout != torch.strided:
            raise BagError(where, f"{key!r} is a {value.layout} tensor; expected a dense one")
        if value.is_complex():
            raise BagError(where, f"{key!r} is complex ({value.dtype})")
        t = value.detach().cpu()
        if t.is_floating_point() and t.dtype not in (torch.float32, torch.float64):
            t = t.float()  # float16 / bfloat16 (numpy has no bfloat16)
        return t.numpy()
    if isinstance(value, list | tuple):
        try:
            return np.asarray(value)
        except (TypeError, ValueError):
            raise BagError(where, f"{key!r} is a ragged list, not an array") from None
    raise BagError(where, f"{key!r} is a {type(value).__name__}; expected a tensor")


def _scalar(value: Any) -> Any:
    """A one-element tensor as a Python number; other tensors are not scalars (None)."""
    import torch

    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    return value


@dataclass
class PtContents:
    """What a ``.pt`` bag held: features [N, D], coords [N, 2] or None, scalar entries."""

    features: np.ndarray
    coords: np.ndarray | None
    attrs: dict[str, Any] = field(default_factory=dict)


def load_pt_contents(path: str | os.PathLike) -> PtContents:
    """Safely load a ``.pt`` bag and pick out features, coords and scalar entries."""
    p = Path(path)
    where = f"{p} ({FORMAT})"
    obj = load_pt_safe(p)
    import torch

    if isinstance(obj, torch.Tensor):
        return PtContents(_to_numpy(obj, "tensor", where), None, {})
    if isinstance(obj, dict):
        key = next((k for k in FEATURE_KEYS if k in obj), None)
        if key is None:
            keys = ", ".join(repr(k) for k in list(obj)[:10]) or "none"
            raise BagError(where, f"no 'features', 'feats' or 'feat' entry; found keys: {keys}")
        feats = _to_numpy(obj[key], key, where)
        coords = _to_numpy(obj["coords"], "coords", where) if obj.get("coords") is not None \
            else None
        attrs = {k: _scalar(obj[k]) for k in SCALAR_KEYS if obj.get(k) is not None}
        return PtContents(feats, coords, attrs)
    raise BagError(where, f"holds a {type(obj).__name__}; expected a tensor [N, D] or a dict "
                          "with 'features' (and 'coords')")


def bag_from_contents(path: str | os.PathLike, contents: PtContents, *,
                      patches_h5: str | os.PathLike | None = None,
                      patch_size_level0: int | None = None, mpp: float | None = None,
                      slide_id: str | None = None, encoder: str | None = None) -> Bag:
    """A Bag from loaded ``.pt`` contents that include coords (see :func:`read_pt`)."""
    p = Path(path)
    where = f"{p} ({FORMAT})"
    if contents.coords is None:
        raise BagError(where, "holds features but no coords")
    a = contents.attrs
    feats = _as_features(contents.features, where)
    in_file = None
    if a.get("patch_size_level0") is not None:
        in_file = (a["patch_size_level0"], "pt entry patch_size_level0")
    auto = None
    if patch_size_level0 is None and patches_h5 is None and in_file is None:
        auto = find_patches_h5(p)
    extent, how = resolve_extent(where, feats.shape[0], user=patch_size_level0,
                                 patches_h5=patches_h5, in_file=in_file, auto_patches=auto)
    mpp_v, mpp_src = resolve_mpp(where, user=mpp, in_file=a.get("mpp"))
    meta = {"format": FORMAT, "extent_source": how, "mpp_source": mpp_src}
    return Bag(features=feats, coords=contents.coords, patch_size_level0=extent, mpp=mpp_v,
               encoder=encoder or a.get("encoder"),
               slide_id=slide_id or a.get("slide_id") or p.stem, source=where, meta=meta)


def read_pt(path: str | os.PathLike, *, patches_h5: str | os.PathLike | None = None,
            patch_size_level0: int | None = None, mpp: float | None = None,
            slide_id: str | None = None, encoder: str | None = None) -> Bag:
    """Read a ``.pt`` bag (safe loader only).

    Parameters
    ----------
    path
        A tensor [N, D], or a dict with ``features``/``feats``/``feat`` [N, D], optional
        ``coords`` [N, 2] (level-0 x, y) and scalar entries.
    patches_h5, patch_size_level0, mpp, slide_id, encoder
        As for :func:`napari_milview.features.load_bag`.

    Without coords in the file, coords come from the matching CLAM h5
    (``../h5_files/{stem}.h5``), else a BagError says where it looked.
    """
    contents = load_pt_contents(path)
    kw = {"patches_h5": patches_h5, "patch_size_level0": patch_size_level0, "mpp": mpp,
          "slide_id": slide_id, "encoder": encoder}
    if contents.coords is None:
        from .clam import read_clam_pt

        return read_clam_pt(path, contents=contents, **kw)
    return bag_from_contents(path, contents, **kw)

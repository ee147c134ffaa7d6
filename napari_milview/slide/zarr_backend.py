"""OME-Zarr (NGFF multiscales, 0.4 with zarr v2 files or 0.5 with zarr v3) backend.

RGB images are accepted as (c, y, x) or (y, x, c) with 3 channels (a 4th, alpha,
channel is dropped; 1 channel is shown as grey); leading ``t``/``z`` axes must have
size 1. The chunks along y and x are the tiles.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import numpy as np

from .pyramid import SlideError, SlideInfo, parse_mpp, validate_levels

#: Smallest y/x chunk edge streamed (unless the level itself is smaller).
MIN_CHUNK = 16

_UNIT_TO_UM = {"micrometer": 1.0, "micron": 1.0, "um": 1.0, "µm": 1.0,
               "nanometer": 1e-3, "nm": 1e-3, "millimeter": 1e3, "mm": 1e3}


def _root_attrs(path: Path) -> dict:
    if (path / "zarr.json").is_file():
        attrs = json.loads((path / "zarr.json").read_text()).get("attributes", {})
    else:
        attrs = json.loads((path / ".zattrs").read_text())
    return attrs.get("ome", attrs)


class OmeZarrBackend:
    """Tiles of an OME-Zarr image pyramid.

    Parameters
    ----------
    path : str
        The ``.zarr`` folder holding NGFF ``multiscales`` attributes.
    """

    name = "ome-zarr"

    def __init__(self, path: str):
        import zarr

        self.path = str(path)
        root = Path(path)
        try:
            attrs = _root_attrs(root)
            ms = attrs["multiscales"][0]
            datasets = ms["datasets"]
            axes = [a.get("name") if isinstance(a, dict) else str(a) for a in ms.get("axes", [])]
        except (OSError, ValueError, KeyError, IndexError, TypeError, AttributeError) as e:
            raise SlideError(self.path, f"invalid OME-Zarr multiscales metadata ({e!r})") from None
        if not (isinstance(datasets, list) and datasets
                and all(isinstance(d, dict) and isinstance(d.get("path"), str) for d in datasets)):
            raise SlideError(self.path, "invalid OME-Zarr multiscales metadata: 'datasets' must be "
                             "a non-empty list of {'path': ...}")
        for ds in datasets:
            # a level is an array inside this folder, never elsewhere on the disk
            if not (root / ds["path"]).resolve().is_relative_to(root.resolve()):
                raise SlideError(self.path, f"level path {ds['path']!r} points outside the folder")
        self._arrays = []
        for ds in datasets:
            try:
                self._arrays.append(zarr.open_array(str(root / ds["path"]), mode="r"))
            except Exception as e:  # noqa: BLE001 - any zarr failure is a bad file here
                raise SlideError(self.path, f"cannot open level {ds.get('path')!r}: {e}") from None
        a0 = self._arrays[0]
        if not axes:
            axes = ["c", "y", "x"] if a0.ndim == 3 and a0.shape[0] in (1, 3, 4) else \
                ["y", "x", "c"][: a0.ndim]
        if len(axes) != a0.ndim or "y" not in axes or "x" not in axes:
            raise SlideError(self.path, f"unsupported axes {axes} for arrays of {a0.ndim} dims")
        self._axes = axes
        for name in axes:
            if name not in ("y", "x", "c") and a0.shape[axes.index(name)] != 1:
                raise SlideError(self.path, f"axis {name!r} has size "
                                 f"{a0.shape[axes.index(name)]}; only 2-D RGB images are shown")
        nch = a0.shape[axes.index("c")] if "c" in axes else 1
        if nch not in (1, 3, 4):
            raise SlideError(self.path, f"{nch} channels; an RGB (3) or grey (1) image is needed")
        if a0.dtype not in (np.uint8, np.uint16):
            raise SlideError(self.path, f"pixel type {a0.dtype}; uint8 or uint16 is needed")
        iy, ix = axes.index("y"), axes.index("x")
        raw = []
        for k, arr in enumerate(self._arrays):
            chunks = arr.chunks
            ch, cw = int(chunks[iy]), int(chunks[ix])
            if ch < min(MIN_CHUNK, int(arr.shape[iy])) or cw < min(MIN_CHUNK, int(arr.shape[ix])):
                # one file per few pixels: a viewport would take millions of reads
                raise SlideError(self.path, f"level {k} is stored in chunks of {cw} x {ch} px; "
                                 f"streaming needs chunks of at least {MIN_CHUNK} x {MIN_CHUNK} px")
            raw.append(((int(arr.shape[iy]), int(arr.shape[ix])), 0.0, (ch, cw)))
        kept, notes = validate_levels(self.path, raw)
        self._arrays = [self._arrays[i] for i, _ in kept]
        mpp, unit = None, None
        try:
            scale = next(t["scale"] for t in datasets[kept[0][0]]["coordinateTransformations"]
                         if t.get("type") == "scale")
            unit = next((a.get("unit") for a in ms["axes"] if isinstance(a, dict)
                         and a.get("name") == "x"), None)
            if unit in _UNIT_TO_UM:
                f = _UNIT_TO_UM[unit]
                my, mx = parse_mpp(float(scale[iy]) * f), parse_mpp(float(scale[ix]) * f)
                mpp = (my, mx) if my and mx else None
        except (KeyError, StopIteration, TypeError, ValueError, IndexError):
            pass
        if mpp is None:
            notes.append("microns per pixel unknown (no scale with a length unit): the layer "
                         "is in pixel units")
        self.info = SlideInfo(
            path=self.path, vendor="ome-zarr", levels=tuple(lv for _, lv in kept), mpp=mpp,
            mpp_source="vendor" if mpp else "none", objective_power=None, associated=(),
            notes=tuple(notes), properties={"ome-zarr.axes": ",".join(axes),
                                            "ome-zarr.unit": str(unit)},
        )

    def _chunk_exists(self, arr, coords: tuple[int, ...]) -> bool:
        key = arr.metadata.encode_chunk_key(coords)
        sp = arr.store_path
        root = getattr(sp.store, "root", None)
        if root is not None:  # a local folder: one stat
            return os.path.isfile(os.path.join(str(root), sp.path, key))
        from zarr.core.sync import sync

        return bool(sync(sp.store.exists(f"{sp.path}/{key}" if sp.path else key)))

    def check_chunks(self, level: int, y: int, x: int, h: int, w: int) -> None:
        """Raise ValueError when a chunk (or shard) holding part of the region is absent
        from the store. zarr reads an absent chunk as the fill value, so a deleted chunk,
        a lost folder or a shape enlarged past the written chunks would pass as flat
        colour; missing data is a bad tile here, never blank."""
        arr = self._arrays[level]
        grid = getattr(arr, "shards", None) or arr.chunks
        ranges = []
        for i, name in enumerate(self._axes):
            g = int(grid[i])
            if name == "y":
                ranges.append(range(y // g, (y + h - 1) // g + 1))
            elif name == "x":
                ranges.append(range(x // g, (x + w - 1) // g + 1))
            elif name == "c":
                ranges.append(range(-(-int(arr.shape[i]) // g)))
            else:
                ranges.append(range(1))
        for coords in itertools.product(*ranges):
            if not self._chunk_exists(arr, coords):
                key = arr.metadata.encode_chunk_key(coords)
                raise ValueError(f"chunk {key!r} of level {level} is missing from the store "
                                 "(zarr would read it as the fill value)")

    def read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """(h, w, 3) uint8 pixels of a region of ``level`` (level pixels).

        Raises
        ------
        ValueError
            When a chunk holding part of the region is missing from the store.
        """
        self.check_chunks(level, y, x, h, w)
        arr = self._arrays[level]
        sel = []
        for name in self._axes:
            sel.append(slice(y, y + h) if name == "y" else slice(x, x + w) if name == "x"
                       else slice(None) if name == "c" else 0)
        block = np.asarray(arr[tuple(sel)])
        kept_axes = [n for n in self._axes if n in ("y", "x", "c")]
        order = [kept_axes.index(n) for n in ("y", "x", "c") if n in kept_axes]
        block = block.transpose(order)
        if block.ndim == 2:
            block = block[:, :, None]
        if block.dtype == np.uint16:
            block = (block >> 8).astype(np.uint8)
        if block.shape[2] == 1:
            block = np.repeat(block, 3, axis=2)
        return np.ascontiguousarray(block[:, :, :3])

    def associated_image(self, name: str) -> np.ndarray:
        raise KeyError(f"{self.path}: OME-Zarr images have no associated image {name!r}")

    def close(self) -> None:
        self._arrays = []

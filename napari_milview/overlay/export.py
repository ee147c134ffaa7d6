"""Exports of a :class:`~napari_milview.result.Result`: CSV, CLAM h5, OME-TIFF, crops, sidecar.

Every file is written to a temporary name in its folder and renamed into place (atomic).

* :func:`write_csv` - one row per patch: ``index, x, y, patch_size_level0`` and one column per
  attention source (raw scores, bag order);
* :func:`write_clam_h5` - CLAM's heatmap asset layout: ``attention_scores`` [N, 1] float32 and
  ``coords`` [N, 2] int64 (with ``patch_size_level0`` as an attribute, as TRIDENT stores it);
* :func:`write_heatmap_tiff` - the heatmap as a pyramidal OME-TIFF: the **float32 grid**
  (normalised scores, NaN = no patch; not colour-mapped), pixel (0, 0) at level-0 (0, 0) and
  ``PhysicalSizeX/Y`` = cell x mpp in µm, reduced levels as SubIFDs; :func:`read_heatmap_tiff`
  reads it back (and :func:`heatmap_tiff_info` recognises it);
* :func:`write_topk_crops` - each selected patch read from the slide as a PNG;
* :func:`write_sidecar` / :func:`read_sidecar` / :func:`layers_from_sidecar` - a JSON record of
  slide, mpp, bag source, model, attention source, normalisation and package versions, next to
  the result h5 it points at; it restores the slide, heatmap and top-K layers.
"""

from __future__ import annotations

import csv
import json
import os
import re
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._io import atomic_write
from .heatmap import heatmap_grid, heatmap_layer
from .normalise import method_name, normalise
from .topk import select, topk_layer

if TYPE_CHECKING:
    from ..result import Result

__all__ = ["SIDECAR_FORMAT", "SIDECAR_SUFFIX", "atomic_write", "heatmap_tiff_info",
           "layers_from_sidecar", "package_versions", "read_heatmap_tiff", "read_sidecar",
           "write_clam_h5", "write_csv", "write_heatmap_tiff", "write_sidecar",
           "write_topk_crops"]

SIDECAR_FORMAT = "napari-milview-sidecar"
SIDECAR_SUFFIX = ".milview.json"
SIDECAR_VERSION = 1


# --------------------------------------------------------------------------------------------
# tables
# --------------------------------------------------------------------------------------------
def write_csv(result: Result, path: str | os.PathLike) -> Path:
    """One row per patch (bag order): ``index, x, y, patch_size_level0, <each source>``."""
    names = list(result.sources)
    cols = [result.sources[k] for k in names]

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            w = csv.writer(fh)
            w.writerow(["index", "x", "y", "patch_size_level0", *names])
            ps = int(result.patch_size_level0)
            for i, (x, y) in enumerate(result.coords.tolist()):
                w.writerow([i, x, y, ps, *(repr(float(c[i])) for c in cols)])

    return atomic_write(path, write)


def write_clam_h5(result: Result, path: str | os.PathLike, source: str | None = None) -> Path:
    """CLAM heatmap h5: ``attention_scores`` [N, 1] float32 (raw ``source``), ``coords`` [N, 2].

    CLAM stores the raw (pre-percentile) scores here, so this writes the raw ones too.
    """
    import h5py

    scores = result.attention(source).astype(np.float32).reshape(-1, 1)

    def write(tmp: Path) -> None:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("attention_scores", data=scores)
            c = f.create_dataset("coords", data=result.coords.astype(np.int64))
            c.attrs["patch_size_level0"] = int(result.patch_size_level0)
            c.attrs["patch_level"] = 0
            c.attrs["patch_size"] = int(result.patch_size_level0)
            f.attrs["source"] = result.default_source if source is None else source

    return atomic_write(path, write)


# --------------------------------------------------------------------------------------------
# OME-TIFF
# --------------------------------------------------------------------------------------------
def _half(a: np.ndarray) -> np.ndarray:
    """2x2 NaN-mean downsample of [H, W] (odd edges padded with NaN)."""
    h, w = a.shape
    p = np.full((h + h % 2, w + w % 2), np.nan, dtype=np.float32)
    p[:h, :w] = a
    blocks = p.reshape(p.shape[0] // 2, 2, p.shape[1] // 2, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN blocks stay NaN
        return np.nanmean(blocks, axis=(1, 3)).astype(np.float32)


def write_heatmap_tiff(result: Result, path: str | os.PathLike, source: str | None = None,
                       method: str = "raw", *, mpp: float | None = None,
                       vmin: float | None = None, vmax: float | None = None,
                       zoom: float = 1.0, min_side: int = 64, tile: int = 256) -> Path:
    """The heatmap as a pyramidal OME-TIFF of the float32 grid (NaN = no patch).

    The grid starts at level-0 (0, 0) (padded with NaN up to the first patch), so a viewer
    places it over the slide by scaling alone: TIFF pixel (i, j) covers level-0 pixels
    [j c, (j + 1) c) x [i c, (i + 1) c) with c the cell side; ``PhysicalSizeX/Y`` = c x mpp µm
    (no physical size when the mpp is unknown). Reduced levels (2x, NaN-mean) are SubIFDs until
    the longer side is at most ``min_side``.

    Returns
    -------
    Path
        ``path``; the OME image ``Name`` records the source, method and cell side.
    """
    import tifffile

    m = method_name(method)
    values = normalise(result.attention(source), m, vmin=vmin, vmax=vmax, zoom=zoom)
    grid, (x0, y0), cell = heatmap_grid(result.coords, result.patch_size_level0, None,
                                        values, origin_level0=(0, 0))
    assert (x0, y0) == (0, 0)
    levels = [grid]
    while max(levels[-1].shape) > min_side and min(levels[-1].shape) > 1:
        levels.append(_half(levels[-1]))
    um = result.mpp if mpp is None else float(mpp)
    src = result.default_source if source is None else source
    meta: dict[str, Any] = {"axes": "YX", "Name": f"attention {src} ({m}); cell {cell} px"}
    kw: dict[str, Any] = {"photometric": "minisblack", "compression": "zlib",
                          "tile": (tile, tile)}
    if um is not None:
        meta.update(PhysicalSizeX=cell * um, PhysicalSizeXUnit="µm",
                    PhysicalSizeY=cell * um, PhysicalSizeYUnit="µm")

    def res(level: int) -> dict:
        if um is None:
            return {}
        px_per_cm = 1e4 / (cell * um * 2**level)
        return {"resolution": (px_per_cm, px_per_cm), "resolutionunit": "CENTIMETER"}

    def write(tmp: Path) -> None:
        with tifffile.TiffWriter(tmp, ome=True, bigtiff=grid.nbytes > 2**31) as tw:
            tw.write(levels[0], subifds=len(levels) - 1, metadata=meta, **kw, **res(0))
            for i, lvl in enumerate(levels[1:], start=1):
                tw.write(lvl, subfiletype=1, metadata=None, **kw, **res(i))

    return atomic_write(path, write)


#: The OME image ``Name`` that :func:`write_heatmap_tiff` writes:
#: "attention SOURCE (METHOD); cell C px".
_HEATMAP_NAME = re.compile(
    r"attention (?P<source>.*) \((?P<method>[^()]*)\); cell (?P<cell>\d+) px")


def heatmap_tiff_info(path: str | os.PathLike) -> dict | None:
    """What :func:`write_heatmap_tiff` recorded in ``path``, or None for any other file.

    Reads the OME-XML of the first page only (cheap) and never raises.

    Returns
    -------
    dict or None
        ``source``, ``method``, ``cell_level0`` (int) and ``mpp`` (µm per level-0 pixel,
        ``PhysicalSizeX / cell``; None when the file has no physical size).
    """
    try:
        import xml.etree.ElementTree as ET

        import tifffile

        with tifffile.TiffFile(os.fspath(path)) as tf:
            if not tf.is_ome:
                return None
            ome = ET.fromstring(tf.ome_metadata)
    except Exception:  # noqa: BLE001 - a sniffer answers, it never raises
        return None
    images = [e for e in ome if e.tag.endswith("}Image")]
    pixels = [e for e in images[0] if e.tag.endswith("}Pixels")] if len(images) == 1 else []
    m = _HEATMAP_NAME.fullmatch(images[0].get("Name", "")) if pixels else None
    if m is None or pixels[0].get("Type") != "float":
        return None
    cell = int(m["cell"])
    try:
        mpp = float(pixels[0].get("PhysicalSizeX")) / cell
    except (TypeError, ValueError):
        mpp = None
    return {"source": m["source"], "method": m["method"], "cell_level0": cell, "mpp": mpp}


def read_heatmap_tiff(path: str | os.PathLike) -> tuple[np.ndarray, dict]:
    """Read back a heatmap OME-TIFF written by :func:`write_heatmap_tiff`.

    Returns
    -------
    grid : np.ndarray
        [H, W] float32, the full-resolution level (NaN = no patch); cell (i, j) covers
        level-0 pixels [j c, (j + 1) c) x [i c, (i + 1) c), c = ``info["cell_level0"]``.
    info : dict
        :func:`heatmap_tiff_info`.

    Raises
    ------
    ValueError
        One line naming the file, when it is not such a heatmap or cannot be read.
    """
    import tifffile

    info = heatmap_tiff_info(path)
    if info is None:
        raise ValueError(f"{path}: not a napari-milview heatmap OME-TIFF")
    try:
        with tifffile.TiffFile(os.fspath(path)) as tf:
            grid = tf.series[0].levels[0].asarray()
    except Exception as e:  # noqa: BLE001 - whatever tifffile or its codec raised
        raise ValueError(f"{path}: cannot read the heatmap ({type(e).__name__}: {e})") from None
    if grid.ndim != 2:
        raise ValueError(f"{path}: heatmap of shape {grid.shape}; a 2-D grid is expected")
    return grid.astype(np.float32, copy=False), info


# --------------------------------------------------------------------------------------------
# crops
# --------------------------------------------------------------------------------------------
def write_topk_crops(result: Result, folder: str | os.PathLike, indices: np.ndarray, *,
                     source: str | None = None, slide: Any = None) -> list[Path]:
    """Read each selected patch from the slide (level 0) and save it as a PNG.

    Parameters
    ----------
    indices : np.ndarray
        [K] bag indices, best first; rank = position + 1.
    slide : str, PathLike or Slide, optional
        The slide (default ``result.slide``), read with
        ``open_slide(path).read_region((x, y), 0, (s, s))``.

    Returns
    -------
    list[Path]
        ``rank{r:03d}_idx{i}_x{x}_y{y}_score{score:.4g}.png`` in ``folder``, in rank order.
    """
    from PIL import Image

    from ..slide import open_slide

    out = Path(folder)
    if not out.is_dir():
        raise FileNotFoundError(f"{out}: no such folder")
    src = slide if slide is not None else result.slide
    if src is None:
        raise ValueError("top-K crops need the slide: the result does not name one, pass slide=")
    own = isinstance(src, str | os.PathLike)
    s = open_slide(src) if own else src
    scores = result.attention(source)
    ps = int(result.patch_size_level0)
    paths = []
    try:
        for rank, i in enumerate(np.asarray(indices, dtype=np.int64).reshape(-1), start=1):
            x, y = (int(v) for v in result.coords[i])
            img = np.asarray(s.read_region((x, y), 0, (ps, ps)))[..., :3]
            name = f"rank{rank:03d}_idx{int(i)}_x{x}_y{y}_score{float(scores[i]):.4g}.png"
            paths.append(atomic_write(out / name,
                                      lambda tmp, im=img: Image.fromarray(im).save(tmp, "PNG")))
    finally:
        if own:
            s.close()
    return paths


# --------------------------------------------------------------------------------------------
# sidecar
# --------------------------------------------------------------------------------------------
def package_versions() -> dict[str, str | None]:
    """Installed versions of the packages a result depends on (None when not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("napari-milview", "torch", "napari", "openslide-python", "openslide-bin",
                 "numpy", "h5py", "tifffile"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def write_sidecar(path: str | os.PathLike, result: Result, *, source: str | None = None,
                  method: str = "raw", bag_source: str | None = None,
                  result_path: str | os.PathLike | None = None, vmin: float | None = None,
                  vmax: float | None = None, zoom: float = 1.0, colormap: str = "inferno",
                  topk: dict | None = None, extra: dict | None = None) -> Path:
    """Write the JSON sidecar that records (and restores) a view of ``result``.

    Parameters
    ----------
    path : str or PathLike
        The sidecar, by convention ``<slide>.milview.json`` (:data:`SIDECAR_SUFFIX`).
    source, method, vmin, vmax, zoom, colormap
        What the heatmap shows.
    bag_source : str, optional
        Where the features came from (a bag file, or "extracted with <encoder>").
    result_path : str or PathLike, optional
        The result h5 already saved; when None the result is saved next to the sidecar as
        ``<name>.result.h5``. Stored relative to the sidecar when in the same tree.
    topk : dict, optional
        ``{"k", "mode", "lo", "hi"}`` of the top-K layer (default top 20), selected on the
        raw scores of ``source`` (see :func:`~napari_milview.overlay.topk.select`).
    """
    from ..result import save_result

    dest = Path(path)
    src = result.default_source if source is None else source
    result.attention(src)  # unknown source -> KeyError before anything is written
    m = method_name(method)
    if result_path is None:
        stem = dest.name[: -len(SIDECAR_SUFFIX)] if dest.name.endswith(SIDECAR_SUFFIX) \
            else dest.stem
        result_path = save_result(result, dest.with_name(f"{stem}.result.h5"))
    rp = Path(result_path)
    try:
        stored = os.path.relpath(rp.resolve(), dest.parent.resolve())
    except ValueError:  # another drive (Windows)
        stored = str(rp.resolve())
    doc = {
        "format": SIDECAR_FORMAT, "version": SIDECAR_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "slide": result.slide, "slide_id": result.slide_id, "mpp": result.mpp,
        "bag_source": bag_source, "encoder": result.encoder, "model": result.model,
        "arch": result.arch, "device": result.device, "classes": list(result.classes),
        "probabilities": [float(p) for p in result.probabilities],
        "predicted_class": result.predicted_class, "n_instances": result.n,
        "patch_size_level0": result.patch_size_level0, "result": stored,
        "attention_source": src,
        "normalisation": {"method": m, "vmin": vmin, "vmax": vmax, "zoom": zoom},
        "colormap": colormap,
        "topk": {"k": 20, "mode": "top", "lo": None, "hi": None, **(topk or {})},
        "versions": package_versions(),
        "extra": extra or {},
    }
    text = json.dumps(doc, indent=1, allow_nan=False, default=str)
    return atomic_write(dest, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_sidecar(path: str | os.PathLike) -> dict:
    """Read a sidecar; ``"result"`` comes back as an absolute path. Errors name the file."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ValueError(f"{p}: cannot read the sidecar ({e.strerror or e})") from None
    except ValueError as e:
        raise ValueError(f"{p}: not a JSON sidecar ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != SIDECAR_FORMAT:
        raise ValueError(f"{p}: not a napari-milview sidecar (no format {SIDECAR_FORMAT!r})")
    if int(doc.get("version", 0)) > SIDECAR_VERSION:
        raise ValueError(f"{p}: written by a newer napari-milview (sidecar version "
                         f"{doc['version']}); upgrade napari-milview")
    if not doc.get("result"):
        raise ValueError(f"{p}: the sidecar names no result file")
    doc["result"] = str((p.parent / doc["result"]).resolve())
    return doc


def layers_from_sidecar(path: str | os.PathLike) -> list[tuple]:
    """The layers a sidecar describes: slide (when its file exists), heatmap, top-K.

    Returns
    -------
    list[tuple]
        napari ``(data, kwargs, layer_type)`` tuples. A missing slide file gives a warning
        and no slide layer; a missing result file raises ValueError naming both files.
    """
    from ..result import load_result

    doc = read_sidecar(path)
    if not Path(doc["result"]).is_file():
        raise ValueError(f"{path}: its result file {doc['result']} does not exist")
    result = load_result(doc["result"])
    layers: list[tuple] = []
    mpp = doc.get("mpp", result.mpp)
    slide = doc.get("slide") or result.slide
    if slide and Path(slide).exists():
        from ..slide import open_slide
        from .slide_layer import layer_data

        s = open_slide(slide)
        layers.append(layer_data(s))
        if s.info.mpp is not None:
            mpp = s.info.mpp[0]
    elif slide:
        warnings.warn(f"{path}: slide {slide} not found; showing the heatmap without it",
                      stacklevel=2)
    norm = doc.get("normalisation") or {}
    layers.append(heatmap_layer(result, doc.get("attention_source"), norm.get("method", "raw"),
                                mpp=mpp, colormap=doc.get("colormap", "inferno"),
                                vmin=norm.get("vmin"), vmax=norm.get("vmax"),
                                zoom=norm.get("zoom", 1.0)))
    tk = doc.get("topk") or {}
    src = doc.get("attention_source")
    idx = select(result.attention(src), tk.get("k", 20), tk.get("mode", "top"),
                 tk.get("lo"), tk.get("hi"))
    layers.append(topk_layer(result, idx, src, mpp=mpp))
    for _, kwargs, _ in layers[-2:]:  # what a MIL dock opened later adopts (and the reader's
        kwargs["metadata"]["restored_from"] = str(path)  # colour bar)
    return layers

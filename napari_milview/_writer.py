"""npe2 writers: a heatmap layer's result -> GeoJSON, CSV, CLAM h5, OME-TIFF, JSON sidecar.

Each writer takes one image layer made by
:func:`~napari_milview.overlay.heatmap.heatmap_layer` (the "attention" layer of the MIL
dock, or one restored from a sidecar): its ``metadata`` holds ``milview="heatmap"``, the
attention ``source``, the normalisation ``method`` and the :class:`~napari_milview.result.Result`
itself (``metadata["result"]``). The exports are the ones of
:mod:`napari_milview.overlay.export` with the layer's own source and normalisation::

    viewer.layers.save("slide.geojson", selected=True, plugin="napari-milview")

Any other layer, or the partial heatmap of a run still in progress, is refused with one
error naming the layer.
"""

from __future__ import annotations

from typing import Any

__all__ = ["heatmap_result", "write_clam_h5", "write_csv", "write_geojson",
           "write_heatmap_tiff", "write_sidecar"]


def heatmap_result(path: str, meta: dict) -> tuple[Any, dict]:
    """The Result and the milview metadata of a heatmap layer's state ``meta``.

    Raises
    ------
    TypeError
        ``meta`` is not a napari-milview heatmap.
    RuntimeError
        It shows the partial result of a run still going.

    napari turns a writer's ``ValueError`` into "not a valid writer" and drops the message,
    hence these two types.
    """
    from .overlay.heatmap import PENDING

    md = meta.get("metadata") or {}
    name = meta.get("name", "?")
    result = md.get("result")
    if md.get("milview") == PENDING:
        raise RuntimeError(f"{path}: layer {name!r} is waiting for its run's first result; "
                           "save it when the run has finished")
    if md.get("milview") != "heatmap" or result is None:
        raise TypeError(f"{path}: layer {name!r} is not a napari-milview heatmap; save the "
                         "'attention' layer a MIL run (or an opened sidecar) made")
    if result.meta.get("partial"):
        raise RuntimeError(f"{path}: layer {name!r} shows a partial result (the run is still "
                         "going); save it when the run has finished")
    return result, md


def _norm_params(md: dict, meta: dict) -> dict:
    """The parameters of the layer's normalisation: vmin/vmax of ``fixed`` (the layer's
    contrast limits), the zoom of ``attention_x_n``."""
    if md.get("method") == "attention_x_n":
        return {"zoom": float(md.get("zoom", 1.0))}
    if md.get("method") != "fixed":
        return {}
    lo, hi = meta["contrast_limits"]
    return {"vmin": float(lo), "vmax": float(hi)}


def write_geojson(path: str, data: Any, meta: dict) -> list[str]:
    """QuPath GeoJSON: one detection per patch (the layer's source), top 20 as annotations.

    ``data`` is the heatmap grid [H, W] (unused: everything comes from the Result).
    """
    from .overlay.geojson import to_geojson

    result, md = heatmap_result(path, meta)
    to_geojson(result, path, source=md.get("source"))
    return [path]


def write_csv(path: str, data: Any, meta: dict) -> list[str]:
    """One row per patch: index, x, y, patch size and every attention source (raw)."""
    from .overlay.export import write_csv as _write

    result, _ = heatmap_result(path, meta)
    return [str(_write(result, path))]


def write_clam_h5(path: str, data: Any, meta: dict) -> list[str]:
    """CLAM heatmap h5: ``attention_scores`` [N, 1] (raw, the layer's source), ``coords``."""
    from .overlay.export import write_clam_h5 as _write

    result, md = heatmap_result(path, meta)
    return [str(_write(result, path, source=md.get("source")))]


def write_heatmap_tiff(path: str, data: Any, meta: dict) -> list[str]:
    """The heatmap (the layer's source and normalisation) as a pyramidal OME-TIFF."""
    from .overlay.export import write_heatmap_tiff as _write

    result, md = heatmap_result(path, meta)
    return [str(_write(result, path, source=md.get("source"), method=md.get("method", "raw"),
                       mpp=md.get("mpp"), **_norm_params(md, meta)))]


def write_sidecar(path: str, data: Any, meta: dict) -> list[str]:
    """The ``.milview.json`` sidecar plus ``<name>.result.h5`` beside it (restores the view)."""
    from .overlay.export import read_sidecar
    from .overlay.export import write_sidecar as _write

    result, md = heatmap_result(path, meta)
    cmap = meta.get("colormap")
    cmap = cmap.get("name") if isinstance(cmap, dict) else cmap
    out = _write(path, result, source=md.get("source"), method=md.get("method", "raw"),
                 colormap=str(cmap or "inferno"), **_norm_params(md, meta))
    return [str(out), read_sidecar(out)["result"]]

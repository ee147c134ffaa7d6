"""Results -> napari layer data and exports (Qt-free; napari is never imported here).

Layer data are napari ``(data, kwargs, layer_type)`` tuples, shared by the widgets and the
readers: :func:`heatmap_layer` (``"image"``), :func:`topk_layer` (``"shapes"``), and the slide
itself, :func:`~napari_milview.overlay.slide_layer.layer_data` (``"image"``, multiscale).
"""

from .heatmap import heatmap_grid, heatmap_layer, level0_to_world, value_at, world_to_level0
from .normalise import METHODS, contrast_limits, method_name, normalise
from .topk import patch_rectangles, select, topk_layer

__all__ = ["METHODS", "contrast_limits", "heatmap_grid", "heatmap_layer", "level0_to_world",
           "method_name", "normalise", "patch_rectangles", "select", "topk_layer", "value_at",
           "world_to_level0"]

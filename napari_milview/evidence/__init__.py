"""Evidence: how a model's attention compares with what a pathologist outlined (Qt-free).

:mod:`.annotations` reads QuPath GeoJSON and ASAP XML (CAMELYON16/17) outlines, converts
drawn polygons, label images and masks, writes both formats back, and gives each patch its
overlap with the positive regions (:func:`patch_overlap`, :func:`patch_labels`).
"""

from .annotations import (
    AnnotationError,
    Annotations,
    Region,
    from_labels,
    from_mask,
    from_polygons,
    patch_labels,
    patch_overlap,
    read_annotations,
    read_asap_xml,
    read_geojson,
    to_mask,
    write_asap_xml,
    write_geojson,
)

__all__ = [
    "AnnotationError",
    "Annotations",
    "Region",
    "from_labels",
    "from_mask",
    "from_polygons",
    "patch_labels",
    "patch_overlap",
    "read_annotations",
    "read_asap_xml",
    "read_geojson",
    "to_mask",
    "write_asap_xml",
    "write_geojson",
]

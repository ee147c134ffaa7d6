"""Evidence: how a model's attention compares with what a pathologist outlined, and whether
the prediction follows it (Qt-free; docs/EVIDENCE.md).

:mod:`.annotations` reads QuPath GeoJSON and ASAP XML (CAMELYON16/17) outlines, converts
drawn polygons, label images and masks, writes both formats back, and gives each patch its
overlap with the positive regions (:func:`patch_overlap`, :func:`patch_labels`).
:mod:`.metrics` (localisation, concentration), :mod:`.faithfulness` (deletion / insertion,
what if), :mod:`.disagreement` (several checkpoints, run on one bag by :mod:`.folds`) and
:mod:`.report` (:func:`evaluate`) measure; :mod:`.plots` draws the curves as PNG bytes.
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
from .disagreement import disagreement
from .faithfulness import deletion_insertion, descending, what_if, what_if_regions
from .folds import fold_maps
from .metrics import concentration, localisation
from .report import EvidenceReport, evaluate

__all__ = [
    "AnnotationError",
    "Annotations",
    "EvidenceReport",
    "Region",
    "concentration",
    "deletion_insertion",
    "descending",
    "disagreement",
    "evaluate",
    "fold_maps",
    "from_labels",
    "from_mask",
    "from_polygons",
    "localisation",
    "patch_labels",
    "patch_overlap",
    "read_annotations",
    "read_asap_xml",
    "read_geojson",
    "to_mask",
    "what_if",
    "what_if_regions",
    "write_asap_xml",
    "write_geojson",
]

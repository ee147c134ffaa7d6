"""Stain estimation, normalisation and perturbation conditions (Qt-free).

>>> from napari_milview.stain import estimate_slide, make_condition   # doctest: +SKIP
>>> stain = estimate_slide("slide.svs")                               # doctest: +SKIP
>>> low = make_condition("low-intensity", stain)                      # doctest: +SKIP
>>> patches_low = low(patches)             # [B, H, W, 3] uint8 -> same  # doctest: +SKIP
>>> preview = lazy_preview(slide.to_dask(), low)                      # doctest: +SKIP
"""

from ._common import StainEstimateError, angle_deg, concentrations, rgb_to_od
from .conditions import (
                         CONDITIONS,
                         DEFAULT_REFERENCE,
                         Reference,
                         load_reference,
                         make_condition,
                         normalise_to,
                         save_reference,
)
from .estimate import SlideStain, estimate_slide, estimate_tiles
from .hed import HEDJitter, hed_jitter
from .macenko import MacenkoFit, fit_macenko
from .perturb import Perturbation, StainPerturbation, lazy_preview
from .reinhard import Reinhard, lab_stats

__all__ = [
    "CONDITIONS",
    "DEFAULT_REFERENCE",
    "HEDJitter",
    "MacenkoFit",
    "Perturbation",
    "Reference",
    "Reinhard",
    "SlideStain",
    "StainEstimateError",
    "StainPerturbation",
    "angle_deg",
    "concentrations",
    "estimate_slide",
    "estimate_tiles",
    "hed_jitter",
    "lab_stats",
    "lazy_preview",
    "load_reference",
    "fit_macenko",
    "make_condition",
    "normalise_to",
    "rgb_to_od",
    "save_reference",
]

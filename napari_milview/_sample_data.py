"""npe2 sample data: a synthetic H&E slide with a planted lesion, made on first use.

The slide itself (:data:`SAMPLE`, where it is cached, how it is written) lives in the core,
:mod:`napari_milview.synthetic`; the names stay importable from here.
"""

from __future__ import annotations

from .synthetic import SAMPLE, sample_dir, sample_slide_path

__all__ = ["SAMPLE", "sample_dir", "sample_lesion_slide", "sample_slide_path"]


def sample_lesion_slide():
    """napari sample: the synthetic slide with a planted lesion, opened by our reader."""
    from ._reader import read_slide

    return read_slide(str(sample_slide_path(lesion=True)))

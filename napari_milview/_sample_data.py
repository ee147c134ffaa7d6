"""npe2 sample data: a synthetic H&E slide with a planted lesion, made on first use.

The slide itself (:data:`SAMPLE`, where it is cached, how it is written) lives in the core,
:mod:`napari_milview.synthetic`; the names stay importable from here. The cache (about 70 MB
for the lesion slide and its sidecars) sits in the platform's user cache folder
(:func:`sample_dir`); :func:`clear_sample_cache` removes it, and the next open writes it again
(a few seconds).
"""

from __future__ import annotations

import shutil

from .synthetic import SAMPLE, sample_dir, sample_slide_path

__all__ = ["SAMPLE", "clear_sample_cache", "sample_cache_bytes", "sample_dir",
           "sample_lesion_slide", "sample_slide_path"]


def sample_lesion_slide():
    """napari sample: the synthetic slide with a planted lesion, opened by our reader."""
    from ._reader import read_slide

    return read_slide(str(sample_slide_path(lesion=True)))


def sample_cache_bytes() -> int:
    """Bytes the cached sample slides take (0 when none was written yet)."""
    d = sample_dir()
    return sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) if d.is_dir() else 0


def clear_sample_cache() -> int:
    """Delete the cached sample slides (:func:`sample_dir`); returns the bytes freed."""
    n = sample_cache_bytes()
    shutil.rmtree(sample_dir(), ignore_errors=True)
    return n

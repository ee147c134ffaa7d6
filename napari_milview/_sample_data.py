"""npe2 sample data: a synthetic H&E slide with a planted lesion, made on first use."""

from __future__ import annotations

import os
from pathlib import Path

#: The bundled default slide: 20x-like, small enough to write in a few seconds.
SAMPLE = {"width": 20_000, "height": 15_000, "mpp": 0.5, "tile": 256, "levels": 3, "seed": 7}


def sample_dir() -> Path:
    """Where generated samples live (``$MILVIEW_CACHE_DIR`` or ``~/.cache/napari-milview``)."""
    env = os.environ.get("MILVIEW_CACHE_DIR")
    base = Path(env) if env else Path(os.path.expanduser("~")) / ".cache" / "napari-milview"
    return base / "samples"


def sample_slide_path(lesion: bool = True) -> Path:
    """Path of the sample slide, writing it first if needed (content depends only on SAMPLE)."""
    from .synthetic import write_synthetic_slide

    tag = "lesion" if lesion else "normal"
    size = f"{SAMPLE['width']}x{SAMPLE['height']}"
    out = sample_dir() / f"synthetic-{tag}-s{SAMPLE['seed']}-{size}.svs"
    if not (out.exists() and out.with_suffix(".json").exists()):
        import tempfile

        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
            res = write_synthetic_slide(Path(tmp) / out.name, lesion=lesion, **SAMPLE)
            # sidecars first, the slide last: a crash never leaves a slide without its truth
            for src in (res.mask_path, res.json_path, res.path):
                os.replace(src, out.parent / src.name)
    return out


def sample_lesion_slide():
    """napari sample: the synthetic slide with a planted lesion, opened by our reader."""
    from ._reader import read_slide

    return read_slide(str(sample_slide_path(lesion=True)))

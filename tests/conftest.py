"""Shared fixtures: synthetic slides written once per session, and an isolated config."""

from __future__ import annotations

from pathlib import Path

import pytest

DATA = Path(__file__).parent / "data"
REAL_SLIDE = DATA / "CMU-1-Small-Region.svs"


@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path_factory, monkeypatch):
    """Never read or write the user's real config or cache (mpp overrides, samples)."""
    base = tmp_path_factory.getbasetemp()
    monkeypatch.setenv("MILVIEW_CONFIG_DIR", str(base / "config"))
    monkeypatch.setenv("MILVIEW_CACHE_DIR", str(base / "cache"))


def _synth(tmp_path_factory, name: str, **kw):
    from napari_milview.synthetic import write_synthetic_slide

    out = tmp_path_factory.mktemp(name) / f"{name}.svs"
    return write_synthetic_slide(out, **kw)


@pytest.fixture(scope="session")
def svs(tmp_path_factory):
    """Aperio-like SVS, 4480 x 3456 (not a multiple of the 256 tile; downsamples 1, 4, 16
    exactly), with a planted lesion. Returns the ``SyntheticSlide`` record."""
    return _synth(tmp_path_factory, "svs", width=4480, height=3456, mpp=0.25, tile=256,
                  levels=3, seed=11, lesion=True, ome_zarr=True)


@pytest.fixture(scope="session")
def odd_svs(tmp_path_factory):
    """Odd sizes everywhere (2001 x 1533): levels whose downsample is not an integer."""
    return _synth(tmp_path_factory, "odd", width=2001, height=1533, mpp=0.5, tile=240,
                  levels=3, seed=5, lesion=False)


@pytest.fixture(scope="session")
def generic_tiff(tmp_path_factory, svs):
    """A generic tiled TIFF pyramid (levels as top-level pages, mpp in XResolution px/cm),
    pixels copied from ``svs`` so both can be compared."""
    import numpy as np
    import openslide
    import tifffile

    out = tmp_path_factory.mktemp("generic") / "generic.tif"
    osr = openslide.OpenSlide(str(svs.path))
    res = 1e4 / svs.mpp  # pixels per centimetre
    with tifffile.TiffWriter(out) as tw:
        for lvl in range(osr.level_count):
            w, h = osr.level_dimensions[lvl]
            ds = osr.level_downsamples[lvl]
            img = np.asarray(osr.read_region((0, 0), lvl, (w, h)))[:, :, :3]
            tw.write(img, tile=(128, 128), compression="jpeg", photometric="rgb",
                     resolution=(res / ds, res / ds), resolutionunit="CENTIMETER",
                     subfiletype=0 if lvl == 0 else 1, metadata=None)
    osr.close()
    return out


@pytest.fixture(scope="session")
def real_svs():
    """The real Aperio CMU-1-Small-Region slide (fetched by ``make test-data``)."""
    if not REAL_SLIDE.exists():
        pytest.skip(f"{REAL_SLIDE} missing: run `make test-data` (fetched at test-setup time)")
    return REAL_SLIDE

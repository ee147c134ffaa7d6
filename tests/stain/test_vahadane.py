"""Vahadane needs the optional spams; without it the error names the dependency."""

from __future__ import annotations

import importlib.util

import pytest
from stain_synth import RUIFROK, he_concentrations, render, unit

from napari_milview.stain._common import angle_deg
from napari_milview.stain.vahadane import vahadane

HAVE_SPAMS = importlib.util.find_spec("spams") is not None


@pytest.mark.skipif(HAVE_SPAMS, reason="spams is installed")
def test_without_spams_the_error_names_it():
    with pytest.raises(ImportError, match="spams"):
        vahadane(render(he_concentrations(32, 32), RUIFROK))


@pytest.mark.skipif(not HAVE_SPAMS, reason="needs the optional spams")
def test_known_vectors():
    rgb = render(he_concentrations(128, 128, seed=2), RUIFROK, 240.0, seed=2)
    m = vahadane(rgb, i0=240.0)
    assert angle_deg(m[0], unit(RUIFROK)[0]) < 8 and angle_deg(m[1], unit(RUIFROK)[1]) < 8

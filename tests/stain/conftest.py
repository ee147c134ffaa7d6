"""Fixtures of the stain tests."""

from __future__ import annotations

import pytest
from stain_synth import RUIFROK, he_concentrations, render, unit


@pytest.fixture(scope="session")
def he_tile():
    """(rgb [256, 256, 3] uint8, conc [256, 256, 2], matrix [2, 3], i0) from Ruifrok's H&E."""
    conc = he_concentrations(256, 256, seed=1)
    return render(conc, RUIFROK, 240.0, seed=1), conc, unit(RUIFROK), 240.0

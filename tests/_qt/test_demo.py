"""`milview demo --screenshot`: the README's run command, end to end in a real napari window.

Runs the command in a subprocess on the small ``svs`` fixture (a planted lesion) under the
current display (pytest runs under Xvfb; without a display the command starts xvfb-run
itself): the shipped demo encoder and model run, the window is drawn, the PNG is checked.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.gui

#: inferno's top colour: the colour bar draws it unblended
INFERNO_TOP = np.array([252, 255, 164])


def _demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb"}
    return subprocess.run([sys.executable, "-m", "napari_milview.cli", "demo", *args],
                          capture_output=True, text=True, env=env, timeout=timeout)


def _orange(img: np.ndarray) -> np.ndarray:
    """[H, W] bool: orange-yellow pixels (inferno's upper half over tissue): hue 15-50 deg,
    saturated and bright. Neither H&E, nor the viewer's grey and blue theme has them."""
    from PIL import Image

    hsv = np.asarray(Image.fromarray(img).convert("HSV")).astype(float) / 255
    hue = hsv[..., 0] * 360
    return (hue >= 15) & (hue <= 50) & (hsv[..., 1] > 0.4) & (hsv[..., 2] > 0.5)


def test_demo_screenshot_shows_heatmap_legend_and_prediction(svs, tmp_path):
    from PIL import Image

    out = tmp_path / "demo.png"
    p = _demo("--slide", str(svs.path), "--screenshot", str(out))
    assert p.returncode == 0, p.stderr[-3000:]
    doc = json.loads(p.stdout.strip().splitlines()[-1])
    assert doc["slide"] == str(svs.path) and doc["screenshot"] == str(out)
    assert doc["predicted"] == "lesion"  # the planted lesion, found by the demo model
    assert doc["probabilities"]["lesion"] > 0.9 and set(doc["probabilities"]) == {"normal",
                                                                                  "lesion"}
    assert doc["seconds"] > 0
    img = np.asarray(Image.open(out).convert("RGB"))
    assert img.shape[0] >= 600 and img.shape[1] >= 1000  # the window with its docks
    assert img.std() > 20  # real pixels, not a black grab
    # the heatmap's warm colours over the lesion: thousands of pixels (the colour bar and
    # the thumbnails alone give < 2,000)
    assert _orange(img).sum() > 5000
    # the colour bar (legend): inferno's top colour, unblended
    assert (np.abs(img.astype(int) - INFERNO_TOP).max(-1) <= 12).sum() >= 10


def test_demo_timeout_exits_1(svs, tmp_path):
    out = tmp_path / "never.png"
    p = _demo("--slide", str(svs.path), "--screenshot", str(out), "--timeout", "0.01")
    assert p.returncode == 1, p.stderr[-3000:]
    assert "timed out" in p.stderr and not out.exists()


def test_demo_missing_slide_is_one_error(tmp_path):
    p = _demo("--slide", str(tmp_path / "nope.svs"), "--screenshot", str(tmp_path / "x.png"))
    assert p.returncode == 2 and "nope.svs: no such slide" in p.stderr

"""Smoke test for the Qt binding in use: `make test` runs it again with QT_API=pyqt6."""

from __future__ import annotations

import os

import pytest


@pytest.mark.gui
def test_viewer_with_current_binding(make_napari_viewer, svs):
    import qtpy

    wanted = os.environ.get("QT_API")
    if wanted:
        assert qtpy.API_NAME.lower() == wanted.lower()
    viewer = make_napari_viewer()
    [layer] = viewer.open(str(svs.path), plugin="napari-milview")
    viewer.reset_view()
    assert layer.multiscale and layer.data_level > 0

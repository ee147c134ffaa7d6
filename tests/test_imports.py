"""Import hygiene: the package root is light, and the core never pulls in Qt."""

from __future__ import annotations

import json
import subprocess
import sys


def _modules_after(code: str) -> set[str]:
    out = subprocess.run(
        [sys.executable, "-c", code + "\nimport sys, json; print(json.dumps(sorted(sys.modules)))"],
        capture_output=True, text=True, check=True,
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def test_package_root_imports_nothing_heavy():
    mods = _modules_after("import napari_milview")
    assert not {"torch", "openslide", "napari", "qtpy", "dask", "zarr"} & mods


def test_core_never_imports_qt(svs):
    code = (
        "from napari_milview.slide import open_slide\n"
        "import numpy as np\n"
        f"s = open_slide({str(svs.path)!r})\n"
        "np.asarray(s.to_dask()[1][:100, :100])\n"
        "import napari_milview.synthetic, napari_milview.cli\n"
    )
    mods = _modules_after(code)
    qt = {m for m in mods if m.split(".")[0] in ("qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6",
                                                  "napari", "magicgui", "superqt")}
    assert not qt

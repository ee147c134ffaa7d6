"""The `milview` command line: info and synth."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
from PIL import Image

from napari_milview.cli import main


def test_info_json(svs, capsys):
    assert main(["info", str(svs.path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["vendor"] == "aperio"
    assert d["dimensions"] == [4480, 3456]
    assert [lv["dimensions"] for lv in d["levels"]] == [[4480, 3456], [1120, 864], [280, 216]]
    assert [lv["downsample"] for lv in d["levels"]] == [1.0, 4.0, 16.0]
    assert d["levels"][0]["tile"] == [256, 256]
    assert d["mpp"] == [0.25, 0.25] and d["mpp_source"] == "vendor"
    assert d["objective_power"] == 40
    assert {"label", "macro", "thumbnail"} <= set(d["associated_images"])


def test_info_text_and_errors(svs, tmp_path, capsys):
    assert main(["info", str(svs.path)]) == 0
    out = capsys.readouterr().out
    assert "aperio" in out and "0.25" in out and "vendor" in out and "256x256" in out
    txt = tmp_path / "notes.svs"
    txt.write_text("not a slide")
    assert main(["info", str(txt)]) == 2
    err = capsys.readouterr().err
    assert "notes.svs" in err and "not a whole-slide image" in err


def test_synth_console_script(tmp_path):
    out = tmp_path / "s.svs"
    r = subprocess.run([sys.executable, "-m", "napari_milview.cli", "synth", str(out),
                        "--width", "1200", "--height", "1000", "--mpp", "0.5", "--tile", "256",
                        "--levels", "2", "--seed", "3", "--no-lesion"],
                       capture_output=True, text=True, check=True)
    res = json.loads(r.stdout)
    assert res["slide"] == str(out)
    meta = json.loads((tmp_path / "s.json").read_text())
    assert meta["width"] == 1200 and meta["height"] == 1000 and meta["seed"] == 3
    assert meta["mpp"] == 0.5
    mask = np.asarray(Image.open(tmp_path / meta["lesion_mask"]))
    ds = meta["mask_downsample"]
    assert mask.shape == (-(-1000 // ds), -(-1200 // ds)) and mask.max() == 0


def test_demo_without_any_qt_binding_names_the_extra(svs, tmp_path):
    """No Qt binding installed (simulated: every binding's import fails in a child process):
    one line naming the extra to install, exit 2, no QtBindingsNotFoundError traceback."""
    code = ("import sys\n"
            "for m in ('PyQt5', 'PyQt6', 'PySide2', 'PySide6'):\n"
            "    sys.modules[m] = None\n"
            "from napari_milview.cli import main\n"
            f"sys.exit(main(['demo', '--slide', {str(svs.path)!r}]))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert proc.returncode == 2, proc.stderr
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert 'pip install "napari-milview[pyqt6]"' in err[0] and "pyqt5" in err[0], err[0]

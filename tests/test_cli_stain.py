"""`milview stain`: a region of a slide under a staining condition, as a w x h PNG."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_milview.cli import main
from napari_milview.slide import open_slide


@pytest.mark.parametrize("level", [0, 1])
def test_writes_a_w_by_h_png(svs, tmp_path, capsys, level):
    x, y, w, h = 1000, 700, 300, 200
    ref_png, low_png = tmp_path / "ref.png", tmp_path / "low.png"
    region = f"{x},{y},{w},{h}"
    assert main(["stain", str(svs.path), "--condition", "reference", "--region", region,
                 "--level", str(level), "--out", str(ref_png)]) == 0
    capsys.readouterr()
    assert main(["stain", str(svs.path), "--condition", "low-intensity", "--region", region,
                 "--level", str(level), "--out", str(low_png)]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["condition"] == "low-intensity" and d["region"] == [x, y, w, h]
    assert d["params"]["ratio"] == [0.6, 0.6] and not d["stain"]["fallback"]
    ref, low = np.asarray(Image.open(ref_png)), np.asarray(Image.open(low_png))
    assert ref.shape == low.shape == (h, w, 3)
    with open_slide(svs.path) as s:  # OpenSlide's read_region convention
        np.testing.assert_array_equal(ref, s.read_region((x, y), level, (w, h)))
    tissue = ref.min(axis=2) < 200
    assert tissue.mean() > 0.05
    assert low[tissue].astype(int).sum() > ref[tissue].astype(int).sum()  # paler


@pytest.mark.parametrize("args,message", [
    (["--condition", "sepia", "--region", "0,0,10,10"], "unknown condition 'sepia'"),
    (["--condition", "hed-light", "--region", "0,0,10"], "x,y,w,h"),
    (["--condition", "hed-light", "--region", "a,b,c,d"], "x,y,w,h"),
    (["--condition", "hed-light", "--region", "0,0,0,10"], "positive"),
    (["--condition", "hed-light", "--region", "90000,0,10,10"], "outside the slide"),
    (["--condition", "hed-light", "--region", "0,0,10,10", "--level", "9"], "no level 9"),
    (["--condition", "macenko", "--region", "0,0,10,10", "--reference", "/nonexistent.png"],
     "does not exist"),
    (["--condition", "low-similarity", "--region", "0,0,10,10", "--reference-folder",
      "/nonexistent"], "reference folder"),
])
def test_bad_input_exits_2_with_one_line(svs, tmp_path, capsys, args, message):
    rc = main(["stain", str(svs.path), *args, "--out", str(tmp_path / "o.png")])
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("milview stain: error:") and message in err
    assert err.count("\n") == 1
    assert not (tmp_path / "o.png").exists()


def test_missing_output_folder(svs, tmp_path, capsys):
    rc = main(["stain", str(svs.path), "--condition", "reference", "--region", "0,0,8,8",
               "--out", str(tmp_path / "no" / "o.png")])
    assert rc == 2 and "does not exist" in capsys.readouterr().err

"""The shipped demo model finds a planted lesion on a slide it never saw.

Slides come from ``write_synthetic_slide`` with seeds outside the training range (1000-1999,
``sample_data/train_demo_model.py``); the run is the plugin's own path: tissue grid ->
``pipeline.extract_bag`` with the demo encoder -> ``pipeline.attend`` with the demo ACMIL-GA.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from napari_milview.assets import ASSETS, demo_encoder_path, demo_model_path

SLIDE = {"width": 4096, "height": 3072, "mpp": 0.5, "tile": 256, "levels": 3}
TOP_K = 20


def _run(tmp_path_factory, seed: int, lesion: bool):
    """(grid, result, lesion mask [h, w] bool, mask downsample) for a fresh slide."""
    from napari_milview.features.encoders import build_encoder
    from napari_milview.mil.checkpoint import load_model
    from napari_milview.pipeline import attend, collect, extract_bag
    from napari_milview.slide import open_slide
    from napari_milview.synthetic import write_synthetic_slide
    from napari_milview.tissue import patch_grid

    assert not 1000 <= seed <= 1999, "training seeds"
    out = tmp_path_factory.mktemp(f"demo{seed}") / f"s{seed}.svs"
    s = write_synthetic_slide(out, seed=seed, lesion=lesion, workers=2, **SLIDE)
    model, card = load_model(demo_model_path())
    encoder = build_encoder(card.encoder)
    with open_slide(s.path) as slide:
        spec = encoder.spec
        grid = patch_grid(slide, patch_px=spec.patch_px, patch_um=card.patch_size_um)
        bag = collect(extract_bag(slide, grid, encoder, batch_size=128, device="cpu"))
        result = attend(bag, model, card, device="cpu", model_name="demo")
    mask = np.asarray(Image.open(s.mask_path)) > 0
    ds = json.loads(s.json_path.read_text())["mask_downsample"]
    assert ds == s.mask_downsample
    return grid, result, mask, ds


def _inside(coords: np.ndarray, side: int, mask: np.ndarray, ds: int) -> np.ndarray:
    """[N] bool: the patch's centre pixel is in the mask, or >= 50 % of it overlaps the mask.

    ``coords`` [N, 2] level-0 (x, y) top-left; a mask pixel covers ``ds`` x ``ds`` level-0
    pixels. The overlap is computed on the mask upsampled to level 0 (exact).
    """
    full = np.repeat(np.repeat(mask, ds, axis=0), ds, axis=1)
    out = np.zeros(len(coords), bool)
    for i, (x, y) in enumerate(coords):
        win = full[y:y + side, x:x + side]
        out[i] = full[y + side // 2, x + side // 2] or win.sum() >= 0.5 * side * side
    return out


@pytest.fixture(scope="module")
def lesion_run(tmp_path_factory):
    return _run(tmp_path_factory, 4242, lesion=True)


def test_assets_are_small_and_described():
    files = sorted(ASSETS.glob("demo_*"))
    assert {f.name for f in files} >= {"demo_encoder.safetensors", "demo_encoder.json",
                                        "demo_acmil.safetensors", "demo_acmil.json"}
    assert sum(f.stat().st_size for f in files) < 3_000_000
    card = json.loads(demo_model_path().with_suffix(".json").read_text())
    assert card["classes"] == ["normal", "lesion"] and card["arch"] == "acmil_ga"
    assert card["feature_dim"] == 64 and card["encoder"] == "demo"
    assert card["patch_size_um"] == 64.0
    train = card["training"]
    assert all(1000 <= s <= 1999 for s in train["train_seeds"] + train["val_seeds"])
    assert train["validation"]["accuracy"] == 1.0
    enc = json.loads(demo_encoder_path().with_suffix(".json").read_text())
    assert enc["spec"]["dim"] == 64 and enc["training"]["train_seeds"] == train["train_seeds"]


def test_demo_model_predicts_the_planted_lesion(lesion_run):
    grid, result, mask, ds = lesion_run
    assert result.n == len(grid) > 200
    assert result.classes == ["normal", "lesion"]
    assert result.predicted_class == "lesion"
    assert result.probabilities[1] > 0.9
    assert result.default_source == "branch/mean"


def test_demo_model_attends_inside_the_lesion(lesion_run):
    grid, result, mask, ds = lesion_run
    inside = _inside(grid.coords, grid.patch_size_level0, mask, ds)
    assert inside.sum() >= TOP_K  # the slide has enough lesion patches to fill the top 20
    top = np.argsort(-result.attention(), kind="stable")[:TOP_K]
    assert inside[top].mean() >= 0.8
    # and the attention really separates the lesion from the rest (not a lucky top 20)
    att = result.attention()
    assert att[inside].mean() > 3 * att[~inside].mean()


def test_demo_model_calls_a_slide_without_lesion_normal(tmp_path_factory):
    _grid, result, mask, _ds = _run(tmp_path_factory, 4243, lesion=False)
    assert not mask.any()
    assert result.predicted_class == "normal"
    assert result.probabilities[0] > 0.9

"""The shipped demo model on a fresh synthetic slide, with its planted lesion as annotations.

Shared by tests/evidence/test_report.py and tests/test_cli_evaluate.py; each slide is written,
extracted and scored once per test session (kept under pytest's base temp folder).
Seeds are outside the demo model's training and validation range (1000-1999,
``napari_milview/assets/demo_acmil.json``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

SLIDE = {"width": 4096, "height": 3072, "mpp": 0.5, "tile": 256, "levels": 3}


@dataclass
class DemoRun:
    folder: Path  # milview run's layout: <id>.result.h5, <id>.bag.h5
    slide_id: str
    result_path: Path
    bag_path: Path
    xml: Path  # the planted lesion as ASAP XML (CAMELYON layout)
    geojson: Path  # the same as QuPath GeoJSON
    mask: np.ndarray  # [h, w] bool lesion mask
    mask_downsample: int


def demo_run(tmp_path_factory, seed: int) -> DemoRun:
    """Write (once per session) slide ``seed``, its bag, result and annotations."""
    assert not 1000 <= seed <= 1999, "the demo model's training/validation seeds"
    base = tmp_path_factory.getbasetemp() / f"evidence-demo-{seed}"
    sid = f"s{seed}"
    files = DemoRun(base, sid, base / f"{sid}.result.h5", base / f"{sid}.bag.h5",
                    base / "ann" / f"{sid}.xml", base / "ann_geojson" / f"{sid}.geojson",
                    np.zeros((1, 1), bool), 1)
    done = base / "done.json"
    if not done.exists():
        _make(files, seed)
        done.write_text("{}")
    from PIL import Image

    files.mask = np.asarray(Image.open(base / "slide" / f"{sid}.lesion.png")) > 0
    files.mask_downsample = json.loads((base / "slide" / f"{sid}.json").read_text()
                                       )["mask_downsample"]
    return files


def _make(files: DemoRun, seed: int) -> None:
    from PIL import Image

    from napari_milview.assets import demo_model_path
    from napari_milview.evidence import from_mask, write_asap_xml, write_geojson
    from napari_milview.features.encoders import build_encoder
    from napari_milview.features.milview_h5 import save_bag
    from napari_milview.mil.checkpoint import load_model
    from napari_milview.pipeline import attend, collect, extract_bag
    from napari_milview.result import save_result
    from napari_milview.slide import open_slide
    from napari_milview.synthetic import write_synthetic_slide
    from napari_milview.tissue import patch_grid

    for d in (files.folder / "slide", files.xml.parent, files.geojson.parent):
        d.mkdir(parents=True, exist_ok=True)
    s = write_synthetic_slide(files.folder / "slide" / f"{files.slide_id}.svs", seed=seed,
                              lesion=True, workers=2, **SLIDE)
    model, card = load_model(demo_model_path())
    encoder = build_encoder(card.encoder)
    with open_slide(s.path) as slide:
        grid = patch_grid(slide, patch_px=encoder.spec.patch_px, patch_um=card.patch_size_um)
        bag = collect(extract_bag(slide, grid, encoder, batch_size=128, device="cpu"))
        result = attend(bag, model, card, device="cpu", model_name="demo")
    result.slide = str(s.path)
    save_bag(bag, files.bag_path, slide=s.path)
    save_result(result, files.result_path)
    mask = np.asarray(Image.open(s.mask_path)) > 0
    ann = from_mask(mask, s.mask_downsample, label="Tumor")
    write_asap_xml(ann, files.xml)
    write_geojson(ann, files.geojson)


def perturbed_copies(folder: Path, seeds: list[int], scale: float) -> list[Path]:
    """Copies of the demo model with seeded noise on every weight (``scale`` times each
    tensor's standard deviation), saved with ``save_model``: stand-ins for the folds of one
    model (same architecture, classes and feature size, other weights)."""
    import torch

    from napari_milview.assets import demo_model_path
    from napari_milview.mil.checkpoint import load_model, save_model

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for seed in seeds:
        path = folder / f"fold{seed}_{scale:g}.safetensors"
        if not path.exists():
            model, card = load_model(demo_model_path())
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                for p in model.parameters():
                    spread = p.std() if p.numel() > 1 else p.abs() + 1e-3
                    p.add_(torch.randn(p.shape, generator=g) * scale * spread)
            save_model(model, card, path)
        paths.append(path)
    return paths


def lesion_box(run: DemoRun, margin: int = 256) -> np.ndarray:
    """[4, 2] (x, y) level-0 corners of the box around the planted lesion, ``margin`` wider."""
    rows, cols = np.nonzero(run.mask)
    ds = run.mask_downsample
    x0, x1 = max(cols.min() * ds - margin, 0), (cols.max() + 1) * ds + margin
    y0, y1 = max(rows.min() * ds - margin, 0), (rows.max() + 1) * ds + margin
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)

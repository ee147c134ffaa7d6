"""Heatmap re-colour time: switching attention source + normalisation on a 100k-patch result.

Issue 4 asks for under 100 ms per switch without re-running the model. Timed per switch:
``heatmap_layer`` (normalise the [N] scores, paint the grid, the raw grid for hover) on a
400 x 250 lattice of 256-px patches (100,000 patches, 50 % overlap with ``--overlap``), and with
``--napari`` also the update of a real Image layer (``layer.data``, ``contrast_limits``) drawn
in a viewer (needs a display, e.g. ``xvfb-run -a -s "-screen 0 1280x1024x24"``).

    .venv/bin/python bench/overlay.py [--n-side 400 250] [--overlap] [--napari]
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import numpy as np


def make_result(nx: int, ny: int, overlap: bool):
    from napari_milview.result import Result

    step = 128 if overlap else 256
    xs, ys = np.meshgrid(np.arange(nx) * step + 37, np.arange(ny) * step + 53)
    coords = np.stack([xs.ravel(), ys.ravel()], 1)
    rng = np.random.default_rng(0)
    n = len(coords)
    logits = rng.normal(size=(4, n)).astype(np.float32)
    att = np.exp(logits - logits.max(1, keepdims=True))
    att /= att.sum(1, keepdims=True)
    sources = {f"branch/{k}": att[k] for k in range(4)}
    sources.update({f"raw/branch/{k}": logits[k] for k in range(4)})
    sources["branch/mean"] = att.mean(0)
    return Result(coords=coords, patch_size_level0=256, sources=sources,
                  default_source="branch/mean", classes=["a", "b"], logits=[0.0, 1.0],
                  probabilities=[0.27, 0.73], arch="acmil_ga", mpp=0.25)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n-side", type=int, nargs=2, default=(400, 250), metavar=("NX", "NY"))
    ap.add_argument("--overlap", action="store_true", help="50 %% overlapping patches")
    ap.add_argument("--napari", action="store_true", help="also update a real napari layer")
    a = ap.parse_args()

    from napari_milview.overlay import heatmap_layer

    r = make_result(*a.n_side, a.overlap)
    switches = [(s, m, {"vmin": 0.0, "vmax": 1e-4} if m == "fixed" else {})
                for s, m in itertools.product(
                    ["branch/mean", "branch/0", "raw/branch/1"],
                    ["raw", "softmax", "minmax", "rank", "attention_x_n", "fixed"])]
    heatmap_layer(r, None, "rank")  # warm-up (imports)
    times = []
    for src, m, kw in switches:
        t = time.perf_counter()
        grid, kwargs, _ = heatmap_layer(r, src, m, **kw)
        times.append((time.perf_counter() - t) * 1e3)
    print(f"{r.n} patches, grid {grid.shape[1]} x {grid.shape[0]} cells of "
          f"{kwargs['metadata']['cell_level0']} px")
    print(f"heatmap_layer per switch: median {statistics.median(times):.1f} ms, "
          f"max {max(times):.1f} ms over {len(times)} source x normalisation switches")
    if a.napari:
        import napari
        from qtpy.QtWidgets import QApplication

        viewer = napari.Viewer(show=True)
        grid, kwargs, _ = heatmap_layer(r, None, "rank")
        layer = viewer.add_image(grid, **kwargs)
        QApplication.processEvents()
        ui = []
        for src, m, kw in switches:
            t = time.perf_counter()
            grid, kwargs, _ = heatmap_layer(r, src, m, **kw)
            layer.data = grid
            layer.contrast_limits = kwargs["contrast_limits"]
            layer.metadata = kwargs["metadata"]
            QApplication.processEvents()
            ui.append((time.perf_counter() - t) * 1e3)
        print(f"napari layer update per switch (compute + set + draw): median "
              f"{statistics.median(ui):.1f} ms, max {max(ui):.1f} ms")
        viewer.close()


if __name__ == "__main__":
    main()

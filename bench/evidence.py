"""Cost of the faithfulness curves (issue 14): deletion + insertion + random orders against
one full forward, the floor of any method.

    python bench/evidence.py                 # N = 100k, ABMIL 1024 -> 512, 50 steps, 5 orders
    python bench/evidence.py --write-docs    # also replace the block in docs/BENCHMARKS.md

Rows: the model's plain forward on the whole bag (the floor); ``deletion_insertion`` on the
pooled path (exact for ABMIL / ACMIL-GA / CLAM: one forward, then per-order segment sums);
the generic path (one ``model.forward`` per sub-bag) on a smaller bag, and its cost
extrapolated to N (sub-bag forwards are linear in their size). Per-step cost = total /
(2 curves x (steps + 1) points x (1 + random orders)).
"""

from __future__ import annotations

import argparse
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import cpu_model, write_block  # noqa: E402

from napari_milview.evidence.annotations import (  # noqa: E402
    Annotations,
    Region,
    patch_overlap,
    read_annotations,
    write_asap_xml,
    write_geojson,
)
from napari_milview.evidence.faithfulness import deletion_insertion, descending  # noqa: E402
from napari_milview.evidence.metrics import concentration, localisation  # noqa: E402
from napari_milview.mil import build_model  # noqa: E402

DOCS = Path(__file__).resolve().parents[1] / "docs" / "BENCHMARKS.md"


def _busy() -> tuple[float, float]:
    with open("/proc/stat") as fh:
        v = [float(x) for x in fh.readline().split()[1:]]
    return sum(v) - v[3] - v[4], sum(v)


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def measure(arch: str, a: argparse.Namespace, subbags: int) -> list[tuple]:
    model = build_model(arch, in_dim=a.dim, n_classes=2)
    x = torch.randn(a.n, a.dim)
    order = descending(np.random.default_rng(0).random(a.n))

    def plain():
        with torch.inference_mode():
            model(x)

    floor = best(plain, a.repeat)
    pooled = best(lambda: deletion_insertion(model, x, order, steps=a.steps,
                                             random_orders=a.orders), a.repeat)
    xs = x[: a.n_forward]
    small = descending(np.random.default_rng(0).random(a.n_forward))
    generic = best(lambda: deletion_insertion(model, xs, small, steps=a.steps,
                                              random_orders=a.orders, path="forward"), 1)
    est = generic * a.n / a.n_forward
    return [(arch, f"{a.n:,}", "forward (floor)", floor, floor),
            (arch, f"{a.n:,}", "deletion+insertion+random, pooled", pooled, pooled / subbags),
            (arch, f"{a.n_forward:,}", "deletion+insertion+random, generic", generic,
             generic / subbags),
            (arch, f"{a.n:,}", "generic, extrapolated (linear in N)", est, est / subbags)]


def _blob(cx: float, cy: float, r: float, points: int, seed: int) -> np.ndarray:
    """A wobbly closed outline [points, 2] (x, y) around (cx, cy), like a hand-drawn tumour."""
    t = np.linspace(0, 2 * np.pi, points, endpoint=False)
    rng = np.random.default_rng(seed)
    wob = 1 + 0.15 * np.sin(3 * t + rng.uniform(0, 6)) + 0.05 * np.sin(11 * t)
    return np.stack([cx + r * wob * np.cos(t), cy + r * wob * np.sin(t)], 1)


def annotation_rows(a: argparse.Namespace, tmp: Path) -> list[tuple[str, float]]:
    """Reading a CAMELYON-sized outline set, patch overlap and the per-map numbers at N."""
    side = int(np.ceil(np.sqrt(a.n)))
    patch = 256
    extent = side * patch
    regions = [Region(exterior=_blob(extent * (0.2 + 0.15 * i), extent * (0.3 + 0.1 * (i % 3)),
                                     extent * 0.06, a.points // a.regions, i), label="_0")
               for i in range(a.regions)]
    ann = Annotations(regions=regions, slide_size=(extent, extent))
    xml = write_asap_xml(ann, tmp / "tumour.xml")
    gj = write_geojson(ann, tmp / "tumour.geojson")
    yy, xx = np.divmod(np.arange(a.n), side)
    coords = np.stack([xx * patch, yy * patch], 1).astype(np.int64)
    overlap = patch_overlap(ann, coords, patch)
    scores = np.random.default_rng(0).random(a.n) + overlap
    positive = overlap >= 0.5
    return [
        ("read ASAP XML", best(lambda: read_annotations(xml), a.repeat)),
        ("read GeoJSON", best(lambda: read_annotations(gj), a.repeat)),
        ("patch overlap (area fraction per patch)",
         best(lambda: patch_overlap(ann, coords, patch), a.repeat)),
        ("localisation (AUROC, AP, top-K, mass, Dice, curves)",
         best(lambda: localisation(scores, positive, overlap=overlap), a.repeat)),
        ("concentration (entropy, effective N, top masses)",
         best(lambda: concentration(scores), a.repeat)),
        ("floor: one pass over the scores (np.sort)", best(lambda: np.sort(scores), a.repeat)),
    ]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--n-forward", type=int, default=5_000, help="bag of the generic path")
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--orders", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--regions", type=int, default=8, help="outlines in the annotation file")
    ap.add_argument("--points", type=int, default=40_000, help="points over all outlines")
    ap.add_argument("--write-docs", action="store_true")
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    b0, t0 = _busy()
    wall0 = time.perf_counter()
    subbags = 2 * (a.steps + 1) * (1 + a.orders)
    for arch in ("abmil", "acmil_ga"):
        rows += measure(arch, a, subbags)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        ann_rows = annotation_rows(a, Path(tmp))
    b1, t1 = _busy()
    wall = time.perf_counter() - wall0
    lines = [
        f"Machine: {cpu_model()}, {torch.get_num_threads()} torch threads, Python "
        f"{platform.python_version()}, torch {torch.__version__}; "
        f"{time.strftime('%Y-%m-%d')}. Bag: N x {a.dim} float32 random features, "
        f"{a.steps} steps, {a.orders} random orders ({subbags} sub-bags per call); best of "
        f"{a.repeat} (generic: 1 run). Machine busy fraction during the run "
        f"{(b1 - b0) / max(t1 - t0, 1e-9):.2f} of all cores ({wall:.0f} s).",
        "",
        "| model | N | what | seconds | per sub-bag (ms) | x floor |",
        "|---|---|---|---|---|---|",
    ]
    floors = {r[0]: r[3] for r in rows if r[2].startswith("forward")}
    for arch, n, what, sec, per in rows:
        floor_row, other_n = what.startswith("forward"), n != f"{a.n:,}"
        lines.append(f"| {arch} | {n} | {what} | {sec:.2f} | "
                     f"{'-' if floor_row else f'{per * 1e3:.2f}'} | "
                     f"{'-' if other_n else f'{sec / floors[arch]:.1f}'} |")
    lines += ["", f"Annotations and the per-map numbers, N = {a.n:,} patches of 256 px on a grid, "
              f"{a.regions} outlines of {a.points // a.regions:,} points each (best of "
              f"{a.repeat}):", "", "| step | seconds |", "|---|---|"]
    lines += [f"| {what} | {sec:.3f} |" for what, sec in ann_rows]
    text = "\n".join(lines)
    print(text)
    if a.write_docs:
        write_block(DOCS, "evidence", "## Evidence (issue 14)", text)


if __name__ == "__main__":
    main()

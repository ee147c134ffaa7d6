#!/usr/bin/env python
"""Extraction pipeline throughput against the bare encoder forward (issue 3, point 9).

On one synthetic slide (20,000 x 15,000 px, mpp 0.25, 256-px JPEG tiles, 4 levels; written
once into ``$MILVIEW_BENCH_CACHE``, default ``~/.cache/napari_milview/bench/``) and its tissue
grid at the encoder's own resolution, with the demo encoder (or, while its weights are not
shipped, the same network with random weights: the same cost) on the CPU:

(a) bare forward: the encoder step as the pipeline runs it (the input step
    ``normalise_batch`` + the channels_last encoder) over the same uint8 batches, read into
    memory beforehand, in the faster of one stream with every torch thread and 2 streams of
    1 thread (patches/s); (a') the same on batches normalised beforehand (the encoder alone);
(b) the full pipeline ``extract_bag`` (read + JPEG decode + input step + forward) with 1
    and 2 worker threads, each run on a fresh ``Slide`` with its own empty tile cache (the
    OS page cache is warm: the file is read once before timing);
(c) the reading side alone: the same pipeline with a no-op encoder and the input step off
    (read + decode + cut into uint8 batches, 2 workers);
(d) the physical floor of reading: the JPEG decode alone (tifffile's decoder, libjpeg-turbo
    via imagecodecs, as the pipeline calls it) of the tiles the grid needs, their bytes in
    memory beforehand, on 2 threads;
(r) the reading side of resnet50_trunc's grid on the same slide (20x patches at 40x: 512 px
    read, halved), 1 worker, and (r') the same with the halving done by Pillow's BOX resize,
    as before ``tissue.resize_box`` used ``reduce``.

On a CPU run reading and the forward compete for the same cores, so the pipeline cannot
beat ``1 / (1/a + 1/c)`` (the "bound" row; ``min(a, c)`` on a GPU, where they overlap);
"b / bound" says how much of that the pipeline reaches. No reader can beat (d), so
``1 / (1/a + 1/d)`` (the "ceiling" row) is the most any pipeline could reach on this
machine with these tiles and this encoder.

Efficiency = (b) / (a); the target is >= 0.9. Each figure is the median of ``--repeats``
runs, interleaved. glibc malloc is tuned as ``milview extract`` tunes it
(``--untuned-malloc``: as in napari's process). GPU rows are "unmeasured" unless run on a
CUDA machine (``--device cuda``).

    .venv/bin/python bench/extract.py [--docs docs/BENCHMARKS.md] [--quick | --size WxH]
                                      [--regenerate]
                                      [--wait-quiet 900]

The machine's load matters a lot here: on a shared 2-core machine, other processes take
the cores unevenly (a process with more runnable threads gets a larger share), so the
header records the load average before and after the run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

WIDTH, HEIGHT, MPP, TILE, LEVELS, SEED = 20_000, 15_000, 0.25, 256, 4, 0
QUICK = (6_000, 4_500)
SECTION = "## Extraction pipeline (issue 3)"


def cache_dir() -> Path:
    env = os.environ.get("MILVIEW_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "napari_milview" / "bench"


def get_slide(width: int, height: int, regenerate: bool = False) -> tuple[Path, float]:
    """The cached synthetic slide (written when absent); (path, seconds spent writing)."""
    from napari_milview.synthetic import write_synthetic_slide

    folder = cache_dir() / f"synthetic-{width}x{height}-mpp{MPP}-t{TILE}-l{LEVELS}-seed{SEED}"
    path = folder / "slide.svs"
    if path.exists() and (folder / "slide.json").exists() and not regenerate:
        return path, 0.0
    folder.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    write_synthetic_slide(path, width=width, height=height, mpp=MPP, tile=TILE, levels=LEVELS,
                          seed=SEED, lesion=True)
    return path, time.perf_counter() - t


def get_encoder():
    """(encoder, how): the shipped demo encoder, else the same network with random weights."""
    import torch

    from napari_milview.features.encoders import DEMO, build_encoder
    from napari_milview.features.encoders._common import EncoderModule
    from napari_milview.features.encoders.demo import DemoEncoder

    try:
        return build_encoder("demo"), "demo (shipped weights)"
    except Exception:  # noqa: BLE001 - weights not shipped yet: same network, same cost
        torch.manual_seed(0)
        return EncoderModule(DemoEncoder(), DEMO).eval(), "demo network, random weights"


class NoEncoder:
    """Stands in for an encoder at no cost: zeros [B, dim]. With :func:`input_step_off` the
    pipeline then measures its reading side alone (read, decode, cut into uint8 batches)."""

    def __init__(self, spec):
        self.spec = spec

    def to(self, *args, **kwargs):
        return self

    def eval(self):
        return self

    def __call__(self, x):
        import torch

        return torch.zeros(len(x), self.spec.dim)


@contextlib.contextmanager
def input_step_off():
    """The pipeline's input step (``normalise_batch``, looked up at each forward) made a
    no-op for the duration: it belongs to the forward side, which (a) measures."""
    import napari_milview.features.encoders as enc

    step = enc.normalise_batch
    enc.normalise_batch = lambda x, spec: x
    try:
        yield
    finally:
        enc.normalise_batch = step


def machine() -> dict:
    import torch

    model = platform.processor() or "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": model, "cores": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "gpu": gpu, "load_before": os.getloadavg()}


def cpu_seconds() -> tuple[float, float, float]:
    """(wall, busy CPU seconds of the whole machine from /proc/stat, this process's CPU)."""
    busy = float("nan")
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        busy = (sum(v[:8]) - v[3] - v[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    t = os.times()
    return time.monotonic(), busy, t.user + t.system


def others_cores(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
    """Cores other processes kept busy on average between two :func:`cpu_seconds`."""
    return max(0.0, ((b[1] - a[1]) - (b[2] - a[2])) / max(b[0] - a[0], 1e-9))


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass


def run(args: argparse.Namespace) -> tuple[str, dict]:
    import torch

    from napari_milview._malloc import tune_for_batches
    from napari_milview.features.encoders import normalise_batch
    from napari_milview.pipeline import collect, extract_bag, resolve_device
    from napari_milview.slide import open_slide
    from napari_milview.slide.cache import TileCache
    from napari_milview.tissue import patch_grid, read_patches, tile_order

    tuned = tune_for_batches() if not args.untuned_malloc else False  # as `milview extract`
    width, height = QUICK if args.quick else args.size
    path, t_write = get_slide(width, height, args.regenerate)
    deadline = time.monotonic() + args.wait_quiet
    while os.getloadavg()[0] >= 0.5 and time.monotonic() < deadline:
        time.sleep(10)
    warm_page_cache(path)
    info = machine()
    encoder, how = get_encoder()
    spec = encoder.spec
    dev = resolve_device(args.device)
    bs = args.batch_size

    def fresh():
        return open_slide(path, cache=TileCache(1 << 30), remember_mpp=False)

    with fresh() as slide:
        grid = patch_grid(slide, patch_px=spec.patch_px, patch_um=spec.patch_px * spec.mpp)
    n = len(grid.coords)
    with fresh() as slide:  # the pipeline's batches: whole tiles, tile order
        order = tile_order(slide, grid)
        batches = [order[s:s + bs] for s in range(0, n, bs)]
        raw = [torch.from_numpy(read_patches(slide, grid, b)) for b in batches]  # uint8

        level = grid.read_level
        pages = slide.backend._tiles.pages[level]  # the direct TIFF tile path (SVS)
        th, tw = slide.info.levels[level].tile
        ds = slide.info.levels[level].downsample
        need = sorted({(int(y / ds) // th, int(x / ds) // tw) for x, y in grid.coords})
        index = [r * pages.grid_cols + c for r, c in need]
        with open(path, "rb") as f:
            tile_bytes = []
            for i in index:
                f.seek(pages.offsets[i])
                tile_bytes.append(f.read(pages.counts[i]))

    def decode_all() -> float:
        """(d): every needed tile decoded from memory, on 2 threads; seconds."""
        def one(k: int):
            return pages.decode(tile_bytes[k], index[k], jpegtables=pages.jpegtables)

        t = time.perf_counter()
        with ThreadPoolExecutor(2) as ex:
            list(ex.map(one, range(len(index))))
        return time.perf_counter() - t

    # as the pipeline runs it: channels_last model, uint8 batches, the input step on the device
    encoder = encoder.to(dev).to(memory_format=torch.channels_last)
    cuda = dev.type == "cuda"
    raw = [u.to(dev) for u in raw]
    ready = [normalise_batch(u, spec) for u in raw]  # (a'): normalised beforehand
    budget = torch.get_num_threads()

    def forward_all(part: list, step: bool) -> None:
        with torch.inference_mode():
            for x in part:
                x = normalise_batch(x, spec) if step else x
                if cuda:
                    with torch.autocast("cuda", dtype=torch.bfloat16):
                        encoder(x).float().cpu()
                else:
                    encoder(x)

    def bare(streams: int, step: bool) -> float:
        """The forward over the batches in memory (with the input step: uint8 batches; without
        it: batches normalised beforehand), as ``streams`` threads sharing torch's thread
        budget (1: one stream with every thread)."""
        xs = raw if step else ready
        torch.set_num_threads(max(1, budget // streams))
        try:
            t = time.perf_counter()
            if streams == 1:
                forward_all(xs, step)
            else:
                with ThreadPoolExecutor(streams) as ex:
                    list(ex.map(lambda part: forward_all(part, step),
                                [xs[i::streams] for i in range(streams)]))
            if cuda:
                torch.cuda.synchronize()
            return time.perf_counter() - t
        finally:
            torch.set_num_threads(budget)

    nothing = NoEncoder(spec)  # (c): the pipeline's reading side alone
    with fresh() as slide:  # (r): resnet50_trunc's grid, 20x patches on this 40x slide
        grid20 = patch_grid(slide, patch_px=256, mag=20)

    def read20(box: bool) -> float:
        """(r): the reading side of the 20x grid (512 px read, halved), 1 worker; with
        ``box`` the halving by Pillow's BOX resize, as before ``resize_box`` used reduce."""
        import napari_milview.tissue as tissue

        shipped = tissue.resize_box

        def box_resize(img, size):
            import numpy as np
            from PIL import Image

            if img.shape[0] == size:
                return img
            return np.asarray(Image.fromarray(np.ascontiguousarray(img)).resize(
                (size, size), Image.BOX))

        tissue.resize_box = box_resize if box else shipped
        try:
            with fresh() as slide, input_step_off():
                t = time.perf_counter()
                collect(extract_bag(slide, grid20, nothing, batch_size=bs, device=dev,
                                    workers=1))
                return time.perf_counter() - t
        finally:
            tissue.resize_box = shipped

    def pipeline(workers: int, enc=encoder) -> float:
        with fresh() as slide:
            t = time.perf_counter()
            bag = collect(extract_bag(slide, grid, enc, batch_size=bs, device=dev,
                                      workers=workers))
            seconds = time.perf_counter() - t
        assert bag.n == n
        return seconds

    streams = (1,) if cuda else (1, 2)
    for k in streams:
        bare(k, True)  # warm-up (allocator, kernels)
    times: dict[str, list[float]] = {}
    cpu0 = cpu_seconds()
    for _ in range(args.repeats):  # interleaved, so a burst of load hits all alike
        for k in streams:
            times.setdefault(f"bare{k}", []).append(bare(k, True))
            times.setdefault(f"ready{k}", []).append(bare(k, False))
        for w in (1, 2):
            times.setdefault(f"pipe{w}", []).append(pipeline(w))
        with input_step_off():
            times.setdefault("read", []).append(pipeline(2, nothing))
        times.setdefault("decode", []).append(decode_all())
        times.setdefault("read20", []).append(read20(False))
        times.setdefault("read20box", []).append(read20(True))
    info["others"] = others_cores(cpu0, cpu_seconds())
    info["load_after"] = os.getloadavg()

    rate = {k: (len(grid20.coords) if k.startswith("read20") else n) / statistics.median(v)
            for k, v in times.items()}
    best = max(rate[f"bare{k}"] for k in streams)  # (a): the faster way to run the forward
    best_ready = max(rate[f"ready{k}"] for k in streams)  # (a'): the same, normalised before
    dev_name = info["gpu"] if cuda else info["cpu"]
    malloc = ("tuned for batches, as `milview extract` runs (napari_milview._malloc)" if tuned
              else "untuned, as in napari's process (`--untuned-malloc`)")
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']} "
        f"({budget} intra-op threads), python {info['python']}; "
        f"date {_dt.date.today().isoformat()}. Load average (1/5/15 min) before the run "
        f"{'/'.join(f'{v:.2f}' for v in info['load_before'])}, after "
        f"{'/'.join(f'{v:.2f}' for v in info['load_after'])}; other processes kept "
        f"{info['others']:.2f} cores busy on average during the timed runs (from /proc/stat; "
        "0 is a quiet machine).",
        "",
        f"Command: `.venv/bin/python bench/extract.py{' --quick' if args.quick else ''}"
        f"{f' --size {width}x{height}' if (width, height) not in (QUICK, (WIDTH, HEIGHT)) else ''}"
        f"{' --docs ' + str(args.docs) if args.docs else ''}"
        f"{f' --wait-quiet {args.wait_quiet:g}' if args.wait_quiet else ''}`. Slide: synthetic "
        f"{width} x {height} px, mpp {MPP}, {TILE}-px JPEG tiles (quality 85), {LEVELS} levels"
        f"{f' (written in {t_write:.0f} s)' if t_write else ''}. Encoder: {how}, "
        f"{spec.dim}-d, {spec.input_size} px input, channels_last; grid: {n} tissue patches of "
        f"{grid.patch_size_level0} level-0 px ({spec.patch_px} px at {spec.mpp} um/px), read "
        f"from level {grid.read_level}. glibc malloc {malloc}. "
        f"Batch {bs}, in tile order; medians of {args.repeats} "
        "runs; each pipeline run on a fresh slide with an empty tile cache (JPEG decode "
        "included).",
        "",
        "| device | what | patches/s | efficiency (b / a) | b / a' | b / bound |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for key, mark_, step in (("bare", "a", "uint8 batches in memory, the input step "
                              "(normalise_batch) + the encoder, as the pipeline runs them"),
                             ("ready", "a'", "batches normalised beforehand, the encoder "
                              "alone")):
        top = best if key == "bare" else best_ready
        for k in streams:
            what = ("one stream, every thread" if k == 1 else
                    f"{k} streams of {max(1, budget // k)} thread(s)")
            mark = f" **({mark_})**" if rate[f"{key}{k}"] == top else ""
            lines.append(f"| {dev_name} | bare forward, {step}: {what}{mark} | "
                         f"{rate[f'{key}{k}']:.0f} | {rate[f'{key}{k}'] / best:.2f} | "
                         f"{rate[f'{key}{k}'] / best_ready:.2f} | - |")
    # reading and the forward share the same cores on a CPU run; on a GPU they overlap
    bound = min(best, rate["read"]) if cuda else 1 / (1 / best + 1 / rate["read"])
    for w in (1, 2):
        lines.append(f"| {dev_name} | (b) pipeline, {w} worker thread{'s' if w > 1 else ''} "
                     f"| {rate[f'pipe{w}']:.0f} | {rate[f'pipe{w}'] / best:.2f} | "
                     f"{rate[f'pipe{w}'] / best_ready:.2f} | {rate[f'pipe{w}'] / bound:.2f} |")
    lines.append(f"| {dev_name} | (c) pipeline with a no-op encoder (read + decode + cut "
                 f"into uint8 batches), 2 workers | {rate['read']:.0f} | - | - | - |")
    how_bound = "min(a, c)" if cuda else "1 / (1/a + 1/c), the cores shared by both"
    lines.append(f"| {dev_name} | bound: {how_bound} | {bound:.0f} | {bound / best:.2f} | "
                 f"{bound / best_ready:.2f} | 1 |")
    lines.append(f"| {dev_name} | (d) the floor of reading: JPEG decode alone of the "
                 f"{len(index)} tiles, bytes in memory, 2 threads | {rate['decode']:.0f} | - | "
                 "- | - |")
    ceiling = min(best, rate["decode"]) if cuda else 1 / (1 / best + 1 / rate["decode"])
    how_ceiling = "min(a, d)" if cuda else "1 / (1/a + 1/d)"
    lines.append(f"| {dev_name} | ceiling for any pipeline: {how_ceiling} | {ceiling:.0f} | "
                 f"{ceiling / best:.2f} | {ceiling / best_ready:.2f} | - |")
    lines.append(f"| {dev_name} | (r) reading side of resnet50_trunc's grid: "
                 f"{len(grid20.coords)} patches at 20x on this 40x slide ({grid20.read_size} px "
                 f"read, halved to {grid20.patch_px} by Pillow's reduce), 1 worker | "
                 f"{rate['read20']:.0f} | - | - | - |")
    lines.append(f"| {dev_name} | (r') the same, halved by Pillow's BOX resize (before): r / r' "
                 f"= {rate['read20'] / rate['read20box']:.2f} | {rate['read20box']:.0f} | - | - "
                 "| - |")
    if not cuda:
        lines.append("| GPU (bf16 autocast, channels_last) | (a), (b), (c) | unmeasured | "
                     "unmeasured | unmeasured | unmeasured |")
    body = "\n".join(lines)
    return body, info


def write_docs(docs: Path, body: str) -> None:
    from _docs import write_block

    write_block(docs, "extract.py", SECTION, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"{QUICK[0]} x {QUICK[1]} slide")
    p.add_argument("--size", type=lambda v: tuple(int(x) for x in v.lower().split("x")),
                   default=(WIDTH, HEIGHT), metavar="WxH",
                   help=f"slide size in level-0 px (default {WIDTH}x{HEIGHT})")
    p.add_argument("--regenerate", action="store_true", help="rewrite the cached slide")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.add_argument("--untuned-malloc", action="store_true",
                   help="leave glibc malloc as napari's process has it")
    p.add_argument("--docs", type=Path, default=None, help="write the table into this file")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="first wait up to S seconds for a 1-min load average below 0.5")
    args = p.parse_args(argv)
    body, _ = run(args)
    print(f"{SECTION}\n\n{body}")
    if args.docs:
        write_docs(args.docs, body)
        print(f"\nwritten into {args.docs} under '{SECTION}'", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

#!/usr/bin/env python
"""GPU rows of issue 3, point 9: encoders in bf16 against the measured matmul ceiling, and
the extraction pipeline end to end on a synthetic 40x slide.

On one CUDA device, in one run:

(m) the ceiling: ``torch.matmul`` of two N x N bf16 matrices (N = 8192), TFLOP/s, the mean of
    10 products after 3 warm-ups;
(e) each encoder with random weights, eval, channels_last, bf16 autocast, fed [B, 3, 224,
    224] batches already on the device: patches/s, the TFLOP/s that makes (FLOPs per patch
    counted by ``torch.utils.flop_counter``, 2 per multiply-add) and its share of (m):
    - resnet50_trunc: milview's own module, CLAM / TRIDENT's 1024-d ResNet-50 cut after
      layer3;
    - ViT-L/16: timm's ``vit_large_patch16_224`` when timm is installed, else the same
      network from ``torch.nn`` (24 pre-norm blocks, width 1024, 16 heads, MLP 4096, 197
      tokens, the same FLOPs);
(p) the pipeline: ``pipeline.extract_bag`` on a synthetic slide of 40x (0.25 um/px) with
    resnet50_trunc at 20x (256-px patches of 0.5 um read as 512 px at level 0, resized on
    the CPU, then to 224 on the GPU), with milview's default reader threads (min(8, cores))
    and with one per core but one (``--workers 8,15`` picks):
    patches/s against (e) for the same network and batch, and (c) the reading side alone
    (the same run with a no-op encoder; bench/extract.py's). The bound on a GPU is
    ``min(e, c)``: reading runs on the CPU while the GPU computes.

    python3 bench/gpu.py [--docs docs/BENCHMARKS.md] [--batch 256] [--workers 8,15]

The slide rows need the package's slide stack (openslide-python, openslide-bin,
imagecodecs, dask, zarr); without it they say so and the other rows still run. On a CPU,
``--device cpu --quick`` runs the same code at toy sizes, to check the script.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from pathlib import Path

SECTION = "## GPU encoders and pipeline (issue 3)"


def sync(dev) -> None:
    import torch

    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def timed(fn, dev, warmup: int, reps: int) -> float:
    """Median seconds of ``fn()`` over ``reps`` calls after ``warmup`` (device synced)."""
    for _ in range(warmup):
        fn()
    sync(dev)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_ceiling(dev, n: int, reps: int) -> float:
    """(m): TFLOP/s of an n x n x n bf16 matrix product (mean of ``reps`` after 3)."""
    import torch

    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    sync(dev)
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(dev)
    return 2 * n ** 3 * reps / (time.perf_counter() - t) / 1e12


def vit_l16(small: bool = False):
    """(ViT-L/16 at 224 px with random weights, where it comes from): timm's when installed
    (``pretrained=False``: nothing is downloaded), else the same network from ``torch.nn``.
    ``small``: 2 blocks of width 128, for ``--quick``."""
    import torch
    from torch import nn

    depth, width, heads = (2, 128, 4) if small else (24, 1024, 16)
    try:
        import timm

        return timm.create_model("vit_large_patch16_224", pretrained=False, num_classes=0,
                                 depth=depth, embed_dim=width, num_heads=heads), "timm"
    except ImportError:
        pass

    class Vit(nn.Module):
        def __init__(self):
            super().__init__()
            self.patch = nn.Conv2d(3, width, 16, stride=16)
            self.cls = nn.Parameter(torch.zeros(1, 1, width))
            self.pos = nn.Parameter(torch.zeros(1, 197, width))
            layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0,
                                               activation="gelu", batch_first=True,
                                               norm_first=True)
            self.blocks = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
            self.norm = nn.LayerNorm(width)

        def forward(self, x):
            """[B, 3, 224, 224] -> [B, width] (the cls token)."""
            x = self.patch(x).flatten(2).transpose(1, 2)
            x = torch.cat([self.cls.expand(len(x), -1, -1), x], 1) + self.pos
            return self.norm(self.blocks(x))[:, 0]

    return Vit(), "torch.nn"


def tflops(x: float) -> str:
    return f"{x:,.0f}" if x >= 100 else f"{x:.3g}"


def flops_per_patch(model, dev) -> float:
    """Forward FLOPs of one 224-px patch (2 per multiply-add), counted by torch."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(1, 3, 224, 224, device=dev)
    with torch.inference_mode(), FlopCounterMode(display=False) as count:
        model(x)
    return float(count.get_total_flops())


def encoder_rate(model, dev, batch: int, reps: int) -> float:
    """(e): patches/s of ``model`` on [batch, 3, 224, 224] batches on the device, bf16
    autocast on CUDA, channels_last."""
    import torch

    model = model.to(dev).eval().to(memory_format=torch.channels_last)
    x = torch.randn(batch, 3, 224, 224, device=dev).to(memory_format=torch.channels_last)

    def step():
        with torch.inference_mode():
            if dev.type == "cuda":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    model(x)
            else:
                model(x)

    return batch / timed(step, dev, warmup=3, reps=reps)


def pipeline_rows(args, dev, encoder, e_rate: float) -> list[str]:
    """(p) and (c) on a synthetic 40x slide, or a row saying what is missing."""
    try:
        from extract import NoEncoder, input_step_off

        from napari_milview.pipeline import collect, extract_bag
        from napari_milview.slide import open_slide
        from napari_milview.slide.cache import TileCache
        from napari_milview.synthetic import write_synthetic_slide
        from napari_milview.tissue import patch_grid
    except ImportError as e:
        return [f"| {args.where} | (p), (c): not run: the slide stack is not installed ({e}) "
                "| - | - |"]
    import tempfile

    width, height = (6000, 4500) if args.quick else (40_000, 30_000)
    folder = Path(tempfile.mkdtemp(prefix="milview-gpu-"))
    path = folder / "slide.svs"
    t = time.perf_counter()
    write_synthetic_slide(path, width=width, height=height, mpp=0.25, tile=256, levels=4,
                          seed=0, lesion=True)
    t_write = time.perf_counter() - t
    with open(path, "rb") as f:  # warm the page cache: decode, not disk, is measured
        while f.read(1 << 24):
            pass

    def run(enc, workers: int) -> tuple[float, int]:
        with open_slide(path, cache=TileCache(1 << 30), remember_mpp=False) as slide:
            grid = patch_grid(slide, patch_px=256, mag=20)
            t = time.perf_counter()
            bag = collect(extract_bag(slide, grid, enc, batch_size=args.batch, device=dev,
                                      workers=workers))
            return time.perf_counter() - t, bag.n

    rows = []
    run(encoder, args.workers[0])  # warm-up (kernels, allocator)
    for workers in args.workers:
        seconds, n = run(encoder, workers)
        with input_step_off():
            read_s, _ = run(NoEncoder(encoder.spec), workers)
        p, c = n / seconds, n / read_s
        rows += [
            f"| {args.where} | (p) pipeline, resnet50_trunc at 20x on a 40x synthetic slide "
            f"({width} x {height} px, written in {t_write:.0f} s; {n} patches of 512 level-0 "
            f"px), {workers} reader threads, batch {args.batch} | {p:,.0f} patches/s | "
            f"{p / e_rate:.2f} of (e); {p / min(e_rate, c):.2f} of the bound min(e, c) |",
            f"| {args.where} | (c) reading side alone ({workers} reader threads, no-op "
            f"encoder) | {c:,.0f} patches/s | - |",
        ]
    return rows


def run(args) -> str:
    import torch

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from napari_milview.cli import default_readers
    from napari_milview.features.encoders import RESNET50_TRUNC
    from napari_milview.features.encoders._common import EncoderModule
    from napari_milview.features.encoders.resnet import ResNet50Trunc

    dev = torch.device(args.device if args.device != "auto" else
                       ("cuda" if torch.cuda.is_available() else "cpu"))
    cuda = dev.type == "cuda"
    args.where = torch.cuda.get_device_name(dev) if cuda else (platform.processor() or "CPU")
    # milview's default reader count, and one per core but one (reading bounds a GPU run)
    args.workers = args.workers or sorted({default_readers(), max(2, (os.cpu_count() or 2) - 1)})
    reps = 3 if args.quick else 20
    ceiling = matmul_ceiling(dev, 1024 if args.quick else 8192, 3 if args.quick else 10)

    torch.manual_seed(0)
    resnet = EncoderModule(ResNet50Trunc(), RESNET50_TRUNC).eval()
    vit, vit_from = vit_l16(small=args.quick)
    rows = [f"| {args.where} | (m) matmul ceiling, {'1024' if args.quick else '8192'}^3 "
            f"{'bf16' if cuda else 'fp32'} | {tflops(ceiling)} TFLOP/s | 1 |"]
    rates = {}
    for name, model in (("resnet50_trunc", resnet), (f"ViT-L/16 ({vit_from})", vit)):
        flops = flops_per_patch(model.to(dev), dev)
        rate = encoder_rate(model, dev, args.batch, reps)
        rates[name] = rate
        achieved = flops * rate / 1e12
        rows.append(f"| {args.where} | (e) {name}, random weights, batch {args.batch}, "
                    f"{'bf16 autocast, ' if cuda else ''}channels_last, "
                    f"{flops / 1e9:.1f} GFLOP/patch | {rate:,.0f} patches/s = {tflops(achieved)} "
                    f"TFLOP/s | {achieved / ceiling:.2f} of (m) |")
    rows += pipeline_rows(args, dev, resnet, rates["resnet50_trunc"])
    head = (f"Machine: {args.where}; {os.cpu_count()} CPU cores; torch {torch.__version__}; "
            f"python {platform.python_version()}; date {_dt.date.today().isoformat()}. "
            f"Command: `python3 bench/gpu.py{' --quick' if args.quick else ''}"
            f"{' --device ' + args.device if args.device != 'auto' else ''}`. Medians of "
            f"{reps} timed batches after 3 warm-ups.")
    return "\n".join([head, "", "| device | what | rate | share |", "| --- | --- | ---: | ---: |",
                      *rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="auto", help="auto (cuda, else cpu), cuda or cpu")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=None,
                   help="reader threads, comma-separated (default: milview's default, "
                        "min(8, cores), and cores - 1)")
    p.add_argument("--quick", action="store_true", help="toy sizes: a check of the script")
    p.add_argument("--docs", type=Path, default=None, help="write the table into this file")
    args = p.parse_args(argv)
    body = run(args)
    print(f"{SECTION}\n\n{body}")
    if args.docs:
        from _docs import write_block

        write_block(args.docs, "gpu.py", SECTION, body)
    return 0


if __name__ == "__main__":
    sys.exit(main())

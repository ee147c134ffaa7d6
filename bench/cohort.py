#!/usr/bin/env python
"""Cohort runs on dask.distributed: scaling 1 -> 2 workers and scheduler overhead (issue 6).

N synthetic slides (default 8 of 4000 x 3000 px, mpp 0.25, 256-px JPEG tiles; written once
into ``$MILVIEW_BENCH_CACHE``, default ``~/.cache/napari_milview/bench/``), the demo encoder
and the demo ACMIL-GA (or, while their weights are not shipped, the same networks with random
weights: the same cost), CPU, patches of ``--patch-um`` microns (default 16: about 1,700
patches per slide, so each slide carries about a second of encoder work here).

(a) in-process: ``cohort.process_slide`` on each slide, one after the other, torch on 1
    thread, encoder and model already loaded (a warm-up slide first);
(b) ``run_cohort`` on a LocalCluster of 1 worker process (1 thread), started as
    ``run_cohort`` starts it and warmed the same way (every worker processes the warm-up
    slide before timing);
(c) the same with 2 worker processes.

Rates are slides/hour over the processing window (first task submitted to last result; the
cluster start is reported apart). Scaling efficiency = rate(c) / (2 rate(b)); scheduler
overhead per slide = (time(b) - time(a)) / N, and directly: (b)'s window minus the time spent
inside ``process_slide``, per slide (task submission, transfer of the job and the row,
``summary.csv`` rewrites). Run it once on a quiet machine:

    .venv/bin/python bench/cohort.py [--slides 8] [--docs docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WIDTH, HEIGHT, MPP, TILE, LEVELS = 4000, 3000, 0.25, 256, 3
SECTION = "## Cohort runs (issue 6)"


def cache_dir() -> Path:
    env = os.environ.get("MILVIEW_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "napari_milview" / "bench"


def get_slides(n: int) -> list[Path]:
    """N + 1 cached synthetic slides (the last one is the warm-up slide)."""
    from napari_milview.synthetic import write_synthetic_slide

    folder = cache_dir() / f"cohort-{WIDTH}x{HEIGHT}-mpp{MPP}-t{TILE}-l{LEVELS}"
    paths = []
    for i in range(n + 1):
        p = folder / f"slide{i:03d}.svs"
        if not p.exists():
            write_synthetic_slide(p, width=WIDTH, height=HEIGHT, mpp=MPP, tile=TILE,
                                  levels=LEVELS, seed=100 + i, lesion=True)
        paths.append(p)
    return paths


def get_weights() -> tuple[str | None, str, str]:
    """(encoder weights, model, how): shipped demo files, else seeded random ones."""
    import torch

    from napari_milview.assets import demo_encoder_path, demo_model_path

    if demo_encoder_path().is_file() and demo_model_path().is_file():
        return None, "demo", "demo encoder + demo ACMIL-GA (shipped weights)"
    from napari_milview.features.encoders.demo import DemoEncoder
    from napari_milview.features.encoders.demo import save as save_encoder
    from napari_milview.mil import ModelCard, build_model
    from napari_milview.mil.checkpoint import save_model

    d = cache_dir() / "cohort-weights"
    torch.manual_seed(0)
    enc = save_encoder(DemoEncoder(), d / "demo_encoder_random.safetensors")
    model = build_model("acmil_ga", in_dim=64, n_classes=2)
    card = ModelCard(arch="acmil_ga", hparams=dict(model.hparams), classes=["normal", "lesion"],
                     feature_dim=64, encoder="demo")
    ckpt = save_model(model, card, d / "acmil_random.safetensors")
    return str(enc), str(ckpt), "demo encoder + ACMIL-GA networks, random weights"


def cpu_busy() -> tuple[float, float]:
    """(busy jiffies, total jiffies) of the whole machine, from /proc/stat."""
    with open("/proc/stat") as fh:
        v = [float(x) for x in fh.readline().split()[1:]]
    idle = v[3] + v[4]
    return sum(v) - idle, sum(v)


def busy_cores(a: tuple[float, float], b: tuple[float, float]) -> float:
    return (b[0] - a[0]) / max(b[1] - a[1], 1) * (os.cpu_count() or 1)


def machine() -> dict:
    model = platform.processor() or "unknown"
    out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
    for line in out.splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    return {"cpu": model, "cores": os.cpu_count(), "python": platform.python_version()}


def _warm(job) -> int:
    """Run on a worker: process the warm-up slide (loads torch, the models, h5py...)."""
    import dataclasses

    from napari_milview.cohort import process_slide

    out = Path(job.out) / str(os.getpid())  # one folder per process: no shared files
    out.mkdir(parents=True, exist_ok=True)
    row = process_slide(dataclasses.replace(job, out=str(out)))
    if not row.ok:
        raise RuntimeError(row.message)
    return os.getpid()


def run(args: argparse.Namespace) -> str:
    import distributed
    import torch

    from napari_milview.cohort import CohortConfig, _client, plan, process_slide, run_cohort

    t_all = time.perf_counter()
    info = machine()
    load_before = os.getloadavg()
    slides = get_slides(args.slides)
    warm_slide, slides = slides[-1], slides[:-1]
    weights, model, how = get_weights()
    cfg = CohortConfig(encoder="demo", weights=weights, model=model, device="cpu",
                       patch_um=args.patch_um)
    tmp = Path(tempfile.mkdtemp(prefix="milview-bench-cohort-"))
    res: dict = {}
    try:
        # (a) in-process, sequential
        torch.set_num_threads(1)
        (warm_job,) = plan([warm_slide], tmp / "warm", cfg)
        _warm(warm_job)
        jobs = plan(slides, tmp / "seq", cfg)
        c0, t = cpu_busy(), time.perf_counter()
        rows = [process_slide(j) for j in jobs]
        res["seq"] = (time.perf_counter() - t, busy_cores(c0, cpu_busy()))
        assert all(r.ok for r in rows), [r.message for r in rows if not r.ok]
        patches = sum(r.n_patches for r in rows) / len(rows)
        # (b), (c) warm LocalClusters of 1 and 2 worker processes
        for n in (1, 2):
            t = time.perf_counter()
            client, cluster = _client(None, n, 1)  # the LocalCluster run_cohort would start
            with cluster, client:
                start = time.perf_counter() - t
                t = time.perf_counter()
                (wj,) = plan([warm_slide], tmp / f"warm{n}", cfg)
                pids = client.run(_warm, wj)
                warm = time.perf_counter() - t
                c0 = cpu_busy()
                rep = run_cohort(slides, tmp / f"c{n}", cfg, scheduler=cluster.scheduler_address)
                cores = busy_cores(c0, cpu_busy())
            assert rep.done == len(slides), [r.message for r in rep.rows if not r.ok]
            used = {r.worker for r in rep.rows}
            inside = sum(r.seconds["total"] for r in rep.rows)
            res[n] = (rep.seconds_processing, cores, start, warm, len(used), len(pids), inside)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    load_after = os.getloadavg()
    n = len(slides)
    rate = {k: n / v[0] * 3600 for k, v in res.items()}
    overhead = (res[1][0] - res["seq"][0]) / n
    outside = (res[1][0] - res[1][6]) / n  # 1 worker: the window not spent in process_slide
    eff1 = rate[2] / (2 * rate[1])
    eff_seq = rate[2] / (2 * rate["seq"])
    date = _dt.date.today().isoformat()
    lines = [
        f"Machine: {info['cpu']}, {info['cores']} cores, Python {info['python']}, "
        f"torch {torch.__version__}, dask.distributed {distributed.__version__}; date {date}. "
        f"Load average (1/5/15 min) before: {' / '.join(f'{x:.2f}' for x in load_before)}, "
        f"after: {' / '.join(f'{x:.2f}' for x in load_after)}. The machine is shared with "
        "other jobs; 'busy cores' below counts every process on it (ours included), so a "
        "value above the cores our run can use means others were running too.",
        "",
        f"Command: `.venv/bin/python bench/cohort.py --slides {n} --patch-um {args.patch_um:g}` "
        f"(total {time.perf_counter() - t_all:.0f} s). Workload: {n} synthetic slides "
        f"{WIDTH} x {HEIGHT} px (mpp {MPP}), {how}, CPU, patches of {args.patch_um:g} um "
        f"({patches:.0f} per slide on average); every slide written out in full (bag h5, "
        "result h5, GeoJSON, heatmap OME-TIFF, sidecar, marker). Warm: encoder and model "
        "already loaded in every process (a warm-up slide first); cluster start and warm-up "
        "reported apart.",
        "",
        "| run | seconds for the slides | s / slide | slides / hour | busy cores (machine) "
        "| cluster start s | warm-up s | worker processes used |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        f"| (a) in-process, sequential, 1 torch thread | {res['seq'][0]:.2f} | "
        f"{res['seq'][0] / n:.3f} | {rate['seq']:.0f} | {res['seq'][1]:.2f} | - | - | 1 |",
    ]
    for k in (1, 2):
        t, cores, start, warm, used, *_ = res[k]
        lines.append(f"| ({'b' if k == 1 else 'c'}) `run_cohort`, LocalCluster {k} worker "
                     f"process{'es' if k > 1 else ''} x 1 thread | {t:.2f} | {t / n:.3f} | "
                     f"{rate[k]:.0f} | {cores:.2f} | {start:.1f} | {warm:.1f} | {used} |")
    lines += [
        "",
        f"- Scaling efficiency, 2 workers vs 1: rate(c) / (2 x rate(b)) = **{eff1:.2f}** "
        f"(vs the in-process run: {eff_seq:.2f}).",
        f"- Scheduler overhead per slide: (time(b) - time(a)) / {n} = "
        f"**{overhead * 1000:.0f} ms**; measured directly, the part of (b)'s window not spent "
        f"inside `process_slide` (task round trip, job and row transfer, `summary.csv` "
        f"rewrite) is **{outside * 1000:.0f} ms** per slide, against "
        f"{res['seq'][0] / n:.2f} s of work per slide here and minutes per slide with a real "
        "encoder.",
    ]
    return "\n".join(lines)


def write_docs(docs: Path, body: str) -> None:
    from _docs import write_block

    write_block(docs, "cohort.py", SECTION, body)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--slides", type=int, default=8)
    p.add_argument("--patch-um", type=float, default=16.0)
    p.add_argument("--docs", type=Path, default=None, help="write the table into this file")
    args = p.parse_args(argv)
    body = run(args)
    print(f"{SECTION}\n\n{body}")
    if args.docs:
        write_docs(args.docs, body)
        print(f"\nwritten into {args.docs} under '{SECTION}'", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

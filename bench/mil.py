"""MIL forward latency and peak memory on CPU, N = 10k / 50k / 100k instances x 1024 features.

Each (model, N) runs in a fresh child process so its peak resident memory is its own:
peak = the process's maximum RSS after the forward passes minus its RSS just before the first
one (model built, the bag tensor allocated). ``forward_attention`` is what the viewer calls
(logits plus every attention source); ``forward`` (logits only) is shown beside it.

    .venv/bin/python bench/mil.py [--sizes 10000 50000 100000] [--repeats 3] [--docs FILE]

The table goes to stdout and, with ``--docs``, into docs/BENCHMARKS.md between markers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

#: (label, architecture, hyper-parameters): the official defaults for 1024-d features.
MODELS = [
    ("ABMIL (gated)", "abmil", {}),
    ("ABMIL (plain)", "abmil", {"gated": False}),
    ("CLAM-SB (small)", "clam_sb", {}),
    ("CLAM-MB (small)", "clam_mb", {}),
    ("ACMIL-GA (5 branches)", "acmil_ga", {}),
    ("ACMIL-MHA (5 branches, 8 heads)", "acmil_mha", {}),
    ("TransMIL (Nystrom, 2 layers)", "transmil", {}),
    ("MambaMIL (SR-Mamba, 2 layers)", "mambamil", {}),
    ("DSMIL (nonlinear query)", "dsmil", {}),
    ("DTFD-MIL (AFS, 4 pseudo-bags)", "dtfd", {}),
    ("MHIM-MIL (ABMIL student)", "mhim_abmil", {}),
    ("MHIM-MIL (TransMIL-type student)", "mhim_transmil", {}),
    ("INS (linear encoder)", "ins", {"encoder": "linear"}),
    ("PackMIL (ABMIL aggregator)", "packmil", {}),
]
SECTION = "## MIL forward on CPU (issues 3 and 13)"


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def child(arch: str, hp: dict, n: int, dim: int, repeats: int) -> dict:
    """One measurement, in this (fresh) process."""
    import torch

    from napari_milview.mil import build_model

    torch.manual_seed(0)
    model = build_model(arch, in_dim=dim, n_classes=2, **hp)
    x = torch.randn(n, dim)
    with torch.inference_mode():
        model.forward_attention(x[:256])  # warm-up on a small bag: kernels, allocator
    before = _rss_mb()
    times, times_logits = [], []
    with torch.inference_mode():
        for _ in range(repeats):
            t0 = time.perf_counter()
            out = model.forward_attention(x)
            times.append(time.perf_counter() - t0)
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(x)
            times_logits.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB
    return {"attention_s": sorted(times)[len(times) // 2],
            "logits_s": sorted(times_logits)[len(times_logits) // 2],
            "peak_mb": peak - before, "bag_mb": x.numel() * 4 / 2**20,
            "sources": len(out.sources), "threads": torch.get_num_threads()}


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[10_000, 50_000, 100_000])
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--docs", type=Path)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        arch, hp, n = json.loads(args.child)
        print(json.dumps(child(arch, hp, n, args.dim, args.repeats)))
        return

    import torch

    load_before = os.getloadavg()
    t_all = time.perf_counter()
    rows = []
    for label, arch, hp in MODELS:
        for n in args.sizes:
            cmd = [sys.executable, __file__, "--child", json.dumps([arch, hp, n]),
                   "--dim", str(args.dim), "--repeats", str(args.repeats)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                err = (proc.stderr.strip().splitlines() or ["?"])[-1]
                rows.append(f"| {label} | {n:,} | failed: {err} | | | |")
                print(rows[-1], flush=True)
                continue
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(f"| {label} | {n:,} | {1000 * r['attention_s']:.0f} | "
                        f"{1000 * r['logits_s']:.0f} | {r['peak_mb']:.0f} | {r['sources']} |")
            print(rows[-1], flush=True)
    load_after = os.getloadavg()
    lines = [
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} intra-op threads), Python {platform.python_version()}; "
        f"date {time.strftime('%Y-%m-%d')}. Load average before {load_before[0]:.2f}, after "
        f"{load_after[0]:.2f} (the machine is shared; figures are medians of "
        f"{args.repeats} and noisy to about +-30 %).",
        "",
        f"Command: `.venv/bin/python bench/mil.py` ({time.perf_counter() - t_all:.0f} s). "
        f"Random-init models with the official default sizes, 2 classes, a bag of N x "
        f"{args.dim} float32 ({args.sizes[-1] * args.dim * 4 / 2**20:.0f} MiB at the largest N). "
        "Peak memory: the forward passes' growth of the process's peak RSS over its RSS just "
        "before them (the bag itself is not counted). GPU rows: unmeasured (no GPU machine "
        "was lent to this session).",
        "",
        "| model | N | `forward_attention` ms (logits + all sources) | `forward` ms (logits) "
        "| peak extra memory MiB | attention sources |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
        *rows,
    ]
    body = "\n".join(lines)
    print(body)
    if args.docs:
        from _docs import write_block

        write_block(args.docs, "mil.py", SECTION, body)


if __name__ == "__main__":
    main()

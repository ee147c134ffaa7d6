#!/usr/bin/env python
"""Cancel, close and quit latency of the MIL dock in a real napari viewer (issue 11, point 5).

A real shown viewer (under Xvfb when there is no display, ``QT_QPA_PLATFORM=xcb``) on a
synthetic slide (12,000 x 9,000 px, mpp 0.5, written once into ``$MILVIEW_BENCH_CACHE``,
default ``~/.cache/napari_milview/bench/``) with the MIL attention dock
(``napari_milview._qt.mil_widget.MILWidget``) on the CPU at batch 32, in two set-ups:

* ``resnet50_trunc``: the registry's ResNet-50 (cut after layer3, 1024-d) with *random*
  weights saved as a torchvision-format safetensors file, and a random ABMIL checkpoint
  that takes 1024-d ``resnet50_trunc`` features at 128 um patches (``mil.save_model``);
* ``demo``: the shipped demo encoder and demo ACMIL-GA, for comparison.

Each run is stopped mid-extraction, once at least one batch is done and after a random
delay (up to ``--delay`` s, seeded), so the stop lands anywhere inside a batch:

(a) Cancel: a click on the dock's Cancel button -> its ``run_finished`` signal;
(b) close: ``viewer.window.remove_dock_widget(dock)`` (napari's dock close button) -> the call
    returns (the window is frozen meanwhile: the dock joins its run);
(c) quit: napari's File > Exit (``_qt_window.close(quit_app=True)``, inside ``napari.run()``)
    -> the process has exited, seen from the parent; also split at the end of the event
    loop (``napari.run()`` returns);
(c0) the same quit with no run, for the floor of napari and Python's own teardown.

(a) and (b) run ``--repeats`` times in one child process each; every (c) is its own child.
The table gives the median and the max. Target: each of (a), (b), (c) within 1 s with
resnet50_trunc at batch 32 on a 2-core machine.

    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python bench/cancel.py \\
        [--repeats 5] [--encoders resnet50_trunc,demo] [--docs docs/BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _docs import cpu_model, spin  # noqa: E402 - the benchmarks' shared module

SECTION = "## Cancel, close and quit latency (issue 11)"
XVFB_ARGS = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24"]
WIDTH, HEIGHT, MPP, TILE, LEVELS, SEED = 12_000, 9_000, 0.5, 256, 3, 11
TARGET_S = 1.0
CASES = ("cancel", "close", "quit", "quit-idle")


# ------------------------------------------------------------------------------ assets
def cache_dir() -> Path:
    env = os.environ.get("MILVIEW_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "napari_milview" / "bench"


def make_assets() -> dict:
    """The slide, random resnet50_trunc weights and a random 1024-d ABMIL checkpoint (each
    written once); returns their paths."""
    import torch
    from safetensors.torch import save_file

    from napari_milview.features.encoders.resnet import ResNet50Trunc
    from napari_milview.mil import ModelCard, build_model
    from napari_milview.mil.checkpoint import save_model
    from napari_milview.synthetic import write_synthetic_slide

    folder = cache_dir() / "cancel"
    folder.mkdir(parents=True, exist_ok=True)
    slide = folder / f"synthetic-{WIDTH}x{HEIGHT}-mpp{MPP}-seed{SEED}.svs"
    if not (slide.exists() and slide.with_suffix(".json").exists()):
        write_synthetic_slide(slide, width=WIDTH, height=HEIGHT, mpp=MPP, tile=TILE,
                              levels=LEVELS, seed=SEED, lesion=True)
    weights = folder / "resnet50_trunc-random.safetensors"
    if not weights.exists():
        torch.manual_seed(0)
        sd = {k: v.contiguous() for k, v in ResNet50Trunc().state_dict().items()}
        save_file(sd, str(weights))
    model = folder / "abmil-1024-random.safetensors"
    if not model.exists():
        torch.manual_seed(0)
        m = build_model("abmil", in_dim=1024, n_classes=2)
        save_model(m, ModelCard(arch="abmil", hparams=dict(m.hparams),
                                classes=["normal", "lesion"], feature_dim=1024,
                                encoder="resnet50_trunc", patch_size_um=128.0), model)
    return {"slide": str(slide), "weights": str(weights), "model": str(model)}


# ------------------------------------------------------------------------------ child
def add_dock(viewer, args, assets):
    """A MIL dock set up for ``args.encoder`` (CPU, ``args.batch``)."""
    from napari_milview._qt.mil_widget import MILWidget

    w = MILWidget(viewer)
    viewer.window.add_dock_widget(w, name="MIL attention")
    spin(120, until=lambda: w.ready)  # the dock loads torch off the GUI thread
    if args.encoder != "demo":
        w.file_radio.setChecked(True)
        w.model_edit.setText(assets["model"])
        w.models.choose()
        w.weights_edit.setText(assets["weights"])
    if w.model is None or w.encoder_combo.currentText() != args.encoder:
        raise SystemExit(f"dock not set up for {args.encoder}: {w.model_info.text()}")
    w.batch_spin.setValue(args.batch)
    w.device_combo.setCurrentText("cpu")
    return w


def start_run(w, args, rng: random.Random):
    """Start a run; return (job, patches done when stopped) once at least one batch is done
    and a random delay has passed."""
    job = w.run()
    if job is None:
        raise SystemExit(f"the run did not start: {w.status.text()}")
    spin(300, until=lambda: job.progress[0] >= args.batch or job.done.is_set())
    if job.done.is_set():
        raise SystemExit(f"the run ended before it could be stopped: {w.status.text()}")
    spin(rng.uniform(0, args.delay))
    return job, job.progress[0]


def child(args) -> None:
    """One case in this process; prints one ``RESULT {json}`` line per measurement."""
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    import napari

    assets = json.loads(args.assets)
    rng = random.Random(f"{args.case}-{args.encoder}-{args.seed}")
    viewer = napari.Viewer(title="cancel latency", show=True)
    viewer.window.resize(1280, 900)
    viewer.open(assets["slide"], plugin="napari-milview")
    spin(0.5)

    def emit(**kw):
        print("RESULT " + json.dumps(kw), flush=True)

    if args.case == "cancel":
        w = add_dock(viewer, args, assets)
        for _ in range(args.repeats):
            ended: list[float] = []
            w.run_finished.connect(lambda outcome, ended=ended: ended.append(time.monotonic()))
            job, at = start_run(w, args, rng)
            t0 = time.monotonic()
            w.cancel_button.click()
            spin(120, until=ended.__len__)
            w.run_finished.disconnect()
            emit(seconds=ended[0] - t0 if ended else float("nan"), outcome=job.outcome,
                 at=at, total=job.progress[1])
            spin(0.5)
    elif args.case == "close":
        for _ in range(args.repeats):
            w = add_dock(viewer, args, assets)
            job, at = start_run(w, args, rng)
            t0 = time.monotonic()
            viewer.window.remove_dock_widget(w)
            t1 = time.monotonic()
            spin(30, until=job.done.is_set)
            emit(seconds=t1 - t0, joined=job.done.is_set(), at=at, total=job.progress[1])
            spin(0.5)
    else:  # quit, quit-idle: napari's File > Exit inside its own event loop
        from qtpy.QtCore import QTimer

        w = add_dock(viewer, args, assets)
        at = None
        if args.case == "quit":
            _, at = start_run(w, args, rng)
        stamps: dict = {}

        def quit_now():
            stamps["quit"] = time.monotonic()
            viewer.window._qt_window.close(quit_app=True)

        QTimer.singleShot(0, quit_now)
        napari.run()
        emit(t_quit=stamps["quit"], t_loop=time.monotonic(), at=at)


# ------------------------------------------------------------------------------ parent
def run_child(args, case: str, encoder: str, assets: dict, seed: int) -> list[dict]:
    cmd = [sys.executable, __file__, "--child", case, "--encoder", encoder,
           "--repeats", str(args.repeats), "--batch", str(args.batch),
           "--delay", str(args.delay), "--seed", str(seed), "--assets", json.dumps(assets)]
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    out, err = proc.communicate(timeout=1800)
    t_exit = time.monotonic()
    rows = [json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not rows:
        print(f"  {case} {encoder}: child exit {proc.returncode}\n{err[-3000:]}",
              file=sys.stderr)
    for r in rows:
        if "t_quit" in r:
            r["seconds"] = t_exit - r["t_quit"]
            r["loop"] = r["t_loop"] - r["t_quit"]
        r["rc"] = proc.returncode
    return rows


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{v:.2f}" for v in os.getloadavg())


LABELS = {
    "cancel": "(a) Cancel click -> `run_finished`",
    "close": "(b) close the dock mid-run -> `remove_dock_widget` returns",
    "quit": "(c) File > Exit mid-run -> process exit",
    "quit-loop": "(c) ... of which: File > Exit -> event loop ended",
    "quit-idle": "(c0) File > Exit, no run -> process exit",
}


def table(results: dict, encoders: list[str]) -> list[str]:
    """Markdown rows: one per case, median and max per encoder."""
    head = "| measure | " + " | ".join(f"{e} median s | {e} max s" for e in encoders) + " |"
    rows = [head, "| --- |" + " ---: | ---: |" * len(encoders)]
    for key, label in LABELS.items():
        case, field = ("quit", "loop") if key == "quit-loop" else (key, "seconds")
        cells = []
        for e in encoders:
            vals = [r[field] for r in results.get((case, e), []) if field in r]
            cells += ([f"{statistics.median(vals):.2f}", f"{max(vals):.2f}"] if vals
                      else ["-", "-"])
        rows.append(f"| {label} | " + " | ".join(cells) + " |")
    n = {e: {c: len(results.get((c, e), [])) for c in CASES} for e in encoders}
    rows.append("")
    rows.append("Measurements per cell: " + "; ".join(
        f"{e}: " + ", ".join(f"{c} {k}" for c, k in n[e].items()) for e in encoders) + ".")
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="measurements per case")
    ap.add_argument("--encoders", default="resnet50_trunc,demo")
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--delay", type=float, default=2.0,
                    help="stop a random 0..DELAY s after the first batch is done")
    ap.add_argument("--docs", default=None, metavar="BENCHMARKS.md")
    ap.add_argument("--label", default="", help="a note on the code measured (for the docs)")
    ap.add_argument("--child", default=None, choices=CASES, help=argparse.SUPPRESS)
    ap.add_argument("--encoder", default="resnet50_trunc", help=argparse.SUPPRESS)
    ap.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--assets", default="{}", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        args.case = args.child
        child(args)
        return 0
    if not os.environ.get("DISPLAY"):
        if not shutil.which("xvfb-run"):
            print("no $DISPLAY and no xvfb-run (apt-get install xvfb)", file=sys.stderr)
            return 2
        env = {**os.environ, "QT_QPA_PLATFORM": "xcb", "MILVIEW_BENCH_XVFB": "1"}
        return subprocess.call([*XVFB_ARGS, sys.executable, *sys.argv], env=env)

    import torch

    encoders = [e.strip() for e in args.encoders.split(",") if e.strip()]
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    up0, t0 = uptime(), time.monotonic()
    assets = make_assets()
    results: dict = {}
    for e in encoders:
        for case in cases:
            children = args.repeats if case.startswith("quit") else 1
            for i in range(children):
                print(f"{e}: {case} {i + 1}/{children}", flush=True)
                rows = run_child(args, case, e, assets, seed=i)
                results.setdefault((case, e), []).extend(rows)
                for r in rows:
                    print("   ", {k: (round(v, 3) if isinstance(v, float) else v)
                                  for k, v in r.items() if not k.startswith("t_")}, flush=True)
    cmd = " ".join([".venv/bin/python bench/cancel.py", shlex.join(sys.argv[1:])]).strip()
    lines = [
        f"Machine: {cpu_model()}, {os.cpu_count()} cores, python "
        f"{platform.python_version()}, torch {torch.__version__}; date "
        f"{_dt.date.today().isoformat()}; {time.monotonic() - t0:.0f} s in all. The machine "
        f"is shared with other work: `uptime` before: `{up0}`; after: `{uptime()}`.",
        "",
        f"Command: `{cmd}`"
        + (" (no $DISPLAY: it ran itself under `xvfb-run -a -s \"-screen 0 1280x1024x24\"`)"
           if os.environ.get("MILVIEW_BENCH_XVFB") else "")
        + f". Slide: synthetic {WIDTH} x {HEIGHT} px, mpp {MPP}; MIL dock on the CPU, batch "
        f"{args.batch}, stopped 0-{args.delay:g} s (random) after the first batch was done."
        + (f" Code: {args.label}." if args.label else ""),
        "",
        *table(results, encoders),
    ]
    block = "\n".join(lines)
    print()
    print(block)
    if not results or not all(results.values()):
        print("\nsome cases gave no measurement (see above): docs not written", file=sys.stderr)
        return 1
    if args.docs:
        sys.path.insert(0, str(Path(__file__).parent))
        from _docs import write_block

        write_block(Path(args.docs), "cancel.py", SECTION, block)
        print(f"\nwritten into {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

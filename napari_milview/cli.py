"""The ``milview`` command: info, synth, extract, attend, run, stain, robustness, evaluate,
demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def default_readers() -> int:
    """Reader threads of an extraction when ``--workers`` is not given: min(8, CPU cores), at
    least 2 (on the CPU ``extract_bag`` caps them at torch's threads)."""
    return max(2, min(8, os.cpu_count() or 2))


def _cmd_info(args: argparse.Namespace) -> int:
    from .slide import open_slide

    with open_slide(args.slide, mpp=args.mpp, remember_mpp=False) as slide:
        d = slide.info.to_dict()
    if args.json:
        print(json.dumps(d))
        return 0
    mpp = "unknown" if d["mpp"] is None else f"{d['mpp'][1]:.4g} x {d['mpp'][0]:.4g} um/px"
    print(f"{d['path']}")
    print(f"  vendor            {d['vendor']}")
    print(f"  dimensions        {d['dimensions'][0]} x {d['dimensions'][1]} px")
    print(f"  mpp               {mpp} (source: {d['mpp_source']})")
    print(f"  objective power   {d['objective_power'] or 'unknown'}")
    print(f"  associated images {', '.join(d['associated_images']) or 'none'}")
    print("  levels:")
    for i, lv in enumerate(d["levels"]):
        tag = "  (built lazily)" if lv["derived"] else ""
        print(f"    {i}: {lv['dimensions'][0]:>7} x {lv['dimensions'][1]:<7} "
              f"downsample {lv['downsample']:<9.4g} tile {lv['tile'][0]}x{lv['tile'][1]}{tag}")
    for note in d["notes"]:
        print(f"  note: {note}")
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    import time

    from .synthetic import write_synthetic_slide

    t0 = time.perf_counter()
    res = write_synthetic_slide(
        args.out, width=args.width, height=args.height, mpp=args.mpp, tile=args.tile,
        levels=args.levels, seed=args.seed, lesion=args.lesion, ome_zarr=args.ome_zarr,
    )
    print(json.dumps({
        "slide": str(res.path), "lesion_mask": str(res.mask_path), "sidecar": str(res.json_path),
        "ome_zarr": str(res.zarr_path) if res.zarr_path else None,
        "seconds": round(time.perf_counter() - t0, 2),
    }))
    return 0


def _progress_bar(total: int, desc: str):
    """A tqdm bar on stderr (tqdm comes with napari), or a plain line per update."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - napari depends on tqdm
        class _Line:
            def __init__(self):
                self.n = 0

            def update(self, k):
                self.n += k
                print(f"{desc}: {self.n}/{total}", file=sys.stderr)

            def write(self, msg, file=None):
                print(msg, file=file or sys.stderr)

            def close(self):
                pass

        return _Line()
    return tqdm(total=total, desc=desc, unit="patch", file=sys.stderr, dynamic_ncols=True)


def _cmd_extract(args: argparse.Namespace) -> int:
    import time

    from .features.bag import BagError
    from .features.milview_h5 import save_bag
    from .pipeline import RunSpec, extract
    from .slide import open_slide

    out = Path(args.out)
    if not out.parent.is_dir():
        raise BagError(out, f"folder {out.parent} does not exist")
    t0 = time.perf_counter()
    card, name = None, None
    if args.model is not None:
        _, card, name = _load_mil(args.model, args.arch)
    spec = RunSpec(encoder=args.encoder, weights=args.weights, patch_um=args.patch_um,
                   mag=args.mag, min_tissue=args.min_tissue, batch_size=args.batch_size,
                   device=args.device, workers=args.workers or default_readers(),
                   model_name=name)
    with open_slide(args.slide, mpp=args.mpp, remember_mpp=False) as slide:
        bag = _drive(extract(slide, spec, card), f"extract {Path(args.slide).name}",
                     "milview extract")
        if bag is None:
            return 130
    save_bag(bag, out, slide=Path(args.slide).resolve())
    print(json.dumps({
        "bag": str(out), "slide": str(args.slide), "n_instances": bag.n, "dim": bag.dim,
        "encoder": bag.encoder, "patch_size_level0": bag.patch_size_level0, "mpp": bag.mpp,
        "bad_tiles": bag.meta.get("bad_tiles", 0), "device": bag.meta.get("device"),
        "seconds": round(time.perf_counter() - t0, 2),
    }))
    return 0


def _drive(gen, desc: str, who: str):
    """Drive a pipeline generator with a progress bar on stderr; its return value, or None
    after Ctrl-C (the generator has shut its readers down; nothing is written)."""
    bar = None

    def show(p) -> None:
        nonlocal bar
        if p.stage != "extract" or not p.total:
            return
        if bar is None:
            bar = _progress_bar(p.total, desc)
        if p.message:
            bar.write(f"{who}: {p.message}", file=sys.stderr)
        if p.features is not None:
            bar.update(len(p.features))

    from .pipeline import collect

    try:
        return collect(gen, show)
    except KeyboardInterrupt:
        gen.close()
        print(f"{who}: cancelled; nothing written", file=sys.stderr)
        return None
    finally:
        if bar is not None:
            bar.close()


def _load_mil(model: str, arch: str | None, nystrom: str | None = None):
    """(model, card, name) for a checkpoint path or ``demo`` (the shipped demo model);
    ``nystrom``: TransMIL's nystrom-attention variant (None: the checkpoint's)."""
    from .mil.checkpoint import load_model

    if model == "demo":
        from .assets import demo_model_path

        return (*load_model(demo_model_path(), arch=arch, nystrom=nystrom), "demo")
    return (*load_model(model, arch=arch, nystrom=nystrom), str(model))


def _cmd_attend(args: argparse.Namespace) -> int:
    from .features.io import load_bag
    from .pipeline import RunSpec, collect, run
    from .result import save_result

    out = Path(args.out)
    for dest in (out, None if args.geojson is None else Path(args.geojson)):
        if dest is not None and not dest.parent.is_dir():
            raise ValueError(f"{dest}: folder {dest.parent} does not exist")
    bag = load_bag(args.bag, patch_size_level0=args.patch_size_level0,
                   patches_h5=args.patches_h5, slide_id=args.slide_id, mpp=args.mpp)
    model, card, name = _load_mil(args.model, args.arch, args.nystrom)
    _, result = collect(run(None, model, card, RunSpec(bag=bag, device=args.device,
                                                      model_name=name)))
    if args.source is not None and args.source not in result.sources:
        raise ValueError(f"{args.model}: no attention source {args.source!r}; this model has "
                         f"{', '.join(result.sources)}")
    result.meta["bag"] = str(args.bag)
    save_result(result, out)
    if args.geojson is not None:
        from .overlay.geojson import to_geojson

        to_geojson(result, args.geojson, source=args.source, top_k=args.top_k)
    print(json.dumps(result.summary()))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from .cohort import CohortConfig, run_cohort

    config = CohortConfig(
        encoder=args.encoder, weights=args.weights, model=args.model, arch=args.arch,
        nystrom=args.nystrom, patch_um=args.patch_um, mag=args.mag,
        min_tissue=args.min_tissue, mpp=args.mpp,
        device=args.device, source=args.source, top_k=args.top_k,
        batch_size=args.batch_size, readers=args.readers)
    bar = None
    finished_so_far = 0

    def show(row, finished: int, total: int) -> None:
        nonlocal bar, finished_so_far
        finished_so_far = finished
        if bar is None:
            bar = _progress_bar(total, "milview run")
            bar.unit = "slide"
            if hasattr(bar, "refresh"):
                bar.refresh()
        if row is None:
            return
        if not row.ok:
            bar.write(f"milview run: error: {row.message}")
        bar.update(1)

    try:
        report = run_cohort(args.inputs, args.out, config, scheduler=args.scheduler,
                            workers=args.workers, threads_per_worker=args.threads_per_worker,
                            progress=show)
    except KeyboardInterrupt:
        if bar is not None:
            bar.close()
            bar = None
        summary = Path(args.out) / "summary.csv"
        print(f"milview run: interrupted; the {finished_so_far} slide(s) finished in this run "
              f"are kept (listed in {summary}); rerun the same command to resume",
              file=sys.stderr)
        return 130
    finally:
        if bar is not None:
            bar.close()
    d = report.to_dict()
    for key, value in (("slides", d["total"]), ("done", d["done"]),
                       ("skipped", f"{d['skipped']} (finished before)"),
                       ("failed", d["failed"]),
                       ("seconds", f"{d['seconds']:.1f} (cluster start "
                                   f"{d['seconds_startup']:.1f})"),
                       ("slides/hour", f"{d['slides_per_hour']:.1f}"),
                       ("summary", d["summary"])):
        print(f"  {key:<12} {value}", file=sys.stderr)
    print(json.dumps(d))
    return 1 if report.failed else 0


def _cmd_stain(args: argparse.Namespace) -> int:
    from PIL import Image

    from .slide import open_slide
    from .stain import CONDITIONS, estimate_slide, load_reference, make_condition, normalise_to

    if args.condition not in CONDITIONS:
        raise ValueError(f"unknown condition {args.condition!r}; choose one of "
                         f"{', '.join(CONDITIONS)}")
    try:
        x, y, w, h = (int(v) for v in args.region.split(","))
    except ValueError:
        raise ValueError(f"--region must be x,y,w,h (four integers), got {args.region!r}"
                         ) from None
    if w <= 0 or h <= 0 or w * h > 100_000_000:
        raise ValueError(f"--region {args.region}: w and h must be positive and w x h at "
                         "most 100 Mpx")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ValueError(f"{out}: folder {out.parent} does not exist")
    library = load_reference(args.reference_folder) if args.reference_folder else None
    reference = normalise_to(args.reference) if args.reference else None
    with open_slide(args.slide, remember_mpp=False) as slide:
        levels = slide.info.levels
        if not 0 <= args.level < len(levels):
            raise ValueError(f"{args.slide}: no level {args.level} (levels 0-{len(levels) - 1})")
        ds = levels[args.level].downsample
        w0, h0 = slide.info.dimensions
        if x >= w0 or y >= h0 or x + w * ds <= 0 or y + h * ds <= 0:
            raise ValueError(f"{args.slide}: region {args.region} at level {args.level} lies "
                             f"outside the slide ({w0} x {h0} level-0 px)")
        stain = None if args.condition == "reference" else estimate_slide(slide)
        pert = make_condition(args.condition, stain, reference=reference, library=library,
                              seed=args.seed)
        rgb = slide.read_region((x, y), args.level, (w, h))
    Image.fromarray(pert(rgb)).save(out, format="PNG")
    print(json.dumps({"out": str(out), "slide": str(args.slide), "condition": args.condition,
                      "region": [x, y, w, h], "level": args.level,
                      "stain": None if stain is None else stain.to_dict(),
                      "params": pert.params}))
    return 0


def _cmd_robustness(args: argparse.Namespace) -> int:
    import threading

    from .pipeline import RunSpec, prepare
    from .slide import open_slide
    from .stain import CONDITIONS, load_reference, normalise_to
    from .stain.robustness import DEFAULT_CONDITIONS, robustness

    names = (list(DEFAULT_CONDITIONS) if args.conditions is None else
             list(CONDITIONS) if args.conditions.strip() == "all" else
             [c.strip() for c in args.conditions.split(",") if c.strip()])
    bad = [c for c in names if c not in CONDITIONS]
    if bad or not names:
        raise ValueError(f"--conditions: unknown condition(s) {', '.join(bad) or '(none)'}; "
                         f"choose from {', '.join(CONDITIONS)} or 'all'")
    out = Path(args.out)
    if not out.parent.is_dir():
        raise ValueError(f"{out}: folder {out.parent} does not exist")
    model, card, model_name = _load_mil(args.model, args.arch)
    library = load_reference(args.reference_folder) if args.reference_folder else None
    reference = normalise_to(args.reference) if args.reference else None
    spec = RunSpec(encoder=args.encoder, weights=args.weights, patch_um=args.patch_um,
                   mag=args.mag, min_tissue=args.min_tissue, model_name=model_name)
    with open_slide(args.slide, mpp=args.mpp, remember_mpp=False) as slide:
        encoder, grid = prepare(slide, spec, card)  # as every run: pipeline.resolve_patch
        out.mkdir(exist_ok=True)
        cache_dir = None if args.no_cache else (args.cache_dir or out / "cache")
        cancel = threading.Event()
        gen = robustness(slide, grid, encoder, model, card, names, reference=reference,
                         library=library, seed=args.seed, source=args.source,
                         top_k=args.top_k, batch_size=args.batch_size, device=args.device,
                         workers=args.workers or default_readers(),
                         cancel=cancel, cache_dir=cache_dir, model_name=model_name)
        bar = None
        try:
            while True:
                try:
                    p = next(gen)
                except StopIteration as stop:
                    report = stop.value
                    break
                if bar is None and p.total:
                    bar = _progress_bar(p.total, f"robustness {Path(args.slide).name}")
                if p.stage == "attend":
                    if bar is not None:
                        bar.write(f"milview robustness: {p.message}", file=sys.stderr)
                elif bar is not None and p.done > bar.n:
                    bar.update(p.done - bar.n)
        except KeyboardInterrupt:
            cancel.set()
            gen.close()
            print("milview robustness: cancelled; nothing written", file=sys.stderr)
            return 130
        finally:
            if bar is not None:
                bar.close()
    stem = Path(args.slide).name.split(".")[0]
    csv_path = report.to_csv(out / f"{stem}.robustness.csv")
    json_path = report.to_json(out / f"{stem}.robustness.json")
    for row in report.rows():
        print(json.dumps(row))
    print(json.dumps({**report.summary(), "csv": str(csv_path), "json": str(json_path)}))
    return 0


def _evaluate_inputs(target: Path) -> list[Path]:
    """RESULT.h5, or every ``*.result.h5`` of a folder (``milview run``'s output)."""
    if target.is_dir():
        found = sorted(target.glob("*.result.h5"))
        if not found:
            raise ValueError(f"{target}: no *.result.h5 in the folder")
        return found
    if not target.is_file():
        raise FileNotFoundError(f"{target}: no such result file or folder")
    return [target]


def _annotation_for(ann: Path, stem: str, single: bool,
                    flag: str = "--annotations") -> Path | None:
    """The annotation file of a slide: ``ann`` itself, or ``<stem>.geojson|.json|.xml`` in
    the folder ``ann``; None when the folder has none."""
    if ann.is_file():
        if not single:
            raise ValueError(f"{flag} {ann}: a file, for several results; give a "
                             "folder with <slide>.geojson or <slide>.xml per slide")
        return ann
    if not ann.is_dir():
        raise FileNotFoundError(f"{ann}: no such annotation file or folder")
    for ext in (".geojson", ".json", ".xml"):
        if (ann / f"{stem}{ext}").is_file():
            return ann / f"{stem}{ext}"
    return None


def _cmd_evaluate(args: argparse.Namespace) -> int:
    import numpy as np

    from .evidence import report as ev
    from .evidence.plots import curves_png, roc_pr_png
    from .result import load_result

    out = Path(args.out)
    if not out.parent.is_dir():
        raise ValueError(f"{out}: folder {out.parent} does not exist")
    dice_rule = args.dice_rule
    if dice_rule not in ("otsu", "top_fraction"):
        try:
            dice_rule = float(dice_rule)
        except ValueError:
            raise ValueError(f"--dice-rule must be otsu, top_fraction or a number, got "
                             f"{args.dice_rule!r}") from None
    paths = _evaluate_inputs(Path(args.input))
    ann_root = Path(args.annotations)
    labels = None if not args.labels else {x.strip() for x in args.labels.split(",") if x.strip()}
    sources = None if not args.sources else [x.strip() for x in args.sources.split(",")
                                             if x.strip()]
    folds_sources = None if not args.folds_sources else [
        x.strip() for x in args.folds_sources.split(",") if x.strip()]
    if args.folds_only and not args.folds:
        raise ValueError("--folds-only without --folds")
    if args.folds_only and len(args.folds) < 2:
        raise ValueError("--folds-only needs at least 2 checkpoints in --folds")
    for f in args.folds or []:
        if f != "demo" and not Path(f).is_file():
            raise ValueError(f"--folds {f}: no such checkpoint")
    wi_root = Path(args.what_if) if args.what_if else None
    if wi_root is not None and not wi_root.exists():
        raise FileNotFoundError(f"--what-if {wi_root}: no such region file or folder")
    out.mkdir(exist_ok=True)
    models: dict[str, tuple] = {}
    reports = []
    for path in paths:
        result = load_result(path)
        stem = ev.slide_stem(result, path)
        ann = _annotation_for(ann_root, stem, len(paths) == 1)
        if ann is None:
            if args.missing == "error":
                raise ValueError(f"{ann_root}: no {stem}.geojson / {stem}.xml for {path}")
            if args.missing == "skip":
                print(f"milview evaluate: {path}: no annotation {stem}.geojson|.xml in "
                      f"{ann_root}; skipped", file=sys.stderr)
                continue
            annotation = np.zeros(result.n)  # "negative": no lesion on the slide
        else:
            annotation = ann
        regions = None if wi_root is None else _annotation_for(wi_root, stem, len(paths) == 1,
                                                               "--what-if")
        if wi_root is not None and regions is None:
            print(f"milview evaluate: {path}: no region file {stem}.geojson|.xml in "
                  f"{wi_root}; no what-if for it", file=sys.stderr)
        model = bag = None
        if not args.no_faithfulness or regions is not None:
            key = args.model or result.model or ""
            if key not in models:
                models[key] = ev.model_for(result, args.model)
            model = models[key][0]
        if not args.no_faithfulness or regions is not None or args.folds:
            bag = ev.bag_for(result, path, args.bag)
        rep = ev.evaluate(result, annotation, model=model, bag=bag, fraction=args.fraction,
                       k=args.k, steps=args.steps, random_orders=args.random_orders,
                       seed=args.seed, dice_rule=dice_rule, sources=sources, labels=labels,
                       faithfulness=not args.no_faithfulness, folds=args.folds,
                       folds_sources=folds_sources, folds_include_result=not args.folds_only,
                       what_if=regions, what_if_fraction=args.what_if_fraction)
        if ann is None:
            rep.notes.append("no annotation file: every patch negative")
        rep.to_csv(out / f"{stem}.evidence.csv")
        if rep.disagreement:
            from .evidence.folds import write_disagreement

            write_disagreement(out, stem, result, rep.disagreement, rep.members)
        if rep.what_if:
            rep.what_if_csv(out / f"{stem}.what_if.csv")
        shown = rep.sources[rep.default_source]
        title = f"{stem} - {rep.default_source}"
        (out / f"{stem}.roc_pr.png").write_bytes(roc_pr_png(shown["localisation"], title))
        if shown["faithfulness"] is not None:
            png = curves_png(shown["faithfulness"], title, classes=rep.classes)
            (out / f"{stem}.curves.png").write_bytes(png)
        reports.append(rep)
        print(json.dumps({**rep.json_row(), **rep.json_details()}), flush=True)
    if not reports:
        raise ValueError(f"no result had an annotation in {ann_root} (use --missing negative "
                         "for slides without lesion)")
    summary = ev.summarise(reports)
    csv_path, json_path = ev.write_summary(summary, out / "summary.csv", out / "summary.json")
    print(json.dumps({"slides": summary["slides"], "summary_csv": str(csv_path),
                      "summary_json": str(json_path)}))
    return 0


def _demo_under_xvfb(args: argparse.Namespace) -> int | None:
    """Rerun ``milview demo --screenshot`` under ``xvfb-run`` when there is no display.

    None when a display is there (nothing to do); else the child's exit status.
    """
    import shutil
    import subprocess

    if os.environ.get("DISPLAY") or os.environ.get("QT_QPA_PLATFORM", "xcb") != "xcb":
        return None
    if not shutil.which("xvfb-run"):
        raise ValueError("--screenshot needs a display: no $DISPLAY and no xvfb-run (install "
                         "xvfb, e.g. `make system-deps`, or run under a desktop)")
    argv = ["demo", "--screenshot", str(Path(args.screenshot).resolve()),
            "--timeout", str(args.timeout)]
    if args.slide:
        argv += ["--slide", str(Path(args.slide).resolve())]
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb"}
    return subprocess.call(["xvfb-run", "-a", "-s", "-screen 0 1920x1200x24", sys.executable,
                            "-m", "napari_milview.cli", *argv], env=env)


def _cmd_demo(args: argparse.Namespace) -> int:
    """napari with a slide, the navigation and MIL docks, and a run of the demo model."""
    import time

    t0 = time.perf_counter()
    shot = Path(args.screenshot) if args.screenshot else None
    if shot is not None:
        if not shot.resolve().parent.is_dir():
            raise ValueError(f"{shot}: folder {shot.resolve().parent} does not exist")
        status = _demo_under_xvfb(args)
        if status is not None:
            return status
        # real pixels need the xcb platform and a shown window (offscreen grabs are black)
        os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    if args.slide:
        path = Path(args.slide)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such slide")
    else:
        from .synthetic import sample_slide_path

        path = sample_slide_path(lesion=True)

    from ._qt.demo import run_demo

    try:
        return run_demo(path, shot, args.timeout, t0)
    except ImportError as e:  # qtpy's QtBindingsNotFoundError is an ImportError
        if type(e).__name__ != "QtBindingsNotFoundError" and "Qt binding" not in str(e):
            raise
        raise ValueError(f"no Qt binding found ({e}); install one with the viewer: pip "
                         "install \"napari-milview[pyqt6]\" (or \"napari-milview[pyqt5]\")"
                         ) from None


#: ``--nystrom`` (attend, run): TransMIL's nystrom-attention variant
NYSTROM_CHOICES = ("0.0.9", "current")
NYSTROM_HELP = ("TransMIL only: which nystrom-attention release to reproduce. 0.0.9 (the "
                "official TransMIL repository's pin) keeps the first n rows after padding, "
                "'current' (0.0.10 and later, e.g. ACMIL's copy) the last n: the same weights "
                "give other probabilities and heatmaps. Default: the model card's, else the "
                "checkpoint's layout (official Lightning .ckpt -> 0.0.9, otherwise current)")


def build_parser() -> argparse.ArgumentParser:
    """The ``milview`` argument parser. Long on purpose: one flat block of argparse
    declarations per subcommand, in the README's order; split up, the options of a command
    would only be harder to find."""
    from . import __version__

    p = argparse.ArgumentParser(prog="milview", description=__doc__)
    p.add_argument("--version", action="version", version=f"napari-milview {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="describe a slide's pyramid, mpp and associated images")
    s.add_argument("slide")
    s.add_argument("--json", action="store_true", help="one JSON object instead of text")
    s.add_argument("--mpp", type=float, default=None, help="override microns per pixel")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("synth", help="write a synthetic H&E pyramidal slide (Aperio SVS)")
    s.add_argument("out", help="OUT.svs; OUT.lesion.png and OUT.json are written beside it")
    s.add_argument("--width", type=int, default=20_000)
    s.add_argument("--height", type=int, default=15_000)
    s.add_argument("--mpp", type=float, default=0.25)
    s.add_argument("--tile", type=int, default=256)
    s.add_argument("--levels", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--lesion", action=argparse.BooleanOptionalAction, default=True,
                   help="plant lesion regions (default) or not")
    s.add_argument("--ome-zarr", action="store_true", help="also write OUT.ome.zarr")
    s.set_defaults(func=_cmd_synth)

    s = sub.add_parser("extract", help="encode a slide's tissue patches into a feature bag (h5)")
    s.add_argument("slide")
    s.add_argument("--encoder", required=True, help="encoder name (see the encoder registry)")
    s.add_argument("--weights", default=None, metavar="FILE",
                   help="local weights for the encoder (.safetensors/.pt/.pth or a folder)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--patch-um", type=float, default=None, metavar="UM",
                   help="patch side in microns (default: the --model card's, else the "
                        "encoder's own, else 20x)")
    g.add_argument("--mag", type=float, default=None, metavar="X",
                   help="magnification to cut patches at (20x = 0.5 um/px)")
    s.add_argument("--model", default=None, metavar="CKPT|demo",
                   help="the MIL checkpoint the bag is for: its card's patch size is used and "
                        "the encoder is checked against it, as `milview run` does")
    s.add_argument("--arch", default=None, help="MIL architecture of --model (default: "
                                                "detected)")
    s.add_argument("--out", required=True, metavar="BAG.h5")
    s.add_argument("--mpp", type=float, default=None, help="override microns per pixel")
    s.add_argument("--min-tissue", type=float, default=0.25,
                   help="keep patches with at least this tissue fraction (default 0.25)")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=None,
                   help="reader threads (default: min(8, CPU cores), at least 2)")
    s.add_argument("--device", default="auto", help="auto (cuda, then cpu), cpu, cuda, cuda:N")
    s.set_defaults(func=_cmd_extract)

    s = sub.add_parser("attend", help="run a MIL model on a feature bag: prediction and "
                                      "attention")
    s.add_argument("bag", help="feature file: napari-milview, CLAM, TRIDENT, ACMIL h5 or .pt")
    s.add_argument("--model", required=True, metavar="CKPT_OR_demo",
                   help="checkpoint (.safetensors/.pt/.pth/.ckpt) or 'demo'")
    s.add_argument("--arch", default=None, help="architecture (default: detected)")
    s.add_argument("--nystrom", default=None, choices=NYSTROM_CHOICES, help=NYSTROM_HELP)
    s.add_argument("--patch-size-level0", type=int, default=None, metavar="PX",
                   help="patch side in level-0 pixels, when the bag does not say")
    s.add_argument("--patches-h5", default=None, help="CLAM/TRIDENT patches h5 (extent)")
    s.add_argument("--slide-id", default=None, help="which slide of an ACMIL grouped h5")
    s.add_argument("--mpp", type=float, default=None, help="microns per level-0 pixel")
    s.add_argument("--out", required=True, metavar="RESULT.h5")
    s.add_argument("--geojson", default=None, metavar="OUT.geojson",
                   help="also write a QuPath GeoJSON (one detection per patch)")
    s.add_argument("--source", default=None, help="attention source for the GeoJSON "
                                                  "(default: the model's default)")
    s.add_argument("--top-k", type=int, default=20, help="top-K annotations in the GeoJSON")
    s.add_argument("--device", default="auto", help="auto (cuda, then cpu), cpu, cuda, cuda:N")
    s.set_defaults(func=_cmd_attend)

    s = sub.add_parser("run", help="run encoder + MIL model over many slides on "
                                   "dask.distributed (resumable; exit status 1 when a "
                                   "slide failed)")
    s.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="slides, glob patterns or a CSV with a 'slide' column")
    s.add_argument("--encoder", required=True, help="encoder name (see the encoder registry)")
    s.add_argument("--weights", default=None, metavar="FILE", help="local encoder weights")
    s.add_argument("--model", required=True, metavar="CKPT_OR_demo",
                   help="MIL checkpoint (.safetensors/.pt/.pth/.ckpt) or 'demo'")
    s.add_argument("--arch", default=None, help="architecture (default: detected)")
    s.add_argument("--nystrom", default=None, choices=NYSTROM_CHOICES, help=NYSTROM_HELP)
    s.add_argument("--out", required=True, metavar="DIR",
                   help="output folder: per-slide files and summary.csv")
    s.add_argument("--scheduler", default=None, metavar="ADDRESS",
                   help="a running dask scheduler (default: a local cluster)")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="worker processes of the local cluster (default: one per core)")
    s.add_argument("--threads-per-worker", type=int, default=1, metavar="T")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--patch-um", type=float, default=None, metavar="UM",
                   help="patch side in microns (default: the encoder's own, else 20x)")
    g.add_argument("--mag", type=float, default=None, metavar="X",
                   help="magnification to cut patches at (20x = 0.5 um/px)")
    s.add_argument("--min-tissue", type=float, default=0.25)
    s.add_argument("--mpp", type=float, default=None, help="microns per pixel for every slide")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--readers", type=int, default=2, help="reader threads per slide")
    s.add_argument("--device", default="auto", help="auto (cuda, then cpu), cpu, cuda, cuda:N")
    s.add_argument("--source", default=None, help="attention source of the exports")
    s.add_argument("--top-k", type=int, default=20, help="top-K annotations and layer")
    s.set_defaults(func=_cmd_run)

    s = sub.add_parser("stain", help="write a region of a slide under a staining condition "
                                     "(PNG)")
    s.add_argument("slide")
    s.add_argument("--condition", required=True,
                   help="reference, low-intensity, high-intensity, low-similarity, "
                        "high-similarity, hed-light, hed-strong, macenko, reinhard")
    s.add_argument("--region", required=True, metavar="X,Y,W,H",
                   help="x, y in level-0 pixels; w, h in pixels at --level (OpenSlide's "
                        "read_region)")
    s.add_argument("--level", type=int, default=0)
    s.add_argument("--out", required=True, metavar="OUT.png")
    s.add_argument("--reference", default=None, metavar="TILE_SLIDE_OR_JSON",
                   help="target of macenko/reinhard: an image tile, a slide or a reference "
                        "JSON (default: the built-in CMU-1-Small-Region reference)")
    s.add_argument("--reference-folder", default=None, metavar="DIR",
                   help="published PLISM matrices/intensities (*_median.npz, "
                        "median_intensities_per_condition.csv) or reference JSON files: the "
                        "protocol's conditions then use them instead of the presets")
    s.add_argument("--seed", type=int, default=0, help="seed of the HED jitter (default 0)")
    s.set_defaults(func=_cmd_stain)

    s = sub.add_parser("robustness", help="run encoder + MIL model on a slide under each "
                                          "staining condition: predictions, range, "
                                          "attention stability (JSON lines, CSV, JSON)")
    s.add_argument("slide")
    s.add_argument("--model", required=True, metavar="CKPT_OR_demo",
                   help="MIL checkpoint (.safetensors/.pt/.pth/.ckpt) or 'demo'")
    s.add_argument("--encoder", required=True, help="encoder name (see the encoder registry)")
    s.add_argument("--weights", default=None, metavar="FILE", help="local encoder weights")
    s.add_argument("--arch", default=None, help="architecture (default: detected)")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="folder for SLIDE.robustness.csv / .json (created if missing)")
    s.add_argument("--conditions", default=None, metavar="A,B,...",
                   help="comma-separated conditions or 'all' (default: reference, "
                        "low-intensity, high-intensity, low-similarity, high-similarity)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--patch-um", type=float, default=None, metavar="UM",
                   help="patch side in microns (default: the model card's, else the "
                        "encoder's)")
    g.add_argument("--mag", type=float, default=None, metavar="X",
                   help="magnification to cut patches at (20x = 0.5 um/px)")
    s.add_argument("--min-tissue", type=float, default=0.25)
    s.add_argument("--mpp", type=float, default=None, help="override microns per pixel")
    s.add_argument("--source", default=None, help="attention source of the stability and "
                                                  "top-K (default: the model's default)")
    s.add_argument("--top-k", type=int, default=20, help="K of the top-K Jaccard index")
    s.add_argument("--reference", default=None, metavar="TILE_SLIDE_OR_JSON",
                   help="target of macenko/reinhard (default: built-in CMU-1-Small-Region)")
    s.add_argument("--reference-folder", default=None, metavar="DIR",
                   help="published PLISM files or reference JSONs (see `milview stain`)")
    s.add_argument("--seed", type=int, default=0, help="seed of the HED jitter (default 0)")
    s.add_argument("--cache-dir", default=None, metavar="DIR",
                   help="per-condition bag files, re-used by the next run (default: OUT/cache)")
    s.add_argument("--no-cache", action="store_true", help="keep no bag files")
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--workers", type=int, default=None,
                   help="reader threads (default: min(8, CPU cores), at least 2)")
    s.add_argument("--device", default="auto", help="auto (cuda, then cpu), cpu, cuda, cuda:N")
    s.set_defaults(func=_cmd_robustness)

    s = sub.add_parser("evaluate", help="measure heatmaps against annotations: localisation "
                                        "(AUROC, AP, top-K, Dice), concentration, deletion/"
                                        "insertion faithfulness (CSV, JSON lines, PNG)")
    s.add_argument("input", metavar="RESULT.h5|RESULTS_DIR",
                   help="a result h5, or a `milview run` output folder (*.result.h5)")
    s.add_argument("--annotations", required=True, metavar="FILE|DIR",
                   help="GeoJSON / ASAP XML, or a folder of <slide>.geojson|.xml")
    s.add_argument("--out", required=True, metavar="DIR",
                   help="folder for <slide>.evidence.csv, plots and summary.csv/.json")
    s.add_argument("--fraction", type=float, default=0.5,
                   help="a patch is positive when this share of it is annotated (default "
                        "0.5; 0 = any overlap)")
    s.add_argument("--labels", default=None, metavar="A,B",
                   help="annotation classes counted as lesion (default: every non-excluded)")
    s.add_argument("--k", type=int, default=None,
                   help="top-K (default: the number of positive patches for the top-K "
                        "precision, 20 for the mass and the top-K prediction)")
    s.add_argument("--dice-rule", default="otsu",
                   help="otsu (default), top_fraction, or a threshold on the scores")
    s.add_argument("--sources", default=None, metavar="A,B",
                   help="attention sources to measure (default: all)")
    s.add_argument("--steps", type=int, default=50, help="deletion/insertion steps")
    s.add_argument("--random-orders", type=int, default=5, help="random orders (default 5)")
    s.add_argument("--seed", type=int, default=0, help="seed of the random orders")
    s.add_argument("--model", default=None, metavar="CKPT|demo",
                   help="the model (default: the one the result names)")
    s.add_argument("--bag", default=None, metavar="BAG.h5",
                   help="the feature bag (default: the result's, or <id>.bag.h5 beside it)")
    s.add_argument("--no-faithfulness", action="store_true",
                   help="localisation and concentration only (no deletion/insertion; "
                        "--folds and --what-if still read the bag)")
    s.add_argument("--missing", choices=("skip", "negative", "error"), default="skip",
                   help="a slide without annotation file: skip it (default), count every "
                        "patch negative (CAMELYON normals), or fail")
    s.add_argument("--folds", nargs="+", default=None, metavar="CKPT",
                   help="other checkpoints of the result's model (cross-validation folds, an "
                        "ensemble): each runs on the cached bag; their disagreement with the "
                        "result goes to <slide>.disagreement.csv/.h5/.milview.json and the "
                        "JSON line (give it after RESULT)")
    s.add_argument("--folds-only", action="store_true",
                   help="the --folds checkpoints are the only members (default: the "
                        "result's own model is one too)")
    s.add_argument("--folds-sources", default=None, metavar="A,B",
                   help="attention sources compared across checkpoints (default: the "
                        "default source)")
    s.add_argument("--what-if", default=None, metavar="FILE|DIR",
                   help="regions (GeoJSON / ASAP XML, or a folder of <slide>.geojson|.xml): "
                        "the prediction without each region and from it alone, and for all "
                        "of them together (<slide>.what_if.csv, the JSON line)")
    s.add_argument("--what-if-fraction", type=float, default=None, metavar="F",
                   help="a patch is in a region when this share of it is covered (default: "
                        "--fraction; 0 = any overlap)")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("demo", help="napari on the bundled synthetic slide: the demo model "
                                    "runs and shows heatmap, top-K and prediction")
    s.add_argument("--screenshot", default=None, metavar="OUT.png",
                   help="headless: wait for the result, write a screenshot of the window, "
                        "print one JSON line and exit (under xvfb-run when there is no "
                        "display)")
    s.add_argument("--slide", default=None, metavar="SLIDE",
                   help="another slide (default: the bundled 20,000 x 15,000 synthetic one, "
                        "written on first use)")
    s.add_argument("--timeout", type=float, default=300.0, metavar="S",
                   help="with --screenshot: give up (exit 1) when the run takes longer")
    s.set_defaults(func=_cmd_demo)
    return p


#: Commands that run an encoder or a model, batch after batch, in this process.
MODEL_COMMANDS = ("extract", "attend", "robustness")


def main(argv: list[str] | None = None) -> int:
    from ._malloc import tune_for_batches
    from .slide import SlideError

    args = build_parser().parse_args(argv)
    if args.command in MODEL_COMMANDS:
        tune_for_batches()  # our own process: keep batch-sized blocks for reuse
    try:
        return int(args.func(args) or 0)
    except (SlideError, ValueError, FileNotFoundError) as e:
        print(f"milview {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

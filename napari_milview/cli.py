"""The ``milview`` command: info, synth, demo (more sub-commands arrive with the engine)."""

from __future__ import annotations

import argparse
import json
import sys


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


def _cmd_demo(args: argparse.Namespace) -> int:
    import napari

    from ._sample_data import sample_slide_path

    path = sample_slide_path(lesion=True)
    viewer = napari.Viewer(show=args.screenshot is None)
    viewer.open(str(path), plugin="napari-milview")
    viewer.scale_bar.visible = True
    if args.screenshot:
        viewer.window.show()
        viewer.reset_view()
        viewer.screenshot(args.screenshot, canvas_only=False)
        viewer.close()
        print(json.dumps({"slide": str(path), "screenshot": args.screenshot}))
        return 0
    napari.run()
    return 0


def build_parser() -> argparse.ArgumentParser:
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

    s = sub.add_parser("demo", help="open napari on the bundled synthetic slide")
    s.add_argument("--screenshot", default=None, metavar="OUT.png",
                   help="render headless, write a screenshot and exit")
    s.set_defaults(func=_cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    from .slide import SlideError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (SlideError, ValueError, FileNotFoundError) as e:
        print(f"milview {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

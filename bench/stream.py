#!/usr/bin/env python
"""Streaming benchmark (issue 2): our lazy dask pyramid vs OpenSlide, tiffslide and the
libjpeg-turbo decode floor, plus napari's time from ``viewer.open`` to the first drawn frame.

A benchmark, not a test: it asserts nothing and prints one markdown report. Run it as::

    xvfb-run -a -s "-screen 0 1280x1024x24" .venv/bin/python bench/stream.py
    .venv/bin/python bench/stream.py --quick          # smaller slide, fewer repeats (< 2 min)
    ... --docs docs/BENCHMARKS.md                     # also write the report into that file

(a) random viewports at levels 0, 1, 2, cold and warm, through ``levels[L][y:y+h, x:x+w]
    .compute()`` (dask threaded scheduler, 2 threads), raw ``OpenSlide.read_region`` (+ RGB
    numpy) and tiffslide's ``read_region``; (b) a scan of every tile of a tile-aligned block
    of level 0 on 1 and 2 threads against the "JPEG decode floor" (the same tiles' compressed
    bytes, already in memory, decoded by ``imagecodecs.jpeg8_decode``); (c) napari under Xvfb
    (started here through ``xvfb-run`` when there is no ``$DISPLAY``).

The synthetic slide is written once by :func:`napari_milview.synthetic.write_synthetic_slide`
into ``$MILVIEW_BENCH_CACHE`` (default ``~/.cache/napari_milview/bench``). The whole file is
read once before timing, so the OS page cache is warm for every reader alike; "cold" means
fresh handles and emptied user-space caches only.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
XVFB_ARGS = ["xvfb-run", "-a", "-s", "-screen 0 1280x1024x24"]
SECTION = "## Streaming (issue 2)"

FULL = {"width": 40_000, "height": 30_000, "viewports": 20, "scan_tiles": 40,
        "scan_repeats": 3, "napari_repeats": 7}
QUICK = {"width": 8_192, "height": 6_144, "viewports": 5, "scan_tiles": 16,
         "scan_repeats": 2, "napari_repeats": 3}
TILE, LEVELS, MPP = 256, 4, 0.25
VIEW_H, VIEW_W = 1080, 1920


# --------------------------------------------------------------------------- helpers
def now() -> float:
    return time.perf_counter()


def med(xs) -> float:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else float("nan")


def ms(x: float | None) -> str:
    if x is None or x != x:
        return "n/a"
    return f"{x * 1e3:.1f}" if x < 0.1 else f"{x * 1e3:.0f}"


def ratio(a: float, b: float) -> str:
    return "n/a" if not (a == a and b == b and b > 0) else f"{a / b:.2f}x"


def table(header: list[str], rows: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cache_dir() -> Path:
    env = os.environ.get("MILVIEW_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "napari_milview" / "bench"


def get_slide(width: int, height: int, seed: int, regenerate: bool = False) -> tuple[Path, float]:
    """The cached synthetic slide (written when absent); returns (path, seconds spent writing)."""
    from napari_milview.synthetic import write_synthetic_slide

    name = f"synthetic-{width}x{height}-mpp{MPP}-t{TILE}-l{LEVELS}-seed{seed}"
    final = cache_dir() / name
    path = final / "slide.svs"
    if path.exists() and (final / "slide.json").exists() and not regenerate:
        return path, 0.0
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=name + ".partial.", dir=final.parent))
    log(f"writing the synthetic slide {width} x {height} into {final} (once) ...")
    t0 = now()
    try:
        write_synthetic_slide(tmp / "slide.svs", width=width, height=height, mpp=MPP, tile=TILE,
                              levels=LEVELS, seed=seed, lesion=True)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path, now() - t0


def cpu_busy() -> tuple[float, float]:
    """(seconds of CPU busy on the whole machine, seconds used by this process and its
    waited-for children), to tell how much other processes competed during the run."""
    try:
        f = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # all but idle, iowait
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    t = os.times()
    return busy, t.user + t.system + t.children_user + t.children_system


def wait_quiet(limit: float, window: float = 10.0, cores: float = 0.15) -> None:
    end = now() + limit
    while True:
        a = cpu_busy()
        time.sleep(window)
        b = cpu_busy()
        other = ((b[0] - a[0]) - (b[1] - a[1])) / window
        if other < cores or now() >= end:
            log(f"other processes: {other:.2f} cores" + ("" if other < cores else
                " (still busy; measuring anyway)"))
            return
        log(f"other processes: {other:.2f} cores, waiting ...")


def warm_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(16 << 20):
            pass


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def versions() -> dict[str, str]:
    import dask
    import imagecodecs
    import openslide
    import tifffile

    import napari_milview

    v = {
        "python": platform.python_version(),
        "napari_milview": getattr(napari_milview, "__version__", "?"),
        "openslide-python": openslide.__version__,
        "libopenslide": openslide.__library_version__,
        "dask": dask.__version__,
        "numpy": np.__version__,
        "tifffile": tifffile.__version__,
        "imagecodecs": imagecodecs.__version__,
        "libjpeg": imagecodecs.jpeg8_version(),
    }
    try:
        import simplejpeg

        v["simplejpeg"] = simplejpeg.__version__
    except ImportError as e:
        v["simplejpeg"] = f"not installed ({e})"
    try:
        import tiffslide

        v["tiffslide"] = tiffslide.__version__
    except ImportError as e:
        v["tiffslide"] = f"not installed ({e})"
    try:
        from importlib.metadata import version

        v["napari"] = version("napari")
    except Exception:  # noqa: BLE001
        v["napari"] = "not installed"
    return v


# --------------------------------------------------------------------- (a) viewports
class Readers:
    """One cold read and one warm read (the same viewport again) per reader."""

    def __init__(self, path: Path, pool2: ThreadPoolExecutor):
        self.path = str(path)
        self.pool2 = pool2

    def ours_dask(self, level, y, x, h, w):
        from napari_milview.slide import open_slide, shared_cache

        shared_cache().clear()
        t0 = now()
        slide = open_slide(self.path)
        t_open = now() - t0
        levels = slide.to_dask()
        try:
            t0 = now()
            a = levels[level][y:y + h, x:x + w].compute(scheduler="threads", pool=self.pool2)
            cold = now() - t0
            t0 = now()
            levels[level][y:y + h, x:x + w].compute(scheduler="threads", pool=self.pool2)
            warm = now() - t0
        finally:
            slide.close()
        return cold, warm, t_open, a

    def ours_asarray(self, level, y, x, h, w):
        from napari_milview.slide import open_slide, shared_cache

        shared_cache().clear()
        slide = open_slide(self.path)
        levels = slide.to_dask()
        try:
            t0 = now()
            a = np.asarray(levels[level][y:y + h, x:x + w])
            cold = now() - t0
            t0 = now()
            np.asarray(levels[level][y:y + h, x:x + w])
            warm = now() - t0
        finally:
            slide.close()
        return cold, warm, None, a

    def ours_tile_graph(self, level, y, x, h, w):
        """The same window through dask's per-tile graph (``dask.compute``), which is what
        any dask computation built on the level arrays pays (one task per 256-px tile)."""
        import dask

        from napari_milview.slide import open_slide, shared_cache

        shared_cache().clear()
        slide = open_slide(self.path)
        levels = slide.to_dask()
        try:
            t0 = now()
            (a,) = dask.compute(levels[level][y:y + h, x:x + w], scheduler="threads",
                                pool=self.pool2)
            cold = now() - t0
            t0 = now()
            dask.compute(levels[level][y:y + h, x:x + w], scheduler="threads", pool=self.pool2)
            warm = now() - t0
        finally:
            slide.close()
        return cold, warm, None, a

    def openslide(self, level, y, x, h, w):
        import openslide

        t0 = now()
        osr = openslide.OpenSlide(self.path)
        t_open = now() - t0
        ds = osr.level_downsamples[level]
        loc = (int(round(x * ds)), int(round(y * ds)))
        try:
            # PIL RGBA -> RGB numpy: Image.convert("RGB") is the cheaper of the two usual ways
            # (np.asarray(img)[..., :3] costs ~1.7x more for a 1920 x 1080 region).
            t0 = now()
            a = np.asarray(osr.read_region(loc, level, (w, h)).convert("RGB"))
            cold = now() - t0
            t0 = now()
            np.asarray(osr.read_region(loc, level, (w, h)).convert("RGB"))
            warm = now() - t0
        finally:
            osr.close()
        return cold, warm, t_open, a

    def tiffslide(self, level, y, x, h, w):
        import tiffslide

        t0 = now()
        ts = tiffslide.TiffSlide(self.path)
        t_open = now() - t0
        ds = ts.level_downsamples[level]
        loc = (int(round(x * ds)), int(round(y * ds)))
        try:
            t0 = now()
            a = ts.read_region(loc, level, (w, h), as_array=True)
            cold = now() - t0
            t0 = now()
            ts.read_region(loc, level, (w, h), as_array=True)
            warm = now() - t0
        finally:
            ts.close()
        return cold, warm, t_open, a


READERS = [
    ("ours: dask `.compute()`, 2 threads", "ours_dask"),
    ("ours: `np.asarray(view)` (napari's path)", "ours_asarray"),
    ("OpenSlide `read_region` + RGB", "openslide"),
    ("tiffslide `read_region`", "tiffslide"),
    ("dask's per-tile graph of the same window (`dask.compute`)", "ours_tile_graph"),
]


def bench_viewports(path: Path, n: int, seed: int) -> dict:
    from napari_milview.slide import open_slide

    with open_slide(str(path)) as s:
        shapes = [lv.shape for lv in s.info.levels[: s.n_native]]
    have_tiffslide = _importable("tiffslide")
    readers = [r for r in READERS if have_tiffslide or r[1] != "tiffslide"]
    rng = np.random.default_rng(seed)
    pool2 = ThreadPoolExecutor(2, thread_name_prefix="bench-dask")
    rd = Readers(path, pool2)
    results = {}
    for level in (0, 1, 2):
        if level >= len(shapes):
            continue
        H, W = shapes[level]
        h, w = min(VIEW_H, H), min(VIEW_W, W)
        rec = {name: {"cold": [], "warm": [], "open": []} for name, _ in readers}
        maxdiff = {name: 0 for name, _ in readers}
        for i in range(n):
            y = int(rng.integers(0, H - h + 1))
            x = int(rng.integers(0, W - w + 1))
            arrays = {}
            k = i % len(readers)  # rotate the order so that no reader always goes first
            for name, meth in readers[k:] + readers[:k]:
                cold, warm, t_open, arrays[name] = getattr(rd, meth)(level, y, x, h, w)
                rec[name]["cold"].append(cold)
                rec[name]["warm"].append(warm)
                rec[name]["open"].append(t_open)
            ours = arrays[readers[0][0]]
            for name, a in arrays.items():  # pixel agreement with ours on this viewport
                d = int(np.abs(a.astype(np.int16) - ours).max()) if a.shape == ours.shape else -1
                maxdiff[name] = -1 if -1 in (d, maxdiff[name]) else max(maxdiff[name], d)
            del arrays, ours
            gc.collect()
        results[level] = {"shape": (H, W), "view": (h, w), "rec": rec, "maxdiff": maxdiff,
                          "tiles": None}
        log(f"  (a) level {level} done")
    pool2.shutdown()
    return results


def _importable(mod: str) -> bool:
    try:
        __import__(mod)
        return True
    except Exception:  # noqa: BLE001
        return False


# --------------------------------------------------------------------------- (b) scan
def _touch(b):
    # one value per tile; keeping all three axes avoids the copy (concatenate3) that
    # map_blocks(drop_axis=...) adds per block
    return np.full((1, 1, 1), b[0, 0, 0], np.uint8)


def bench_scan(path: Path, ntiles: int, repeats: int) -> dict:
    """Every tile of a tile-aligned ``ntiles x ntiles`` block at the centre of level 0."""
    import imagecodecs
    import tifffile

    from napari_milview.slide import open_slide, shared_cache

    with tifffile.TiffFile(str(path)) as tf:
        page = next(p for p in tf.pages if p.is_tiled)  # level 0
        cols = -(-page.imagewidth // page.tilewidth)
        rows = -(-page.imagelength // page.tilelength)
        th, tw = page.tilelength, page.tilewidth
        n = min(ntiles, rows - 1, cols - 1)
        # centred, and aligned to 4 tiles so the 1024-px chunks of the whole-slide path
        # hold exactly the block's tiles (a full-level scan is aligned by definition)
        r0, c0 = (rows - 1 - n) // 2 // 4 * 4, (cols - 1 - n) // 2 // 4 * 4
        keys = [(r0 + r, c0 + c) for r in range(n) for c in range(n)]
        tables = page.jpegtables
        from napari_milview.slide.tiff_tiles import _strict_prefix

        prefix = _strict_prefix(page)  # None without simplejpeg
        fh = tf.filehandle
        blobs = []
        for r, c in keys:
            i = r * cols + c
            fh.seek(page.dataoffsets[i])
            blobs.append(fh.read(page.databytecounts[i]))
    y0, x0, y1, x1 = r0 * th, c0 * tw, (r0 + n) * th, (c0 + n) * tw
    ntot = len(keys)

    def decode_all(nt, dec):
        """Seconds to decode every tile's bytes with ``dec`` on ``nt`` threads."""
        with ThreadPoolExecutor(nt) as ex:
            t0 = now()
            for _ in ex.map(dec, blobs):
                pass
            return now() - t0

    def floor(nt):
        return decode_all(nt, lambda b: imagecodecs.jpeg8_decode(b, tables=tables)[0, 0, 0])

    def floor_strict(nt):
        import simplejpeg

        return decode_all(nt, lambda b: simplejpeg.decode_jpeg(
            prefix + b[2:], colorspace="RGB", strict=True)[0, 0, 0])

    def ours_scan_lenient(nt):
        # the same scan with libjpeg's warnings ignored (imagecodecs decodes the very
        # stream the strict decoder gets): what the direct path did before the check
        from napari_milview.slide import tiff_tiles

        strict = tiff_tiles.decode_jpeg_strict
        tiff_tiles.decode_jpeg_strict = lambda data: imagecodecs.jpeg8_decode(data)
        try:
            return ours_scan(nt)
        finally:
            tiff_tiles.decode_jpeg_strict = strict

    def ours_dask_tiles(nt):
        shared_cache().clear()
        with open_slide(str(path)) as s, ThreadPoolExecutor(nt) as ex:
            t0 = now()
            region = s.to_dask()[0][y0:y1, x0:x1]
            region.map_blocks(_touch, chunks=(1, 1, 1), dtype=np.uint8).compute(
                scheduler="threads", pool=ex)
            return now() - t0

    def ours_dask_array(nt):
        shared_cache().clear()
        with open_slide(str(path)) as s, ThreadPoolExecutor(nt) as ex:
            t0 = now()
            a = s.to_dask()[0][y0:y1, x0:x1].compute(scheduler="threads", pool=ex)
            dt = now() - t0
            del a
            return dt

    def ours_scan(nt):
        shared_cache().clear()
        with open_slide(str(path)) as s:
            t0 = now()
            for _ in s.iter_tiles(0, rows=range(r0, r0 + n), cols=range(c0, c0 + n),
                                  threads=nt):
                pass
            return now() - t0

    def ours_dask_coarse(nt):
        shared_cache().clear()
        with open_slide(str(path)) as s, ThreadPoolExecutor(nt) as ex:
            t0 = now()
            region = s.to_dask(chunk=1024)[0][y0:y1, x0:x1]
            region.map_blocks(_touch, chunks=(1, 1, 1), dtype=np.uint8).compute(
                scheduler="threads", pool=ex)
            return now() - t0

    def openslide_tiles(nt):
        import openslide

        osr = openslide.OpenSlide(str(path))
        try:
            with ThreadPoolExecutor(nt) as ex:
                def rd(k):
                    img = osr.read_region((k[1] * tw, k[0] * th), 0, (tw, th))
                    return np.asarray(img.convert("RGB"))[0, 0, 0]
                t0 = now()
                for _ in ex.map(rd, keys):
                    pass
                return now() - t0
        finally:
            osr.close()

    def tiffslide_tiles(nt):
        import tiffslide

        ts = tiffslide.TiffSlide(str(path))
        try:
            with ThreadPoolExecutor(nt) as ex:
                def rd(k):
                    return ts.read_region((k[1] * tw, k[0] * th), 0, (tw, th),
                                          as_array=True)[0, 0, 0]
                t0 = now()
                for _ in ex.map(rd, keys):
                    pass
                return now() - t0
        finally:
            ts.close()

    cases = [
        ("JPEG decode floor: `imagecodecs.jpeg8_decode`, bytes in RAM", floor),
        ("ours: `Slide.iter_tiles` (the scan API, no dask)", ours_scan),
        ("ours: `Slide.iter_tiles`, libjpeg warnings ignored (before the corrupt-tile check)",
         ours_scan_lenient),
        ("ours: dask, 1024-px chunks (`to_dask(chunk=1024)`, whole-slide work)",
         ours_dask_coarse),
        ("ours: dask, one task per tile (`map_blocks`)", ours_dask_tiles),
        ("ours: dask `.compute()` of the block (assembled array)", ours_dask_array),
        ("OpenSlide `read_region` per 256-px tile + RGB", openslide_tiles),
    ]
    if _importable("tiffslide"):
        cases.append(("tiffslide `read_region` per 256-px tile", tiffslide_tiles))
    if prefix is not None:
        cases.insert(1, ("strict JPEG decode floor: `simplejpeg.decode_jpeg(strict=True)` "
                         "(libjpeg warnings are errors), bytes in RAM", floor_strict))
    else:
        cases = [c for c in cases if c[1] is not ours_scan_lenient]
    floor(1)  # warm-up: allocator, decoder tables
    res = {name: {1: [], 2: []} for name, _ in cases}
    for _ in range(repeats):
        for nt in (1, 2):
            for name, fn in cases:
                gc.collect()
                res[name][nt].append(ntot / fn(nt))
    log("  (b) scan done")
    return {"n": n, "tiles": ntot, "block": (y0, x0, y1, x1),
            "mb": sum(map(len, blobs)) / 1e6,
            "rates": {name: {nt: med(v) for nt, v in d.items()} for name, d in res.items()}}


# --------------------------------------------------- OpenSlide's sub-pixel resampling
def subpixel_check(path: Path) -> list[str]:
    """At levels with a non-integer downsample, does read_region resample between pixels?"""
    import openslide
    import tifffile

    notes = []
    osr = openslide.OpenSlide(str(path))
    try:
        with tifffile.TiffFile(str(path)) as tf:
            pages = [p for p in tf.pages if p.is_tiled]
            for level, ds in enumerate(osr.level_downsamples):
                if abs(ds - round(ds)) < 1e-9 or level >= len(pages):
                    continue
                from scipy import ndimage

                full = pages[level].asarray().astype(np.float32)
                H, W = full.shape[:2]
                h, w = min(64, H // 2), min(64, W // 2)
                # the h x w window with the most horizontal detail (a sub-pixel shift shows)
                gx = np.zeros((H, W), np.float32)
                gx[:, :-1] = np.abs(np.diff(full, axis=1)).sum(-1)
                score = ndimage.uniform_filter(gx, (h, w), mode="constant")
                score[: h // 2 + 1], score[H - h // 2 - 2:] = -1, -1
                score[:, : w // 2 + 1], score[:, W - w // 2 - 2:] = -1, -1
                cy, cx = np.unravel_index(int(np.argmax(score)), score.shape)
                yl, xl = int(cy) - h // 2, int(cx) - w // 2
                parts = []
                for frac in (0.0, 0.25, 0.5):
                    loc = (int(round((xl + frac) * ds)), int(round(yl * ds)))
                    fx = loc[0] / ds
                    i = int(np.floor(fx))
                    f = fx - i
                    got = np.asarray(osr.read_region(loc, level, (w, h)).convert("RGB"))
                    got = got.astype(np.float32)
                    near = int(round(fx))
                    d_near = float(np.abs(got - full[yl:yl + h, near:near + w]).mean())
                    lin = (1 - f) * full[yl:yl + h, i:i + w] + f * full[yl:yl + h, i + 1:i + 1 + w]
                    d_lin = float(np.abs(got - lin).mean())
                    parts.append(f"x = {loc[0]} -> level x {fx:.3f}: mean |diff| {d_near:.2f} "
                                 f"vs the stored pixels at x {near}, {d_lin:.2f} vs a bilinear "
                                 f"resample at that offset")
                notes.append(
                    f"level {level} ({W} x {H} px) has downsample {ds:.4f} (OpenSlide averages "
                    f"{pages[0].imagewidth}/{W} = {pages[0].imagewidth / W:.4f} and "
                    f"{pages[0].imagelength}/{H} = {pages[0].imagelength / H:.4f}); "
                    + "; ".join(parts))
    finally:
        osr.close()
    return notes


# ------------------------------------------------------------------------ (c) napari
def tissue_target(path: Path) -> tuple[int, int]:
    """Level-0 (y, x) of the most tissue-rich spot (so the zoom-in test does not land on glass)."""
    from scipy import ndimage

    from napari_milview.slide import open_slide

    with open_slide(str(path)) as s:
        k = s.n_native - 1
        low = np.asarray(s.to_dask()[k])
        ds = s.info.levels[k].downsample
    tissue = ((low.min(-1) < 215) & (low.max(-1) > 30)).astype(np.float32)
    win = max(3, int(round(1024 / ds)))  # about a 1024-px level-0 window
    score = ndimage.uniform_filter(tissue, win, mode="constant")
    y, x = np.unravel_index(int(np.argmax(score)), score.shape)
    return int((y + 0.5) * ds), int((x + 0.5) * ds)


def napari_in_child(path: Path, repeats: int, timeout: int = 300) -> dict:
    """Run the napari part in a fresh process (under xvfb-run when there is no display)."""
    ty, tx = tissue_target(path)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--napari-child", str(path),
           "--napari-repeats", str(repeats), "--jump", f"{ty},{tx}"]
    env = dict(os.environ)
    env.setdefault("QT_QPA_PLATFORM", "xcb")
    if not env.get("DISPLAY"):
        if not shutil.which("xvfb-run"):
            return {"error": "no $DISPLAY and no xvfb-run (apt-get install xvfb)"}
        cmd = XVFB_ARGS + cmd
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"napari run timed out after {timeout} s"}
    for line in p.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (p.stderr or p.stdout).strip().splitlines()[-5:]
    return {"error": f"napari run failed (rc {p.returncode}): " + " / ".join(tail)}


class _OpenSlideChunks:
    """napari-lazy-openslide's I/O, inline: 512-px RGBA chunks from ``OpenSlide.read_region``."""

    def __init__(self, osr, level: int, chunk: int = 512):
        self.osr, self.level, self.chunk = osr, level, chunk
        w, h = osr.level_dimensions[level]
        self.shape, self.dtype, self.ndim = (h, w, 4), np.dtype(np.uint8), 3

    def __getitem__(self, key):
        ys, xs = key[0], key[1]
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        ds = self.osr.level_downsamples[self.level]
        img = self.osr.read_region((int(x0 * ds), int(y0 * ds)), self.level, (x1 - x0, y1 - y0))
        return np.asarray(img)[..., key[2] if len(key) > 2 else slice(None)]


def napari_child(path: str, repeats: int, jump: tuple[int, int]) -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    import uuid

    import dask.array as da
    import napari
    import openslide
    from qtpy import API_NAME, QT_VERSION
    from qtpy.QtWidgets import QApplication

    from napari_milview.slide import shared_cache

    viewer = napari.Viewer(show=True)
    app = QApplication.instance()
    viewer.window._qt_window.resize(1280, 1000)
    canvas = viewer.window._qt_viewer.canvas.native
    for _ in range(50):
        app.processEvents()
        time.sleep(0.01)
    size = canvas.size()
    out = {"canvas": [size.width(), size.height()], "qt": f"{API_NAME} {QT_VERSION}",
           "napari": napari.__version__, "jump": list(jump)}
    try:
        from napari.settings import get_settings

        out["async"] = bool(get_settings().experimental.async_)
    except Exception:  # noqa: BLE001
        out["async"] = None
    try:
        from vispy.gloo import gl

        canvas.makeCurrent()
        out["gl"] = gl.glGetParameter(gl.GL_RENDERER)
    except Exception:  # noqa: BLE001
        out["gl"] = "?"

    def drawn(layer, want_level=None, limit=60.0):
        """Process Qt events until the layer holds the data of the current view, then paint."""
        end = now() + limit
        while now() < end:
            app.processEvents()
            if layer.loaded and (want_level is None or layer.data_level == want_level):
                break
        canvas.repaint()  # synchronous paintGL with that data
        app.processEvents()

    # napari's one-time costs (pint's unit registry alone is ~0.6 s) are not the reader's
    warm = viewer.add_image(np.zeros((64, 64, 3), np.uint8), rgb=True, scale=(MPP, MPP),
                            units=("um", "um"))
    drawn(warm)
    viewer.layers.clear()
    app.processEvents()

    def tissue_share():
        shot = viewer.screenshot(canvas_only=True, flash=False)[..., :3].astype(np.int16)
        # tissue: clearly darker than the ~240 glass; a black (undrawn) canvas does not count
        return float(((shot.min(-1) < 215) & (shot.max(-1) > 30)).mean())

    def run(open_layer, cold_cache):
        opens, jumps, levels, tissue = [], [], [], None
        for i in range(repeats):
            cold_cache()
            t0 = now()
            layer = open_layer()
            drawn(layer)
            opens.append(now() - t0)
            levels.append(int(layer.data_level))
            last = i == repeats - 1
            if last:
                tissue = [tissue_share()]
            # jump to full resolution (1 screen px = 1 level-0 px) on a tissue-rich spot
            sy, sx = layer.scale[:2]
            t0 = now()
            viewer.camera.center = (jump[0] * sy, jump[1] * sx)
            viewer.camera.zoom = 1.0 / sx
            drawn(layer, want_level=0)
            jumps.append(now() - t0 if layer.data_level == 0 else None)
            if last:
                tissue.append(tissue_share())
            viewer.layers.clear()
            app.processEvents()
        return {"open": opens, "jump": jumps, "levels": levels, "tissue": tissue}

    def ours_cold():
        shared_cache().clear()

    out["ours"] = run(lambda: viewer.open(path, plugin="napari-milview")[0], ours_cold)

    try:
        import napari_lazy_openslide  # noqa: F401
    except Exception as e:  # noqa: BLE001
        out["nlo"] = {"error": f"{type(e).__name__}: {e}"}
    else:
        out["nlo"] = run(lambda: viewer.open(path, plugin="napari-lazy-openslide")[0],
                         lambda: None)

    handles = []

    def nlo_inline():
        osr = openslide.OpenSlide(path)
        handles.append(osr)
        tag = uuid.uuid4().hex  # new dask keys: napari's dask cache starts empty each time
        pyramid = [da.from_array(_OpenSlideChunks(osr, i), chunks=(512, 512, 4),
                                 name=f"nlo-{tag}-{i}", asarray=False, fancy=False)
                   for i in range(osr.level_count)]
        mpp = float(osr.properties.get("openslide.mpp-x", 1))
        return viewer.add_image(pyramid, multiscale=True, rgb=True, scale=(mpp, mpp),
                                name=os.path.basename(path))

    out["nlo_inline"] = run(nlo_inline, lambda: None)
    for h in handles:
        h.close()
    print("RESULT " + json.dumps(out), flush=True)
    viewer.close()


def nlo_status() -> str:
    """Whether napari-lazy-openslide imports in this environment (it is the peer in (c))."""
    try:
        from importlib.metadata import version

        v = version("napari-lazy-openslide")
    except Exception:  # noqa: BLE001
        return ("not installable: napari-lazy-openslide 0.3.0 (its newest release) pip-installs "
                "next to napari 0.9.2 (it pins only zarr>=2.11), but `import "
                "napari_lazy_openslide` fails with zarr 3: ImportError: cannot import name "
                "'_path_to_prefix' from 'zarr.storage' (it is built on the zarr-2 store API: "
                "zarr.storage.BaseStore/init_array, zarr.util), so it is not in .venv")
    try:
        import napari_lazy_openslide  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"installed ({v}) but not importable: {type(e).__name__}: {e}"
    return f"napari-lazy-openslide {v}"


# ------------------------------------------------------------------------- profiling
def profile(path: Path, block: tuple[int, int, int, int]) -> str:
    """cProfile of our dask paths: a warm viewport (main thread: graph + scheduler), the
    scan block with a warm cache (pure dask cost per tile) and cold (sync scheduler, so
    that the decode shows up in the same profile)."""
    import cProfile
    import io
    import pstats

    from napari_milview.slide import open_slide, shared_cache

    out = io.StringIO()
    y0, x0, y1, x1 = block
    with open_slide(str(path)) as slide, ThreadPoolExecutor(2) as ex:
        lv = slide.to_dask()[0]
        y, x = (y0 + y1) // 2, (x0 + x1) // 2
        lv[y:y + VIEW_H, x:x + VIEW_W].compute(scheduler="threads", pool=ex)
        pr = cProfile.Profile()
        pr.enable()
        for _ in range(50):
            lv[y:y + VIEW_H, x:x + VIEW_W].compute(scheduler="threads", pool=ex)
        pr.disable()
        out.write("### warm 1920x1080 viewport, level 0, 50 x `.compute()` (2 threads; "
                  "main thread only)\n")
        pstats.Stats(pr, stream=out).sort_stats("cumulative").print_stats(22)

        def scan(**kw):
            lv[y0:y1, x0:x1].map_blocks(_touch, chunks=(1, 1, 1), dtype=np.uint8).compute(**kw)

        shared_cache().clear()
        scan(scheduler="threads", pool=ex)  # fills the cache
        t0 = now()
        scan(scheduler="threads", pool=ex)
        n = ((y1 - y0) // TILE) * ((x1 - x0) // TILE)
        out.write(f"### scan block, warm cache (no decoding): {n / (now() - t0):.0f} tiles/s "
                  f"through dask on 2 threads = {1e3 * (now() - t0) / n:.3f} ms of dask per "
                  "tile\n")
        pr = cProfile.Profile()
        shared_cache().clear()
        pr.enable()
        scan(scheduler="sync")
        pr.disable()
        out.write("### scan block, cold, dask sync scheduler (everything in one thread)\n")
        pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(22)
    return out.getvalue()


# --------------------------------------------------------------------------- report
def report(args, cfg, path, gen_s, info, va, sc, subpx, nap, vers) -> str:
    from napari_milview.slide import open_slide

    with open_slide(str(path)) as s:
        lv = s.info.levels[: s.n_native]
        size = os.path.getsize(path)
    L = []
    exe = os.path.relpath(sys.executable) if not os.path.relpath(sys.executable).startswith(
        "..") else sys.executable
    cmd = " ".join([exe, "bench/stream.py", *info["argv"]])
    xvfb = "" if info["display"] or args.no_napari else (
        " (no $DISPLAY, so the napari part ran under "
        "`xvfb-run -a -s \"-screen 0 1280x1024x24\"` with `QT_QPA_PLATFORM=xcb`)")
    L.append(f"Machine: this dev machine, {info['cores']} cores, {info['cpu']}, "
             f"{info['mem']} RAM, {platform.system()} {platform.release()}; "
             f"date {info['date']}. Threads used: 1 and 2. Other processes used "
             f"{info['other_load']:.2f} cores on average during the run (from /proc/stat; "
             "0 means a quiet machine, and above ~0.2 the figures below are noisy).")
    L.append("")
    L.append("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()) + ".")
    L.append("")
    L.append(f"Command: `{cmd}`{xvfb}; total {info['total']:.0f} s"
             + (f", of which {gen_s:.0f} s writing the slide" if gen_s else "") + ".")
    L.append("")
    L.append(
        f"Slide: synthetic H&E (`napari_milview.synthetic`, seed {args.seed}), "
        f"{cfg['width']} x {cfg['height']} px, mpp {MPP}, 256-px JPEG tiles (q 85), Aperio-like "
        f"SVS, {size / 1e6:.0f} MB; levels "
        + ", ".join(f"{v.shape[1]}x{v.shape[0]} (ds {v.downsample:g})" for v in lv)
        + ". The file is read once before timing, so the OS page cache is warm for every "
        "reader alike.")
    L.append("")

    # (a)
    L.append(f"### (a) Random viewports, cold and warm (medians of {cfg['viewports']} per level)")
    L.append("")
    L.append("Cold: our `TileCache` cleared and the slide reopened (new OpenSlide handle), a new "
             "`OpenSlide` / `TiffSlide` object for the others; the OS page cache stays warm for "
             "all three. Warm: the same viewport again on the same object. Opening is not "
             "timed here (see the last column). Ours/OpenSlide compares medians; targets: "
             "cold <= 1.1x, warm <= 0.1x, for the `.compute()` row (a window of a level is read "
             "in one go through `Slide.read`); `np.asarray` of the same lazy slice is what "
             "napari does on every redraw. The last row is the same window through dask's "
             "per-tile graph, for comparison.")
    L.append("")
    rows = []
    for level, r in va.items():
        os_c = med(r["rec"]["OpenSlide `read_region` + RGB"]["cold"])
        os_w = med(r["rec"]["OpenSlide `read_region` + RGB"]["warm"])
        for name, _ in READERS:
            if name not in r["rec"]:
                continue
            c, w = med(r["rec"][name]["cold"]), med(r["rec"][name]["warm"])
            o = med(r["rec"][name]["open"])
            is_ours = name.startswith("ours")
            show = is_ours
            cmark = ("yes" if c / os_c <= 1.1 else "**no**") if is_ours else ""
            wmark = ("yes" if w / os_w <= 0.1 else "**no**") if is_ours else ""
            diff = r["maxdiff"].get(name)
            rows.append([
                f"{level} ({r['view'][1]}x{r['view'][0]})", name, ms(c), ms(w),
                ratio(c, os_c) if show else "", cmark,
                ratio(w, os_w) if show else "", wmark,
                "" if diff is None else ("-" if name == READERS[0][0] else str(diff)),
                ms(o) if o == o else "",
            ])
    L.append(table(["level (viewport)", "reader", "cold ms", "warm ms", "cold / OpenSlide",
                    "<= 1.1x", "warm / OpenSlide", "<= 0.1x", "max abs px diff vs ours",
                    "open ms"], rows))
    L.append("")

    # (b)
    y0, x0, y1, x1 = sc["block"]
    L.append(f"### (b) Tile scan: every tile of a {sc['n']} x {sc['n']}-tile block of level 0 "
             f"({sc['tiles']} tiles, {x1 - x0} x {y1 - y0} px at ({x0}, {y0}), "
             f"{sc['mb']:.1f} MB of JPEG), tiles/s, median of {cfg['scan_repeats']}")
    L.append("")
    L.append("Floor: the same tiles' compressed bytes (tifffile `dataoffsets`/`databytecounts`, "
             "no JPEG tables in this file) held in memory and decoded by libjpeg-turbo "
             "(`imagecodecs.jpeg8_decode`) on a `ThreadPoolExecutor`. Ours: cold (cache cleared, "
             "slide reopened), dask threaded scheduler with a pool of 1 or 2 threads, graph "
             "building included. Target: ours on 2 threads >= 70 % of the floor on 2 threads. "
             "`Slide.iter_tiles` is the package's scan API (decode threads, tiles in order, "
             "no dask, no assembly); `to_dask(chunk=1024)` is the dask path for whole-slide "
             "work (each task assembles 4 x 4 tiles into one chunk); the native "
             "one-task-per-tile graph (what napari gets) and the assembled block follow. "
             "The direct path decodes JPEG tiles strictly (simplejpeg: a libjpeg warning such "
             "as 'premature end of data segment' is an error, the tile a counted bad tile, as "
             "in OpenSlide); the row 'libjpeg warnings ignored' is the same scan in the same "
             "run with imagecodecs decoding the same streams, i.e. without that check.")
    L.append("")
    fl = sc["rates"][next(iter(sc["rates"]))]
    rows = []
    for name, r in sc["rates"].items():
        is_dask = name.startswith("ours")
        mark = ("yes" if r[2] / fl[2] >= 0.7 else "**no**") if is_dask else ""
        rows.append([name, f"{r[1]:.0f}", f"{r[2]:.0f}", f"{r[2] / r[1]:.2f}x",
                     f"{100 * r[1] / fl[1]:.0f} %", f"{100 * r[2] / fl[2]:.0f} %", mark])
    L.append(table(["reader", "1 thread", "2 threads", "2 / 1", "of floor (1 thr)",
                    "of floor (2 thr)", ">= 70 %"], rows))
    L.append("")

    # (c)
    L.append("### (c) napari: `viewer.open(path)` to the first fully drawn frame")
    L.append("")
    if "error" in nap:
        L.append(f"Not measured: {nap['error']}")
    else:
        L.append(
            f"Real `napari.Viewer(show=True)` under Xvfb ({nap['qt']}, GL: {nap['gl']}, canvas "
            f"{nap['canvas'][0]} x {nap['canvas'][1]} px, async slicing "
            f"{'on' if nap.get('async') else 'off (default)'}), in a fresh process after a "
            "warm-up layer (napari's one-time pint unit registry, ~0.6 s, is not charged to "
            "any reader). Timed from `viewer.open` (or building the layer) until the layer "
            "reports `loaded` for the current view while Qt events are processed, plus one "
            "synchronous `canvas.native.repaint()` and `processEvents()`. \"Jump\": then "
            "centre the camera and set 1 screen px = 1 level-0 px, timed until level 0 is "
            "loaded and painted, on the most tissue-rich spot (level-0 y, x = "
            f"{nap['jump'][0]}, {nap['jump'][1]}; cold: no level-0 tile cached yet). Screenshots "
            "of the last run, after the open and after the jump, must show tissue (the share "
            "of tissue-coloured canvas pixels is given). Medians of "
            f"{cfg['napari_repeats']}; our cache is cleared before each.")
        L.append("")
        rows = []
        for key, name in (("ours", "ours: `viewer.open(path, plugin=\"napari-milview\")`"),
                          ("nlo", "napari-lazy-openslide"),
                          ("nlo_inline", ("its method inline: OpenSlide 512-px RGBA chunks "
                                          "+ `da.from_array`, napari dask cache on"))):
            r = nap.get(key, {})
            if "error" in r or not r:
                rows.append([name, nlo_status() if key == "nlo" else
                             r.get("error", "n/a"), "", "", "", ""])
                continue
            rows.append([name, ms(r["open"][0]), ms(med(r["open"])), ms(med(r["jump"])),
                         ",".join(str(x) for x in sorted(set(r["levels"]))),
                         " / ".join(f"{100 * t:.0f} %" for t in r["tissue"] or [])])
        L.append(table(["reader", "first open ms", "open median ms", "jump to level 0 ms",
                        "level drawn", "tissue in screenshot (open / jump)"], rows))
    L.append("")
    if subpx:
        L.append("### OpenSlide at a non-integer downsample")
        L.append("")
        for n in subpx:
            L.append(f"- {n}.")
        L.append("")
    return "\n".join(L)


def write_docs(docs: Path, body: str, info: dict) -> None:
    from _docs import write_block

    write_block(docs, "stream.py", SECTION, body)


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="8192 x 6144 slide, fewer viewports and repeats (< 2 min)")
    ap.add_argument("--seed", type=int, default=0, help="slide and viewport seed")
    ap.add_argument("--docs", type=Path, help="write the report into this markdown file, "
                    f"under '{SECTION}' (replacing the previously generated block)")
    ap.add_argument("--no-napari", action="store_true", help="skip (c)")
    ap.add_argument("--profile", action="store_true",
                    help="also print cProfile tables of our dask paths")
    ap.add_argument("--regenerate", action="store_true", help="rewrite the cached slide")
    ap.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                    help="first wait up to S seconds until other processes use < 0.15 cores")
    ap.add_argument("--napari-child", help=argparse.SUPPRESS)
    ap.add_argument("--napari-repeats", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--jump", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    cfg = dict(QUICK if args.quick else FULL)
    if args.napari_child:
        jump = tuple(int(v) for v in args.jump.split(","))
        napari_child(args.napari_child, args.napari_repeats or cfg["napari_repeats"], jump)
        return 0

    t_start = now()
    busy0 = cpu_busy()
    path, gen_s = get_slide(cfg["width"], cfg["height"], args.seed, args.regenerate)
    log(f"slide: {path}")
    warm_page_cache(path)
    if args.wait_quiet:
        wait_quiet(args.wait_quiet)
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    info = {"cpu": cpu_model(), "cores": len(os.sched_getaffinity(0)),
            "mem": f"{mem:.0f} GiB", "date": _dt.date.today().isoformat(),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "display": bool(os.environ.get("DISPLAY"))}
    vers = versions()
    log("(a) viewports ...")
    va = bench_viewports(path, cfg["viewports"], args.seed)
    log("(b) scan ...")
    sc = bench_scan(path, cfg["scan_tiles"], cfg["scan_repeats"])
    subpx = subpixel_check(path)
    if args.no_napari:
        nap = {"error": "skipped (--no-napari)"}
    else:
        log("(c) napari ...")
        nap = napari_in_child(path, cfg["napari_repeats"])
    info["total"] = now() - t_start
    busy1 = cpu_busy()
    other = (busy1[0] - busy0[0]) - (busy1[1] - busy0[1])
    info["other_load"] = max(0.0, other / info["total"])
    body = report(args, cfg, path, gen_s, info, va, sc, subpx, nap, vers)
    print(f"{SECTION}\n\n{body}")
    if args.profile:
        print(profile(path, sc["block"]))
    if args.docs:
        write_docs(args.docs, body, info)
        log(f"wrote {args.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

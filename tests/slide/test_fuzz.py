"""Fuzz smoke test of our own parsers (reference/style.md B.7, lesson 2).

A few hundred seeded inputs -- random byte strings behind real and fake magic numbers,
random edits of a pristine slide's first 4 KB (its header, first image directory and
tile tables) and of its other image directories, random edits of an OME-Zarr's JSON --
go through ``sniff``,
``napari_get_reader`` and ``open_slide``. The only thing asserted is the contract:
sniffing never raises, and opening either works (then the overview and a tile read
finish) or raises :class:`SlideError` with a one-line message naming the file.

The inputs run in a child process, so a native crash (OpenSlide, libtiff, libjpeg)
fails this test, with the input that caused it, instead of killing pytest. (Fuzzing
this way found two SIGFPE and one SIGABRT inputs in OpenSlide 4.0.1; the library now
refuses them before OpenSlide sees them, and test_corpus pins each one.)
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import tifffile

SEED = 20260422
N_RANDOM, N_MUTANTS, N_ZARR = 300, 160, 60
#: The worker's time limit: past it, it hangs (its last progress line is reported); it takes
#: ~10 s here. A hang guard, not a speed test.
WORKER_SECONDS = 120

WORKER = r'''
import copy, json, os, shutil, sys, warnings
from pathlib import Path

import numpy as np

warnings.simplefilter("ignore")
from napari_milview._reader import has_slide_extension, napari_get_reader
from napari_milview.slide import SlideError, open_slide, sniff

pristine, zarr_src, work = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
seed, n_random, n_mutants, n_zarr = (int(a) for a in sys.argv[4:8])
regions = json.loads(sys.argv[8])  # [start, stop) byte ranges worth editing
rng = np.random.default_rng(seed)
stats = {"random": 0, "mutant": 0, "zarr": 0, "claimed": 0, "opened": 0, "refused": 0}
problems = []


def attempt(kind, i, path):
    print(f"FUZZ {kind} {i}", file=sys.stderr, flush=True)  # the last one names a crasher
    stats[kind] += 1
    where = f"{kind} #{i}"
    try:
        claimed = napari_get_reader(str(path)) is not None
        # a slide by content, or an existing path with a slide extension (one clear error)
        if claimed != (sniff(path) is not None or (path.exists() and has_slide_extension(path))):
            problems.append(f"{where}: get_reader and sniff disagree")
    except BaseException as e:  # noqa: BLE001
        problems.append(f"{where}: sniffing raised {type(e).__name__}: {e}")
        return
    stats["claimed"] += claimed
    try:
        slide = open_slide(path, remember_mpp=False)
    except SlideError as e:
        stats["refused"] += 1
        if str(path) not in str(e) or "\n" in str(e):
            problems.append(f"{where}: unclear error {str(e)!r}")
        if sniff(path) is not None and "not a whole-slide image" in str(e):
            problems.append(f"{where}: claimed by the reader, then called not a slide")
        return
    except BaseException as e:  # noqa: BLE001
        problems.append(f"{where}: open_slide raised {type(e).__name__}: {e}")
        return
    try:
        levels = slide.to_dask()
        levels[-1].compute()  # the overview napari draws first
        slide.tile(0, 0, 0)
        slide.read(0, 17, 23, 300, 200)  # unaligned: through OpenSlide's read_region
        stats["opened"] += 1
    except BaseException as e:  # noqa: BLE001
        problems.append(f"{where}: reading raised {type(e).__name__}: {e}")
    finally:
        slide.close()


# 1. random byte strings behind magic numbers, under slide and non-slide suffixes
magics = [b"", b"II*\x00", b"MM\x00*", b"II+\x00\x08\x00\x00\x00", b"MM\x00+\x00\x08\x00\x00",
          b"II*\x00\x08\x00\x00\x00", b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"<?xml",
          b"[General]\n", b'{"multiscales": ']
suffixes = [".svs", ".tif", ".tiff", ".ndpi", ".scn", ".bif", ".vms", ".mrxs", ".png", ""]
for i in range(n_random):
    body = rng.bytes(int(rng.integers(0, 2048)))
    path = work / f"r{i}{suffixes[i % len(suffixes)]}"
    path.write_bytes(magics[int(rng.integers(len(magics)))] + body)
    attempt("random", i, path)
    path.unlink()

# 2. random edits of the pristine slide's first 4 KB, then of its image directories
data = pristine.read_bytes()
for i in range(n_mutants):
    b = bytearray(data)
    for _ in range(int(rng.integers(1, 9))):
        lo, hi = regions[0] if i < n_mutants // 2 else regions[int(rng.integers(len(regions)))]
        pos = int(rng.integers(lo, hi))
        op = int(rng.integers(4))
        if op == 0:
            b[pos] = int(rng.integers(256))
        elif op == 1:
            b[pos] ^= 1 << int(rng.integers(8))
        elif op == 2:
            b[pos:pos + 4] = b"\xff\xff\xff\xff" if rng.random() < 0.5 else bytes(4)
        else:
            src = int(rng.integers(0, 4096))
            b[pos:pos + 4] = data[src:src + 4]
    path = work / f"m{i}.svs"
    path.write_bytes(bytes(b))
    attempt("mutant", i, path)
    path.unlink()

# 3. random edits of the OME-Zarr JSON (root attributes, level-0 array metadata)
zarr = work / "z.ome.zarr"
shutil.copytree(zarr_src, zarr)
pool = [None, 0, -1, 1, 3, 2**40, 1e308, 0.0, "", "x", "../..", [], {}, [[]], [0, 0, 0],
        [1, 1, 1], [3, 2**31, 2**31], True, "micrometer", "nope"]
originals = {rel: json.loads((zarr / rel).read_text()) for rel in (".zattrs", "0/.zarray")}


def nodes(doc, path=()):
    yield path
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from nodes(v, path + (k,))
    elif isinstance(doc, list):
        for k, v in enumerate(doc):
            yield from nodes(v, path + (k,))


for i in range(n_zarr):
    rel = ".zattrs" if i % 3 else "0/.zarray"
    doc = copy.deepcopy(originals[rel])
    for _ in range(int(rng.integers(1, 4))):
        paths = [p for p in nodes(doc) if p]
        if not paths:
            break
        p = paths[int(rng.integers(len(paths)))]
        parent = doc
        for k in p[:-1]:
            parent = parent[k]
        if isinstance(parent, dict) and rng.random() < 0.3:
            del parent[p[-1]]
        else:
            parent[p[-1]] = copy.deepcopy(pool[int(rng.integers(len(pool)))])
    (zarr / rel).write_text(json.dumps(doc))
    attempt("zarr", i, zarr)
    (zarr / rel).write_text(json.dumps(originals[rel]))

print(json.dumps({"stats": stats, "problems": problems}))
'''


def _regions(path) -> list[tuple[int, int]]:
    """The first 4 KB, then each page's directory and out-of-line tag values (64 B)."""
    out = [(0, 4096)]
    with tifffile.TiffFile(path) as tf:
        for page in tf.pages:
            end = page.offset + 2 + 12 * len(page.tags) + 4
            out.append((page.offset, end))
            out += [(t.valueoffset, t.valueoffset + 64) for t in page.tags.values()
                    if t.valueoffset >= end]
    return out


@pytest.mark.timeout(180)
def test_fuzz_smoke(svs, tmp_path):
    """Sniffing never raises; opening works or raises one clear SlideError; no crash, no hang."""
    args = [sys.executable, "-c", WORKER, str(svs.path), str(svs.zarr_path), str(tmp_path),
            str(SEED), str(N_RANDOM), str(N_MUTANTS), str(N_ZARR),
            json.dumps(_regions(svs.path))]
    try:  # a hang is a failure that names where the worker was
        proc = subprocess.run(args, capture_output=True, text=True, timeout=WORKER_SECONDS)
    except subprocess.TimeoutExpired as e:
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else e.stderr
        progress = [ln for ln in (err or "").splitlines() if ln.startswith("FUZZ ")]
        pytest.fail(f"fuzz worker hung at {progress[-1:]} (seed {SEED})")
    progress = [ln for ln in proc.stderr.splitlines() if ln.startswith("FUZZ ")]
    assert proc.returncode == 0, (
        f"fuzz worker died with code {proc.returncode} at {progress[-1:]} (seed {SEED}):\n"
        f"{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["problems"] == []
    stats = result["stats"]
    assert (stats["random"], stats["mutant"], stats["zarr"]) == (N_RANDOM, N_MUTANTS, N_ZARR)
    # the inputs reached both outcomes and the backends, not just the sniffer
    assert stats["opened"] >= 10 and stats["refused"] >= 100 and stats["claimed"] >= 50, stats

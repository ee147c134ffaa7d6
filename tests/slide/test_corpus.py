"""The bad-input corpus, the OpenSlide way (reference/style.md B.1, B.6, B.7).

One pristine synthetic pyramid (Aperio-style SVS plus its OME-Zarr copy) is written per
session. Every case derives a variant from it -- by editing bytes at positions tifffile
reports (tile offsets and byte counts, tag values), by rewriting its pages in another
order, or by editing the OME-Zarr JSON -- and pins the outcome:

* what napari's ``napari_get_reader`` answers (the reader, or None), never raising;
* either a working layer, whose note (shown as a warning naming the file) matches the
  case's regex, and whose lowest level reads completely through dask;
* or one single-line :class:`SlideError` naming the file, whose problem matches the regex.

A case that opens, then hangs or crashes while drawing cannot pass: every layer case
computes a full level through dask under a per-case timeout.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import tifffile

from napari_milview._reader import (
    has_slide_extension,
    napari_get_reader,
    read_slide,
)
from napari_milview.slide import BadTileWarning, SlideError, open_slide, placeholder_tile

try:
    import resource
except ImportError:  # Windows: no peak-memory probe
    resource = None

#: The pristine slide: 3 levels (2048 x 1536, 512 x 384, 128 x 96) of 128-px JPEG tiles.
PRISTINE = dict(width=2048, height=1536, mpp=0.25, tile=128, levels=3, seed=7, lesion=False,
                ome_zarr=True)
TILE = PRISTINE["tile"]
#: The level-0 tile every tile case damages (row, col): inside the slide, not on an edge.
BAD = (3, 5)


# --------------------------------------------------------------------------- the pristine


@dataclass(frozen=True)
class Page:
    """What tifffile says about one page of the pristine file."""

    offset: int  # of its image directory
    shape: tuple[int, int]  # (height, width)
    tiled: bool
    description: str
    dataoffsets: tuple[int, ...]
    databytecounts: tuple[int, ...]
    tags: dict[str, tuple[int, int]]  # name -> (value offset, TIFF data type)

    def tile_index(self, row: int, col: int) -> int:
        return row * -(-self.shape[1] // TILE) + col


@dataclass(frozen=True)
class Pristine:
    svs: Path
    zarr: Path
    png: Path  # the lesion-mask sidecar: a real PNG
    json: Path  # the JSON sidecar: a real text file
    data: bytes
    pages: tuple[Page, ...]


@pytest.fixture(scope="session")
def pristine(tmp_path_factory) -> Pristine:
    from napari_milview.synthetic import write_synthetic_slide

    res = write_synthetic_slide(tmp_path_factory.mktemp("pristine") / "pristine.svs",
                                **PRISTINE)
    pages = []
    with tifffile.TiffFile(res.path) as tf:
        assert tf.byteorder == "<" and not tf.is_bigtiff  # the edits below assume it
        for p in tf.pages:
            pages.append(Page(
                offset=p.offset, shape=p.shape[:2], tiled=p.is_tiled,
                description=p.description,
                dataoffsets=tuple(int(o) for o in p.dataoffsets),
                databytecounts=tuple(int(n) for n in p.databytecounts),
                tags={t.name: (t.valueoffset, int(t.dtype)) for t in p.tags.values()},
            ))
    # page 0 level 0, 1 thumbnail (stripped), 2 level 1, 3 level 2, 4 label, 5 macro
    assert [pg.tiled for pg in pages] == [True, False, True, True, False, False]
    return Pristine(res.path, res.zarr_path, res.mask_path, res.json_path,
                    res.path.read_bytes(), tuple(pages))


@pytest.fixture(scope="session")
def reference(pristine):
    """The pristine slide, opened: the pixels every variant's good tiles must equal."""
    with open_slide(pristine.svs) as s:
        yield s


@pytest.fixture(scope="session")
def reference_zarr(pristine):
    """The pristine OME-Zarr copy, opened."""
    with open_slide(pristine.zarr) as s:
        yield s


# ------------------------------------------------------------------------------ mutations

_PACK = {3: "<H", 4: "<I", 16: "<Q"}


def _put(data: bytes, offset: int, new: bytes) -> bytes:
    out = bytearray(data)
    out[offset:offset + len(new)] = new
    return bytes(out)


def _set_tag(data: bytes, page: Page, tag: str, value: int) -> bytes:
    """Overwrite the (single, inline) value of ``tag`` in ``page``'s directory."""
    offset, dtype = page.tags[tag]
    return _put(data, offset, struct.pack(_PACK[dtype], value))


def _set_tile_entry(data: bytes, page: Page, tag: str, index: int, value: int) -> bytes:
    """Overwrite entry ``index`` of the TileOffsets / TileByteCounts array."""
    offset, dtype = page.tags[tag]
    fmt = _PACK[dtype]
    return _put(data, offset + index * struct.calcsize(fmt), struct.pack(fmt, value))


def _tile(src: Pristine, page: int = 0, rc: tuple[int, int] = BAD) -> tuple[int, int, int]:
    """(index, offset, byte count) of a tile of ``page``."""
    pg = src.pages[page]
    i = pg.tile_index(*rc)
    return i, pg.dataoffsets[i], pg.databytecounts[i]


def _replace_all(data: bytes, old: bytes, new: bytes) -> bytes:
    assert len(old) == len(new) and old in data  # same length: no offset moves
    return data.replace(old, new)


def _scan_ends_early(src: Pristine) -> bytes:
    """The damaged tile keeps its first half and a proper EOI; its byte count shrinks."""
    i, off, n = _tile(src)
    data = _put(src.data, off + n // 2, b"\xff\xd9")
    return _set_tile_entry(data, src.pages[0], "TileByteCounts", i, n // 2 + 2)


def _jpeg_frame_65535(src: Pristine) -> bytes:
    """The damaged tile's JPEG frame header (SOF0) claims 65535 x 65535 px."""
    _, off, n = _tile(src)
    sof = src.data.index(b"\xff\xc0", off, off + n)
    return _put(src.data, sof + 5, b"\xff\xff\xff\xff")


def _every_tile_zeroed(src: Pristine, page: int) -> bytes:
    """The first 16 bytes (SOI and header) of every tile of ``page`` zeroed."""
    data = src.data
    for off in src.pages[page].dataoffsets:
        data = _put(data, off, bytes(16))
    return data


def _one_bit_flipped(src: Pristine) -> bytes:
    """One bit of the Huffman data flipped where no 0xFF byte is made or unmade."""
    _, off, n = _tile(src)
    p = next(p for p in range(off + n // 2, off + n - 2)
             if 0xFF not in (src.data[p - 1], src.data[p], src.data[p] ^ 0x10))
    return _put(src.data, p, bytes([src.data[p] ^ 0x10]))


def _scan_start(data: bytes, off: int, n: int) -> int:
    """First byte of the entropy-coded data of the JPEG tile at ``off`` (after its SOS)."""
    sos = data.index(b"\xff\xda", off, off + n)
    return sos + 2 + int.from_bytes(data[sos + 2:sos + 4], "big")


def _bit_flipped(seed: int):
    """One random bit of the damaged tile's entropy-coded data flipped (seeded): most flips
    leave a stream libjpeg decodes without a word, about a third make it run out of data
    ("Corrupt JPEG data: premature end of data segment", only a warning to libjpeg)."""
    def edit(src: Pristine) -> bytes:
        _, off, n = _tile(src)
        rng = np.random.default_rng(seed)
        p = int(rng.integers(_scan_start(src.data, off, n), off + n - 2))
        return _put(src.data, p, bytes([src.data[p] ^ (1 << int(rng.integers(0, 8)))]))
    return edit


def openslide_tile(path, level: int, rc: tuple[int, int], tile: int):
    """What plain OpenSlide makes of tile ``rc`` of file level ``level``: (its error, None)
    or (None, the tile's RGB pixels)."""
    import openslide

    osr = openslide.OpenSlide(str(path))
    try:
        ds = osr.level_downsamples[level]
        img = osr.read_region((int(rc[1] * tile * ds), int(rc[0] * tile * ds)), level,
                              (tile, tile))
        return None, np.asarray(img)[:, :, :3]
    except openslide.OpenSlideError as e:
        return str(e), None
    finally:
        osr.close()


def _stripped_tiff(src: Pristine) -> bytes:
    """A plain RGB TIFF of 400 x 300 px in strips (no tiles, no NDPI tags)."""
    import io

    buf = io.BytesIO()
    img = np.random.default_rng(2).integers(0, 256, (300, 400, 3), np.uint8)
    tifffile.imwrite(buf, img, photometric="rgb")
    return buf.getvalue()


def _symlink_loop(src: Pristine, out: Path) -> Path:
    (out / "b.svs").symlink_to(out / "variant.svs")
    (out / "variant.svs").symlink_to(out / "b.svs")
    return out / "variant.svs"


def _folder(name: str):
    def mutate(src: Pristine, out: Path) -> Path:
        (out / name).mkdir()
        (out / name / "notes.txt").write_text("not a slide")
        return out / name
    return mutate


#: A MIRAX Slidedat.ini that lists an index and one data file.
MRXS_INI = (b"[GENERAL]\nSLIDE_ID = 0123\nIMAGENUMBER_X = 4\nIMAGENUMBER_Y = 4\n"
            b"[HIERARCHICAL]\nHIER_COUNT = 1\nHIER_0_NAME = Slide zoom level\nHIER_0_COUNT = 1\n"
            b"HIER_0_VAL_0 = ZoomLevel_0\nHIER_0_VAL_0_SECTION = LAYER_0_LEVEL_0_SECTION\n"
            b"NONHIER_COUNT = 0\nINDEXFILE = Index.dat\n"
            b"[DATAFILE]\nFILE_COUNT = 1\nFILE_0 = Data0000.dat\n")


def _mrxs(folder: dict[str, bytes] | None):
    """A MIRAX index ``variant.mrxs`` and, unless None, its folder with these files."""
    def mutate(src: Pristine, out: Path) -> Path:
        (out / "variant.mrxs").write_bytes(b"[GENERAL]\nSLIDE_VERSION = 01.03\n")
        if folder is not None:
            (out / "variant").mkdir()
            for name, data in folder.items():
                (out / "variant" / name).write_bytes(data)
        return out / "variant.mrxs"
    return mutate


def svs(edit: Callable[[Pristine], bytes], name: str = "variant.svs"):
    """A mutation writing ``edit(pristine)`` as ``name``."""
    def mutate(src: Pristine, out: Path) -> Path:
        path = out / name
        path.write_bytes(edit(src))
        return path
    return mutate


def pages_rewritten(order: list[int]):
    """A mutation rewriting the pristine's pages 0..3 in ``order`` (levels repeated or
    swapped), tifffile writing the file directly."""
    def mutate(src: Pristine, out: Path) -> Path:
        path = out / "variant.svs"
        with tifffile.TiffFile(src.svs) as tf, tifffile.TiffWriter(path) as tw:
            for i in order:
                p = tf.pages[i]
                kw = dict(tile=(TILE, TILE)) if p.is_tiled else dict(rowsperstrip=16)
                tw.write(p.asarray(), photometric="rgb", compression="jpeg",
                         description=p.description, metadata=None, **kw)
        return path
    return mutate


def zarr(edit: Callable[[Path], None]):
    """A mutation copying the pristine OME-Zarr and applying ``edit(folder)``."""
    def mutate(src: Pristine, out: Path) -> Path:
        path = out / "variant.ome.zarr"
        shutil.copytree(src.zarr, path)
        edit(path)
        return path
    return mutate


def _json_edit(rel: str, fn: Callable[[dict], object]):
    def edit(folder: Path) -> None:
        f = folder / rel
        doc = json.loads(f.read_text())
        res = fn(doc)
        f.write_text(json.dumps(doc if res is None else res))
    return edit


def _ms(doc: dict) -> dict:
    return doc["multiscales"][0]


def _drop_units(doc: dict) -> None:
    for axis in _ms(doc)["axes"]:
        axis.pop("unit", None)


# --------------------------------------------------------------------------------- checks


def _pixel_units(slide, data, kwargs, ref, src):
    md = kwargs["metadata"]
    assert md["mpp"] is None and md["mpp_source"] == "none" and md["units"] == "pixel"
    assert kwargs["scale"] == (1.0, 1.0) and "units" not in kwargs


def _bad_tile(rc=BAD, *, reopened: bool, level: int = 0):
    """The tile at ``rc`` is the placeholder, counted once, reported by exactly one
    BadTileWarning; every other tile of the level equals the pristine; with
    ``reopened``, the OpenSlide handle was replaced and still reads correctly."""
    def check(slide, data, kwargs, ref, src):
        lv = slide.info.levels[level]
        th, tw = lv.tile
        h, w = min(th, lv.shape[0] - rc[0] * th), min(tw, lv.shape[1] - rc[1] * tw)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            first = slide.tile(level, *rc)
            again = slide.tile(level, *rc)
            whole = data[level].compute()  # the whole level, through dask's threads
        np.testing.assert_array_equal(first, placeholder_tile(h, w))
        np.testing.assert_array_equal(again, first)
        assert slide.bad_tiles == 1
        bad = [x for x in caught if issubclass(x.category, BadTileWarning)]
        assert len(bad) == 1, [str(x.message) for x in bad]
        assert slide.path in str(bad[0].message)
        assert f"level {level} tile ({rc[0]}, {rc[1]})" in str(bad[0].message)
        expect = np.array(ref.to_dask()[level].compute())
        y, x = rc[0] * th, rc[1] * tw
        expect[y:y + h, x:x + w] = placeholder_tile(h, w)
        np.testing.assert_array_equal(whole, expect)
        if reopened:
            assert slide.backend.reopened >= 1
            # an unaligned region goes through OpenSlide itself: the new handle works
            np.testing.assert_array_equal(slide.backend.read(level, 37, 53, 150, 170),
                                          ref.backend.read(level, 37, 53, 150, 170))
    return check


def _every_tile_bad(level: int = 0):
    """Every tile of ``level`` is a placeholder, counted; one warning in all."""
    def check(slide, data, kwargs, ref, src):
        before = slide.bad_tiles
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            whole = data[level].compute()
        rows, cols = slide.info.levels[level].grid
        assert slide.bad_tiles - before == rows * cols
        assert sum(issubclass(x.category, BadTileWarning) for x in caught) == (before == 0)
        th, tw = slide.info.levels[level].tile
        np.testing.assert_array_equal(whole[:th, :tw], placeholder_tile(th, tw))
    return check


def _tile_decodes_silently(slide, data, kwargs, ref, src):
    """Damage that leaves a well-formed stream: the tile decodes to other pixels and
    nothing is counted (no decoder can tell). Pinned so that a change shows."""
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        got = slide.tile(0, *BAD)
    assert slide.bad_tiles == 0
    assert not np.array_equal(got, ref.tile(0, *BAD))


def _as_openslide(bad: bool):
    """The damaged tile is what plain OpenSlide makes of it: with ``bad``, OpenSlide
    reports an error (a libjpeg warning) and the tile is a counted placeholder; without,
    OpenSlide reads it (the flip left a stream libjpeg decodes without a word) and so do we,
    to the same pixels, nothing counted."""
    def check(slide, data, kwargs, ref, src):
        said, pixels = openslide_tile(slide.path, 0, BAD, TILE)
        assert (said is not None) == bad, said
        if bad:
            assert said.startswith("Corrupt JPEG data"), said
            _bad_tile(reopened=True)(slide, data, kwargs, ref, src)
        else:
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                got = slide.tile(0, *BAD)
            assert slide.bad_tiles == 0
            np.testing.assert_array_equal(got, pixels)
    return check


def _bad_tiles_exactly(tiles: Callable[[tuple[int, int]], bool], level: int = 0):
    """Reading the whole of ``level``: the tiles (row, col) for which ``tiles`` holds are
    counted placeholders, reported by one warning; every other tile equals the pristine
    (cropped to the pristine's extent where the variant's level is larger)."""
    def check(slide, data, kwargs, ref, src):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            whole = data[level].compute()
        lv = slide.info.levels[level]
        th, tw = lv.tile
        rows, cols = lv.grid
        bad = {(r, c) for r in range(rows) for c in range(cols) if tiles((r, c))}
        assert bad and slide.bad_tiles == len(bad)
        assert sum(issubclass(x.category, BadTileWarning) for x in caught) == 1
        expect = np.array(ref.to_dask()[level].compute())
        for r, c in sorted(bad):
            h, w = min(th, lv.shape[0] - r * th), min(tw, lv.shape[1] - c * tw)
            np.testing.assert_array_equal(whole[r * th:r * th + h, c * tw:c * tw + w],
                                          placeholder_tile(h, w))
        for r in range(rows):
            for c in range(cols):
                if (r, c) not in bad:
                    np.testing.assert_array_equal(
                        whole[r * th:(r + 1) * th, c * tw:(c + 1) * tw],
                        expect[r * th:(r + 1) * th, c * tw:(c + 1) * tw])
    return check


def _unlink_chunks(level: str, pattern: str):
    """Delete the chunk files of OME-Zarr ``level`` matching ``pattern`` (c/y/x)."""
    def edit(folder: Path) -> None:
        found = list((folder / level).glob(pattern))
        assert found
        for f in found:
            f.unlink()
    return edit


def _associated_too_large(name: str):
    def check(slide, data, kwargs, ref, src):
        with pytest.raises(SlideError, match=rf"associated image '{name}' is 4000000000 x "
                                             r"\d+ px, too large"):
            slide.associated_image(name)
    return check


def _associated_cut(slide, data, kwargs, ref, src):
    """The macro image lies past the end: one clear error, and tiles still read."""
    with pytest.raises(SlideError, match=r"associated image 'macro' cannot be read"):
        slide.associated_image("macro")
    assert slide.associated_image("label").shape == (400, 400, 3)  # handle was reopened
    np.testing.assert_array_equal(slide.backend.read(0, 37, 53, 150, 170),
                                  ref.backend.read(0, 37, 53, 150, 170))


def _generic_tiff(slide, data, kwargs, ref, src):
    assert slide.info.vendor == "generic-tiff"
    assert kwargs["metadata"]["mpp_source"] == "tiff-resolution"
    assert kwargs["metadata"]["mpp"] == pytest.approx((0.25, 0.25))


def _levels(*shapes):
    def check(slide, data, kwargs, ref, src):
        assert [tuple(a.shape[:2]) for a in data] == list(shapes)
    return check


# ---------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One corrupt variant and its pinned outcome.

    Attributes
    ----------
    id : readable test id.
    mutate : (pristine, out_dir) -> path of the variant written in ``out_dir``.
    expect : 'error' (one SlideError) or 'layer' (a working layer).
    message : regex searched in the SlideError's problem ('error'), or in one of the
        layer's notes ('layer'; '' when the layer must have no note).
    reader : whether ``napari_get_reader`` claims the path as a slide (else the outcome
        pinned is ``open_slide``'s, what the CLI meets; napari's reader still answers for an
        existing path with a slide extension, and raises one error naming the file).
    check : extra assertions on a layer: (slide, level arrays, layer kwargs, reference
        slide (the pristine SVS, or its OME-Zarr copy for a zarr case), pristine).
    cheap : the outcome must come fast (a timeout of :data:`CHEAP_SECONDS`) and without
        a big allocation (absurd sizes).
    """

    id: str
    mutate: Callable[[Pristine, Path], Path]
    expect: str
    message: str
    reader: bool = True
    check: Callable | None = None
    cheap: bool = False
    marks: tuple = field(default=())


NOT_A_SLIDE = r"^not a whole-slide image \(neither a TIFF/OpenSlide format nor an OME-Zarr"
PIXEL_UNITS = r"^microns per pixel unknown: the layer is in pixel units$"
ZARR_PIXEL_UNITS = r"^microns per pixel unknown \(no scale with a length unit\)"

CASES = [
    # --- truncated files
    Case("truncated-50pct", svs(lambda s: s.data[:len(s.data) // 2]), "error",
         r"^OpenSlide cannot open it: the file is truncated: it is \d+ bytes but page 0's "
         r"data extend to byte \d+$"),
    Case("truncated-inside-level-1", svs(lambda s: s.data[:s.pages[2].dataoffsets[6]]),
         "error", r"^OpenSlide cannot open it: the file is truncated: it is \d+ bytes but "
         r"page 2's data extend to byte \d+$"),
    Case("truncated-90pct", svs(lambda s: s.data[:len(s.data) * 9 // 10]), "layer",
         r"^the file is truncated: it is \d+ bytes but page 5's data extend to byte \d+; "
         r"tiles and associated images past its end cannot be read$", check=_associated_cut),
    Case("truncated-10-bytes", svs(lambda s: s.data[:10]), "error",
         r"^OpenSlide cannot open it: the file is truncated: it is 10 bytes, too short for "
         r"its first image directory at byte 8$"),
    Case("empty-file", svs(lambda s: b""), "error", r"^the file is empty$", reader=False),
    # --- not slides at all, whatever the suffix says
    Case("png-renamed-svs", svs(lambda s: s.png.read_bytes()), "error", NOT_A_SLIDE,
         reader=False),
    Case("text-renamed-svs", svs(lambda s: s.json.read_bytes()), "error", NOT_A_SLIDE,
         reader=False),
    Case("random-bytes-svs", svs(lambda s: b"\x00" + np.random.default_rng(1).bytes(65535)),
         "error", NOT_A_SLIDE, reader=False),
    Case("jpeg-named-tif",  # one level-0 tile is a complete JPEG file
         svs(lambda s: s.data[_tile(s)[1]:_tile(s)[1] + _tile(s)[2]], "variant.tif"),
         "error", NOT_A_SLIDE, reader=False),
    Case("missing-file", lambda s, out: out / "nowhere.svs", "error",
         r"^no such file or folder$", reader=False),
    Case("symlink-loop", _symlink_loop, "error", r"^a symbolic link to nothing \(its target is "
         r"missing, or the links loop\)$", reader=False),
    Case("folder-named-svs", _folder("variant.svs"), "error",
         r"^a folder named \.svs, not a slide file \(nor an OME-Zarr folder\)$", reader=False),
    Case("stripped-tiff-named-ndpi", svs(_stripped_tiff, "variant.ndpi"), "error",
         r"^OpenSlide cannot open it: a TIFF without tiles and without Hamamatsu NDPI tags "
         r"\(1 image\(s\) in strips, the first 400 x 300 px\): not a whole-slide pyramid$"),
    Case("stripped-tiff-named-svs", svs(_stripped_tiff), "error",
         r"^OpenSlide cannot open it: a TIFF without tiles \(1 image\(s\) in strips, the first "
         r"400 x 300 px\): not a whole-slide pyramid$"),
    # --- MIRAX: the .mrxs is an index, the data live in the folder of the same name
    Case("mrxs-without-folder", _mrxs(None), "error", r"^a MIRAX \.mrxs file is only an "
         r"index: its data folder 'variant' is missing \(copy it next to the \.mrxs\)$",
         reader=False),
    Case("mrxs-empty-folder", _mrxs({}), "error",
         r"^its MIRAX data folder 'variant' is empty$", reader=False),
    Case("mrxs-garbage-folder", _mrxs({"Slidedat.ini": np.random.default_rng(5).bytes(4000),
                                       "Data0000.dat": np.random.default_rng(6).bytes(4000)}),
         "error", r"^its variant/Slidedat\.ini is not a MIRAX index \(not an INI file: no "
         r"\[section\] header at its start\)$", reader=False),
    Case("mrxs-folder-without-data", _mrxs({"Slidedat.ini": MRXS_INI}), "error",
         r"^its MIRAX data folder 'variant' lacks the files Slidedat\.ini lists: Index\.dat, "
         r"Data0000\.dat$", reader=False),
    Case("mrxs-folder-without-slidedat", _mrxs({"Index.dat": b"x", "Data0000.dat": b"x"}),
         "error", r"^its MIRAX data folder 'variant' has no Slidedat\.ini$", reader=False),
    Case("plain-folder", lambda s, out: out, "error", NOT_A_SLIDE, reader=False),
    # --- microns per pixel missing or absurd: pixel units, said so
    Case("aperio-property-name-not-utf8",  # openslide-python: KeyError in dict(properties)
         svs(lambda s: _replace_all(s.data, b"|MPP = 0.25", b"|\xc3PP = 0.25")), "layer",
         r"^1 of the file's property names are not valid UTF-8 \(a damaged header\) and were "
         r"skipped$", check=_pixel_units),
    Case("mpp-removed", svs(lambda s: _replace_all(s.data, b"|MPP = 0.25", b"|XPP = 0.25")),
         "layer", PIXEL_UNITS, check=_pixel_units),
    Case("mpp-zero", svs(lambda s: _replace_all(s.data, b"|MPP = 0.25", b"|MPP = 0   ")),
         "layer", PIXEL_UNITS, check=_pixel_units),
    Case("mpp-nan", svs(lambda s: _replace_all(s.data, b"|MPP = 0.25", b"|MPP = nan ")),
         "layer", PIXEL_UNITS, check=_pixel_units),
    Case("mpp-garbage", svs(lambda s: _replace_all(s.data, b"|MPP = 0.25", b"|MPP = 0,x?")),
         "layer", PIXEL_UNITS, check=_pixel_units),
    Case("mpp-negative", svs(lambda s: _replace_all(s.data, b"|MPP = 0.25", b"|MPP = -1.0")),
         "layer", PIXEL_UNITS, check=_pixel_units),
    Case("aperio-header-garbled",  # no longer Aperio: OpenSlide's generic TIFF reads level 0,
         # the file's other levels are not flagged reduced-resolution so they are not
         # levels there; we derive the overview, and mpp comes from the TIFF resolution
         svs(lambda s: _replace_all(s.data, b"Aperio Image Library", b"Xperio Image Library")),
         "layer", r"^the file's smallest level is 2048 x 1536 px; 1 lower levels are built",
         check=_generic_tiff),
    # --- one damaged level-0 tile: placeholder, counted, reported once, handle reopened
    Case("jpeg-tile-bad-magic",  # the tile's first 16 bytes (SOI, header) zeroed
         svs(lambda s: _put(s.data, _tile(s)[1], bytes(16))), "layer", "",
         check=_bad_tile(reopened=True)),
    Case("jpeg-tile-premature-eoi",  # EOI markers written over the middle of the scan
         svs(lambda s: _put(s.data, _tile(s)[1] + _tile(s)[2] // 2, b"\xff\xd9" * 8)),
         "layer", "", check=_bad_tile(reopened=True)),
    Case("jpeg-tile-scan-ends-early",  # half the scan, then a proper EOI: libjpeg warns
         # (libjpeg decodes the rest as mid-grey blocks; the strict decoder of the direct path
         # raises on the warning, and OpenSlide, which turns it into an error, reports it)
         svs(_scan_ends_early), "layer", "", check=_bad_tile(reopened=True)),
    Case("jpeg-tile-cut",  # byte count halved: the stream stops mid-scan
         svs(lambda s: _set_tile_entry(s.data, s.pages[0], "TileByteCounts", _tile(s)[0],
                                       _tile(s)[2] // 2)),
         "layer", "", check=_bad_tile(reopened=True)),
    Case("jpeg-tile-frame-65535px",  # the decoder would allocate 12 GB before failing
         svs(_jpeg_frame_65535), "layer", "", check=_bad_tile(reopened=True), cheap=True),
    Case("jpeg-tile-one-bit-flipped", svs(_one_bit_flipped), "layer", "",
         check=_tile_decodes_silently),
    # a random bit flipped in the tile's scan, several seeds: counted exactly where plain
    # OpenSlide reports the tile (libjpeg's "premature end of data segment" warning)
    *[Case(f"jpeg-tile-bit-flip-seed-{seed}", svs(_bit_flipped(seed)), "layer", "",
           check=_as_openslide(bad)) for seed, bad in
      ((0, False), (1, False), (5, True), (7, True), (9, True), (11, True))],
    Case("tile-zero-bytecount",
         svs(lambda s: _set_tile_entry(s.data, s.pages[0], "TileByteCounts", _tile(s)[0], 0)),
         "layer", "", check=_bad_tile(reopened=False)),
    Case("tile-zero-offset",
         svs(lambda s: _set_tile_entry(s.data, s.pages[0], "TileOffsets", _tile(s)[0], 0)),
         "layer", "", check=_bad_tile(reopened=True)),
    Case("tile-offset-past-eof",  # OpenSlide is not asked: it would allocate first
         svs(lambda s: _set_tile_entry(s.data, s.pages[0], "TileOffsets", _tile(s)[0],
                                       10**9)),
         "layer", "", check=_bad_tile(reopened=False)),
    Case("tile-bytecount-4gb",
         svs(lambda s: _set_tile_entry(s.data, s.pages[0], "TileByteCounts", _tile(s)[0],
                                       4_000_000_000)),
         "layer", "", check=_bad_tile(reopened=False), cheap=True),
    Case("every-level-0-tile-corrupt",  # 192 bad tiles, one warning
         svs(lambda s: _every_tile_zeroed(s, 0)), "layer", "", check=_every_tile_bad()),
    # a page whose size or tile table does not fit: refused before OpenSlide sees it
    # (libtiff pads the table with empty tiles; OpenSlide then crawls for seconds rendering
    # "missing" tiles, aborts on a huge allocation, or dies of SIGFPE: see below)
    Case("tile-width-mismatch",  # TileWidth says 256, the JPEG tiles are 128 wide
         svs(lambda s: _set_tag(s.data, s.pages[0], "TileWidth", 2 * TILE)), "error",
         r"^page 0 claims 2048 x 1536 px \(96 tiles\) but lists 192 tiles: its header is "
         r"corrupt$"),
    Case("tile-size-16px",
         svs(lambda s: _set_tag(_set_tag(s.data, s.pages[0], "TileWidth", 16), s.pages[0],
                                "TileLength", 16)), "error",
         r"^page 0 claims 2048 x 1536 px \(12288 tiles\) but lists 192 tiles"),
    Case("height-4m-level-0",  # what a fuzzed byte did: OpenSlide opens it, reads crawl
         svs(lambda s: _set_tag(s.data, s.pages[0], "ImageLength", 4_195_840)), "error",
         r"^page 0 claims 2048 x 4195840 px \(524480 tiles\) but lists 192 tiles", cheap=True),
    Case("width-1000-level-1",
         svs(lambda s: _set_tag(s.data, s.pages[2], "ImageWidth", 1000)), "error",
         r"^page 2 claims 1000 x 384 px \(24 tiles\) but lists 12 tiles: its header is "
         r"corrupt$"),
    # OpenSlide 4.0.1 dies of SIGFPE on this pair (found by fuzzing): refused before it
    Case("height-16m-level-1-and-zero-length-tile",
         svs(lambda s: _set_tile_entry(_set_tag(s.data, s.pages[2], "ImageLength", 16_777_600),
                                       s.pages[0], "TileByteCounts", 16, 0)), "error",
         r"^page 2 claims 512 x 16777600 px \(524300 tiles\) but lists 12 tiles: its header "
         r"is corrupt$"),
    # OpenSlide aborts the process (g_malloc of 51 GB) when it reads such a level
    Case("tile-width-100m-level-0",
         svs(lambda s: _set_tag(s.data, s.pages[0], "TileWidth", 100_663_424)), "error",
         r"^page 0 claims 2048 x 1536 px \(12 tiles\) but lists 192 tiles: its header is "
         r"corrupt$", cheap=True),
    # OpenSlide 4.0.1 dies of SIGFPE opening this (found by test_fuzz): refused before it
    Case("tile-width-4096-and-zero-length-tile",
         svs(lambda s: _set_tile_entry(_set_tag(s.data, s.pages[0], "TileWidth", 4096),
                                       s.pages[0], "TileByteCounts", 2, 0)), "error",
         r"^page 0 claims 2048 x 1536 px \(12 tiles\) but lists 192 tiles: its header is "
         r"corrupt$"),
    # associated images declaring absurd sizes: refused when asked for, nothing allocated
    *[Case(f"absurd-width-{name}", svs(lambda s, page=page: _set_tag(
        s.data, s.pages[page], "ImageWidth", 4_000_000_000)), "layer", "",
        check=_associated_too_large(name), cheap=True)
      for name, page in (("thumbnail", 1), ("label", 4), ("macro", 5))],
    Case("tile-width-100m-level-1",
         svs(lambda s: _set_tag(s.data, s.pages[2], "TileWidth", 100_663_424)), "error",
         r"^page 2 claims 512 x 384 px \(3 tiles\) but lists 12 tiles: its header is "
         r"corrupt$", cheap=True),
    # --- broken level structure
    Case("zero-width-level-1",  # OpenSlide stops at the broken directory: level 2 is lost too
         svs(lambda s: _set_tag(s.data, s.pages[2], "ImageWidth", 0)), "layer",
         r"^only 1 of the file's 3 tiled levels could be opened \(page 2 has zero size "
         r"\(0 x 384 px\)\); the other levels were skipped$",
         check=_levels((1536, 2048), (768, 1024))),
    Case("zero-height-smallest-level",
         svs(lambda s: _set_tag(s.data, s.pages[3], "ImageLength", 0)), "layer",
         r"^only 2 of the file's 3 tiled levels could be opened \(page 3 has zero size "
         r"\(128 x 0 px\)\)", check=_levels((1536, 2048), (384, 512))),
    Case("zero-width-thumbnail",
         svs(lambda s: _set_tag(s.data, s.pages[1], "ImageWidth", 0)), "layer",
         r"^only 1 of the file's 3 tiled levels could be opened \(page 1 has zero size",
         check=_levels((1536, 2048), (768, 1024))),
    Case("zero-width-level-0", svs(lambda s: _set_tag(s.data, s.pages[0], "ImageWidth", 0)),
         "error", r"^OpenSlide cannot open it \(Invalid TIFF\): page 0 has zero size "
         r"\(0 x 1536 px\)$"),
    Case("absurd-width-4e9",
         svs(lambda s: _set_tag(s.data, s.pages[0], "ImageWidth", 4_000_000_000)), "error",
         r"^page 0 claims 4000000000 x 1536 px \(375000000 tiles\) but lists 192 tiles: its "
         r"header is corrupt$", cheap=True),
    Case("absurd-2p31-square",
         svs(lambda s: _set_tag(_set_tag(s.data, s.pages[0], "ImageWidth", 2**31),
                                s.pages[0], "ImageLength", 2**31)), "error",
         r"^page 0 claims 2147483648 x 2147483648 px \(281474976710656 tiles\) but lists 192",
         cheap=True),
    Case("absurd-width-level-1",
         svs(lambda s: _set_tag(s.data, s.pages[2], "ImageWidth", 4_000_000_000)), "error",
         r"^page 2 claims 4000000000 x 384 px \(93750000 tiles\) but lists 12 tiles: its "
         r"header is corrupt$", cheap=True),
    Case("duplicate-level", pages_rewritten([0, 1, 2, 2, 3]), "layer",
         r"^level 2 \(512 x 384 px\) does not shrink and was skipped$",
         check=_levels((1536, 2048), (384, 512), (96, 128))),
    Case("levels-out-of-order", pages_rewritten([0, 1, 3, 2]), "error",
         r"^OpenSlide cannot open it: its levels are not ordered by size \(page 3: 512 x 384 "
         r"px after page 2: 128 x 96 px\)$"),
    Case("directory-loop",  # the last directory points back at the first
         svs(lambda s: _put(s.data, s.pages[-1].offset + 2 + 12 * len(s.pages[-1].tags),
                            struct.pack("<I", s.pages[0].offset))), "error",
         r"^OpenSlide cannot open it: damaged TIFF structure \(its image directories loop: "
         r"page \d+ is page 0 again\)$"),
    Case("first-directory-past-eof", svs(lambda s: _put(s.data, 4, struct.pack("<I", 10**8))),
         "error", r"^OpenSlide cannot open it: the file is truncated: it is \d+ bytes, too "
         r"short for its first image directory at byte 100000000$"),
    Case("bigtiff-version-in-classic-header", svs(lambda s: _put(s.data, 2, b"+\x00")),
         "error", r"^OpenSlide cannot open it: the file is truncated: it is \d+ bytes, too "
         r"short for its first image directory at byte \d+$"),
    Case("unsupported-compression",
         svs(lambda s: _set_tag(s.data, s.pages[0], "Compression", 200)), "error",
         r"^OpenSlide cannot open it \(Unsupported TIFF compression: 200\)$"),
    # --- OME-Zarr
    # a broken OME-Zarr says what is wrong with it, not "neither ... nor an OME-Zarr folder"
    Case("zarr-no-multiscales", zarr(_json_edit(".zattrs", lambda d: {"omero": {}})),
         "error", r"^not a valid OME-Zarr folder: a zarr folder whose \.zattrs has no OME-Zarr "
         r"'multiscales': not an image pyramid$", reader=False),
    Case("zarr-no-zattrs", zarr(lambda p: (p / ".zattrs").unlink()), "error",
         r"^not a valid OME-Zarr folder: a zarr folder without attributes \(no \.zattrs\)",
         reader=False),
    Case("zarr-zattrs-not-json", zarr(lambda p: (p / ".zattrs").write_text('{"multiscales": [')),
         "error", r"^not a valid OME-Zarr folder: \.zattrs is not valid JSON \(Expecting value "
         r"at line 1 column 18\)$", reader=False),
    Case("zarr-zattrs-binary", zarr(lambda p: (p / ".zattrs").write_bytes(
        np.random.default_rng(3).bytes(300))), "error",
         r"^not a valid OME-Zarr folder: \.zattrs is not valid JSON \(not UTF-8 text\)$",
         reader=False),
    Case("zarr-shape-2p40-rows",  # declared, never written: refused before any allocation
         zarr(_json_edit("0/.zarray", lambda d: d.update(shape=[3, 2**40, d["shape"][2]]))),
         "error", r"^absurd dimensions 2048 x 1099511627776 px", cheap=True),
    Case("zarr-multiscales-empty", zarr(_json_edit(".zattrs", lambda d: {"multiscales": []})),
         "error", r"^invalid OME-Zarr multiscales metadata \(IndexError"),
    Case("zarr-datasets-empty", zarr(_json_edit(".zattrs", lambda d: _ms(d).update(
        datasets=[]))), "error", r"^invalid OME-Zarr multiscales metadata: 'datasets' must"),
    Case("zarr-missing-array", zarr(_json_edit(".zattrs", lambda d: _ms(d)["datasets"][1]
                                               .update(path="nope"))),
         "error", r"^cannot open level 'nope': .*nope does not exist$"),
    Case("zarr-path-outside-folder", zarr(_json_edit(".zattrs", lambda d: _ms(d)["datasets"][0]
                                                     .update(path="../../etc"))),
         "error", r"^level path '\.\./\.\./etc' points outside the folder$"),
    Case("zarr-5-channels", zarr(_json_edit("0/.zarray", lambda d: d.update(
        shape=[5, *d["shape"][1:]], chunks=[5, *d["chunks"][1:]]))),
         "error", r"^5 channels; an RGB \(3\) or grey \(1\) image is needed$"),
    Case("zarr-1px-chunks", zarr(_json_edit("0/.zarray", lambda d: d.update(chunks=[3, 1, 1]))),
         "error", r"^level 0 is stored in chunks of 1 x 1 px; streaming needs chunks of at "
         r"least 16 x 16 px$", cheap=True),
    Case("zarr-giant-chunks", zarr(_json_edit("0/.zarray", lambda d: d.update(
        chunks=[3, 100_000_000, 128]))), "error",
         r"^level 0 claims tiles of 128 x 100000000 px, too large to decode", cheap=True),
    Case("zarr-giant-chunks-level-1", zarr(_json_edit("1/.zarray", lambda d: d.update(
        chunks=[3, 100_000_000, 128]))), "layer",
         r"^level 1 claims tiles of 128 x 100000000 px, too large to decode, and was skipped$",
         check=_levels((1536, 2048), (96, 128)), cheap=True),
    Case("zarr-absurd-shape", zarr(_json_edit("0/.zarray", lambda d: d.update(
        shape=[3, 4_000_000_000, 4_000_000_000]))), "error",
         r"^absurd dimensions 4000000000 x 4000000000 px", cheap=True),
    Case("zarr-no-unit", zarr(_json_edit(".zattrs", _drop_units)), "layer", ZARR_PIXEL_UNITS,
         check=_pixel_units),
    Case("zarr-scale-zero", zarr(_json_edit(".zattrs", lambda d: _ms(d)["datasets"][0][
        "coordinateTransformations"][0].update(scale=[1, 0, 0]))),
         "layer", ZARR_PIXEL_UNITS, check=_pixel_units),
    Case("zarr-corrupt-chunk",  # level 0 chunk (row 1, col 2): blosc header kept, body inverted
         zarr(lambda p: (p / "0/0/1/2").write_bytes(
             (b := (p / "0/0/1/2").read_bytes())[:16] + bytes(255 - x for x in b[16:]))),
         "layer", "", check=_bad_tile((1, 2), reopened=False)),
    # a chunk absent from the store: zarr reads the fill value; here a counted placeholder
    Case("zarr-missing-chunk", zarr(_unlink_chunks("0", "*/1/2")), "layer", "",
         check=_bad_tile((1, 2), reopened=False)),
    Case("zarr-missing-chunk-one-channel", zarr(_unlink_chunks("0", "0/1/2")), "layer", "",
         check=_bad_tile((1, 2), reopened=False)),
    Case("zarr-missing-row-of-chunks", zarr(_unlink_chunks("0", "*/4/*")), "layer", "",
         check=_bad_tiles_exactly(lambda rc: rc[0] == 4)),
    Case("zarr-missing-level-0", zarr(_unlink_chunks("0", "*/*/*")), "layer", "",
         check=_every_tile_bad()),
    Case("zarr-missing-level-1", zarr(_unlink_chunks("1", "*/*/*")), "layer", "",
         check=_every_tile_bad(level=1)),
    Case("zarr-shape-past-chunks",  # level 0 claims 2 more rows of chunks than were written
         zarr(_json_edit("0/.zarray", lambda d: d.update(
             shape=[3, d["shape"][1] + 2 * TILE, d["shape"][2]]))), "layer", "",
         check=_bad_tiles_exactly(lambda rc: rc[0] >= 1536 // TILE)),
]


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 if resource else 0.0


def _assert_clear_error(err: SlideError, path: Path, regex: str) -> None:
    msg = str(err)
    assert str(path) in msg, msg  # names the file ...
    assert "\n" not in msg and "\r" not in msg, msg  # ... on one line
    assert re.search(regex, err.problem), err.problem


#: How long a cheap case may run (pytest-timeout stops it, also when it hangs).
CHEAP_SECONDS = 10


def _timeout(case: Case):
    """Every case ends within 60 s (pristine fixtures included); a cheap one within
    :data:`CHEAP_SECONDS` of its own run (mutation included: each takes well under 1 s)."""
    if case.cheap:
        return pytest.mark.timeout(CHEAP_SECONDS, func_only=True)
    return pytest.mark.timeout(60)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=(_timeout(c), *c.marks))
                                  for c in CASES])
def test_bad_input(case: Case, pristine, reference, reference_zarr, tmp_path):
    path = case.mutate(pristine, tmp_path)
    ref = reference_zarr if path.suffix == ".zarr" else reference
    rss0 = _maxrss_mb()

    reader = napari_get_reader(str(path))  # cheap, never raises
    # a path with a slide extension that is no slide still gets our reader: its one error
    claimed = case.reader or (path.exists() and has_slide_extension(path))
    assert reader is (read_slide if claimed else None)
    if claimed and not case.reader:
        with warnings.catch_warnings(record=True), pytest.raises(SlideError) as info:
            read_slide(str(path))
        assert str(path) in str(info.value) and "\n" not in str(info.value)
    opener = read_slide if case.reader else open_slide

    if case.expect == "error":
        with warnings.catch_warnings(record=True), pytest.raises(SlideError) as info:
            opener(str(path))
        _assert_clear_error(info.value, path, case.message)
    else:
        assert case.expect == "layer" and case.reader
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            layers = read_slide(str(path))
        (data, kwargs, kind), = layers
        slide = kwargs["metadata"]["slide"]
        try:
            assert kind == "image" and kwargs["rgb"] and kwargs["multiscale"]
            notes = kwargs["metadata"]["notes"]
            if case.message:
                assert any(re.search(case.message, n) for n in notes), notes
                shown = [str(w.message) for w in caught]
                warned = any(str(path) in m and re.search(case.message, m.split(": ", 1)[-1])
                             for m in shown)
                if any(re.search(case.message, n) for n in kwargs["metadata"]["info_notes"]):
                    assert not warned, shown  # nothing to act on: logged, not a warning
                else:
                    assert warned, shown  # each other note is a visible warning
            for a, b in zip(data, data[1:]):
                assert b.shape[0] < a.shape[0] and b.shape[1] < a.shape[1]
            with warnings.catch_warnings(record=True):
                warnings.simplefilter("always")
                low = data[-1].compute()  # drawing the overview finishes
            assert low.shape == data[-1].shape and low.dtype == np.uint8
            if case.check is not None:
                case.check(slide, data, kwargs, ref, pristine)
        finally:
            slide.close()

    if case.cheap:  # (its time is bounded by the CHEAP_SECONDS timeout)
        assert _maxrss_mb() - rss0 < 256  # no allocation sized by the corrupt header


def test_case_ids_are_unique():
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z0-9-]+", i) for i in ids)


def test_pristine_opens_cleanly(pristine, reference, reference_zarr):
    """The corpus means something only if the pristine slide itself is flawless."""
    for ref in (reference, reference_zarr):
        assert ref.info.notes == ()
        assert ref.info.mpp == pytest.approx((0.25, 0.25))
        assert [lv.shape for lv in ref.info.levels] == [(1536, 2048), (384, 512), (96, 128)]
        for level in ref.to_dask():
            level.compute()
        assert ref.bad_tiles == 0
    assert napari_get_reader(str(pristine.svs)) is read_slide
    assert napari_get_reader(str(pristine.zarr)) is read_slide
    assert os.path.getsize(pristine.svs) == len(pristine.data)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("seed", range(10))
def test_real_slide_bit_flip(seed, real_svs, tmp_path):
    """One random bit flipped in the real CMU slide's first 4 KB (tile (0, 0) from byte 16,
    then tile (0, 1)): the tile is a counted, reported placeholder exactly where plain
    OpenSlide reports it ("Corrupt JPEG data: premature end of data segment" for 6 of these
    10 seeds), otherwise the same pixels as OpenSlide's."""
    data = bytearray(real_svs.read_bytes())
    rng = np.random.default_rng(seed)
    p = int(rng.integers(16, 4096))
    data[p] ^= 1 << int(rng.integers(0, 8))
    path = tmp_path / "flipped.svs"
    path.write_bytes(bytes(data))
    with tifffile.TiffFile(path) as tf:
        offsets = [int(o) for o in tf.pages[0].dataoffsets[:2]]
    rc = (0, 0) if p < offsets[1] else (0, 1)
    said, pixels = openslide_tile(path, 0, rc, 240)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with open_slide(path) as slide:
            got = slide.tile(0, *rc)
            again = slide.tile(0, *rc)
            bad = slide.bad_tiles
    reported = [w for w in caught if issubclass(w.category, BadTileWarning)]
    if said is None:
        assert bad == 0 and not reported
        np.testing.assert_array_equal(got, pixels)
    else:
        assert said.startswith("Corrupt JPEG data"), said
        assert bad == 1 and len(reported) == 1, [str(w.message) for w in reported]
        np.testing.assert_array_equal(got, placeholder_tile(240, 240))
        np.testing.assert_array_equal(again, got)


@pytest.mark.timeout(CHEAP_SECONDS)
@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here")
def test_fifo_named_svs_is_refused_by_type(tmp_path):
    """A named pipe called .svs: refused from ``stat`` alone, never opened (opening a FIFO
    for reading blocks until someone writes; the timeout catches that)."""
    from napari_milview.slide.sniff import sniff

    path = tmp_path / "pipe.svs"
    os.mkfifo(path)
    assert sniff(path) is None
    with pytest.raises(SlideError) as info:
        open_slide(path)
    _assert_clear_error(info.value, path, r"^a named pipe \(FIFO\), not a slide file or an "
                                          r"OME-Zarr folder$")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root reads a file whatever its mode bits (chmod 000 blocks nothing)")
def test_unreadable_file(pristine, tmp_path):
    path = tmp_path / "locked.svs"
    path.write_bytes(pristine.data)
    path.chmod(0)
    try:
        with pytest.raises(SlideError) as info:
            open_slide(path)
        _assert_clear_error(info.value, path, r"^cannot be read \(Permission denied\)$")
    finally:
        path.chmod(0o644)

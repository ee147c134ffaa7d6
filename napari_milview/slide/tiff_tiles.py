"""Direct tile decoding for TIFF-based slides (Aperio SVS, generic tiled TIFF).

OpenSlide's ``read_region`` paints every tile through cairo into premultiplied ARGB,
which openslide-python then converts back; for a tile-aligned read that costs ~5x the
JPEG decode itself. When every pyramid level OpenSlide reports is a plain tiled TIFF page
of the same size and tile grid, we read a tile's compressed bytes with ``os.pread`` and
decode them with libjpeg-turbo (simplejpeg for JPEG, strict: a libjpeg *warning* is an
error, as in OpenSlide; tifffile's decoders for the rest): the same pixels (checked
against OpenSlide in the tests), several times faster, and thread-safe with no lock.
OpenSlide stays in charge of metadata, of every non-aligned read, and of any tile this
path cannot decode.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

import numpy as np

#: OpenSlide vendors whose pyramid levels are exactly the tiled pages of one TIFF.
DIRECT_VENDORS = ("aperio", "generic-tiff")


class JpegNotChecked(ValueError):
    """This JPEG tile cannot be decoded here with libjpeg's warnings turned into errors
    (simplejpeg is missing, or the page's colour layout is one it does not handle): the
    caller lets OpenSlide decode it, which does, only more slowly."""


#: An APP14 "Adobe" segment with transform 0: the three components are R, G, B, not YCbCr.
_ADOBE_RGB = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"


def _strict_prefix(page) -> bytes | None:
    """SOI, then what a tile of ``page`` needs before its own bytes for
    :func:`decode_jpeg_strict` to give exactly tifffile's pixels (tifffile's
    ``jpeg_decode_colorspace`` rules), or None for a layout left to OpenSlide."""
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        return None
    if page.compression != 7 or page.extrasamples or page.planarconfig != 1:
        return None
    tables = page.jpegtables or b""
    if tables:
        if tables[:2] != b"\xff\xd8" or tables[-2:] != b"\xff\xd9":
            return None
        tables = tables[2:-2]
    if page.photometric == 6:  # YCbCr: libjpeg's default for three components
        return b"\xff\xd8" + tables
    if page.photometric == 2:  # RGB: stored without transform unless the JPEG says JFIF
        return b"\xff\xd8" + (b"" if page.is_jfif else _ADOBE_RGB) + tables
    return None


def decode_jpeg_strict(data: bytes) -> np.ndarray:
    """Decode a complete JPEG stream to (H, W, 3) uint8, raising ValueError for what
    libjpeg only *warns* about ("Corrupt JPEG data: premature end of data segment", bad
    Huffman codes, extraneous bytes), as OpenSlide does: such a tile is damaged, and must
    be a counted bad tile, not pixels. simplejpeg (libjpeg-turbo's TurboJPEG API with
    TJFLAG_STOPONWARNING) costs the same as imagecodecs' decoder, which ignores warnings.
    """
    import simplejpeg

    return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True)


class TileOutsideFile(OSError):
    """A tile's offset and byte count point past the end of the file (truncated or corrupt
    tile table): the tile is bad, and OpenSlide must not be asked, since it would first
    allocate the byte count the table claims."""


@dataclass
class _PageTiles:
    offsets: np.ndarray  # [n_tiles] int64, row-major
    counts: np.ndarray  # [n_tiles] int64
    grid_cols: int
    tile: tuple[int, int]  # (th, tw)
    decode: object  # tifffile's per-page decode function
    jpegtables: bytes | None
    page_tile: tuple[int, int] = (0, 0)  # (TileLength, TileWidth): what each JPEG must be
    #: What goes before a JPEG tile's own bytes (after its SOI) for the strict decoder: the
    #: shared tables, and an Adobe marker saying "RGB, no transform" where the TIFF says the
    #: JPEG is RGB (Aperio). None when this page's JPEGs cannot be decoded strictly here.
    strict_prefix: bytes | None = None


class TiffTiles:
    """Compressed tiles of the TIFF pages that back a slide's levels.

    Parameters
    ----------
    path : the TIFF file.
    levels : list of ((height, width), (tile_h, tile_w)) for OpenSlide's levels, in order.

    Raises
    ------
    ValueError
        When some level has no matching tiled 8-bit RGB page: use OpenSlide instead.
    """

    def __init__(self, path: str, levels: list[tuple[tuple[int, int], tuple[int, int]]]):
        import tifffile

        self.path = path
        self._fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
        self._lock = threading.Lock()
        self.pages: list[_PageTiles] = []
        try:
            with tifffile.TiffFile(path) as tf:
                candidates = [p for p in tf.pages[:64] if p.is_tiled]
                for shape, tile in levels:
                    page = next((p for p in candidates if p.shape[:2] == shape), None)
                    if page is None:
                        raise ValueError(f"no tiled page of {shape[1]} x {shape[0]} px")
                    if (min(page.tilelength, shape[0]), min(page.tilewidth, shape[1])) != tile:
                        raise ValueError("page tiles differ from the level's tiles")
                    if page.samplesperpixel != 3 or page.bitspersample != 8 or \
                            page.planarconfig != 1 or page.imagedepth != 1:
                        raise ValueError("not 8-bit interleaved RGB")
                    cols = -(-page.imagewidth // page.tilewidth)
                    rows = -(-page.imagelength // page.tilelength)
                    if len(page.dataoffsets) != rows * cols:
                        raise ValueError("tile table does not match the page size")
                    self.pages.append(_PageTiles(
                        np.asarray(page.dataoffsets, np.int64),
                        np.asarray(page.databytecounts, np.int64),
                        cols, tile, page.decode, page.jpegtables,
                        (int(page.tilelength), int(page.tilewidth)),
                        _strict_prefix(page),
                    ))
        except BaseException:
            os.close(self._fd)
            raise
        self._size = os.fstat(self._fd).st_size

    def read_tile(self, level: int, row: int, col: int, h: int, w: int) -> np.ndarray | None:
        """Decode tile (row, col) of ``level``, cropped to (h, w).

        Returns
        -------
        (h, w, 3) uint8, or None when the tile is absent (zero offset or byte count), so
        the caller can ask OpenSlide what such a tile looks like.

        Raises
        ------
        TileOutsideFile
            When the tile table points past the end of the file.
        Exception
            Whatever the decoder raises for corrupt data, or OSError for a short read.
        """
        pt = self.pages[level]
        index = row * pt.grid_cols + col
        offset, count = int(pt.offsets[index]), int(pt.counts[index])
        if not offset or not count:
            return None
        if offset + count > self._size:  # never allocate what a corrupt byte count claims
            raise TileOutsideFile(f"tile {index} of level {level} claims {count} bytes at "
                                  f"{offset}, past the end of the file ({self._size} bytes)")
        data = os.pread(self._fd, count, offset)
        if len(data) != count:
            raise OSError(f"short read: tile {index} of level {level} wants {count} bytes at "
                          f"{offset}, the file is {self._size} bytes")
        if data[:2] == b"\xff\xd8":
            check_jpeg_stream(data, pt.page_tile)
            if pt.strict_prefix is None:
                raise JpegNotChecked("no strict JPEG decoder (simplejpeg) for this page: "
                                     "OpenSlide decodes it")
            tile = decode_jpeg_strict(pt.strict_prefix + data[2:])
        else:
            seg, _, _ = pt.decode(data, index, jpegtables=pt.jpegtables)
            if seg is None:
                return None
            tile = seg.reshape(seg.shape[-3:])
        if tile.shape[0] < h or tile.shape[1] < w or tile.shape[2] != 3:
            raise ValueError(f"decoded tile has shape {tile.shape}, expected at least {(h, w, 3)}")
        return np.ascontiguousarray(tile[:h, :w])

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1


# After 0xFF in entropy-coded JPEG data: stuffing (00), fill (FF), restart markers (D0-D7),
# and in a progressive stream the next scan's DHT (C4), SOS (DA) or DRI (DD).
_OK_AFTER_FF = np.zeros(256, bool)
_OK_AFTER_FF[[0x00, 0xFF, 0xC4, 0xDA, 0xDD, *range(0xD0, 0xD8)]] = True
#: Start-of-frame markers (baseline, extended, progressive, lossless; not DHT/JPG/DAC).
_SOF_MARKERS = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD,
                          0xCE, 0xCF})


def check_jpeg_stream(data: bytes, shape: tuple[int, int] | None = None) -> None:
    """Raise ValueError for a JPEG stream that is visibly cut or corrupt, or whose frame
    header (SOF) is not ``shape`` = (height, width) when given.

    This cheap check (~15 us for a 256-px tile) catches what can be seen without
    decoding: no EOI marker at the end (a cut tile), a broken header, or a marker inside
    the entropy-coded data; bit flips inside the Huffman data are left to the strict
    decoder (:func:`decode_jpeg_strict`), whose libjpeg warnings are errors. A caller
    falls back to OpenSlide, which then reports the tile. The frame size is checked
    before decoding because the decoder allocates what the header claims (a corrupt one
    can claim 65535 x 65535 px: 12 GB).
    """
    n = len(data)
    if n < 4 or data[:2] != b"\xff\xd8":
        raise ValueError("not a JPEG stream (no SOI marker)")
    if data[-2:] != b"\xff\xd9":
        raise ValueError("JPEG stream does not end with an EOI marker (cut or corrupt)")
    i = 2
    while True:  # header segments up to the first SOS
        if i + 4 > n or data[i] != 0xFF:
            raise ValueError(f"corrupt JPEG header at byte {i}")
        marker = data[i + 1]
        if marker == 0xFF:
            i += 1
            continue
        if marker in (0xD8, 0xD9) or 0xD0 <= marker <= 0xD7:
            raise ValueError(f"corrupt JPEG header: marker 0xFF{marker:02X} at byte {i}")
        if shape is not None and marker in _SOF_MARKERS and i + 9 <= n:
            h = int.from_bytes(data[i + 5:i + 7], "big")
            w = int.from_bytes(data[i + 7:i + 9], "big")
            if (h, w) != tuple(shape):
                raise ValueError(f"JPEG frame is {w} x {h} px, the TIFF tile {shape[1]} x "
                                 f"{shape[0]} px")
        i += 2 + int.from_bytes(data[i + 2:i + 4], "big")
        if marker == 0xDA:
            break
    if i > n - 2:
        raise ValueError("JPEG stream has no entropy-coded data")
    body = np.frombuffer(data, np.uint8, count=n - 2 - i, offset=i)
    ff = np.flatnonzero(body[:-1] == 0xFF)
    bad = ~_OK_AFTER_FF[body[ff + 1]]
    if bad.any():
        j = int(ff[np.argmax(bad)])
        raise ValueError(f"corrupt JPEG data: marker 0xFF{body[j + 1]:02X} inside the "
                         f"entropy-coded data at byte {i + j}")

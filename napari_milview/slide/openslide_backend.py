"""OpenSlide backend: SVS, NDPI, MRXS, SCN, VMS/VMU, BIF, SVSLIDE and generic tiled TIFF.

OpenSlide errors are sticky (after one, every call on that handle fails), so a failed
handle is retired and a fresh one opened; a retired handle is closed once no thread is
still inside it (or at :meth:`OpenSlideBackend.close`).

OpenSlide explains a broken file poorly ("not a slide format", "Invalid TIFF") or not at
all (it silently stops at a broken image directory, losing the levels after it), so
:func:`diagnose_tiff` asks tifffile what is wrong with a TIFF's structure. Some corrupt
TIFFs kill the process inside OpenSlide (SIGFPE, or an abort on a failed allocation), so
a TIFF is checked with tifffile before OpenSlide opens it, and tile sizes before it reads.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import threading

import numpy as np

from .pyramid import MAX_SIDE, SlideError, SlideInfo, parse_mpp, validate_levels
from .tiff_tiles import DIRECT_VENDORS, TiffTiles, TileOutsideFile

log = logging.getLogger(__name__)

#: Associated images larger than this many pixels are refused (Pillow's bomb limit).
MAX_ASSOCIATED_PIXELS = 178_956_970
#: How many TIFF pages :func:`diagnose_tiff` looks at (slides have a handful).
MAX_DIAGNOSED_PAGES = 64
#: Vendors whose every tiled TIFF page is a pyramid level (so a missing one can be spotted).
_TILED_PAGE_VENDORS = ("aperio", "generic-tiff")


class _KeepRecords(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _clean(msg: object, limit: int = 160) -> str:
    """One line, without tifffile's ``<tifffile.TiffPages @8>`` prefix, at most ``limit`` chars."""
    text = " ".join(re.sub(r"<tifffile\.\w+ @\d+>\s*", "", str(msg)).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def tiff_problems(path: str) -> tuple[list[str], list[tuple[int, int, str | None]]]:
    """What is wrong with a TIFF's structure, most telling first, and its tiled pages.

    Reads the image directories only (no pixels), at most :data:`MAX_DIAGNOSED_PAGES`;
    never raises. Looks for, in this order: pixel data past the end of the file
    (truncation), directories past the end or looping (tifffile's log), an unreadable
    directory chain, then pages of zero or absurd size or whose tile table does not
    match their size, and tiled pages not ordered by size.

    Returns
    -------
    problems : list of str
    tiled : list of (page index, NewSubfileType, problem or None) of the tiled pages; the
        problem when its size or tile table is corrupt.
    """
    truncated: list[str] = []
    damaged: list[str] = []
    pages: list[str] = []
    tiled: list[tuple[int, int, str | None]] = []
    size = -1
    keep = _KeepRecords()
    logger = logging.getLogger("tifffile")
    logger.addHandler(keep)
    try:
        import tifffile

        size = os.path.getsize(path)
        first = _first_ifd_offset(path)
        if first is not None and first + 18 > size:  # room for one entry, at least
            truncated.append(f"the file is truncated: it is {size} bytes, too short for its "
                             f"first image directory at byte {first}")
            return truncated, tiled
        prev: tuple[int, int, int] | None = None  # (page, width, height) of the last tiled page
        seen: dict[int, int] = {}  # directory offset -> page
        with tifffile.TiffFile(path, **tifffile_flags(path)) as tf:
            for i, page in enumerate(tf.pages):
                if i >= MAX_DIAGNOSED_PAGES:
                    break
                if page.offset in seen:
                    damaged.append(f"damaged TIFF structure (its image directories loop: page "
                                   f"{i} is page {seen[page.offset]} again)")
                    break
                seen[page.offset] = i
                w, h = int(page.imagewidth), int(page.imagelength)
                offsets = np.asarray(page.dataoffsets, np.int64)
                counts = np.asarray(page.databytecounts, np.int64)
                ends = (offsets + counts)[(offsets != 0) & (counts != 0)]
                if ends.size and ends.max() > size:
                    truncated.append(f"the file is truncated: it is {size} bytes but page {i}'s "
                                     f"data extend to byte {int(ends.max())}")
                header = None
                if w <= 0 or h <= 0:
                    pages.append(f"page {i} has zero size ({w} x {h} px)")
                elif page.is_tiled and page.tilewidth and page.tilelength:
                    planes = page.samplesperpixel if page.planarconfig == 2 else 1
                    expected = (math.ceil(w / page.tilewidth) * math.ceil(h / page.tilelength)
                                * max(1, page.imagedepth) * planes)
                    if w > MAX_SIDE or h > MAX_SIDE or len(page.dataoffsets) != expected:
                        header = (f"page {i} claims {w} x {h} px ({expected} tiles) but lists "
                                  f"{len(page.dataoffsets)} tiles: its header is corrupt")
                        pages.append(header)
                    elif prev is not None and (w > prev[1] or h > prev[2]):
                        pages.append(
                            f"its levels are not ordered by size (page {i}: {w} x {h} px "
                            f"after page {prev[0]}: {prev[1]} x {prev[2]} px)")
                    prev = (i, w, h)
                if page.is_tiled:
                    tiled.append((i, int(page.subfiletype), header))
    except Exception as e:  # noqa: BLE001 - a diagnosis never raises
        damaged.append(f"damaged TIFF structure ({_clean(e)})")
    finally:
        logger.removeHandler(keep)
    for msg in reversed(keep.messages):
        if "offset" in msg:
            damaged.insert(0, f"the file is truncated or damaged ({_clean(msg)}; the file is "
                              f"{size} bytes)")
        else:
            damaged.insert(0, f"damaged TIFF structure ({_clean(msg)})")
    return truncated + damaged + pages, tiled


def read_properties(osr) -> tuple[dict[str, str], int]:
    """OpenSlide's properties, and how many could not be read. openslide-python decodes a
    property name that is not valid UTF-8 (a flipped byte in an Aperio description) with
    replacement characters, then cannot look that name up: ``dict(osr.properties)`` raises
    a bare KeyError. Such properties are skipped and counted."""
    props: dict[str, str] = {}
    bad = 0
    names = osr.properties
    for name in list(names):
        try:
            props[name] = names[name]
        except (KeyError, UnicodeDecodeError):
            bad += 1
    return props, bad


def tifffile_flags(path: str) -> dict[str, bool]:
    """Keyword arguments for ``tifffile.TiffFile``: tifffile takes any ``.ndpi`` for
    Hamamatsu NDPI (64-bit offsets hidden in 32-bit fields) by its name; a plain TIFF named
    ``.ndpi`` (no NDPI tag 65420 in its first directory) is read as the TIFF it is."""
    if not path.lower().endswith(".ndpi"):
        return {}
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            order = {b"II": "little", b"MM": "big"}.get(head[:2])
            if order is None or int.from_bytes(head[2:4], order) != 42:
                return {}
            f.seek(int.from_bytes(head[4:8], order))
            n = int.from_bytes(f.read(2), order)
            entries = f.read(12 * min(n, 4096))
        tags = {int.from_bytes(entries[k:k + 2], order) for k in range(0, len(entries), 12)}
        return {} if 65420 in tags else {"is_ndpi": False}
    except (OSError, ValueError):
        return {}


def _untiled(path: str) -> str | None:
    """"a TIFF without tiles (one W x H px image in strips)" when no page of the TIFF is
    tiled: a photo or scan, not a pyramid OpenSlide reads. None otherwise; never raises."""
    try:
        import tifffile

        with tifffile.TiffFile(path, **tifffile_flags(path)) as tf:
            pages = list(tf.pages[:MAX_DIAGNOSED_PAGES])
            if not pages or any(p.is_tiled for p in pages):
                return None
            w, h = int(pages[0].imagewidth), int(pages[0].imagelength)
            ndpi = " and without Hamamatsu NDPI tags" if path.lower().endswith(".ndpi") else ""
            return (f"a TIFF without tiles{ndpi} ({len(pages)} image(s) in strips, the first "
                    f"{w} x {h} px): not a whole-slide pyramid")
    except Exception:  # noqa: BLE001
        return None


def _is_tiff_file(path: str) -> bool:
    try:
        return _first_ifd_offset(path) is not None
    except OSError:
        return False


def _first_ifd_offset(path: str) -> int | None:
    """Where a TIFF's first image directory starts, from its header; None if not a TIFF."""
    with open(path, "rb") as f:
        head = f.read(16)
    order = {b"II": "<", b"MM": ">"}.get(head[:2])
    if order is None or len(head) < 8:
        return None
    version = int.from_bytes(head[2:4], "little" if order == "<" else "big")
    if version == 42:
        return int.from_bytes(head[4:8], "little" if order == "<" else "big")
    if version == 43 and len(head) == 16:
        return int.from_bytes(head[8:16], "little" if order == "<" else "big")
    return None


def diagnose_tiff(path: str) -> str | None:
    """The most telling structural problem of a TIFF (truncated, damaged directories, a page
    of zero or absurd size, levels out of order), or None when tifffile sees none.
    Cheap (directories only) and never raises. None for a file that is not a TIFF."""
    if not _is_tiff_file(path):
        return None
    return (tiff_problems(path)[0] or [None])[0] or _untiled(path)


def _mpp_source(props: dict[str, str]) -> str:
    """Where OpenSlide's ``openslide.mpp-x`` came from: the TIFF resolution tag or a vendor
    field."""
    if parse_mpp(props.get("openslide.mpp-x")) is None:
        return "none"
    unit = props.get("tiff.ResolutionUnit", "")
    xres = parse_mpp(props.get("tiff.XResolution"))
    if xres is not None and unit in ("centimeter", "inch"):
        per = 10_000.0 if unit == "centimeter" else 25_400.0
        if abs(per / xres - float(props["openslide.mpp-x"])) < 1e-6 * per / xres + 1e-9:
            vendor_keys = ("aperio.MPP", "hamamatsu.XResolution", "mirax.", "leica.", "philips.")
            if not any(k.startswith(vendor_keys) for k in props):
                return "tiff-resolution"
    return "vendor"


class OpenSlideBackend:
    """Tiles of one slide through OpenSlide.

    Parameters
    ----------
    path : str
        The slide file.
    """

    name = "openslide"

    def __init__(self, path: str):
        import openslide

        self._openslide = openslide
        self.path = str(path)
        self._lock = threading.Lock()
        self._retired: list = []
        self._users: dict[int, int] = {}  # id(handle) -> reads in flight on it
        self.reopened = 0
        # tifffile's view of a TIFF, first: OpenSlide kills the process (SIGFPE in its
        # open or first read) when a tiled page's size or tile table is corrupt and a
        # level-0 tile is empty; libtiff pads such a table with empty tiles, so refuse it
        self._tiff = tiff_problems(self.path) if _is_tiff_file(self.path) else None
        if self._tiff:
            header = next((h for _, _, h in self._tiff[1] if h), None)
            if header:
                raise SlideError(self.path, header)
        try:
            self._osr = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError:
            why = diagnose_tiff(self.path)
            raise SlideError(self.path, f"OpenSlide cannot open it: {why}" if why else
                             "not a slide format OpenSlide can read") from None
        except openslide.OpenSlideError as e:
            why = diagnose_tiff(self.path)
            msg = _clean(str(e).replace(f": {self.path}", "").replace(self.path, "the file"), 300)
            raise SlideError(self.path, f"OpenSlide cannot open it ({msg})"
                             + (f": {why}" if why else "")) from None
        except OSError as e:
            raise SlideError(self.path, f"cannot be read: {e.strerror or e}") from None
        try:
            self._describe()
        except BaseException:
            self._osr.close()
            raise

    def _describe(self) -> None:
        """Fill ``info`` and ``file_levels`` from the open handle."""
        osr = self._osr
        props, unreadable = read_properties(osr)
        raw = []
        for i in range(osr.level_count):
            w, h = osr.level_dimensions[i]
            tw = int(props.get(f"openslide.level[{i}].tile-width", 0) or 0)
            th = int(props.get(f"openslide.level[{i}].tile-height", 0) or 0)
            raw.append(((int(h), int(w)), float(osr.level_downsamples[i]), (th, tw)))
        kept, notes = validate_levels(self.path, raw)
        if unreadable:
            notes.append(f"{unreadable} of the file's property names are not valid UTF-8 "
                         "(a damaged header) and were skipped")
        mx, my = parse_mpp(props.get("openslide.mpp-x")), parse_mpp(props.get("openslide.mpp-y"))
        mpp = (my or mx, mx or my) if (mx or my) else None
        if mpp is None:
            notes.append("microns per pixel unknown: the layer is in pixel units")
        vendor = props.get("openslide.vendor", "unknown")
        if vendor in _TILED_PAGE_VENDORS:
            # OpenSlide stops at a broken image directory without a word: compare with tifffile
            # (a generic TIFF's levels after the first are flagged reduced-resolution)
            problems, tiled = self._tiff or tiff_problems(self.path)
            n_file = sum(1 for i, subtype, _ in tiled
                         if vendor == "aperio" or i == 0 or subtype & 1)
            if n_file > osr.level_count:
                why = f" ({problems[0]})" if problems else ""
                notes.append(f"only {osr.level_count} of the file's {n_file} tiled levels could "
                             f"be opened{why}; the other levels were skipped")
            cut = next((m for m in problems if m.startswith("the file is truncated")), None)
            if cut:
                notes.append(f"{cut}; tiles and associated images past its end cannot be read")
        self.file_levels = [i for i, _ in kept]
        power = parse_mpp(props.get("openslide.objective-power"))
        self.info = SlideInfo(
            path=self.path,
            vendor=vendor,
            levels=tuple(lv for _, lv in kept),
            mpp=mpp,
            mpp_source=_mpp_source(props) if mpp else "none",
            objective_power=power,
            associated=tuple(sorted(osr.associated_images.keys())),
            notes=tuple(notes),
            properties=props,
        )
        self._tiles = None
        if vendor in DIRECT_VENDORS:
            try:
                self._tiles = TiffTiles(self.path, [(lv.shape, lv.tile) for _, lv in kept])
            except Exception as e:  # noqa: BLE001 - OpenSlide reads everything then
                log.debug("%s: no direct tile path (%s); reading through OpenSlide", self.path, e)

    def read(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """Pixels of a region of a (kept) level.

        Parameters
        ----------
        level : index into ``info.levels``.
        y, x : top-left in that level's pixels.
        h, w : size in that level's pixels.

        Returns
        -------
        (h, w, 3) uint8 RGB; transparent pixels are composited on white.
        """
        lv = self.info.levels[level]
        if self._tiles is not None and y % lv.tile[0] == 0 and x % lv.tile[1] == 0 \
                and h <= lv.tile[0] and w <= lv.tile[1]:
            try:
                tile = self._tiles.read_tile(level, y // lv.tile[0], x // lv.tile[1], h, w)
            except TileOutsideFile:
                raise  # a bad tile; OpenSlide would first allocate what the table claims
            except Exception:  # noqa: BLE001 - let OpenSlide have its say on this tile
                tile = None
            if tile is not None:
                return tile
        ds = lv.downsample
        loc = (int(round(x * ds)), int(round(y * ds)))
        file_level = self.file_levels[level]
        osr = self._acquire()
        try:
            img = osr.read_region(loc, file_level, (w, h))
        except self._openslide.OpenSlideError:
            # The shared handle is dead after any error, ours or another thread's: replace
            # it, and retry once on a private handle, which no other thread's bad tile can
            # kill before we read (a good tile must not become a placeholder by bad luck).
            self._reopen(osr)
            private = self._openslide.OpenSlide(self.path)
            try:
                img = private.read_region(loc, file_level, (w, h))
            finally:
                private.close()
        finally:
            self._release(osr)
        rgba = np.asarray(img)
        if self.info.vendor in _TILED_PAGE_VENDORS and rgba.ndim == 3 and rgba.shape[2] == 4 \
                and not rgba[:, :, 3].any():
            # every tile of these pyramids holds pixels: a transparent one (zero byte count,
            # zero offset) is missing data, not glass; never let it pass as white background
            raise ValueError("the file has no pixel data for this tile (zero-length tile)")
        return _rgba_to_rgb(rgba)

    def associated_image(self, name: str) -> np.ndarray:
        """(h, w, 3) uint8 of 'label', 'macro', 'thumbnail' ...; KeyError if absent."""
        if name not in self.info.associated:
            raise KeyError(f"{self.path}: no associated image {name!r} "
                           f"(has {', '.join(self.info.associated) or 'none'})")
        props = self.info.properties
        w = int(props.get(f"openslide.associated.{name}.width", 0) or 0)
        h = int(props.get(f"openslide.associated.{name}.height", 0) or 0)
        if w * h > MAX_ASSOCIATED_PIXELS:
            raise SlideError(self.path, f"associated image {name!r} is {w} x {h} px, too large")
        osr = self._acquire()
        try:
            return _rgba_to_rgb(np.asarray(osr.associated_images[name]))
        except self._openslide.OpenSlideError:
            self._reopen(osr)  # the handle is dead now; tiles must go on
            private = self._openslide.OpenSlide(self.path)
            try:
                return _rgba_to_rgb(np.asarray(private.associated_images[name]))
            except self._openslide.OpenSlideError as e:
                raise SlideError(self.path, f"associated image {name!r} cannot be read: {e}"
                                 ) from None
            finally:
                private.close()
        finally:
            self._release(osr)

    def _acquire(self):
        """The current handle, marked in use so that it is not closed under the caller."""
        with self._lock:
            osr = self._osr
            self._users[id(osr)] = self._users.get(id(osr), 0) + 1
            return osr

    def _release(self, osr) -> None:
        """Unmark ``osr``; close it if it was retired and nobody else is inside it."""
        with self._lock:
            left = self._users.pop(id(osr)) - 1
            if left:
                self._users[id(osr)] = left
                return
            if not any(r is osr for r in self._retired):
                return
            self._retired = [r for r in self._retired if r is not osr]
        _close_quietly(osr)

    def _reopen(self, failed) -> None:
        """Retire the shared handle ``failed`` and open a fresh one (unless another thread
        already did). A dead handle that nobody uses is closed now, else at its last release:
        a slide with thousands of bad tiles must not pile up open handles."""
        with self._lock:
            if self._osr is not failed:
                return
        fresh = self._openslide.OpenSlide(self.path)
        with self._lock:
            if self._osr is not failed:  # another thread won the race
                stale, fresh = fresh, None
            else:
                self._osr = fresh
                self.reopened += 1
                stale = None
                if self._users.get(id(failed)):
                    self._retired.append(failed)
                else:
                    stale = failed
        if stale is not None:
            _close_quietly(stale)

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
        with self._lock:
            handles = [*self._retired, self._osr]
            self._retired.clear()
        for osr in handles:
            _close_quietly(osr)


def _close_quietly(osr) -> None:
    with contextlib.suppress(Exception):  # closing a dead handle
        osr.close()


def _rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """(h, w, 4) uint8 straight-alpha RGBA -> (h, w, 3) RGB on white."""
    if rgba.ndim == 2:
        return np.repeat(rgba[:, :, None], 3, axis=2)
    if rgba.shape[2] == 3:
        return np.ascontiguousarray(rgba)
    rgb = rgba[:, :, :3]
    alpha = rgba[:, :, 3]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    a = alpha[:, :, None].astype(np.float32) / 255.0
    out = rgb.astype(np.float32) * a + 255.0 * (1.0 - a)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)

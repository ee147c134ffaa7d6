"""The slide object everything else uses: tiles, regions and dask pyramids, Qt-free.

A :class:`Slide` wraps one backend (OpenSlide or OME-Zarr), adds lazily derived levels
below a shallow pyramid, serves tiles through the shared bounded :class:`TileCache`,
and turns unreadable tiles into a visible placeholder that is counted and reported once.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import overrides
from .cache import TileCache, shared_cache
from .pyramid import SlideError, SlideInfo, derived_levels
from .sniff import OPENSLIDE_SUFFIXES, diagnose_mrxs, diagnose_zarr, not_regular, sniff

log = logging.getLogger(__name__)


class BadTileWarning(UserWarning):
    """Some tiles of a slide could not be decoded and are drawn as placeholders."""


def placeholder_tile(h: int, w: int) -> np.ndarray:
    """A (h, w, 3) uint8 magenta/grey checkerboard: unmistakably not tissue, never blank."""
    yy, xx = np.mgrid[0:h, 0:w]
    check = ((yy // 16) + (xx // 16)) % 2 == 0
    out = np.empty((h, w, 3), np.uint8)
    out[check] = (255, 0, 255)
    out[~check] = (96, 96, 96)
    return out


class Slide:
    """A whole-slide image with a validated pyramid.

    Parameters
    ----------
    backend : an opened backend (``OpenSlideBackend`` or ``OmeZarrBackend``).
    cache : TileCache, optional
        Defaults to the process-wide :func:`shared_cache`.
    mpp : float, optional
        User override of microns per pixel (isotropic).
    derive_levels : bool
        Add lazily computed 2x levels when the smallest stored level is still large.
    """

    def __init__(self, backend, *, cache: TileCache | None = None, mpp: float | None = None,
                 derive_levels: bool = True):
        self.backend = backend
        self.path = backend.path
        self.cache = cache if cache is not None else shared_cache()
        info: SlideInfo = backend.info
        self.n_native = len(info.levels)
        levels = list(info.levels)
        notes, info_notes = list(info.notes), list(info.info_notes)
        if derive_levels:
            extra = derived_levels(levels[-1])
            if extra:
                levels += extra
                info_notes.append(
                    f"the file's smallest level is {levels[self.n_native - 1].shape[1]} x "
                    f"{levels[self.n_native - 1].shape[0]} px; {len(extra)} lower levels are "
                    "built lazily"
                )
                notes.append(info_notes[-1])
        if mpp is not None:
            if not (mpp > 0 and np.isfinite(mpp)):
                raise SlideError(self.path, f"mpp override must be a positive number, got {mpp}")
            notes = [n for n in notes if not n.startswith("microns per pixel unknown")]
            info = replace(info, mpp=(float(mpp), float(mpp)), mpp_source="user")
        self.info = replace(info, levels=tuple(levels), notes=tuple(notes),
                            info_notes=tuple(info_notes))
        self._key = (os.path.realpath(self.path), id(self))
        self._bad: set[tuple[int, int, int]] = set()
        self._bad_lock = threading.Lock()
        self.first_error: str | None = None
        self.on_bad_tile: list[Callable[[str], None]] = []

    # ------------------------------------------------------------------ tiles
    @property
    def bad_tiles(self) -> int:
        """How many distinct tiles failed to decode (each drawn as a placeholder)."""
        return len(self._bad)

    def tile(self, level: int, row: int, col: int, *, cache: bool = True) -> np.ndarray:
        """Tile (row, col) of ``level`` on its native grid.

        Parameters
        ----------
        cache : bool
            Store a freshly decoded tile in the tile cache (default). False for tiles read
            once in a scan or an extraction: a cached tile is still used, but a decoded one
            is not kept, so the scan neither evicts the tiles a viewer is showing nor churns
            memory through the cache.

        Returns
        -------
        (th, tw, 3) uint8, read-only, clipped at the right and bottom edges.
        """
        key = (self._key, level, row, col)
        arr = self.cache.get(key)
        if arr is None:
            arr = self._decode_tile(level, row, col)
            if cache:
                self.cache.put(key, arr)  # (made read-only there)
            else:
                arr.flags.writeable = False
        return arr

    def _decode_tile(self, level: int, row: int, col: int) -> np.ndarray:
        """Decode one tile (a placeholder, counted, when it cannot be decoded)."""
        lv = self.info.levels[level]
        th, tw = lv.tile
        y, x = row * th, col * tw
        h, w = min(th, lv.shape[0] - y), min(tw, lv.shape[1] - x)
        if h <= 0 or w <= 0 or row < 0 or col < 0:
            raise IndexError(f"tile ({row}, {col}) is outside level {level} (grid {lv.grid})")
        try:
            if lv.derived:
                arr = self._derive(level, y, x, h, w)
            else:
                arr = self.backend.read(level, y, x, h, w)
            if arr.shape != (h, w, 3) or arr.dtype != np.uint8:
                raise ValueError(f"decoded tile has shape {arr.shape} {arr.dtype}, "
                                 f"expected {(h, w, 3)} uint8")
        except Exception as e:  # noqa: BLE001 - a bad tile must never break drawing
            arr = placeholder_tile(h, w)
            self._record_bad(level, row, col, e)
        return arr

    def _record_bad(self, level: int, row: int, col: int, err: Exception) -> None:
        with self._bad_lock:
            first = not self._bad
            self._bad.add((level, row, col))
            if first:
                self.first_error = f"level {level} tile ({row}, {col}): {type(err).__name__}: {err}"
        log.warning("%s: unreadable tile at level %d (%d, %d): %s", self.path, level, row, col, err)
        if first:
            msg = (f"{self.path}: some tiles cannot be decoded and are drawn as magenta/grey "
                   f"placeholders (first: {self.first_error}); `Slide.bad_tiles` counts them")
            warnings.warn(msg, BadTileWarning, stacklevel=2)
            for cb in list(self.on_bad_tile):
                cb(msg)

    def _derive(self, level: int, y: int, x: int, h: int, w: int) -> np.ndarray:
        """2x box-downsample of the finer level's region (edge pixels replicated)."""
        prev = self.info.levels[level - 1]
        y2, x2 = 2 * y, 2 * x
        h2, w2 = min(2 * h, prev.shape[0] - y2), min(2 * w, prev.shape[1] - x2)
        src = self.read(level - 1, y2, x2, h2, w2)
        if h2 < 2 * h or w2 < 2 * w:
            src = np.pad(src, ((0, 2 * h - h2), (0, 2 * w - w2), (0, 0)), mode="edge")
        acc = src.reshape(h, 2, w, 2, 3).astype(np.uint16).sum(axis=(1, 3))
        return ((acc + 2) // 4).astype(np.uint8)

    # ---------------------------------------------------------------- regions
    def iter_tiles(self, level: int, rows: range | None = None, cols: range | None = None,
                   threads: int | None = None, cache: bool = False
                   ) -> Iterator[tuple[int, int, np.ndarray]]:
        """Every native tile of a block of ``level``, decoded on ``threads`` threads, in
        row-major order: the path for whole-slide scans (no dask, no assembly copy).

        Parameters
        ----------
        rows, cols : range, optional
            Tile rows and columns (default: the whole level).
        threads : int, optional
            Decode threads (default: one per core, at least 2).
        cache : bool
            Keep the tiles in the tile cache (default False: a scan would only evict the
            tiles a viewer is showing).

        Yields
        ------
        (row, col, tile)
            ``tile`` is (th, tw, 3) uint8, smaller at the right and bottom edges.
        """
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        n_rows, n_cols = self.info.levels[level].grid
        keys = [(r, c) for r in (rows if rows is not None else range(n_rows))
                for c in (cols if cols is not None else range(n_cols))]
        threads = threads or max(2, os.cpu_count() or 2)
        with ThreadPoolExecutor(threads, thread_name_prefix="milview-scan") as ex:
            pending: deque = deque()
            it = iter(keys)
            for key in it:  # keep a few tiles per thread in flight, in order
                pending.append((key, ex.submit(self.tile, level, *key, cache=cache)))
                if len(pending) >= 4 * threads:
                    (r, c), fut = pending.popleft()
                    yield r, c, fut.result()
            while pending:
                (r, c), fut = pending.popleft()
                yield r, c, fut.result()

    def read(self, level: int, y: int, x: int, h: int, w: int, *,
             keep: Callable[[int, int], bool] | None = None) -> np.ndarray:
        """A region of ``level`` in that level's pixels, assembled from cached tiles.

        Tiles missing from the cache are decoded in parallel on a small shared thread pool
        (OpenSlide and libjpeg release the GIL). Parts outside the level are white.
        ``keep(row, col)`` decides whether a tile decoded here enters the tile cache
        (default: every one; see :meth:`tile`).

        Returns
        -------
        (h, w, 3) uint8
        """
        lv = self.info.levels[level]
        th, tw = lv.tile
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + h, lv.shape[0]), min(x + w, lv.shape[1])
        inside = (y0, x0, y1, x1) == (y, x, y + h, x + w)  # the tiles fill every pixel
        out = np.empty((h, w, 3), np.uint8) if inside else np.full((h, w, 3), 255, np.uint8)
        if y1 <= y0 or x1 <= x0:
            return out
        keys = [(r, c) for r in range(y0 // th, (y1 - 1) // th + 1)
                for c in range(x0 // tw, (x1 - 1) // tw + 1)]
        tiles = {k: self.cache.get((self._key, level, *k)) for k in keys}
        missing = [k for k, t in tiles.items() if t is None]

        def get(k):
            return self.tile(level, *k, cache=keep is None or bool(keep(*k)))

        if len(missing) > 1 and not decodes_in_this_thread():
            for k, t in zip(missing, _tile_pool().map(get, missing)):
                tiles[k] = t
        else:
            for k in missing:
                tiles[k] = get(k)
        for (r, c), t in tiles.items():
            ty, tx = r * th, c * tw
            sy0, sy1 = max(y0, ty), min(y1, ty + t.shape[0])
            sx0, sx1 = max(x0, tx), min(x1, tx + t.shape[1])
            out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = t[sy0 - ty:sy1 - ty, sx0 - tx:sx1 - tx]
        return out

    def read_region(self, location: tuple[int, int], level: int, size: tuple[int, int]
                    ) -> np.ndarray:
        """OpenSlide's convention: ``location`` = level-0 (x, y), ``size`` = (w, h) at ``level``.

        Returns (h, w, 3) uint8.
        """
        ds = self.info.levels[level].downsample
        x, y = location
        w, h = size
        return self.read(level, int(round(y / ds)), int(round(x / ds)), int(h), int(w))

    def associated_image(self, name: str) -> np.ndarray:
        """(h, w, 3) uint8 'label', 'macro' or 'thumbnail' (names in ``info.associated``)."""
        return self.backend.associated_image(name)

    # ------------------------------------------------------------------- dask
    def to_dask(self, chunk: int | None = None) -> list:
        """One lazy dask array per level.

        Parameters
        ----------
        chunk : int, optional
            None (the default, what napari gets): chunks = the file's native tiles, one task
            per tile. An int asks for coarser chunks of about ``chunk`` pixels, rounded to a
            whole number of native tiles; use it for whole-slide work (scans, stain
            statistics, cohort runs), where dask's ~0.5 ms per task would otherwise cost more
            than decoding a 256-px tile.

        Returns
        -------
        list of :class:`SlideArray` (dask arrays) of shape (h_l, w_l, 3) uint8, strictly
        shrinking.
        """
        return [SlideArray.for_level(self, i, chunk) for i in range(len(self.info.levels))]

    def close(self) -> None:
        self.cache.clear(self._key)
        self.backend.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.info.dimensions
        return (f"Slide({self.path!r}, {self.info.vendor}, {w}x{h}, "
                f"{len(self.info.levels)} levels, mpp={self.info.mpp})")


class _LevelProxy:
    """Array-like view of one level for ``dask.array.from_array`` (chunk-aligned reads)."""

    def __init__(self, slide: Slide, level: int):
        self.slide = slide
        self.level = level
        lv = slide.info.levels[level]
        self.shape = (lv.shape[0], lv.shape[1], 3)
        self.dtype = np.dtype(np.uint8)
        self.ndim = 3
        self.token = f"{abs(hash(slide._key)):x}-{level}"

    def __dask_tokenize__(self):
        return ("milview-level", self.token)

    def __reduce__(self):
        # a task sent to another process reopens the slide there by path
        return (_reopen_level, (self.slide.path, self.level))

    def __getitem__(self, key) -> np.ndarray:
        ys, xs = key[0], key[1]
        cs = key[2] if len(key) > 2 else slice(None)
        th, tw = self.slide.info.levels[self.level].tile
        y0, y1, _ = ys.indices(self.shape[0])
        x0, x1, _ = xs.indices(self.shape[1])
        if y0 % th == 0 and x0 % tw == 0 and y1 - y0 <= th and x1 - x0 <= tw:
            t = self.slide.tile(self.level, y0 // th, x0 // tw)
            out = t[: y1 - y0, : x1 - x0]
        else:  # a coarse chunk: decode its tiles in this (dask worker) thread, since
            # dask already runs one task per thread; nesting the tile pool would oversubscribe
            before = decode_in_this_thread()
            try:
                out = self.slide.read(self.level, y0, x0, y1 - y0, x1 - x0)
            finally:
                decode_in_this_thread(before)
        return out[:, :, cs]


def _reopen_level(path: str, level: int) -> _LevelProxy:
    return _LevelProxy(open_slide(path), level)


def _dask_array_base():
    import dask.array as da

    return da.Array


class SlideArray(_dask_array_base()):
    """A dask array of one slide level (or a rectangular window of it).

    It is an ordinary dask array: one task per native tile, usable in any dask
    computation. One shortcut: ``np.asarray(level[y0:y1, x0:x1])`` -- exactly what napari
    does for every redraw -- reads the window straight from the tile cache (decoding
    missing tiles in parallel) instead of scheduling one dask task per tile, which costs
    ~10-20 ms per 1920 x 1080 viewport. ``window.compute()`` takes the same path when it
    would run in this process. Any other indexing returns a plain dask array.
    """

    __slots__ = ()

    @classmethod
    def for_level(cls, slide: Slide, level: int, chunk: int | None = None) -> SlideArray:
        import dask.array as da

        lv = slide.info.levels[level]
        th, tw = lv.tile
        if chunk:
            th, tw = th * max(1, round(chunk / th)), tw * max(1, round(chunk / tw))
        proxy = _LevelProxy(slide, level)
        base = da.from_array(
            proxy, chunks=(th, tw, 3), name=f"milview-{proxy.token}-{th}x{tw}",
            asarray=False, fancy=False, lock=False, inline_array=True,
            meta=np.empty((0, 0, 3), np.uint8),
        )
        out = cls(base.dask, base.name, base.chunks, meta=base._meta)
        out._window = (slide, level, 0, 0, slice(None))
        return out

    def __getitem__(self, key):
        res = super().__getitem__(key)
        window = self._child_window(key)
        if window is not None:
            res.__class__ = SlideArray
            res._window = window
        return res

    def _child_window(self, key):
        """The window that ``self[key]`` covers, or None for anything but step-1 slices."""
        if not isinstance(key, tuple):
            key = (key,)
        if len(key) > 3 or not all(isinstance(k, slice) for k in key):
            return None
        if any(k.step not in (None, 1) for k in key):
            return None
        slide, level, y, x, cs = self._window
        h, w = self.shape[0], self.shape[1]
        ys = key[0].indices(h) if len(key) > 0 else (0, h, 1)
        xs = key[1].indices(w) if len(key) > 1 else (0, w, 1)
        if len(key) > 2:
            if cs != slice(None):
                return None
            cs = key[2]
        if ys[1] < ys[0] or xs[1] < xs[0]:
            return None
        return (slide, level, y + ys[0], x + xs[0], cs)

    def compute(self, **kwargs):
        """A window of a level is read in one go (``Slide.read``: cached tiles, missing ones
        decoded in parallel) instead of one scheduled task per tile; anything else, or an
        explicit ``scheduler=`` other than threads/sync, goes through dask as usual."""
        if self.__dict__.get("_window") is not None and _local_scheduler(kwargs):
            return self.__array__()
        return super().compute(**kwargs)

    def __array__(self, dtype=None, copy=None, **kwargs):
        window = self.__dict__.get("_window")
        if window is None:
            return super().__array__(dtype=dtype, copy=copy, **kwargs)
        slide, level, y, x, cs = window
        out = slide.read(level, y, x, self.shape[0], self.shape[1])[:, :, cs]
        return out if dtype is None else out.astype(dtype, copy=False)


def _local_scheduler(kwargs: dict) -> bool:
    """True when ``compute(**kwargs)`` would run in this process (threads or sync), not on
    a process pool or a dask.distributed cluster."""
    import dask.local
    import dask.threaded
    from dask.base import get_scheduler

    sched = get_scheduler(scheduler=kwargs.get("scheduler"), get=kwargs.get("get"))
    return sched in (None, dask.threaded.get, dask.local.get_sync)


_pool_local = threading.local()
_pool = None
_pool_lock = threading.Lock()


def decode_in_this_thread(on: bool = True) -> bool:
    """Make :meth:`Slide.read` in the calling thread decode its tiles itself (``on``) instead
    of handing them to the shared decode threads (``on=False``, the default of every thread).

    For threads that are themselves the parallelism -- dask workers, the pipeline's reader
    threads, the decode threads -- where nesting the shared pool would only oversubscribe the
    cores and add hand-offs. The setting is per thread and lasts until changed.

    Returns
    -------
    bool
        The thread's previous setting (to restore it).
    """
    before = decodes_in_this_thread()
    _pool_local.inside = bool(on)
    return before


def decodes_in_this_thread() -> bool:
    """True when :meth:`Slide.read` decodes in the calling thread (see
    :func:`decode_in_this_thread`)."""
    return bool(getattr(_pool_local, "inside", False))


def _tile_pool():
    """Shared decode threads (one per core, at least 2), created on first use."""
    global _pool
    with _pool_lock:
        if _pool is None:
            from concurrent.futures import ThreadPoolExecutor

            _pool = ThreadPoolExecutor(max(2, os.cpu_count() or 2),
                                       thread_name_prefix="milview-tiles",
                                       initializer=decode_in_this_thread)
        return _pool


def open_slide(path: str | os.PathLike, *, mpp: float | None = None, remember_mpp: bool = True,
               cache: TileCache | None = None, derive_levels: bool = True) -> Slide:
    """Open a slide file (OpenSlide formats) or an OME-Zarr folder.

    Parameters
    ----------
    path : the slide.
    mpp : float, optional
        Override microns per pixel. Remembered for this file unless ``remember_mpp`` is False;
        a remembered override is applied when ``mpp`` is not given.
    cache : TileCache, optional
        Defaults to the shared cache.

    Raises
    ------
    SlideError
        One clear message naming the file and the problem.
    """
    p = Path(os.fspath(path))
    if not p.exists():
        if p.is_symlink():
            raise SlideError(p, "a symbolic link to nothing (its target is missing, or the "
                                "links loop)")
        raise SlideError(p, "no such file or folder")
    what = not_regular(p)
    if what is not None:  # never opened: reading a FIFO blocks until someone writes
        raise SlideError(p, f"{what}, not a slide file or an OME-Zarr folder")
    suffix = p.suffix.lower()
    if p.is_file():
        if p.stat().st_size == 0:
            raise SlideError(p, "the file is empty")
        try:
            with open(p, "rb") as fh:
                fh.read(1)
        except OSError as e:
            raise SlideError(p, f"cannot be read ({e.strerror or e})") from None
        if suffix == ".mrxs" and (why := diagnose_mrxs(p)):
            raise SlideError(p, why)
    kind = sniff(p)
    if kind is None:
        if p.is_dir():
            why = diagnose_zarr(p)
            if why:
                raise SlideError(p, f"not a valid OME-Zarr folder: {why}")
            if suffix in OPENSLIDE_SUFFIXES:
                raise SlideError(p, f"a folder named {suffix}, not a slide file (nor an "
                                    "OME-Zarr folder)")
        raise SlideError(p, "not a whole-slide image (neither a TIFF/OpenSlide format nor an "
                            "OME-Zarr folder)")
    try:
        if kind == "ome-zarr":
            from .zarr_backend import OmeZarrBackend

            backend = OmeZarrBackend(str(p))
        else:
            from .openslide_backend import OpenSlideBackend

            backend = OpenSlideBackend(str(p))
    except SlideError:
        raise
    except Exception as e:  # noqa: BLE001 - whatever a backend's library raised: one clear error
        raise SlideError(p, f"cannot be opened ({type(e).__name__}: {e})") from e
    if mpp is not None and remember_mpp:
        overrides.remember_mpp(p, mpp)
    elif mpp is None:
        mpp = overrides.recall_mpp(p)
    try:
        return Slide(backend, cache=cache, mpp=mpp, derive_levels=derive_levels)
    except BaseException:
        backend.close()
        raise

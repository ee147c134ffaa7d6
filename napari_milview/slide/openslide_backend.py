"""OpenSlide backend: SVS, NDPI, MRXS, SCN, VMS/VMU, BIF, SVSLIDE and generic tiled TIFF.

OpenSlide errors are sticky (after one, every call on that handle fails), so a failed
handle is retired and a fresh one opened; retired handles are closed only at
:meth:`OpenSlideBackend.close`, because another thread may still be inside them.
"""

from __future__ import annotations

import threading

import numpy as np

from .pyramid import SlideError, SlideInfo, parse_mpp, validate_levels

#: Associated images larger than this many pixels are refused (Pillow's bomb limit).
MAX_ASSOCIATED_PIXELS = 178_956_970


def _mpp_source(props: dict[str, str]) -> str:
    """Where OpenSlide's ``openslide.mpp-x`` came from: the TIFF resolution tag or a vendor field."""
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
        self.reopened = 0
        try:
            self._osr = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(self.path, "not a slide format OpenSlide can read") from None
        except openslide.OpenSlideError as e:
            raise SlideError(self.path, f"OpenSlide cannot open it: {e}") from None
        except OSError as e:
            raise SlideError(self.path, f"cannot be read: {e.strerror or e}") from None
        osr = self._osr
        props = dict(osr.properties)
        raw = []
        for i in range(osr.level_count):
            w, h = osr.level_dimensions[i]
            tw = int(props.get(f"openslide.level[{i}].tile-width", 0) or 0)
            th = int(props.get(f"openslide.level[{i}].tile-height", 0) or 0)
            raw.append(((int(h), int(w)), float(osr.level_downsamples[i]), (th, tw)))
        kept, notes = validate_levels(self.path, raw)
        self.file_levels = [i for i, _ in kept]
        mx, my = parse_mpp(props.get("openslide.mpp-x")), parse_mpp(props.get("openslide.mpp-y"))
        mpp = (my or mx, mx or my) if (mx or my) else None
        if mpp is None:
            notes.append("microns per pixel unknown: the layer is in pixel units")
        power = parse_mpp(props.get("openslide.objective-power"))
        self.info = SlideInfo(
            path=self.path,
            vendor=props.get("openslide.vendor", "unknown"),
            levels=tuple(lv for _, lv in kept),
            mpp=mpp,
            mpp_source=_mpp_source(props) if mpp else "none",
            objective_power=power,
            associated=tuple(sorted(osr.associated_images.keys())),
            notes=tuple(notes),
            properties=props,
        )

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
        ds = lv.downsample
        loc = (int(round(x * ds)), int(round(y * ds)))
        file_level = self.file_levels[level]
        try:
            img = self._osr.read_region(loc, file_level, (w, h))
        except self._openslide.OpenSlideError:
            # the handle is dead after any error: retry once on a fresh one
            self._reopen()
            try:
                img = self._osr.read_region(loc, file_level, (w, h))
            except self._openslide.OpenSlideError:
                self._reopen()
                raise
        rgba = np.asarray(img)
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
        return _rgba_to_rgb(np.asarray(self._osr.associated_images[name]))

    def _reopen(self) -> None:
        with self._lock:
            self._retired.append(self._osr)
            self._osr = self._openslide.OpenSlide(self.path)
            self.reopened += 1

    def close(self) -> None:
        with self._lock:
            for osr in [*self._retired, self._osr]:
                try:
                    osr.close()
                except Exception:  # noqa: BLE001, S110 - closing a dead handle
                    pass
            self._retired.clear()


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

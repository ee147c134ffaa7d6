"""Open whole-slide images and serve them as lazy dask pyramids (Qt-free).

>>> from napari_milview.slide import open_slide
>>> s = open_slide("slide.svs")           # doctest: +SKIP
>>> levels = s.to_dask()                  # doctest: +SKIP
"""

from .cache import TileCache, shared_cache
from .core import BadTileWarning, Slide, decode_in_this_thread, open_slide, placeholder_tile
from .pyramid import Level, SlideError, SlideInfo
from .sniff import sniff

__all__ = [
    "BadTileWarning",
    "Level",
    "Slide",
    "SlideError",
    "SlideInfo",
    "TileCache",
    "decode_in_this_thread",
    "open_slide",
    "placeholder_tile",
    "shared_cache",
    "sniff",
]

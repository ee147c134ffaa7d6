"""Patch features as bags (features + coords + geometry) and their file formats (Qt-free).

>>> from napari_milview.features import load_bag, save_bag
>>> bag = load_bag("h5_files/slide_1.h5")      # doctest: +SKIP
>>> bag.check_dim(1024, "clam_sb")             # doctest: +SKIP

torch is imported only to read ``.pt`` bags (weights_only=True) or in ``Bag.to_torch``.
The patch encoders (``encoders*``) and extraction (``extract``) are added by others.
"""

from .bag import Bag, BagError, BagWarning
from .io import FORMATS, load_bag, sniff_bag
from .milview_h5 import save_bag

__all__ = ["FORMATS", "Bag", "BagError", "BagWarning", "load_bag", "save_bag", "sniff_bag"]

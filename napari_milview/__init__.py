"""napari-milview: see what a MIL model saw on a whole-slide image.

Nothing heavy is imported here: napari, torch and OpenSlide load only inside the
functions that need them.
"""

__version__ = "0.1.0"
__all__ = ["__version__"]

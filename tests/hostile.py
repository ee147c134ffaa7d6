"""Objects whose unpickling runs code: what the safe loaders must refuse (shared by
``test_weights`` and ``mil/test_checkpoint``)."""

from __future__ import annotations

import os
import pathlib


class WritesMarker:
    """Unpickling calls ``Path.write_text(marker, 'pwned')``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.write_text, (self.marker, "pwned"))


class RunsShell:
    """Unpickling calls ``os.system('touch marker')``."""

    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch '{self.marker}'",))

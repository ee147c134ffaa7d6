"""glibc malloc tuned for batch inference (the CLI and cohort worker processes only).

By default glibc hands every large freed block (above a threshold that starts at 128 KB)
back to the operating system, so each batch's input tensor and every layer's activations
are page-faulted afresh: on the benchmark machine that costs the demo encoder's forward
~30 % (docs/BENCHMARKS.md, extraction). Raising the mmap and trim thresholds keeps such
blocks in the heap for reuse, as PyTorch's CPU performance guide suggests (it names these
same knobs, or jemalloc/tcmalloc). The price is that up to :data:`TRIM` bytes of freed memory
stay with the process. Never called on import and never in napari's process: it is a
process-wide setting, which only our own processes choose.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

#: Blocks below this are served from the heap (and reused) instead of fresh mmaps.
MMAP_THRESHOLD = 64 << 20
#: Freed memory kept at the top of the heap before it is given back to the OS.
TRIM = 256 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # <malloc.h>
_done: list[bool] = []


def tune_for_batches() -> bool:
    """Apply the thresholds once per process (glibc only).

    Returns
    -------
    bool
        True when glibc accepted both settings (now or on an earlier call).
    """
    if _done:
        return _done[0]
    ok = False
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and \
                bool(libc.mallopt(_M_TRIM_THRESHOLD, TRIM))
        except (OSError, AttributeError):  # musl and others have no mallopt
            ok = False
    _done.append(ok)
    return ok

"""A bounded, thread-safe LRU cache of decoded tiles, shared by every open slide."""

from __future__ import annotations

import os
import threading
from collections import OrderedDict
from collections.abc import Hashable

import numpy as np

#: Default capacity; override with ``MILVIEW_TILE_CACHE_MB`` or :meth:`TileCache.resize`.
DEFAULT_CACHE_BYTES = 512 * 2**20


class TileCache:
    """Least-recently-used tiles, bounded in bytes.

    Parameters
    ----------
    capacity_bytes : int
        Upper bound on the summed ``nbytes`` of the cached arrays; 0 disables caching.
    """

    def __init__(self, capacity_bytes: int = DEFAULT_CACHE_BYTES):
        self._lock = threading.Lock()
        self._items: OrderedDict[Hashable, np.ndarray] = OrderedDict()
        self._capacity = int(capacity_bytes)
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    @property
    def capacity(self) -> int:
        return self._capacity

    def resize(self, capacity_bytes: int) -> None:
        """Change the capacity, evicting the oldest tiles if it shrank."""
        with self._lock:
            self._capacity = max(0, int(capacity_bytes))
            self._evict()

    def get(self, key: Hashable) -> np.ndarray | None:
        with self._lock:
            arr = self._items.get(key)
            if arr is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return arr

    def put(self, key: Hashable, arr: np.ndarray) -> None:
        """Store ``arr`` (made read-only: callers share it)."""
        if arr.nbytes > self._capacity:
            return
        arr.flags.writeable = False
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.nbytes -= old.nbytes
            self._items[key] = arr
            self.nbytes += arr.nbytes
            self._evict()

    def clear(self, prefix: Hashable | None = None) -> None:
        """Drop everything, or only keys whose first element is ``prefix``."""
        with self._lock:
            if prefix is None:
                self._items.clear()
                self.nbytes = 0
                return
            for key in [k for k in self._items if isinstance(k, tuple) and k[0] == prefix]:
                self.nbytes -= self._items.pop(key).nbytes

    def __len__(self) -> int:
        return len(self._items)

    def _evict(self) -> None:
        while self.nbytes > self._capacity and self._items:
            _, arr = self._items.popitem(last=False)
            self.nbytes -= arr.nbytes


_shared: TileCache | None = None
_shared_lock = threading.Lock()


def shared_cache() -> TileCache:
    """The process-wide tile cache (sized by ``MILVIEW_TILE_CACHE_MB`` if set)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            mb = os.environ.get("MILVIEW_TILE_CACHE_MB")
            size = int(float(mb) * 2**20) if mb else DEFAULT_CACHE_BYTES
            _shared = TileCache(size)
        return _shared

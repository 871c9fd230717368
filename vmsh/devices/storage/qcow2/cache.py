"""A bounded write-back cache of cluster-sized metadata tables (L2 tables, refcount blocks):
memory stays bounded whatever the image's size, and a table is written back when it is evicted
or when the owner flushes, in the order the owner chooses."""

from __future__ import annotations

import collections
from collections.abc import Callable


class TableCache:
    """Up to ``capacity`` tables keyed by their host offset.

    :param load: reads the table at an offset (raises ``OSError``).
    :param store: writes a dirty table back (called on eviction and by :meth:`write_back`).
    """

    def __init__(self, capacity: int, load: Callable[[int], bytearray],
                 store: Callable[[int, bytearray], None]) -> None:
        self.capacity = max(2, capacity)
        self._load = load
        self._store = store
        self._tables: collections.OrderedDict[int, bytearray] = collections.OrderedDict()
        self._dirty: set[int] = set()

    def get(self, offset: int) -> bytearray:
        """The table at ``offset``, loaded if needed (evicting the least recently used one)."""
        table = self._tables.get(offset)
        if table is not None:
            self._tables.move_to_end(offset)
            return table
        table = self._load(offset)
        self._make_room()
        self._tables[offset] = table
        return table

    def put(self, offset: int, table: bytearray, *, dirty: bool) -> None:
        """Insert a table built in memory (a new one)."""
        if offset not in self._tables:
            self._make_room()
        self._tables[offset] = table
        self._tables.move_to_end(offset)
        if dirty:
            self._dirty.add(offset)

    def mark_dirty(self, offset: int) -> None:
        self._dirty.add(offset)

    @property
    def dirty(self) -> bool:
        return bool(self._dirty)

    def write_back(self) -> None:
        """Write every dirty table (in offset order)."""
        for offset in sorted(self._dirty):
            self._store(offset, self._tables[offset])
            self._dirty.discard(offset)

    def drop(self, offset: int) -> None:
        """Forget a table without writing it (it was freed)."""
        self._tables.pop(offset, None)
        self._dirty.discard(offset)

    def _make_room(self) -> None:
        while len(self._tables) >= self.capacity:
            offset, table = next(iter(self._tables.items()))
            if offset in self._dirty:
                self._store(offset, table)
                self._dirty.discard(offset)
            del self._tables[offset]

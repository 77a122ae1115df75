"""Composed pages cached per user, invalidated when the user's events change.

The key carries the user's event count, read from the event store on every lookup (one indexed
COUNT): a new event recorded by any process makes the cached page stale without a message bus.

New visitors' pages (``meta.cold_start``) are kept apart, in a tenth of the room: anyone can make up
ids, so a flood of unknown ids evicts only other unknown ids' pages, never a known shopper's.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from agent.schema import Homepage

COLD_SHARE = 10  # new visitors' pages get 1/COLD_SHARE of the room


class PageCache:
    def __init__(self, max_users: int = 10_000):
        self.max_users = max_users
        self._cold_max = max(max_users // COLD_SHARE, 1) if max_users > 1 else 0
        self._pages: OrderedDict[str, tuple[int, Homepage]] = OrderedDict()
        self._cold: OrderedDict[str, None] = OrderedDict()  # ids in _pages whose page is a new visitor's
        self._lock = threading.Lock()

    def get(self, user_id: str, version: int) -> Homepage | None:
        with self._lock:
            entry = self._pages.get(user_id)
            if entry is None or entry[0] != version:
                return None
            self._pages.move_to_end(user_id)
            if user_id in self._cold:
                self._cold.move_to_end(user_id)
            return entry[1]

    def put(self, user_id: str, version: int, page: Homepage) -> None:
        if self.max_users <= 0:
            return
        with self._lock:
            self._drop(user_id)
            self._pages[user_id] = (version, page)
            if page.meta.cold_start:
                self._cold[user_id] = None
                while len(self._cold) > self._cold_max:
                    self._drop(next(iter(self._cold)))
            else:  # the least recently used known page makes room
                while len(self._pages) - len(self._cold) > self.max_users - self._cold_max:
                    self._drop(next(u for u in self._pages if u not in self._cold))

    def invalidate(self, user_id: str) -> None:
        with self._lock:
            self._drop(user_id)

    def _drop(self, user_id: str) -> None:
        self._pages.pop(user_id, None)
        self._cold.pop(user_id, None)

    def __len__(self) -> int:
        return len(self._pages)

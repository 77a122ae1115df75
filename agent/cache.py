"""Composed pages cached per user, invalidated when the user's events change.

The key carries the user's event count, read from the event store on every lookup (one indexed
COUNT): a new event recorded by any process makes the cached page stale without a message bus.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from agent.schema import Homepage


class PageCache:
    def __init__(self, max_users: int = 10_000):
        self.max_users = max_users
        self._pages: OrderedDict[str, tuple[int, Homepage]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, user_id: str, version: int) -> Homepage | None:
        with self._lock:
            entry = self._pages.get(user_id)
            if entry is None or entry[0] != version:
                return None
            self._pages.move_to_end(user_id)
            return entry[1]

    def put(self, user_id: str, version: int, page: Homepage) -> None:
        if self.max_users <= 0:
            return
        with self._lock:
            self._pages[user_id] = (version, page)
            self._pages.move_to_end(user_id)
            while len(self._pages) > self.max_users:
                self._pages.popitem(last=False)

    def invalidate(self, user_id: str) -> None:
        with self._lock:
            self._pages.pop(user_id, None)

    def __len__(self) -> int:
        return len(self._pages)

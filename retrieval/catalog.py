"""The catalogue and the event log, persisted in one SQLite file beside the vector store.

SQLite keeps events across restarts and makes re-ingestion idempotent (primary keys, upserts);
the catalogue is small enough to be held in memory once opened.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from pathlib import Path

from retrieval.records import Event, Product

_SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    item_id TEXT PRIMARY KEY, title TEXT NOT NULL, category_path TEXT NOT NULL, brand TEXT,
    price REAL, description TEXT, stock INTEGER
);
CREATE TABLE IF NOT EXISTS events (
    user_id TEXT NOT NULL, item_id TEXT NOT NULL, timestamp REAL, seq_pos INTEGER,
    event_type TEXT NOT NULL
);
-- The natural key: the same event ingested twice is stored once. NULLs are folded because SQLite
-- treats NULLs as distinct in a plain UNIQUE constraint.
CREATE UNIQUE INDEX IF NOT EXISTS events_key
    ON events (user_id, item_id, IFNULL(timestamp, -1), IFNULL(seq_pos, -1), event_type);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id);
"""


class Catalog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.executescript(_SCHEMA)
        self._products: dict[str, Product] | None = None

    def close(self) -> None:
        self._db.close()

    # -- catalogue ---------------------------------------------------------------------------
    def upsert_products(self, products: Iterable[Product]) -> None:
        self._db.executemany(
            "INSERT INTO products VALUES (?,?,?,?,?,?,?) ON CONFLICT(item_id) DO UPDATE SET "
            "title=excluded.title, category_path=excluded.category_path, brand=excluded.brand, "
            "price=excluded.price, description=excluded.description, stock=excluded.stock",
            [
                (p.item_id, p.title, json.dumps(p.category_path), p.brand, p.price, p.description, p.stock)
                for p in products
            ],
        )
        self._db.commit()
        self._products = None

    @property
    def products(self) -> dict[str, Product]:
        if self._products is None:
            rows = self._db.execute("SELECT * FROM products ORDER BY item_id")
            self._products = {
                r[0]: Product(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4], r[5], r[6]) for r in rows
            }
        return self._products

    # -- events ------------------------------------------------------------------------------
    def add_events(self, events: Iterable[Event]) -> int:
        """Insert events, ignoring exact duplicates; returns how many were new."""
        before = self._db.total_changes
        self._db.executemany(
            "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?)",
            [(e.user_id, e.item_id, e.timestamp, e.seq_pos, e.event_type) for e in events],
        )
        self._db.commit()
        return self._db.total_changes - before

    def user_events(self, user_id: str) -> list[Event]:
        """A user's events, oldest first (by timestamp, then sequence position)."""
        rows = self._db.execute(
            "SELECT user_id, item_id, timestamp, seq_pos, event_type FROM events WHERE user_id = ? "
            "ORDER BY COALESCE(timestamp, 0), COALESCE(seq_pos, 0), rowid",
            (user_id,),
        )
        return [Event(*r) for r in rows]

    def all_events(self) -> list[Event]:
        rows = self._db.execute(
            "SELECT user_id, item_id, timestamp, seq_pos, event_type FROM events "
            "ORDER BY user_id, COALESCE(timestamp, 0), COALESCE(seq_pos, 0), rowid"
        )
        return [Event(*r) for r in rows]

    def event_count(self, user_id: str | None = None) -> int:
        if user_id is None:
            return self._db.execute("SELECT COUNT(*) FROM events").fetchone()[0]
        return self._db.execute("SELECT COUNT(*) FROM events WHERE user_id = ?", (user_id,)).fetchone()[0]

    def users(self, limit: int | None = None) -> list[str]:
        sql = "SELECT user_id FROM events GROUP BY user_id ORDER BY COUNT(*) DESC, user_id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [r[0] for r in self._db.execute(sql)]

"""The catalogue and the event log, persisted in one SQLite file beside the vector store.

SQLite keeps events across restarts and makes re-ingestion idempotent (primary keys, upserts);
the catalogue is small enough to be held in memory once opened.

Concurrency: each thread gets its own connection (a connection is not shared across threads), the
file is in WAL mode so readers never block the one writer, and a writer waits for another's lock
(``busy_timeout``) instead of failing. Every catalogue change bumps ``catalogue_version``; readers
in any process see the bump on their next ``refresh()`` and reload the products.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from retrieval.records import Event, Product

EVENTS_LOCK_FILE = ".events.lock"  # beside the catalogue file


@contextlib.contextmanager
def events_lock(store: Path, exclusive: bool) -> Iterator[None]:
    """Shared while events are added (any process, any thread: each call opens its own lock),
    exclusive while an erasure runs, so no event of its subject lands between its delete and its
    proof."""
    path = Path(store) / EVENTS_LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock

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
-- who a shopper is, where the shop knows it (personal data: erased with the user's events)
CREATE TABLE IF NOT EXISTS user_attributes (user_id TEXT PRIMARY KEY, attributes TEXT NOT NULL);
-- pages made ahead of requests (homepage precompute), each under the key it is current for
-- (agent.composer: the user's event count, the catalogue version, the parts' fingerprint)
CREATE TABLE IF NOT EXISTS pages (user_id TEXT PRIMARY KEY, cache_key TEXT NOT NULL, page TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS store_meta (key TEXT PRIMARY KEY, value INTEGER NOT NULL);
INSERT OR IGNORE INTO store_meta VALUES ('catalogue_version', 0);
"""
_BUSY_MS = 30_000


class Catalog:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._connections_lock = threading.Lock()
        self._db.executescript(_SCHEMA)
        self._products: dict[str, Product] | None = None
        self._loaded_version: int | None = None

    @property
    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    def close(self) -> None:
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()

    # -- catalogue ---------------------------------------------------------------------------
    def version(self) -> int:
        """Bumped by every catalogue change, in any process: part of every cached page's key."""
        return self._db.execute("SELECT value FROM store_meta WHERE key = 'catalogue_version'").fetchone()[0]

    def _bump(self, db: sqlite3.Connection) -> None:
        db.execute("UPDATE store_meta SET value = value + 1 WHERE key = 'catalogue_version'")

    def upsert_products(self, products: Iterable[Product]) -> int:
        """Insert or update products; returns how many were new or changed (unchanged rows do not
        bump the catalogue version, so re-ingesting the same file keeps every cached page)."""
        rows = [(p.item_id, p.title, json.dumps(p.category_path), p.brand, p.price, p.description, p.stock)
                for p in products]
        db = self._db
        with db:
            before = db.total_changes
            db.executemany(
                "INSERT INTO products VALUES (?,?,?,?,?,?,?) ON CONFLICT(item_id) DO UPDATE SET "
                "title=excluded.title, category_path=excluded.category_path, brand=excluded.brand, "
                "price=excluded.price, description=excluded.description, stock=excluded.stock "
                "WHERE (title, category_path, brand, price, description, stock) IS NOT "
                "(excluded.title, excluded.category_path, excluded.brand, excluded.price, excluded.description, "
                "excluded.stock)",
                rows,
            )
            changed = db.total_changes - before
            if changed:
                self._bump(db)
        self._products = None
        return changed

    def remove_products(self, item_ids: Iterable[str]) -> list[str]:
        """Remove products from the catalogue; their events stay (a history skips unknown items).
        Returns the ids that were there."""
        ids = list(dict.fromkeys(item_ids))
        db = self._db
        with db:
            found = [i for i in ids if db.execute("SELECT 1 FROM products WHERE item_id = ?", (i,)).fetchone()]
            db.executemany("DELETE FROM products WHERE item_id = ?", [(i,) for i in found])
            if found:
                self._bump(db)
        self._products = None
        return found

    def refresh(self) -> int:
        """Drop the in-memory products if the catalogue changed since they were read (by any
        process); returns the version now held. One indexed read."""
        version = self.version()
        if version != self._loaded_version:
            self._products, self._loaded_version = None, version
        return version

    @property
    def loaded_version(self) -> int | None:
        """The catalogue version of the last ``refresh`` (None before the first)."""
        return self._loaded_version

    @property
    def products(self) -> dict[str, Product]:
        products = self._products
        if products is None:
            rows = self._db.execute("SELECT * FROM products ORDER BY item_id")
            products = {r[0]: Product(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4], r[5], r[6]) for r in rows}
            self._products = products
        return products

    # -- events ------------------------------------------------------------------------------
    def add_events(self, events: Iterable[Event]) -> int:
        """Insert events, ignoring exact duplicates; returns how many were new."""
        db = self._db
        with events_lock(self.path.parent, exclusive=False), db:
            before = db.total_changes
            db.executemany(
                "INSERT OR IGNORE INTO events VALUES (?,?,?,?,?)",
                [(e.user_id, e.item_id, e.timestamp, e.seq_pos, e.event_type) for e in events],
            )
            return db.total_changes - before

    def add_event(self, event: Event) -> int | None:
        """Insert one event; its row number when it was new, None when it was stored already."""
        db = self._db
        with events_lock(self.path.parent, exclusive=False), db:
            cursor = db.execute("INSERT OR IGNORE INTO events VALUES (?,?,?,?,?)",
                                (event.user_id, event.item_id, event.timestamp, event.seq_pos, event.event_type))
            return cursor.lastrowid if cursor.rowcount == 1 else None

    def last_row(self) -> int:
        """The newest event's row number (0: none)."""
        return self._db.execute("SELECT COALESCE(MAX(rowid), 0) FROM events").fetchone()[0]

    def events_after(self, row: int) -> list[tuple[int, Event]]:
        """Events stored after row number ``row``, in the order they were stored."""
        rows = self._db.execute("SELECT rowid, user_id, item_id, timestamp, seq_pos, event_type FROM events "
                                "WHERE rowid > ? ORDER BY rowid", (row,))
        return [(r[0], Event(*r[1:])) for r in rows]

    def user_events(self, user_id: str, before_row: int | None = None) -> list[Event]:
        """A user's events, oldest first (by timestamp, then sequence position); with ``before_row``,
        only those stored before that row."""
        rows = self._db.execute(
            "SELECT user_id, item_id, timestamp, seq_pos, event_type FROM events WHERE user_id = ? AND rowid < ? "
            "ORDER BY COALESCE(timestamp, 0), COALESCE(seq_pos, 0), rowid",
            (user_id, before_row if before_row is not None else 2**63 - 1),
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

    def latest_time(self) -> float | None:
        """The latest event time in the store (None when events carry no timestamps)."""
        return self._db.execute("SELECT MAX(timestamp) FROM events").fetchone()[0]

    # -- who the shoppers are ------------------------------------------------------------------
    def upsert_attributes(self, users: dict[str, dict[str, str]]) -> int:
        """Each user's attributes, replacing what was stored for them; returns how many users."""
        db = self._db
        with events_lock(self.path.parent, exclusive=False), db:
            db.executemany("INSERT OR REPLACE INTO user_attributes VALUES (?, ?)",
                           [(u, json.dumps(a, sort_keys=True)) for u, a in users.items()])
        return len(users)

    def attributes(self, user_id: str) -> dict[str, str]:
        row = self._db.execute("SELECT attributes FROM user_attributes WHERE user_id = ?", (user_id,)).fetchone()
        return json.loads(row[0]) if row else {}

    def all_attributes(self) -> dict[str, dict[str, str]]:
        return {u: json.loads(a) for u, a in self._db.execute("SELECT user_id, attributes FROM user_attributes")}

    # -- pages made ahead (homepage precompute) ------------------------------------------------------
    def store_pages(self, rows: list[tuple[str, str, str]]) -> None:
        """(user id, key, page JSON) rows, replacing each user's earlier page; one transaction."""
        with self._db as db:
            db.executemany("INSERT OR REPLACE INTO pages VALUES (?, ?, ?)", rows)

    def stored_page(self, user_id: str, key: str) -> str | None:
        """The user's page JSON if one was made under ``key`` (else None: none, or stale)."""
        row = self._db.execute("SELECT page FROM pages WHERE user_id = ? AND cache_key = ?", (user_id, key)).fetchone()
        return row[0] if row else None

    def stored_page_keys(self) -> dict[str, str]:
        return dict(self._db.execute("SELECT user_id, cache_key FROM pages"))

    def users(self, limit: int | None = None) -> list[str]:
        sql = "SELECT user_id FROM events GROUP BY user_id ORDER BY COUNT(*) DESC, user_id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [r[0] for r in self._db.execute(sql)]

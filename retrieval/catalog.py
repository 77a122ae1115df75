"""The catalogue and the event log: one SQLite file beside the vector store (the embedded
default), or a PostgreSQL database that every host of a shop shares (``store_url``).

Both engines hold the same tables, and every statement below is written once for both (``?``
placeholders, ``ON CONFLICT`` upserts, the event's row number named ``{row}``); the engine
(``retrieval.engines``) supplies connections, transactions and the lock an erasure takes. Re-ingesting
is idempotent (primary keys, upserts); the catalogue is small enough to be held in memory once opened.

Concurrency: each thread gets its own connection. SQLite runs in WAL mode (readers never block the
one writer; a writer waits for another's lock). Every catalogue change bumps ``catalogue_version``;
readers in any process, on any host, see the bump on their next ``refresh()`` and reload the
products. Events are numbered in the order they are stored (PostgreSQL: writers take the store's
lock in turn), so a worker that follows the log from a row number misses none.
"""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterable, Iterator
from pathlib import Path

from retrieval.engines import Engine, events_lock, open_engine
from retrieval.records import Event, Product

__all__ = ["Catalog", "events_lock"]

EPOCH_PREFIX = "epoch:"  # store_meta keys the service's workers count their announcements under


class Catalog:
    """``path``: the SQLite file (its folder is the store's); with ``url`` (``postgresql://…``) the
    tables live in that database instead and the folder keeps the rest of the store."""

    def __init__(self, path: Path, url: str | None = None):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.engine: Engine = open_engine(self.path, url)
        self._local = threading.local()
        self._connections: list = []
        self._connections_lock = threading.Lock()
        self.engine.create_schema(self._db)
        self._products: dict[str, Product] | None = None
        self._loaded_version: int | None = None

    @property
    def _db(self):
        db = getattr(self._local, "db", None)
        if db is None:
            db = self.engine.connect()
            self._local.db = db
            with self._connections_lock:
                self._connections.append(db)
        return db

    def _sql(self, statement: str) -> str:
        return self.engine.sql(statement)

    def _run(self, statement: str, args: tuple | list = ()):
        return self._db.execute(self._sql(statement), args)

    @contextlib.contextmanager
    def _transaction(self) -> Iterator:
        with self.engine.transaction(self._db) as db:
            yield db

    def __del__(self) -> None:  # a catalogue dropped without close() lets its connections go too
        with contextlib.suppress(Exception):
            self.close()

    def close(self) -> None:
        with self._connections_lock:
            for db in self._connections:
                db.close()
            self._connections.clear()
        self._local = threading.local()

    @contextlib.contextmanager
    def writing_events(self) -> Iterator:
        """A transaction that stores events: under the store's events lock (an erasure holds it
        exclusively, so no event of its subject lands between its delete and its proof)."""
        with self.engine.events_lock(self._db, exclusive=False), self._transaction() as db:
            yield db

    # -- catalogue ---------------------------------------------------------------------------
    def version(self) -> int:
        """Bumped by every catalogue change, in any process: part of every cached page's key."""
        return self._run("SELECT value FROM store_meta WHERE key = 'catalogue_version'").fetchone()[0]

    def _bump(self, db) -> None:
        db.execute(self._sql("UPDATE store_meta SET value = value + 1 WHERE key = 'catalogue_version'"))

    def upsert_products(self, products: Iterable[Product]) -> int:
        """Insert or update products; returns how many were new or changed (unchanged rows do not
        bump the catalogue version, so re-ingesting the same file keeps every cached page)."""
        rows = [(p.item_id, p.title, json.dumps(p.category_path), p.brand, p.price, p.description, p.stock)
                for p in products]
        with self._transaction() as db:
            changed = self.engine.changes(db, self._sql(
                "INSERT INTO products VALUES (?,?,?,?,?,?,?) ON CONFLICT(item_id) DO UPDATE SET "
                "title=excluded.title, category_path=excluded.category_path, brand=excluded.brand, "
                "price=excluded.price, description=excluded.description, stock=excluded.stock "
                "WHERE (products.title, products.category_path, products.brand, products.price, products.description, "
                "products.stock) IS DISTINCT FROM (excluded.title, excluded.category_path, excluded.brand, "
                "excluded.price, excluded.description, excluded.stock)"), rows)
            if changed:
                self._bump(db)
        self._products = None
        return changed

    def remove_products(self, item_ids: Iterable[str]) -> list[str]:
        """Remove products from the catalogue; their events stay (a history skips unknown items).
        Returns the ids that were there."""
        ids = list(dict.fromkeys(item_ids))
        with self._transaction() as db:
            exists = self._sql("SELECT 1 FROM products WHERE item_id = ?")
            found = [i for i in ids if db.execute(exists, (i,)).fetchone()]
            if found:
                self.engine.changes(db, self._sql("DELETE FROM products WHERE item_id = ?"), [(i,) for i in found])
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
            rows = self._run("SELECT item_id, title, category_path, brand, price, description, stock FROM products "
                             "ORDER BY item_id")
            products = {r[0]: Product(r[0], r[1], tuple(json.loads(r[2])), r[3], r[4], r[5], r[6]) for r in rows}
            self._products = products
        return products

    # -- events ------------------------------------------------------------------------------
    _INSERT_EVENT = ("INSERT INTO events (user_id, item_id, timestamp, seq_pos, event_type) VALUES (?,?,?,?,?) "
                     "ON CONFLICT DO NOTHING")

    def add_events(self, events: Iterable[Event]) -> int:
        """Insert events, ignoring exact duplicates; returns how many were new."""
        rows = [(e.user_id, e.item_id, e.timestamp, e.seq_pos, e.event_type) for e in events]
        with self.writing_events() as db:
            return self.engine.changes(db, self._sql(self._INSERT_EVENT), rows) if rows else 0

    def add_event(self, event: Event) -> int | None:
        """Insert one event; its row number when it was new, None when it was stored already."""
        with self.writing_events() as db:
            e = event
            row = db.execute(self._sql(self._INSERT_EVENT + " RETURNING {row}"),
                             (e.user_id, e.item_id, e.timestamp, e.seq_pos, e.event_type)).fetchone()
            return row[0] if row else None

    def last_row(self) -> int:
        """The newest event's row number (0: none)."""
        return self._run("SELECT COALESCE(MAX({row}), 0) FROM events").fetchone()[0]

    def events_after(self, row: int) -> list[tuple[int, Event]]:
        """Events stored after row number ``row``, in the order they were stored."""
        rows = self._run("SELECT {row}, user_id, item_id, timestamp, seq_pos, event_type FROM events "
                         "WHERE {row} > ? ORDER BY {row}", (row,))
        return [(r[0], Event(*r[1:])) for r in rows]

    def user_events(self, user_id: str, before_row: int | None = None) -> list[Event]:
        """A user's events, oldest first (by timestamp, then sequence position); with ``before_row``,
        only those stored before that row."""
        rows = self._run(
            "SELECT user_id, item_id, timestamp, seq_pos, event_type FROM events WHERE user_id = ? AND {row} < ? "
            "ORDER BY COALESCE(timestamp, 0), COALESCE(seq_pos, 0), {row}",
            (user_id, before_row if before_row is not None else 2**63 - 1),
        )
        return [Event(*r) for r in rows]

    def all_events(self) -> list[Event]:
        rows = self._run(
            "SELECT user_id, item_id, timestamp, seq_pos, event_type FROM events "
            "ORDER BY user_id, COALESCE(timestamp, 0), COALESCE(seq_pos, 0), {row}"
        )
        return [Event(*r) for r in rows]

    def event_count(self, user_id: str | None = None) -> int:
        if user_id is None:
            return self._run("SELECT COUNT(*) FROM events").fetchone()[0]
        return self._run("SELECT COUNT(*) FROM events WHERE user_id = ?", (user_id,)).fetchone()[0]

    def latest_time(self) -> float | None:
        """The latest event time in the store (None when events carry no timestamps)."""
        return self._run("SELECT MAX(timestamp) FROM events").fetchone()[0]

    # -- who the shoppers are ------------------------------------------------------------------
    def upsert_attributes(self, users: dict[str, dict[str, str]]) -> int:
        """Each user's attributes, replacing what was stored for them; returns how many users."""
        rows = [(u, json.dumps(a, sort_keys=True)) for u, a in users.items()]
        with self.writing_events() as db:
            if rows:
                upsert = ("INSERT INTO user_attributes VALUES (?, ?) ON CONFLICT(user_id) "
                          "DO UPDATE SET attributes = excluded.attributes")
                self.engine.changes(db, self._sql(upsert), rows)
        return len(users)

    def attributes(self, user_id: str) -> dict[str, str]:
        row = self._run("SELECT attributes FROM user_attributes WHERE user_id = ?", (user_id,)).fetchone()
        return json.loads(row[0]) if row else {}

    def all_attributes(self) -> dict[str, dict[str, str]]:
        return {u: json.loads(a) for u, a in self._run("SELECT user_id, attributes FROM user_attributes")}

    # -- pages made ahead (homepage precompute) ------------------------------------------------------
    def store_pages(self, rows: list[tuple[str, str, str]]) -> None:
        """(user id, key, page JSON) rows, replacing each user's earlier page; one transaction."""
        with self._transaction() as db:
            if rows:
                upsert = ("INSERT INTO pages VALUES (?, ?, ?) ON CONFLICT(user_id) DO UPDATE SET "
                          "cache_key = excluded.cache_key, page = excluded.page")
                self.engine.changes(db, self._sql(upsert), rows)

    def stored_page(self, user_id: str, key: str) -> str | None:
        """The user's page JSON if one was made under ``key`` (else None: none, or stale)."""
        row = self._run("SELECT page FROM pages WHERE user_id = ? AND cache_key = ?", (user_id, key)).fetchone()
        return row[0] if row else None

    def stored_page_keys(self, users: list[str] | None = None) -> dict[str, str]:
        """Each stored page's key, of ``users`` (default: every shopper)."""
        if users is None:
            return dict(self._run("SELECT user_id, cache_key FROM pages").fetchall())
        found: dict[str, str] = {}
        for start in range(0, len(users), 500):  # bound the statement's parameters
            part = users[start : start + 500]
            marks = ",".join("?" * len(part))
            found.update(self._run(f"SELECT user_id, cache_key FROM pages WHERE user_id IN ({marks})", part).fetchall())
        return found

    def users(self, limit: int | None = None) -> list[str]:
        sql = "SELECT user_id FROM events GROUP BY user_id ORDER BY COUNT(*) DESC, user_id"
        if limit:
            sql += f" LIMIT {int(limit)}"
        return [r[0] for r in self._run(sql)]

    # -- erasure (retrieval.erasure) ------------------------------------------------------------------
    @contextlib.contextmanager
    def erasing(self) -> Iterator[None]:
        """The events lock, held exclusively: no event is stored meanwhile, by any process or host."""
        with self.engine.events_lock(self._db, exclusive=True):
            yield

    def delete_rows(self, where: str, args: tuple, users: list[str], pages_of: list[str]) -> tuple[int, int, int]:
        """Delete events matching ``where``, the attributes of ``users`` and the pages of
        ``pages_of`` in one transaction; any removal bumps the catalogue version (every reader
        reloads: cached histories and pages go). Returns the three counts."""
        def of(users: list[str]) -> str:
            return f"user_id IN ({','.join('?' * len(users))})" if users else "FALSE"

        deletes = (("events", where, args), ("user_attributes", of(users), users), ("pages", of(pages_of), pages_of))
        with self._transaction() as db:
            counts = tuple(db.execute(self._sql(f"DELETE FROM {table} WHERE {condition}"), values).rowcount
                           for table, condition, values in deletes)
            if any(counts):
                self._bump(db)
        return counts

    def users_with_events_before(self, before: float) -> list[str]:
        return [r[0] for r in self._run("SELECT DISTINCT user_id FROM events WHERE timestamp < ?", (before,))]

    def compact(self) -> None:
        """Rewrite the tables without the space deleted rows held (PostgreSQL: ``VACUUM FULL``)."""
        self._run("VACUUM FULL events, user_attributes, pages" if self.engine.name == "postgresql" else "VACUUM")

    def holds_users(self, ids: set[str]) -> bool:
        """Whether any table keyed by user (events, attributes, precomputed pages) holds a row of ``ids``."""
        marks = ",".join("?" * len(ids))
        return any(self._run(f"SELECT 1 FROM {table} WHERE user_id IN ({marks}) LIMIT 1", sorted(ids)).fetchone()
                   for table in ("events", "user_attributes", "pages"))

    # -- what the service's workers announce to each other (agent.api) ---------------------------------
    def epochs(self) -> dict[str, int]:
        """How often each kind of change was announced (``reload``, ``events``, ``reopen``)."""
        rows = self._run("SELECT key, value FROM store_meta WHERE key LIKE ?", (EPOCH_PREFIX + "%",))
        return {key[len(EPOCH_PREFIX):]: value for key, value in rows}

    def announce(self, what: str) -> dict[str, int]:
        """Count one announcement of ``what``, atomically for every worker and host; returns the
        counts before it."""
        with self._transaction() as db:
            before = dict(db.execute(self._sql("SELECT key, value FROM store_meta WHERE key LIKE ?"),
                                     (EPOCH_PREFIX + "%",)).fetchall())
            db.execute(self._sql("INSERT INTO store_meta VALUES (?, 1) ON CONFLICT(key) DO UPDATE SET "
                                 "value = store_meta.value + 1"), (EPOCH_PREFIX + what,))
        return {key[len(EPOCH_PREFIX):]: value for key, value in before.items()}

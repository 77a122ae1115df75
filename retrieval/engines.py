"""The two engines a store's tables can live in: SQLite (one file, one host; the embedded default)
and PostgreSQL (one database every host of a shop shares). Each gives the catalogue connections,
transactions, its schema, its dialect's two differences from the statements as written, and the
lock that orders event writes against an erasure.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import sqlite3
from collections.abc import Iterator
from pathlib import Path

EVENTS_LOCK_FILE = ".events.lock"  # beside the catalogue file
_BUSY_MS = 30_000
# pg_advisory_lock keys are 64-bit integers: one fixed key per kind of lock, in this project's range
_EVENTS_LOCK_KEY = 0x686F6D65_70616765  # "homepage"
# in a store_url, the place of the store's own database name (see store_database)
STORE_PLACEHOLDER = "{store}"


@contextlib.contextmanager
def events_lock(store: Path, exclusive: bool) -> Iterator[None]:
    """SQLite stores: shared while events are added (any process, any thread: each call opens its
    own lock), exclusive while an erasure runs, so no event of its subject lands between its delete
    and its proof."""
    path = Path(store) / EVENTS_LOCK_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


class SQLiteEngine:
    """Tables in one file (WAL mode: readers never block the one writer, who waits for another's
    lock instead of failing)."""

    name = "sqlite"
    SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    item_id TEXT PRIMARY KEY, title TEXT NOT NULL, category_path TEXT NOT NULL, brand TEXT,
    price REAL, description TEXT, stock INTEGER
);
CREATE TABLE IF NOT EXISTS events (
    user_id TEXT NOT NULL, item_id TEXT NOT NULL, timestamp REAL, seq_pos INTEGER,
    event_type TEXT NOT NULL
);
-- The natural key: the same event ingested twice is stored once. NULLs are folded because a plain
-- UNIQUE constraint treats NULLs as distinct.
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

    def __init__(self, path: Path):
        self.path = Path(path)
        self.where = str(self.path)

    def connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=_BUSY_MS / 1000)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA busy_timeout={_BUSY_MS}")
        return db

    def create_schema(self, db: sqlite3.Connection) -> None:
        db.executescript(self.SCHEMA)

    def sql(self, statement: str) -> str:
        return statement.replace("{row}", "rowid")

    @contextlib.contextmanager
    def transaction(self, db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        with db:
            yield db

    def changes(self, db: sqlite3.Connection, statement: str, rows: list) -> int:
        before = db.total_changes
        db.executemany(statement, rows)
        return db.total_changes - before

    def events_lock(self, db, exclusive: bool):
        return events_lock(self.path.parent, exclusive)


class PostgresEngine:
    """Tables in a PostgreSQL database (``store_url``). Connections are in autocommit (a read sees
    every commit so far; a write is a transaction of its own). Event writes take the store's
    advisory lock in turn, on every host: rows are numbered in the order they commit, so a worker
    following the log by row number never skips one committed late."""

    name = "postgresql"
    SCHEMA = """
CREATE TABLE IF NOT EXISTS products (
    item_id TEXT COLLATE "C" PRIMARY KEY, title TEXT NOT NULL, category_path TEXT NOT NULL, brand TEXT,
    price DOUBLE PRECISION, description TEXT, stock INTEGER
);
CREATE TABLE IF NOT EXISTS events (
    row_id BIGSERIAL PRIMARY KEY, user_id TEXT COLLATE "C" NOT NULL, item_id TEXT COLLATE "C" NOT NULL,
    timestamp DOUBLE PRECISION, seq_pos BIGINT, event_type TEXT NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS events_key
    ON events (user_id, item_id, COALESCE(timestamp, -1), COALESCE(seq_pos, -1), event_type);
CREATE INDEX IF NOT EXISTS events_user ON events (user_id);
CREATE TABLE IF NOT EXISTS user_attributes (user_id TEXT COLLATE "C" PRIMARY KEY, attributes TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS pages (user_id TEXT COLLATE "C" PRIMARY KEY, cache_key TEXT NOT NULL, page TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS store_meta (key TEXT COLLATE "C" PRIMARY KEY, value BIGINT NOT NULL);
INSERT INTO store_meta VALUES ('catalogue_version', 0) ON CONFLICT DO NOTHING;
"""
    def __init__(self, url: str, store: Path | None = None):
        try:
            import psycopg
        except ImportError:
            raise _config_error("store_url names a PostgreSQL database: install the driver with "
                              "pip install 'homepage-composer[postgresql]'") from None
        self.psycopg = psycopg
        per_store = STORE_PLACEHOLDER in url  # one server, a database per store folder, made with the store
        self.url = url.replace(STORE_PLACEHOLDER, store_database(store)) if per_store else url
        self.where = _without_password(self.url)
        if per_store:
            self._create_database()

    def _create_database(self) -> None:
        from urllib.parse import urlsplit, urlunsplit

        parts = urlsplit(self.url)
        name = parts.path.lstrip("/")
        server = urlunsplit(parts._replace(path="/postgres"))
        try:
            with self.psycopg.connect(server, autocommit=True) as db:
                if db.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone() is None:
                    db.execute(f'CREATE DATABASE "{name}"')
        except self.psycopg.errors.DuplicateDatabase:
            pass  # another process made it first
        except self.psycopg.Error as exc:
            reason = " ".join(str(exc).split())
            raise _config_error(f"store_url {self.where}: cannot make the store's database ({reason})") from None

    def connect(self):
        try:
            return self.psycopg.connect(self.url, autocommit=True)
        except self.psycopg.OperationalError as exc:
            reason = " ".join(str(exc).split())
            raise _config_error(f"store_url {self.where}: cannot connect ({reason})") from None

    def create_schema(self, db) -> None:
        # two sessions creating the tables at once would race on the catalog: one at a time
        with db.transaction():
            db.execute("SELECT pg_advisory_xact_lock(%s)", (_EVENTS_LOCK_KEY + 1,))
            db.execute(self.SCHEMA)

    def sql(self, statement: str) -> str:
        return statement.replace("{row}", "row_id").replace("?", "%s")

    @contextlib.contextmanager
    def transaction(self, db) -> Iterator:
        with db.transaction():
            yield db

    def changes(self, db, statement: str, rows: list) -> int:
        with db.cursor() as cursor:
            cursor.executemany(statement, rows)
            return max(cursor.rowcount, 0)

    @contextlib.contextmanager
    def events_lock(self, db, exclusive: bool) -> Iterator[None]:
        """Held for the transaction that follows (or, for an erasure, until it ends): one event
        writer at a time on every host; an erasure waits for them and they for it."""
        del exclusive  # every holder is exclusive: the row order above needs it
        db.execute("SELECT pg_advisory_lock(%s)", (_EVENTS_LOCK_KEY,))
        try:
            yield
        finally:
            db.execute("SELECT pg_advisory_unlock(%s)", (_EVENTS_LOCK_KEY,))


Engine = SQLiteEngine | PostgresEngine


def _config_error(message: str) -> Exception:
    from agent.errors import ConfigError  # here: agent imports retrieval

    return ConfigError(message)


def _without_password(url: str) -> str:
    """The URL as it may be shown in errors and receipts."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@")
    return urlunsplit(parts._replace(netloc=netloc))


def store_database(store: Path) -> str:
    """The database a store folder's tables get under a ``{store}`` URL: its name, readable, and a
    digest of its absolute path, so two folders never share one (PostgreSQL names: ≤ 63 bytes)."""
    folder = Path(store).resolve()
    readable = re.sub(r"[^a-z0-9_]", "_", folder.name.lower())[:24]
    return f"homepage_{readable}_{hashlib.sha256(str(folder).encode()).hexdigest()[:16]}"


def open_engine(path: Path, url: str | None) -> Engine:
    if not url:
        return SQLiteEngine(path)
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresEngine(url, Path(path).parent)
    raise _config_error(f"store_url {_without_password(url)!r}: only postgresql://… is supported "
                      "(unset: the SQLite file in the store folder)")

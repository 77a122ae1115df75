"""Erasure that touches only its subject and is proven: a known user (or every event past the
retention age) taken out of each place the project writes, then a scan of all of it for what was
stored about them.

What is removed is found by structure, never by matching bytes: event rows whose user is the
subject, records of the per-user vector collection, JSON/JSONL/CSV records whose user field names
the subject and JSON entries keyed by them. No file is deleted because its bytes match; trained
models that saw the user (SASRec, LoRA adapters, merged models) are listed for retraining and left
in place. An id that names no user in the event store (a product id, a typo) is refused before
anything is touched.

Deleting is not erasing. SQLite keeps deleted rows in free pages and its write-ahead log until a
VACUUM and a checkpoint; chromadb (1.5) keeps a deleted record's vector in its HNSW files and its
text in its own SQLite file. So the event store is rewritten (``secure_delete``, VACUUM, WAL
checkpointed until empty) and every vector collection is rebuilt into a fresh folder from the
records that stay, which then replaces the old one (with the HNSW files' unused capacity zeroed:
chromadb writes it from uninitialised memory). A swap cut short by a crash is finished (or undone)
the next time the store is opened (``retrieval.vectors.recover_swap``).

On PostgreSQL (``store_url``) the rows are deleted in one transaction under the store's lock and
the tables rewritten (``VACUUM FULL``); the proof reads the tables again. What the server keeps
elsewhere (its write-ahead log, archives, replicas, backups) is on the database host, out of this
proof's reach: the receipt says so and is not ``clean``.

The proof scans the bytes of every file of the store and of every output folder for every form
the project writes an id in (raw, JSON-escaped, percent-encoded, the pseudonym), the erased
behaviour texts and vectors; an id too short for a byte scan to mean anything is proven by field
instead (every row, record and JSON entry read again), and the receipt says so.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import sqlite3
import time
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote, quote_plus

import numpy as np

from retrieval.catalog import Catalog, events_lock
from retrieval.retriever import CATALOG_FILE, CHROMA_DIR, RetrievalConfig

AUDIT_FILE = "privacy/audit.jsonl"
OUTPUTS_FILE = "privacy/outputs.txt"
USER_FIELDS = ("user_id", "user")  # field names that hold a user id in what the project writes
MIN_SCAN_CHARS = 6  # a shorter id occurs by chance in numbers and binary files: proven by field instead
_ID_CHARS = rb"A-Za-z0-9_.@:+\-"
_LINE_FILES = (".jsonl", ".ndjson")
_CHECKPOINT_TRIES = 50


class UnknownUser(ValueError):
    """An id that names no user in the event store: nothing is erased."""


class ErasureFailed(RuntimeError):
    """The erasure could not be completed (it says where); run it again."""


def _read_only(path: Path) -> sqlite3.Connection:
    """A connection that writes nothing: without a write-ahead log (every change is in the file)
    SQLite is told the file is immutable, else it would create the log and its index to read."""
    wal = path.with_name(path.name + "-wal").exists()
    return sqlite3.connect(f"file:{path}?mode=ro" + ("" if wal else "&immutable=1"), uri=True)


# -- who is erased ---------------------------------------------------------------------------------
def resolve_users(config: RetrievalConfig, given: Iterable[str]) -> dict[str, str]:
    """Each id as a caller knows it -> the id as stored, for users the event store knows. Reads
    only (the store stays byte-identical); raises ``UnknownUser`` naming every id it cannot find."""
    given = list(dict.fromkeys(given))
    path = Path(config.store_dir) / CATALOG_FILE
    privacy = config.privacy()
    stored = {g: privacy.stored_id(g) for g in given}
    known: set[str] = set()
    if config.store_url:
        catalog = config.open_catalog()
        try:
            known = {u for u in stored.values() if u is not None and (catalog.event_count(u) or catalog.attributes(u))}
        finally:
            catalog.close()
        path = catalog.engine.where
    elif path.exists():
        db = _read_only(path)
        try:
            for user in {s for s in stored.values() if s is not None}:
                if db.execute("SELECT 1 FROM events WHERE user_id = ? LIMIT 1", (user,)).fetchone() or \
                        _has_attributes(db, user):
                    known.add(user)
        finally:
            db.close()
    unknown = [g for g in given if stored[g] not in known]
    if unknown:
        raise UnknownUser(f"no user {', '.join(map(repr, unknown))} in the event store {path} (a product id, "
                          "or a user with neither events nor attributes): nothing was erased")
    return {g: stored[g] for g in given}


def _has_attributes(db: sqlite3.Connection, user: str) -> bool:
    try:
        return db.execute("SELECT 1 FROM user_attributes WHERE user_id = ?", (user,)).fetchone() is not None
    except sqlite3.OperationalError:  # a store made before attributes existed has no such table
        return False


# -- what was stored about a user ------------------------------------------------------------------
@dataclass
class Traces:
    """What a scan looks for: ids, texts and vectors stored for the erased users only (a text or
    vector another user also has is not a trace of these)."""

    ids: set[str] = field(default_factory=set)
    texts: set[str] = field(default_factory=set)
    vectors: list[np.ndarray] = field(default_factory=list)


@dataclass(frozen=True)
class Found:
    path: str
    what: str  # "id", "text", "vector", or "field" (an id read back by structure)


def id_forms(user_id: str) -> set[str]:
    """Every form the project (and the HTTP layer's logs) writes an id in."""
    return {user_id, json.dumps(user_id)[1:-1], json.dumps(user_id, ensure_ascii=False)[1:-1],
            quote(user_id, safe=""), quote(user_id), quote_plus(user_id)}


def _id_pattern(ids: set[str]) -> re.Pattern | None:
    forms = {form for i in ids if len(i) >= MIN_SCAN_CHARS for form in id_forms(i)}
    if not forms:
        return None
    alternatives = b"|".join(re.escape(i.encode()) for i in sorted(forms, key=len, reverse=True))
    # a full stop may end a sentence after an id, but "id.more" is another id
    after = rb"(?![" + _ID_CHARS.replace(rb".", b"") + rb"]|\.[A-Za-z0-9_])"
    return re.compile(rb"(?<![" + _ID_CHARS + rb"])(?:" + alternatives + rb")" + after)


def _has_vector(data: bytes, vector: np.ndarray, atol: float = 1e-5) -> bool:
    """Whether ``data`` holds ``vector`` (or its unit-length form) as float32 at any alignment."""
    forms = [np.asarray(vector, np.float32)]
    norm = float(np.linalg.norm(forms[0]))
    if norm > 0 and abs(norm - 1) > 1e-6:
        forms.append(forms[0] / norm)
    head = 8
    with np.errstate(all="ignore"):  # arbitrary bytes read as floats: NaN, inf
        return any(_at_some_offset(data, form, head, atol) for form in forms)


def _at_some_offset(data: bytes, form: np.ndarray, head: int, atol: float) -> bool:
    for offset in range(4):
        usable = (len(data) - offset) // 4
        if usable < len(form):
            continue
        values = np.frombuffer(data, np.float32, usable, offset)
        for start in np.flatnonzero(np.abs(values[: usable - len(form) + 1] - form[0]) <= atol):
            if np.allclose(values[start : start + head], form[:head], atol=atol, rtol=0) and np.allclose(
                    values[start : start + len(form)], form, atol=atol, rtol=0):
                return True
    return False


def _files(folders: Iterable[Path]) -> Iterator[Path]:
    for folder in folders:
        if Path(folder).exists():
            yield from (p for p in sorted(Path(folder).rglob("*")) if p.is_file())


def _apart(function, *args, **kwargs):
    """``function(*args, **kwargs)`` in a fresh process of its own (spawned: nothing of this
    process's memory or locks is inherited), its result or exception handed back."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(function, *args, **kwargs).result()


def scan_apart(folders: list[Path], traces: Traces) -> list[Found]:
    """``scan`` in a process of its own. Reading a SQLite file with plain ``open``/``close`` drops
    every POSIX lock this process holds on it (POSIX ties them to the process, not the descriptor):
    the next connection to close here then believes it is the last one and deletes the write-ahead
    log under the service's open connections ("disk I/O error" on every later query). A child
    process holds no lock to lose, and its CPU time does not hold this process's interpreter lock."""
    return _apart(scan, [Path(f) for f in folders], traces)


def scan(folders: list[Path], traces: Traces) -> list[Found]:
    """Every file under ``folders`` that still holds one of ``traces`` (bytes, not parsed). Ids
    shorter than ``MIN_SCAN_CHARS`` are left to ``field_scan``."""
    pattern = _id_pattern(traces.ids)
    texts = [t.encode() for t in traces.texts if t]
    found = []
    for path in _files(folders):
        data = path.read_bytes()
        if pattern is not None and pattern.search(data):
            found.append(Found(str(path), "id"))
        if any(t in data for t in texts):
            found.append(Found(str(path), "text"))
        if any(_has_vector(data, v) for v in traces.vectors):
            found.append(Found(str(path), "vector"))
    return found


# -- structure: which records are a user's ---------------------------------------------------------
def _names_user(value, ids: set[str], fields: frozenset[str]) -> bool:
    """Whether a parsed record holds one of the ids in a user field, at any depth."""
    if isinstance(value, dict):
        return any((k in fields and isinstance(v, str) and v in ids) or _names_user(v, ids, fields)
                   for k, v in value.items())
    if isinstance(value, list):
        return any(_names_user(v, ids, fields) for v in value)
    return False


_GONE = object()  # what pruning leaves of an entry about an erased user (JSON null stays null)


def _prune_json(value, ids: set[str], fields: frozenset[str] = frozenset(USER_FIELDS), users_list: bool = False):
    """JSON without the entries about the ids: keys that are one of them, objects whose user field
    is one of them, and the ids themselves in a list held under a key that names users."""
    if isinstance(value, dict):
        if any(k in fields and isinstance(v, str) and v in ids for k, v in value.items()):
            return _GONE
        return {k: p for k, v in value.items()
                if k not in ids and (p := _prune_json(v, ids, fields, "user" in k.lower())) is not _GONE}
    if isinstance(value, list):
        return [p for v in value if (p := _prune_json(v, ids, fields, users_list)) is not _GONE]
    return _GONE if users_list and isinstance(value, str) and value in ids else value


def _csv_user_rows(text: str, ids: set[str], fields: frozenset[str]) -> tuple[list[str], int] | None:
    """The file's lines without the rows whose user column is one of the ids (None: no user column)."""
    lines = text.splitlines(keepends=True)
    if not lines:
        return None
    header = next(csv.reader([lines[0]]))
    columns = [i for i, name in enumerate(header) if name in fields]
    if not columns:
        return None
    kept = [lines[0]]
    for line in lines[1:]:
        row = next(csv.reader([line]), [])
        if not any(i < len(row) and row[i] in ids for i in columns):
            kept.append(line)
    return kept, len(lines) - len(kept)


def _without_records(path: Path, ids: set[str], fields: frozenset[str]) -> tuple[bytes, int]:
    """A structured file's bytes without the ids' records (JSONL lines, CSV rows, JSON entries) and
    how many records that drops (a JSON file counts as one). Any other file is not even opened
    (see ``scan_apart``): (b"", 0)."""
    if path.suffix not in (*_LINE_FILES, ".csv", ".json"):
        return b"", 0
    data = path.read_bytes()
    if path.suffix in _LINE_FILES:
        lines = data.splitlines(keepends=True)
        kept = [line for line in lines if not _line_names(line, ids, fields)]
        return b"".join(kept), len(lines) - len(kept)
    if path.suffix == ".csv":
        result = _csv_user_rows(data.decode("utf-8", "replace"), ids, fields)
        return (data, 0) if result is None else ("".join(result[0]).encode(), result[1])
    try:
        value = json.loads(data)
    except ValueError:
        return data, 0
    pruned = _prune_json(value, ids, fields)
    if pruned == value:
        return data, 0
    return (json.dumps(None if pruned is _GONE else pruned, indent=2) + "\n").encode(), 1


def _remove_records(path: Path, ids: set[str], fields: frozenset[str]) -> int:
    """Take the ids' records out of one structured file, in place; returns how many went."""
    data, removed = _without_records(path, ids, fields)
    if removed:
        tmp = path.with_name(path.name + ".erasing")
        tmp.write_bytes(data)
        os.replace(tmp, path)
    return removed


def _line_names(line: bytes, ids: set[str], fields: frozenset[str]) -> bool:
    try:
        return _names_user(json.loads(line), ids, fields)
    except ValueError:
        return False


_CHROMA_USER_RECORDS = """
SELECT 1 FROM embeddings e JOIN segments s ON e.segment_id = s.id JOIN collections c ON s.collection = c.id
WHERE c.name = ? AND e.embedding_id IN ({marks})
UNION ALL SELECT 1 FROM embeddings_queue q JOIN collections c ON q.topic LIKE '%' || c.id
WHERE c.name = ? AND q.id IN ({marks}) LIMIT 1"""


def _rows_of(path: Path, sql: str, parameters: list[str]) -> bool:
    if not path.exists():
        return False
    db = _read_only(path)
    try:
        return db.execute(sql, parameters).fetchone() is not None
    finally:
        db.close()


def _user_rows(path: Path, ids: set[str]) -> bool:
    """Whether any table of the catalogue keyed by user (events, attributes, precomputed pages)
    still holds a row of ``ids``."""
    if not path.exists():
        return False
    marks = ",".join("?" * len(ids))
    db = _read_only(path)
    try:
        tables = {name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        return any(db.execute(f"SELECT 1 FROM {table} WHERE user_id IN ({marks}) LIMIT 1", sorted(ids)).fetchone()
                   for table in ("events", "user_attributes", "pages") if table in tables)
    finally:
        db.close()


def field_scan(folders: list[Path], stores: list[Path], ids: set[str], fields: frozenset[str],
               skip: set[Path], database: Catalog | None = None) -> list[Found]:
    """The proof by structure: every event row, per-user vector record and structured file read
    again for the ids (for ids too short for the byte scan, and as a second check for all)."""
    from retrieval.vectors import BEHAVIOUR

    found = []
    if database is not None and database.holds_users(ids):
        found.append(Found(database.engine.where, "field"))
    marks = ",".join("?" * len(ids))
    for store in stores:
        if _user_rows(store / CATALOG_FILE, ids):
            found.append(Found(str(store / CATALOG_FILE), "field"))
        # chromadb's own SQLite, read directly: loading a collection through chromadb would rewrite
        # its HNSW files from this process's memory
        if _rows_of(store / CHROMA_DIR / "chroma.sqlite3", _CHROMA_USER_RECORDS.format(marks=marks),
                    [BEHAVIOUR, *sorted(ids)] * 2):
            found.append(Found(str(store / CHROMA_DIR), "field"))
    found += [Found(str(path), "field") for path in _files(folders)
              if not any(path.is_relative_to(s) for s in skip) and _without_records(path, ids, fields)[1]]
    return found


# -- trained models: listed, never touched ---------------------------------------------------------
def trained_models(folders: list[Path]) -> list[Path]:
    """Folders holding a trained model: SASRec (``model.pt`` + ``items.json``), a LoRA adapter
    (``adapter_config.json``) or a merged model (``homepage_adapter.json`` naming ``merged_from``)."""
    found = set()
    for path in _files(folders):
        sasrec = path.name == "model.pt" and (path.parent / "items.json").exists()
        merged = path.name == "homepage_adapter.json" and "merged_from" in path.read_text("utf-8", "replace")
        if sasrec or merged or path.name == "adapter_config.json":
            found.add(path.parent)
    return sorted(found)


def _retrain_line(model: Path) -> str:
    if (model / "adapter_config.json").exists():
        return f"{model} (LoRA adapter): `homepage finetune CONFIG`"
    if (model / "homepage_adapter.json").exists():
        return f"{model} (merged model): `homepage finetune merge ADAPTER {model}` after retraining its adapter"
    return f"{model} (SASRec): `homepage train sasrec`"


# -- one store ---------------------------------------------------------------------------------------
def _checkpoint(db: sqlite3.Connection, path: Path) -> None:
    """Empty the write-ahead log into the file (deleted rows' old pages live there until then);
    retried while a reader holds it, and a failure is loud."""
    wal = path.with_name(path.name + "-wal")
    db.execute("PRAGMA busy_timeout=100")  # each try waits this long for readers to let go
    for _ in range(_CHECKPOINT_TRIES):
        busy, _, _ = db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
        if not busy and (not wal.exists() or wal.stat().st_size == 0):
            return
        time.sleep(0.1)
    raise ErasureFailed(f"{path}: its write-ahead log could not be emptied (a reader held it for "
                        f"{_CHECKPOINT_TRIES / 5:.0f} s); the deleted rows may still be in {wal}: run it again")


def _sqlite_erase(path: Path, where: str, args: tuple, users: Iterable[str] = (),
                  pages_of: Iterable[str] | None = None) -> tuple[int, int, int]:
    """Delete events matching ``where``, the attributes of ``users`` and the precomputed pages of
    ``pages_of`` (default: ``users``), and leave no copy of them in the file or its log. Returns
    (events removed, users whose attributes went, pages removed)."""
    users = sorted(users)
    pages_of = users if pages_of is None else sorted(pages_of)
    db = sqlite3.connect(path, timeout=30)
    try:
        db.execute("PRAGMA secure_delete=ON")  # freed pages are zeroed
        with db:
            removed = db.execute(f"DELETE FROM events WHERE {where}", args).rowcount
            attributes = _delete_users(db, "user_attributes", users)
            pages = _delete_users(db, "pages", pages_of)
            if removed or attributes or pages:  # every reader reloads: cached histories and pages go
                db.execute("UPDATE store_meta SET value = value + 1 WHERE key = 'catalogue_version'")
        db.execute("VACUUM")
        _checkpoint(db, path)
        return removed, attributes, pages
    finally:
        db.close()


def _delete_users(db: sqlite3.Connection, table: str, users: list[str]) -> int:
    """Rows of ``users`` deleted from ``table`` (a store made before the table existed has none)."""
    if not users or not db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (table,)).fetchone():
        return 0
    return db.execute(f"DELETE FROM {table} WHERE user_id IN ({','.join('?' * len(users))})", users).rowcount


def _collections(client) -> dict[str, tuple[dict, dict, dict]]:
    """name -> (metadata, configuration, records with embeddings, documents and metadatas)."""
    out = {}
    for collection in client.list_collections():
        records = collection.get(include=["embeddings", "documents", "metadatas"])
        with warnings.catch_warnings():  # chromadb calls a collection made without an embedding function "legacy"
            warnings.simplefilter("ignore", DeprecationWarning)
            hnsw = collection.configuration.get("hnsw")
        config = {"hnsw": hnsw} if hnsw else None
        out[collection.name] = (collection.metadata, config, records)
    return out


def _users_records(name: str, records: dict, users: set[str]) -> set[str]:
    """Record ids in a collection that belong to the users: the behaviour collection is keyed by
    user; in any other, only records whose metadata names the user (products are never a user's)."""
    from retrieval.vectors import BEHAVIOUR

    if name == BEHAVIOUR:
        return {r for r in records["ids"] if r in users}
    metadatas = records["metadatas"] or [None] * len(records["ids"])
    return {r for r, m in zip(records["ids"], metadatas, strict=True)
            if m and any(m.get(f) in users for f in USER_FIELDS)}


def _write_collections(client, collections: dict, drop: dict[str, set[str]], batch: int = 2048) -> Counter:
    removed: Counter = Counter()
    for name, (metadata, config, records) in collections.items():
        keep = [i for i, record_id in enumerate(records["ids"]) if record_id not in drop.get(name, set())]
        removed[name] = len(records["ids"]) - len(keep)
        collection = client.create_collection(name, metadata=metadata, configuration=config, embedding_function=None)
        for start in range(0, len(keep), batch):
            part = keep[start : start + batch]
            docs = records["documents"]
            collection.add(
                ids=[records["ids"][i] for i in part],
                embeddings=np.asarray([records["embeddings"][i] for i in part], dtype=np.float32),
                documents=None if docs is None or all(docs[i] is None for i in part) else [docs[i] or "" for i in part],
                metadatas=None if records["metadatas"] is None or all(records["metadatas"][i] is None for i in part)
                else [records["metadatas"][i] or None for i in part],
            )
    return removed


def rebuild_vectors(store: Path, users: set[str], host: str | None = None, port: int = 8000,
                    updates: dict[str, tuple[str, list[float], dict]] | None = None) -> tuple[Counter, Traces]:
    """Every collection rebuilt without the users' records, and with the behaviour texts in
    ``updates`` (user -> text, vector, metadata) replacing the old ones. Embedded: into a fresh
    folder that then replaces the old one (``retrieval.vectors.swap_in``), so nothing of the old
    files stays in the store. A server: collections are dropped and recreated (its files live on its
    host). Returns the records removed per collection and the texts and vectors gone that no
    remaining record shares."""
    import chromadb
    from chromadb.config import Settings

    from retrieval.vectors import BEHAVIOUR, chroma_client, close_embedded, swap_in, swap_lock, zero_unused_slots

    folder = Path(store) / CHROMA_DIR
    if not host and not folder.exists():
        return Counter(), Traces()
    client = chroma_client(folder, host, port)
    collections = _collections(client)
    drop = {name: _users_records(name, records, users) for name, (_, _, records) in collections.items()}
    if not updates and not any(drop.values()):
        return Counter(), Traces()  # nothing of theirs in it: no rebuild
    gone, kept_texts, kept_vectors = Traces(), set(), set()
    behaviour = collections.get(BEHAVIOUR, ({}, {}, {"ids": []}))[2]
    for record_id, (text, vector, metadata) in (updates or {}).items():
        if record_id in behaviour["ids"]:
            i = behaviour["ids"].index(record_id)
            gone.texts.add(behaviour["documents"][i])
            gone.vectors.append(np.asarray(behaviour["embeddings"][i], np.float32))
            behaviour["documents"][i], behaviour["embeddings"][i], behaviour["metadatas"][i] = text, vector, metadata
    for name, (_, _, records) in collections.items():
        documents = records["documents"] or [None] * len(records["ids"])
        for record_id, text, vector in zip(records["ids"], documents, records["embeddings"], strict=True):
            vector = np.asarray(vector, np.float32)
            if record_id in drop[name]:
                gone.texts.add(text)
                gone.vectors.append(vector)
            else:
                kept_texts.add(text)
                kept_vectors.add(vector.tobytes())
    gone.texts = {t for t in gone.texts if t and t not in kept_texts}
    gone.vectors = [v for v in gone.vectors if v.tobytes() not in kept_vectors]

    if host:
        for name in collections:
            client.delete_collection(name)
        return _write_collections(client, collections, drop), gone
    with swap_lock(folder):
        fresh = folder.with_name(CHROMA_DIR + ".rebuild")
        shutil.rmtree(fresh, ignore_errors=True)
        target = chromadb.PersistentClient(path=str(fresh), settings=Settings(anonymized_telemetry=False))
        removed = _write_collections(target, collections, drop)
        del client, target
        close_embedded(fresh)  # both folders' files closed before the swap
        close_embedded(folder)
        for header in fresh.glob("*/header.bin"):
            zero_unused_slots(header.parent)
        swap_in(folder, fresh)
    return removed, gone


@dataclass
class Receipt:
    """What an erasure removed where; no personal data (users appear as keyed hashes)."""

    action: str
    subjects: list[str]
    removed: Counter = field(default_factory=Counter)  # place -> records or lines
    retrain: list[str] = field(default_factory=list)  # trained models that saw the users, kept in place
    scanned: list[str] = field(default_factory=list)
    found: list[Found] = field(default_factory=list)
    vector_store: str = "embedded"
    database: str | None = None  # the PostgreSQL database the store's tables live in (None: SQLite)
    by_field_only: int = 0  # subjects whose id is too short for a byte scan: proven by field alone

    @property
    def not_scanned(self) -> list[str]:
        """Places the proof could not read: a vector-store server's files live on its host."""
        out = []
        if self.vector_store != "embedded":
            out.append(f"vector store server {self.vector_store}: its collections were rebuilt, its files were not "
                       "scanned (scan its data folder on its host)")
        if self.database:
            out.append(f"PostgreSQL database {self.database}: the rows were deleted and the tables rewritten (VACUUM "
                       "FULL), and no row is left; its write-ahead log, archives, replicas and backups keep the old "
                       "rows until they age out, on the database host: not scanned")
        return out

    @property
    def clean(self) -> bool:
        """Proven: nothing found, and every place scanned."""
        return not self.found and not self.not_scanned

    def record(self) -> dict:
        scan_result = ([f"{f.what}: {f.path}" for f in self.found] if self.found
                       else "incomplete" if self.not_scanned else "clean")
        return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": self.action,
                "subjects": self.subjects, "removed": dict(self.removed), "retrain": self.retrain,
                "scanned": self.scanned, "not_scanned": self.not_scanned, "vector_store": self.vector_store,
                "database": self.database, "by_field_only": self.by_field_only, "scan": scan_result}

    def lines(self) -> list[str]:
        out = [f"{self.action}: {len(self.subjects)} subject(s)"]
        out += [f"  removed {n} from {place}" for place, n in sorted(self.removed.items()) if n]
        out += [f"  needs retraining (left in place): {what}" for what in self.retrain]
        scope = ", ".join(self.scanned)
        out.append(f"  byte and field scan of {scope}: " + (
            "nothing found" if not self.found else
            "FOUND " + "; ".join(f"{f.what} in {f.path}" for f in self.found) +
            " (not a record the erasure can read by structure: remove or regenerate it, then run forget again)"))
        if self.by_field_only:
            out.append(f"  {self.by_field_only} id(s) shorter than {MIN_SCAN_CHARS} characters: a byte scan would "
                       "match unrelated numbers, so they were proven by field (rows, records, JSON entries) only")
        out += [f"  NOT PROVEN: {what}" for what in self.not_scanned]
        return out


def _erase_store(store: Path, ids: set[str], receipt: Receipt, traces: Traces, host: str | None, port: int,
                 database: Catalog | None = None) -> None:
    name = str(store)
    if database is not None:
        events, attributes, pages = database.delete_rows(f"user_id IN ({','.join('?' * len(ids))})",
                                                         tuple(sorted(ids)), sorted(ids), sorted(ids))
        database.compact()
        receipt.removed[f"{database.engine.where}: events"] += events
        receipt.removed[f"{database.engine.where}: user attributes"] += attributes
        receipt.removed[f"{database.engine.where}: precomputed pages"] += pages
    elif (store / CATALOG_FILE).exists():
        placeholders = ",".join("?" * len(ids))
        events, attributes, pages = _sqlite_erase(store / CATALOG_FILE, f"user_id IN ({placeholders})",
                                                  tuple(sorted(ids)), users=ids)
        receipt.removed[f"{name}: events"] += events
        receipt.removed[f"{name}: user attributes"] += attributes
        receipt.removed[f"{name}: precomputed pages"] += pages
    removed, found = rebuild_vectors(store, ids, host, port)
    for collection, n in removed.items():
        receipt.removed[f"{name}: vector collection {collection}"] += n
    traces.texts |= found.texts
    traces.vectors += found.vectors


def _erase_files(folders: list[Path], ids: set[str], fields: frozenset[str], receipt: Receipt,
                 skip: set[Path]) -> None:
    """Structured files lose the users' records; nothing else is touched."""
    for path in _files(folders):
        if not any(path.is_relative_to(s) for s in skip):
            receipt.removed[str(path)] += _remove_records(path, ids, fields)


def _models_that_saw(models: list[Path], ids: set[str], fields: frozenset[str]) -> list[str]:
    """Read before the erasure: an adapter is listed when the examples beside it hold the users (or
    there are none to tell); a merged model when the adapter it came from is listed or unknown;
    SASRec always (it is trained on every user of its store or data)."""

    def saw(adapter: Path) -> bool:
        examples = [p for p in (adapter.parent / "examples.jsonl", adapter.parent.parent / "examples.jsonl")
                    if p.exists()]
        return not examples or any(_line_names(line, ids, fields)
                                   for e in examples for line in e.read_bytes().splitlines())

    adapters = {m.resolve(): saw(m) for m in models if (m / "adapter_config.json").exists()}
    listed = []
    for model in models:
        if model.resolve() in adapters:
            if not adapters[model.resolve()]:
                continue
        elif (model / "homepage_adapter.json").exists():
            source = json.loads((model / "homepage_adapter.json").read_text()).get("merged_from", "")
            if not adapters.get(Path(source).resolve(), True):
                continue
        listed.append(_retrain_line(model))
    return listed


def _protected(store: Path, stores: list[Path], models: list[Path]) -> set[Path]:
    """Folders the file pass never rewrites: the stores' vector folders (rebuilt above), the audit
    log and keys (append-only, no personal data), trained models (listed, kept). SQLite files are
    never opened by it (not a structured suffix)."""
    return {s / CHROMA_DIR for s in stores} | {Path(store) / "privacy"} | set(models)


@contextmanager
def _store_lock(config: RetrievalConfig) -> Iterator[Catalog | None]:
    """The events lock, held exclusively while an erasure runs: the file lock beside a SQLite store
    (yields None), or the database's lock on PostgreSQL, for every host (yields its catalogue)."""
    if not config.store_url:
        with events_lock(config.store_dir, exclusive=True):
            yield None
        return
    database = config.open_catalog()
    try:
        with database.erasing():
            yield database
    finally:
        database.close()


def erase(config: RetrievalConfig, user_ids: list[str], outputs: list[Path] = (), action: str = "forget",
          user_fields: Iterable[str] = ()) -> Receipt:
    """Erase known users (ids as a caller knows them: an e-mail address finds its pseudonym) from
    the store of ``config`` and every output folder, append the receipt to the audit log, and prove
    it. An id the event store does not know raises ``UnknownUser`` before anything changes."""
    store, privacy, host, port = Path(config.store_dir), config.privacy(), config.chroma_host, config.chroma_port
    stored = set(resolve_users(config, user_ids).values())
    ids = stored | set(user_ids)
    fields = frozenset((*USER_FIELDS, *user_fields))
    receipt = Receipt(action, sorted(privacy.audit_subject(u) for u in stored),
                      vector_store=f"{host}:{port}" if host else "embedded")
    traces = Traces(ids=set(ids))
    folders = [store, *[Path(o) for o in outputs if Path(o).exists()]]
    with _store_lock(config) as database:
        receipt.database = database.engine.where if database else None
        # stores derived from this one (fine-tuning stores, ...) are SQLite files in the folders
        stores = sorted({p.parent for f in folders for p in f.rglob(CATALOG_FILE)} | ({store} if database else set()))
        models = trained_models(folders)
        receipt.retrain = _models_that_saw(models, ids, fields)
        for s in stores:
            main = s.resolve() == store.resolve()
            _erase_store(s, stored, receipt, traces, host if main else None, port, database if main else None)
        skip = _protected(store, stores, models)
        _erase_files(folders, ids, fields, receipt, skip)
        receipt.scanned = [str(f) for f in folders]
        receipt.by_field_only = sum(len(u) < MIN_SCAN_CHARS for u in ids)
        receipt.found = scan_apart(folders, traces) + field_scan(folders, stores, ids, fields, skip, database)
        audit(store, receipt)
    return receipt


def erase_apart(config: RetrievalConfig, user_ids: list[str], outputs: list[Path] = (),
                user_fields: Iterable[str] = ()) -> Receipt:
    """``erase`` in a process of its own, for a process that serves while it runs: chromadb's calls
    hold the interpreter lock for their whole length (a rebuild stalled the service's event loop for
    over a second), and what the erasure reads never enters the server's memory. The caller gives
    up the embedded vector store first (``retrieval.vectors.close_embedded``) and opens it again
    after; the events lock and the swap lock are file locks, held across processes."""
    return _apart(erase, config, list(user_ids), [Path(o) for o in outputs], user_fields=list(user_fields))


def audit(store: Path, receipt: Receipt) -> None:
    """Append-only: one JSON line per erasure, no personal data."""
    path = Path(store) / AUDIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(receipt.record(), sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def register_output(store: Path, folder: Path) -> None:
    """Remember a folder a command wrote (reports, fine-tuning stores, merged models) so erasure
    reaches it."""
    path = Path(store) / OUTPUTS_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    known = set(path.read_text().splitlines()) if path.exists() else set()
    entry = str(Path(folder).resolve())
    if entry not in known:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(entry + "\n")


def registered_outputs(store: Path) -> list[Path]:
    path = Path(store) / OUTPUTS_FILE
    return [Path(line) for line in path.read_text().splitlines() if line] if path.exists() else []


def erase_expired(config: RetrievalConfig, before: float, outputs: list[Path] = (),
                  user_fields: Iterable[str] = ()) -> Receipt:
    """Retention: every event older than ``before`` (unix seconds) erased the same way. A user with
    nothing left is erased everywhere; one with newer events keeps them, and their behaviour text is
    written again from what is left (the old text and vector go). Events without a timestamp (a
    sequence position only) cannot age and are kept."""
    from retrieval.ingest import behaviour_document
    from retrieval.vectors import LocalEmbeddings

    store, privacy, host, port = Path(config.store_dir), config.privacy(), config.chroma_host, config.chroma_port
    fields = frozenset((*USER_FIELDS, *user_fields))

    def erase_rows(where: str, args: tuple, users: Iterable[str] = (), pages_of: Iterable[str] = ()):
        if database is None:
            return _sqlite_erase(store / CATALOG_FILE, where, args, users, pages_of)
        counts = database.delete_rows(where, args, sorted(users), sorted(pages_of))
        database.compact()
        return counts

    with _store_lock(config) as database:
        catalog = database or Catalog(store / CATALOG_FILE)
        try:
            touched = catalog.users_with_events_before(before)
            # their precomputed pages were made from the events that go
            removed, _, _ = erase_rows("timestamp < ?", (before,), pages_of=touched)
            products = catalog.products
            left = {u: [products[e.item_id] for e in catalog.user_events(u) if e.item_id in products] for u in touched}
        finally:
            if database is None:
                catalog.close()
        gone = {u for u, items in left.items() if not items}
        if gone:  # nothing of theirs is left: who they are goes too
            receipt_attributes = erase_rows("FALSE", (), users=gone)[1]
        docs = {u: behaviour_document(items) for u, items in left.items() if items}  # as ingest writes them
        texts = [text for text, _ in docs.values()]
        vectors = LocalEmbeddings(config.embedding_model).embed_documents(texts) if docs else []
        updates = {u: (text, vector, meta) for (u, (text, meta)), vector in zip(docs.items(), vectors, strict=True)}
        receipt = Receipt("retention", sorted(privacy.audit_subject(u) for u in gone),
                          vector_store=f"{host}:{port}" if host else "embedded",
                          database=database.engine.where if database else None)
        receipt.removed[f"{store}: events older than {time.strftime('%Y-%m-%d', time.gmtime(before))}"] = removed
        receipt.removed[f"{store}: user attributes (no event left)"] = receipt_attributes if gone else 0
        collections, traces = rebuild_vectors(store, gone, host, port, updates)
        for collection, n in collections.items():
            receipt.removed[f"{store}: vector collection {collection}"] += n
        receipt.removed[f"{store}: behaviour texts rewritten"] = len(updates)
        traces.ids = set(gone)
        folders = [store, *[Path(o) for o in outputs if Path(o).exists()]]
        models = trained_models(folders)
        skip = _protected(store, [store], models)
        if gone:
            receipt.retrain = _models_that_saw(models, gone, fields)
            _erase_files(folders, gone, fields, receipt, skip)
        quarantine = store / "quarantine"
        for run in sorted(quarantine.iterdir()) if quarantine.exists() else []:
            if run.stat().st_mtime < before:  # rows kept aside are data too: a whole run aged out
                shutil.rmtree(run)
                receipt.removed[f"{run}: quarantined rows (run older than the retention age)"] += 1
        receipt.scanned = [str(f) for f in folders]
        receipt.by_field_only = sum(len(u) < MIN_SCAN_CHARS for u in gone)
        receipt.found = scan_apart(folders, traces) + (field_scan(folders, [store], gone, fields, skip, database)
                                                       if gone else [])
        audit(store, receipt)
    return receipt

"""Erasure that is proven: a user (or every event past the retention age) taken out of each place
the project writes, then a byte scan of all of it for what was stored about them.

Deleting is not erasing. SQLite keeps deleted rows in free pages and its write-ahead log until a
VACUUM and a checkpoint; chromadb (1.5) keeps a deleted record's vector in its HNSW files and its
text in its own SQLite file. So the event store is rewritten (``secure_delete``, VACUUM, WAL
truncated) and every vector collection is rebuilt into a fresh folder from the records that stay,
which then replaces the old one (with the HNSW files' unused capacity zeroed: chromadb writes it
from uninitialised memory). The scan looks for the ids, the behaviour texts and the
vectors (as float32, raw and normalised, within rounding) in every file of the store and of every
output folder; it is part of the receipt.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from retrieval.privacy import Privacy
from retrieval.retriever import CATALOG_FILE, CHROMA_DIR

AUDIT_FILE = "privacy/audit.jsonl"
OUTPUTS_FILE = "privacy/outputs.txt"
_ID_CHARS = rb"A-Za-z0-9_.@:+\-"


# -- what was stored about a user ---------------------------------------------------------------------
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
    what: str  # "id", "text" or "vector"


def _id_pattern(ids: set[str]) -> re.Pattern | None:
    if not ids:
        return None
    alternatives = b"|".join(re.escape(i.encode()) for i in sorted(ids, key=len, reverse=True))
    return re.compile(rb"(?<![" + _ID_CHARS + rb"])(?:" + alternatives + rb")(?![" + _ID_CHARS + rb"])")


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


def scan(folders: list[Path], traces: Traces) -> list[Found]:
    """Every file under ``folders`` that still holds one of ``traces`` (bytes, not parsed)."""
    pattern = _id_pattern(traces.ids)
    texts = [t.encode() for t in traces.texts if t]
    found = []
    for folder in folders:
        for path in sorted(Path(folder).rglob("*")) if Path(folder).exists() else []:
            if not path.is_file():
                continue
            data = path.read_bytes()
            if pattern is not None and pattern.search(data):
                found.append(Found(str(path), "id"))
            if any(t in data for t in texts):
                found.append(Found(str(path), "text"))
            if any(_has_vector(data, v) for v in traces.vectors):
                found.append(Found(str(path), "vector"))
    return found


# -- one store -------------------------------------------------------------------------------------
def _sqlite_erase(path: Path, where: str, args: tuple) -> int:
    """Delete events matching ``where`` and leave no copy of them in the file or its log."""
    db = sqlite3.connect(path, timeout=30)
    try:
        db.execute("PRAGMA secure_delete=ON")  # freed pages are zeroed
        with db:
            removed = db.execute(f"DELETE FROM events WHERE {where}", args).rowcount
        db.execute("VACUUM")
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        if removed:  # every reader reloads: cached histories and pages of the erased users go
            with db:
                db.execute("UPDATE store_meta SET value = value + 1 WHERE key = 'catalogue_version'")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return removed
    finally:
        db.close()


def _collections(client) -> dict[str, tuple[dict, dict, dict]]:
    """name -> (metadata, configuration, records with embeddings, documents and metadatas)."""
    out = {}
    for collection in client.list_collections():
        records = collection.get(include=["embeddings", "documents", "metadatas"])
        config = {"hnsw": collection.configuration.get("hnsw")} if collection.configuration.get("hnsw") else None
        out[collection.name] = (collection.metadata, config, records)
    return out


def _write_collections(client, collections: dict, drop: set[str], batch: int = 2048) -> Counter:
    removed: Counter = Counter()
    for name, (metadata, config, records) in collections.items():
        keep = [i for i, record_id in enumerate(records["ids"]) if record_id not in drop]
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


def rebuild_vectors(store: Path, drop: set[str], host: str | None = None, port: int = 8000,
                    updates: dict[str, tuple[str, list[float], dict]] | None = None) -> tuple[Counter, Traces]:
    """Every collection rebuilt without the records ``drop`` names, and with the behaviour texts in
    ``updates`` (id -> text, vector, metadata) replacing the old ones. Embedded: into a fresh folder
    that then replaces the old one, so nothing of the old files stays in the store. A server:
    collections are dropped and recreated (its files live on its host; scan them there). Returns the
    records removed per collection and the texts and vectors gone that no remaining record shares."""
    import chromadb
    from chromadb.config import Settings

    from retrieval.vectors import BEHAVIOUR, chroma_client, close_embedded, zero_unused_slots

    folder = Path(store) / CHROMA_DIR
    if not host and not folder.exists():
        return Counter(), Traces()
    client = chroma_client(folder, host, port)
    if not updates and not any(c.get(ids=sorted(drop), include=[])["ids"] for c in client.list_collections()):
        return Counter(), Traces()  # nothing of theirs in it: no rebuild
    collections = _collections(client)
    gone, kept_texts, kept_vectors = Traces(), set(), set()
    behaviour = collections.get(BEHAVIOUR, ({}, {}, {"ids": []}))[2]
    for record_id, (text, vector, metadata) in (updates or {}).items():
        if record_id in behaviour["ids"]:
            i = behaviour["ids"].index(record_id)
            gone.texts.add(behaviour["documents"][i])
            gone.vectors.append(np.asarray(behaviour["embeddings"][i], np.float32))
            behaviour["documents"][i], behaviour["embeddings"][i], behaviour["metadatas"][i] = text, vector, metadata
    for _, _, records in collections.values():
        documents = records["documents"] or [None] * len(records["ids"])
        for record_id, text, vector in zip(records["ids"], documents, records["embeddings"], strict=True):
            vector = np.asarray(vector, np.float32)
            if record_id in drop:
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
    fresh = folder.with_name(CHROMA_DIR + ".rebuild")
    shutil.rmtree(fresh, ignore_errors=True)
    target = chromadb.PersistentClient(path=str(fresh), settings=Settings(anonymized_telemetry=False))
    removed = _write_collections(target, collections, drop)
    del client, target
    close_embedded(fresh)  # both folders' files closed before the swap
    close_embedded(folder)
    for header in fresh.glob("*/header.bin"):
        zero_unused_slots(header.parent)
    old = folder.with_name(CHROMA_DIR + ".old")
    folder.rename(old)
    fresh.rename(folder)
    shutil.rmtree(old)
    return removed, gone


def _rewrite_lines(path: Path, pattern: re.Pattern) -> int:
    """Drop the lines of a line-based file that hold one of the ids; returns how many."""
    lines = path.read_bytes().splitlines(keepends=True)
    kept = [line for line in lines if not pattern.search(line)]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(b"".join(kept))
        os.replace(tmp, path)
    return len(lines) - len(kept)


_GONE = object()  # what pruning leaves of an entry about an erased user (JSON null stays null)


def _prune_json(value, ids: set[str]):
    """JSON without the entries keyed by, equal to, or (objects) holding one of the ids."""
    if isinstance(value, dict):
        if any(isinstance(v, str) and v in ids for v in value.values()):
            return _GONE
        return {k: p for k, v in value.items() if k not in ids and (p := _prune_json(v, ids)) is not _GONE}
    if isinstance(value, list):
        return [p for v in value if (p := _prune_json(v, ids)) is not _GONE]
    return _GONE if isinstance(value, str) and value in ids else value


@dataclass
class Receipt:
    """What an erasure removed where; no personal data (users appear as keyed hashes)."""

    action: str
    subjects: list[str]
    removed: Counter = field(default_factory=Counter)  # place -> records or lines
    deleted_files: list[str] = field(default_factory=list)
    retrain: list[str] = field(default_factory=list)  # trained artefacts that saw the users
    scanned: list[str] = field(default_factory=list)
    found: list[Found] = field(default_factory=list)
    vector_store: str = "embedded"

    @property
    def clean(self) -> bool:
        return not self.found

    def record(self) -> dict:
        return {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "action": self.action,
                "subjects": self.subjects, "removed": dict(self.removed), "deleted_files": self.deleted_files,
                "retrain": self.retrain, "scanned": self.scanned, "vector_store": self.vector_store,
                "scan": "clean" if self.clean else [f"{f.what}: {f.path}" for f in self.found]}

    def lines(self) -> list[str]:
        out = [f"{self.action}: {len(self.subjects)} subject(s)"]
        out += [f"  removed {n} from {place}" for place, n in sorted(self.removed.items()) if n]
        out += [f"  deleted {path}" for path in self.deleted_files]
        out += [f"  needs retraining: {what}" for what in self.retrain]
        scope = ", ".join(self.scanned)
        out.append(f"  byte scan of {scope}: " + ("nothing found" if self.clean else
                                                   "FOUND " + "; ".join(f"{f.what} in {f.path}" for f in self.found)))
        if self.vector_store != "embedded":
            out.append(f"  the vector store is a server ({self.vector_store}): its collections were rebuilt; "
                       "scan its data folder on its host")
        return out


def _erase_store(store: Path, ids: set[str], receipt: Receipt, traces: Traces, host: str | None, port: int) -> None:
    name = str(store)
    if (store / CATALOG_FILE).exists():
        placeholders = ",".join("?" * len(ids))
        receipt.removed[f"{name}: events"] += _sqlite_erase(store / CATALOG_FILE, f"user_id IN ({placeholders})",
                                                            tuple(sorted(ids)))
    removed, found = rebuild_vectors(store, ids, host, port)
    for collection, n in removed.items():
        receipt.removed[f"{name}: vector collection {collection}"] += n
    traces.texts |= found.texts
    traces.vectors += found.vectors
    if (store / "sasrec").exists():
        receipt.retrain.append(f"{store / 'sasrec'} (trained on every user's events): `homepage train sasrec`")


def _erase_files(folder: Path, ids: set[str], receipt: Receipt, skip: set[Path]) -> None:
    """Line files lose the users' lines, JSON the users' entries; any other file that still names
    a user is deleted (a report to run again)."""
    pattern = _id_pattern(ids)
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or any(path.is_relative_to(s) for s in skip):
            continue
        data = path.read_bytes()
        if not pattern.search(data):
            continue
        if path.suffix in (".jsonl", ".csv", ".ndjson"):
            receipt.removed[str(path)] += _rewrite_lines(path, pattern)
            if path.name == "examples.jsonl":
                adapters = sorted({str(p.parent) for p in path.parent.rglob("adapter_config.json")})
                receipt.retrain += [f"{a} (fine-tuned on examples of the user): `homepage finetune`" for a in adapters]
            continue
        if path.suffix == ".json":
            try:
                pruned = _prune_json(json.loads(data), ids)
                path.write_text(json.dumps(None if pruned is _GONE else pruned, indent=2) + "\n")
                receipt.removed[str(path)] += 1
                if not pattern.search(path.read_bytes()):
                    continue
            except ValueError:
                pass
        path.unlink()
        receipt.deleted_files.append(str(path))


def erase(privacy: Privacy, store: Path, user_ids: list[str], outputs: list[Path] = (),
          host: str | None = None, port: int = 8000, action: str = "forget") -> Receipt:
    """Erase users (ids as a caller knows them: an e-mail address finds its pseudonym) from the store
    and every output folder, append the receipt to the audit log, and scan for what is left."""
    store = Path(store)
    stored = {privacy.user_id(u) for u in user_ids}
    ids = stored | set(user_ids)
    receipt = Receipt(action, sorted(privacy.audit_subject(u) for u in stored),
                      vector_store=f"{host}:{port}" if host else "embedded")
    traces = Traces(ids=set(ids))
    folders = [store, *[Path(o) for o in outputs if Path(o).exists()]]
    stores = sorted({p.parent for f in folders for p in f.rglob(CATALOG_FILE)})
    for s in stores:
        _erase_store(s, stored, receipt, traces, host if s.resolve() == store.resolve() else None, port)
    for folder in folders:
        _erase_files(folder, ids, receipt, skip={s / CATALOG_FILE for s in stores} | {s / CHROMA_DIR for s in stores})
    receipt.scanned = [str(f) for f in folders]
    receipt.found = scan(folders, traces)
    audit(store, receipt)
    return receipt


def expired_users(store: Path, before: float) -> list[str]:
    db = sqlite3.connect(Path(store) / CATALOG_FILE)
    try:
        return [r[0] for r in db.execute("SELECT DISTINCT user_id FROM events WHERE timestamp < ?", (before,))]
    finally:
        db.close()


def audit(store: Path, receipt: Receipt) -> None:
    """Append-only: one JSON line per erasure, no personal data."""
    path = Path(store) / AUDIT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(receipt.record(), sort_keys=True) + "\n")
        fh.flush()
        os.fsync(fh.fileno())


def register_output(store: Path, folder: Path) -> None:
    """Remember a folder a command wrote (reports, fine-tuning stores) so erasure reaches it."""
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


def erase_expired(privacy: Privacy, store: Path, before: float, embedding_model: str, outputs: list[Path] = (),
                  host: str | None = None, port: int = 8000) -> Receipt:
    """Retention: every event older than ``before`` (unix seconds) erased the same way. A user with
    nothing left is erased everywhere; one with newer events keeps them, and their behaviour text is
    written again from what is left (the old text and vector go). Events without a timestamp (a
    sequence position only) cannot age and are kept."""
    from retrieval.catalog import Catalog
    from retrieval.ingest import behaviour_document
    from retrieval.vectors import LocalEmbeddings

    store = Path(store)
    catalog = Catalog(store / CATALOG_FILE)
    try:
        touched = expired_users(store, before)
        removed = _sqlite_erase(store / CATALOG_FILE, "timestamp < ?", (before,))
        products = catalog.products
        left = {u: [products[e.item_id] for e in catalog.user_events(u) if e.item_id in products] for u in touched}
    finally:
        catalog.close()
    gone = {u for u, items in left.items() if not items}
    docs = {u: behaviour_document(items) for u, items in left.items() if items}  # as ingest writes them
    vectors = LocalEmbeddings(embedding_model).embed_documents([text for text, _ in docs.values()]) if docs else []
    updates = {u: (text, vector, meta) for (u, (text, meta)), vector in zip(docs.items(), vectors, strict=True)}
    receipt = Receipt("retention", sorted(privacy.audit_subject(u) for u in gone),
                      vector_store=f"{host}:{port}" if host else "embedded")
    receipt.removed[f"{store}: events older than {time.strftime('%Y-%m-%d', time.gmtime(before))}"] = removed
    collections, traces = rebuild_vectors(store, gone, host, port, updates)
    for collection, n in collections.items():
        receipt.removed[f"{store}: vector collection {collection}"] += n
    receipt.removed[f"{store}: behaviour texts rewritten"] = len(updates)
    traces.ids = set(gone)
    folders = [store, *[Path(o) for o in outputs if Path(o).exists()]]
    if gone:
        for folder in folders:
            _erase_files(folder, gone, receipt, skip={store / CATALOG_FILE, store / CHROMA_DIR})
    quarantine = store / "quarantine"
    for run in sorted(quarantine.iterdir()) if quarantine.exists() else []:
        if run.stat().st_mtime < before:  # rows kept aside are data too
            shutil.rmtree(run)
            receipt.deleted_files.append(str(run))
    receipt.scanned = [str(f) for f in folders]
    receipt.found = scan(folders, traces)
    audit(store, receipt)
    return receipt

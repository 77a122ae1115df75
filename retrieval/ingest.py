"""Ingestion: catalogue and events files -> catalogue/event store + vector collections.

Idempotent: products and user documents are upserted by id (and only re-embedded when their text
changed; a changed price or stock updates the vector store's metadata without re-embedding); events
are keyed by their natural key, so a rerun adds nothing twice. Each run keeps its rejected rows in
a folder of its own, ``quarantine/<UTC time>-<pid>-<run>/``.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from retrieval.catalog import Catalog
from retrieval.columns import CatalogueColumns, EventColumns, UserColumns
from retrieval.history import summarise
from retrieval.loading import LoadReport, load_events, load_products, load_users
from retrieval.records import Product
from retrieval.retriever import CHROMA_DIR, RetrievalConfig
from retrieval.vectors import BEHAVIOUR, PRODUCTS, LocalEmbeddings, VectorIndex, chroma_client


@dataclass
class IngestReport:
    catalogue: LoadReport | None
    events: LoadReport
    new_events: int
    embedded_products: int
    embedded_users: int
    users: LoadReport | None = None  # the users file's attributes, when one was given

    def lines(self) -> list[str]:
        return [
            *([str(self.catalogue)] if self.catalogue else []),
            str(self.events),
            *([str(self.users)] if self.users else []),
            f"events new in the store: {self.new_events}",
            f"embedded: {self.embedded_products} products, {self.embedded_users} user behaviour texts "
            "(unchanged texts are skipped)",
        ]


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def behaviour_document(items: list[Product]) -> tuple[str, dict]:
    """A user's behaviour text from their products, and the metadata stored with it (the digest lets
    a later ingest skip an unchanged text)."""
    text = summarise(items)
    return text, {"events": len(items), "digest": _digest(text)}


def _upsert_changed(index: VectorIndex, name: str, docs: dict[str, tuple[str, dict]], progress: bool) -> int:
    """Embed only the documents that are new or whose text changed since the last ingest; where
    only the metadata changed (price, stock), update it in place. Returns how many were embedded."""
    existing = index.stores[name].get(ids=list(docs), include=["metadatas"]) if docs else {"ids": []}
    old = dict(zip(existing["ids"], (m or {} for m in existing.get("metadatas") or []), strict=False))
    wanted = {i: {**meta, "digest": _digest(text)} for i, (text, meta) in docs.items()}
    embed = [i for i in docs if old.get(i, {}).get("digest") != wanted[i]["digest"]]
    if embed:
        index.upsert(name, embed, [docs[i][0] for i in embed], [wanted[i] for i in embed], progress=progress)
    retag = [i for i in docs if i in old and i not in embed and old[i] != wanted[i]]
    if retag:
        index.stores[name]._collection.update(ids=retag, metadatas=[wanted[i] for i in retag])
    return len(embed)


def _product_metadata(p) -> dict:
    return {"title": p.title, "brand": p.brand or "", "department": p.department, "category": p.category,
            "price": p.price if p.price is not None else -1.0, "in_stock": p.in_stock}


_RUNS = itertools.count(1)


def run_quarantine_dir(store: Path) -> Path:
    """This run's own quarantine folder (time, process, run in the process): earlier runs'
    rejected rows are never overwritten."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return Path(store) / "quarantine" / f"{stamp}-{os.getpid()}-{next(_RUNS)}"


def remove_products(config: RetrievalConfig, item_ids: list[str]) -> list[str]:
    """Take products out of the catalogue and the vector store; returns the ids that were there.
    Their events stay (histories skip products that are gone); cached pages see the new catalogue
    version and are recomposed."""
    store = Path(config.store_dir)
    catalog = config.open_catalog()
    try:
        if not any(catalog.products.get(i) for i in item_ids):
            return []
        client = chroma_client(store / CHROMA_DIR, config.chroma_host, config.chroma_port)
        return delete_products(catalog, VectorIndex(client, LocalEmbeddings(config.embedding_model)), item_ids)
    finally:
        catalog.close()


# A catalogue write touches two stores, SQLite first. A process that stops between the two leaves the
# vector store behind; it follows the catalogue again on the write's retry (each write brings every
# product it names up to date, changed or not) and at the next start (``repair_products``).
def delete_products(catalog: Catalog, index: VectorIndex, item_ids: list[str]) -> list[str]:
    """``remove_products`` on stores already open (a running service's)."""
    removed = catalog.remove_products(item_ids)
    gone = [i for i in item_ids if i not in catalog.products]
    if gone:  # also those the catalogue had already lost
        index.stores[PRODUCTS].delete(ids=gone)
    return removed


def update_products(catalog: Catalog, index: VectorIndex, products: list[Product]) -> int:
    """Insert or update products in the catalogue and the vector store (a changed text is embedded
    again; a changed price or stock only retags); returns how many were new or changed."""
    changed = catalog.upsert_products(products)
    if products:
        _upsert_changed(index, PRODUCTS, {p.item_id: (p.text(), _product_metadata(p)) for p in products}, False)
    return changed


def repair_products(catalog: Catalog, index: VectorIndex) -> tuple[int, int]:
    """The products collection made to match the catalogue (at a service's start): products missing
    or stale there are embedded, ones the catalogue no longer has deleted. Returns (embedded, deleted)."""
    catalog.refresh()
    products = catalog.products
    embedded = _upsert_changed(index, PRODUCTS, {i: (p.text(), _product_metadata(p)) for i, p in products.items()},
                               False)
    orphans = [i for i in index.stores[PRODUCTS].get(include=[])["ids"] if i not in products]
    if orphans:
        index.stores[PRODUCTS].delete(ids=orphans)
    return embedded, len(orphans)


def ingest(
    config: RetrievalConfig,
    catalogue_path: Path,
    events_path: Path,
    catalogue_columns: CatalogueColumns | None = None,
    event_columns: EventColumns | None = None,
    progress: bool = True,
    events_only: bool = False,
    users_path: Path | None = None,
    user_columns: UserColumns | None = None,
) -> IngestReport:
    """Load both files into the stores. ``events_only``: add the events file to the event store
    alone (SQLite, safe from any process while another owns the embedded vector store); the
    behaviour texts are refreshed by the next full ingest. ``users_path``: who the shoppers are
    (attributes), stored beside their events, never embedded."""
    store = Path(config.store_dir)
    quarantine_dir = run_quarantine_dir(store)
    catalog, client = config.open_catalog(), None
    try:
        products, catalogue_report = [], None
        if not events_only:
            products, catalogue_report = load_products(
                Path(catalogue_path), catalogue_columns or CatalogueColumns(), quarantine_dir
            )
            catalog.upsert_products(products)
        known = set(catalog.products)
        events, events_report = load_events(
            Path(events_path), event_columns or EventColumns(), known, quarantine_dir, config.privacy()
        )
        new_events = catalog.add_events(events)
        users_report = None
        if users_path is not None:
            users, users_report = load_users(Path(users_path), user_columns or UserColumns(), quarantine_dir,
                                             config.privacy())
            catalog.upsert_attributes(users)
        if events_only:
            return IngestReport(None, events_report, new_events, 0, 0, users_report)

        client = chroma_client(store / CHROMA_DIR, config.chroma_host, config.chroma_port)
        index = VectorIndex(client, LocalEmbeddings(config.embedding_model))
        product_docs = {p.item_id: (p.text(), _product_metadata(p)) for p in products}
        embedded_products = _upsert_changed(index, PRODUCTS, product_docs, progress)

        by_user: dict[str, list] = defaultdict(list)
        for e in catalog.all_events():
            if e.item_id in catalog.products:  # a removed product's events stay, unsummarised
                by_user[e.user_id].append(catalog.products[e.item_id])
        user_docs = {user: behaviour_document(items) for user, items in by_user.items()}
        embedded_users = _upsert_changed(index, BEHAVIOUR, user_docs, progress)
    finally:
        catalog.close()
        if client is not None and config.chroma_host:  # a server's connections; the embedded store stays open
            client.close()
    return IngestReport(catalogue_report, events_report, new_events, embedded_products, embedded_users,
                        users_report)

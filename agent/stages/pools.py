"""The pools stage: the candidates each module offers the model (its pool), and what
configuration fixes in it (pinned items, sponsored slots, campaign items).

Every pick of distinct handles from a pool keeps the item rules, under any engine: a candidate is
offered to one module only (modules cannot repeat each other), excluded and out-of-stock items
never enter, and a pool holds at most the per-module brand quota of a brand (``BrandQuota``). An
item the quota refuses waits for a later module: behind the module's other items, or, where the
module ``keep_order``, at the head of the next one (the module closes early).

A module is filled honestly: only ``personal`` and ``popularity`` modules may be topped up with
popular items; a module whose own source cannot fill it to its minimum is left off this user's
page (``Pools.notes`` says why) rather than shown under a title its items do not match.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from agent.rules import BrandQuota, Rules
from agent.schema import PlannedTheme
from agent.skeleton import PERSONAL, PLANNED, ModuleSpec, Skeleton
from retrieval import Candidate, History, Provenance, Retriever
from retrieval.retriever import FUSION_DEPTH
from retrieval.vectors import PRODUCTS

POOL_DEPTH = 60  # fused candidates the modules draw from (each source retrieved FUSION_DEPTH deep)
# module sources for which popular items are honest
TOPPED_UP = frozenset({PERSONAL, "popularity", "segment_popularity"})


@dataclass
class ModulePool:
    spec: ModuleSpec
    title: str  # the copy when the model writes none: the planned theme's title, else the configured one
    candidates: list[Candidate] = field(default_factory=list)  # offered to the model; handle h is [h - 1]
    pinned: list[str] = field(default_factory=list)  # configured items shown first (campaign: all its items)
    ads: list[str] = field(default_factory=list)  # sponsored items placed in this module

    @property
    def written(self) -> bool:
        """Whether the model writes this module (campaigns are configuration alone)."""
        return not self.spec.is_campaign

    def count(self, rules: Rules) -> int:
        """How many candidates the model picks: the module's fill minus what configuration fixes."""
        high = min(self.spec.max_items, rules.max_items_per_module) - len(self.pinned) - len(self.ads)
        return max(min(high, len(self.candidates)), 0)


@dataclass
class Pools:
    modules: list[ModulePool]  # the modules on this user's page, in page order
    reserve: list[Candidate]  # popular items: top-ups of the modules that may show them
    themes: dict[str, PlannedTheme] = field(default_factory=dict)  # module type -> plan, if planned
    notes: list[str] = field(default_factory=list)  # modules left off this user's page, and why
    faults: list[str] = field(default_factory=list)  # sources that failed: the page is degraded

    def written(self) -> list[ModulePool]:
        return [m for m in self.modules if m.written]


def _available(item: str, retriever: Retriever, skeleton: Skeleton) -> bool:
    product = retriever.products.get(item)
    return product is not None and product.in_stock and not skeleton.excludes(product)


def _theme_search(retriever: Retriever, history: History, query: str, k: int) -> list[Candidate]:
    """A planned theme's candidates: products whose text is nearest the theme's query."""
    index = retriever.index
    vector = np.asarray(index.embeddings.embed_query(query))
    seen = set(history.item_ids)
    hits = [(i, s) for i, s in index.search(PRODUCTS, vector, k + len(seen)) if i not in seen][:k]
    return [Candidate(i, s, [Provenance("theme", s, rank, query)]) for rank, (i, s) in enumerate(hits)]


def _retrieve(retriever: Retriever, history: History, names: list[str], faults: list[str]) -> dict:
    """Each source once; a source that fails (its vector store unreachable, ...) gives nothing and
    a note, and the page is built from the others."""
    found = {}
    for name in names:
        try:
            found[name] = retriever.source(name).candidates(history, FUSION_DEPTH)
        except Exception as exc:  # any failure of one source must not cost the page
            found[name] = []
            faults.append(f"source {name} failed: {type(exc).__name__}: {exc}"[:300])
    return found


def build_pools(retriever: Retriever, rules: Rules, skeleton: Skeleton, history: History,
                themes: dict[str, PlannedTheme] | None = None) -> Pools:
    themes = themes or {}
    notes: list[str] = []
    faults: list[str] = []
    wanted = {m.candidate_source for m in skeleton.modules} - {None}
    per_source = _retrieve(retriever, history, sorted(wanted | set(retriever.weights) | {"popularity"}), faults)
    if history.is_cold:  # who they are, where the shop knows it and the source is configured; else everyone's
        personal = per_source.get("segment_popularity") or per_source["popularity"]
    else:
        personal = retriever.fused(history, {n: per_source[n] for n in retriever.weights}, POOL_DEPTH)
    reserve = [c for c in per_source["popularity"] if _available(c.item_id, retriever, skeleton)]

    taken = {i for m in skeleton.modules for i in [*m.items, *m.pinned]} | set(skeleton.sponsored_items)
    owned = set(history.item_ids)
    sponsored = [i for i in skeleton.sponsored_items if _available(i, retriever, skeleton)]
    quota = skeleton.max_sponsored
    modules = []
    for spec in skeleton.modules:
        low = max(spec.min_items, rules.min_items_per_module)
        if spec.is_campaign:
            items = [i for i in spec.items if _available(i, retriever, skeleton)]
            if len(items) < low:
                notes.append(f"module {spec.type} left off: {len(items)} of its campaign items are available")
                continue
            modules.append(ModulePool(spec, spec.title, pinned=items))
            continue
        theme = themes.get(spec.type)
        module = ModulePool(spec, theme.title if theme else spec.title,
                            pinned=[i for i in spec.pinned if _available(i, retriever, skeleton)])
        slots = min(spec.sponsored_slots, quota, len(sponsored))
        module.ads, sponsored, quota = sponsored[:slots], sponsored[slots:], quota - slots
        if spec.source == PLANNED:
            try:
                source = _theme_search(retriever, history, theme.query if theme else spec.query, 30)
            except Exception as exc:
                source = []
                faults.append(f"theme search for {spec.type} failed: {type(exc).__name__}: {exc}"[:300])
        else:
            source = personal if spec.source == PERSONAL else per_source[spec.source]
        brands = BrandQuota(rules.max_items_per_brand, retriever.products, [*module.pinned, *module.ads])
        for candidate in [*source, *(reserve if spec.source in TOPPED_UP else [])]:
            if len(module.candidates) == spec.pool_size:
                break
            item = candidate.item_id
            if item in taken or not _available(item, retriever, skeleton) or (item in owned and not spec.show_owned):
                continue
            if not brands.admits(item):  # a brand over quota is left for a later module
                if spec.keep_order and len(module.pinned) + len(module.ads) + len(module.candidates) >= low:
                    break  # it opens the next module rather than waiting behind the items after it
                continue
            module.candidates.append(candidate)
            taken.add(item)
            brands.add(item)
        if len(module.pinned) + len(module.ads) + module.count(rules) < low:
            notes.append(f"module {spec.type} left off: its source ({spec.source}) found "
                         f"{len(module.candidates)} usable candidates, it needs {low}")
            taken.difference_update(c.item_id for c in module.candidates)
            sponsored, quota = module.ads + sponsored, quota + len(module.ads)
            continue
        modules.append(module)
    return Pools(modules, reserve, {t: v for t, v in themes.items() if any(m.spec.type == t for m in modules)},
                 notes, faults)

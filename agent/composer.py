"""The composer agent: plan -> retrieve -> compose -> check -> repair -> Homepage, within a time
budget, with a deterministic path as the fallback and a per-user page cache.

Every model step is schema-constrained: the plan (a title and a search query per planned module)
and the draft (a title and item handles per module). What configuration fixes — campaign modules,
pinned items, sponsored slots — is placed by code, never by the model.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from pydantic import ValidationError

from agent.backends import Generation, LLMBackend
from agent.cache import PageCache
from agent.errors import BackendError, InputError
from agent.prompting import Prompt
from agent.reasons import reason
from agent.rules import ModuleBody, PageBody, RuleContext, Rules, fix, validate
from agent.schema import (
    Homepage,
    PageDraft,
    PageItem,
    PageMeta,
    PageModule,
    PlanDraft,
    PlannedTheme,
    Violation,
    draft_json_schema,
    plan_json_schema,
)
from agent.skeleton import ModuleSpec, Skeleton
from retrieval import Candidate, Event, History, Provenance, Retriever
from retrieval.vectors import PRODUCTS

_USER_ID = re.compile(r"^[\w.@:+-]{1,128}$")


def check_user_id(user_id: object) -> str:
    if not isinstance(user_id, str) or not user_id.strip():
        raise InputError("user id is empty")
    user_id = user_id.strip()
    if not _USER_ID.match(user_id):
        raise InputError(f"user id {user_id[:40]!r} is malformed: expected 1-128 letters, digits or ._@:+-")
    return user_id


@dataclass
class Pools:
    """Per module, the candidates offered to the model; module k's handle h is ``modules[k][h - 1]``."""

    modules: list[list[Candidate]]
    reserve: list[Candidate]  # popular items the deterministic fix tops up from
    themes: dict[str, PlannedTheme] = field(default_factory=dict)  # module type -> plan, if planned


@dataclass
class Attempt:
    """One user's page in the making."""

    user_id: str
    history: History
    started: float
    version: int
    themes: dict[str, PlannedTheme] = field(default_factory=dict)
    pools: Pools | None = None
    generations: list[Generation] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    fixed: list[Violation] = field(default_factory=list)
    per_call: list[int] = field(default_factory=list)
    body: PageBody | None = None
    fallback_reason: str | None = None


class Composer:
    def __init__(self, retriever: Retriever, backend: LLMBackend | None, prompts: dict[str, Prompt], rules: Rules,
                 skeleton: Skeleton, max_new_tokens: int = 160, llm_retry: bool = True,
                 budget_s: float | None = 4.0, cache: PageCache | None = None):
        self.retriever, self.backend, self.prompts = retriever, backend, prompts
        self.rules, self.skeleton = rules, skeleton
        self.max_new_tokens, self.llm_retry, self.budget_s = max_new_tokens, llm_retry, budget_s
        self.cache = cache if cache is not None else PageCache()
        self.ctx = RuleContext(rules, retriever.products, skeleton)
        self._llm_modules = [m for m in skeleton.modules if m.source != "campaign"]
        self._planned = [m for m in skeleton.modules if m.source == "planned"]

    # -- public ---------------------------------------------------------------------------------
    def compose(self, user_id: str, use_llm: bool = True, use_cache: bool = True) -> Homepage:
        """One page. The LLM path runs within the time budget; past it, or when the backend fails,
        the deterministic path answers and ``meta`` says so. Cached until the user's events change."""
        attempt = self._start(user_id)
        if use_cache and (page := self.cache.get(attempt.user_id, attempt.version)) is not None:
            latency = round((time.perf_counter() - attempt.started) * 1000, 2)
            return page.model_copy(update={"meta": page.meta.model_copy(update={"source": "cache",
                                                                                "latency_ms": latency})})
        deadline = None if self.budget_s is None else time.monotonic() + self.budget_s
        if use_llm and self.backend is not None:
            try:
                self._llm_path(attempt, deadline)
            except BackendError as exc:
                attempt.fallback_reason = str(exc)
                attempt.body = None
        else:
            attempt.fallback_reason = "deterministic composer requested"
        return self._finish(attempt)

    def compose_batch(self, user_ids: list[str], batch_size: int = 8) -> list[Homepage]:
        """Batch precompute: the LLM steps of several users share forward passes. No time budget."""
        pages = []
        for start in range(0, len(user_ids), batch_size):
            attempts = [self._start(u) for u in user_ids[start : start + batch_size]]
            self._plan_batch(attempts)
            for a in attempts:
                a.pools = self.pools(a.history, a.themes)
            requests = [(self.messages(a.history, a.pools), self.schema(a.pools)) for a in attempts]
            for a, generation in zip(attempts, self.backend.generate_batch(requests, self.max_new_tokens),
                                     strict=True):
                self._take(a, generation)
            retry = [a for a in attempts if a.violations and self.llm_retry]
            if retry:
                requests = [(self._retry_messages(a), self.schema(a.pools)) for a in retry]
                for a, generation in zip(retry, self.backend.generate_batch(requests, self.max_new_tokens),
                                         strict=True):
                    self._take(a, generation)
            pages.extend(self._finish(a) for a in attempts)
        return pages

    def record_event(self, event: Event) -> bool:
        """Store an event; the user's cached page is dropped."""
        added = self.retriever.record_event(event)
        self.cache.invalidate(event.user_id)
        return added

    # -- steps ----------------------------------------------------------------------------------
    def _start(self, user_id: str) -> Attempt:
        started = time.perf_counter()
        user_id = check_user_id(user_id)
        version = self.retriever.catalog.event_count(user_id)
        return Attempt(user_id, self.retriever.history(user_id), started, version)

    def _llm_path(self, a: Attempt, deadline: float | None) -> None:
        if self._planned:
            a.themes, generation = self.plan(a.history, deadline)
            a.generations.append(generation)
        a.pools = self.pools(a.history, a.themes)
        messages, schema = self.messages(a.history, a.pools), self.schema(a.pools)
        self._take(a, self.backend.generate(messages, schema, self.max_new_tokens, deadline))
        if a.violations and self.llm_retry:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is None or remaining > a.generations[-1].seconds:  # else the fix is quicker
                self._take(a, self.backend.generate(self._retry_messages(a), self.schema(a.pools),
                                                    self.max_new_tokens, deadline))

    def plan_request(self, history: History) -> tuple[list[dict[str, str]], dict]:
        themes = [{"type": m.type, "title": m.title, "query": m.query} for m in self._planned]
        messages = self.prompts["plan"].render(summary=history.summary, themes=themes, rules=self.rules.model_dump())
        return messages, plan_json_schema(len(themes), self.rules.title_min_chars, self.rules.title_max_chars)

    def _parse_plan(self, generation: Generation) -> dict[str, PlannedTheme]:
        try:
            plan = PlanDraft.model_validate_json(generation.text)
        except ValidationError:
            return {}  # planned modules then use their configured title and query
        return {m.type: theme for m, theme in zip(self._planned, plan.themes, strict=False)}

    def plan(self, history: History, deadline: float | None = None) -> tuple[dict[str, PlannedTheme], Generation]:
        messages, schema = self.plan_request(history)
        generation = self.backend.generate(messages, schema, 60, deadline)
        return self._parse_plan(generation), generation

    def _plan_batch(self, attempts: list[Attempt]) -> None:
        if not self._planned:
            return
        generations = self.backend.generate_batch([self.plan_request(a.history) for a in attempts], 60)
        for a, generation in zip(attempts, generations, strict=True):
            a.themes = self._parse_plan(generation)
            a.generations.append(generation)

    def _search(self, history: History, query: str, k: int) -> list[Candidate]:
        """A planned theme's candidates: products whose text is nearest the theme's query."""
        index = self.retriever.index
        vector = np.asarray(index.embeddings.embed_query(query))
        seen = set(history.item_ids)
        hits = [(i, s) for i, s in index.search(PRODUCTS, vector, k + len(seen)) if i not in seen][:k]
        return [Candidate(i, s, [Provenance("theme", s, rank, query)]) for rank, (i, s) in enumerate(hits)]

    def pools(self, history: History, themes: dict[str, PlannedTheme] | None = None) -> Pools:
        """Each candidate is offered to one module only (the first that wants it), so modules
        cannot repeat each other; excluded items never enter; a pool holds at most the per-module
        brand quota of any brand, so every pick of distinct handles keeps the brand rule, under any
        engine; a thin pool is topped up with popular items."""
        themes = themes or {}
        products = self.retriever.products
        sources = {m.source for m in self.skeleton.modules} - {"personal", "planned", "campaign"}
        # each source retrieved once: the module sources and the fused ones overlap (covisit)
        per_source = self.retriever.per_source(history, 60, sorted(sources | set(self.retriever.weights)))
        personal = (self.retriever.sources["popularity"].candidates(history, 60) if history.is_cold else
                    self.retriever.fused(history, {n: per_source[n] for n in self.retriever.weights}, 60))
        reserve = [c for c in self.retriever.sources["popularity"].candidates(history, 120)
                   if not self.skeleton.excludes(products[c.item_id])]
        taken = {i for m in self.skeleton.modules for i in [*m.items, *m.pinned]} | set(self.skeleton.sponsored_items)
        modules = []
        for spec in self.skeleton.modules:
            if spec.source == "campaign":
                modules.append([])
                continue
            if spec.source == "planned":
                theme = themes.get(spec.type)
                source = self._search(history, theme.query if theme else spec.query, 30)
            else:
                source = personal if spec.source == "personal" else per_source[spec.source]
            pool: list[Candidate] = []
            brands = Counter(products[i].brand for i in spec.pinned if i in products)
            for candidate in [*source, *reserve]:
                if len(pool) == spec.pool_size:
                    break
                p = products.get(candidate.item_id)
                if candidate.item_id in taken or p is None or not p.in_stock or self.skeleton.excludes(p):
                    continue
                if p.brand and brands[p.brand] >= self.rules.max_items_per_brand:
                    continue  # left for a later module: this one may show only so many of the brand
                pool.append(candidate)
                taken.add(candidate.item_id)
                brands[p.brand] += 1
            modules.append(pool)
        return Pools(modules, reserve, themes)

    def written(self, pools: Pools) -> list[tuple[ModuleSpec, list[Candidate]]]:
        """The modules the model writes (all but campaigns), with their pools, in page order."""
        return [(spec, pool) for spec, pool in zip(self.skeleton.modules, pools.modules, strict=True)
                if spec.source != "campaign"]

    def item_count(self, spec: ModuleSpec, pool: list[Candidate]) -> int:
        fixed = len(spec.pinned) + spec.sponsored_slots
        high = min(spec.max_items, self.rules.max_items_per_module) - fixed
        return max(min(high, len(pool)), 0)

    def messages(self, history: History, pools: Pools) -> list[dict[str, str]]:
        products = self.retriever.products
        modules = []
        for spec, pool in zip(self.skeleton.modules, pools.modules, strict=True):
            if spec.source == "campaign":
                continue
            theme = pools.themes.get(spec.type)
            candidates = [
                {"handle": h, "title": products[c.item_id].title, "brand": products[c.item_id].brand,
                 "category": products[c.item_id].category, "price": products[c.item_id].price}
                for h, c in enumerate(pool, start=1)
            ]
            modules.append({"type": spec.type, "title": spec.title, "theme": theme.title if theme else None,
                            "count": self.item_count(spec, pool), "min_items": spec.min_items,
                            "max_items": spec.max_items, "candidates": candidates})
        return self.prompts["compose"].render(summary=history.summary, modules=modules,
                                              rules=self.rules.model_dump())

    def schema(self, pools: Pools) -> dict:
        slots = []
        for spec, pool in self.written(pools):
            theme = pools.themes.get(spec.type)
            slots.append((len(pool), self.item_count(spec, pool), theme.title if theme else None))
        return draft_json_schema(slots, self.rules.title_min_chars, self.rules.title_max_chars)

    def _retry_messages(self, a: Attempt) -> list[dict[str, str]]:
        return [*self.messages(a.history, a.pools), {"role": "assistant", "content": a.generations[-1].text},
                *self.prompts["repair"].render(violations=[v.model_dump() for v in a.violations],
                                               rules=self.rules.model_dump())]

    def assemble(self, pools: Pools, chosen: list[tuple[str, list[str]]]) -> PageBody:
        """Modules from the model's (or the deterministic) choices plus what configuration fixes:
        campaign modules, pinned items first, sponsored items at their slots."""
        sponsored = iter(i for i in self.skeleton.sponsored_items
                         if i in self.retriever.products and self.retriever.products[i].in_stock)
        picks = iter(chosen)
        quota = self.skeleton.max_sponsored
        body = PageBody()
        for spec in self.skeleton.modules:
            if spec.source == "campaign":
                body.modules.append(ModuleBody(spec, spec.title, list(spec.items)))
                continue
            title, items = next(picks)
            items = [*spec.pinned, *items]
            ads = {i for _, i in zip(range(min(spec.sponsored_slots, quota)), sponsored, strict=False)}
            quota -= len(ads)
            for offset, item in enumerate(sorted(ads, key=self.skeleton.sponsored_items.index)):
                items.insert(min(spec.sponsored_position - 1 + offset, len(items)), item)
            body.modules.append(ModuleBody(spec, title, items, ads))
        return body

    def _take(self, a: Attempt, generation: Generation) -> None:
        """Parse and check one draft; keep it as the body when it parses."""
        a.generations.append(generation)
        try:
            draft = PageDraft.model_validate_json(generation.text)
            if len(draft.modules) != len(self._llm_modules):
                raise ValueError("the draft has the wrong number of modules")
        except (ValidationError, ValueError) as exc:
            detail = exc.errors()[0]["msg"] if isinstance(exc, ValidationError) else str(exc)
            a.violations = [Violation(code="unparseable", message=f"the draft is not a valid page: {detail}")]
            a.fixed.extend(a.violations)
            a.per_call.append(1)
            return
        chosen = [(module.title, [pool[h - 1].item_id for h in module.items if 1 <= h <= len(pool)])
                  for module, (_, pool) in zip(draft.modules, self.written(a.pools), strict=True)]
        a.body = self.assemble(a.pools, chosen)
        a.violations = validate(a.body, self.ctx)
        a.fixed.extend(a.violations)
        a.per_call.append(len(a.violations))

    def deterministic(self, pools: Pools) -> PageBody:
        """Retrieval order and template copy (or the planned title); no model."""
        chosen = []
        for spec, pool in self.written(pools):
            theme = pools.themes.get(spec.type)
            items = [c.item_id for c in pool[: self.item_count(spec, pool)]]
            chosen.append((theme.title if theme else spec.title, items))
        return self.assemble(pools, chosen)

    def _finish(self, a: Attempt) -> Homepage:
        if a.pools is None:  # the plan step failed or was never run
            a.pools = self.pools(a.history, a.themes)
        if a.fallback_reason:
            a.body, a.fixed = self.deterministic(a.pools), []
        if a.body is None or validate(a.body, self.ctx):
            empty = self.deterministic(a.pools) if a.body is None else a.body
            a.body = fix(empty, [[c.item_id for c in pool] for pool in a.pools.modules],
                         [c.item_id for c in a.pools.reserve], self.ctx)
        remaining = validate(a.body, self.ctx)
        if remaining:  # the catalogue cannot satisfy the rules: a configuration problem, not a page
            raise RuntimeError(f"rules cannot be met with this catalogue: {[v.message for v in remaining]}")
        source = "fallback" if a.fallback_reason else ("repaired" if a.fixed else "llm")
        meta = PageMeta(
            source=source, model=self.backend.model_name if self.backend else "",
            adapter=self.backend.adapter if self.backend else None,
            templates={name: p.version for name, p in self.prompts.items()}, cold_start=a.history.is_cold,
            tokens_generated=sum(g.tokens for g in a.generations),
            forward_passes=sum(g.forward_passes for g in a.generations), llm_calls=len(a.generations),
            prompt_tokens=sum(g.prompt_tokens for g in a.generations),
            prefill_ms=round(sum(g.prefill_seconds for g in a.generations) * 1000, 1),
            violations_fixed=a.fixed, violations_per_call=a.per_call, plan=a.pools.themes,
            fallback_reason=a.fallback_reason, composed_at=time.time(),
        )
        page = self.expand(a.user_id, a.body, a.pools, meta)
        page.meta.latency_ms = round((time.perf_counter() - a.started) * 1000, 2)
        self.cache.put(a.user_id, a.version, page)
        return page

    def expand(self, user_id: str, body: PageBody, pools: Pools, meta: PageMeta) -> Homepage:
        products = self.retriever.products
        known = {c.item_id: c for pool in [*pools.modules, pools.reserve] for c in pool}
        modules = []
        for mod in body.modules:
            items = []
            for item_id in mod.items:
                p, c = products[item_id], known.get(item_id)
                if item_id in mod.sponsored:
                    why, source = "Sponsored", "sponsored"
                elif mod.spec.source == "campaign" or item_id in mod.spec.pinned:
                    why = f"Featured: {mod.spec.title}"
                    source = "campaign" if mod.spec.source == "campaign" else "pinned"
                else:
                    why, source = reason(c, products), c.source if c else "popularity"
                items.append(PageItem(
                    item_id=item_id, title=p.title, brand=p.brand, category=" > ".join(p.category_path),
                    price=p.price, reason=why, source=source, score=round(c.score, 6) if c else 0.0,
                    sponsored=item_id in mod.sponsored,
                ))
            modules.append(PageModule(type=mod.spec.type, title=mod.title, items=items))
        return Homepage(user_id=user_id, modules=modules, meta=meta)

"""The composer: runs a page's stages in order and keeps the guarantee that a caller never gets an
invalid page.

    1. plan      (agent.planning)   themes for ``planned`` modules — the model, constrained
    2. pools     (agent.pools)      candidates per module, and what configuration fixes
    3. prompt    (agent.drafting)   the messages and the grammar of this request
    4. draft     (agent.drafting)   the model writes; its text is read back into choices
    5. check     (agent.rules)      typed violations -> one LLM retry -> the fix (agent.repair)
    6. expand    (agent.assembly)   the ``Homepage``: catalogue facts, reasons, meta

The guarantee: ``compose`` returns a page that passes every rule, or raises one of two documented
errors — ``InputError`` (a malformed user id) or ``PageUnavailable`` (no valid page can be built
at all: an empty catalogue, rules the catalogue cannot meet). Any fault on the way — the model
failing, hanging past the time budget or writing garbage, a template failing to render, a grammar
failing to compile, a candidate source or the event store failing — gives the deterministic page
with ``meta.path = "fallback"`` and ``meta.fallback_reason``. The time budget counts from the
request's arrival and covers waiting for the model.

Cache: a page is cached under everything it depends on (the user's events, the catalogue version,
templates, rules, skeleton, model and adapter). Fallback and degraded pages are never cached: the
next request tries the model again.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TypeVar

from agent.assembly import assemble, deterministic, expand
from agent.backends import Generation, LLMBackend
from agent.cache import PageCache
from agent.drafting import UnusableDraft, draft_messages, draft_schema, handle_order, parse_draft, retry_messages
from agent.errors import BackendError, ConfigError, HomepageError, InputError, PageUnavailable
from agent.planning import PLAN_TOKENS, parse_plan, plan_request
from agent.pools import Pools, build_pools
from agent.prompting import Prompt
from agent.repair import fix
from agent.rules import BrandQuota, PageBody, RuleContext, Rules, title_key, validate
from agent.schema import Homepage, PageMeta, PlannedTheme, Violation
from agent.skeleton import Skeleton
from retrieval import Event, History, Retriever
from retrieval.history import build_history
from retrieval.ids import check_id
from retrieval.sources import SOURCES

T = TypeVar("T")
WARM_UP_USER = "warm-up-visitor"  # a visitor nobody has seen: the warm-up touches no shopper's data
WITHHELD_SUMMARY = "A shopper (history withheld from remote models)."
_GRACE_S = 0.25  # a backend that checks the deadline itself gets this long to say so


def check_user_id(user_id: object) -> str:
    """The id policy shared with ingest (``retrieval.ids``); ids are never rewritten."""
    try:
        return check_id(user_id, "user id")
    except ValueError as exc:
        raise InputError(str(exc).removeprefix("missing: ").removeprefix("malformed: ")) from None


def before(deadline: float | None, call: Callable[[], T]) -> T:
    """``call()``, or ``BackendError`` once ``deadline`` (``time.monotonic()``) has passed: the
    budget holds for engines that cannot be interrupted, and covers waiting for a busy model. A call
    that overruns finishes in the background; its answer is dropped."""
    if deadline is None:
        return call()
    box: dict = {}
    done = threading.Event()

    def run() -> None:
        try:
            box["value"] = call()
        except BaseException as exc:  # handed to the caller's thread
            box["error"] = exc
        done.set()

    threading.Thread(target=run, daemon=True, name="model-call").start()
    if not done.wait(max(deadline - time.monotonic(), 0.0) + _GRACE_S):
        raise BackendError("the model did not answer within the page's time budget", retryable=True)
    if "error" in box:
        raise box["error"]
    return box["value"]


def _due(deadline: float | None) -> dict:
    """The deadline keyword for a backend's batch, only when there is one (a backend that cannot
    stop early is still bounded by ``before``)."""
    return {} if deadline is None else {"deadline": deadline}


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


@dataclass
class Attempt:
    """One user's page in the making."""

    user_id: str
    history: History
    started: float
    faults: list[str] = field(default_factory=list)  # what failed on the way (the page is then not cached)
    themes: dict[str, PlannedTheme] = field(default_factory=dict)
    pools: Pools | None = None
    messages: list[dict[str, str]] = field(default_factory=list)
    generations: list[Generation] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)
    fixed: list[Violation] = field(default_factory=list)
    per_call: list[int] = field(default_factory=list)
    body: PageBody | None = None
    fallback_reason: str | None = None


class Composer:
    def __init__(self, retriever: Retriever, backend: LLMBackend | None, prompts: dict[str, Prompt], rules: Rules,
                 skeleton: Skeleton, max_new_tokens: int = 160, llm_retry: bool = True,
                 budget_s: float | None = 4.0, cache: PageCache | None = None, handle_prior: float | None = None,
                 remote_history: bool = True):
        self.retriever, self.backend, self.prompts = retriever, backend, prompts
        self.rules, self.skeleton = rules, skeleton
        self.max_new_tokens, self.llm_retry, self.budget_s = max_new_tokens, llm_retry, budget_s
        self.handle_prior = handle_prior  # None: the model writes each module's order token by token
        self.remote_history = remote_history
        self.cache = cache if cache is not None else PageCache()
        check_configuration(rules, skeleton, retriever.products)
        # built now rather than on the first page (the buy-again model learns from every event); a
        # source that fails here fails again on each page that asks it, which notes the fault
        for name in sorted({m.source for m in skeleton.modules} - {"personal", "planned", "campaign"}):
            with contextlib.suppress(Exception):
                retriever.source(name)

    @property
    def ctx(self) -> RuleContext:
        return RuleContext(self.rules, self.retriever.products, self.skeleton)

    # -- the stages, as finetune and eval call them (the same code as serving) -------------------
    def pools(self, history: History, themes: dict[str, PlannedTheme] | None = None) -> Pools:
        return build_pools(self.retriever, self.rules, self.skeleton, history, themes)

    def messages(self, history: History, pools: Pools) -> list[dict[str, str]]:
        return draft_messages(self.prompts["compose"], self.rules, self._told(history), pools, self.retriever.products)

    def _told(self, history: History) -> History:
        """The history as the prompt shows it: a remote model server is not told the summary when
        ``remote_history`` is off (the pools are still this shopper's)."""
        if self.remote_history or not getattr(self.backend, "remote", False):
            return history
        return replace(history, summary=WITHHELD_SUMMARY)

    def schema(self, pools: Pools) -> dict:
        return draft_schema(self.rules, pools)

    def order(self, pools: Pools):
        """How the model's handle scores order each module, where the backend reads them (else None)."""
        if self.handle_prior is None or self.backend is None or not self.backend.orders_handles:
            return None
        return handle_order(pools, self.rules, self.handle_prior)

    # -- public ---------------------------------------------------------------------------------
    def warm_up(self) -> float:
        """One page's model work for a new visitor, nothing kept: the grammar compiler's first
        compile, the system prompt's shared KV cache and torch's first forward passes happen here,
        at start, rather than inside the first shoppers' time budgets. Returns the seconds it took."""
        started = time.perf_counter()
        if self.backend is None:
            return 0.0
        history = build_history(WARM_UP_USER, [], {})
        a = Attempt(WARM_UP_USER, history, started)
        a.pools = self.pools(history)
        a.messages = self.messages(history, a.pools)
        self._take(a, self._generate(a.messages, self.schema(a.pools), self.max_new_tokens, None,
                                     self.order(a.pools)))
        return time.perf_counter() - started

    def compose(self, user_id: str, use_llm: bool = True, use_cache: bool = True,
                deadline: float | None = None) -> Homepage:
        """One valid page (see the module's docstring for the guarantee and its two errors).
        ``deadline`` (``time.monotonic()``): when the page is due, if the budget started earlier
        than this call (a request that waited in a queue); default: now + the budget."""
        started = time.perf_counter()
        if deadline is None and self.budget_s is not None:
            deadline = time.monotonic() + self.budget_s
        user_id = self._user_id(user_id)
        faults: list[str] = []
        key = self._cache_key(user_id, use_llm, faults)
        if use_cache and (page := self._cached(user_id, key, started)) is not None:
            return page
        a = Attempt(user_id, self._history(user_id, faults), started, faults)
        if use_llm and self.backend is not None:
            try:
                self._llm_path(a, deadline)
            except Exception as exc:  # every fault of the model's path ends in the deterministic page
                a.fallback_reason, a.body = _describe(exc), None
        page = self._finish(a, use_llm and self.backend is not None)
        self._keep(a, key, page)
        return page

    def cached(self, user_id: str) -> Homepage | None:
        """The user's cached page if it is still current (nothing composed, no model asked)."""
        started = time.perf_counter()
        user_id = self._user_id(user_id)
        return self._cached(user_id, self._cache_key(user_id, True, []), started)

    def fallback(self, user_id: str, reason: str) -> Homepage:
        """The deterministic page, marked as a fallback for ``reason`` (the model was not asked:
        its queue was full, or the page's budget would not cover it). It comes from the cache
        where it can: under overload, this is the page most requests get."""
        page = self.compose(user_id, use_llm=False)
        return page.model_copy(update={"meta": page.meta.model_copy(update={"path": "fallback",
                                                                            "fallback_reason": reason})})

    def compose_batch(self, user_ids: list[str], batch_size: int = 8, deadline: float | None = None) -> list[Homepage]:
        """The LLM steps of several users share forward passes (batch precompute, or a server's
        concurrent requests). ``deadline``: when the batch is due (default: none); a fault or an
        overrun costs its batch the model, never a page."""
        ids = [self._user_id(u) for u in user_ids]
        pages = []
        for start in range(0, len(ids), batch_size):
            attempts, keys = [], []
            for user_id in ids[start : start + batch_size]:
                faults: list[str] = []
                keys.append(self._cache_key(user_id, True, faults))  # before composing: events may arrive
                attempts.append(Attempt(user_id, self._history(user_id, faults), time.perf_counter(), faults))
            try:
                self._llm_batch(attempts, deadline)
            except Exception as exc:
                for a in attempts:
                    a.fallback_reason, a.body = _describe(exc), None
            for a, key in zip(attempts, keys, strict=True):
                page = self._finish(a, True)
                self._keep(a, key, page)
                pages.append(page)
        return pages

    def record_events(self, events: list[Event]) -> list[bool]:
        """Store events (ids checked by the shared policy); each user's next page reflects them.
        Returns, per event, whether it was new (one already stored is not stored twice)."""
        for event in events:
            check_user_id(event.user_id)
            try:
                check_id(event.item_id, "item id")
            except ValueError as exc:
                raise InputError(str(exc)) from None
        events = [replace(e, user_id=self._user_id(e.user_id)) for e in events]
        added = self.retriever.record_events(events)
        for event in events:
            self.cache.invalidate(event.user_id)
        return added

    def _user_id(self, user_id: object) -> str:
        """The id as the stores hold it: checked, and an e-mail address or phone number turned into
        its keyed pseudonym (``retrieval.privacy``), as ingest stores it."""
        return check_user_id(self.retriever.privacy.user_id(user_id) if isinstance(user_id, str) else user_id)

    # -- orchestration --------------------------------------------------------------------------
    def _keep(self, a: Attempt, key: str | None, page: Homepage) -> None:
        """Cache a page made as asked, with nothing failing on the way: a fallback or degraded page
        is served once, and the next request tries again."""
        if key and page.meta.path != "fallback" and not a.faults and not a.pools.faults:
            self.cache.put(a.user_id, key, page)

    def _cached(self, user_id: str, key: str | None, started: float) -> Homepage | None:
        page = self.cache.get(user_id, key) if key else None
        if page is None:
            return None
        latency = round((time.perf_counter() - started) * 1000, 2)
        return page.model_copy(update={"meta": page.meta.model_copy(update={"cached": True, "latency_ms": latency})})

    def _fingerprint(self) -> str:
        """Everything besides the user and the catalogue that a page depends on."""
        parts = [*(f"{n}={p.version}" for n, p in sorted(self.prompts.items())), self.rules.model_dump_json(),
                 self.skeleton.model_dump_json(), self.backend.model_name if self.backend else "",
                 (self.backend.adapter or "") if self.backend else ""]
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]

    def _cache_key(self, user_id: str, use_llm: bool, faults: list[str]) -> str | None:
        try:
            catalogue = self.retriever.refresh()
            events = self.retriever.catalog.event_count(user_id)
        except Exception as exc:  # the event store is unreadable: compose without the cache
            faults.append(f"event store failed: {_describe(exc)}")
            return None
        return f"{int(use_llm)}:{events}:{catalogue}:{self._fingerprint()}"

    def _history(self, user_id: str, faults: list[str]) -> History:
        try:
            return self.retriever.history(user_id)
        except Exception as exc:  # composed as for a new visitor, and said so
            faults.append(f"history unavailable, composed as for a new visitor: {_describe(exc)}")
            return build_history(user_id, [], {})

    def _generate(self, messages: list[dict[str, str]], schema: dict, tokens: int,
                  deadline: float | None, order=None) -> Generation:
        extra = {} if order is None else {"order": order}
        return before(deadline, lambda: self.backend.generate(messages, schema, tokens, deadline, **extra))

    def _llm_path(self, a: Attempt, deadline: float | None) -> None:
        if self.skeleton.planned():
            messages, schema = plan_request(self.prompts["plan"], self.rules, self.skeleton, self._told(a.history))
            generation = self._generate(messages, schema, PLAN_TOKENS, deadline)
            a.generations.append(generation)
            a.themes = parse_plan(generation.text, self.rules, self.skeleton)
        a.pools = self.pools(a.history, a.themes)
        a.messages = self.messages(a.history, a.pools)
        schema, order = self.schema(a.pools), self.order(a.pools)
        self._take(a, self._generate(a.messages, schema, self.max_new_tokens, deadline, order))
        if self._retry_wanted(a):
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is None or remaining > a.generations[-1].seconds:  # else the fix is quicker
                messages = retry_messages(self.prompts["repair"], self.rules, a.messages, a.generations[-1].text,
                                          a.violations)
                self._take(a, self._generate(messages, schema, self.max_new_tokens, deadline, order))

    def _llm_batch(self, attempts: list[Attempt], deadline: float | None = None) -> None:
        if self.skeleton.planned():
            requests = [plan_request(self.prompts["plan"], self.rules, self.skeleton, self._told(a.history))
                        for a in attempts]
            generations = before(deadline, lambda: self.backend.generate_batch(requests, PLAN_TOKENS, **_due(deadline)))
            for a, generation in zip(attempts, generations, strict=True):
                a.generations.append(generation)
                a.themes = parse_plan(generation.text, self.rules, self.skeleton)
        for a in attempts:
            a.pools = self.pools(a.history, a.themes)
            a.messages = self.messages(a.history, a.pools)
        requests = [(a.messages, self.schema(a.pools)) for a in attempts]
        for a, generation in zip(attempts, self._generate_batch(requests, attempts, deadline), strict=True):
            self._take(a, generation)
        retry = [a for a in attempts if self._retry_wanted(a)]
        if retry:
            requests = [(retry_messages(self.prompts["repair"], self.rules, a.messages, a.generations[-1].text,
                                        a.violations), self.schema(a.pools)) for a in retry]
            for a, generation in zip(retry, self._generate_batch(requests, retry, deadline), strict=True):
                self._take(a, generation)

    def _retry_wanted(self, a: Attempt) -> bool:
        """A retry costs a second generation; an ungrounded title alone is left to the fix, which
        writes the module's grounded title at once (unless ``title_grounding.retry``)."""
        if not (a.violations and self.llm_retry):
            return False
        return self.rules.title_grounding.retry or any(v.code != "ungrounded_title" for v in a.violations)

    def _generate_batch(self, requests: list[tuple[list[dict[str, str]], dict]],
                        attempts: list[Attempt], deadline: float | None) -> list[Generation]:
        orders = [self.order(a.pools) for a in attempts]
        extra = {} if None in orders else {"orders": orders}
        # bounded by ``before`` (an engine that cannot stop early), the answer read in this thread only
        return before(deadline, lambda: self.backend.generate_batch(requests, self.max_new_tokens, **extra,
                                                                    **_due(deadline)))

    def _take(self, a: Attempt, generation: Generation) -> None:
        """Read and check one draft; the latest usable draft is the body."""
        a.generations.append(generation)
        try:
            chosen = parse_draft(generation.text, a.pools)
        except UnusableDraft as exc:
            a.violations = [Violation(code="unparseable", message=str(exc))]
        else:
            a.body = assemble(a.pools, chosen)
            a.violations = validate(a.body, self.ctx)
        a.fixed.extend(a.violations)
        a.per_call.append(len(a.violations))

    def _finish(self, a: Attempt, llm_asked: bool) -> Homepage:
        try:
            return self._page(a, llm_asked)
        except HomepageError:
            raise
        except Exception as exc:  # nothing else escapes: no page can be built at all
            raise PageUnavailable(f"no page can be built for {a.user_id}: {_describe(exc)}") from exc

    def _page(self, a: Attempt, llm_asked: bool) -> Homepage:
        if a.pools is None:  # the plan step failed, or the model was not asked
            a.pools = self.pools(a.history, a.themes)
        if a.body is None and llm_asked and not a.fallback_reason:
            a.fallback_reason = f"no usable draft: {a.violations[-1].message}" if a.violations else "no draft"
        if a.body is None or a.fallback_reason:
            a.body, a.fixed = deterministic(a.pools, self.rules), []
            path = "fallback" if llm_asked else "deterministic"
        else:
            path = "repaired" if a.fixed else "llm"
        ctx = self.ctx
        if broken := validate(a.body, ctx):
            a.body = fix(a.body, a.pools, ctx)
            if path == "llm":
                path, a.fixed = "repaired", broken
        if remaining := validate(a.body, ctx):
            raise PageUnavailable(f"the rules cannot be met with this catalogue: {[v.message for v in remaining]}")
        meta = PageMeta(
            path=path, model=self.backend.model_name if self.backend else "",
            adapter=self.backend.adapter if self.backend else None,
            templates={name: p.version for name, p in self.prompts.items()}, cold_start=a.history.is_cold,
            tokens_generated=sum(g.tokens for g in a.generations),
            forward_passes=sum(g.forward_passes for g in a.generations), llm_calls=len(a.generations),
            prompt_tokens=sum(g.prompt_tokens for g in a.generations),
            prefill_ms=round(sum(g.prefill_seconds for g in a.generations) * 1000, 1),
            violations_fixed=a.fixed, violations_per_call=a.per_call, plan=a.pools.themes,
            fallback_reason=a.fallback_reason if path == "fallback" else None,
            notes=[*a.faults, *a.pools.faults, *a.pools.notes],
            composed_at=time.time(),
        )
        page = expand(a.user_id, a.body, a.pools, meta, ctx.products, self.rules)
        page.meta.latency_ms = round((time.perf_counter() - a.started) * 1000, 2)
        return page


def check_configuration(rules: Rules, skeleton: Skeleton, products: dict) -> None:
    """What a skeleton can get wrong against the rules and the catalogue, refused before any
    page: unknown item ids, configured titles that break a title rule, configured items over the
    brand quota of their module. An empty catalogue (nothing ingested yet) skips the id check."""
    problems = []
    if products:
        unknown = {i: where for i, where in skeleton.configured_items().items() if i not in products}
        problems += [f"{where}: item {i!r} is not in the catalogue" for i, where in unknown.items()]
    titles: set[str] = set()
    for m in skeleton.modules:
        if m.source not in {"personal", "planned", "campaign", *SOURCES}:
            problems.append(f"modules.{m.type}.source: unknown source {m.source!r}; known: personal, planned, "
                            f"campaign, {', '.join(sorted(SOURCES))}")
        if problem := rules.title_problem(m.title):
            problems.append(f"modules.{m.type}.title: {problem}")
        if title_key(m.title) in titles:
            problems.append(f"modules.{m.type}.title: {m.title!r} is another module's title too")
        titles.add(title_key(m.title))
        quota = BrandQuota(rules.max_items_per_brand, products)
        for i in [*m.items, *m.pinned]:
            if not quota.admits(i):
                problems.append(f"modules.{m.type}: configured item {i!r} exceeds the brand quota "
                                f"({rules.max_items_per_brand} per module)")
            quota.add(i)
    if problems:
        where = f"{skeleton.path}: " if skeleton.path else ""
        raise ConfigError(where + "; ".join(problems))

"""The composer: a page's stages (``agent.stages.sequence``) behind the guarantee that a caller never
gets an invalid page, with the page cache and the shopper's id policy.

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

import dataclasses
import hashlib
import logging
import time
from dataclasses import replace

from agent.backends import LLMBackend
from agent.cache import PageCache
from agent.errors import InputError
from agent.prompting import Prompt
from agent.rules import Rules, check_skeleton
from agent.schema import Homepage
from agent.skeleton import Skeleton
from agent.stages.sequence import WARM_UP_STAGES, ask_model, describe, finish
from agent.stages.state import WITHHELD_SUMMARY, Deps, PageState
from retrieval import Event, History, Retriever
from retrieval.history import build_history
from retrieval.ids import check_id
from retrieval.profile import Profile, profile_of, with_interests

__all__ = ["WARM_UP_USER", "WITHHELD_SUMMARY", "Composer", "check_user_id"]
WARM_UP_USER = "warm-up-visitor"  # a visitor nobody has seen: the warm-up touches no shopper's data
_DEPS = {f.name for f in dataclasses.fields(Deps)}

log = logging.getLogger(__name__)


def check_user_id(user_id: object) -> str:
    """The id policy shared with ingest (``retrieval.ids``); ids are never rewritten."""
    try:
        return check_id(user_id, "user id")
    except ValueError as exc:
        raise InputError(str(exc).removeprefix("missing: ").removeprefix("malformed: ")) from None


class Composer:
    """Pages for shoppers, made by the stages over ``deps``; ``budget_s`` bounds each page's model
    work, ``cache`` keeps current pages."""

    def __init__(self, retriever: Retriever, backend: LLMBackend | None, prompts: dict[str, Prompt], rules: Rules,
                 skeleton: Skeleton, max_new_tokens: int = 160, llm_retry: bool = True,
                 budget_s: float | None = 4.0, cache: PageCache | None = None, handle_prior: float | None = None,
                 remote_history: bool = True, config_version: str = ""):
        self.deps = Deps(retriever, backend, prompts, rules, skeleton, max_new_tokens, llm_retry, handle_prior,
                         remote_history, config_version)
        self.budget_s = budget_s
        self.cache = cache if cache is not None else PageCache()
        check_skeleton(rules, skeleton, retriever.products)
        # built now rather than on the first page (the buy-again model learns from every event); a
        # source that fails here fails again on each page that asks it, which notes the fault
        for name in sorted({m.candidate_source for m in skeleton.modules} - {None}):
            try:
                retriever.source(name)
            except Exception:
                continue

    def using(self, **changes) -> Composer:
        """Another composer with some parts swapped (any field of ``Deps``, ``budget_s``, ``cache``);
        this one is unchanged. The new one starts with an empty cache of the same size unless ``cache``
        is given (a cached page may depend on a swapped part)."""
        unknown = set(changes) - _DEPS - {"budget_s", "cache"}
        if unknown:
            raise TypeError(f"unknown parts: {sorted(unknown)}")
        deps = replace(self.deps, **{k: v for k, v in changes.items() if k in _DEPS})
        return Composer(deps.retriever, deps.backend, deps.prompts, deps.rules, deps.skeleton, deps.max_new_tokens,
                        deps.llm_retry, changes.get("budget_s", self.budget_s),
                        changes["cache"] if changes.get("cache") is not None else PageCache(self.cache.max_users),
                        deps.handle_prior, deps.remote_history, deps.config_version)

    # the parts, read-only (swap them with ``using``)
    retriever = property(lambda self: self.deps.retriever)
    backend = property(lambda self: self.deps.backend)
    prompts = property(lambda self: self.deps.prompts)
    rules = property(lambda self: self.deps.rules)
    skeleton = property(lambda self: self.deps.skeleton)
    max_new_tokens = property(lambda self: self.deps.max_new_tokens)
    handle_prior = property(lambda self: self.deps.handle_prior)
    ctx = property(lambda self: self.deps.ctx)

    # the stages' inputs, as finetune and eval read them (the same code as serving)
    def pools(self, history: History, themes=None):
        return self.deps.pools(history, themes)

    def messages(self, history: History, pools) -> list[dict[str, str]]:
        return self.deps.messages(history, pools)

    def schema(self, pools) -> dict:
        return self.deps.schema(pools)

    def order(self, pools):
        return self.deps.order(pools)

    # -- public ---------------------------------------------------------------------------------
    def warm_up(self) -> float:
        """The retrieval sources' in-memory tables, then one page's model work for a new visitor,
        nothing kept: the grammar compiler's first compile, the system prompt's shared KV cache and
        torch's first forward passes happen here, at start, rather than inside the first shoppers'
        time budgets. Returns the seconds it took."""
        started = time.perf_counter()
        self.retriever.prepare()
        if self.backend is None:
            return time.perf_counter() - started
        state = PageState(WARM_UP_USER, build_history(WARM_UP_USER, [], {}), started)
        ask_model(self.deps, [state], None, WARM_UP_STAGES)
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
        state = PageState(user_id, self._history(user_id, faults), started, faults)
        llm = use_llm and self.backend is not None
        if llm:
            self._ask_model([state], deadline)
        page = finish(self.deps, state, llm)
        self._keep(state, key, page)
        return page

    def replay(self, history: History) -> Homepage:
        """The deterministic page for a history given (an offline replay: the shopper as they were
        before a held-out basket); nothing cached, no model asked."""
        return finish(self.deps, PageState(history.user_id, history, time.perf_counter()), False)

    def cached(self, user_id: str) -> Homepage | None:
        """The user's cached page if it is still current (nothing composed, no model asked)."""
        started = time.perf_counter()
        user_id = self._user_id(user_id)
        return self._cached(user_id, self._cache_key(user_id, True, []), started)

    def profile(self, user_id: str) -> Profile:
        """Who the shopper is and what they do (``retrieval.profile``), under their stored id, with
        the interests the embedding model learned."""
        user_id = self._user_id(user_id)
        profile = profile_of(self.retriever.catalog, user_id)
        try:
            return with_interests(profile, self.retriever, self._history(user_id, []))
        except Exception:  # the vector store is down: the rule tags still explain the page
            log.warning("learned interests unavailable for the profile", exc_info=True)
            return profile

    def fallback(self, user_id: str, reason: str) -> Homepage:
        """The deterministic page, marked as a fallback for ``reason`` (the model was not asked:
        its queue was full, or the page's budget would not cover it). It comes from the cache
        where it can: under overload, this is the page most requests get."""
        page = self.compose(user_id, use_llm=False)
        return page.model_copy(update={"meta": page.meta.model_copy(update={"path": "fallback",
                                                                            "fallback_reason": reason})})

    def compose_batch(self, user_ids: list[str], batch_size: int = 8, deadline: float | None = None) -> list[Homepage]:
        """The same stages for several users, their model calls sharing forward passes (batch
        precompute, or a server's concurrent requests). ``deadline``: when the batch is due (default:
        none); a fault or an overrun costs its batch the model, never a page."""
        ids = [self._user_id(u) for u in user_ids]
        pages = []
        for start in range(0, len(ids), batch_size):
            states, keys = [], []
            for user_id in ids[start : start + batch_size]:
                faults: list[str] = []
                keys.append(self._cache_key(user_id, True, faults))  # before composing: events may arrive
                states.append(PageState(user_id, self._history(user_id, faults), time.perf_counter(), faults))
            self._ask_model(states, deadline)
            for state, key in zip(states, keys, strict=True):
                page = finish(self.deps, state, True)
                self._keep(state, key, page)
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

    # -- around the stages ----------------------------------------------------------------------
    def _ask_model(self, states: list[PageState], deadline: float | None) -> None:
        try:
            ask_model(self.deps, states, deadline)
        except Exception as exc:  # every fault of the model's stages ends in the deterministic page
            for state in states:
                state.fallback_reason, state.body = describe(exc), None

    def _user_id(self, user_id: object) -> str:
        """The id as the stores hold it: checked, and an e-mail address or phone number turned into
        its keyed pseudonym (``retrieval.privacy``), as ingest stores it."""
        return check_user_id(self.retriever.privacy.user_id(user_id) if isinstance(user_id, str) else user_id)

    def _keep(self, state: PageState, key: str | None, page: Homepage) -> None:
        """Cache a page made as asked, with nothing failing on the way: a fallback or degraded page
        is served once, and the next request tries again."""
        if key and page.meta.path != "fallback" and not state.faults and not state.pools.faults:
            self.cache.put(state.user_id, key, page)

    def page_key(self, user_id: str) -> str | None:
        """The key a page of this user is current under (None: the event store is unreadable)."""
        return self._cache_key(self._user_id(user_id), True, [])

    def _cached(self, user_id: str, key: str | None, started: float) -> Homepage | None:
        """The page in memory, or else the one precomputed in the store (``homepage precompute``),
        if it was made under ``key``."""
        if not key:
            return None
        page = self.cache.get(user_id, key)
        if page is None:
            try:
                stored = self.retriever.catalog.stored_page(user_id, key)
            except Exception:  # the store is unreadable: compose
                stored = None
            if stored is None:
                return None
            page = Homepage.model_validate_json(stored)
            self.cache.put(user_id, key, page)
        latency = round((time.perf_counter() - started) * 1000, 2)
        return page.model_copy(update={"meta": page.meta.model_copy(update={"cached": True, "latency_ms": latency})})

    def _fingerprint(self) -> str:
        """Everything besides the user and the catalogue that a page depends on."""
        backend = self.backend
        parts = [*(f"{n}={p.version}" for n, p in sorted(self.prompts.items())), self.rules.model_dump_json(),
                 self.skeleton.model_dump_json(), backend.model_name if backend else "",
                 (backend.adapter or "") if backend else "", self.deps.config_version]
        return hashlib.sha1("\n".join(parts).encode()).hexdigest()[:16]

    def _cache_key(self, user_id: str, use_llm: bool, faults: list[str]) -> str | None:
        try:
            catalogue = self.retriever.refresh()
            events = self.retriever.catalog.event_count(user_id)
        except Exception as exc:  # the event store is unreadable: compose without the cache
            faults.append(f"event store failed: {describe(exc)}")
            return None
        return f"{int(use_llm)}:{events}:{catalogue}:{self._fingerprint()}"

    def _history(self, user_id: str, faults: list[str]) -> History:
        try:
            return self.retriever.history(user_id)
        except Exception as exc:  # composed as for a new visitor, and said so
            faults.append(f"history unavailable, composed as for a new visitor: {describe(exc)}")
            return build_history(user_id, [], {})

"""The composer: history -> candidate pools -> constrained draft -> rules -> repair -> Homepage."""

from __future__ import annotations

import re
import time
from dataclasses import dataclass

from pydantic import ValidationError

from agent.backends import Generation, LLMBackend
from agent.errors import InputError
from agent.prompting import Prompt
from agent.reasons import reason
from agent.rules import ModuleBody, PageBody, RuleContext, Rules, fix, validate
from agent.schema import Homepage, PageDraft, PageItem, PageMeta, PageModule, Violation, draft_json_schema
from agent.skeleton import Skeleton
from retrieval import Candidate, History, Retriever

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
    reserve: list[Candidate]  # popular items used by the deterministic fix


class Composer:
    def __init__(self, retriever: Retriever, backend: LLMBackend, prompts: dict[str, Prompt], rules: Rules,
                 skeleton: Skeleton, max_new_tokens: int = 160, llm_retry: bool = True):
        self.retriever, self.backend, self.prompts = retriever, backend, prompts
        self.rules, self.skeleton = rules, skeleton
        self.max_new_tokens, self.llm_retry = max_new_tokens, llm_retry

    # -- steps ----------------------------------------------------------------------------------
    def pools(self, history: History) -> Pools:
        """Each candidate is offered to one module only (the first that wants it), so modules
        cannot repeat each other; a thin pool is topped up with popular items."""
        needed = {m.source for m in self.skeleton.modules} - {"personal"}
        per_source = self.retriever.per_source(history, 60, sorted(needed))
        personal = self.retriever.candidates(history, 60)
        reserve = self.retriever.sources["popularity"].candidates(history, 120)
        taken: set[str] = set()
        modules = []
        for spec in self.skeleton.modules:
            source = personal if spec.source == "personal" else per_source[spec.source]
            pool = []
            for candidate in [*source, *reserve]:
                if len(pool) == spec.pool_size:
                    break
                if candidate.item_id not in taken:
                    pool.append(candidate)
                    taken.add(candidate.item_id)
            modules.append(pool)
        return Pools(modules, reserve)

    def messages(self, history: History, pools: Pools) -> list[dict[str, str]]:
        products = self.retriever.products
        modules = []
        for spec, pool in zip(self.skeleton.modules, pools.modules, strict=True):
            candidates = []
            for handle, c in enumerate(pool, start=1):
                p = products[c.item_id]
                candidates.append({"handle": handle, "title": p.title, "brand": p.brand,
                                   "category": p.category, "price": p.price})
            modules.append({"type": spec.type, "title": spec.title, "min_items": spec.min_items,
                            "max_items": spec.max_items, "candidates": candidates})
        return self.prompts["compose"].render(summary=history.summary, modules=modules,
                                              rules=self.rules.model_dump())

    def schema(self, pools: Pools) -> dict:
        slots = []
        for spec, pool in zip(self.skeleton.modules, pools.modules, strict=True):
            high = min(spec.max_items, self.rules.max_items_per_module, len(pool))
            low = min(max(spec.min_items, self.rules.min_items_per_module), high)
            slots.append((len(pool), low, high))
        return draft_json_schema(slots, self.rules.title_min_chars, self.rules.title_max_chars)

    def body(self, draft: PageDraft, pools: Pools) -> PageBody:
        return PageBody([
            ModuleBody(spec, module.title, [pool[h - 1].item_id for h in module.items if 1 <= h <= len(pool)])
            for spec, module, pool in zip(self.skeleton.modules, draft.modules, pools.modules, strict=False)
        ])

    def _draft(self, generation: Generation, pools: Pools) -> tuple[PageBody | None, list[Violation]]:
        try:
            draft = PageDraft.model_validate_json(generation.text)
        except ValidationError as exc:
            reason = exc.errors()[0]["msg"]
            return None, [Violation(code="unparseable", message=f"the draft is not a valid page: {reason}")]
        if len(draft.modules) != len(self.skeleton.modules):
            return None, [Violation(code="unparseable", message="the draft has the wrong number of modules")]
        body = self.body(draft, pools)
        return body, validate(body, RuleContext(self.rules, self.retriever.products))

    # -- the loop -------------------------------------------------------------------------------
    def compose(self, user_id: str) -> Homepage:
        started = time.perf_counter()
        user_id = check_user_id(user_id)
        history = self.retriever.history(user_id)
        pools = self.pools(history)
        ctx = RuleContext(self.rules, self.retriever.products)
        messages = self.messages(history, pools)
        schema = self.schema(pools)

        generations = [self.backend.generate(messages, schema, self.max_new_tokens)]
        body, violations = self._draft(generations[-1], pools)
        fixed: list[Violation] = list(violations)
        if violations and self.llm_retry:
            retry = [*messages, {"role": "assistant", "content": generations[-1].text},
                     *self.prompts["repair"].render(violations=[v.model_dump() for v in violations],
                                                    rules=self.rules.model_dump())]
            generations.append(self.backend.generate(retry, schema, self.max_new_tokens))
            body, violations = self._draft(generations[-1], pools)
        if violations or body is None:
            empty = PageBody([ModuleBody(spec, "", []) for spec in self.skeleton.modules])
            body = fix(body or empty, [[c.item_id for c in pool] for pool in pools.modules],
                       [c.item_id for c in pools.reserve], ctx)
            violations = validate(body, ctx)
        if violations:  # the catalogue cannot satisfy the rules: a configuration problem, not a page
            raise RuntimeError(f"rules cannot be met with this catalogue: {[v.message for v in violations]}")

        source = "llm" if not fixed else "repaired"
        meta = PageMeta(
            source=source, model=self.backend.model_name, adapter=self.backend.adapter,
            templates={name: p.version for name, p in self.prompts.items()}, cold_start=history.is_cold,
            tokens_generated=sum(g.tokens for g in generations),
            forward_passes=sum(g.forward_passes for g in generations), llm_calls=len(generations),
            violations_fixed=fixed,
        )
        page = self.expand(user_id, body, pools, meta)
        page.meta.latency_ms = round((time.perf_counter() - started) * 1000, 1)
        return page

    def expand(self, user_id: str, body: PageBody, pools: Pools, meta: PageMeta) -> Homepage:
        products = self.retriever.products
        known = {c.item_id: c for pool in [*pools.modules, pools.reserve] for c in pool}
        modules = []
        for mod in body.modules:
            items = []
            for item_id in mod.items:
                p, c = products[item_id], known.get(item_id)
                items.append(PageItem(
                    item_id=item_id, title=p.title, brand=p.brand, category=" > ".join(p.category_path),
                    price=p.price, reason=reason(c, products), source=c.source if c else "popularity",
                    score=round(c.score, 6) if c else 0.0,
                ))
            modules.append(PageModule(type=mod.spec.type, title=mod.title, items=items))
        return Homepage(user_id=user_id, modules=modules, meta=meta)

"""A page's stages in the order they run, for one shopper or for many at once (then the model's
calls share forward passes). Serving, batch precompute, evaluation and fine-tuning all run these.

    plan      stages/plan.py      themes for ``planned`` modules (the model, constrained)
    pools     stages/pools.py     candidates per module; what configuration fixes is placed
    draft     stages/draft.py     messages and grammar; the model writes; its text read back
    check     agent/rules.py      typed violations of the latest draft
    retry     stages/draft.py     the model asked once more, told the violations
    fix       stages/fix.py       the deterministic repair of whatever still breaks a rule
    assemble  stages/assemble.py  the ``Homepage``: catalogue facts, reasons, meta

``ask_model`` runs the first five (any fault there is the caller's to turn into the deterministic
page); ``finish`` runs the last two and always ends in a valid page or ``PageUnavailable``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import TypeVar

from agent.backends import Generation, HandleOrder
from agent.errors import BackendError, HomepageError, PageUnavailable
from agent.rules import validate
from agent.schema import Homepage, PageMeta, Violation
from agent.stages.assemble import assemble, deterministic, expand
from agent.stages.draft import UnusableDraft, parse_draft, retry_messages
from agent.stages.fix import fix
from agent.stages.plan import PLAN_TOKENS, parse_plan, plan_request
from agent.stages.state import Deps, PageState

T = TypeVar("T")
Request = tuple[list[dict[str, str]], dict]  # messages, JSON schema of the grammar
_GRACE_S = 0.25  # a backend that checks the deadline itself gets this long to say so


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:300]


def within(deadline: float | None, call: Callable[[], T]) -> T:
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


def generate(deps: Deps, requests: list[Request], tokens: int, deadline: float | None,
             orders: list[HandleOrder | None] | None = None) -> list[Generation]:
    """One generation per request: one request is one ``generate``, several share a
    ``generate_batch``; bounded by ``within`` (an engine that cannot stop early)."""
    backend, orders = deps.backend, orders or [None] * len(requests)
    if len(requests) == 1:
        (messages, schema), order = requests[0], orders[0]
        extra = {} if order is None else {"order": order}
        return [within(deadline, lambda: backend.generate(messages, schema, tokens, deadline, **extra))]
    extra = ({} if None in orders else {"orders": orders}) | ({} if deadline is None else {"deadline": deadline})
    return within(deadline, lambda: backend.generate_batch(requests, tokens, **extra))


def plan(deps: Deps, states: list[PageState], deadline: float | None) -> None:
    if not deps.skeleton.planned():
        return
    requests = [plan_request(deps.prompts["plan"], deps.rules, deps.skeleton, deps.told(s.history)) for s in states]
    for s, generation in zip(states, generate(deps, requests, PLAN_TOKENS, deadline), strict=True):
        s.generations.append(generation)
        s.themes = parse_plan(generation.text, deps.rules, deps.skeleton)


def pools(deps: Deps, states: list[PageState], deadline: float | None) -> None:
    for s in states:
        s.pools = deps.pools(s.history, s.themes)


def draft(deps: Deps, states: list[PageState], deadline: float | None) -> None:
    for s in states:
        s.messages = deps.messages(s.history, s.pools)
    requests = [(s.messages, deps.schema(s.pools)) for s in states]
    _write(deps, states, requests, deadline)


def retry(deps: Deps, states: list[PageState], deadline: float | None) -> None:
    wanted = [s for s in states if _retry_wanted(deps, s, deadline)]
    if wanted:
        requests = [(retry_messages(deps.prompts["repair"], deps.rules, s.messages, s.generations[-1].text,
                                    s.violations), deps.schema(s.pools)) for s in wanted]
        _write(deps, wanted, requests, deadline)


MODEL_STAGES = (plan, pools, draft, retry)  # check runs inside draft and retry, on each answer
WARM_UP_STAGES = (plan, pools, draft)  # a retry's prompt only adds to the draft's


def ask_model(deps: Deps, states: list[PageState], deadline: float | None, stages=MODEL_STAGES) -> None:
    for stage in stages:
        stage(deps, states, deadline)


def _write(deps: Deps, states: list[PageState], requests: list[Request], deadline: float | None) -> None:
    orders = [deps.order(s.pools) for s in states]
    for s, generation in zip(states, generate(deps, requests, deps.max_new_tokens, deadline, orders), strict=True):
        check(deps, s, generation)


def check(deps: Deps, s: PageState, generation: Generation) -> None:
    """Read and check one draft; the latest usable draft is the body."""
    s.generations.append(generation)
    try:
        chosen = parse_draft(generation.text, s.pools)
    except UnusableDraft as exc:
        s.violations = [Violation(code="unparseable", message=str(exc))]
    else:
        s.body = assemble(s.pools, chosen)
        s.violations = validate(s.body, deps.ctx)
    s.fixed.extend(s.violations)
    s.per_call.append(len(s.violations))


def _retry_wanted(deps: Deps, s: PageState, deadline: float | None) -> bool:
    """A retry costs a second generation: not when the budget left is shorter than the first took
    (the fix is quicker), nor when every violation is one a retry does not mend (``_retry_mends``)."""
    if not (s.violations and deps.llm_retry):
        return False
    if deadline is not None and deadline - time.monotonic() <= s.generations[-1].seconds:
        return False
    return any(_retry_mends(deps, s, v) for v in s.violations)


def _retry_mends(deps: Deps, s: PageState, v: Violation) -> bool:
    """An ungrounded title: the fix writes the module's grounded title at once (unless
    ``title_grounding.retry``). A handle repeated within its module, from an engine that cannot keep
    them distinct: the retry writes it again (measured through vLLM's server), the fix drops it."""
    if v.code == "ungrounded_title":
        return deps.rules.title_grounding.retry
    if v.code == "duplicate_item" and not getattr(deps.backend, "unique_items", True) and s.body is not None:
        return s.body.modules[v.module].items.count(v.item) < 2  # a repeat across modules: the retry may move it
    return True


def finish(deps: Deps, s: PageState, llm_asked: bool) -> Homepage:
    """Fix and assemble: a page that passes every rule, or ``PageUnavailable``."""
    try:
        return _page(deps, s, llm_asked)
    except HomepageError:
        raise
    except Exception as exc:  # nothing else escapes: no page can be built at all
        raise PageUnavailable(f"no page can be built for {s.user_id}: {describe(exc)}") from exc


def _page(deps: Deps, s: PageState, llm_asked: bool) -> Homepage:
    if s.pools is None:  # the plan stage failed, or the model was not asked
        s.pools = deps.pools(s.history, s.themes)
    if s.body is None and llm_asked and not s.fallback_reason:
        s.fallback_reason = f"no usable draft: {s.violations[-1].message}" if s.violations else "no draft"
    if s.body is None or s.fallback_reason:
        s.body, s.fixed = deterministic(s.pools, deps.rules), []
        path = "fallback" if llm_asked else "deterministic"
    else:
        path = "repaired" if s.fixed else "llm"
    ctx = deps.ctx
    if broken := validate(s.body, ctx):
        s.body = fix(s.body, s.pools, ctx)
        if path == "llm":
            path, s.fixed = "repaired", broken
    if remaining := validate(s.body, ctx):
        raise PageUnavailable(f"the rules cannot be met with this catalogue: {[v.message for v in remaining]}")
    backend, generations = deps.backend, s.generations
    meta = PageMeta(
        path=path, model=backend.model_name if backend else "", adapter=backend.adapter if backend else None,
        templates={name: p.version for name, p in deps.prompts.items()}, config_version=deps.config_version,
        cold_start=s.history.is_cold,
        tokens_generated=sum(g.tokens for g in generations),
        forward_passes=sum(g.forward_passes for g in generations), llm_calls=len(generations),
        prompt_tokens=sum(g.prompt_tokens for g in generations),
        prefill_ms=round(sum(g.prefill_seconds for g in generations) * 1000, 1),
        violations_fixed=s.fixed, violations_per_call=s.per_call, plan=s.pools.themes,
        fallback_reason=s.fallback_reason if path == "fallback" else None,
        notes=[*s.faults, *s.pools.faults, *s.pools.notes], composed_at=time.time(),
    )
    page = expand(s.user_id, s.body, s.pools, meta, ctx.products, deps.rules)
    page.meta.latency_ms = round((time.perf_counter() - s.started) * 1000, 2)
    return page

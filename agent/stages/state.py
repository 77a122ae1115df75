"""What every stage reads: ``Deps``, the parts a page is made with (retriever, backend, templates,
rules, skeleton and the model's knobs), and ``PageState``, one shopper's page in the making."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from agent.backends import Generation, HandleOrder, LLMBackend
from agent.prompting import Prompt, render_summary
from agent.rules import PageBody, RuleContext, Rules
from agent.schema import PlannedTheme, Violation
from agent.skeleton import Skeleton
from agent.stages.draft import draft_messages, draft_schema, handle_order
from agent.stages.pools import Pools, build_pools
from retrieval import History, Retriever
from retrieval.profile import summary_facts

WITHHELD_SUMMARY = "A shopper (history withheld from remote models)."


@dataclass(frozen=True)
class Deps:
    """The parts of a page; evaluation and fine-tuning swap them (``dataclasses.replace``), never
    an attribute of a running composer."""

    retriever: Retriever
    backend: LLMBackend | None
    prompts: dict[str, Prompt]
    rules: Rules
    skeleton: Skeleton
    max_new_tokens: int = 160
    llm_retry: bool = True
    handle_prior: float | None = None  # None: the model writes each module's order token by token
    remote_history: bool = True  # off: a remote model server is not told the shopper's summary
    config_version: str = ""  # the merchandiser files' version (agent.merchandising.version_id), in every page's meta

    @property
    def ctx(self) -> RuleContext:
        return RuleContext(self.rules, self.retriever.products, self.skeleton)

    def pools(self, history: History, themes: dict[str, PlannedTheme] | None = None) -> Pools:
        return build_pools(self.retriever, self.rules, self.skeleton, history, themes)

    def told(self, history: History) -> History:
        """The history as a prompt shows it, its summary rendered by the summary template (the pools
        are still this shopper's)."""
        if self.remote_history or not getattr(self.backend, "remote", False):
            return replace(history, summary=render_summary(self.prompts["summary"], summary_facts(history)))
        return replace(history, summary=WITHHELD_SUMMARY)

    def messages(self, history: History, pools: Pools) -> list[dict[str, str]]:
        return draft_messages(self.prompts["compose"], self.rules, self.told(history), pools, self.retriever.products)

    def schema(self, pools: Pools) -> dict:
        return draft_schema(self.rules, pools)

    def order(self, pools: Pools) -> HandleOrder | None:
        """How the model's handle scores order each module, where the backend reads them."""
        if self.handle_prior is None or self.backend is None or not self.backend.orders_handles:
            return None
        return handle_order(pools, self.rules, self.handle_prior)


@dataclass
class PageState:
    """One shopper's page in the making: each stage reads what the ones before it wrote."""

    user_id: str
    history: History
    started: float
    faults: list[str] = field(default_factory=list)  # what failed on the way (the page is then not cached)
    themes: dict[str, PlannedTheme] = field(default_factory=dict)  # plan
    pools: Pools | None = None  # pools
    messages: list[dict[str, str]] = field(default_factory=list)  # draft
    generations: list[Generation] = field(default_factory=list)
    violations: list[Violation] = field(default_factory=list)  # check: the latest draft's
    fixed: list[Violation] = field(default_factory=list)  # check: every draft's, as meta reports them
    per_call: list[int] = field(default_factory=list)
    body: PageBody | None = None  # the latest usable draft
    fallback_reason: str | None = None

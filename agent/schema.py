"""Two schemas: ``PageDraft``, what the model writes (compact: copy and candidate handles), and
``Homepage``, what the API returns (the draft expanded with catalogue facts, reasons and meta)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

_FORBID = ConfigDict(extra="forbid")


class DraftModule(BaseModel):
    model_config = _FORBID
    title: str
    items: list[int]  # handles into the module's own candidate list (1-based), in display order


class PageDraft(BaseModel):
    model_config = _FORBID
    modules: list[DraftModule]


class Violation(BaseModel):
    model_config = _FORBID
    code: str
    message: str
    module: int | None = None  # index of the module on the page
    item: str | None = None


class PageItem(BaseModel):
    model_config = _FORBID
    item_id: str
    title: str
    brand: str | None
    category: str
    price: float | None
    reason: str
    source: str
    score: float
    sponsored: bool = False


class PageModule(BaseModel):
    model_config = _FORBID
    type: str
    title: str
    items: list[PageItem]


class PlannedTheme(BaseModel):
    model_config = _FORBID
    title: str
    query: str


class PlanDraft(BaseModel):
    """What the model writes when it plans: one theme per planned module."""

    model_config = _FORBID
    themes: list[PlannedTheme]


class PageMeta(BaseModel):
    model_config = _FORBID
    path: Literal["llm", "repaired", "deterministic", "fallback"] = Field(
        description="how the page was made: the model's draft as written (llm) or after the fix (repaired); the "
        "deterministic composer as asked (deterministic) or after a fault or the time budget (fallback, see "
        "fallback_reason)")
    cached: bool = Field(False, description="served from the page cache (composed_at says when it was made)")
    model: str
    adapter: str | None = None
    templates: dict[str, str] = Field(default_factory=dict, description="template name -> content hash")
    config_version: str = Field("", description="the version of the merchandiser files (templates, rules, skeleton) "
                                "the page was composed with: the console's version id")
    cold_start: bool = False
    latency_ms: float = 0.0
    tokens_generated: int = 0
    forward_passes: int = 0
    prompt_tokens: int = 0
    prefill_ms: float = Field(0.0, description="time spent reading prompts (part of latency_ms)")
    llm_calls: int = 0
    violations_fixed: list[Violation] = Field(default_factory=list)
    violations_per_call: list[int] = Field(default_factory=list, description="rule violations after each draft")
    plan: dict[str, PlannedTheme] = Field(default_factory=dict, description="module type -> planned theme")
    fallback_reason: str | None = None
    notes: list[str] = Field(default_factory=list, description="what was degraded: a source that failed, a module "
                             "left off because its source could not fill it")
    composed_at: float = Field(0.0, description="unix time the page was composed (cache hits keep it)")


class Homepage(BaseModel):
    model_config = _FORBID
    user_id: str
    modules: list[PageModule]
    meta: PageMeta

    def item_ids(self) -> list[str]:
        """The page as one ranked list: modules top to bottom, items left to right."""
        return [item.item_id for module in self.modules for item in module.items]


class ShopperProfile(BaseModel):
    """Who the shopper is and what they do (``retrieval.profile``): an explained page's ``profile``."""

    model_config = _FORBID
    user_id: str
    attributes: dict[str, str] = Field(description="what the shop told us (homepage ingest --users); never in a "
                                       "prompt")
    events: int
    baskets: int
    segment: str = Field(description="new visitor | new | repeat | loyal | lapsed (docs/architecture.md)")
    price_band: str | None = Field(description="low | mid | high: their median price against the catalogue's terciles")
    top_categories: list[str]
    top_brands: list[str]
    purchase_cycle_days: float | None
    last_seen: float | None
    interests: list[str] | None = Field(None, description="learned: the categories the embedding model places "
                                        "nearest the shopper (the semantic source's top 30, weighted by rank)")


class ExplainedPage(Homepage):
    """The page with everything behind it: meta, each item's reason, and the shopper's profile."""

    profile: ShopperProfile


# ASCII that a title may not use (JSON/markup characters, most punctuation); every other character
# (letters and digits of any script) passes the grammar, and the title_form rule checks the rest.
_NOT_FIRST = r"\x00-\x2f\x3a-\x40\x5b-\x60\x7b-\x7f"  # a letter or digit starts it
_NOT_INSIDE = r"\x00-\x1f\x22-\x25\x28-\x2b\x2e\x2f\x3a-\x40\x5b-\x60\x7b-\x7f"  # space , ' & ! - inside
_NOT_LAST = r"\x00-\x20\x22-\x2f\x3a-\x3e\x40\x5b-\x60\x7b-\x7f"  # a letter, digit, ! or ? ends it


def title_pattern(low: int, high: int) -> str:
    """Words in any script and digits ("Crème", "Top 10 picks", "Für dich"); no quotes, markup or
    dangling punctuation. The length bound lives in the pattern alone: xgrammar ignores
    min/maxLength on a string that has a pattern."""
    return rf"^[^{_NOT_FIRST}][^{_NOT_INSIDE}]{{{max(low - 2, 0)},{high - 2}}}[^{_NOT_LAST}]$"


def query_pattern(high: int = 30) -> str:
    return rf"^[a-z][a-z ,&'-]{{2,{high - 1}}}$"


def _tuple_schema(key: str, entries: list[dict]) -> dict:
    return {
        "type": "object",
        "properties": {
            key: {"type": "array", "prefixItems": entries, "items": False,
                  "minItems": len(entries), "maxItems": len(entries)}
        },
        "required": [key],
        "additionalProperties": False,
    }


def plan_json_schema(themes: int, title_min: int, title_max: int) -> dict:
    theme = {
        "type": "object",
        "properties": {"title": {"type": "string", "pattern": title_pattern(title_min, title_max)},
                       "query": {"type": "string", "pattern": query_pattern()}},
        "required": ["title", "query"],
        "additionalProperties": False,
    }
    return _tuple_schema("themes", [theme] * themes)


def draft_json_schema(slots: list[tuple[int, int, str | None]], title_min: int, title_max: int) -> dict:
    """The JSON schema the decoder compiles for one request. Module k picks exactly ``count`` of the
    handles 1..n of its own pool (n <= 9: one token each; a fixed count lets the grammar write the
    commas), each at most once (``uniqueItems``: the embedded decoder enforces it, other engines
    leave it to the rules). A title already decided (a planned theme) is a constant: the grammar
    writes it, not the model."""
    modules = [
        {
            "type": "object",
            "properties": {
                "title": {"const": fixed} if fixed else {"type": "string",
                                                         "pattern": title_pattern(title_min, title_max)},
                # an empty pool offers no handle: the array can only be empty (an empty enum does not compile)
                "items": ({"type": "array", "items": {"enum": list(range(1, n + 1))}, "uniqueItems": True,
                           "minItems": count, "maxItems": count} if n and count else {"type": "array", "maxItems": 0}),
            },
            "required": ["title", "items"],
            "additionalProperties": False,
        }
        for n, count, fixed in slots
    ]
    return _tuple_schema("modules", modules)

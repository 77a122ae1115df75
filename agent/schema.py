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


class PageModule(BaseModel):
    model_config = _FORBID
    type: str
    title: str
    items: list[PageItem]


class PageMeta(BaseModel):
    model_config = _FORBID
    source: Literal["llm", "repaired", "fallback", "cache"]
    model: str
    adapter: str | None = None
    templates: dict[str, str] = Field(default_factory=dict, description="template name -> content hash")
    cold_start: bool = False
    latency_ms: float = 0.0
    tokens_generated: int = 0
    forward_passes: int = 0
    llm_calls: int = 0
    violations_fixed: list[Violation] = Field(default_factory=list)


class Homepage(BaseModel):
    model_config = _FORBID
    user_id: str
    modules: list[PageModule]
    meta: PageMeta

    def item_ids(self) -> list[str]:
        """The page as one ranked list: modules top to bottom, items left to right."""
        return [item.item_id for module in self.modules for item in module.items]


def title_pattern(low: int, high: int) -> str:
    """Plain words, no numbering, quotes or markup. The length bound lives in the pattern because
    xgrammar ignores min/maxLength on a string that has a pattern."""
    return rf"^[A-Z][A-Za-z ,'&!-]{{{low - 1},{high - 1}}}$"


def draft_json_schema(slots: list[tuple[int, int, int]], title_min: int, title_max: int) -> dict:
    """The JSON schema the decoder compiles for one request. Module k lists the handles 1..n of its
    own pool (n <= 9: one token each), within its item-count bounds, each at most once
    (``uniqueItems``: the embedded decoder enforces it, other engines leave it to the rules)."""
    modules = [
        {
            "type": "object",
            "properties": {
                "title": {"type": "string", "minLength": title_min, "maxLength": title_max,
                          "pattern": title_pattern(title_min, title_max)},
                "items": {"type": "array", "items": {"enum": list(range(1, n + 1))}, "uniqueItems": True,
                          "minItems": low, "maxItems": high},
            },
            "required": ["title", "items"],
            "additionalProperties": False,
        }
        for n, low, high in slots
    ]
    return {
        "type": "object",
        "properties": {
            "modules": {
                "type": "array", "prefixItems": modules, "items": False,
                "minItems": len(modules), "maxItems": len(modules),
            }
        },
        "required": ["modules"],
        "additionalProperties": False,
    }

"""The page skeleton that merchandisers configure: modules, their candidates and item counts,
pinned items, campaign modules, sponsored slots with a page quota, and exclusions.

Module sources:
- ``personal``: all candidate sources fused;
- a candidate source name (``covisit``, ``semantic``, ``similar_users``, ``popularity``, ...);
- ``planned``: the LLM plans the theme (a title and a search query) for this user; ``title`` and
  ``query`` are what the deterministic composer uses when there is no plan;
- ``campaign``: exactly the listed ``items`` with the given ``title``; the LLM does not touch it.

Whether a module may show items the shopper already has is the module's ``show_owned`` (a
``buy_again`` module must; discovery modules do not).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, model_validator

from agent.configfile import load_yaml_model
from retrieval.records import brand_key

# what fills a module besides a registered candidate source (``retrieval.sources.SOURCES``)
PERSONAL, PLANNED, CAMPAIGN = "personal", "planned", "campaign"
MODULE_KINDS = (PERSONAL, PLANNED, CAMPAIGN)


class ModuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="module type, snake_case, unique on the page")
    source: str = Field("personal", description="personal | planned | campaign | a candidate source name")
    title: str = Field(min_length=1, description="the copy used when the model's copy is unusable or absent")
    title_template: str | None = Field(
        None, description="copy the fix writes when the model's title is unusable, from the module's own products: "
        "{category} is the category most of them are filed under (a leaf, else their department); the configured "
        "title where the result breaks a title rule")
    query: str | None = Field(None, description="planned modules: the search used when there is no plan")
    items: list[str] = Field(default_factory=list, description="campaign modules: the items, in order")
    pinned: list[str] = Field(default_factory=list, description="items always shown first in this module")
    min_items: int = Field(2, ge=1)
    max_items: int = Field(6, ge=1)
    sponsored_slots: int = Field(0, ge=0, description="positions in this module given to sponsored items")
    sponsored_position: int = Field(2, ge=1, description="1-based position of the first sponsored slot")
    show_owned: bool = Field(False, description="may show items the shopper already has (a buy-again module); "
                             "discovery modules leave them out")
    keep_order: bool = Field(False, description="a candidate the brand quota refuses closes the module once it has its "
                             "minimum, and opens the next one, so the page keeps its source's order (cards of a grid); "
                             "false: it is skipped and the module filled past it")
    pool: int | None = Field(
        None, ge=1, le=9, description="candidates offered to the model, at most 9 so each handle is one token "
        "(default: min(2 x max_items, 9))"
    )

    @model_validator(mode="after")
    def _consistent(self) -> ModuleSpec:
        if self.min_items > self.max_items:
            raise ValueError(f"min_items ({self.min_items}) must be <= max_items ({self.max_items})")
        if self.is_campaign and not self.items:
            raise ValueError("a campaign module needs its items")
        if not self.is_campaign and self.items:
            raise ValueError("items are only for campaign modules (use pinned to fix items in a module)")
        if self.source == "buy_again" and not self.show_owned:
            raise ValueError("a buy_again module shows items the shopper has: set show_owned: true")
        if self.source == PLANNED and not self.query:
            raise ValueError("a planned module needs a fallback query")
        if self.title_template is not None:
            try:
                self.title_template.format(category="X")
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(f"title_template {self.title_template!r}: only {{category}} may be filled in "
                                 f"({exc})") from None
        if len(self.pinned) + self.sponsored_slots > self.max_items:
            raise ValueError("pinned items and sponsored slots exceed max_items")
        return self

    @property
    def is_campaign(self) -> bool:
        return self.source == CAMPAIGN

    @property
    def candidate_source(self) -> str | None:
        """The registered candidate source that fills the module (None: personal, planned, campaign)."""
        return None if self.source in MODULE_KINDS else self.source

    @property
    def pool_size(self) -> int:
        return self.pool or min(2 * self.max_items, 9)



class Exclusions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    categories: list[str] = Field(default_factory=list, description="any level of the category path")
    brands: list[str] = Field(default_factory=list)


class Skeleton(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modules: list[ModuleSpec] = Field(min_length=1)
    sponsored_items: list[str] = Field(default_factory=list, description="the pool sponsored slots draw from")
    max_sponsored: int = Field(1, ge=0, description="quota: sponsored items on one page at most")
    exclude: Exclusions = Field(default_factory=Exclusions)
    order: Literal["fixed"] = Field("fixed", description="modules appear in the order listed")
    _path: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _consistent(self) -> Skeleton:
        types = [m.type for m in self.modules]
        duplicates = sorted({t for t in types if types.count(t) > 1})
        if duplicates:
            raise ValueError(f"module types must be unique, repeated: {duplicates}")
        if any(m.sponsored_slots for m in self.modules) and not self.sponsored_items:
            raise ValueError("sponsored slots need sponsored_items to fill them")
        return self

    @classmethod
    def load(cls, path: Path) -> Skeleton:
        skeleton = load_yaml_model(path, cls)
        skeleton._path = Path(path)
        return skeleton

    @property
    def path(self) -> Path | None:
        """The file it was loaded from, for error messages."""
        return self._path

    def planned(self) -> list[ModuleSpec]:
        return [m for m in self.modules if m.source == PLANNED]

    def configured_items(self) -> dict[str, str]:
        """Every item id configuration names -> where (for the load-time catalogue check)."""
        where = {i: "sponsored_items" for i in self.sponsored_items}
        for m in self.modules:
            where |= {i: f"modules.{m.type}.items" for i in m.items}
            where |= {i: f"modules.{m.type}.pinned" for i in m.pinned}
        return where

    def excludes(self, product) -> bool:
        categories = {c.casefold() for c in self.exclude.categories}
        brands = {brand_key(b) for b in self.exclude.brands}
        return bool(categories & {c.casefold() for c in product.category_path}) or (
            product.brand_key is not None and product.brand_key in brands
        )

"""The page skeleton that merchandisers configure: modules, their candidate source and item counts."""

from __future__ import annotations

from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, model_validator

from agent.configfile import load_yaml_model


class ModuleSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: str = Field(pattern=r"^[a-z][a-z0-9_]*$", description="module type, snake_case")
    source: str = Field("personal", description="'personal' (fused) or one candidate source name")
    title: str = Field(min_length=1, description="fallback copy when the model's copy is unusable")
    min_items: int = Field(2, ge=1)
    max_items: int = Field(6, ge=1)
    pool: int | None = Field(
        None, ge=1, le=9, description="candidates offered to the model, at most 9 so each handle is one token "
        "(default: min(2 x max_items, 9))"
    )

    @model_validator(mode="after")
    def _bounds(self) -> ModuleSpec:
        if self.max_items > self.pool_size:
            raise ValueError(f"max_items ({self.max_items}) must be <= pool ({self.pool_size})")
        if self.min_items > self.max_items:
            raise ValueError(f"min_items ({self.min_items}) must be <= max_items ({self.max_items})")
        return self

    @property
    def pool_size(self) -> int:
        return self.pool or min(2 * self.max_items, 9)


class Skeleton(BaseModel):
    model_config = ConfigDict(extra="forbid")

    modules: list[ModuleSpec] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_types(self) -> Skeleton:
        types = [m.type for m in self.modules]
        duplicates = sorted({t for t in types if types.count(t) > 1})
        if duplicates:
            raise ValueError(f"module types must be unique, repeated: {duplicates}")
        return self

    @classmethod
    def load(cls, path: Path) -> Skeleton:
        return load_yaml_model(path, cls)

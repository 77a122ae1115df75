"""Judge criteria: template files and their kind, loaded like the composer's prompts (sandboxed,
strict, checked on a sample when they load), and the verdict schema each kind answers in."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from agent.configfile import load_yaml_model
from agent.errors import ConfigError
from agent.prompting import TemplateFile, load_template

CRITERIA_DIR = Path(__file__).resolve().parent.parent / "suites" / "criteria"
RATIONALE_CHARS = 80  # a short reason first: it costs tokens, and a long one is no better a judge

_ITEM = {"title": "Argan Oil Serum", "brand": "Acme", "category": "Face Oils", "price": 12.0}
_MODULE = {"title": "Glow essentials", "products": [_ITEM]}
SAMPLES = {  # the variables each kind of criterion may use, with sample values
    "pointwise": {"title": "Glow essentials", "items": [_ITEM], "banned_words": ["free"]},
    "pairwise": {"summary": "Interacted with 3 products.", "a": [_MODULE], "b": [_MODULE]},
}


class CriterionSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["pointwise", "pairwise"]
    template: str
    about: str = ""


class CriteriaFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    criteria: dict[str, CriterionSpec] = Field(min_length=1)


@dataclass(frozen=True)
class Criterion:
    name: str
    kind: str  # "pointwise" (one module, a score 1-5) or "pairwise" (two pages: A, B or tie)
    about: str
    template: TemplateFile

    @property
    def schema(self) -> dict:
        """What the judge writes, under the grammar: the reason first, then the verdict."""
        verdict = ({"score": {"enum": [1, 2, 3, 4, 5]}} if self.kind == "pointwise"
                   else {"winner": {"enum": ["A", "B", "tie"]}})
        return {"type": "object", "additionalProperties": False, "required": ["rationale", *verdict],
                "properties": {"rationale": {"type": "string", "maxLength": RATIONALE_CHARS}, **verdict}}


@dataclass(frozen=True)
class Criteria:
    system: TemplateFile
    by_name: dict[str, Criterion]

    @property
    def version(self) -> str:
        return ",".join(f"{n}:{c.template.version}" for n, c in sorted(self.by_name.items())) + \
            f",system:{self.system.version}"


def load_criteria(folder: Path = CRITERIA_DIR) -> Criteria:
    """``criteria.yaml`` (name -> kind, template) and ``system.jinja`` of ``folder``; a broken file is
    refused with its file and line."""
    folder = Path(folder)
    spec_path = folder / "criteria.yaml"
    if not spec_path.exists():
        raise ConfigError(f"{spec_path}: no criteria file")
    specs = load_yaml_model(spec_path, CriteriaFile).criteria
    system = load_template(folder / "system.jinja", {})
    return Criteria(system, {name: Criterion(name, spec.kind, spec.about,
                                             load_template(folder / spec.template, SAMPLES[spec.kind]))
                             for name, spec in specs.items()})

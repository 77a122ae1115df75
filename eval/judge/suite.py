"""A judge suite file: what to compare, for whom, on which criteria, by which judges.

Close to inspect-ai's vocabulary: a suite is a task; its dataset is the cases (compared pages and
known-answer cases); each judge is a model; each criterion a scorer's prompt. Paths are relative to
the suite file. A name that does not exist (configuration, criterion, judge, data folder) is refused
with the file, line and field.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field

from agent.configfile import _line_of, load_yaml_model
from agent.errors import ConfigError
from agent.settings import SAMPLE_DIR

# settings a configuration or a judge may change (the rest is the deployment's)
OVERRIDABLE = {"prompts_dir", "rules_file", "skeleton_file", "backend", "model", "gguf_file", "adapter", "dtype",
               "openai_base_url", "handle_prior", "max_new_tokens", "llm_retry", "remote_history"}


class Configuration(BaseModel):
    """One way of making pages: settings overrides; ``deterministic: true`` is the page without the model."""

    model_config = ConfigDict(extra="forbid")
    deterministic: bool = False
    settings: dict[str, Any] = Field(default_factory=dict)


class JudgeSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["model", "embedding", "head"] = Field(
        "model", description="model: a backend asked the criteria prompts; embedding: the store's sentence "
        "embeddings and fixed rules (eval/judge/embedding.py), the cheap baseline; head: a scoring head trained on "
        "the model's final state (eval/judge/head.py; its folder in head)")
    head: Path | None = Field(None, description="kind head: the folder `homepage finetune` wrote (task: judge_head)")
    settings: dict[str, Any] = Field(default_factory=dict, description="backend, model, adapter, openai_base_url")
    criteria_dir: Path | None = Field(None, description="another folder of criteria templates (a prompt variant)")


class Suite(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    data: Path = Field(SAMPLE_DIR, description="folder with items.csv and interactions.csv")
    users: int = Field(20, ge=1, description="validation users whose pages are compared (seeded sample)")
    calibration_users: int = Field(20, ge=1, description="other validation users the known-answer cases come from")
    seed: int = 0
    repeats: int = Field(1, ge=1, le=5, description="each case judged this many times, products shuffled within "
                         "modules from the second on; the majority verdict counts")
    criteria: list[str] = Field(min_length=1)
    configurations: dict[str, Configuration] = Field(min_length=2)
    comparisons: list[tuple[str, str]] = Field(min_length=1)
    judges: dict[str, JudgeSpec] = Field(min_length=1)
    vote: list[str] = Field(default_factory=list, description="judges whose majority is reported as the judge 'vote'")
    trust_bar: float = Field(0.75, gt=0, le=1, description="known-answer accuracy under which a judge is marked "
                             "not trusted for a criterion")
    batch: int = Field(8, ge=1, le=32, description="judge calls per batch (the backend's forward passes are shared)")


def load_suite(path: Path, known_criteria: set[str]) -> Suite:
    """The suite at ``path``, its names checked against each other and ``known_criteria``."""
    path = Path(path)
    suite = load_yaml_model(path, Suite)
    node = yaml.compose(path.read_text(encoding="utf-8"))

    def refuse(loc: tuple, message: str) -> None:
        raise ConfigError(f"{path}:{_line_of(node, loc)}: {'.'.join(map(str, loc))}: {message}")

    for i, name in enumerate(suite.criteria):
        if name not in known_criteria:
            refuse(("criteria", i), f"unknown criterion {name!r}; known: {', '.join(sorted(known_criteria))}")
    for i, pair in enumerate(suite.comparisons):
        for j, name in enumerate(pair):
            if name not in suite.configurations:
                refuse(("comparisons", i, j), f"unknown configuration {name!r}; "
                       f"configured: {', '.join(suite.configurations)}")
        if pair[0] == pair[1]:
            refuse(("comparisons", i), "a configuration compared with itself")
    for i, name in enumerate(suite.vote):
        if name not in suite.judges:
            refuse(("vote", i), f"unknown judge {name!r}; judges: {', '.join(suite.judges)}")
    for kind, entries in (("configurations", suite.configurations), ("judges", suite.judges)):
        for name, entry in entries.items():
            for key in entry.settings:
                if key not in OVERRIDABLE:
                    refuse((kind, name, "settings", key), f"not a setting a suite may change; "
                           f"one of: {', '.join(sorted(OVERRIDABLE))}")
    base = path.parent
    suite.data = (base / suite.data).resolve() if not suite.data.is_absolute() else suite.data
    if not (suite.data / "items.csv").exists() or not (suite.data / "interactions.csv").exists():
        refuse(("data",), f"{suite.data}: expected items.csv and interactions.csv in it")
    for entries in (suite.configurations, suite.judges):
        for entry in entries.values():
            for key in ("prompts_dir", "rules_file", "skeleton_file", "adapter"):  # an adapter may be a served name
                value = entry.settings.get(key)
                if isinstance(value, str) and not Path(value).is_absolute() and (base / value).exists():
                    entry.settings[key] = str((base / value).resolve())
    for name, judge in suite.judges.items():
        if judge.kind == "head" and judge.head is None:
            refuse(("judges", name), "kind head needs head: the folder of a trained head")
        if judge.head is not None and not judge.head.is_absolute():
            judge.head = (base / judge.head).resolve()
        if judge.criteria_dir is not None and not judge.criteria_dir.is_absolute():
            judge.criteria_dir = (base / judge.criteria_dir).resolve()
        if judge.criteria_dir is not None and not (judge.criteria_dir / "criteria.yaml").exists():
            refuse(("judges", name, "criteria_dir"), f"{judge.criteria_dir}: no criteria.yaml there")
    return suite


def suite_users(suite: Suite, users: Iterable[str]) -> tuple[list[str], list[str]]:
    """The compared and the calibration users: disjoint seeded samples of ``users`` (the validation
    users; a judge adapter's training leaves both out)."""
    order = sorted(users)
    random.Random(suite.seed).shuffle(order)
    return sorted(order[:suite.users]), sorted(order[suite.users:suite.users + suite.calibration_users])

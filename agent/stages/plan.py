"""The plan stage, for skeletons with ``planned`` modules: the model picks a theme (a title and
a search query) per planned module for this shopper. A plan that cannot be used — unparseable, or
a title or query breaking a rule — is dropped, and the configured title and query stand in."""

from __future__ import annotations

from pydantic import ValidationError

from agent.prompting import Prompt
from agent.rules import Rules
from agent.schema import PlanDraft, PlannedTheme, plan_json_schema
from agent.skeleton import Skeleton
from retrieval import History

PLAN_TOKENS = 60


def plan_request(prompt: Prompt, rules: Rules, skeleton: Skeleton, history: History) -> tuple[list[dict], dict]:
    planned = skeleton.planned()
    themes = [{"type": m.type, "title": m.title, "query": m.query} for m in planned]
    messages = prompt.render(summary=history.summary, themes=themes, rules=rules.model_dump())
    return messages, plan_json_schema(len(themes), rules.title_min_chars, rules.title_max_chars)


def parse_plan(text: str, rules: Rules, skeleton: Skeleton) -> dict[str, PlannedTheme]:
    try:
        plan = PlanDraft.model_validate_json(text)
    except ValidationError:
        return {}
    themes = {}
    for spec, theme in zip(skeleton.planned(), plan.themes, strict=False):
        # the query reaches item reasons ("Matches <query>"): every user-facing string is checked
        if rules.title_problem(theme.title) is None and not rules.banned_in(theme.query):
            themes[spec.type] = theme
    return themes

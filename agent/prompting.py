"""Prompt templates: files under ``prompts/``, rendered through LangChain's jinja2 prompt templates.

Every template is checked when it loads, so a merchandiser's typo fails with the file, line and
variable named, never as a prompt with a hole in it:
1. it must parse (sandboxed Jinja);
2. it may only use the variables its prompt provides;
3. it must render a sample context under ``StrictUndefined`` (this catches ``module.tilte``).
"""

from __future__ import annotations

import hashlib
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from jinja2 import FileSystemLoader, StrictUndefined, TemplateError, TemplateSyntaxError, meta
from jinja2.sandbox import SandboxedEnvironment
from langchain_core.prompts import ChatPromptTemplate

from agent.errors import ConfigError

_SAMPLE_CANDIDATE = {"handle": 1, "title": "Argan Oil Serum", "brand": "Acme", "category": "Oils", "price": 12.0}
_SAMPLE_MODULE = {"type": "for_you", "title": "Picked for you", "theme": "Glow essentials", "count": 3,
                  "min_items": 2, "max_items": 4, "candidates": [_SAMPLE_CANDIDATE]}
_SAMPLE_THEME = {"type": "for_you", "title": "Picked for you", "query": "vitamin c serum"}
_SAMPLE_RULES = {"title_max_chars": 40, "title_min_chars": 3, "banned_words": ["free"], "max_items_per_brand": 2,
                 "min_categories": 3}

# prompt name -> its messages (role, file) and the variables (with sample values) it may use
PROMPTS: dict[str, tuple[list[tuple[str, str]], dict[str, Any]]] = {
    # the system prompt is shared, so its KV cache is computed once per process (agent.backends.hf)
    "plan": (
        [("system", "system.jinja"), ("human", "plan.user.jinja")],
        {"summary": "Interacted with 3 products.", "themes": [_SAMPLE_THEME], "rules": _SAMPLE_RULES},
    ),
    "compose": (
        [("system", "system.jinja"), ("human", "compose.user.jinja")],
        {"summary": "Interacted with 3 products.", "modules": [_SAMPLE_MODULE], "rules": _SAMPLE_RULES},
    ),
    "repair": (
        [("human", "repair.user.jinja")],
        {"violations": [{"code": "duplicate_item", "message": "item 3 appears twice"}], "rules": _SAMPLE_RULES},
    ),
}
_ROLES = {"system": "system", "human": "user", "ai": "assistant"}


@dataclass
class Prompt:
    name: str
    template: ChatPromptTemplate
    variables: frozenset[str]
    version: str  # hash of the template files: goes into every page's meta

    def render(self, **values: Any) -> list[dict[str, str]]:
        missing = self.variables - set(values)
        if missing:
            raise ConfigError(f"prompt {self.name!r}: values missing for {sorted(missing)}")
        messages = self.template.format_messages(**{k: values[k] for k in self.variables})
        return [{"role": _ROLES[m.type], "content": str(m.content)} for m in messages]


def _line_of(source: str, name: str) -> int:
    for number, text in enumerate(source.splitlines(), start=1):
        if name in text:
            return number
    return 1


def load_prompt(prompts_dir: Path, name: str) -> Prompt:
    messages, sample = PROMPTS[name]
    env = SandboxedEnvironment(loader=FileSystemLoader(str(prompts_dir)), undefined=StrictUndefined,
                               keep_trailing_newline=True)
    parts, digest, used = [], hashlib.sha1(), set()
    for role, file in messages:
        path = Path(prompts_dir) / file
        try:
            source = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"{path}: cannot read template ({exc.strerror})") from None
        try:
            parsed = env.parse(source, filename=str(path))
        except TemplateSyntaxError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: template syntax error: {exc.message}") from None
        unknown = sorted(meta.find_undeclared_variables(parsed) - set(sample))
        if unknown:
            raise ConfigError(f"{path}:{_line_of(source, unknown[0])}: unknown variable {unknown[0]!r} "
                              f"(this template may use: {', '.join(sorted(sample))})")
        try:
            env.get_template(file).render(**sample)
        except TemplateError as exc:  # an undefined attribute, or access the sandbox refuses
            frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename == str(path)]
            line = frames[-1].lineno if frames else 1
            raise ConfigError(f"{path}:{line}: {exc.message}") from None
        used |= meta.find_undeclared_variables(parsed)
        digest.update(source.encode())
        parts.append((role, source))
    template = ChatPromptTemplate.from_messages(parts, template_format="jinja2")
    return Prompt(name, template, frozenset(used), digest.hexdigest()[:10])


def load_prompts(prompts_dir: Path) -> dict[str, Prompt]:
    return {name: load_prompt(prompts_dir, name) for name in PROMPTS}

"""``docs/configuration.md``, written from the ``Settings`` fields themselves (their defaults and
descriptions), so the reference cannot drift from the code: ``homepage settings --markdown``
prints it, and a test keeps the committed file equal to it."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo

from agent.settings import Settings

_ROOT = Path(__file__).resolve().parent.parent

_HEAD = """# Configuration

One settings object (`agent/settings.py`) holds every setting of the product. Each is read, in
order of precedence, from: explicit arguments (the `--store` flag) > environment variables
`HOMEPAGE_<NAME>` (nested fields with `__`, e.g. `HOMEPAGE_EVENT_COLUMNS__USER_ID=customer`) >
`homepage.toml` in the working folder > the default below. Nothing else reads the environment.

Merchandisers' files (templates, rules, skeleton) are named here and described in
[architecture.md](architecture.md). This page is generated: `homepage settings --markdown`.
"""


def _default(field: FieldInfo) -> str:
    value = field.get_default(call_default_factory=True)
    if value is None:
        return "unset"
    if isinstance(value, SecretStr):
        return "(secret)"
    if isinstance(value, BaseModel):
        return "see below"
    if isinstance(value, Path):
        with contextlib.suppress(ValueError):  # shown relative to the checkout, as a reader sees it
            value = value.relative_to(_ROOT)
        return f"`{value}`"
    if isinstance(value, dict):
        return f"`{json.dumps(value, sort_keys=True)}`"
    return f"`{value}`"


def _cell(text: str | None) -> str:
    return (text or "").replace("|", "\\|").replace("\n", " ")


def _table(model: type[BaseModel], prefix: str) -> list[str]:
    lines = ["| setting | environment variable | default | meaning |", "| --- | --- | --- | --- |"]
    for name, field in model.model_fields.items():
        lines.append(f"| `{name}` | `{prefix}{name.upper()}` | {_cell(_default(field))} | {_cell(field.description)} |")
    return lines


def markdown() -> str:
    parts = [_HEAD, *_table(Settings, "HOMEPAGE_")]
    for name, field in Settings.model_fields.items():
        default = field.get_default(call_default_factory=True)
        if isinstance(default, BaseModel):
            parts += ["", f"## `{name}`", "", _cell(field.description) or f"Fields of `{name}`.", "",
                      *_table(type(default), f"HOMEPAGE_{name.upper()}__")]
    return "\n".join(parts) + "\n"

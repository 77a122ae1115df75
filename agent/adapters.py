"""LoRA adapter metadata: what an adapter was trained on, written next to its weights by
``finetune`` and checked by serving, so an adapter is never applied to a model it was not made for."""

from __future__ import annotations

import json
from pathlib import Path

from agent.errors import ConfigError

METADATA_FILE = "homepage_adapter.json"


def read_metadata(adapter: str | Path) -> dict:
    """The adapter's metadata; an adapter made elsewhere (no metadata file) gives ``{}``."""
    path = Path(adapter) / METADATA_FILE
    if not path.exists():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{path}: unreadable adapter metadata ({exc})") from None


def write_metadata(adapter: str | Path, metadata: dict) -> None:
    path = Path(adapter) / METADATA_FILE
    path.write_text(json.dumps(metadata, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")


def check_adapter(adapter: str | Path, model: str) -> dict:
    """Refuse a missing adapter folder, or one whose metadata names another base model."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").exists():
        raise ConfigError(f"adapter: {folder} is not a LoRA adapter folder (no adapter_config.json)")
    metadata = read_metadata(folder)
    base = metadata.get("base_model")
    if base and base != model:
        raise ConfigError(f"adapter: {folder} was trained on {base!r}, but the model setting is {model!r}")
    return metadata

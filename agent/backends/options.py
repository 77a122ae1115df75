"""Each LLM backend's options: which settings it reads, typed and checked when the settings load.

``Settings`` owns every default (one place, documented in docs/configuration.md); an options class
names the fields its backend reads and how they must look. The classes are light (no engine is
imported), so a wrong value is refused when the settings load, not when the model is.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from agent.errors import ConfigError


class BackendOptions(BaseModel):
    """What every backend reads: the model and the adapter on it."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())
    model: str
    adapter: str | None

    @classmethod
    def read(cls, settings) -> BackendOptions:
        """This backend's fields of ``settings``; a wrong one raises ``ConfigError`` naming it."""
        try:
            return cls.model_validate({name: getattr(settings, name) for name in cls.model_fields})
        except ValidationError as exc:
            from agent.settings import setting_source

            problems = []
            for error in exc.errors():
                name = ".".join(map(str, error["loc"]))
                message = error["msg"].removeprefix("Value error, ")
                problems.append(f"setting {name} ({setting_source(name)}), read by backend "
                                f"{settings.backend!r}: {message}")
            raise ConfigError("; ".join(problems)) from None


class TransformersOptions(BackendOptions):
    """The embedded engine (CPU by default): a GGUF or safetensors model loaded in this process."""

    gguf_file: str | None
    dtype: Literal["float32", "bfloat16"]
    model_cache_dir: Path
    speculate: int
    share_system_prefix: bool


class VLLMOptions(BackendOptions):
    """vLLM in process. It has no float32 kernels for most models: float32 is served as bfloat16."""

    dtype: Literal["bfloat16", "float16"]

    @field_validator("dtype", mode="before")
    @classmethod
    def _half_precision(cls, value: str) -> str:
        return "bfloat16" if value == "float32" else value


class OpenAIOptions(BackendOptions):
    """A model server speaking the OpenAI chat API; an adapter is asked for by its served name."""

    openai_base_url: str

    @field_validator("openai_base_url")
    @classmethod
    def _http(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// address")
        return value

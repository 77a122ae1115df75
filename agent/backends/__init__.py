"""LLM backends: render messages -> text constrained by a JSON schema -> counts for the meta.

One small interface and a registry; the default is ``transformers`` (embedded, CPU). ``vllm``
(in-process engine) and ``openai`` (an OpenAI-compatible server such as ``vllm serve``) are for
GPUs and scale-out; their packages are imported only when chosen.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from agent.backends.options import BackendOptions, OpenAIOptions, TransformersOptions, VLLMOptions
from agent.errors import ConfigError

if TYPE_CHECKING:
    from agent.settings import Settings


@dataclass
class Generation:
    text: str
    tokens: int  # tokens in the output (model-chosen + grammar-forced)
    forward_passes: int  # model steps; lower than tokens when the grammar forces structure
    seconds: float
    prompt_tokens: int = 0
    prefill_seconds: float = 0.0  # the part of `seconds` spent reading the prompt
    # per handle array ordered by ``HandleOrder``: the model's log-probability of each allowed handle
    handle_logprobs: list[dict[int, float]] = field(default_factory=list)


# (array number on the page, {handle: the model's log-probability as the array's first value})
# -> the handles to write, in order (a verbalizer: every candidate scored in one forward pass)
HandleOrder = Callable[[int, dict[int, float]], list[int]]


class LLMBackend(ABC):
    name = "base"
    remote = False  # True: prompts leave this process (a model server)
    model_name = ""
    adapter: str | None = None
    # reads every candidate handle's score in one pass and writes the order ``generate(order=...)``
    # gives; engines without it write the order token by token
    orders_handles = False
    # keeps a module's handles distinct, as the schema's ``uniqueItems`` asks (a server that refuses
    # the keyword does not: a retry at temperature 0 writes the same repeats again)
    unique_items = True

    @classmethod
    def from_options(cls, options: BackendOptions) -> LLMBackend:
        """The backend its options describe (``BACKENDS[name].Options``); registered engines override it."""
        raise NotImplementedError(f"backend {cls.name!r} is built directly, not from settings")

    @classmethod
    def from_settings(cls, settings: Settings) -> LLMBackend:
        return cls.from_options(BACKENDS[cls.name].Options.read(settings))

    @abstractmethod
    def generate(
        self, messages: list[dict[str, str]], schema: dict, max_new_tokens: int, deadline: float | None = None
    ) -> Generation:
        """Greedy generation whose text is valid JSON for ``schema``. ``deadline`` is a
        ``time.monotonic()`` value: past it, raise ``BackendError(retryable=True)``."""

    def generate_batch(
        self, requests: list[tuple[list[dict[str, str]], dict]], max_new_tokens: int, deadline: float | None = None
    ) -> list[Generation]:
        """Several pages at once (batch precompute, a server's concurrent requests); backends that
        batch natively override this. ``deadline`` as in ``generate``, for the whole batch."""
        return [self.generate(messages, schema, max_new_tokens, deadline) for messages, schema in requests]


@dataclass(frozen=True)
class Registered:
    target: str  # "module:Class", imported on first use so optional engines stay optional
    Options: type[BackendOptions]  # the settings it reads, checked when the settings load


BACKENDS: dict[str, Registered] = {}


def register_backend(name: str, target: str, options: type[BackendOptions]) -> None:
    if name in BACKENDS:
        raise ValueError(f"LLM backend {name!r} is registered twice")
    BACKENDS[name] = Registered(target, options)


register_backend("transformers", "agent.backends.hf:TransformersBackend", TransformersOptions)
register_backend("vllm", "agent.backends.vllm:VLLMBackend", VLLMOptions)
register_backend("openai", "agent.backends.openai:OpenAICompatibleBackend", OpenAIOptions)


def backend_options(settings: Settings) -> BackendOptions:
    """The chosen backend's options read from ``settings`` (``ConfigError`` naming a wrong one)."""
    if settings.backend not in BACKENDS:
        raise ConfigError(f"backend: unknown LLM backend {settings.backend!r}; known: {sorted(BACKENDS)}")
    return BACKENDS[settings.backend].Options.read(settings)


def load_backend(settings: Settings) -> LLMBackend:
    options = backend_options(settings)
    module, cls = BACKENDS[settings.backend].target.split(":")
    return getattr(importlib.import_module(module), cls).from_options(options)

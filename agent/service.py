"""Wiring: settings -> retriever, backend, prompts, rules, skeleton -> a Composer, once per process."""

from __future__ import annotations

import logging
import threading

from agent.adapters import check_adapter_inputs, file_digest
from agent.backends import LLMBackend, load_backend
from agent.cache import PageCache
from agent.composer import Composer
from agent.merchandising import live_version
from agent.prompting import load_prompts
from agent.rules import Rules
from agent.schema import Homepage
from agent.settings import Settings
from agent.skeleton import Skeleton
from retrieval import Retriever

log = logging.getLogger(__name__)
_composers: dict[str, Composer] = {}
_lock = threading.Lock()


def composer_for(settings: Settings, retriever: Retriever, backend: LLMBackend | None = None,
                 **overrides) -> Composer:
    """A composer with the configured templates, rules and skeleton over ``retriever``; ``overrides``
    replace the configured ``llm_retry``, ``budget_s``, ``cache`` or ``handle_prior``. Without a backend it composes
    deterministically (prompts and pools still render exactly as in serving)."""
    prompts = load_prompts(settings.prompts_dir)
    rules = Rules.load(settings.rules_file)
    skeleton = Skeleton.load(settings.skeleton_file)
    budget = None if settings.budget_ms is None else settings.budget_ms / 1000
    options = {"llm_retry": settings.llm_retry, "budget_s": budget, "cache": PageCache(settings.cache_users),
               "handle_prior": settings.handle_prior, "remote_history": settings.remote_history,
               "config_version": live_version(settings)}
    return Composer(retriever, backend, prompts, rules, skeleton, settings.max_new_tokens, **(options | overrides))


def adapter_inputs(settings: Settings, composer: Composer) -> dict:
    """What an adapter's training saw, as serving has it now (the keys of its metadata)."""
    return {
        "templates": {name: p.version for name, p in composer.prompts.items()},
        "rules_hash": file_digest(settings.rules_file), "skeleton_hash": file_digest(settings.skeleton_file),
        "retrieval": {"sources": settings.sources, "source_options": settings.source_options,
                      "rrf_k": settings.rrf_k, "embedding_model": settings.embedding_model},
    }


def build_composer(settings: Settings | None = None) -> Composer:
    settings = settings or Settings.load()
    key = settings.model_dump_json()
    with _lock:
        if key not in _composers:
            # merchandiser files first: a broken file fails fast, before any model loads
            composer = composer_for(settings, Retriever.open(settings.retrieval_config()))
            if settings.adapter:
                check_adapter_inputs(settings.adapter, adapter_inputs(settings, composer), settings.adapter_mismatch)
            composer = composer.using(backend=load_backend(settings), cache=composer.cache)
            if settings.warm_up:
                try:
                    composer.warm_up()
                except Exception:  # an optimisation only: a model server down at start must not stop it
                    log.warning("warm-up failed; the first pages may fall back", exc_info=True)
            _composers[key] = composer
        return _composers[key]


def compose_homepage(user_id: str, settings: Settings | None = None) -> Homepage:
    """The personalised homepage for one user: a page that passes every rule, or ``InputError`` (a
    malformed id) or ``PageUnavailable`` (no valid page can be built); see ``agent.composer``."""
    return build_composer(settings).compose(user_id)

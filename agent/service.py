"""Wiring: settings -> retriever, backend, prompts, rules, skeleton -> a Composer, once per process."""

from __future__ import annotations

import threading

from agent.backends import load_backend
from agent.cache import PageCache
from agent.composer import Composer
from agent.prompting import load_prompts
from agent.rules import Rules
from agent.schema import Homepage
from agent.settings import Settings
from agent.skeleton import Skeleton
from retrieval import Retriever

_composers: dict[str, Composer] = {}
_lock = threading.Lock()


def build_composer(settings: Settings | None = None) -> Composer:
    settings = settings or Settings()
    key = settings.model_dump_json()
    with _lock:
        if key not in _composers:
            # merchandiser files first: a broken file fails fast, before any model loads
            prompts = load_prompts(settings.prompts_dir)
            rules = Rules.load(settings.rules_file)
            skeleton = Skeleton.load(settings.skeleton_file)
            retriever = Retriever.open(settings.retrieval_config())
            budget = None if settings.budget_ms is None else settings.budget_ms / 1000
            _composers[key] = Composer(retriever, load_backend(settings), prompts, rules, skeleton,
                                       settings.max_new_tokens, settings.llm_retry, budget,
                                       PageCache(settings.cache_users))
        return _composers[key]


def compose_homepage(user_id: str, settings: Settings | None = None) -> Homepage:
    """The personalised homepage for one user; never an invalid page (see ``Homepage.meta``)."""
    return build_composer(settings).compose(user_id)

"""The composer warms up when it starts (issue 20, item 4): the first pages of a process must not
pay for the grammar compiler's first compile, the system prompt's KV cache and torch's first
forward passes inside their time budget. Real parts: the packaged model, the sample's store."""

from __future__ import annotations

from agent.composer import WARM_UP_USER
from agent.service import build_composer


def test_build_composer_warms_up_and_keeps_nothing(settings, ingested):
    # settings of its own (another cache size), so this is a fresh composer and a fresh backend
    composer = build_composer(settings.model_copy(update={"cache_users": 11}))
    assert composer.backend._prefix is not None  # the system prompt was read at start
    assert composer.cache.get(WARM_UP_USER, 0) is None and len(composer.cache._pages) == 0
    assert composer.retriever.catalog.event_count(WARM_UP_USER) == 0  # nobody's history was written


def test_without_warm_up_the_first_page_pays_for_it(settings, ingested):
    cold = build_composer(settings.model_copy(update={"cache_users": 12, "warm_up": False}))
    semantic = cold.retriever.source("semantic")
    assert cold.backend._prefix is None  # nothing read yet: this is what the first page would pay
    assert semantic.table.snapshot[0] == []
    seconds = cold.warm_up()
    assert seconds > 0 and cold.backend._prefix is not None
    assert sorted(semantic.table.snapshot[0]) == sorted(cold.retriever.products)  # every product's vector


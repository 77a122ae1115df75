"""homepage precompute on a copy of the sample store, with the real packaged model: pages stored
under their keys, a rerun (or a run after a kill) makes only what is missing, the service serves a
stored page while it is current, and forget erases it; the same on a local Ray cluster."""

import re

import pytest
from conftest import Chroma, assert_valid_page, free_port

from agent.cache import PageCache
from agent.errors import ConfigError
from agent.precompute import precompute, precompute_on_ray
from agent.schema import Homepage
from agent.service import composer_for
from homepage.cli import main
from retrieval import Event, Retriever
from retrieval.retriever import CHROMA_DIR


@pytest.fixture
def store_settings(settings, ingested, copy_store, tmp_path):
    store = copy_store(settings.store_dir, tmp_path / "store")
    return settings.model_copy(update={"store_dir": store})


@pytest.fixture
def retriever(store_settings):
    return Retriever.open(store_settings.retrieval_config())


def fresh_composer(store_settings, retriever, backend):
    """A composer as a new service process has it: nothing in memory."""
    return composer_for(store_settings, retriever, backend, budget_s=None, cache=PageCache(100))


def test_precompute_stores_pages_and_a_rerun_makes_only_what_is_missing(store_settings, retriever, composer):
    users = retriever.catalog.users(limit=4)
    # killed after the first two pages: they are stored; the next run makes the other two
    first = precompute(fresh_composer(store_settings, retriever, composer.backend), users[:2], batch=2)
    assert (first.composed, first.current) == (2, 0) and first.stored == 2 - first.paths["fallback"]
    second = precompute(fresh_composer(store_settings, retriever, composer.backend), users, batch=2)
    assert (second.shoppers, second.current, second.composed) == (4, first.stored, 4 - first.stored)
    assert set(retriever.catalog.stored_page_keys()) == set(users)
    again = precompute(fresh_composer(store_settings, retriever, composer.backend), users, batch=2)
    assert (again.current, again.composed) == (4, 0)  # no page done twice
    assert "4 shoppers: 4 pages already current, 0 composed" in again.lines()[0]


def test_the_service_serves_a_stored_page_while_it_is_current(store_settings, retriever, composer):
    user = retriever.catalog.users(limit=1)[0]
    precompute(fresh_composer(store_settings, retriever, composer.backend), [user])
    serving = fresh_composer(store_settings, retriever, composer.backend)
    stored = serving.compose(user)
    assert stored.meta.cached and stored.meta.path in {"llm", "repaired"}
    made = Homepage.model_validate_json(retriever.catalog.stored_page(user, serving.page_key(user)))
    assert stored.item_ids() == made.item_ids() and stored.meta.composed_at == made.meta.composed_at
    # a new event: the stored page is stale, the next page is composed live
    item = next(i for i in retriever.products if i not in stored.item_ids())
    serving.record_events([Event(user, item, 2_000_000_000.0, None, "purchase")])
    live = fresh_composer(store_settings, retriever, composer.backend).compose(user)
    assert not live.meta.cached and retriever.catalog.stored_page(user, serving.page_key(user)) is None


def test_forget_erases_a_precomputed_page(store_settings, retriever, composer, capsys):
    user = retriever.catalog.users(limit=1)[0]
    precompute(fresh_composer(store_settings, retriever, composer.backend), [user])
    assert user in retriever.catalog.stored_page_keys()
    retriever.close()
    assert main(["--store", str(store_settings.store_dir), "forget", user]) == 0
    out = capsys.readouterr().out
    assert re.search(r"removed 1 from \S+: precomputed pages", out) and "nothing found" in out
    reopened = Retriever.open(store_settings.retrieval_config())
    assert user not in reopened.catalog.stored_page_keys()
    reopened.close()


# -- on Ray: the same resumable precompute, one composer per actor ---------------------------------------
def test_precompute_on_ray_refuses_the_embedded_vector_store(store_settings):
    with pytest.raises(ConfigError, match="chroma_host"):
        precompute_on_ray(store_settings, ["u"], workers=2)


@pytest.mark.one_engine
@pytest.mark.slow
def test_precompute_on_ray_stores_valid_pages_and_a_rerun_makes_only_what_is_missing(store_settings, composer):
    chroma = Chroma(store_settings.store_dir / CHROMA_DIR, free_port())
    chroma.start()
    try:
        settings = store_settings.model_copy(update={"chroma_host": "127.0.0.1", "chroma_port": chroma.port})
        catalog = settings.retrieval_config().open_catalog()
        users = catalog.users(limit=6)
        # as if killed after the first three: their pages are stored, the next run makes the rest
        first = precompute_on_ray(settings, users[:3], batch=1, workers=2)
        assert (first.shoppers, first.composed, first.current) == (3, 3, 0)
        assert first.stored == 3 - first.paths["fallback"]
        second = precompute_on_ray(settings, users, batch=1, workers=2)
        assert (second.shoppers, second.current, second.composed) == (6, first.stored, 6 - first.stored)
        again = precompute_on_ray(settings, users, batch=2, workers=2)
        assert (again.current, again.composed) == (6, 0)  # no page done twice
        stored = catalog.stored_page_keys()
        assert set(stored) == set(users)
        for user in users:
            assert_valid_page(Homepage.model_validate_json(catalog.stored_page(user, stored[user])), composer)
        catalog.close()
    finally:
        chroma.kill()

"""The store on either engine: SQLite (one file, the embedded default) and PostgreSQL (one database
every host of a shop shares, ``store_url``).

The catalogue's contract runs on both, against values worked out by hand; on PostgreSQL the
service's store paths run end to end (ingest, pages, events, precomputed pages, forget with its
receipt), and two hosts — two store folders, each with its own vector store, one database — serve
each other's events. PostgreSQL tests need a server: ``HOMEPAGE_TEST_POSTGRES`` (see conftest)."""

from __future__ import annotations

import threading
import time
from urllib.parse import urlsplit, urlunsplit

import pytest
from conftest import POSTGRES, assert_valid_page, sample_slice
from fastapi.testclient import TestClient
from pydantic import SecretStr

from agent.api import create_app
from agent.cache import PageCache
from agent.errors import ConfigError
from agent.precompute import precompute
from agent.service import composer_for
from retrieval import Event, Product, Retriever, ingest
from retrieval.catalog import Catalog
from retrieval.erasure import erase_expired
from retrieval.history import build_history
from retrieval.retriever import CATALOG_FILE

ADMIN = {"Authorization": "Bearer admin-token"}


@pytest.fixture(params=["sqlite", "postgresql"])
def catalog(request, tmp_path):
    url = request.getfixturevalue("fresh_database")() if request.param == "postgresql" else None
    catalog = Catalog(tmp_path / CATALOG_FILE, url)
    yield catalog
    catalog.close()


def test_a_store_placeholder_gives_each_store_folder_a_database_of_its_own(fresh_database, tmp_path):
    import psycopg

    fresh_database()  # a server, or skip (fail where it is required)
    url = urlunsplit(urlsplit(POSTGRES)._replace(path="/{store}"))
    a, b = Catalog(tmp_path / "Shop A" / CATALOG_FILE, url), Catalog(tmp_path / "shop-b" / CATALOG_FILE, url)
    names = [urlsplit(c.engine.url).path[1:] for c in (a, b)]
    try:
        a.upsert_products([product("x")])
        assert list(b.products) == [] and names[0] != names[1]
        # made with the store: named by the folder, readable, within PostgreSQL's 63 bytes
        assert names[0].startswith("homepage_shop_a_") and all(len(n) <= 63 for n in names)
        again = Catalog(tmp_path / "shop-b" / ".." / "Shop A" / CATALOG_FILE, url)  # the same folder, another path
        assert list(again.products) == ["x"]
        again.close()
    finally:
        a.close()
        b.close()
        with psycopg.connect(POSTGRES, autocommit=True) as db:
            for name in names:
                db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def product(item_id: str, title: str = "T") -> Product:
    return Product(item_id, title, ("Beauty", "Skin"), "Brand", 9.5, "d", 3)


def test_the_catalogue_counts_changes_and_bumps_its_version_only_for_them(catalog):
    assert catalog.version() == 0
    assert catalog.upsert_products([product("a"), product("b")]) == 2 and catalog.version() == 1
    assert catalog.upsert_products([product("a"), product("b")]) == 0 and catalog.version() == 1  # nothing new
    assert catalog.upsert_products([product("a", "T2"), product("b")]) == 1 and catalog.version() == 2
    assert catalog.products["a"].title == "T2" and catalog.products["a"].category_path == ("Beauty", "Skin")
    assert catalog.remove_products(["a", "nope"]) == ["a"] and catalog.version() == 3
    assert catalog.refresh() == 3 and list(catalog.products) == ["b"]


def test_events_are_stored_once_numbered_in_order_and_read_back_by_time(catalog):
    events = [Event("u1", "b", 1_700_000_002.123456, None, "purchase"),  # stored first, happened later
              Event("u1", "a", 1_700_000_001.5, None, "purchase"),
              Event("u2", "a", None, 7, "view")]
    assert catalog.add_events(events) == 3 and catalog.add_events(events) == 0  # the natural key holds
    row = catalog.add_event(Event("u2", "b", None, 8, "view"))
    assert row is not None and row > 0 and catalog.add_event(Event("u2", "b", None, 8, "view")) is None
    assert catalog.last_row() == row and catalog.event_count() == 4 and catalog.event_count("u2") == 2
    assert [e.item_id for e in catalog.user_events("u1")] == ["a", "b"]  # by timestamp, not by arrival
    # full precision: a timestamp in a 4-byte float would come back as 1700000000.0
    assert catalog.user_events("u1")[1].timestamp == 1_700_000_002.123456
    assert catalog.latest_time() == 1_700_000_002.123456
    after = catalog.events_after(0)
    assert [r for r, _ in after] == sorted(r for r, _ in after)
    assert after[-1] == (row, Event("u2", "b", None, 8, "view"))
    assert [e.item_id for _, e in catalog.events_after(after[1][0])] == ["a", "b"]
    assert [e.item_id for e in catalog.user_events("u2", before_row=row)] == ["a"]


def test_shoppers_are_listed_most_active_first_then_by_id_bytes(catalog):
    catalog.add_events([Event(u, i, float(t), None, "view") for t, (u, i) in enumerate(
        [("a1", "x"), ("B1", "x"), ("c", "x"), ("c", "y"), ("c", "z"), ("a1", "y")])])
    # c: 3 events; a1 and B1: "a1" has 2, B1 1. Ties would sort by bytes ("B" < "a"), as SQLite does
    assert catalog.users() == ["c", "a1", "B1"] and catalog.users(limit=2) == ["c", "a1"]
    catalog.add_event(Event("B1", "y", 9.0, None, "view"))
    assert catalog.users() == ["c", "B1", "a1"]


def test_attributes_pages_and_announcements_replace_and_count(catalog):
    catalog.upsert_attributes({"u1": {"age": "25-29"}})
    catalog.upsert_attributes({"u1": {"age": "30-34", "region": "E"}})
    assert catalog.attributes("u1") == {"age": "30-34", "region": "E"} and catalog.attributes("u2") == {}
    catalog.store_pages([("u1", "k1", "{}")])
    catalog.store_pages([("u1", "k2", '{"a":1}'), ("u2", "k9", "{}")])
    assert catalog.stored_page("u1", "k2") == '{"a":1}' and catalog.stored_page("u1", "k1") is None
    assert catalog.stored_page_keys() == {"u1": "k2", "u2": "k9"}
    assert catalog.epochs() == {}
    assert catalog.announce("events") == {} and catalog.announce("events") == {"events": 1}
    assert catalog.announce("reload") == {"events": 2} and catalog.epochs() == {"events": 2, "reload": 1}


def test_a_delete_takes_only_its_subjects_rows_and_bumps_the_version(catalog):
    catalog.add_events([Event("u1", "a", 1.0, None, "view"), Event("u1", "b", 2.0, None, "view"),
                        Event("u2", "a", 3.0, None, "view")])
    catalog.upsert_attributes({"u1": {"age": "1"}, "u2": {"age": "2"}})
    catalog.store_pages([("u1", "k", "{}"), ("u2", "k", "{}")])
    version = catalog.version()
    assert catalog.delete_rows("user_id IN (?)", ("u1",), ["u1"], ["u1"]) == (2, 1, 1)
    catalog.compact()
    assert catalog.version() == version + 1 and not catalog.holds_users({"u1"}) and catalog.holds_users({"u2"})
    assert catalog.event_count() == 1 and catalog.stored_page_keys() == {"u2": "k"}
    assert catalog.delete_rows("timestamp < ?", (0.5,), [], []) == (0, 0, 0) and catalog.version() == version + 1


def test_a_store_url_of_another_kind_or_an_unreachable_server_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="only postgresql://"):
        Catalog(tmp_path / CATALOG_FILE, "mysql://u@h/db")
    # the password is never shown
    with pytest.raises(ConfigError, match=r"shop:\*\*\*@127.0.0.1:1/none\?connect_timeout=2: cannot connect"):
        Catalog(tmp_path / CATALOG_FILE, "postgresql://shop:secret@127.0.0.1:1/none?connect_timeout=2")


# -- the service on PostgreSQL --------------------------------------------------------------------
def hosts(settings, tmp_path, url: str, names: str) -> list:
    """Hosts of one shop: a store folder each (its own embedded vector store, from the same
    catalogue), one database."""
    data, made = sample_slice(tmp_path / "data"), []
    for name in names:
        host = settings.model_copy(update={"store_dir": tmp_path / name, "store_url": url,
                                           "api_token": SecretStr("admin-token"), "read_token": None,
                                           "open_reads": True})
        ingest(host.retrieval_config(), data / "items.csv", data / "interactions.csv", progress=False)
        made.append(host)
    return made


@pytest.fixture
def shop(settings, tmp_path, fresh_database):
    return hosts(settings, tmp_path, fresh_database(), "ab")


@pytest.fixture
def host(settings, tmp_path, fresh_database):
    return hosts(settings, tmp_path, fresh_database(), "a")[0]


def test_ingest_keeps_no_table_on_the_host_and_a_second_host_adds_nothing(shop):
    a, b = shop
    assert not (a.store_dir / CATALOG_FILE).exists() and not (b.store_dir / CATALOG_FILE).exists()
    catalog_a, catalog_b = a.retrieval_config().open_catalog(), b.retrieval_config().open_catalog()
    # host b ingested the same files into the same database: no duplicate event, no version bump
    assert catalog_a.event_count() == catalog_b.event_count() > 0 and catalog_a.version() == 1
    catalog_a.close(), catalog_b.close()


def test_events_sent_to_one_host_change_the_covisit_candidates_the_other_serves(shop):
    a, b = shop
    retriever_a, retriever_b = Retriever.open(a.retrieval_config()), Retriever.open(b.retrieval_config())
    x, y = sorted(retriever_a.products)[:2]
    probe = build_history("probe", [Event("probe", x, 1.0, None, "purchase")], retriever_a.products)

    def covisit(retriever) -> dict[str, float]:
        return {c.item_id: round(c.score, 9) for c in retriever.source("covisit").candidates(probe, 50)}

    before = covisit(retriever_b)
    with TestClient(create_app(a, composer_for(a, retriever_a, None, budget_s=None))) as host_a, \
            TestClient(create_app(b, composer_for(b, retriever_b, None, budget_s=None))) as host_b:
        hour_ago = int(time.time()) - 3600
        events = [{"user_id": f"new-{i}", "item_id": item, "timestamp": hour_ago + 10 * i + step,
                   "event_type": "purchase"} for i in range(5) for step, item in enumerate((x, y))]
        assert host_a.post("/v1/events", json={"events": events}, headers=ADMIN).json()["accepted"] == 10
        assert host_b.get("/v1/users/new-0/homepage").status_code == 200  # b's next request catches up
        after = covisit(retriever_b)
        assert after.get(y, 0) > before.get(y, 0)  # five shoppers bought y after x, on the other host
        assert after == covisit(retriever_a)  # both hosts count the same events, once
        assert retriever_a.follow() == retriever_b.follow() == 0
    assert y in covisit(Retriever.open(b.retrieval_config()))  # a host started now reads them from the database


def test_pages_precomputed_on_one_host_are_served_by_the_other(shop, composer):
    a, b = shop
    retriever_a, retriever_b = Retriever.open(a.retrieval_config()), Retriever.open(b.retrieval_config())
    users = retriever_a.catalog.users(limit=2)
    made = precompute(composer_for(a, retriever_a, composer.backend, budget_s=None, cache=PageCache(0)), users)
    assert made.composed == made.stored == 2 and set(retriever_b.catalog.stored_page_keys()) >= set(users)
    serving = composer_for(b, retriever_b, composer.backend, budget_s=None, cache=PageCache(10))
    for user in users:  # the same key on both hosts: the same events, catalogue version and parts
        assert retriever_b.catalog.stored_page(user, serving.page_key(user)) is not None
        page = serving.compose(user)
        assert page.meta.cached
        assert_valid_page(page, serving)


def test_forget_on_postgresql_takes_the_users_rows_and_says_what_it_cannot_prove(host):
    a = host
    retriever = Retriever.open(a.retrieval_config())
    user, other = retriever.catalog.users(limit=2)
    mine, total = retriever.catalog.event_count(user), retriever.catalog.event_count()
    retriever.catalog.store_pages([(user, "k", "{}"), (other, "k", "{}")])
    with TestClient(create_app(a, composer_for(a, retriever, None, budget_s=None))) as host_a:
        receipt = host_a.delete(f"/v1/users/{user}", headers=ADMIN).json()
    database = a.retrieval_config().open_catalog()
    assert database.event_count(user) == 0 and database.event_count() == total - mine
    assert not database.holds_users({user}) and database.stored_page_keys() == {other: "k"}
    where = database.engine.where
    assert receipt["removed"][f"{where}: events"] == mine and receipt["removed"][f"{where}: precomputed pages"] == 1
    assert receipt["found"] == [] and not receipt["clean"]  # the server's log and backups: not scanned
    assert any(line.startswith(f"PostgreSQL database {where}") for line in receipt["not_scanned"])
    database.close()


def test_no_event_lands_on_postgresql_while_an_erasure_holds_the_store(tmp_path, fresh_database):
    url = fresh_database()
    eraser, done = Catalog(tmp_path / CATALOG_FILE, url), threading.Event()

    def add():  # another host's request thread, with its own connection
        writer = Catalog(tmp_path / "elsewhere" / CATALOG_FILE, url)
        writer.add_events([Event("u1", "i1", 1.0, None, "view")])
        writer.close()
        done.set()

    with eraser.erasing():
        threading.Thread(target=add).start()
        time.sleep(0.5)
        assert not done.is_set() and eraser.event_count("u1") == 0
    assert done.wait(5) and eraser.event_count("u1") == 1
    eraser.close()


def test_retention_on_postgresql_takes_every_event_past_the_age_and_who_has_none_left(host):
    config = host.retrieval_config()
    catalog = config.open_catalog()
    x, y = sorted(catalog.products)[:2]
    total = catalog.event_count()  # the sample's events carry no timestamp: they cannot age
    catalog.add_events([Event("old-1", x, 1_000_000.0, None, "view"), Event("old-1", y, 1_000_001.0, None, "view"),
                        Event("mixed-1", x, 1_000_000.0, None, "view"), Event("mixed-1", y, 2_000_000.0, None, "view")])
    catalog.upsert_attributes({"old-1": {"age": "30-34"}, "mixed-1": {"age": "25-29"}})
    receipt = erase_expired(config, 1_500_000)
    assert catalog.event_count() == total + 1 and catalog.event_count("old-1") == 0
    assert [e.item_id for e in catalog.user_events("mixed-1")] == [y]
    assert catalog.attributes("old-1") == {} and catalog.attributes("mixed-1") == {"age": "25-29"}
    assert receipt.subjects == [config.privacy().audit_subject("old-1")]
    assert receipt.found == [] and receipt.database == catalog.engine.where and not receipt.clean
    catalog.close()


def test_a_host_whose_database_went_away_answers_with_a_page_not_a_500(host):
    import psycopg

    retriever = Retriever.open(host.retrieval_config())
    user, other = retriever.catalog.users(limit=2)
    with TestClient(create_app(host, composer_for(host, retriever, None, budget_s=None))) as client:
        assert client.get(f"/v1/users/{user}/homepage").status_code == 200
        url = host.retrieval_config().store_url
        with psycopg.connect(url.replace(urlsplit(url).path, "/postgres", 1), autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{urlsplit(url).path[1:]}" WITH (FORCE)')  # and every connection
        answer = client.get(f"/v1/users/{other}/homepage")
        assert answer.status_code == 200 and answer.json()["modules"]

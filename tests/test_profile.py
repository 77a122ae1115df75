"""Who the shopper is: the users file (typed, quarantined, pseudonymised), segment popularity with
its back-off, the profile's rule tags by hand, and erasure of attributes."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from conftest import catalog_at, sample_slice

from agent.errors import ConfigError
from retrieval.catalog import Catalog
from retrieval.columns import UserColumns
from retrieval.history import build_history
from retrieval.privacy import Privacy
from retrieval.profile import DAY, build_profile
from retrieval.records import Event, Product
from retrieval.sources import SOURCES, SourceContext


def test_a_users_file_is_typed_and_its_bad_rows_are_kept_aside_with_their_line(tmp_path):
    from retrieval.loading import load_users

    users = tmp_path / "users.csv"
    users.write_text("user_id,age_group,region\n"
                     "u1,25-29,114\n"            # line 2
                     "u2,,Others\n"              # line 3: an empty value is left out
                     ",30-34,105\n"              # line 4: no id
                     "u1,35-39,221\n"            # line 5: u1 again
                     f"u3,{'x' * 65},105\n"      # line 6: not an attribute
                     "ann@example.com,40-44,106\n")  # line 7: stored as its pseudonym
    privacy = Privacy("k", tmp_path / "key")
    loaded, report = load_users(users, UserColumns(), tmp_path / "quarantine", privacy)
    assert loaded == {"u1": {"age_group": "25-29", "region": "114"}, "u2": {"region": "Others"},
                      privacy.user_id("ann@example.com"): {"age_group": "40-44", "region": "106"}}
    assert (report.read, report.loaded, report.quarantined) == (6, 3, 3)
    kept = [json.loads(line) for line in report.quarantine_path.read_text().splitlines()]
    assert [(k["line"], k["reason"].split(":")[0]) for k in kept] == [(4, "missing"), (5, "duplicate"),
                                                                      (6, "age_group must be at most 64 characters, "
                                                                       "got 65")]
    only, _ = load_users(users, UserColumns(attributes=["region"]), tmp_path / "q2", privacy)
    assert only["u1"] == {"region": "114"}


def _product(item: str, category: str = "Food", price: float | None = None) -> Product:
    return Product(item, item, ("Shop", category), None, price)


def _segment_catalog(tmp_path) -> Catalog:
    catalog = catalog_at(tmp_path)
    catalog.upsert_products([_product(i) for i in "abcdef"])
    bought = {"u1": "aab", "u2": "ab", "u3": "cc", "u4": "d", "u5": "ef", "u6": "e"}
    catalog.add_events([Event(u, item, float(n), None, "purchase") for u, items in bought.items()
                        for n, item in enumerate(items)])
    catalog.upsert_attributes({"u1": {"age": "20s", "region": "N"}, "u2": {"age": "20s", "region": "N"},
                               "u3": {"age": "20s", "region": "S"}, "u4": {"age": "30s", "region": "S"},
                               "new1": {"age": "20s", "region": "N"}, "new2": {"age": "30s", "region": "S"},
                               "new3": {"age": "20s", "region": "S"}})
    return catalog


def test_segment_popularity_backs_off_from_thin_segments_by_hand(tmp_path):
    catalog = _segment_catalog(tmp_path)
    source = SOURCES["segment_popularity"](SourceContext(
        catalog, None, options={"segment_popularity": {"attributes": ["age", "region"], "min_users": 2}}))

    def top(user: str) -> list[tuple[str, float]]:
        return [(c.item_id, round(c.score, 4)) for c in source.candidates(build_history(user, [], catalog.products), 3)]

    # (20s, N) holds u1 and u2: a 3 of 5 purchases, b 2 of 5
    assert source.segment_of("new1") == (("age", "20s"), ("region", "N"))
    assert top("new1") == [("a", 0.6), ("b", 0.4)]
    # (30s, S) and (30s) hold u4 alone: back off to every shopper (a 3, e 2, b 2, c 2 of 11; ties by id)
    assert source.segment_of("new2") == ()
    assert top("new2") == [("a", round(3 / 11, 4)), ("b", round(2 / 11, 4)), ("c", round(2 / 11, 4))]
    # (20s, S) holds u3 alone; (20s) holds u1, u2 and u3: a 3, c 2, b 2 of 7
    assert source.segment_of("new3") == (("age", "20s"),)
    assert top("new3") == [("a", round(3 / 7, 4)), ("b", round(2 / 7, 4)), ("c", round(2 / 7, 4))]
    # no attributes: everyone's; a new event counts at once, in every segment of its shopper
    assert source.segment_of("stranger") == ()
    source.observe(Event("new1", "f", 9.0, None, "purchase"), [])
    assert top("new1")[:2] == [("a", 0.5), ("b", round(2 / 6, 4))]
    unconfigured = SOURCES["segment_popularity"](SourceContext(catalog, None))
    assert unconfigured.segment_of("new1") == ()


def test_the_profile_tags_by_hand():
    products = {"a": _product("a", "Tea", 1.0), "b": _product("b", "Tea", 5.0), "c": _product("c", "Rice", 9.0),
                "d": _product("d", "Rice", 20.0)}
    # baskets on days 0, 10 and 20: cycle 10 days, 3 baskets (repeat); the store's latest event is on
    # day 100, 80 days after theirs: over max(2 x 10, 30), so lapsed
    events = [Event("u", "a", 0 * DAY, None, "purchase"), Event("u", "b", 0 * DAY, None, "purchase"),
              Event("u", "a", 10 * DAY, None, "purchase"), Event("u", "c", 20 * DAY, None, "purchase")]
    profile = build_profile("u", events, {"region": "114"}, products, 100 * DAY, (4.0, 10.0))
    assert profile.attributes == {"region": "114"} and (profile.events, profile.baskets) == (4, 3)
    assert profile.purchase_cycle_days == 10.0 and profile.segment == "lapsed"
    # prices 1, 5, 1, 9: median 3, under the first tercile (4): low
    assert profile.price_band == "low" and profile.top_categories == ["Tea", "Rice"]
    assert build_profile("u", events, {}, products, 40 * DAY, (4.0, 10.0)).segment == "repeat"  # 20 days: not yet
    assert build_profile("v", [], {"region": "105"}, products, None, None).segment == "new visitor"


@pytest.mark.slow
def test_attributes_are_ingested_shown_in_the_profile_and_erased_by_forget(tmp_path):
    data = sample_slice(tmp_path / "data", products=200)
    user = next(line.split(",")[0] for line in (data / "interactions.csv").read_text().splitlines()[1:])
    (data / "users.csv").write_text(f"user_id,age_group,region\n{user},35-39,114\nonly-attributes,<25,105\n")
    store = tmp_path / "store"

    def homepage(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "homepage", "--store", str(store), *args],
                              capture_output=True, text=True, timeout=600)

    ingested = homepage("ingest", "--catalogue", str(data / "items.csv"), "--events", str(data / "interactions.csv"),
                        "--users", str(data / "users.csv"))
    assert ingested.returncode == 0, ingested.stderr
    assert "users.csv: read 2, loaded 2, quarantined 0" in ingested.stdout
    shown = json.loads(homepage("profile", user).stdout)
    assert shown["attributes"] == {"age_group": "35-39", "region": "114"} and shown["events"] > 0
    assert shown["segment"] in {"new", "repeat", "loyal", "lapsed"} and shown["top_categories"]

    forgotten = homepage("forget", user)
    assert forgotten.returncode == 0, forgotten.stderr
    assert re.search(r"removed 1 from .*: user attributes\n", forgotten.stdout), forgotten.stdout
    assert "byte and field scan" in forgotten.stdout and "nothing found" in forgotten.stdout
    catalog = catalog_at(store)
    try:
        assert catalog.attributes(user) == {} and catalog.attributes("only-attributes") == {"age_group": "<25",
                                                                                             "region": "105"}
    finally:
        catalog.close()
    # a shopper the shop knows only by attributes can be forgotten too
    assert homepage("forget", "only-attributes").returncode == 0
    assert homepage("forget", "nobody-at-all").returncode == 2


def test_learned_interests_weigh_the_nearest_products_categories_by_rank():
    from retrieval.profile import learned_interests
    from retrieval.records import Candidate

    products = {i: Product(i, f"P {i}", (dep, cat)) for i, dep, cat in
                [("a", "D", "Serums"), ("b", "D", "Oils"), ("c", "D", "Serums"), ("d", "D", "Masks"),
                 ("e", "D", "Oils"), ("f", "D", "Balms")]}
    ranked = [Candidate(i, 1.0) for i in ["a", "b", "c", "d", "e", "f", "gone"]]
    # Serums 1 + 1/3 = 1.333, Oils 1/2 + 1/5 = 0.7, Masks 1/4, Balms 1/6; an unknown id counts for nothing
    assert learned_interests(ranked, products) == ["Serums", "Oils", "Masks"]
    assert learned_interests([], products) == []


def test_an_explained_profile_carries_the_interests_the_embeddings_learned(composer, sample_users):
    profile = composer.profile(sample_users[2])
    assert profile.interests and len(profile.interests) <= 3
    categories = {p.category for p in composer.retriever.products.values()}
    assert set(profile.interests) <= categories
    assert composer.profile("new-visitor-0001").interests == []  # nothing to learn from


def test_summary_facts_by_hand():
    from retrieval.profile import summary_facts

    products = {"a": _product("a", "Tea", 1.0), "b": _product("b", "Tea", 5.0), "c": _product("c", "Rice", 9.0)}
    events = [Event("u", "a", 0 * DAY, None, "purchase"), Event("u", "b", 0 * DAY, None, "purchase"),
              Event("u", "a", 10 * DAY, None, "purchase"), Event("u", "c", 20 * DAY, None, "purchase")]
    facts = summary_facts(build_history("u", events, products))
    assert facts["products"] == 4 and facts["categories"] == [{"name": "Tea", "count": 3}, {"name": "Rice", "count": 1}]
    # prices 1, 5, 1, 9; baskets on days 0, 10 and 20; the newest distinct titles first
    assert facts["price"] == {"low": 1.0, "high": 9.0, "median": 3.0}
    assert (facts["baskets"], facts["purchase_cycle_days"], facts["segment"]) == (3, 10.0, "repeat")
    assert facts["recent"] == [products["c"].title, products["a"].title, products["b"].title]
    assert summary_facts(build_history("v", [], products))["segment"] == "new visitor"


def test_the_shipped_summary_template_says_what_the_history_summary_says(retriever):
    from agent.prompting import load_prompts, render_summary
    from prompts import PROMPTS_DIR
    from retrieval.profile import summary_facts

    prompt = load_prompts(PROMPTS_DIR)["summary"]
    for user in [*retriever.catalog.users(), "new-visitor-0001"]:
        history = retriever.history(user)
        assert render_summary(prompt, summary_facts(history)) == history.summary, user


def test_an_edited_summary_template_is_what_the_prompts_say(settings, retriever, sample_users, tmp_path):
    import shutil

    from agent.service import composer_for
    from prompts import PROMPTS_DIR

    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, prompts, ignore=shutil.ignore_patterns("__pycache__", "*.py", "full"))
    (prompts / "summary.jinja").write_text("A {{ shopper.segment }} shopper of {{ shopper.products }} products.")
    composer = composer_for(settings.model_copy(update={"prompts_dir": prompts}), retriever)
    user = sample_users[4]
    history = retriever.history(user)
    messages = composer.messages(history, composer.pools(history))
    shown = len(retriever.catalog.user_events(user))
    assert re.search(rf"A (new|repeat|loyal) shopper of {shown} products\.", messages[-1]["content"])
    assert history.summary not in messages[-1]["content"]  # the behaviour text keeps its own summary
    (prompts / "summary.jinja").write_text("{{ age_group }}")  # attributes are never given to it
    with pytest.raises(ConfigError, match=r"summary.jinja:1: unknown variable"):
        composer_for(settings.model_copy(update={"prompts_dir": prompts}), retriever)

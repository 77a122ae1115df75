"""Accepted and refused examples for every rule, the deterministic fix, and rule/skeleton files."""

from pathlib import Path

import pytest

from agent.errors import ConfigError
from agent.rules import RULES, ModuleBody, PageBody, RuleContext, Rules, validate
from agent.settings import PROMPTS_DIR
from agent.skeleton import ModuleSpec, Skeleton
from agent.stages.fix import fix
from agent.stages.pools import ModulePool, Pools
from retrieval import Candidate, Product

pytestmark = pytest.mark.one_engine

PRODUCTS = {
    p.item_id: p
    for p in [
        Product("a1", "Serum", ("Beauty", "Skin Care", "Serums"), "Acme", 10.0),
        Product("a2", "Cream", ("Beauty", "Skin Care", "Creams"), "Acme", 12.0),
        Product("a3", "Toner", ("Beauty", "Skin Care", "Toners"), "Acme", 8.0),
        Product("b1", "Lipstick", ("Beauty", "Makeup", "Lips"), "Bee", 9.0),
        Product("b2", "Mascara", ("Beauty", "Makeup", "Eyes"), "Bee", 7.0),
        Product("c1", "Shampoo", ("Beauty", "Hair Care", "Shampoos"), "Cee", 5.0),
        Product("c2", "Gone", ("Beauty", "Hair Care", "Shampoos"), "Cee", 5.0, stock=0),
        Product("d1", "Soap", ("Beauty", "Bath", "Soaps"), None, 2.0),
        Product("e1", "Gloss", ("Beauty", "Makeup", "Lips"), "Eee", 6.0),
        Product("f1", "Mist", ("Beauty", "Skin Care", "Toners"), "Fee", 6.0),
    ]
}
RULES_ = Rules(min_items_per_module=2, max_items_per_module=3, max_items_per_brand=2, min_categories=3,
               title_min_chars=3, title_max_chars=20, banned_words=["free", "miracle cure"])
SPEC = ModuleSpec(type="for_you", title="Picked for you", min_items=2, max_items=3)


def page(*modules: tuple[str, list[str]]) -> PageBody:
    return PageBody([ModuleBody(SPEC, title, items) for title, items in modules])


def pools(body: PageBody, offered: list[list[str]], reserve: list[str]) -> Pools:
    """The pools a page was drawn from: each module's own candidates, and popular items."""
    return Pools([ModulePool(mod.spec, mod.spec.title, [Candidate(i, 0.0) for i in items])
                  for mod, items in zip(body.modules, offered, strict=True)], [Candidate(i, 0.0) for i in reserve])


def codes(body: PageBody) -> list[str]:
    return [v.code for v in validate(body, RuleContext(RULES_, PRODUCTS))]


GOOD = page(("For you", ["a1", "b1", "c1"]), ("More", ["a2", "d1"]))


def test_a_good_page_passes_every_rule():
    assert codes(GOOD) == []
    assert set(RULES) == {"unknown_item", "out_of_stock", "duplicate_item", "module_size", "brand_cap",
                          "few_categories", "title_length", "title_form", "duplicate_title", "product_name_title",
                          "banned_word", "excluded", "sponsored_quota", "ungrounded_title"}


def test_exclusions_and_the_sponsored_quota():
    skeleton = Skeleton.model_validate({"modules": [{"type": "a", "title": "x"}], "max_sponsored": 1,
                                        "exclude": {"categories": ["Hair Care"], "brands": ["bee"]}})
    ctx = RuleContext(RULES_, PRODUCTS, skeleton)
    ok = page(("For you", ["a1", "d1", "a3"]), ("More", ["a2", "e1"]))
    assert validate(ok, ctx) == []
    excluded = page(("For you", ["a1", "b1", "c1"]), ("More", ["a2", "d1"]))  # Bee brand, Hair Care
    assert [(v.code, v.item) for v in validate(excluded, ctx)] == [("excluded", "b1"), ("excluded", "c1")]
    ok.modules[0].sponsored = {"a1"}
    assert validate(ok, ctx) == []
    ok.modules[1].sponsored = {"e1"}
    assert [v.code for v in validate(ok, ctx)] == ["sponsored_quota"]
    fixed = fix(ok, pools(ok, [[], []], ["f1"]), ctx)
    assert validate(fixed, ctx) == [] and fixed.modules[1].items == ["a2", "f1"]


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (page(("For you", ["a1", "b1", "zz"]), ("More", ["a2", "d1"])), ["unknown_item"]),
        (page(("For you", ["a1", "b1", "c2"]), ("More", ["a2", "d1"])), ["out_of_stock"]),
        (page(("For you", ["a1", "b1", "c1"]), ("More", ["a1", "d1"])), ["duplicate_item"]),
        (page(("For you", ["a1"]), ("More", ["b1", "c1", "d1"])), ["module_size"]),
        (page(("For you", ["a1", "b1", "c1", "d1"]), ("More", ["a2", "b2"])), ["module_size"]),
        (page(("For you", ["a1", "a2", "a3"]), ("More", ["b1", "c1"])), ["brand_cap"]),
        (page(("For you", ["b1", "e1"]), ("More", ["c1", "c2"])), ["out_of_stock", "few_categories"]),
        (page(("For you", ["b1", "e1"]), ("More", ["c1", "b2"])), []),
        (page(("Hi", ["a1", "b1", "c1"]), ("More", ["a2", "d1"])), ["title_length"]),
        (page(("A very long title indeed", ["a1", "b1", "c1"]), ("More", ["a2", "d1"])), ["title_length"]),
        (page(("FREE stuff", ["a1", "b1", "c1"]), ("More", ["a2", "d1"])), ["banned_word"]),
        (page(("A Miracle Cure", ["a1", "b1", "c1"]), ("More", ["a2", "d1"])), ["banned_word"]),
        # whole words only ({freedom, skin, care}: a1 has two of the three words, 1 of 3 items >= 0.3)
        (page(("Freedom skin care", ["a1", "b1", "c1"]), ("More", ["a2", "d1"])), []),
        (page(("Freedom glow", ["a1", "b1", "c1"]), ("More", ["a2", "d1"])), ["ungrounded_title"]),
    ],
)
def test_each_rule_refuses_its_case(body, expected):
    assert codes(body) == expected


def test_violations_carry_module_and_item():
    [violation] = validate(page(("For you", ["a1", "b1", "zz"]), ("More", ["a2", "d1"])),
                           RuleContext(RULES_, PRODUCTS))
    assert (violation.module, violation.item) == (0, "zz")


def test_fix_repairs_every_violation_and_keeps_good_choices_first():
    broken = page(("FREE", ["zz", "a1", "a2", "a3", "a1"]), ("More", ["a1", "c2"]))
    ctx = RuleContext(RULES_, PRODUCTS)
    assert set(codes(broken)) == {"unknown_item", "duplicate_item", "brand_cap", "module_size",
                                  "out_of_stock", "banned_word"}
    fixed = fix(broken, pools(broken, [["b1", "a3"], ["b2", "d1"]], ["c1", "d1"]), ctx)
    assert validate(fixed, ctx) == []
    assert fixed.modules[0].items[:2] == ["a1", "a2"]  # the model's valid picks, in its order
    assert fixed.modules[0].title == "Picked for you"  # skeleton copy replaces the banned title


def test_fix_widens_categories():
    ctx = RuleContext(RULES_, PRODUCTS)
    narrow = page(("For you", ["a1", "a2"]), ("More", ["b1", "b2"]))  # 4 leaf categories: fine
    assert codes(narrow) == []
    one_dept = Rules(**{**RULES_.model_dump(), "min_categories": 5})
    ctx = RuleContext(one_dept, PRODUCTS)
    fixed = fix(narrow, pools(narrow, [[], []], ["c1", "d1"]), ctx)
    assert validate(fixed, ctx) == []


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_shipped_rule_and_skeleton_files_load():
    assert Rules.load(PROMPTS_DIR / "rules.yaml").banned_words
    first, second = Skeleton.load(PROMPTS_DIR / "skeleton.yaml").modules[:2]
    assert (first.type, first.show_owned, second.type, second.show_owned) == ("buy_again", True, "for_you", False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("min_items_per_module: 2\nmax_items_per_brand: 0\n",
         r"rules.yaml:2: max_items_per_brand: Input should be greater than or equal to 1, got 0"),
        ("max_items_per_module: 3\nbanned_words: free\n", r"rules.yaml:2: banned_words: .*list"),
        ("max_item_per_module: 3\n", r"rules.yaml:1: max_item_per_module: Extra inputs are not permitted"),
        ("min_items_per_module: [1\n", r"rules.yaml:2: invalid YAML"),
        ("min_items_per_module: 5\nmax_items_per_module: 3\n", r"min_items_per_module must be <= max"),
    ],
)
def test_broken_rule_files_are_refused_with_file_line_and_field(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        Rules.load(write(tmp_path, "rules.yaml", text))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("modules:\n  - type: for_you\n    title: Hi\n    min_items: 5\n    max_items: 3\n",
         r"skeleton.yaml:2: modules.0: Value error, min_items \(5\) must be <= max_items"),
        ("modules:\n  - type: For You\n    title: Hi\n", r"skeleton.yaml:2: modules.0.type: String should match"),
        ("modules:\n  - type: a\n    title: x\n  - type: a\n    title: y\n", r"module types must be unique"),
        ("modules:\n  - type: a\n    title: x\n    pool: 12\n",
         r"skeleton.yaml:4: modules.0.pool: .*less than or equal to 9"),
        ("modules: []\n", r"modules: List should have at least 1 item"),
    ],
)
def test_broken_skeleton_files_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message):
        Skeleton.load(write(tmp_path, "skeleton.yaml", text))


def test_the_category_rule_asks_only_what_the_catalogue_has():
    """Was: a catalogue without categories (everything filed under "Other") made every page
    unavailable ("1 categories on the page, needs 3")."""
    flat = {i: Product(i, p.title, (), p.brand, p.price, stock=p.stock) for i, p in PRODUCTS.items()}
    two = {i: Product(i, p.title, ("Beauty", "Lips" if i.startswith("b") else "Other"), p.brand, p.price)
           for i, p in PRODUCTS.items()}
    body = page(("For you", ["a1", "b1", "c1"]), ("More", ["a2", "d1"]))
    assert validate(body, RuleContext(RULES_, flat)) == []  # one category in the catalogue: one suffices
    assert validate(page(("For you", ["a1", "b1"]), ("More", ["a2", "d1"])), RuleContext(RULES_, two)) == []
    one_kind = page(("For you", ["a1", "c1"]), ("More", ["a2", "d1"]))  # all "Other" of two
    found = validate(one_kind, RuleContext(RULES_, two))
    assert [v.code for v in found] == ["few_categories"] and "needs 2" in found[0].message
    # an empty page is never valid, even for an empty catalogue (the composer then raises PageUnavailable)
    assert [v.code for v in validate(PageBody([]), RuleContext(RULES_, {}))] == ["few_categories"]
    # a catalogue with enough categories still needs the configured three
    found = validate(page(("For you", ["a3", "f1"]), ("More", ["b1", "e1"])), RuleContext(RULES_, PRODUCTS))
    assert [v.code for v in found] == ["few_categories"] and "needs 3" in found[0].message

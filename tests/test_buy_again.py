"""A shopper with a regular purchase sees it due again in a buy-again module, with its reason;
discovery modules never show what the shopper has."""

import pytest

from agent.composer import Composer
from agent.prompting import load_prompts
from agent.rules import Rules
from agent.skeleton import Skeleton
from prompts import PROMPTS_DIR
from retrieval import RetrievalConfig, Retriever, ingest
from retrieval.repeat import purchase_baskets

DAY = 86_400
ITEMS = ["milk", "bread", "eggs", "rice", "tea", "soap", "jam", "salt", "oil", "flour", "sugar", "corn"]
# the logs the repeat model learns from: 30 shoppers who buy a staple every 30 days (due, and bought,
# in their last basket) and a one-off item in every basket (never bought again)
STAPLES = [f"staple{n}" for n in range(5)]
ONE_OFFS = [f"x{k}b{b}" for k in range(30) for b in range(4)]


@pytest.fixture(scope="module")
def grocery(tmp_path_factory):
    folder = tmp_path_factory.mktemp("grocery")
    (folder / "items.csv").write_text("item_id,title,category_path,brand,price_usd\n" + "".join(
        f"{item},{item.title()} pack,Grocery > {item.title()},Brand{n},{n + 1}\n"
        for n, item in enumerate(ITEMS + STAPLES + ONE_OFFS)))
    rows = [("shopper", "milk", d) for d in (0, 30, 60, 90)]  # every 30 days; day 120 is "now": due
    rows += [("shopper", "bread", d) for d in (10, 40, 70)]  # every 30 days, last 50 days ago: overdue
    rows += [("shopper", "eggs", 5)]  # once: not a repeat
    rows += [(f"other{n}", item, 100 + n) for n in range(6) for item in ("eggs", "rice", "tea", "soap")]
    rows += [("other9", item, 120) for item in ("jam", "salt", "oil", "flour", "sugar", "corn")]
    for k in range(30):
        rows += [(f"regular{k}", item, k + 30 * b) for b in range(4) for item in (STAPLES[k % 5], f"x{k}b{b}")]
    (folder / "events.csv").write_text("user_id,item_id,timestamp,event_type\n" + "".join(
        f"{u},{i},{d * DAY},purchase\n" for u, i, d in rows))
    config = RetrievalConfig(store_dir=folder / "store")
    ingest(config, folder / "items.csv", folder / "events.csv", progress=False)
    retriever = Retriever.open(config)
    yield retriever
    retriever.close()


def test_a_regular_purchase_is_due_again_with_its_reason(grocery):
    skeleton = Skeleton.model_validate({"modules": [
        {"type": "buy_again", "source": "buy_again", "show_owned": True, "title": "Buy it again",
         "min_items": 2, "max_items": 4},
        {"type": "for_you", "source": "personal", "title": "Picked for you", "min_items": 2, "max_items": 4},
    ]})
    c = Composer(grocery, None, load_prompts(PROMPTS_DIR), Rules(min_categories=3), skeleton)
    page = c.compose("shopper")
    model = grocery.source("buy_again").model
    # each regular shopper's staple, bought when due, and the shopper's own milk on day 90
    assert model.fitted and model.positives == 31
    chances = {i: p for i, (p, _) in model.probabilities(purchase_baskets(grocery.history("shopper").events),
                                                          grocery.catalog.latest_time()).items()}
    assert chances["milk"] > 0.5 > chances["eggs"]  # a staple due today vs an item bought once
    again, for_you = page.modules
    # by hand: milk is due today (bought every 30 days, last 30 days ago), bread 20 days overdue
    assert [i.item_id for i in again.items][:2] == ["milk", "bread"]
    assert again.items[0].reason == "You buy this about every 4 weeks"
    assert "eggs" not in [i.item_id for i in again.items][:2]  # bought once, like the one-offs
    assert {i.source for i in again.items} == {"buy_again"}
    assert not {"milk", "bread", "eggs"} & {i.item_id for i in for_you.items}  # discovery: nothing owned


def test_a_buy_again_module_must_say_it_shows_owned_items():
    with pytest.raises(ValueError, match="show_owned"):
        Skeleton.model_validate({"modules": [{"type": "a", "source": "buy_again", "title": "Again"}]})


def test_unavailable_configured_items_are_left_out(grocery):
    from dataclasses import replace

    jam = grocery.products["jam"]
    grocery.catalog.upsert_products([replace(jam, stock=0)])
    try:
        skeleton = Skeleton.model_validate({"modules": [
            {"type": "deals", "source": "campaign", "title": "Weekly deals", "items": ["jam", "salt", "tea"],
             "min_items": 2, "max_items": 3},
            {"type": "short", "source": "campaign", "title": "Short deals", "items": ["jam", "soap"],
             "min_items": 2, "max_items": 2},
            {"type": "for_you", "source": "personal", "title": "Picked for you", "pinned": ["jam", "rice"],
             "min_items": 2, "max_items": 4},
        ]})
        c = Composer(grocery, None, load_prompts(PROMPTS_DIR), Rules(min_categories=3), skeleton)
        page = c.compose("shopper")
        assert [m.type for m in page.modules] == ["deals", "for_you"]
        assert [i.item_id for i in page.modules[0].items] == ["salt", "tea"]  # as configured, minus jam
        assert page.modules[1].items[0].item_id == "rice" and page.modules[1].items[0].source == "pinned"
        assert "jam" not in page.item_ids()
        assert any(n.startswith("module short left off") for n in page.meta.notes)
    finally:
        grocery.catalog.upsert_products([jam])


def test_the_shipped_skeleton_opens_with_buy_again(grocery):
    c = Composer(grocery, None, load_prompts(PROMPTS_DIR), Rules.load(PROMPTS_DIR / "rules.yaml"),
                 Skeleton.load(PROMPTS_DIR / "skeleton.yaml"))
    page = c.compose("shopper", use_llm=False)
    first = page.modules[0]
    assert first.type == "buy_again" and first.items[0].item_id == "milk"
    assert first.items[0].reason == "You buy this about every 4 weeks"


def test_the_repeat_model_learns_from_what_was_known_before_each_label():
    """Was: the item counts behind the repeat-rate feature held the label baskets, and "now" was the
    label basket's own time. Hand-computed: the store's baskets (day: items) are
    u1 1:A 5:A,B 9:A | u2 1:A 3:A,C | u3 2:B 4:B; each shopper's last basket is the label."""
    from retrieval.records import Event
    from retrieval.repeat import RepeatModel

    log = {"u1": [(1, "A"), (5, "A"), (5, "B"), (9, "A")], "u2": [(1, "A"), (3, "A"), (3, "C")],
           "u3": [(2, "B"), (4, "B")]}
    by_user = {u: [Event(u, item, day * DAY, n, "purchase") for n, (day, item) in enumerate(rows)]
               for u, rows in log.items()}
    seen = []

    class Recording(RepeatModel):
        def features(self, owned, item, shopper_baskets, now):
            seen.append((item, self.buyers[item], self.repeaters[item], now / DAY))
            return super().features(owned, item, shopper_baskets, now)

    model = Recording().fit(by_user)
    # rows (item, buyers, repeaters, now): before the labels A was bought by u1 (twice) and u2 (once),
    # B by u1 and u3 (once each); now is the store's latest time before each label: u1 day 5
    # (label day 9), u2 day 2 (label day 3, u3's basket), u3 day 3 (label day 4, u2's basket)
    assert sorted(seen) == sorted([("A", 2, 1, 5.0), ("B", 2, 0, 5.0), ("A", 2, 1, 2.0), ("B", 2, 0, 3.0)])
    # serving counts every basket: A bought by 2 shoppers, both again; B by 2, u3 again; C by 1
    assert (model.buyers["A"], model.repeaters["A"]) == (2, 2)
    assert (model.buyers["B"], model.repeaters["B"]) == (2, 1)
    assert (model.buyers["C"], model.repeaters["C"]) == (1, 0)


def test_a_threshold_above_one_switches_the_source_off():
    """Evaluation's grid tries 1.01 ("no buy-again module"); the options must take it."""
    from retrieval.sources import SOURCES

    assert SOURCES["buy_again"].Options.parse("buy_again", {"min_probability": 1.01}).min_probability == 1.01
    with pytest.raises(ValueError, match="min_probability"):
        SOURCES["buy_again"].Options.parse("buy_again", {"min_probability": -0.1})

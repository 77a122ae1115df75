"""Examples that teach a judge: known-answer cases of training users, with the known verdict as the
completion, for ``homepage finetune`` (a config with ``task: judge``). The users the suite compares
or calibrates on never enter: the adapter judge is measured on other people's cases.

Pointwise: the good module scores 5 and its perturbed twin 1. Pairwise: asked in both orders, the
better page wins in each. The reasons are short fixed sentences per criterion (the judge is trained
to decide, not to write).
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

from agent.cache import PageCache
from agent.composer import Composer
from agent.service import adapter_inputs, composer_for
from agent.settings import Settings
from eval.judge.cases import KnownCases, deterministic_known_cases
from eval.judge.criteria import load_criteria
from eval.judge.judging import Judge
from eval.judge.suite import Suite, load_suite, suite_users
from finetune.config import FinetuneConfig
from finetune.examples import EXAMPLES_FILE, MANIFEST_FILE
from finetune.store import Logs, build_store, read_logs, training_part, validation_part

REASONS = {
    "title_fit": ("The title names these products.", "The title is about other products."),
    "copy_safety": ("It claims nothing beyond the facts.", "It makes a claim the facts do not support."),
    "shopper_fit": ("{w} matches the shopper's history better.",),
    "variety": ("{w} shows more different products.",),
}


def _compact(value: dict) -> str:
    return json.dumps(value, separators=(",", ":"))


@dataclass
class TrainingCases:
    """Known-answer cases of a judge's training users, and where they came from."""

    logs: Logs
    composer: Composer
    users: list[str]
    reserved: set[str]
    known: KnownCases


def training_cases(config: FinetuneConfig, settings: Settings, suite: Suite, criteria: list[str],
                   progress: bool = True) -> TrainingCases:
    """The known-answer cases of ``criteria`` for a seeded sample of ``config.data``'s training users.
    Every user the suite compares or calibrates on is left out, drawn from the suite's own data
    (a judge may learn from another store's logs); validation baskets never enter the store."""
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = read_logs(config.data, settings, out / "quarantine")
    suite_logs = logs if Path(suite.data).resolve() == Path(config.data).resolve() else \
        read_logs(suite.data, settings, out / "quarantine-suite")
    reserved = set().union(*suite_users(suite, validation_part(suite_logs.events)[1]))
    store_events, targets = training_part(logs.events)
    retriever = build_store(out / "store-train", settings, logs.catalogue, store_events, progress)
    composer = composer_for(settings, retriever, None, budget_s=None, cache=PageCache(0))
    users = [u for u in sorted(targets) if u not in reserved]
    random.Random(config.seed).shuffle(users)
    users = sorted(users[: config.users] if config.users else users)
    known = deterministic_known_cases(criteria, composer, users, targets, store_events, config.seed)
    retriever.close()
    return TrainingCases(logs, composer, users, reserved, known)


def build_judge_examples(config: FinetuneConfig, settings: Settings, progress: bool = True) -> dict:
    started = time.perf_counter()
    criteria = load_criteria()
    suite = load_suite(config.judge_suite, set(criteria.by_name))
    cases = training_cases(config, settings, suite, suite.criteria, progress)
    composer, users, known, out = cases.composer, cases.users, cases.known, Path(config.out)
    asker = Judge("teacher", None, criteria, composer.rules.banned_words)
    held_out = set(users[: round(len(users) * config.eval_fraction)])
    examples = []
    for k in known.points:
        good, bad = REASONS[k.good.criterion]
        for case, score, reason in ((k.good, 5, good), (k.bad, 1, bad)):
            values = {"title": case.title, "items": case.items, "banned_words": asker.banned}
            examples.append((case.user, asker.messages(case.criterion, values),
                             _compact({"rationale": reason, "score": score})))
    for k in known.pairs:
        case = k.case
        for a, b, winner in ((case.a, case.b, "A"), (case.b, case.a, "B")):
            values = {"summary": case.summary, "a": a, "b": b}
            examples.append((case.user, asker.messages(case.criterion, values),
                             _compact({"rationale": REASONS[case.criterion][0].format(w=winner), "winner": winner})))
    with open(out / EXAMPLES_FILE, "w", encoding="utf-8") as f:
        for user, messages, completion in examples:
            f.write(json.dumps({"user_id": user, "split": "eval" if user in held_out else "train",
                                "messages": messages, "completion": completion}) + "\n")
    manifest = {
        "task": "judge", "suite": str(config.judge_suite), "data": str(config.data), "data_hash": cases.logs.digest,
        "users_sampled": len(users), "users_reserved_for_the_suite": len(cases.reserved), "examples": len(examples),
        "examples_eval": sum(u in held_out for u, _, _ in examples),
        "pointwise_cases": len(known.points), "pairwise_cases": len(known.pairs),
        **adapter_inputs(settings, composer), "templates": {"judge_criteria": criteria.version},
        "teacher": {"kind": "known answers"}, "seed": config.seed, "seconds": round(time.perf_counter() - started, 1),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest

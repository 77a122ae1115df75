"""A judge: any composer backend asked criteria prompts under the same grammar-constrained decoding,
in batches. Pairwise cases are asked in both orders; a verdict that flips with the order counts as a
tie. A judge that answers nothing usable is a failure in the report, never a crash."""

from __future__ import annotations

import json
import random
from collections import Counter
from dataclasses import dataclass

from agent.backends import LLMBackend
from eval.judge.cases import PairCase, PointCase
from eval.judge.criteria import Criteria

VERDICT_TOKENS = 48  # the reason (<= 80 characters) and the verdict
_SWAP = {"A": "B", "B": "A", "tie": "tie"}


@dataclass
class Asked:
    """One call: what was asked and what came back (``verdict`` None: nothing usable)."""

    prompt: str
    rationale: str | None
    verdict: str | int | None
    error: str | None = None


@dataclass
class PointVerdict:
    case: PointCase
    score: int | None  # the majority (median) over repeats; None: every answer failed
    asked: list[Asked]


@dataclass
class PairVerdict:
    case: PairCase
    winner: str | None  # "A", "B" or "tie" (a flip is a tie); None: no usable answer
    flipped: bool  # the two orders disagreed (in the majority repeat)
    asked: list[Asked]


def _shuffled(products: list[dict], key: str, repeat: int) -> list[dict]:
    if repeat == 0:
        return products
    order = list(products)
    random.Random(f"{key}/{repeat}").shuffle(order)
    return order


class Judge:
    def __init__(self, name: str, backend: LLMBackend, criteria: Criteria, banned: list[str], batch: int = 8,
                 repeats: int = 1):
        self.name, self.backend, self.criteria = name, backend, criteria
        self.banned, self.batch, self.repeats = list(banned), batch, repeats
        self.calls = 0

    def messages(self, criterion: str, values: dict) -> list[dict[str, str]]:
        return [{"role": "system", "content": self.criteria.system.render()},
                {"role": "user", "content": self.criteria.by_name[criterion].template.render(**values)}]

    def _ask(self, requests: list[tuple[str, dict]]) -> list[Asked]:
        """(criterion, template values) -> answers, batched; a failed batch is retried one by one."""
        answers: list[Asked] = []
        for start in range(0, len(requests), self.batch):
            chunk = requests[start:start + self.batch]
            asks = [(self.messages(c, v), self.criteria.by_name[c].schema) for c, v in chunk]
            try:
                generations = self.backend.generate_batch(asks, VERDICT_TOKENS)
                texts = [(g.text, None) for g in generations]
            except Exception:  # one bad row should not cost the batch: ask each alone
                texts = []
                for messages, schema in asks:
                    try:
                        texts.append((self.backend.generate(messages, schema, VERDICT_TOKENS).text, None))
                    except Exception as exc:
                        texts.append(("", f"{type(exc).__name__}: {exc}"[:200]))
            self.calls += len(chunk)
            for (messages, _), (criterion, _), (text, error) in zip(asks, chunk, texts, strict=True):
                answers.append(_parse(messages[-1]["content"], text, error,
                                      "score" if self.criteria.by_name[criterion].kind == "pointwise" else "winner"))
        return answers

    def score(self, cases: list[PointCase]) -> list[PointVerdict]:
        requests = [(c.criterion, {"title": c.title, "items": _shuffled(c.items, c.id, r),
                                   "banned_words": self.banned})
                    for c in cases for r in range(self.repeats)]
        answers = self._ask(requests)
        out = []
        for i, case in enumerate(cases):
            asked = answers[i * self.repeats:(i + 1) * self.repeats]
            scores = sorted(a.verdict for a in asked if isinstance(a.verdict, int))
            out.append(PointVerdict(case, scores[len(scores) // 2] if scores else None, asked))
        return out

    def compare(self, cases: list[PairCase]) -> list[PairVerdict]:
        requests = []
        for c in cases:
            for r in range(self.repeats):
                a = [{**m, "products": _shuffled(m["products"], f"{c.id}/a{i}", r)} for i, m in enumerate(c.a)]
                b = [{**m, "products": _shuffled(m["products"], f"{c.id}/b{i}", r)} for i, m in enumerate(c.b)]
                requests += [(c.criterion, {"summary": c.summary, "a": a, "b": b}),
                             (c.criterion, {"summary": c.summary, "a": b, "b": a})]
        answers = self._ask(requests)
        out = []
        per_case = 2 * self.repeats
        for i, case in enumerate(cases):
            asked = answers[i * per_case:(i + 1) * per_case]
            finals, flips = [], []
            for first, second in zip(asked[::2], asked[1::2], strict=True):
                if first.verdict is None or second.verdict is None:
                    continue
                swapped = _SWAP[second.verdict]
                flips.append(first.verdict != swapped)
                finals.append(first.verdict if first.verdict == swapped else "tie")
            if not finals:
                out.append(PairVerdict(case, None, False, asked))
                continue
            winner, count = Counter(finals).most_common(1)[0]
            winner = winner if count * 2 > len(finals) else "tie"
            out.append(PairVerdict(case, winner, sum(flips) * 2 > len(flips), asked))
        return out


def _parse(prompt: str, text: str, error: str | None, key: str) -> Asked:
    if error:
        return Asked(prompt, None, None, error)
    try:
        data = json.loads(text)
        verdict = data[key]
        if (key == "score" and verdict not in (1, 2, 3, 4, 5)) or (key == "winner" and verdict not in _SWAP):
            raise ValueError(f"{key} {verdict!r} out of range")
        return Asked(prompt, str(data.get("rationale", "")), verdict)
    except (ValueError, KeyError, TypeError) as exc:
        return Asked(prompt, None, None, f"unusable answer ({type(exc).__name__}: {exc}): {text[:120]!r}")

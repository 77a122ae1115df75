"""A trained judge this CPU can afford: a Bradley-Terry scoring head on the packaged model's final state.

The model reads a criterion's prompt (the prompted judge's very prompt, ``Judge.messages``) and its
final layer's state at the prompt's last token is the case's features ``x``: one forward pass, no
text written, nothing to parse. The head is one weight vector per criterion; a module scores
``w·x``. Training maximises ``log sigmoid(w·(x_good - x_bad))`` over known-answer pairs of training users
(Bradley-Terry: a logistic regression on the difference, both signs so the examples are balanced,
no intercept, L2), features scaled by the training differences' spread. A score of one module alone
cannot depend on an order, so the head never flips.

Out of distribution: the training cases' features are kept beside the weights, so the head can be
refitted without a perturbation kind or a word (``eval/judge/cases.py``); the suite scores each
calibration case with the head that never met its kind and with the one that never met its word.
Pairwise criteria are not judged (counted as failures, never trusted): the embedding judge is the
trusted one there.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from functools import lru_cache
from pathlib import Path

import numpy as np

from agent.backends.hf import chat_prompt_ids
from agent.errors import ConfigError
from agent.settings import Settings
from eval.judge.cases import KnownPoint, PairCase, PointCase
from eval.judge.criteria import Criteria, load_criteria
from eval.judge.judging import Asked, Judge, PairVerdict, PointVerdict
from eval.judge.stats import wilson
from eval.judge.suite import load_suite
from eval.judge.training import training_cases
from finetune.config import FinetuneConfig

HEAD_FILE, FEATURES_FILE = "head.json", "features.npz"
C_GRID = (0.01, 0.1, 1.0, 10.0)  # L2 strengths tried, chosen by 5-fold cross-validation over training users
FOLDS = 5


class ModelState:
    """The final layer's state at each prompt's last token (right-padded batches, so positions are
    the ones the model reads unpadded)."""

    def __init__(self, tokenizer, model, batch: int = 8):
        self.tokenizer, self.batch = tokenizer, batch
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.calls = 0

    def __call__(self, prompts: list[list[dict[str, str]]]) -> np.ndarray:
        import torch

        rows = []
        for start in range(0, len(prompts), self.batch):
            ids = [chat_prompt_ids(self.tokenizer, m) for m in prompts[start:start + self.batch]]
            width = max(map(len, ids))
            tokens = torch.tensor([i + [self.pad] * (width - len(i)) for i in ids])
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids])
            with torch.inference_mode():
                states = self.decoder(input_ids=tokens, attention_mask=mask).last_hidden_state
            last = torch.tensor([len(i) - 1 for i in ids])
            rows.append(states[torch.arange(len(ids)), last].float().numpy())
            self.calls += len(ids)
        return np.concatenate(rows) if rows else np.zeros((0, 0), dtype=np.float32)


def fit_head(good: np.ndarray, bad: np.ndarray, c: float) -> np.ndarray:
    """Bradley-Terry weights (in the features' own units) from paired features, good side first."""
    from sklearn.linear_model import LogisticRegression

    diff = good - bad
    scale = diff.std(axis=0) + 1e-6
    x = np.concatenate([diff, -diff]) / scale
    y = np.concatenate([np.ones(len(diff)), np.zeros(len(diff))])
    model = LogisticRegression(C=c, fit_intercept=False, max_iter=2000).fit(x, y)
    return (model.coef_[0] / scale).astype(np.float32)


def pair_accuracy(weights: np.ndarray, good: np.ndarray, bad: np.ndarray) -> float:
    return float(np.mean(good @ weights > bad @ weights)) if len(good) else 0.0


class TrainedHead:
    """A head folder: the training cases' features per criterion, their kinds, words and users, and
    the weights fitted on all of them; ``weights(criterion, without=...)`` refits without a group."""

    def __init__(self, folder: Path):
        folder = Path(folder)
        if not (folder / HEAD_FILE).exists():
            raise ConfigError(f"{folder}: no {HEAD_FILE} "
                              "(train one: homepage finetune finetune/configs/judge-head.yaml)")
        self.folder = folder
        self.meta = json.loads((folder / HEAD_FILE).read_text())
        data = np.load(folder / FEATURES_FILE, allow_pickle=False)
        self.cases = {c: {k: data[f"{c}/{k}"] for k in ("good", "bad", "kinds", "words", "users")}
                      for c in self.meta["criteria"]}

    @property
    def criteria(self) -> list[str]:
        return list(self.meta["criteria"])

    def check(self, criteria: Criteria, model: str) -> None:
        """A head reads the state of the prompts it was trained on, from the model it was trained on."""
        if self.meta["model"] != model:
            raise ConfigError(f"{self.folder}: trained on model {self.meta['model']!r}, the judge runs {model!r}")
        for name in self.criteria:
            want, have = self.meta["templates"][name], criteria.by_name[name].template.version
            if want != have:
                raise ConfigError(f"{self.folder}: trained on {name}'s template {want}, it is now {have}; retrain")

    @lru_cache(maxsize=256)  # noqa: B019 - one head per judge; refits are cheap but repeat per group
    def weights(self, criterion: str, without: tuple[str, str] | None = None) -> np.ndarray:
        """Fitted on every training case, or on those whose kind (``("kind", k)``) or word
        (``("word", w)``) differs from the one held out."""
        cases = self.cases[criterion]
        keep = np.ones(len(cases["good"]), dtype=bool)
        if without is not None:
            keep = cases[f"{without[0]}s"] != without[1]
        return fit_head(cases["good"][keep], cases["bad"][keep], self.meta["c"][criterion])


class HeadJudge:
    """The interface of ``eval.judge.judging.Judge`` (``score``, ``compare``, ``calls``), and the
    held-out scores of known-answer cases (``held_out``)."""

    trained = True

    def __init__(self, name: str, state: ModelState, head: TrainedHead, criteria: Criteria, banned: list[str]):
        self.name, self.state, self.head = name, state, head
        self.prompter = Judge(name, None, criteria, banned)
        self._features: dict[str, np.ndarray] = {}

    @property
    def calls(self) -> int:
        return self.state.calls

    def _featurise(self, cases: list[PointCase]) -> None:
        new = [c for c in cases if c.id not in self._features and c.criterion in self.head.criteria]
        rows = self.state([self.prompter.messages(c.criterion, {"title": c.title, "items": c.items,
                                                                 "banned_words": self.prompter.banned})
                           for c in new])
        self._features.update({c.id: row for c, row in zip(new, rows, strict=True)})

    def score(self, cases: list[PointCase]) -> list[PointVerdict]:
        self._featurise(cases)
        out = []
        for case in cases:
            if case.criterion not in self.head.criteria:
                out.append(PointVerdict(case, None, [Asked("", None, None, f"{case.criterion}: no head trained")]))
                continue
            # the score is the head's logit, unbounded: squashed onto 1-5 two confident scores would tie
            logit = round(float(self._features[case.id] @ self.head.weights(case.criterion)), 4)
            out.append(PointVerdict(case, logit, [Asked(f"title: {case.title}", f"logit {logit}", logit)]))
        return out

    def compare(self, cases: list[PairCase]) -> list[PairVerdict]:
        return [PairVerdict(c, None, False, [Asked("", None, None, f"{c.criterion}: a head judges modules alone")])
                for c in cases]

    def held_out(self, known: list[KnownPoint]) -> dict[str, dict[str, list[tuple[float, float]]]]:
        """criterion -> (good, bad) scores of each case by the head refitted without its kind, and by
        the one refitted without its word."""
        mine = [k for k in known if k.good.criterion in self.head.criteria]
        self._featurise([c for k in mine for c in (k.good, k.bad)])
        out: dict[str, dict[str, list[tuple[float, float]]]] = {}
        for k in mine:
            labels = out.setdefault(k.good.criterion, {"kinds": [], "words": []})
            for label, group in (("kinds", ("kind", k.perturbation)), ("words", ("word", k.word))):
                w = self.head.weights(k.good.criterion, group)
                labels[label].append((float(self._features[k.good.id] @ w), float(self._features[k.bad.id] @ w)))
        return out


def _grouped_accuracy(good: np.ndarray, bad: np.ndarray, groups: np.ndarray, c: float) -> tuple[int, int]:
    """Right / total when each group's cases are scored by a head fitted without that group."""
    right = 0
    for group in sorted(set(groups.tolist())):
        test = groups == group
        if test.all():
            continue
        w = fit_head(good[~test], bad[~test], c)
        right += int(np.sum(good[test] @ w > bad[test] @ w))
    return right, len(good)


def _interval(right: int, total: int) -> list[float]:
    return [round(x, 4) for x in wilson(right, total)]


def train_head(config: FinetuneConfig, settings: Settings, progress: bool = True) -> dict:
    """Known-answer cases of training users (the suite's users and every validation basket left
    out), their features, the L2 strength per criterion, and the training figures; written to
    ``config.out`` (``head.json``, ``features.npz``)."""
    from agent.backends import load_backend

    started = time.perf_counter()
    criteria = load_criteria()
    suite = load_suite(config.judge_suite, set(criteria.by_name))
    pointwise = [c for c in suite.criteria if criteria.by_name[c].kind == "pointwise"]
    if not pointwise:
        raise ConfigError(f"{config.judge_suite}: no pointwise criterion for a head to learn")
    model_settings = settings.model_copy(update={"adapter": None, **({"model": config.base_model}
                                                                      if config.base_model else {})})
    backend = load_backend(model_settings)
    if not hasattr(backend, "model"):
        raise ConfigError(f"a head judge reads the model's state: backend {model_settings.backend!r} has none; "
                          "use the transformers backend")
    out = Path(config.out)
    cases = training_cases(config, settings, suite, pointwise, progress)
    composer, users, known = cases.composer, cases.users, cases.known
    state = ModelState(backend.tokenizer, backend.model)
    prompter = Judge("teacher", None, criteria, composer.rules.banned_words)
    arrays, figures, chosen = {}, {}, {}
    for criterion in pointwise:
        mine = [k for k in known.points if k.good.criterion == criterion]
        mark = time.perf_counter()
        feats = state([prompter.messages(criterion, {"title": case.title, "items": case.items,
                                                      "banned_words": prompter.banned})
                       for k in mine for case in (k.good, k.bad)])
        if progress:
            print(f"{criterion}: {len(mine)} pairs featurised in {time.perf_counter() - mark:.0f} s", flush=True)
        good, bad = feats[0::2], feats[1::2]
        kinds = np.array([k.perturbation for k in mine])
        words = np.array([k.word for k in mine])
        owners = np.array([k.good.user for k in mine])
        folds = np.array([hash_fold(u) for u in owners])
        by_c = {c: _grouped_accuracy(good, bad, folds, c) for c in C_GRID}
        c = max(C_GRID, key=lambda x: (by_c[x][0], -x))  # ties: the stronger regularisation
        chosen[criterion] = c
        arrays.update({f"{criterion}/good": good, f"{criterion}/bad": bad, f"{criterion}/kinds": kinds,
                       f"{criterion}/words": words, f"{criterion}/users": owners})
        w = fit_head(good, bad, c)
        figures[criterion] = {
            "pairs": len(mine), "kinds": dict(Counter(kinds.tolist())), "words": len(set(words.tolist())),
            "c_by_cross_validation": {str(x): _interval(*by_c[x]) for x in C_GRID}, "c": c,
            "training_accuracy": _interval(int(np.sum(good @ w > bad @ w)), len(good)),
            "held_out_users": _interval(*by_c[c]),
            "held_out_kinds": _interval(*_grouped_accuracy(good, bad, kinds, c)),
            "held_out_words": _interval(*_grouped_accuracy(good, bad, words, c)),
        }
    np.savez_compressed(out / FEATURES_FILE, **arrays)
    meta = {"task": "judge_head", "suite": str(config.judge_suite), "data": str(config.data),
            "data_hash": cases.logs.digest, "model": model_settings.model, "criteria": pointwise, "c": chosen,
            "templates": {c: criteria.by_name[c].template.version for c in pointwise},
            "features": "final layer, last prompt token", "users_sampled": len(users),
            "users_reserved_for_the_suite": len(cases.reserved), "figures": figures, "seed": config.seed,
            "banned_words": composer.rules.banned_words,
            "seconds": round(time.perf_counter() - started, 1)}
    (out / HEAD_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def hash_fold(user: str) -> int:
    """A user's cross-validation fold: fixed by the id, the same in every run."""
    return int(hashlib.sha256(user.encode()).hexdigest(), 16) % FOLDS

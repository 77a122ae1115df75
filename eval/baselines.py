"""Next-basket baselines, computed from a split's training events alone (the user's own items
included, as the next-basket literature ranks them):

- ``g_topfreq``: the items in the most baskets, the same list for everyone (best-sellers);
- ``p_topfreq``: the user's own items by how many of their baskets held them (ties: the more
  popular first), then best-sellers; under Li et al.'s protocol (``published=True``) as they rank it:
  ties in the order first bought, and no best-sellers after the user's own items;
- ``tifu_knn``: TIFU-KNN (Hu et al., SIGIR 2020): a user's time-decayed basket vector, blended with
  the mean vector of the nearest users, with the published Ta-Feng settings (groups of 7 baskets,
  decay 0.9 within a group and 0.7 between groups, 300 neighbours, alpha 0.7), topped up with
  best-sellers.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import islice

import numpy as np
import scipy.sparse as sp

from retrieval.records import Event
from retrieval.split import baskets

BASELINES = ("g_topfreq", "p_topfreq", "tifu_knn")


def _baskets(train: list[Event]) -> dict[str, list[list[str]]]:
    by_user: dict[str, list[Event]] = defaultdict(list)
    for e in train:
        by_user[e.user_id].append(e)
    return {u: [list(dict.fromkeys(e.item_id for e in b)) for b in baskets(events)] for u, events in by_user.items()}


def _topped_up(own: list[str], best: list[str], k: int) -> list[str]:
    """The first k of ``own``, then best-sellers the user does not own (read only as far as needed)."""
    mine = set(own)
    return own[:k] + list(islice((i for i in best if i not in mine), max(k - len(own), 0)))


def tifu_vector(user_baskets: list[list[str]], group: int = 7, within: float = 0.9, between: float = 0.7,
                ) -> dict[str, float]:
    """Baskets cut into groups of ``group`` from the newest back (the oldest group may be short);
    in a group basket j of n weighs within**(n-1-j)/n, group g of G weighs between**(G-1-g)/G."""
    groups = [user_baskets[max(0, end - group):end] for end in range(len(user_baskets), 0, -group)][::-1]
    vector: dict[str, float] = defaultdict(float)
    for g, members in enumerate(groups):
        for j, basket in enumerate(members):
            weight = between ** (len(groups) - 1 - g) / len(groups) * within ** (len(members) - 1 - j) / len(members)
            for item in basket:
                vector[item] += weight
    return vector


def rank_baselines(train: list[Event], users: list[str], k: int, neighbours: int = 300, alpha: float = 0.7,
                   published: bool = False) -> dict[str, dict[str, list[str]]]:
    per_user = _baskets(train)
    counts = Counter(i for bs in per_user.values() for b in bs for i in b)
    best = sorted(counts, key=lambda i: (-counts[i], i))
    out: dict[str, dict[str, list[str]]] = {name: {} for name in BASELINES}
    for user in users:
        own = Counter(i for b in per_user.get(user, []) for i in b)
        out["g_topfreq"][user] = best[:k]
        if published:  # Counter keeps first-bought order; a stable sort keeps it among ties
            out["p_topfreq"][user] = sorted(own, key=lambda i: -own[i])[:k]
        else:
            out["p_topfreq"][user] = _topped_up(sorted(own, key=lambda i: (-own[i], -counts[i], i)), best, k)
    # TIFU-KNN: one sparse matrix of user vectors; neighbours by cosine, a chunk of users at a time
    everyone = sorted(per_user)
    row = {u: n for n, u in enumerate(everyone)}
    items = sorted(counts)
    column = {i: n for n, i in enumerate(items)}
    entries = [(row[u], column[i], w) for u in everyone for i, w in tifu_vector(per_user[u]).items()]
    r, c, w = zip(*entries, strict=True) if entries else ((), (), ())
    vectors = sp.csr_matrix((w, (r, c)), shape=(len(everyone), len(items)))
    norms = np.sqrt(np.asarray(vectors.multiply(vectors).sum(axis=1)).ravel())
    unit = sp.diags(1.0 / np.maximum(norms, 1e-12)) @ vectors
    known = [u for u in users if u in row]
    nearest = min(neighbours, len(everyone) - 1)
    for start in range(0, len(known), 500):
        chunk = [row[u] for u in known[start:start + 500]]
        similarity = (unit[chunk] @ unit.T).toarray()
        similarity[np.arange(len(chunk)), chunk] = -np.inf  # not one's own neighbour
        for n, user_row in enumerate(chunk):
            score = alpha * vectors[user_row].toarray().ravel()
            if nearest > 0:
                found = np.argpartition(-similarity[n], nearest - 1)[:nearest]
                score += (1 - alpha) * np.asarray(vectors[found].mean(axis=0)).ravel()
            top = np.argsort(-score, kind="stable")[:k]
            out["tifu_knn"][everyone[user_row]] = _topped_up([items[i] for i in top if score[i] > 0], best, k)
    for user in users:
        out["tifu_knn"].setdefault(user, best[:k])
    return out

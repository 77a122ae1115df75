"""A quick offline effect of a merchandising change: each sampled shopper's last basket held out,
the page their earlier events give under two composers (the draft's and the live one), NDCG@10
against the held-out basket, paired. A replay on the serving store, for the console: the candidate
sources' counts still include the held-out baskets (both sides alike), so it compares two sets of
files, it does not score the recommender — `homepage eval ranking` does that on a leak-free split."""

from __future__ import annotations

import random
import statistics
import time

from agent.composer import Composer
from eval.metrics import basket_ndcg, paired_interval
from retrieval.history import build_history
from retrieval.split import baskets


def replay_effect(draft: Composer, live: Composer, users: int = 300, seed: int = 0) -> dict:
    """NDCG@10 of the draft's and the live pages on up to ``users`` shoppers with at least two
    baskets (seeded sample), and draft - live with its 95 % paired-bootstrap interval."""
    started = time.perf_counter()
    catalog, products = live.retriever.catalog, live.retriever.products
    shoppers = catalog.users()
    random.Random(seed).shuffle(shoppers)
    scores: dict[str, dict[str, float]] = {"draft": {}, "live": {}}
    for user in shoppers:
        if len(scores["live"]) >= users:
            break
        visits = baskets(catalog.user_events(user))
        if len(visits) < 2:
            continue
        history = build_history(user, [e for basket in visits[:-1] for e in basket], products)
        target = {e.item_id for e in visits[-1]}
        for side, composer in (("draft", draft), ("live", live)):
            scores[side][user] = basket_ndcg(composer.replay(history).item_ids(), target, 10)
    n = len(scores["live"])
    mean, low, high = paired_interval(scores["draft"], scores["live"], seed=seed) if n else (0.0, 0.0, 0.0)
    return {"users": n, "draft_ndcg@10": statistics.fmean(scores["draft"].values()) if n else None,
            "live_ndcg@10": statistics.fmean(scores["live"].values()) if n else None,
            "draft_minus_live": [round(mean, 5), round(low, 5), round(high, 5)],
            "seconds": round(time.perf_counter() - started, 2)}

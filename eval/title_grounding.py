"""Choosing ``title_grounding.min_share`` on data (issue 20, item 3).

On real modules (the deterministic pages of a store's users), a *matching* title names the category
the module's products are mostly filed under (its most common leaf category, and its most common
department); a *mismatched* title names another user's module's, where that differs from both of this
module's. ``grounded_share`` is computed for each; the threshold kept is the one with the best
balanced accuracy (matching titles accepted, mismatched ones refused), the lowest on a tie.

    python -m eval.title_grounding --store STORE --out docs/results/title-grounding [--users N]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import time
from collections import Counter
from pathlib import Path

from agent.rules import Rules, grounded_share

GRID = [round(0.05 * i, 2) for i in range(1, 21)]


def label_titles(modules: list[tuple[str, list[str]]], products: dict, seed: int = 0):
    """(title, items, matches) triples: per module its two own labels, and a label of another
    user's module that is neither of them."""
    rng = random.Random(seed)

    def labels(items: list[str]) -> list[str]:
        known = [products[i] for i in items if i in products]
        return list(dict.fromkeys(Counter(getattr(p, level) for p in known).most_common(1)[0][0]
                                  for level in ("category", "department")))

    own = [labels(items) for _, items in modules]
    rows = []
    for k, (user, items) in enumerate(modules):
        for label in own[k]:
            rows.append((f"{label} for you", items, True))
        for _ in range(20):  # another user's module, whose label is not this module's
            j = rng.randrange(len(modules))
            other = rng.choice(own[j])
            if modules[j][0] != user and other not in own[k]:
                rows.append((f"{other} for you", items, False))
                break
    return rows


def choose(rows, products: dict, rules: Rules) -> dict:
    shares = [(grounded_share(t, items, products, rules) or 0.0, match) for t, items, match in rows]
    pos = [s for s, m in shares if m]
    neg = [s for s, m in shares if not m]
    table = []
    for threshold in GRID:
        tpr = sum(s >= threshold for s in pos) / len(pos)
        fpr = sum(s >= threshold for s in neg) / len(neg)
        table.append({"min_share": threshold, "matching_accepted": round(tpr, 4),
                      "mismatched_accepted": round(fpr, 4), "balanced_accuracy": round((tpr + 1 - fpr) / 2, 4)})
    best = max(table, key=lambda r: (r["balanced_accuracy"], -r["min_share"]))
    return {"matching": len(pos), "mismatched": len(neg), "chosen": best, "grid": table}


def main() -> None:
    from agent.service import composer_for
    from agent.settings import Settings
    from retrieval import Retriever

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--users", type=int, default=0, help="a seeded sample (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started = time.perf_counter()
    settings = Settings(store_dir=Path(args.store), warm_up=False)
    retriever = Retriever.open(settings.retrieval_config())
    composer = composer_for(settings, retriever)
    users = retriever.catalog.users()
    random.Random(args.seed).shuffle(users)
    users = users[: args.users] if args.users else users
    modules = []
    for user in users:
        page = composer.compose(user, use_llm=False, use_cache=False)
        modules += [(user, [i.item_id for i in m.items]) for m in page.modules]
    result = choose(label_titles(modules, retriever.products, args.seed), retriever.products, composer.rules)
    result.update(users=len(users), modules=len(modules), store=args.store, seed=args.seed,
                  configured=composer.rules.title_grounding.model_dump(),
                  command=f"python -m eval.title_grounding --store {args.store} --users {args.users} --out {args.out}",
                  commit=subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip(),
                  wall_s=round(time.perf_counter() - started, 1))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["chosen"]), result["matching"], result["mismatched"])


if __name__ == "__main__":
    main()

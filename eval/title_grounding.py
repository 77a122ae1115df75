"""Choosing ``title_grounding.min_share`` on data (issue 20, item 3).

On real modules (the deterministic pages of a store's users), a *matching* title names the category
the module's products are mostly filed under (its most common leaf category, and its most common
department); a *mismatched* title names another user's module's, where that differs from both of this
module's. ``grounded_share`` is computed for each; the threshold kept is the one with the best
balanced accuracy (matching titles accepted, mismatched ones refused), the lowest on a tie.

    python -m eval.title_grounding --store STORE --out docs/results/title-grounding [--users N]

``--pages N`` measures the copy instead: N pages of seeded random users composed by the serving
composer (the model, the rules, the fix); per model-written module title of the first draft
(before the checks) and of the returned page (after), the share the rule finds ungrounded, the
distinct titles, and the violations left in returned pages.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import time
from collections import Counter
from pathlib import Path

from agent.rules import Rules, grounded_share
from eval.provenance import checkout

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


def copy_figures(composer, users: list[str], log: Path | None = None, progress: bool = False) -> dict:
    """Titles before the checks (the model's first draft) and after (the returned page), through
    the composer's own stages (no time budget, no cache: the copy is measured, not the speed).
    With ``log``, each page's row is appended as it is made and a run cut short resumes there."""
    from tqdm import tqdm

    done = {}
    if log is not None and log.exists():
        done = {row["user"]: row for row in map(json.loads, log.read_text().splitlines())}
    with open(log, "a") if log is not None else contextlib.nullcontext() as out:
        for user in tqdm([u for u in users if u not in done], desc="pages", disable=not progress):
            done[user] = _page_titles(composer, user)
            if out is not None:
                out.write(json.dumps(done[user]) + "\n")
                out.flush()
    rows = [done[u] for u in users]
    before = [tuple(t) for row in rows for t in row["before"]]
    after = [tuple(t) for row in rows for t in row["after"]]
    paths, left = Counter(row["path"] for row in rows), sum(row["violations_left"] for row in rows)

    def figures(rows: list[tuple[str, bool]]) -> dict:
        return {"titles": len(rows), "ungrounded": sum(u for _, u in rows),
                "ungrounded_share": round(sum(u for _, u in rows) / max(len(rows), 1), 4),
                "distinct": len({t.casefold() for t, _ in rows}),
                "most_common": Counter(t for t, _ in rows).most_common(8)}

    return {"pages": len(users), "paths": dict(paths), "violations_in_returned_pages": left,
            "before": figures(before), "after": figures(after),
            "distinct_titles_on_pages": len({t.casefold() for t, _ in after}
                                            | {m.title.casefold() for m in composer.skeleton.modules})}


def _page_titles(composer, user: str) -> dict:
    """One page's titles: the draft's (each with whether it is ungrounded in the items the model
    picked) and the returned page's that are not the configured copy; its path and violations left."""
    from agent.rules import validate
    from agent.schema import PageDraft
    from agent.stages.sequence import ask_model, finish
    from agent.stages.state import PageState

    ctx, min_share = composer.ctx, composer.rules.title_grounding.min_share

    def ungrounded(title: str, items: list[str]) -> bool:
        share = grounded_share(title, items, ctx.products, ctx.rules)
        return share is not None and share < min_share

    first = 1 if composer.skeleton.planned() else 0  # a plan's generation comes first
    state = PageState(user, composer.retriever.history(user), time.perf_counter())
    ask_model(composer.deps, [state], None)
    draft = PageDraft.model_validate_json(state.generations[first].text)
    before = []
    for module, pool in zip(draft.modules, state.pools.written(), strict=False):
        items = [pool.candidates[h - 1].item_id for h in module.items if 0 < h <= len(pool.candidates)]
        before.append((module.title, ungrounded(module.title, items)))
    page = finish(composer.deps, state, True)
    after = [(m.title, ungrounded(m.title, m.items)) for m in state.body.modules
             if m.title != m.spec.title]  # the configured copy is the merchandiser's, not checked
    return {"user": user, "path": page.meta.path, "violations_left": len(validate(state.body, ctx)),
            "before": before, "after": after}


def main() -> None:
    from agent.service import composer_for
    from agent.settings import Settings
    from retrieval import Retriever

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--users", type=int, default=0, help="a seeded sample (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pages", type=int, default=0, help="measure the copy on N pages instead")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    started, code = time.perf_counter(), checkout()
    settings = Settings(store_dir=Path(args.store), warm_up=False)
    retriever = Retriever.open(settings.retrieval_config())
    composer = composer_for(settings, retriever)
    users = retriever.catalog.users()
    random.Random(args.seed).shuffle(users)
    users = users[: args.users] if args.users else users
    if args.pages:
        from agent.service import build_composer

        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        result = copy_figures(build_composer(settings.model_copy(update={"budget_ms": None})), users[: args.pages],
                              out / "pages.jsonl", progress=True)
        result.update(store=args.store, seed=args.seed, **code,
                      wall_s=round(time.perf_counter() - started, 1),
                      command=f"python -m eval.title_grounding --store {args.store} --pages {args.pages} "
                              f"--out {args.out}")
        _write(Path(args.out), "copy.json", result)
        print(json.dumps({k: result[k] for k in ("paths", "violations_in_returned_pages", "before", "after")}))
        return
    modules = []
    for user in users:
        page = composer.compose(user, use_llm=False, use_cache=False)
        modules += [(user, [i.item_id for i in m.items]) for m in page.modules]
    result = choose(label_titles(modules, retriever.products, args.seed), retriever.products, composer.rules)
    result.update(users=len(users), modules=len(modules), store=args.store, seed=args.seed,
                  configured=composer.rules.title_grounding.model_dump(),
                  command=f"python -m eval.title_grounding --store {args.store} --users {args.users} --out {args.out}",
                  **code, wall_s=round(time.perf_counter() - started, 1))
    _write(Path(args.out), "run.json", result)
    print(json.dumps(result["chosen"]), result["matching"], result["mismatched"])


def _write(out: Path, name: str, result: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / name).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()

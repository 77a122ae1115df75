"""How many of a backend's drafts are usable, on the same shoppers as the embedded backend (issue 26).

    python scripts/server_drafts.py --store STORE --users 40 --out DIR                 # embedded
    HOMEPAGE_BACKEND=openai HOMEPAGE_OPENAI_BASE_URL=http://127.0.0.1:8010/v1 \\
        python scripts/server_drafts.py --store STORE --users 40 --out DIR             # a server

Pages are composed in batches (a server batches them), with no time budget: what is measured is
whether the engine's draft could be used (path ``llm`` or ``repaired``), not its speed. Writes
``drafts-<backend>.json`` (per page: user, path, tokens written, model calls, why not usable)."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from agent.backends import load_backend
from agent.service import composer_for
from agent.settings import Settings
from retrieval.retriever import Retriever


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--users", type=int, default=40)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    settings = Settings.load(store_dir=Path(args.store))
    retriever = Retriever.open(settings.retrieval_config())
    known = retriever.catalog.users()
    users = known[:: max(len(known) // args.users, 1)][: args.users]  # spread over the store, the same each run
    composer = composer_for(settings, retriever, load_backend(settings), budget_s=None, cache=None)
    started = time.perf_counter()
    pages = []
    for at in range(0, len(users), args.batch):
        pages += composer.compose_batch(users[at:at + args.batch], args.batch)
    wall = time.perf_counter() - started
    rows = [{"user": u, "path": p.meta.path, "tokens": p.meta.tokens_generated, "llm_calls": p.meta.llm_calls,
             "why": p.meta.fallback_reason} for u, p in zip(users, pages, strict=True)]
    usable = sum(r["path"] in {"llm", "repaired"} for r in rows)
    summary = {"backend": settings.backend, "users": len(rows), "usable_drafts": usable,
               "usable_share": round(usable / len(rows), 4),
               "tokens_median": statistics.median(r["tokens"] for r in rows),
               "pages_per_minute": round(60 * len(rows) / wall, 1), "wall_s": round(wall, 1), "pages": rows}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"drafts-{settings.backend}.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({k: v for k, v in summary.items() if k != "pages"}))


if __name__ == "__main__":
    main()

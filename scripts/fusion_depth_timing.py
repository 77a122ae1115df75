"""What a deeper fusion costs a page: each configured source retrieved at two depths and fused,
shopper by shopper, the depths interleaved in one process (the machine's load falls on both).
Usage, from the repository root, on the store the settings name (``homepage ingest``'s):

    python scripts/fusion_depth_timing.py [--users 200] [--depths 60,200]

Prints the median and 95th percentile milliseconds a shopper per depth (retrieval and fusion;
each source's median beside), the ratio of the medians, and beside them the semantic source's
median when it searches the vector store instead of memory (its ``exact_max`` option at 0).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from agent.settings import Settings
from agent.stages.pools import POOL_DEPTH
from retrieval.retriever import Retriever


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--depths", default="60,200")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]

    settings = Settings.load()
    retriever = Retriever.open(settings.retrieval_config())
    retriever.prepare()  # as a service's warm-up does
    options = {**settings.source_options, "semantic": {**settings.source_options.get("semantic", {}), "exact_max": 0}}
    in_store = Retriever.open(settings.model_copy(update={"source_options": options}).retrieval_config())
    users = [u for u in retriever.catalog.users() if not retriever.history(u).is_cold][: args.users]
    seconds: dict[int, list[float]] = {d: [] for d in depths}
    each: dict[tuple[str, int], list[float]] = {(s, d): [] for s in [*retriever.weights, "store"] for d in depths}
    for n, user in enumerate(users):
        history = retriever.history(user)
        for depth in depths if n % 2 else depths[::-1]:  # alternate which depth goes first
            start = time.perf_counter()
            found = {}
            for name in retriever.weights:
                began = time.perf_counter()
                found[name] = retriever.source(name).candidates(history, depth)
                each[(name, depth)].append(time.perf_counter() - began)
            retriever.fused(history, found, POOL_DEPTH)
            seconds[depth].append(time.perf_counter() - start)
            began = time.perf_counter()
            in_store.source("semantic").candidates(history, depth)
            each[("store", depth)].append(time.perf_counter() - began)

    def ms(values: list[float]) -> np.ndarray:
        return np.array(values[1:]) * 1000  # the first shopper warms caches

    print(f"{len(users)} shoppers, sources {dict(retriever.weights)}, {len(retriever.products)} products")
    for depth in depths:
        sources = ", ".join(f"{name} {np.median(ms(each[(name, depth)])):.2f}" for name in retriever.weights)
        print(f"depth {depth}: median {np.median(ms(seconds[depth])):.2f} ms, p95 "
              f"{np.percentile(ms(seconds[depth]), 95):.2f} ms (median per source: {sources}; "
              f"semantic in the vector store {np.median(ms(each[('store', depth)])):.2f})")
    first, last = (np.median(ms(seconds[d])) for d in (depths[0], depths[-1]))
    print(f"median ratio depth {depths[-1]} / depth {depths[0]}: {last / first:.3f}")


if __name__ == "__main__":
    main()

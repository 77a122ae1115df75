"""What a deeper fusion costs a page: each configured source retrieved at two depths and fused,
shopper by shopper, the depths interleaved in one process (the machine's load falls on both).
Usage, from the repository root, on the store the settings name (``homepage ingest``'s):

    python scripts/fusion_depth_timing.py [--users 200] [--depths 60,200]

Prints the median and 95th percentile milliseconds a shopper per depth, and their ratio.
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from agent.settings import Settings
from retrieval.retriever import Retriever


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--depths", default="60,200")
    args = parser.parse_args()
    depths = [int(d) for d in args.depths.split(",")]

    settings = Settings.load()
    retriever = Retriever.open(settings.retrieval_config())
    users = [u for u in retriever.catalog.users() if not retriever.history(u).is_cold][: args.users]
    seconds: dict[int, list[float]] = {d: [] for d in depths}
    for n, user in enumerate(users):
        history = retriever.history(user)
        for depth in depths if n % 2 else depths[::-1]:  # alternate which depth goes first
            start = time.perf_counter()
            retriever.fused(history, retriever.per_source(history, depth), 60)
            seconds[depth].append(time.perf_counter() - start)
    print(f"{len(users)} shoppers, sources {dict(retriever.weights)}, {len(retriever.products)} products")
    for depth in depths:
        ms = np.array(seconds[depth][1:]) * 1000  # the first shopper warms caches
        print(f"depth {depth}: median {np.median(ms):.2f} ms, p95 {np.percentile(ms, 95):.2f} ms")
    first, last = (np.median(seconds[d][1:]) for d in (depths[0], depths[-1]))
    print(f"median ratio depth {depths[-1]} / depth {depths[0]}: {last / first:.3f}")


if __name__ == "__main__":
    main()

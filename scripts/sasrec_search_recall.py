"""The vector store's approximate search of learned SASRec item vectors against the exact inner
product, on real shoppers' histories (docs/results/ranking-beauty/: why the sasrec source searches
exactly). Usage, from the repository root:

    python scripts/sasrec_search_recall.py MODEL_FOLDER DATA_FOLDER [--users 2000] [--builds 2]
    python scripts/sasrec_search_recall.py MODEL_FOLDER DATA_FOLDER --timing 400

``--timing N``: instead, N shoppers one at a time as the source serves them, each encoded and then
searched exactly with the product in numpy and in torch (the two interleaved, which goes first
alternating): milliseconds a shopper for encode plus search, why the source's product is torch's.

MODEL_FOLDER: a saved model (``homepage train sasrec``'s, or ``.homepage/eval-cache/sasrec-*/final``);
DATA_FOLDER: its interactions.csv. Each build puts the vectors in a fresh embedded chromadb collection.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from retrieval.sequential import Trained
from retrieval.vectors import VectorIndex, chroma_client


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--users", type=int, default=2000)
    parser.add_argument("--builds", type=int, default=2)
    parser.add_argument("--k", type=int, default=60)
    parser.add_argument("--timing", type=int, default=0, help="time encode + exact search for N shoppers")
    args = parser.parse_args()

    model = Trained.load(args.model)
    events = defaultdict(list)
    with open(args.data / "interactions.csv", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            events[row["user_id"]].append((int(row["seq_pos"]), row["item_id"]))
    users = sorted(events)
    picked = np.random.default_rng(0).choice(len(users), min(args.users, len(users)), replace=False)
    index = model.index
    histories = [[i for _, i in sorted(events[users[u]])[:-1] if i in index] for u in picked]
    if args.timing:
        return timing(model, [h for h in histories if h][: args.timing], args.k)
    queries = model.encode([h for h in histories if h])
    table = model.vectors()

    started = time.perf_counter()
    exact = [np.argsort(-(table @ q))[: args.k] for q in queries]
    exact_ms = (time.perf_counter() - started) / len(queries) * 1000
    print(f"{len(queries)} shoppers, {len(table)} items; exact search {exact_ms:.3f} ms a query (full sort)")
    for build in range(args.builds):
        store = VectorIndex(chroma_client(Path(tempfile.mkdtemp())), None)
        store.put_vectors("item_vectors", model.item_ids, table)
        started = time.perf_counter()
        found = [[i for i, _ in store.search_vectors("item_vectors", q, args.k)] for q in queries]
        approx_ms = (time.perf_counter() - started) / len(queries) * 1000
        pairs = list(zip(exact, found, strict=True))
        recall = np.mean([len({model.item_ids[i] for i in e[:10]} & set(g[:10])) / 10 for e, g in pairs])
        lost = sum(model.item_ids[e[0]] not in g for e, g in pairs)
        print(f"build {build + 1}: recall@10 against exact {recall:.4f}; the exact best item missing from the "
              f"approximate top {args.k} for {lost} of {len(queries)}; {approx_ms:.3f} ms a query")


def timing(model: Trained, histories: list[list[str]], k: int) -> None:
    import torch

    table = model.vectors()
    torch_table = torch.from_numpy(table)

    def with_numpy(history: list[str]) -> None:
        query = model.encode([history])[0]
        np.argpartition(-(table @ query), k)[:k]

    def with_torch(history: list[str]) -> None:
        query = model.encode([history])[0]
        torch.topk(torch_table @ torch.from_numpy(query), k)

    seconds: dict[str, list[float]] = {"numpy": [], "torch": []}
    for n, history in enumerate(histories):
        pair = [("numpy", with_numpy), ("torch", with_torch)]
        for name, search in pair if n % 2 else pair[::-1]:
            started = time.perf_counter()
            search(history)
            seconds[name].append(time.perf_counter() - started)
    print(f"{len(histories)} shoppers, {len(table)} items, torch threads {torch.get_num_threads()}")
    for name, values in seconds.items():
        print(f"encode + {name} product: median {np.median(values[1:]) * 1000:.2f} ms a shopper")


if __name__ == "__main__":
    main()

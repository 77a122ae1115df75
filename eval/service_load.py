"""A bounded load test of the HTTP service: N concurrent clients for S seconds on loopback, mixing
page requests (``?explain=true``, so each page says how it was made) and event posts, each client
pausing a random 0-2x ``think_s`` between requests (0: as fast as answers come).

Every page answered is checked against the public schema; latency is measured by the client, from
sending to the last byte. Figures per path (llm, repaired, fallback, deterministic, cached):
p50/p95/p99, and pages per minute in all and from the model.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from agent.schema import ExplainedPage


def run_load(url: str, users: list[str], items: list[str], clients: int = 16, seconds: float = 60.0,
             event_share: float = 0.2, new_share: float = 0.1, token: str | None = None, seed: int = 0,
             think_s: float = 0.0) -> dict:
    import httpx

    stop_at = time.monotonic() + seconds
    lock = threading.Lock()
    latencies: dict[str, list[float]] = defaultdict(list)
    outcomes: Counter = Counter()
    problems: list[str] = []
    token = token.get_secret_value() if hasattr(token, "get_secret_value") else token  # Settings.api_token
    headers = {"Authorization": f"Bearer {token}"} if token else {}

    def client(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        with httpx.Client(base_url=url, timeout=60.0, headers=headers) as http:
            while time.monotonic() < stop_at:
                user = f"load-new-{index}-{rng.randrange(10**6)}" if rng.random() < new_share else rng.choice(users)
                started = time.perf_counter()
                try:
                    if rng.random() < event_share:
                        body = {"events": [{"user_id": user, "item_id": rng.choice(items),
                                            "timestamp": time.time(), "event_type": "view"}]}
                        response = http.post("/v1/events", json=body)
                        kind = "events"
                    else:
                        response = http.get(f"/v1/users/{user}/homepage", params={"explain": "true"})
                        kind = None
                except httpx.HTTPError as exc:
                    with lock:
                        outcomes["errors"] += 1
                        problems.append(f"{type(exc).__name__}: {exc}"[:200])
                    continue
                took = (time.perf_counter() - started) * 1000
                with lock:
                    if response.status_code != 200:
                        outcomes["errors"] += 1
                        problems.append(f"{response.status_code}: {response.text[:200]}")
                        continue
                if kind is None:
                    try:
                        page = ExplainedPage.model_validate_json(response.content)
                        kind = "cached" if page.meta.cached and page.meta.path != "fallback" else page.meta.path
                        with lock:
                            outcomes.update(f"fixed {v.code}" for v in page.meta.violations_fixed)
                            if page.meta.fallback_reason:
                                outcomes[f"fallback: {page.meta.fallback_reason[:60]}"] += 1
                        ok = bool(page.modules)
                    except ValueError as exc:
                        ok, kind = False, "invalid"
                        problems.append(str(exc)[:200])
                    with lock:
                        outcomes["pages"] += 1
                        outcomes["invalid pages"] += not ok
                with lock:
                    latencies[kind].append(took)
                time.sleep(rng.uniform(0, 2 * think_s))  # a shopper reading the page

    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    began = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - began
    pages = outcomes["pages"]
    latencies = {kind: v for kind, v in latencies.items() if v}
    every_page = [t for kind, v in latencies.items() if kind != "events" for t in v]
    model_pages = len(latencies.get("llm", [])) + len(latencies.get("repaired", []))
    return {
        "url": url, "clients": clients, "seconds": round(wall, 1), "event_share": event_share, "think_s": think_s,
        "requests": sum(len(v) for v in latencies.values()) + outcomes["errors"],
        "errors": outcomes["errors"], "invalid_pages": outcomes["invalid pages"], "pages": pages,
        "pages_per_minute": round(pages / wall * 60, 1),
        "model_pages_per_minute": round(model_pages / wall * 60, 1),
        "fallback_share": round(len(latencies.get("fallback", [])) / max(pages, 1), 3),
        "latency_ms": {kind: {"n": len(v), **{f"p{q}": round(float(np.percentile(v, q)), 1) for q in (50, 95, 99)}}
                       for kind, v in sorted({**latencies, "all pages": every_page}.items()) if v},
        "why": {k: v for k, v in sorted(outcomes.items()) if k.startswith(("fixed", "fallback"))},
        "problems": problems[:20],
    }


def format_report(report: dict) -> str:
    lines = [f"{report['clients']} clients for {report['seconds']} s against {report['url']} "
             f"({report['event_share']:.0%} event posts, {report['think_s']} s mean pause between requests)", "",
             "| answered as | requests | p50 ms | p95 ms | p99 ms |", "| --- | --- | --- | --- | --- |"]
    for kind, row in report["latency_ms"].items():
        lines.append(f"| {kind} | {row['n']} | {row['p50']} | {row['p95']} | {row['p99']} |")
    lines += ["", f"errors {report['errors']}, invalid pages {report['invalid_pages']}, pages {report['pages']} "
              f"({report['pages_per_minute']} per minute; {report['model_pages_per_minute']} per minute from the "
              f"model), fallback share {report['fallback_share']:.1%}", "",
              *(f"- {k}: {v}" for k, v in report["why"].items())]
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "load.json").write_text(json.dumps(report, indent=2))
    (out / "load.md").write_text(format_report(report) + "\n")

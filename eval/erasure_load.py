"""Erasure under load: ``homepage eval load --forget N`` runs the load test (``eval.service_load``) while
N users are erased one after another through ``DELETE /v1/users/{id}``, event writers post events
for other users, and a prober times ``/healthz``. Afterwards the store is read back: every event a
writer was told was accepted is there exactly once, and nothing of the erased users is left.
"""

from __future__ import annotations

import json
import random
import threading
import time
from pathlib import Path

import numpy as np

from eval.service_load import run_load
from retrieval.retriever import RetrievalConfig

WRITERS = 2  # event-posting clients beside the load test's own


def run_erasure_load(url: str, store: RetrievalConfig, users: list[str], items: list[str], token: str,
                     forget: int = 20, clients: int = 16, seconds: float = 60.0, seed: int = 0,
                     think_s: float = 0.0) -> dict:
    """``store``: the served store's settings, to read its events back afterwards (either engine)."""
    import httpx

    rng = random.Random(seed)
    shuffled = rng.sample(users, len(users))
    erased, writers_users = shuffled[:forget], shuffled[forget:]
    if not erased or not writers_users:
        raise ValueError(f"{len(users)} users: too few to erase {forget} and keep some")
    headers = {"Authorization": f"Bearer {token}"}
    stop, load_done = threading.Event(), threading.Event()
    accepted: list[tuple[str, str, float]] = []
    receipts: list[dict] = []
    health_ms: list[float] = []
    problems: list[str] = []
    lock = threading.Lock()

    def write(index: int) -> None:
        local = random.Random(seed * 100 + index)
        base = float(int(time.time()) - 86_400 + index)  # yesterday: a sane time; distinct per writer
        n = 0
        with httpx.Client(base_url=url, timeout=60.0, headers=headers) as http:
            while not stop.is_set():
                event = {"user_id": local.choice(writers_users), "item_id": local.choice(items),
                         "timestamp": base + n * WRITERS, "event_type": "view"}
                n += 1
                try:
                    answer = http.post("/v1/events", json={"events": [event]})
                except httpx.HTTPError as exc:
                    with lock:
                        problems.append(f"event: {type(exc).__name__}: {exc}"[:200])
                    continue
                with lock:
                    if answer.status_code == 200 and answer.json()["accepted"] == 1:
                        accepted.append((event["user_id"], event["item_id"], event["timestamp"]))
                    else:
                        problems.append(f"event: {answer.status_code}: {answer.text[:150]}")

    def erase() -> None:  # back to back from the start; the load test runs meanwhile
        with httpx.Client(base_url=url, timeout=120.0, headers=headers) as http:
            for user in erased:
                started = time.perf_counter()
                answer = http.delete(f"/v1/users/{user}")
                took = round((time.perf_counter() - started) * 1000)
                with lock:
                    body = answer.json() if answer.status_code == 200 else {}
                    receipts.append({"user": user, "status": answer.status_code, "ms": took,
                                     "clean": body.get("clean"), "during_load": not load_done.is_set()})

    def probe() -> None:
        with httpx.Client(base_url=url, timeout=10.0) as http:
            while not stop.is_set():
                started = time.perf_counter()
                try:
                    ok = http.get("/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                with lock:
                    health_ms.append((time.perf_counter() - started) * 1000 if ok else float("inf"))
                stop.wait(0.05)

    eraser = threading.Thread(target=erase)
    threads = [threading.Thread(target=write, args=(i,)) for i in range(WRITERS)] + [threading.Thread(target=probe)]
    for t in [eraser, *threads]:
        t.start()
    load = run_load(url, users, items, clients, seconds, event_share=0.0, token=token, seed=seed, think_s=think_s)
    load_done.set()
    eraser.join()  # every erasure finishes, with events still arriving
    stop.set()
    for t in threads:
        t.join()
    gone = [r["user"] for r in receipts if r["status"] == 200]

    catalog = store.open_catalog()
    try:
        stored = {u: {(e.item_id, e.timestamp) for e in catalog.user_events(u)} for u in {a[0] for a in accepted}}
        rows = {u: catalog.event_count(u) for u in stored}
        left_of_erased = sum(catalog.event_count(u) for u in gone)
    finally:
        catalog.close()
    mine = {u: {(i, t) for v, i, t in accepted if v == u} for u in stored}
    lost = sum(len(mine[u] - stored[u]) for u in mine)
    # a writer's timestamps are its own: any row at one of them beyond the accepted ones is a double
    doubled = sum(rows[u] - len(stored[u]) for u in rows)
    finite = [ms for ms in health_ms if ms != float("inf")]
    return {
        "load": load, "forgotten": len(gone), "forgotten_during_load": sum(r["during_load"] for r in receipts),
        "forget_status": sorted({r["status"] for r in receipts}),
        "forget_clean": sum(bool(r["clean"]) for r in receipts), "forget_ms_p50": _pct([r["ms"] for r in receipts], 50),
        "events_accepted": len(accepted), "events_lost": lost, "events_doubled": doubled,
        "erased_users_events_left": left_of_erased,
        "healthz": {"n": len(health_ms), "failed": len(health_ms) - len(finite),
                    **{f"p{q}_ms": _pct(finite, q) for q in (50, 99)}},
        "problems": problems[:20],
    }


def _pct(values: list[float], q: int) -> float | None:
    return round(float(np.percentile(values, q)), 1) if values else None


def format_report(report: dict) -> str:
    from eval.service_load import format_report as load_table

    h = report["healthz"]
    return "\n".join([
        load_table(report["load"]), "",
        f"Erased: {report['forgotten']} users through DELETE /v1/users/{{id}}, "
        f"{report['forgotten_during_load']} of them while the load ran (answers "
        f"{report['forget_status']}, {report['forget_clean']} proven clean, p50 {report['forget_ms_p50']} ms each); "
        f"events of the erased users left in the store: {report['erased_users_events_left']}.",
        f"Other users' events posted meanwhile: {report['events_accepted']} accepted, {report['events_lost']} lost, "
        f"{report['events_doubled']} doubled.",
        f"/healthz every 50 ms: {h['n']} probes, {h['failed']} failed, p50 {h['p50_ms']} ms, p99 {h['p99_ms']} ms.",
        *(f"- {p}" for p in report["problems"]),
    ])


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "erasure_load.json").write_text(json.dumps(report, indent=2))
    (out / "erasure_load.md").write_text(format_report(report) + "\n")

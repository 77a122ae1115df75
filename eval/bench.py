"""``homepage bench``: where a page's time goes, measured side by side in one run.

Paths: the LLM path (plan, compose, check, one retry, fix; measured without the time budget so the
figures show the model's real cost, then counted against the budget), with ``before`` a second
configuration's LLM path interleaved user by user (both see the same machine), the deterministic
path, the cache path, and batch precompute. Then validity at scale: pages for a seeded random sample
of users through the single-page LLM path, counting exceptions, schema-valid pages and rule violations
before repair (by code), after the LLM retry and in the returned pages (the bar: 0 and 0).
"""

from __future__ import annotations

import json
import random
import resource
import statistics
import time
from collections import Counter
from pathlib import Path

from tqdm import tqdm

from agent.rules import ModuleBody, PageBody, validate
from agent.schema import Homepage


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99 by the nearest-rank method (no interpolation), in the unit given."""
    ordered = sorted(values)

    def rank(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, int(-(-q * len(ordered) // 100)) - 1))]

    return {"p50": rank(50), "p95": rank(95), "p99": rank(99), "n": len(ordered)}


def returned_violations(composer, page: Homepage) -> list:
    """The rules checked again on the page as returned (modules matched to the skeleton by type:
    a module may be left off a user's page)."""
    specs = {spec.type: spec for spec in composer.skeleton.modules}
    body = PageBody([
        ModuleBody(specs[m.type], m.title, [i.item_id for i in m.items], {i.item_id for i in m.items if i.sponsored})
        for m in page.modules
    ])
    return validate(body, composer.ctx)


def earlier(settings):
    """The configuration before the verbalizer and the compact prompt: the templates in
    ``prompts/full``, the model writing each module's order token by token, no adapter."""
    from prompts import PROMPTS_DIR

    return settings.model_copy(update={"prompts_dir": PROMPTS_DIR / "full", "handle_prior": None, "adapter": None})


def llm_summary(rows: list[tuple[float, Homepage]], budget: float | None) -> dict:
    """Latency and token counts of LLM-path pages: (seconds, page) per user."""
    return {
        "latency_ms": percentiles([s * 1000 for s, _ in rows]),
        "tokens_per_page": statistics.median(p.meta.tokens_generated for _, p in rows),
        "prompt_tokens_per_page": statistics.median(p.meta.prompt_tokens for _, p in rows),
        "prefill_ms": statistics.median(p.meta.prefill_ms for _, p in rows),
        "forward_passes_per_page": statistics.median(p.meta.forward_passes for _, p in rows),
        "llm_calls_per_page": statistics.mean(p.meta.llm_calls for _, p in rows),
        "over_budget": sum(1 for s, _ in rows if budget is not None and s > budget) / len(rows),
        "paths": dict(Counter(p.meta.path for _, p in rows)),
    }


def run_bench(composer, users: int = 40, batch_size: int = 8, validity_users: int = 1000, seed: int = 0,
              progress: bool = True, before=None) -> dict:
    """``before``: another composer (the configuration to compare with) timed on the LLM path beside
    ``composer``, alternating user by user."""
    known = composer.retriever.catalog.users()
    rng = random.Random(seed)
    picked = rng.sample(known, min(users, len(known)))
    picked[-max(users // 10, 1):] = [f"bench-new-user-{i}" for i in range(max(users // 10, 1))]  # cold starts
    report: dict = {"users": len(picked), "model": composer.backend.model_name, "budget_s": composer.budget_s}

    budget = composer.budget_s
    timed = {"llm": composer, **({"llm_before": before} if before is not None else {})}
    for c in timed.values():
        c.compose(picked[0], use_cache=False)  # warm-up: grammar compile, system-prompt KV cache
    # no budget while timed: the figures are the model's (a model loaded once, shared by both)
    timed = {name: c.using(budget_s=None) for name, c in timed.items()}
    rows: dict[str, list] = {name: [] for name in timed}
    for user in tqdm(picked, desc="LLM path", disable=not progress):
        for name, c in timed.items():
            started = time.perf_counter()
            page = c.compose(user, use_cache=False)
            rows[name].append((time.perf_counter() - started, page))
    for name in timed:
        report[name] = llm_summary(rows[name], budget)
    if before is not None:
        report["before"] = (f"compose template {before.prompts['compose'].version}, handle_prior "
                            f"{before.handle_prior}, adapter {before.backend.adapter}")

    deterministic = []
    for _ in range(3):
        for user in picked:
            started = time.perf_counter()
            composer.compose(user, use_llm=False, use_cache=False)
            deterministic.append((time.perf_counter() - started) * 1000)
    report["deterministic"] = {"latency_ms": percentiles(deterministic)}

    for user in picked:  # fill the cache (deterministic pages are cached as such), then time hits
        composer.compose(user, use_llm=False)
    hits = []
    for _ in range(5):
        for user in picked:
            started = time.perf_counter()
            page = composer.compose(user, use_llm=False)
            hits.append((time.perf_counter() - started) * 1000)
            if not page.meta.cached:
                raise RuntimeError(f"expected a cache hit for {user}, got a page composed anew")
    report["cache"] = {"latency_ms": percentiles(hits)}

    batch_users = picked[: 4 * batch_size]
    started = time.perf_counter()
    composer.compose_batch(batch_users, batch_size=batch_size)
    seconds = time.perf_counter() - started
    report["batch"] = {"batch_size": batch_size, "pages": len(batch_users),
                       "pages_per_minute": round(len(batch_users) / seconds * 60, 1)}

    if validity_users:  # a seeded random sample: every kind of user, not the heaviest ones
        sample = random.Random(seed + 1).sample(known, min(validity_users, len(known)))
        report["validity"] = validity(composer, sample, progress)
    report["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return report


def validity(composer, users: list[str], progress: bool) -> dict:
    """Pages through the single-page LLM path without a time budget (on this CPU it is faster than
    batch precompute, see docs/results.md), every one checked."""
    counts = {"pages": 0, "exceptions": 0, "schema_valid": 0, "violating_before_repair": 0,
              "violating_after_llm_retry": 0, "violations_in_returned_pages": 0, "errors": []}
    started = time.perf_counter()
    composer = composer.using(budget_s=None)
    by_code: Counter = Counter()
    paths: Counter = Counter()
    for user in tqdm(users, desc="validity", disable=not progress):
        counts["pages"] += 1
        try:
            page = composer.compose(user, use_cache=False)
        except Exception as exc:  # counted, never hidden: the bar is 0
            counts["exceptions"] += 1
            counts["errors"].append(f"{user}: {type(exc).__name__}: {exc}"[:300])
            continue
        Homepage.model_validate_json(page.model_dump_json())  # raises if the page breaks its schema
        counts["schema_valid"] += 1
        per_call = page.meta.violations_per_call
        counts["violating_before_repair"] += bool(per_call and per_call[0])
        counts["violating_after_llm_retry"] += bool(per_call and per_call[-1])
        first = page.meta.violations_fixed[: per_call[0]] if per_call else []
        by_code.update(v.code for v in first)
        counts["violations_in_returned_pages"] += len(returned_violations(composer, page))
        paths[page.meta.path] += 1
    counts["violations_before_repair_by_code"], counts["paths"] = dict(by_code), dict(paths)
    counts["seconds"] = round(time.perf_counter() - started, 1)
    return counts


def format_report(report: dict) -> str:
    def row(name: str, entry: dict) -> str:
        lat = entry["latency_ms"]
        return f"| {name} | {lat['p50']:.2f} | {lat['p95']:.2f} | {lat['p99']:.2f} | {lat['n']} |"

    def costs(name: str, llm: dict) -> list[str]:
        return [f"{name}: {llm['tokens_per_page']} tokens and {llm['forward_passes_per_page']} model steps per page "
                f"(median), {llm['llm_calls_per_page']:.2f} LLM calls per page, {llm['over_budget']:.0%} over the "
                f"budget, paths {llm['paths']}; reading the prompt: {llm['prompt_tokens_per_page']} tokens, "
                f"{llm['prefill_ms']:.0f} ms per page (median)"]

    before = report.get("llm_before")
    lines = [
        f"model {report['model']}, {report['users']} users (10% new), time budget {report['budget_s']} s",
        "",
        "| path | p50 ms | p95 ms | p99 ms | pages |",
        "| --- | --- | --- | --- | --- |",
        row("LLM (plan, compose, check, retry, fix)", report["llm"]),
        *([row(f"LLM, before ({report['before']})", before)] if before else []),
        row("deterministic", report["deterministic"]),
        row("cache hit", report["cache"]),
        "",
        *costs("LLM path", report["llm"]),
        *(costs("LLM path before", before) if before else []),
        f"batch precompute (batch {report['batch']['batch_size']}): {report['batch']['pages_per_minute']} pages/min",
    ]
    if "validity" in report:
        v = report["validity"]
        lines.append(
            f"validity over {v['pages']} users (seeded random sample): {v['exceptions']} exceptions, "
            f"{v['schema_valid']} schema-valid, {v['violating_before_repair']} with violations before repair "
            f"{v['violations_before_repair_by_code']}, {v['violating_after_llm_retry']} after the LLM retry, "
            f"{v['violations_in_returned_pages']} violations in returned pages ({v['seconds']} s; {v['paths']})"
        )
    lines.append(f"peak memory (RSS): {report['peak_rss_mb']} MB")
    return "\n".join(lines)


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(report, indent=2))
    (out / "bench.md").write_text(format_report(report) + "\n")

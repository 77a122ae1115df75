"""Before/after of a LoRA adapter, in one run (``homepage eval adapter CONFIG``): the base model and
the adapter compose pages for the same validation users, from a store that holds their history only.

Per variant:
- unconstrained validity: the model writes the draft with no grammar; the share that parses as JSON,
  the share that is a usable draft (the schema, one module per slot, the right number of distinct
  handles, each among that module's candidates), and the share whose page breaks no business rule;
- pre-repair rule violations: the grammar-constrained draft (what serving decodes) checked against
  the rules before any repair (the share of pages with at least one, and the mean count);
- ranking of the page the caller gets (after repair): NDCG@10 and Recall@10 against the validation basket;
- tokens and model steps per page, and latency (constrained path, no retry, no time budget).
The deterministic page (retrieval order, no model) is scored on the same users for reference.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from collections import Counter
from pathlib import Path

from agent.adapters import read_metadata, write_metadata
from agent.backends.hf import TransformersBackend
from agent.cache import PageCache
from agent.composer import Composer
from agent.rules import validate
from agent.schema import PageDraft
from agent.service import composer_for
from agent.settings import Settings
from agent.stages.assemble import assemble
from agent.stages.draft import parse_draft
from agent.stages.pools import Pools
from eval.metrics import basket_ndcg, basket_recall
from finetune.config import FinetuneConfig
from finetune.store import build_store, read_logs, validation_part
from finetune.train import base_model_name

FREE_TOKENS = 120  # a page draft is ~70 tokens; an unconstrained model that rambles is cut here


def free_draft_problem(text: str, slots: list[tuple[int, int]]) -> str | None:
    """Why an unconstrained draft is unusable, or None; ``"json"`` when it does not even parse."""
    try:
        json.loads(text)
    except ValueError:
        return "json"
    try:
        draft = PageDraft.model_validate_json(text)
    except ValueError:
        return "schema"
    if len(draft.modules) != len(slots):
        return "module count"
    for module, (offered, count) in zip(draft.modules, slots, strict=True):
        if len(module.items) != count or len(set(module.items)) != len(module.items):
            return "item count"
        if any(not 1 <= h <= offered for h in module.items):
            return "unknown handle"
    return None


def free_page_problem(text: str, composer: Composer, pools: Pools) -> str | None:
    """``free_draft_problem``, then the business rules on the page the draft makes (``rule <code>``)."""
    problem = free_draft_problem(text, [(len(m.candidates), m.count(composer.rules)) for m in pools.written()])
    if problem is not None:
        return problem
    broken = validate(assemble(pools, parse_draft(text, pools)), composer.ctx)
    return f"rule {broken[0].code}" if broken else None


def _user_row(composer: Composer, backend: TransformersBackend, user: str, target: list[str]) -> dict:
    page = composer.compose(user, use_cache=False)
    meta = page.meta
    history = composer.retriever.history(user)
    pools = composer.pools(history)
    free = backend.generate_free(composer.messages(history, pools), FREE_TOKENS)
    ranked = page.item_ids()
    count = meta.violations_per_call[0] if meta.violations_per_call else 0  # the first draft's, before repair
    return {
        "user_id": user, "path": meta.path, "violations": count,
        "codes": [v.code for v in meta.violations_fixed[:count]], "ndcg@10": basket_ndcg(ranked, target, 10),
        "recall@10": basket_recall(ranked, target, 10), "tokens": meta.tokens_generated,
        "steps": meta.forward_passes, "latency_ms": meta.latency_ms,
        "free_problem": free_page_problem(free.text, composer, pools), "free_tokens": free.tokens,
    }


def summarise(rows: list[dict]) -> dict:
    n = max(len(rows), 1)
    return {
        "users": len(rows),
        "free_json_valid": sum(r["free_problem"] != "json" for r in rows) / n,
        "free_draft_valid": sum(r["free_problem"] is None or r["free_problem"].startswith("rule")
                                for r in rows) / n,
        "free_page_valid": sum(r["free_problem"] is None for r in rows) / n,
        "free_tokens_median": statistics.median(r["free_tokens"] for r in rows) if rows else 0,
        "pages_violating_pre_repair": sum(r["violations"] > 0 for r in rows) / n,
        "violations_per_page": sum(r["violations"] for r in rows) / n,
        "violation_codes": dict(Counter(c for r in rows for c in r["codes"])),
        "ndcg@10": sum(r["ndcg@10"] for r in rows) / n,
        "recall@10": sum(r["recall@10"] for r in rows) / n,
        "tokens_median": statistics.median(r["tokens"] for r in rows) if rows else 0,
        "steps_median": statistics.median(r["steps"] for r in rows) if rows else 0,
        "latency_ms_median": statistics.median(r["latency_ms"] for r in rows) if rows else 0,
    }


def compare(config: FinetuneConfig, settings: Settings, adapter: Path, users: int = 30, seed: int = 0,
            progress: bool = True) -> dict:
    from tqdm import tqdm

    started = time.perf_counter()
    work = Path(config.out)
    logs = read_logs(config.data, settings, work / "quarantine")
    store_events, targets = validation_part(logs.events)
    retriever = build_store(work / "store-valid", settings, logs.catalogue, store_events, progress)
    sample = sorted(targets)
    random.Random(seed).shuffle(sample)
    sample = sample[:users]
    base = base_model_name(config, settings)

    reference = composer_for(settings, retriever, cache=PageCache(0))
    ranked = {u: reference.compose(u, use_llm=False, use_cache=False).item_ids() for u in sample}
    report = {"deterministic": {
        "users": len(sample),
        "ndcg@10": statistics.fmean(basket_ndcg(ranked[u], targets[u], 10) for u in sample),
        "recall@10": statistics.fmean(basket_recall(ranked[u], targets[u], 10) for u in sample),
    }}
    rows = {}
    # a fully fine-tuned model is a model folder of its own (method: full), an adapter rides on the base
    tuned = ({"model": str(adapter), "gguf_file": None, "adapter": None} if config.method == "full"
             else {"model": base, "gguf_file": config.gguf_file, "adapter": str(adapter)})
    for name, update in (("base", {"model": base, "gguf_file": config.gguf_file, "adapter": None}),
                         ("adapter", tuned)):
        variant = settings.model_copy(update=update)
        backend = TransformersBackend.from_settings(variant)
        composer = composer_for(settings, retriever, backend, llm_retry=False, budget_s=None,
                                       cache=PageCache(0))
        rows[name] = [_user_row(composer, backend, u, targets[u])
                      for u in tqdm(sample, desc=name, unit="user", disable=not progress)]
        report[name] = summarise(rows[name])
    retriever.close()
    report["meta"] = {"data": str(config.data), "base_model": base, "adapter": str(adapter), "users": len(sample),
                      "seed": seed, "seconds": round(time.perf_counter() - started, 1),
                      "adapter_metrics": read_metadata(adapter).get("metrics", {})}
    report["rows"] = rows
    return report


def table(report: dict) -> str:
    def pct(x: float) -> str:
        return f"{100 * x:.1f} %"

    lines = ["| | base | adapter |", "| --- | --- | --- |"]
    rows = [
        ("JSON valid, no constraints", "free_json_valid", pct),
        ("usable draft, no constraints", "free_draft_valid", pct),
        ("draft breaking no rule, no constraints", "free_page_valid", pct),
        ("pages with rule violations before repair", "pages_violating_pre_repair", pct),
        ("rule violations per page before repair", "violations_per_page", lambda x: f"{x:.3f}"),
        ("page NDCG@10 (returned page)", "ndcg@10", lambda x: f"{x:.4f}"),
        ("page Recall@10", "recall@10", lambda x: f"{x:.4f}"),
        ("tokens per page (median)", "tokens_median", lambda x: f"{x:g}"),
        ("model steps per page (median)", "steps_median", lambda x: f"{x:g}"),
        ("latency per page (median)", "latency_ms_median", lambda x: f"{x:.0f} ms"),
        ("tokens written unconstrained (median)", "free_tokens_median", lambda x: f"{x:g}"),
    ]
    for label, key, fmt in rows:
        lines.append(f"| {label} | {fmt(report['base'][key])} | {fmt(report['adapter'][key])} |")
    d = report["deterministic"]
    lines.append(f"\nDeterministic page (no model), same {d['users']} users: NDCG@10 {d['ndcg@10']:.4f}, "
                 f"Recall@10 {d['recall@10']:.4f}.")
    for name in ("base", "adapter"):
        lines.append(f"Violation codes before repair, {name}: {report[name]['violation_codes'] or 'none'}.")
    return "\n".join(lines)


def write_report(report: dict, out: Path, adapter: Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "adapter_eval.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "adapter_eval.md").write_text(table(report) + "\n")
    metadata = read_metadata(adapter)
    if metadata:  # the adapter carries its measured effect
        metadata["evaluation"] = {k: report[k] for k in ("base", "adapter", "deterministic")} | {
            "users": report["meta"]["users"], "seed": report["meta"]["seed"]}
        write_metadata(adapter, metadata)

"""SFT examples from the logs: the production prompt in, the page the user's next basket asks for out.

For each training user (``finetune.store.training_part``: validation and test baskets never enter),
the prompt is rendered exactly as serving renders it — same templates, same retrieval settings, same
candidate pools — from a store holding only what came before the target basket. The target
``PageDraft`` puts the candidates the user went on to buy first, then keeps retrieval order, within
the rules (at most N items of one brand); its titles come from the teacher. A target that breaks a
rule is skipped and counted, never trained on.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections import Counter
from pathlib import Path

from agent.backends import LLMBackend
from agent.composer import Composer
from agent.rules import BrandQuota, validate
from agent.schema import DraftModule, PageDraft, title_pattern
from agent.service import adapter_inputs, composer_for
from agent.settings import Settings
from agent.stages.assemble import assemble
from agent.stages.draft import parse_draft
from agent.stages.pools import Pools
from finetune.config import FinetuneConfig, TeacherConfig
from finetune.store import build_store, read_logs, training_part
from retrieval.history import History

EXAMPLES_FILE = "examples.jsonl"
MANIFEST_FILE = "manifest.json"


def template_title(template: str, history: History, composer: Composer) -> str | None:
    """A teacher title from a copy template and the shopper's top department/category/brand, or
    None when the result would break the title rules."""
    top = {
        "department": Counter(p.department for p in history.items),
        "category": Counter(p.category for p in history.items),
        "brand": Counter(p.brand for p in history.items if p.brand),
    }
    values = {name: counts.most_common(1)[0][0] for name, counts in top.items() if counts}
    try:
        title = template.format(**values)
    except (KeyError, IndexError, ValueError):
        return None
    rules = composer.rules
    if rules.title_problem(title) or not re.fullmatch(title_pattern(rules.title_min_chars, rules.title_max_chars),
                                                        title):
        return None
    return title


def teacher_titles(teacher: TeacherConfig, history: History, composer: Composer, pools: Pools,
                   backend: LLMBackend | None) -> list[str]:
    """One title per model-written module: the teacher's, else the skeleton's."""
    specs = [m.spec for m in pools.written()]
    titles = [spec.title for spec in specs]  # the skeleton's copy where the teacher has none
    if teacher.kind == "backend" and backend is not None:
        generation = backend.generate(composer.messages(history, pools), composer.schema(pools),
                                      composer.max_new_tokens)
        try:
            drafted = [m.title for m in PageDraft.model_validate_json(generation.text).modules]
        except ValueError:
            return titles
        if len(drafted) == len(titles):
            titles = [t if not composer.rules.title_problem(t) else fallback for t, fallback in zip(drafted, titles,
                                                                                                  strict=True)]
        return titles
    for i, spec in enumerate(specs):
        template = teacher.copy_templates.get(spec.type)
        if template and (title := template_title(template, history, composer)):
            titles[i] = title
    return titles


def target_draft(composer: Composer, pools: Pools, target: set[str], titles: list[str]) -> tuple[PageDraft, int]:
    """Per module, the handles of its candidates the user bought next, then the rest in retrieval
    order, skipping an item whose brand already fills the module's quota. Returns the draft and the
    number of target items it shows."""
    modules, hits = [], 0
    for module, title in zip(pools.written(), titles, strict=True):
        pool = module.candidates
        order = sorted(range(len(pool)), key=lambda h: (pool[h].item_id not in target, h))
        brands = BrandQuota(composer.rules.max_items_per_brand, composer.retriever.products,
                            [*module.pinned, *module.ads])
        picked = []
        for h in order:
            if len(picked) == module.count(composer.rules):
                break
            if not brands.admits(pool[h].item_id):
                continue
            brands.add(pool[h].item_id)
            picked.append(h + 1)
        hits += sum(pool[h - 1].item_id in target for h in picked)
        modules.append(DraftModule(title=title, items=picked))
    return PageDraft(modules=modules), hits


def build_examples(config: FinetuneConfig, settings: Settings, teacher_backend: LLMBackend | None = None,
                   progress: bool = True) -> dict:
    """Write ``examples.jsonl`` and ``manifest.json`` under ``config.out``; returns the manifest."""
    from tqdm import tqdm

    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    logs = read_logs(config.data, settings, out / "quarantine")
    store_events, targets = training_part(logs.events)
    retriever = build_store(out / "store-train", settings, logs.catalogue, store_events, progress)
    composer = composer_for(settings, retriever)
    if composer.skeleton.planned():
        # a planned module's pool depends on the model's plan; examples would fix it to the configured query
        print("note: planned modules use their configured query in the examples (the plan step is not trained)")

    users = sorted(targets)
    random.Random(config.seed).shuffle(users)
    users = users[: config.users] if config.users else users
    held_out = set(users[: round(len(users) * config.eval_fraction)])
    skipped: Counter = Counter()
    written = with_hits = in_eval = 0
    shuffler = random.Random(config.seed + 1)
    with open(out / EXAMPLES_FILE, "w", encoding="utf-8") as f:
        for user in tqdm(users, desc="examples", unit="user", disable=not progress):
            history = retriever.history(user)
            pools = composer.pools(history)
            retrieval_order = [[c.item_id for c in m.candidates] for m in pools.written()]
            if config.shuffle_candidates:
                for module in pools.written():
                    shuffler.shuffle(module.candidates)
            titles = teacher_titles(config.teacher, history, composer, pools, teacher_backend)
            draft, hits = target_draft(composer, pools, set(targets[user]), titles)
            violations = validate(assemble(pools, parse_draft(draft.model_dump_json(), pools)), composer.ctx)
            if violations:
                skipped[f"target breaks {violations[0].code}"] += 1
                continue
            first_bought = [bool(m.items) and pool.candidates[m.items[0] - 1].item_id in targets[user]
                            for m, pool in zip(draft.modules, pools.written(), strict=True)]
            record = {"user_id": user, "split": "eval" if user in held_out else "train",
                      "messages": composer.messages(history, pools), "completion": draft.model_dump_json(),
                      "target_items": targets[user], "hits": hits, "first_bought": first_bought,
                      # per module: its candidates (the listwise loss's choices), and where the item it
                      # leads with stood in retrieval order (the baseline a trained order must beat)
                      "pool_sizes": [len(m.candidates) for m in pools.written()],
                      "leader_retrieval_rank": [order.index(pool.candidates[m.items[0] - 1].item_id) + 1
                                                if m.items else None for m, pool, order in
                                                zip(draft.modules, pools.written(), retrieval_order, strict=True)]}
            f.write(json.dumps(record) + "\n")
            written += 1
            with_hits += hits > 0
            in_eval += user in held_out
    retriever.close()

    manifest = {
        "data": str(config.data), "data_hash": logs.digest, "events": len(logs.events),
        "store_events": len(store_events), "users_with_target": len(targets), "users_sampled": len(users),
        "examples": written, "examples_eval": in_eval,
        "examples_with_target_shown": with_hits, "skipped": dict(skipped),
        **adapter_inputs(settings, composer),
        "teacher": config.teacher.model_dump(), "seed": config.seed,
        "shuffle_candidates": config.shuffle_candidates,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return manifest


def read_examples(out: Path) -> list[dict]:
    with open(Path(out) / EXAMPLES_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f]

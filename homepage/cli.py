"""The ``homepage`` command line: a thin layer over the packages; heavy imports inside commands.

Examples:
  homepage ingest                          # the shipped sample into .homepage/store
  homepage ingest --catalogue items.parquet --events events.jsonl
  homepage compose A2V5R832QCSOMX --json
  homepage demo --users 3
  homepage finetune finetune/configs/smoke.yaml   # LoRA adapter from the sample's logs
  homepage eval adapter finetune/configs/smoke.yaml
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import time
from pathlib import Path

from agent.errors import UserError


def _settings(args: argparse.Namespace):
    from agent.settings import Settings

    overrides = {k: v for k, v in {"store_dir": args.store}.items() if v is not None}
    return Settings.load(**overrides)


def cmd_ingest(args: argparse.Namespace) -> int:
    _ingest(_settings(args), args.catalogue, args.events, args.users, events_only=args.events_only)
    return 0


def _ingest(settings, catalogue=None, events=None, users=None, events_only: bool = False) -> None:
    """Ingest the named files, or those the settings name (the shipped sample by default)."""
    from retrieval import ingest

    started = time.perf_counter()
    report = ingest(
        settings.retrieval_config(), Path(catalogue or settings.catalogue), Path(events or settings.events),
        settings.catalogue_columns, settings.event_columns, events_only=events_only,
        users_path=Path(users) if users else settings.users, user_columns=settings.user_columns,
    )
    for line in report.lines():
        print(line)
    print(f"store: {settings.store_dir} ({time.perf_counter() - started:.1f} s)")


def _print_page(page) -> None:
    meta = page.meta
    path = f"{meta.path}, cached" if meta.cached else meta.path
    print(f"== {page.user_id}  [{path}, {meta.latency_ms:.0f} ms, {meta.tokens_generated} tokens, "
          f"{meta.forward_passes} model steps{', cold start' if meta.cold_start else ''}]")
    for module in page.modules:
        print(f"  {module.title}  ({module.type})")
        for item in module.items:
            price = f"${item.price:.2f}" if item.price is not None else "-"
            print(f"    - {item.title[:60]:60}  {price:>8}  | {item.reason}")
    for violation in meta.violations_fixed:
        print(f"  repaired: {violation.code}: {violation.message}")
    if meta.fallback_reason:
        print(f"  fallback: {meta.fallback_reason}")
    for note in meta.notes:
        print(f"  note: {note}")


def _compose(settings, user_ids: list[str], as_json: bool) -> None:
    from agent.service import build_composer

    started = time.perf_counter()
    composer = build_composer(settings)
    if not as_json:
        print(f"(composer ready in {time.perf_counter() - started:.1f} s)", file=sys.stderr)
    for user_id in user_ids:
        page = composer.compose(user_id)
        if as_json:
            print(page.model_dump_json(indent=2))
        else:
            _print_page(page)


def cmd_compose(args: argparse.Namespace) -> int:
    from agent.composer import check_user_id

    check_user_id(args.user)  # before anything loads: a bad id costs nothing
    settings = _settings(args)
    _ensure_store(settings)
    _compose(settings, [args.user], args.json)
    return 0


def cmd_precompute(args: argparse.Namespace) -> int:
    """Pages made ahead for the store's shoppers (``agent.precompute``); resumable."""
    from agent.precompute import precompute, precompute_on_ray
    from agent.service import build_composer

    settings = _settings(args)
    _ensure_store(settings)
    if args.ray:
        users, _ = _users_and_items(settings)
        report = precompute_on_ray(settings, users[: args.users] if args.users else users, args.batch,
                                   args.workers, args.ray_address, progress=True)
    else:
        composer = build_composer(settings)
        users = composer.retriever.catalog.users(limit=args.users)  # the most active first
        report = precompute(composer, users, args.batch, progress=True)
    for line in report.lines():
        print(line)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    """Who the shopper is and what they do (``retrieval.profile``), read from the event store only."""
    import json

    from agent.composer import check_user_id
    from retrieval.profile import profile_of

    check_user_id(args.user)
    settings = _settings(args)
    _ensure_store(settings)
    stored = settings.retrieval_config().privacy().stored_id(args.user) or args.user
    if args.interests:  # opens the vector store: not beside a service that owns the embedded one
        from retrieval import Retriever
        from retrieval.profile import with_interests

        retriever = Retriever.open(settings.retrieval_config())
        try:
            profile = with_interests(profile_of(retriever.catalog, stored), retriever, retriever.history(stored))
        finally:
            retriever.close()
        record = profile.record()
    else:
        catalog = settings.retrieval_config().open_catalog()
        try:
            record = profile_of(catalog, stored).record()
        finally:
            catalog.close()
    record["user_id"] = args.user  # as asked: never the pseudonym
    print(json.dumps(record, indent=2, ensure_ascii=False))
    return 0


def _ensure_store(settings) -> None:
    from retrieval.retriever import CATALOG_FILE

    config = settings.retrieval_config()
    if not (config.store_url or (Path(settings.store_dir) / CATALOG_FILE).exists()) or \
            config.open_catalog().event_count() == 0:
        raise UserError(f"the store {settings.store_dir} is empty: run `homepage ingest` first")


def _users_and_items(settings) -> tuple[list[str], list[str]]:
    """The store's users (most active first) and product ids; read only (SQLite, safe beside a service)."""

    catalog = settings.retrieval_config().open_catalog()
    try:
        return catalog.users(), list(catalog.products)
    finally:
        catalog.close()


def cmd_demo(args: argparse.Namespace) -> int:
    settings = _settings(args)
    _ingest(settings, args.catalogue, args.events)  # its --users counts shoppers to show, not a users file
    users, _ = _users_and_items(settings)
    # a few real users across the activity range, plus one nobody has seen (cold start)
    step = max(len(users) // max(args.users, 1), 1)
    picked = [*users[::step][: args.users], "new-visitor-0001"]
    _compose(settings, picked, as_json=False)
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from retrieval import remove_products

    settings = _settings(args)
    _ensure_store(settings)
    removed = remove_products(settings.retrieval_config(), args.items)
    missing = sorted(set(args.items) - set(removed))
    print(f"removed {len(removed)} product(s)" + (f"; not in the catalogue: {missing}" if missing else ""))
    return 0


def _writes(settings, *folders) -> None:
    """Register output folders with the store, so that ``homepage forget`` reaches them."""
    from retrieval.erasure import register_output

    for folder in folders:
        if folder:
            register_output(settings.store_dir, Path(folder))


def _publish(settings, out: str | None, write, report) -> None:
    """Write a report where ``--out`` asks, the folder registered with the store."""
    if out:
        _writes(settings, out)
        write(report, Path(out))


def cmd_forget(args: argparse.Namespace) -> int:
    from retrieval.erasure import AUDIT_FILE, UnknownUser, erase, erase_expired, registered_outputs

    settings = _settings(args)
    config = settings.retrieval_config()
    outputs = [*registered_outputs(settings.store_dir), *(Path(o) for o in args.outputs)]
    if args.expired:
        if args.users:
            raise UserError("give user ids or --expired, not both")
        if settings.retention_days is None:
            raise UserError("--expired needs the retention_days setting (homepage.toml or HOMEPAGE_RETENTION_DAYS)")
        before = time.time() - settings.retention_days * 86_400
        receipt = erase_expired(config, before, outputs, user_fields=[settings.event_columns.user_id])
    else:
        if not args.users:
            raise UserError("name the users to forget (or --expired)")
        try:
            receipt = erase(config, args.users, outputs, user_fields=[settings.event_columns.user_id])
        except UnknownUser as exc:
            raise UserError(str(exc)) from None
    print("\n".join(receipt.lines()))
    print(f"receipt appended to {Path(settings.store_dir) / AUDIT_FILE}")
    # 1: traces found. Places no run can read from here (a server's files) are listed, NOT PROVEN
    return 1 if receipt.found else 0


def cmd_eval_ranking(args: argparse.Namespace) -> int:
    from eval.ranking import SOURCES_EVALUATED, RankingConfig, intervals_table, run, table, transfer_table

    if not (Path(args.data) / "interactions.csv").exists() or not (Path(args.data) / "items.csv").exists():
        raise UserError(f"--data {args.data}: expected items.csv and interactions.csv in it")
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    if not sources or set(sources) - set(SOURCES_EVALUATED):
        raise UserError(f"--sources {args.sources}: choose from {','.join(SOURCES_EVALUATED)}")
    settings = _settings(args)  # the column mapping, as ingest reads it
    started = time.perf_counter()
    config = RankingConfig(data=Path(args.data), users=args.users, seed=args.seed, out=args.out,
                           cache=None if args.no_cache else Path(args.cache), tune_users=args.tune_users,
                           gate_users=args.gate_users or None, sources=sources,
                           catalogue_columns=settings.catalogue_columns, event_columns=settings.event_columns,
                           llm_users=args.llm_users, llm_tune_users=args.llm_tune_users,
                           llm_before_users=args.llm_before_users, protocol=args.protocol, settings=settings)
    config.sasrec.seed, config.sasrec.threads, config.sasrec.max_minutes = args.seed, args.threads, args.minutes
    _writes(settings, args.out, config.cache)
    report = run(config)
    meta = report["meta"]
    print(table(report["results"]))
    print(intervals_table([r for r in meta["comparisons"] if r["system"] in ("page", "llm_page")]))
    print(transfer_table(meta["transfer"]))
    print(f"covisit {meta['covisit']}; fusion {meta['fusion_weights']}, rrf_k {meta['rrf_k']}; "
          f"buy_again min_probability {meta['buy_again_min_probability']}")
    print(f"timings {meta['timings']}")
    print(f"{meta['users_evaluated']} users; wall time {time.perf_counter() - started:.1f} s"
          + (f"; report in {args.out}" if args.out else ""))
    return 0


def cmd_eval_load(args: argparse.Namespace) -> int:
    from eval.service_load import format_report, run_load, write_report

    settings = _settings(args)
    users, items = _users_and_items(settings)
    if not users or not items:
        raise UserError(f"{settings.store_dir}: no users or products to load the service with")
    if args.forget:
        from eval import erasure_load

        if not settings.api_token:
            raise UserError("--forget erases through DELETE /v1/users/{id}: set the api_token (HOMEPAGE_API_TOKEN)")
        report = erasure_load.run_erasure_load(args.url, settings.retrieval_config(), users, items,
                                               settings.api_token.get_secret_value(), args.forget, args.clients,
                                               args.seconds, args.seed, args.think)
        print(erasure_load.format_report(report))
        _publish(settings, args.out, erasure_load.write_report, report)
        return 0
    report = run_load(args.url, users, items, args.clients, args.seconds, args.event_share,
                      token=settings.api_token, seed=args.seed, think_s=args.think)
    print(format_report(report))
    _publish(settings, args.out, write_report, report)
    return 0


def cmd_eval_injection(args: argparse.Namespace) -> int:
    from agent.service import build_composer
    from eval.injection import PAYLOADS, format_report, run, write_report

    settings = _settings(args)
    _ensure_store(settings)
    everyone, _ = _users_and_items(settings)
    users = sorted(random.Random(args.seed).sample(everyone, min(args.users, len(everyone))))
    reports = []
    for prior in args.priors:
        composer = build_composer(settings.model_copy(update={
            "handle_prior": None if prior == "none" else float(prior), "budget_ms": None, "cache_users": 0}))
        for payload in args.payloads or list(PAYLOADS):
            reports.append(run(composer, users, payload, args.batch, args.seed))
            print(format_report(reports[-1:]).splitlines()[-1], f"({reports[-1]['seconds']} s)", flush=True)
    print(format_report(reports))
    _publish(settings, args.out, write_report, reports)
    return 0


def cmd_eval_judge(args: argparse.Namespace) -> int:
    from eval.judge.criteria import load_criteria
    from eval.judge.report import tables, write_report
    from eval.judge.run import run
    from eval.judge.suite import load_suite

    settings = _settings(args)
    suite = load_suite(Path(args.suite), set(load_criteria().by_name))
    _writes(settings, args.out)
    result = run(suite, settings, Path(args.out))
    write_report(result, Path(args.out))
    print(tables(result))
    print(f"report: {Path(args.out) / 'judge.md'}, {Path(args.out) / 'judge.html'}, {Path(args.out) / 'judge.json'}")
    return 0


def cmd_train_sasrec(args: argparse.Namespace) -> int:
    from retrieval.retriever import CHROMA_DIR
    from retrieval.sequential import SASRecConfig, train_for_store
    from retrieval.vectors import LocalEmbeddings, VectorIndex, chroma_client

    settings = _settings(args)
    _ensure_store(settings)
    started = time.perf_counter()
    config = SASRecConfig(epochs=args.epochs, max_minutes=args.minutes, seed=args.seed)
    catalog = settings.retrieval_config().open_catalog()
    try:
        client = chroma_client(Path(settings.store_dir) / CHROMA_DIR, settings.chroma_host, settings.chroma_port)
        trained = train_for_store(catalog, VectorIndex(client, LocalEmbeddings(settings.embedding_model)),
                                  Path(settings.store_dir), config)
    finally:
        catalog.close()
    facts = trained.facts
    print(f"sasrec: {facts['epochs_run']} epochs (best {facts['best_epoch']}, validation NDCG@10 "
          f"{facts['best_val_ndcg@10']}), {time.perf_counter() - started:.1f} s on {config.threads} threads; "
          f"saved under {settings.store_dir}/sasrec. Serve it with the source weight sources.sasrec.")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from agent.service import build_composer
    from eval.bench import format_report, run_bench, write_report

    settings = _settings(args)
    _ensure_store(settings)
    composer = build_composer(settings)
    before = None
    if args.before:
        from eval.bench import earlier

        before = build_composer(earlier(settings))
    report = run_bench(composer, users=args.users, batch_size=args.batch, validity_users=args.validity_users,
                       seed=args.seed, before=before)
    print(format_report(report))
    _publish(settings, args.out, write_report, report)
    return 0


def cmd_finetune(args: argparse.Namespace) -> int:
    from agent.errors import ConfigError

    settings = _settings(args)
    if args.target == "fields":
        from finetune.config import field_help

        print("\n".join(field_help()))
        return 0
    if args.target == "merge":
        from finetune.merge import merge

        if len(args.paths) != 2:
            raise UserError("usage: homepage finetune merge ADAPTER OUT")
        _writes(settings, args.paths[1])  # a merged model saw the adapter's users: erasure lists it
        merge(Path(args.paths[0]), Path(args.paths[1]), settings.model_cache_dir, args.model)
        print(f"merged model in {args.paths[1]}; serve it with HOMEPAGE_MODEL={args.paths[1]}")
        return 0
    if args.paths:
        raise UserError(f"unexpected arguments {args.paths}; usage: homepage finetune CONFIG")
    from agent.backends import load_backend
    from finetune.config import load_config
    from finetune.examples import build_examples, read_examples
    from finetune.train import output_dir, train

    config = load_config(Path(args.target))
    teacher = None
    if config.teacher.kind == "backend":
        if not config.teacher.model:
            raise ConfigError(f"{args.target}: teacher.model is required when teacher.kind is 'backend'")
        teacher = load_backend(settings.model_copy(update={
            "backend": config.teacher.backend, "model": config.teacher.model,
            "openai_base_url": config.teacher.base_url, "adapter": None}))
    started = time.perf_counter()
    _writes(settings, config.out)
    if config.task == "judge_head":
        from eval.judge.head import train_head

        if config.judge_suite is None:
            raise ConfigError(f"{args.target}: judge_suite is required when task is 'judge_head'")
        meta = train_head(config, settings)
        for criterion, f in meta["figures"].items():
            print(f"{criterion}: {f['pairs']} pairs; accuracy on held-out users {f['held_out_users']}, kinds "
                  f"{f['held_out_kinds']}, words {f['held_out_words']} (C {f['c']})")
        print(f"head judge in {config.out} ({meta['seconds']} s); judge with it: kind: head, head: {config.out}")
        return 0
    if config.task == "judge":
        from eval.judge.training import build_judge_examples

        if config.judge_suite is None:
            raise ConfigError(f"{args.target}: judge_suite is required when task is 'judge'")
        manifest = build_judge_examples(config, settings)
        print(f"judge examples: {manifest['examples']} ({manifest['examples_eval']} held out) from "
              f"{manifest['users_sampled']} training users ({manifest['seconds']} s) -> {config.out}")
    else:
        manifest = build_examples(config, settings, teacher)
        print(f"examples: {manifest['examples']} ({manifest['examples_eval']} held out for the evaluation loss), "
              f"{manifest['examples_with_target_shown']} showing an item the user bought next; skipped "
              f"{manifest['skipped'] or 'none'} ({manifest['seconds']} s) -> {config.out}")
    if args.examples_only:
        return 0
    metadata = train(config, settings, read_examples(config.out), manifest, restart=args.restart).metadata
    folder = output_dir(config)
    print(f"{config.method}: {folder}; {metadata['metrics']}; total {time.perf_counter() - started:.0f} s")
    served_as = "HOMEPAGE_MODEL" if config.method == "full" else "HOMEPAGE_ADAPTER"
    print(f"serve it with {served_as}={folder}; compare with: homepage eval adapter {args.target}")
    return 0


def cmd_eval_adapter(args: argparse.Namespace) -> int:
    from eval.adapter import compare, table, write_report
    from finetune.config import load_config
    from finetune.train import output_dir

    settings = _settings(args)
    config = load_config(Path(args.config))
    adapter = Path(args.adapter) if args.adapter else output_dir(config)
    out = Path(args.out) if args.out else Path(config.out) / "eval"
    _writes(settings, out)
    report = compare(config, settings, adapter, users=args.users, seed=args.seed)
    print(table(report))
    print(f"{report['meta']['users']} validation users; {report['meta']['seconds']} s")
    write_report(report, out, adapter)
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    from agent.settings_reference import markdown

    if args.markdown:
        print(markdown(), end="")
        return 0
    print(_settings(args).model_dump_json(indent=2, exclude={"privacy_key", "api_token", "read_token"}))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import json

    from agent.api import create_app

    settings = _settings(args)
    if args.openapi:
        print(json.dumps(create_app(settings).openapi(), indent=1, sort_keys=True))
        return 0
    import uvicorn

    if args.workers > 1 and not settings.chroma_host:  # else every worker but one dies on the store
        raise UserError(f"--workers {args.workers}: the embedded vector store serves one process; run chromadb as "
                        "a server (`chroma run --path <store>/chroma`) and set chroma_host (HOMEPAGE_CHROMA_HOST), "
                        "or serve with one worker")
    if args.workers == 1:
        uvicorn.run(create_app(settings), host=args.host, port=args.port, timeout_graceful_shutdown=30)
        return 0
    # each worker process builds the app from settings (homepage.toml, HOMEPAGE_*): hand --store on
    if args.store:
        os.environ["HOMEPAGE_STORE_DIR"] = args.store
    uvicorn.run("agent.api:app_from_settings", factory=True, host=args.host, port=args.port, workers=args.workers,
                timeout_graceful_shutdown=30)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="homepage", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", help="store folder (default: HOMEPAGE_STORE_DIR or .homepage/store)")
    sub = parser.add_subparsers(dest="command", required=True)

    for add in (_data_commands, _page_commands, _model_commands, _eval_commands, _serve_commands):
        add(sub)
    return parser


def _data_commands(sub) -> None:
    """ingest, remove, forget, settings: what the store holds and how it is set."""
    ingest = sub.add_parser("ingest", help="load catalogue and events into the stores (idempotent)")
    ingest.add_argument("--catalogue", help="catalogue file (.csv, .jsonl, .parquet)")
    ingest.add_argument("--events", help="events file (.csv, .jsonl, .parquet)")
    ingest.add_argument("--users", help="who the shoppers are: user id and attribute columns (.csv, .jsonl, "
                        ".parquet); personal data, erased by forget")
    ingest.add_argument("--events-only", action="store_true",
                        help="add the events to the event store alone (safe while another process owns the store)")
    ingest.set_defaults(run=cmd_ingest)

    remove = sub.add_parser("remove", help="take products out of the catalogue and the vector store")
    remove.add_argument("items", nargs="+", help="product ids")
    remove.set_defaults(run=cmd_remove)

    forget = sub.add_parser("forget", help="erase users (or, with --expired, events past retention_days) from the "
                            "store and every output folder, then prove it with a byte scan")
    forget.add_argument("users", nargs="*", help="user ids as the shop knows them (an e-mail address finds its "
                        "pseudonym)")
    forget.add_argument("--expired", action="store_true", help="erase every event older than retention_days")
    forget.add_argument("--outputs", nargs="*", default=[], help="more folders to clean and scan (folders that "
                        "commands wrote are registered with the store and always included)")
    forget.set_defaults(run=cmd_forget)

    settings = sub.add_parser("settings", help="the settings in force (file + HOMEPAGE_* env), secrets left out")
    settings.add_argument("--markdown", action="store_true", help="print every setting's reference instead "
                          "(docs/configuration.md)")
    settings.set_defaults(run=cmd_settings)


def _page_commands(sub) -> None:
    """compose, precompute, profile, demo: pages and who they are for."""
    compose = sub.add_parser("compose", help="compose one user's homepage")
    compose.add_argument("user", help="user id (an unknown id gets a cold-start page)")
    compose.add_argument("--json", action="store_true", help="print the Homepage JSON")
    compose.set_defaults(run=cmd_compose)

    precomputing = sub.add_parser(
        "precompute", help="make pages ahead for the store's shoppers; the service serves them while current",
        description="Example: homepage precompute --users 1000 --batch 8   (killed and run again, it makes only "
                    "the pages still missing or stale)")
    precomputing.add_argument("--users", type=int, help="the N most active shoppers (default: all)")
    precomputing.add_argument("--batch", type=int, default=8, help="pages whose model calls share forward passes")
    precomputing.add_argument("--ray", action="store_true", help="on Ray actors, each with its own composer (needs "
                              "chroma_host: a chromadb server the actors share)")
    precomputing.add_argument("--workers", type=int, default=2, help="Ray actors (one CPU each)")
    precomputing.add_argument("--ray-address", help="a running Ray cluster (default: a local one for this run)")
    precomputing.set_defaults(run=cmd_precompute)

    profile = sub.add_parser("profile", help="who a shopper is and what they do: attributes and behaviour tags")
    profile.add_argument("user", help="user id")
    profile.add_argument("--interests", action="store_true", help="add the interests the embedding model learned "
                         "(opens the vector store: not beside a service on the embedded one)")
    profile.set_defaults(run=cmd_profile)

    demo = sub.add_parser("demo", help="ingest the sample and print pages for a few users")
    demo.add_argument("--users", type=int, default=3, help="how many known users (plus one new visitor)")
    demo.add_argument("--catalogue", help=argparse.SUPPRESS)
    demo.add_argument("--events", help=argparse.SUPPRESS)
    demo.set_defaults(run=cmd_demo)


def _model_commands(sub) -> None:
    """train, finetune: the learned retriever and the page model."""
    train = sub.add_parser("train", help="train a learned retriever on the store's events")
    train_sub = train.add_subparsers(dest="model", required=True)
    sasrec = train_sub.add_parser("sasrec", help="the SASRec sequential model (item vectors into the store)",
                                  description="Example: homepage train sasrec --minutes 20")
    sasrec.add_argument("--epochs", type=int, default=200, help="upper bound (early stopping on validation)")
    sasrec.add_argument("--minutes", type=float, default=20.0, help="wall-clock cap on training")
    sasrec.add_argument("--seed", type=int, default=0)
    sasrec.set_defaults(run=cmd_train_sasrec)


    finetune = sub.add_parser(
        "finetune", help="LoRA fine-tuning: SFT examples from the logs, training, merging",
        description="homepage finetune CONFIG [--restart] | homepage finetune merge ADAPTER OUT | "
                    "homepage finetune fields\nExample: homepage finetune finetune/configs/smoke.yaml",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    finetune.add_argument("target", help="a config file (YAML); 'merge'; or 'fields' (every config field, with help)")
    finetune.add_argument("paths", nargs="*", help="for merge: ADAPTER OUT")
    finetune.add_argument("--restart", action="store_true", help="ignore checkpoints; train from the start")
    finetune.add_argument("--examples-only", action="store_true", help="write the examples and manifest, no training")
    finetune.add_argument("--model", help="for merge: the base model (default: from the adapter's metadata)")
    finetune.set_defaults(run=cmd_finetune)


def _eval_commands(sub) -> None:
    """eval ranking, load, adapter, judge, injection: the offline suites."""
    evaluate = sub.add_parser("eval", help="offline evaluation suites")
    eval_sub = evaluate.add_subparsers(dest="suite", required=True)
    ranking = eval_sub.add_parser(
        "ranking", help="ranking metrics of every source, the baselines, the fusion and the page, side by side; "
        "columns mapped as for ingest (HOMEPAGE_CATALOGUE_COLUMNS, HOMEPAGE_EVENT_COLUMNS)",
        description="Example: homepage eval ranking --data data/amazon-beauty --users 2000 --out reports/ranking")
    ranking.add_argument("--data", required=True, help="folder with items.csv and interactions.csv")
    ranking.add_argument("--users", type=int, help="evaluate a seeded sample of N users (default: all)")
    ranking.add_argument("--out", type=Path, help="write ranking.json, ranking.md, ranking.png, run.json here")
    ranking.add_argument("--seed", type=int, default=0)
    ranking.add_argument("--tune-users", type=int, default=2000,
                         help="validation users the covisit options and the buy-again threshold are chosen on")
    ranking.add_argument("--gate-users", type=int, default=0,
                         help="validation users the fusion is chosen and checked on (default 0: all of them)")
    ranking.add_argument("--llm-users", type=int, default=2000,
                         help="test users the model composes a page for (seeded sample; ~2 s each; 0: no LLM page)")
    ranking.add_argument("--llm-tune-users", type=int, default=200,
                         help="validation users the verbalizer's blend (handle_prior) is chosen on")
    ranking.add_argument("--llm-before-users", type=int, default=0,
                         help="of those, users the earlier configuration composes for too (prompts/full, the model "
                              "writing each order token by token, no adapter): system llm_page_before")
    ranking.add_argument("--cache", default=".homepage/eval-cache", help="trained models and product vectors")
    ranking.add_argument("--no-cache", action="store_true", help="train and embed from scratch, keep nothing")
    ranking.add_argument("--minutes", type=float, default=15.0, help="wall-clock cap on SASRec training")
    ranking.add_argument("--threads", type=int, default=2, help="torch threads for training (1 on a busy CPU)")
    ranking.add_argument("--sources", default="popularity,covisit,semantic,sasrec,buy_again",
                         help="candidate sources to evaluate, comma-separated (leaving sasrec out skips its training)")
    ranking.add_argument("--protocol", choices=["ours", "li"], default="ours",
                         help="ours: every user's last basket is the test target; li: Li et al. (TOIS 2023), "
                              "users split 72/8/20, NDCG over the whole basket, their P-TopFreq (first-bought "
                              "ties, no top-up)")
    ranking.set_defaults(run=cmd_eval_ranking)
    load = eval_sub.add_parser(
        "load", help="a bounded load test of a running service (users and items read from the store)",
        description="Example: HOMEPAGE_API_TOKEN=secret homepage --store STORE eval load --url "
        "http://127.0.0.1:8080 --clients 16 --seconds 60 --out out/load")
    load.add_argument("--url", default="http://127.0.0.1:8080")
    load.add_argument("--clients", type=int, default=16)
    load.add_argument("--seconds", type=float, default=60.0)
    load.add_argument("--event-share", type=float, default=0.2, help="share of requests that post an event")
    load.add_argument("--think", type=float, default=0.0, help="mean pause between a client's requests, seconds")
    load.add_argument("--seed", type=int, default=0)
    load.add_argument("--forget", type=int, default=0, help="erase this many of the store's users during the run "
                      "(DELETE /v1/users/{id}) while other users' events are posted; then check the store")
    load.add_argument("--out", help="write load.json and load.md here")
    load.set_defaults(run=cmd_eval_load)
    adapter = eval_sub.add_parser(
        "adapter", help="base model vs LoRA adapter on the same validation users",
        description="Example: homepage eval adapter finetune/configs/smoke.yaml --users 30")
    adapter.add_argument("config", help="the fine-tuning config (its data and out folder)")
    adapter.add_argument("--adapter", help="adapter folder (default: OUT/adapter of the config)")
    adapter.add_argument("--users", type=int, default=30, help="validation users (seeded sample)")
    adapter.add_argument("--seed", type=int, default=0)
    adapter.add_argument("--out", help="write adapter_eval.json and .md here (default: OUT/eval)")
    adapter.set_defaults(run=cmd_eval_adapter)
    judge = eval_sub.add_parser(
        "judge", help="LLM-judge suite: judges calibrated on known-answer cases, then win rates",
        description="Example: homepage eval judge eval/suites/llm_vs_deterministic.yaml --out out/judge")
    judge.add_argument("suite", help="the suite file (YAML)")
    judge.add_argument("--out", required=True, help="write judge.json, judge.md and judge.html here")
    judge.set_defaults(run=cmd_eval_judge)
    injection = eval_sub.add_parser(
        "injection", help="how far injected product titles steer the model's page, before and after mitigation",
        description="Example: homepage --store STORE eval injection --users 60 --priors none inf --out out/injection")
    injection.add_argument("--users", type=int, default=60, help="users of the store (seeded sample)")
    injection.add_argument("--priors", nargs="+", default=["none"], help="handle_prior values to measure under "
                           "(none: the model writes each module's order; inf: the serving default, pool order)")
    injection.add_argument("--payloads", nargs="*", help="which injections (default: all)")
    injection.add_argument("--batch", type=int, default=8)
    injection.add_argument("--seed", type=int, default=0)
    injection.add_argument("--out", help="write injection.json and injection.md here")
    injection.set_defaults(run=cmd_eval_injection)


def _serve_commands(sub) -> None:
    """bench, serve: speed and the HTTP service."""
    bench = sub.add_parser("bench", help="latency, tokens and validity of the LLM, deterministic and cache paths",
                           description="Example: homepage bench --users 40 --validity-users 1000 --out out/bench")
    bench.add_argument("--users", type=int, default=40, help="users timed per path (10%% of them new)")
    bench.add_argument("--batch", type=int, default=8, help="batch size for precompute")
    bench.add_argument("--validity-users", type=int, default=1000, help="pages checked for validity (0: skip)")
    bench.add_argument("--seed", type=int, default=0)
    bench.add_argument("--before", action="store_true",
                       help="also time the earlier configuration (prompts/full, the model writing each module's "
                            "order token by token), interleaved with this one user by user")
    bench.add_argument("--out", help="write bench.json and bench.md here")
    bench.set_defaults(run=cmd_bench)


    serve = sub.add_parser(
        "serve", help="the HTTP service (FastAPI on uvicorn): pages, events, catalogue updates, reloads, metrics",
        description="Example: HOMEPAGE_API_TOKEN=secret homepage serve --port 8080. More than one worker needs "
        "the vector store in server mode (HOMEPAGE_CHROMA_HOST): the embedded one belongs to one process.")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.add_argument("--workers", type=int, default=1, help="processes, each with its own model")
    serve.add_argument("--openapi", action="store_true", help="print the OpenAPI schema and exit")
    serve.set_defaults(run=cmd_serve)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UserError as exc:
        print(f"homepage: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:  # data files that cannot be read, a store in use: the caller's to fix too
        from agent.errors import PageUnavailable
        from retrieval import DataFileError, StoreInUse

        if isinstance(exc, DataFileError | StoreInUse | PageUnavailable):
            print(f"homepage: {exc}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())

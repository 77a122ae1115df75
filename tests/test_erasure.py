"""Privacy end to end on a small store of the sample with planted personal data: nothing planted is
written anywhere (ingest, pages, fine-tuning examples and stores, an evaluation); ``forget`` erases a
user from every place and a byte scan proves it; deleting alone would not; retention ages events out.
Tests in this module run in order on one store (the planted check first, then the erasures)."""

from __future__ import annotations

import csv
import ctypes
import json
import sqlite3
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from conftest import STORE_URL, assert_proven, catalog_at, sample_slice, sqlite_only

from agent.service import composer_for
from agent.settings import Settings
from retrieval import Retriever, ingest
from retrieval.erasure import AUDIT_FILE, Traces, erase, erase_expired, register_output, scan
from retrieval.retriever import CATALOG_FILE, CHROMA_DIR
from retrieval.vectors import _HNSW_HEADER, BEHAVIOUR, chroma_client

M_PERTURB = -6  # glibc's mallopt parameter
EMAIL_USER, PHONE_USER = "planted.user@example.net", "+44 20 7946 0999"
PLANTED = {
    "title": " - questions? write to jane.roe@example.org",
    "description": "Call +1 (415) 555-0199 or pay with 4111 1111 1111 1111. My name is Janet Planted.",
    "brand": "Sold from 12 Oak Lane",
}
PLANTED_STRINGS = ["jane.roe@example.org", "555-0199", "4111 1111 1111 1111", "Janet Planted", "12 Oak Lane",
                   EMAIL_USER, PHONE_USER, "7946 0999"]


def _plant(folder: Path) -> tuple[str, str]:
    """Personal data in three products' text, and two users renamed to an e-mail and a phone number."""
    with open(folder / "items.csv", newline="") as f:
        items = list(csv.DictReader(f))
    items[0]["title"] += PLANTED["title"]
    items[1]["description"] = PLANTED["description"]
    items[2]["brand"] = PLANTED["brand"]
    with open(folder / "items.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*items[0].keys(), "description"], restval="")
        writer.writeheader()
        writer.writerows(items)
    with open(folder / "interactions.csv", newline="") as f:
        events = list(csv.DictReader(f))
    counts: dict[str, int] = {}
    for e in events:
        counts[e["user_id"]] = counts.get(e["user_id"], 0) + 1
    first, second = sorted(counts, key=lambda u: (-counts[u], u))[:2]
    for e in events:
        e["user_id"] = {first: EMAIL_USER, second: PHONE_USER}.get(e["user_id"], e["user_id"])
    with open(folder / "interactions.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(events[0]))
        writer.writeheader()
        writer.writerows(events)
    return first, second


@pytest.fixture(scope="module", autouse=True)
def _uninitialised_memory_visible():
    """glibc fills what malloc hands out with a non-zero byte here, so chromadb's HNSW files show any
    part written from uninitialised memory (elsewhere it is often zero by chance, and the check
    would pass by luck)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        yield
        return
    mallopt(M_PERTURB, 0x55)
    yield
    mallopt(M_PERTURB, 0)


@pytest.fixture(scope="module")
def world(tmp_path_factory, composer):
    """Ingest, pages (deterministic and the real model's), fine-tuning examples and their stores,
    and a ranking evaluation, all from the planted data; every output folder registered."""
    from eval.ranking import RankingConfig, run
    from finetune.config import FinetuneConfig
    from finetune.examples import build_examples

    root = tmp_path_factory.mktemp("privacy")
    data = sample_slice(root / "data", products=300)
    _plant(data)
    settings = Settings(store_dir=root / "store", model_cache_dir=root / "models", budget_ms=None)
    report = ingest(settings.retrieval_config(), data / "items.csv", data / "interactions.csv", progress=False)
    retriever = Retriever.open(settings.retrieval_config())
    served = composer_for(settings, retriever, composer.backend)
    pages = [served.compose(u) for u in (EMAIL_USER, PHONE_USER)] + [served.compose(EMAIL_USER, use_llm=False)]
    finetune_out, eval_out, cache = root / "finetune", root / "eval", root / "eval-cache"
    for folder in (finetune_out, eval_out, cache):
        register_output(settings.store_dir, folder)
    build_examples(FinetuneConfig(data=data, out=finetune_out, users=40), settings, progress=False)
    run(RankingConfig(data=data, users=20, tune_users=20, out=eval_out, cache=cache, sources=("popularity", "covisit"),
                      llm_users=0, llm_tune_users=0, progress=False, bootstrap=50, settings=settings))
    (root / "pages").mkdir()
    (root / "pages" / "pages.json").write_text(json.dumps([p.model_dump(mode="json") for p in pages]))
    return {"root": root, "settings": settings, "retriever": retriever, "report": report, "pages": pages,
            "outputs": [finetune_out, eval_out, cache], "served": served}


def test_planted_personal_data_is_written_nowhere(world):
    report = world["report"]
    assert report.catalogue.privacy["email"] == 1 and report.catalogue.privacy["phone"] == 1
    assert {"card", "name", "address"} <= set(report.catalogue.privacy)
    assert report.events.privacy["pseudonymised user id"] > 0
    assert all(p.user_id.startswith("anon-") for p in world["pages"][:2])
    assert world["pages"][0].meta.path in ("llm", "repaired")  # the model's page was made
    examples = (world["outputs"][0] / "examples.jsonl").read_text()
    assert "anon-" in examples  # the pseudonymised users are there, under their pseudonyms
    written = [world["root"] / "store", world["root"] / "pages", *world["outputs"]]
    found = scan(written, Traces(ids=set(), texts=set(PLANTED_STRINGS)))
    assert found == [], found
    # the scan itself sees what it is asked to find: the raw data files hold the planted strings
    assert {f.path for f in scan([world["root"] / "data"], Traces(texts={"jane.roe@example.org"}))} == {
        str(world["root"] / "data" / "items.csv")}


def _behaviour_record(store: Path, user: str) -> tuple[str, np.ndarray]:
    collection = chroma_client(store / CHROMA_DIR).get_collection(BEHAVIOUR)
    record = collection.get(ids=[user], include=["documents", "embeddings"])
    return record["documents"][0], np.asarray(record["embeddings"][0], np.float32)


def _unused_slots_zero(store: Path) -> bool:
    """The HNSW files hold nothing past their last element: chromadb writes that part from
    uninitialised memory, where an erased text was once found."""
    for header in (store / CHROMA_DIR).glob("*/header.bin"):
        _, _, capacity, count, size = _HNSW_HEADER.unpack_from(header.read_bytes())
        data = (header.parent / "data_level0.bin").read_bytes()
        if len(data) != capacity * size or any(data[count * size:]):
            return False
    return True


@sqlite_only
def test_deleting_is_not_erasing(world, tmp_path, copy_store):
    """The reason for the rebuild: after chromadb's delete and SQLite's DELETE the user's behaviour
    text and vector are still in the files, and the scan finds them."""
    store = Path(world["settings"].store_dir)
    user = world["pages"][0].user_id
    text, vector = _behaviour_record(store, user)
    copy = tmp_path / "copy"
    copy_store(store, copy)
    collection = chroma_client(copy / CHROMA_DIR).get_collection(BEHAVIOUR)
    collection.delete(ids=[user])
    assert collection.get(ids=[user])["ids"] == []
    db = sqlite3.connect(copy / CATALOG_FILE)
    with db:
        db.execute("DELETE FROM events WHERE user_id = ?", (user,))
    db.close()
    found = {f.what for f in scan([copy], Traces(ids={user}, texts={text}, vectors=[vector]))}
    assert {"text", "vector"} <= found


def test_forget_erases_a_user_everywhere_and_the_scan_proves_it(world):
    settings, retriever = world["settings"], world["retriever"]
    store = Path(settings.store_dir)
    stored = world["pages"][0].user_id  # the e-mail user's pseudonym
    examples = world["outputs"][0] / "examples.jsonl"
    trained = next(u for line in examples.read_text().splitlines()  # a user in the fine-tuning examples
                   if (u := json.loads(line)["user_id"]) != stored)
    other = next(u for u in retriever.catalog.users() if u not in (stored, trained))
    others_events = retriever.catalog.event_count(other)
    # what a scan must not find afterwards, read here independently of the erasure's own list
    traces = Traces(ids={stored, trained, EMAIL_USER})
    for user in (stored, trained):
        text, vector = _behaviour_record(store, user)
        traces.texts.add(text)
        traces.vectors.append(vector)
    assert {f.what for f in scan([store, *world["outputs"]], traces)} == {"id", "text", "vector"}
    products_before = retriever.index.count("products")

    receipt = erase(replace(settings.retrieval_config(), store_dir=store), [EMAIL_USER, trained], world["outputs"])

    assert_proven(receipt.found, receipt.not_scanned)
    assert scan([store, *world["outputs"]], traces) == []
    rows = receipt.database or store  # where the store's rows live: its SQLite file's folder, or the database
    assert receipt.removed[f"{rows}: events"] > 0 and receipt.removed[f"{store}: vector collection behaviour"] == 2
    assert _unused_slots_zero(store)
    assert trained not in examples.read_text()
    # the fine-tuning store's event log and vectors were rewritten too
    assert any("store-train" in place for place, n in receipt.removed.items() if n)
    # this process held the erased data, and chromadb rewrites the files when it first loads them here:
    # the reopen takes that load before zeroing again, so pages served afterwards leave them clean
    retriever.reopen(settings.retrieval_config())
    assert retriever.catalog.event_count(stored) == 0 and retriever.catalog.event_count(other) == others_events
    assert retriever.index.count("products") == products_before
    assert world["served"].compose(EMAIL_USER, use_llm=False).meta.cold_start
    assert not world["served"].compose(other, use_llm=False).meta.cold_start
    assert _unused_slots_zero(store)
    # the audit log: a keyed hash per user, never the id or the pseudonym
    audit = (store / AUDIT_FILE).read_text()
    line = json.loads(audit.splitlines()[-1])
    assert line["action"] == "forget" and len(line["subjects"]) == 2
    assert line["scan"] == ("incomplete" if STORE_URL else "clean")  # PostgreSQL's own files: not scanned
    assert EMAIL_USER not in audit and stored not in audit and trained not in audit


def test_retention_erases_old_events_and_the_texts_made_from_them(tmp_path):
    data = sample_slice(tmp_path / "data", products=60)
    _, *rows = (data / "interactions.csv").read_text().splitlines()
    users = sorted({r.split(",")[0] for r in rows})
    old, mixed = users[0], next(u for u in users[1:] if sum(r.startswith(u + ",") for r in rows) >= 2)
    lines = ["user_id,item_id,timestamp,event_type"]
    for r in rows:
        user, item = r.split(",")[:2]
        first_of_mixed = user == mixed and not any(line.startswith(mixed + ",") for line in lines)
        stamp = 1_000_000 if user == old or first_of_mixed else 2_000_000
        lines.append(f"{user},{item},{stamp},view")
    (data / "events.csv").write_text("\n".join(lines) + "\n")
    settings = Settings(store_dir=tmp_path / "store")
    ingest(settings.retrieval_config(), data / "items.csv", data / "events.csv", progress=False)
    store = tmp_path / "store"
    old_text, old_vector = _behaviour_record(store, old)
    mixed_text, mixed_vector = _behaviour_record(store, mixed)
    catalog = catalog_at(store)
    mixed_left = catalog.event_count(mixed) - 1
    catalog.close()

    receipt = erase_expired(replace(settings.retrieval_config(), store_dir=store), 1_500_000)

    assert_proven(receipt.found, receipt.not_scanned)
    assert _unused_slots_zero(store)  # before this process opens the store again (see the reopen above)
    assert scan([store], Traces(ids={old}, texts={old_text, mixed_text}, vectors=[old_vector, mixed_vector])) == []
    catalog = catalog_at(store)
    assert catalog.event_count(old) == 0 and catalog.event_count(mixed) == mixed_left
    catalog.close()
    text, _ = _behaviour_record(store, mixed)
    assert text != mixed_text and f"Interacted with {mixed_left} products." in text
    # the rewritten record is stored as ingest stores it: ingesting the events that are left embeds nobody again
    (data / "kept.csv").write_text("\n".join(line for line in lines if not line.endswith(",1000000,view")) + "\n")
    report = ingest(settings.retrieval_config(), data / "items.csv", data / "kept.csv", progress=False)
    assert report.new_events == 0 and report.embedded_users == 0


def test_json_reports_lose_the_users_entries_and_keep_everything_else():
    from retrieval.erasure import _prune_json

    report = {"n": 3, "missing": None, "u1": {"ndcg": 0.5}, "rows": [{"user": "u1", "v": 1}, {"user": "u2", "v": None}],
              "users": ["u1", "u2"], "nested": {"per_user": {"u1": 1.0, "u2": 0.0}}}
    assert _prune_json(report, {"u1"}) == {"n": 3, "missing": None, "rows": [{"user": "u2", "v": None}],
                                           "users": ["u2"], "nested": {"per_user": {"u2": 0.0}}}

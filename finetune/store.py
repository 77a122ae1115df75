"""The logs, and stores that hold one time-ordered part of them.

Training examples and the before/after evaluation must see the store as production would have seen
it at that point in time, so each gets its own store, built by the production ingest from the part
of the events it may see (reused while the catalogue and that part are unchanged).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from agent.adapters import file_digest
from agent.errors import UserError
from agent.settings import Settings
from retrieval import EventColumns, Retriever, ingest
from retrieval.loading import load_events, load_products
from retrieval.records import Event
from retrieval.split import leave_last_out

STORE_MARK = "store.json"


@dataclass(frozen=True)
class Logs:
    catalogue: Path
    events: list[Event]
    digest: str  # of the catalogue and events files: the training data's identity


def read_logs(data: Path, settings: Settings, quarantine: Path) -> Logs:
    """``items.csv`` and ``interactions.csv`` of ``data``; bad rows go to ``quarantine``."""
    catalogue, events_file = Path(data) / "items.csv", Path(data) / "interactions.csv"
    if not catalogue.exists() or not events_file.exists():
        raise UserError(f"data: expected items.csv and interactions.csv in {data}")
    products, report = load_products(catalogue, settings.catalogue_columns, quarantine)
    events, events_report = load_events(events_file, settings.event_columns, {p.item_id for p in products}, quarantine,
                                        settings.retrieval_config().privacy())
    for line in (report, events_report):
        print(line)
    return Logs(catalogue, events, file_digest(catalogue, events_file))


def training_part(events: list[Event]) -> tuple[list[Event], dict[str, list[str]]]:
    """What training may use: per user, the validation and test baskets are removed, and the last
    basket left is the training target; the store holds the baskets before it. Nothing from the
    validation or test part enters either."""
    valid = leave_last_out(events, "valid")  # valid.train: history without the validation and test baskets
    inner = leave_last_out(valid.train, "test")
    return inner.train, inner.targets


def validation_part(events: list[Event]) -> tuple[list[Event], dict[str, list[str]]]:
    """The before/after evaluation: the store holds history only; the targets are the validation baskets."""
    valid = leave_last_out(events, "valid")
    return valid.train, valid.targets


def build_store(folder: Path, settings: Settings, catalogue: Path, events: list[Event],
                progress: bool = True) -> Retriever:
    """A store of ``events`` at ``folder`` through the production ingest, with the production
    retrieval settings; reused when it already holds exactly these events and catalogue."""
    folder = Path(folder)
    digest = hashlib.sha256(json.dumps([file_digest(catalogue), [asdict(e) for e in events]],
                                       sort_keys=True).encode()).hexdigest()[:16]
    # a store of its own, always local: never the serving database a store_url names
    config = replace(settings.retrieval_config(), store_dir=folder, store_url=None)
    mark = folder / STORE_MARK
    if not (mark.exists() and json.loads(mark.read_text()).get("digest") == digest):
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        events_file = folder / "events.jsonl"
        with open(events_file, "w", encoding="utf-8") as f:
            for e in events:
                f.write(json.dumps(asdict(e)) + "\n")
        report = ingest(config, catalogue, events_file, settings.catalogue_columns, EventColumns(), progress=progress)
        mark.write_text(json.dumps({"digest": digest, "events": report.events.loaded}) + "\n")
    return Retriever.open(config)

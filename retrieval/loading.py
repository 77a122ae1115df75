"""Read catalogue and event files (CSV, JSONL, Parquet), clean them, and quarantine bad rows.

A malformed row is never dropped silently and never stops the load: it is written, with its file,
line and reason, to a quarantine JSONL file, and counted in the ``LoadReport``.

Personal data never gets further than this module (``retrieval.privacy``): free text is redacted and
seller text cleared of prompt markup before a product exists, user ids that are e-mail addresses or
phone numbers become keyed pseudonyms, and a quarantined row is kept redacted in the same way.
"""

from __future__ import annotations

import csv
import html
import json
import math
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from retrieval.columns import CatalogueColumns, EventColumns, UserColumns
from retrieval.ids import check_id
from retrieval.privacy import Privacy, neutralise, personal_id_kind, redact
from retrieval.records import Event, Product


class DataFileError(Exception):
    """A data file that cannot be read at all (missing, unknown format, no required column)."""


@dataclass
class LoadReport:
    path: Path
    read: int = 0
    loaded: int = 0
    quarantined: int = 0
    quarantine_path: Path | None = None
    reasons: dict[str, int] = field(default_factory=dict)
    # personal data redacted by kind, user ids pseudonymised, seller texts cleared of prompt markup
    privacy: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        line = f"{self.path.name}: read {self.read}, loaded {self.loaded}, quarantined {self.quarantined}"
        if self.quarantined:
            line += f" -> {self.quarantine_path}"
        if self.privacy:
            line += "; " + ", ".join(f"{kind} {n}" for kind, n in sorted(self.privacy.items()))
        return line


class Quarantine:
    """Writes rejected rows to ``<dir>/<file name>.quarantine.jsonl`` with where and why. The
    caller gives each run its own ``dir`` (``ingest``: ``quarantine/<UTC time>-<pid>-<run>/``), so a
    run never overwrites what an earlier one kept aside."""

    def __init__(self, directory: Path, source: Path, report: LoadReport, privacy: Privacy | None = None,
                 user_column: str | None = None):
        self.path = directory / f"{source.name}.quarantine.jsonl"
        self.source = source
        self.report = report
        self.privacy, self.user_column = privacy, user_column
        self._fh = None

    def _kept(self, row: dict[str, Any]) -> dict[str, Any]:
        """The row as it may be kept: the user id as stored (so erasure finds it), the rest redacted."""
        kept = {}
        for key, value in row.items():
            if isinstance(value, dict | list):
                value = json.dumps(value, ensure_ascii=False, default=str)
            if isinstance(value, str):
                if key == self.user_column and self.privacy and personal_id_kind(value):
                    value = self.privacy.user_id(value)
                else:
                    value = redact(value)
            kept[str(key)] = value
        return kept

    def reject(self, line: int, reason: str, row: dict[str, Any]) -> None:
        if self._fh is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = self.path.open("w", encoding="utf-8")
            self.report.quarantine_path = self.path
        record = {"file": str(self.source), "line": line, "reason": redact(reason), "row": self._kept(row)}
        self._fh.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
        self.report.quarantined += 1
        kind = reason.split(":", 1)[0]
        self.report.reasons[kind] = self.report.reasons.get(kind, 0) + 1

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()


def read_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """Yield (line number, raw row); the line number is the one a person sees in an editor
    (CSV: the header is line 1), or the row index + 1 for Parquet."""
    if not path.exists():
        raise DataFileError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        with path.open(newline="", encoding="utf-8", errors="replace") as fh:
            reader = csv.DictReader(fh)
            for row in reader:
                yield reader.line_num, row
    elif suffix in (".jsonl", ".ndjson"):
        with path.open(encoding="utf-8", errors="replace") as fh:
            for number, text in enumerate(fh, start=1):
                if not text.strip():
                    continue
                try:
                    row = json.loads(text)
                except json.JSONDecodeError as exc:
                    row = {"_raw": text.rstrip("\n"), "_error": f"invalid JSON: {exc.msg}"}
                if not isinstance(row, dict):
                    row = {"_raw": text.rstrip("\n"), "_error": "a JSON line must be an object"}
                yield number, row
    elif suffix == ".parquet":
        import pyarrow.parquet as pq

        for number, row in enumerate(pq.read_table(path).to_pylist(), start=1):
            yield number, row
    else:
        raise DataFileError(f"{path}: unknown format {suffix!r}; expected .csv, .jsonl or .parquet")


_SPACES = re.compile(r"\s+")
_TAGS = re.compile(r"<[^>]+>")
_MAX_WHOLE = 2**53  # whole numbers stored exactly (SQLite and JSON)
MAX_FUTURE_S = 86_400  # an event may be stamped this far ahead of our clock (the sender's clock runs fast)
MAX_EVENT_TYPE_CHARS = 32


def clean_text(value: Any) -> str | None:
    """Unescape HTML entities (twice: scraped text is often double-escaped), strip tags, fold spaces."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = html.unescape(html.unescape(str(value)))
    text = _SPACES.sub(" ", _TAGS.sub(" ", text)).strip()
    return text or None


def _raw_id(value: Any) -> Any:
    """Ids are checked as written (never cleaned); a whole number read from Parquet/JSON counts as
    its digits, a missing value as empty."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


def parse_number(value: Any, name: str) -> float | None:
    text = clean_text(value)
    if text is None:
        return None
    try:
        number = float(text.replace("$", "").replace(",", ""))
    except ValueError:
        raise ValueError(f"{name} is not a number: {text!r}") from None
    if not math.isfinite(number) or number < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {text!r}")
    return number


def parse_timestamp(value: Any) -> float | None:
    text = clean_text(value)
    if text is None:
        return None
    try:
        number = float(text)
    except ValueError:
        try:
            stamp = datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
        except (ValueError, OverflowError, OSError):
            raise ValueError(f"timestamp is neither unix seconds nor ISO 8601: {text!r}") from None
        return _sane_time(stamp)
    if not math.isfinite(number):
        raise ValueError(f"timestamp must be a finite number of seconds, got {text!r}")
    return _sane_time(number)


def _sane_time(seconds: float) -> float:
    """Refuses times before 1970 or more than a day ahead (clock skew): such an event would sit
    first or last in every history, and a far-future one would never age out of retention."""
    latest = time.time() + MAX_FUTURE_S
    if not 0 <= seconds <= latest:
        raise ValueError(f"timestamp must lie between 1970 and one day from now, got {seconds:.0f}")
    return seconds


def _require_columns(path: Path, row: dict[str, Any], needed: dict[str, str]) -> None:
    missing = [f"{column!r} ({name})" for name, column in needed.items() if column not in row]
    if missing and "_error" not in row:
        raise DataFileError(f"{path}: missing required column(s) {', '.join(missing)}; found {sorted(row)}")


def load_products(
    path: Path, columns: CatalogueColumns, quarantine_dir: Path
) -> tuple[list[Product], LoadReport]:
    report = LoadReport(Path(path))
    quarantine = Quarantine(quarantine_dir, Path(path), report)
    products: list[Product] = []
    first_line: dict[str, int] = {}
    try:
        for line, row in read_rows(Path(path)):
            report.read += 1
            if report.read == 1:
                _require_columns(path, row, {"item_id": columns.item_id, "title": columns.title})
            try:
                product = parse_product(row, columns, report.privacy)
            except ValueError as exc:
                quarantine.reject(line, str(exc), row)
                continue
            if product.item_id in first_line:
                quarantine.reject(line, f"duplicate: item_id {product.item_id!r} first at line "
                                  f"{first_line[product.item_id]}", row)
                continue
            first_line[product.item_id] = line
            products.append(product)
    finally:
        quarantine.close()
    report.loaded = len(products)
    return products, report


def _private_text(value: Any, counts: Counter, seller: bool = False) -> str | None:
    """Cleaned text with personal data redacted; seller text (titles, descriptions) also cleared
    of prompt markup and instructions to the model."""
    text = clean_text(value)
    if text is not None:
        text = redact(text, counts)
        if seller:
            text = neutralise(text, counts)
    return text or None


def parse_product(row: dict[str, Any], c: CatalogueColumns, counts: Counter | None = None) -> Product:
    """One catalogue row as a product, or ``ValueError`` saying what is wrong (ingest and the service).
    ``counts`` tallies the personal data redacted and the texts cleared of prompt markup."""
    counts = Counter() if counts is None else counts
    if "_error" in row:
        raise ValueError(f"malformed: {row['_error']}")
    item_id = check_id(_raw_id(row.get(c.item_id)), "item_id")
    if kind := personal_id_kind(item_id):
        raise ValueError(f"personal data: item_id is an {kind} address" if kind == "email"
                         else f"personal data: item_id is a {kind} number")
    title = _private_text(row.get(c.title), counts, True) or _private_text(row.get(c.title_fallback), counts, True)
    if title is None:
        raise ValueError("missing: title is empty (or held nothing but instructions to the model)")
    category = _private_text(row.get(c.category), counts)
    path = tuple(level.strip() for level in category.split(">") if level.strip()) if category else ()
    stock = parse_number(row.get(c.stock), "stock")
    if stock is not None and stock > _MAX_WHOLE:
        raise ValueError(f"stock must be at most {_MAX_WHOLE}, got {stock}")
    return Product(
        item_id=item_id,
        title=title,
        category_path=path,
        brand=_private_text(row.get(c.brand), counts, True),
        price=parse_number(row.get(c.price), "price"),
        description=_private_text(row.get(c.description), counts, True),
        stock=None if stock is None else int(stock),
    )


def load_events(
    path: Path, columns: EventColumns, known_items: set[str], quarantine_dir: Path, privacy: Privacy
) -> tuple[list[Event], LoadReport]:
    report = LoadReport(Path(path))
    quarantine = Quarantine(quarantine_dir, Path(path), report, privacy, columns.user_id)
    events: list[Event] = []
    try:
        for line, row in read_rows(Path(path)):
            report.read += 1
            if report.read == 1:
                _require_columns(path, row, {"user_id": columns.user_id, "item_id": columns.item_id})
            try:
                event = parse_event(row, columns, privacy, report.privacy)
            except ValueError as exc:
                quarantine.reject(line, str(exc), row)
                continue
            if event.item_id not in known_items:
                quarantine.reject(line, f"unknown item: {event.item_id!r} is not in the catalogue", row)
                continue
            events.append(event)
    finally:
        quarantine.close()
    report.loaded = len(events)
    return events, report


def _stored_user(row: dict[str, Any], column: str, privacy: Privacy, counts: Counter) -> str:
    """A row's user id as stored (an e-mail address or phone number as its keyed pseudonym), or
    ``ValueError`` for a malformed row or an id outside the policy."""
    if "_error" in row:
        raise ValueError(f"malformed: {row['_error']}")
    raw = _raw_id(row.get(column))
    stored = check_id(privacy.user_id(raw) if isinstance(raw, str) else raw, "user_id")
    if stored != raw:
        counts["pseudonymised user id"] += 1
    return stored


def parse_event(row: dict[str, Any], c: EventColumns, privacy: Privacy, counts: Counter | None = None) -> Event:
    """One event row, or ``ValueError`` saying what is wrong (ingest and the service). A user id
    that is an e-mail address or phone number is stored as its keyed pseudonym."""
    counts = Counter() if counts is None else counts
    stored = _stored_user(row, c.user_id, privacy, counts)
    item_id = check_id(_raw_id(row.get(c.item_id)), "item_id")
    timestamp = parse_timestamp(row.get(c.timestamp))
    seq = parse_number(row.get(c.seq_pos), "seq_pos")
    if timestamp is None and seq is None:
        raise ValueError(f"missing: neither {c.timestamp!r} nor {c.seq_pos!r} is set")
    if seq is not None and seq != int(seq):
        raise ValueError(f"seq_pos must be a whole number, got {seq}")
    if seq is not None and seq > _MAX_WHOLE:
        raise ValueError(f"seq_pos must be at most {_MAX_WHOLE}, got {seq}")
    return Event(
        user_id=stored,
        item_id=item_id,
        timestamp=timestamp,
        seq_pos=None if seq is None else int(seq),
        event_type=_event_type(row.get(c.event_type), counts),
    )


def _event_type(value: Any, counts: Counter) -> str:
    kind = (_private_text(value, counts) or "view").lower()
    if len(kind) > MAX_EVENT_TYPE_CHARS:  # a word ("view", "purchase"), not a place to store text
        raise ValueError(f"event_type must be at most {MAX_EVENT_TYPE_CHARS} characters, got {len(kind)}")
    return kind


MAX_ATTRIBUTE_CHARS = 64  # an age band, a region code, a membership tier: a value, not a text


def load_users(path: Path, columns: UserColumns, quarantine_dir: Path, privacy: Privacy
               ) -> tuple[dict[str, dict[str, str]], LoadReport]:
    """``{stored user id: {attribute: value}}`` from a users file; empty values are left out. A row
    without a usable id, with a value too long to be an attribute, or repeating an earlier user is
    quarantined with its line."""
    report = LoadReport(Path(path))
    quarantine = Quarantine(quarantine_dir, Path(path), report, privacy, columns.user_id)
    users: dict[str, dict[str, str]] = {}
    first_line: dict[str, int] = {}
    try:
        for line, row in read_rows(Path(path)):
            report.read += 1
            if report.read == 1:
                _require_columns(path, row, {"user_id": columns.user_id,
                                             **{name: name for name in columns.attributes or []}})
            try:
                user, attributes = parse_user(row, columns, privacy, report.privacy)
            except ValueError as exc:
                quarantine.reject(line, str(exc), row)
                continue
            if user in first_line:
                quarantine.reject(line, f"duplicate: user {user!r} first at line {first_line[user]}", row)
                continue
            first_line[user] = line
            users[user] = attributes
    finally:
        quarantine.close()
    report.loaded = len(users)
    return users, report


def parse_user(row: dict[str, Any], c: UserColumns, privacy: Privacy, counts: Counter | None = None
               ) -> tuple[str, dict[str, str]]:
    """One users-file row: the stored id (a pseudonym for an e-mail or phone number, as for events)
    and its attributes, or ``ValueError`` saying what is wrong."""
    counts = Counter() if counts is None else counts
    stored = _stored_user(row, c.user_id, privacy, counts)
    names = c.attributes if c.attributes is not None else [k for k in row if k != c.user_id]
    attributes = {}
    for name in names:
        value = _private_text(_raw_id(row.get(name)), counts)
        if value is None:
            continue
        if len(value) > MAX_ATTRIBUTE_CHARS:
            raise ValueError(f"{name} must be at most {MAX_ATTRIBUTE_CHARS} characters, got {len(value)}")
        attributes[str(name)] = value
    return stored, attributes

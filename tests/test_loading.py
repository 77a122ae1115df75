import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from retrieval.columns import CatalogueColumns, EventColumns
from retrieval.loading import DataFileError, clean_text, load_events, load_products
from retrieval.privacy import Privacy

pytestmark = pytest.mark.one_engine


def _privacy(tmp_path):
    return Privacy("test key", tmp_path / "key")


CATALOGUE = """item_id,title,category_path,brand,price_usd
A1,Rose &amp;amp; Oud   Serum,Beauty > Skin Care > Face,Acme,12.50
A2,,Beauty > Makeup,Acme,3
A3,Lip Balm,Beauty > Makeup > Lips,,not-a-price
A4,Night Cream,Beauty > Skin Care,Bee,-4
A1,Duplicate Serum,Beauty > Skin Care,Acme,1
A5,<b>Bold</b> Shampoo,Beauty > Hair Care,,
"""

EVENTS = """user_id,item_id,seq_pos,event_type
u1,A1,0,review
u1,A5,1,
u2,A9,0,review
,A1,0,review
u3,A1,,review
u3,A5,1.5,review
u3,A5,2,Purchase
"""


def test_bad_catalogue_rows_are_quarantined_with_line_and_reason(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text(CATALOGUE)
    products, report = load_products(path, CatalogueColumns(), tmp_path / "q")
    assert [p.item_id for p in products] == ["A1", "A5"]
    assert (report.read, report.loaded, report.quarantined) == (6, 2, 4)
    rows = [json.loads(line) for line in report.quarantine_path.read_text().splitlines()]
    assert [(r["line"], r["reason"].split(":")[0]) for r in rows] == [
        (3, "missing"), (4, "price is not a number"), (5, "price must be a finite number >= 0, got '-4'"),
        (6, "duplicate"),
    ]
    assert "first at line 2" in rows[3]["reason"]
    assert rows[0]["row"]["item_id"] == "A2"  # the whole row is kept for the person who fixes it
    assert "quarantined 4" in str(report)


def test_cleaning_unescapes_strips_tags_and_folds_spaces(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text(CATALOGUE)
    products, _ = load_products(path, CatalogueColumns(), tmp_path / "q")
    serum, shampoo = products
    assert serum.title == "Rose & Oud Serum"
    assert serum.category_path == ("Beauty", "Skin Care", "Face") and serum.department == "Skin Care"
    assert serum.price == 12.5 and shampoo.price is None and shampoo.brand is None
    assert shampoo.title == "Bold Shampoo"
    assert clean_text("  ") is None and clean_text(float("nan")) is None


def test_title_falls_back_to_second_title_column(tmp_path):
    path = tmp_path / "items.csv"
    path.write_text("item_id,title,title_dhr\nB1,,Backup Title\nB2,,\n")
    products, report = load_products(path, CatalogueColumns(), tmp_path / "q")
    assert [p.title for p in products] == ["Backup Title"] and report.quarantined == 1


def test_bad_event_rows_are_quarantined(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text(EVENTS)
    events, report = load_events(path, EventColumns(), {"A1", "A5"}, tmp_path / "q", _privacy(tmp_path))
    assert [(e.user_id, e.item_id, e.seq_pos, e.event_type) for e in events] == [
        ("u1", "A1", 0, "review"), ("u1", "A5", 1, "view"), ("u3", "A5", 2, "purchase"),
    ]
    assert (report.read, report.loaded, report.quarantined) == (7, 3, 4)
    reasons = [json.loads(line)["reason"] for line in report.quarantine_path.read_text().splitlines()]
    assert reasons[0].startswith("unknown item: 'A9'")
    assert reasons[1] == "missing: user_id is empty"
    assert reasons[2].startswith("missing: neither 'timestamp' nor 'seq_pos'")
    assert reasons[3] == "seq_pos must be a whole number, got 1.5"


def test_jsonl_with_a_broken_line_and_iso_timestamps(tmp_path):
    path = tmp_path / "events.jsonl"
    path.write_text('{"user_id": "u1", "item_id": "A1", "timestamp": "2024-01-02T03:04:05Z"}\n'
                    '{"user_id": "u1", "item_id": \n'
                    '\n'
                    '["not", "an", "object"]\n'
                    '{"user_id": "u1", "item_id": "A1", "timestamp": 1700000000}\n')
    events, report = load_events(path, EventColumns(), {"A1"}, tmp_path / "q", _privacy(tmp_path))
    assert [e.timestamp for e in events] == [1704164645.0, 1700000000.0]
    rows = [json.loads(line) for line in report.quarantine_path.read_text().splitlines()]
    assert [(r["line"], r["reason"][:24]) for r in rows] == [
        (2, "malformed: invalid JSON:"), (4, "malformed: a JSON line m"),
    ]


def test_parquet_and_a_custom_column_mapping(tmp_path):
    path = tmp_path / "catalogue.parquet"
    pq.write_table(pa.table({"sku": ["S1", "S2"], "name": ["Soap", None], "cost": [2.0, 1.0],
                             "units": [0, 5]}), path)
    columns = CatalogueColumns(item_id="sku", title="name", price="cost", stock="units")
    products, report = load_products(path, columns, tmp_path / "q")
    assert [(p.item_id, p.price, p.stock, p.in_stock) for p in products] == [("S1", 2.0, 0, False)]
    assert report.quarantined == 1


def test_unreadable_files_are_refused_with_the_reason(tmp_path):
    with pytest.raises(DataFileError, match="no such file"):
        load_products(tmp_path / "missing.csv", CatalogueColumns(), tmp_path)
    (tmp_path / "items.xlsx").write_text("x")
    with pytest.raises(DataFileError, match="unknown format"):
        load_products(tmp_path / "items.xlsx", CatalogueColumns(), tmp_path)
    (tmp_path / "items.csv").write_text("sku,name\n1,a\n")
    with pytest.raises(DataFileError, match="missing required column"):
        load_products(tmp_path / "items.csv", CatalogueColumns(), tmp_path)

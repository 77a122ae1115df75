"""Retrieval: data loading and cleaning, the catalogue/event store, the vector store, user
histories and candidate sources. Imports nothing from the rest of the project."""

from pathlib import Path

from retrieval.columns import CatalogueColumns, EventColumns
from retrieval.history import History
from retrieval.ingest import IngestReport, ingest, remove_products
from retrieval.loading import DataFileError, LoadReport
from retrieval.records import Candidate, Event, Product, Provenance
from retrieval.retriever import RetrievalConfig, Retriever
from retrieval.vectors import StoreInUse

SAMPLE_DIR = Path(__file__).resolve().parent / "sample"  # shipped: 300 real Amazon Beauty users, their products

__all__ = [
    "SAMPLE_DIR", "Candidate", "CatalogueColumns", "DataFileError", "Event", "EventColumns", "History",
    "IngestReport", "LoadReport", "Product", "Provenance", "RetrievalConfig", "Retriever", "StoreInUse", "ingest",
    "remove_products",
]

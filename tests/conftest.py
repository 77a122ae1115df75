"""Shared fixtures and helpers: the shipped sample ingested once into a session store in a temp
folder, one composer on the real packaged model, a scripted backend and the page checks every test
uses (imported as ``from conftest import ...``). No test writes outside pytest's temp folders."""

from __future__ import annotations

import itertools
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest

from agent.backends import Generation, LLMBackend
from agent.composer import Composer
from agent.rules import ModuleBody, PageBody, RuleContext, validate
from agent.schema import Homepage
from agent.settings import SAMPLE_DIR, Settings
from retrieval import Retriever, ingest
from retrieval.catalog import Catalog
from retrieval.engines import STORE_PLACEHOLDER, PostgresEngine, store_database
from retrieval.retriever import CATALOG_FILE


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("session")


@pytest.fixture(scope="session")
def copy_store():
    """Copy a store folder in a child process (``cp -a``), without its chromadb owner lock. Reading a
    SQLite file with open/close in this process would drop the POSIX locks its open connections
    hold, and the next process to close a connection on it would delete the write-ahead log under
    them ("disk I/O error"; see ``retrieval.erasure.scan_apart``). On PostgreSQL the copy gets a
    database of its own holding the source's rows."""

    def copy(source: Path, target: Path) -> Path:
        subprocess.run(["cp", "-a", str(source), str(target)], check=True)
        for lock in Path(target).rglob(".owner.lock"):
            lock.unlink()
        if STORE_URL:
            copy_database(Path(source), Path(target))
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


# -- helpers ---------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, seconds: float = 120.0, status: int = 200) -> None:
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        try:
            if httpx.get(url, timeout=5).status_code == status:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer {status} within {seconds} s")


class Chroma:
    def __init__(self, path, port: int):
        self.path, self.port, self.proc = path, port, None

    def start(self) -> None:
        self.proc = subprocess.Popen([os.path.join(os.path.dirname(sys.executable), "chroma"), "run", "--path",
                                      str(self.path), "--port", str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(f"http://127.0.0.1:{self.port}/api/v2/heartbeat")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(30)


def assert_valid_page(page: Homepage, composer: Composer) -> None:
    type(page).model_validate_json(page.model_dump_json())  # round-trips through the public schema
    ids = page.item_ids()
    assert len(ids) == len(set(ids)), "an item appears twice"
    assert all(i in composer.retriever.products for i in ids)
    specs = {m.type: m for m in composer.skeleton.modules}
    types = [m.type for m in page.modules]
    assert types == [t for t in specs if t in types], "modules out of the skeleton's order"
    body = PageBody([ModuleBody(specs[m.type], m.title, [i.item_id for i in m.items],
                                {i.item_id for i in m.items if i.sponsored}) for m in page.modules])
    assert validate(body, RuleContext(composer.rules, composer.retriever.products, composer.skeleton)) == []
    assert all(item.reason for m in page.modules for item in m.items)


class ScriptedBackend(LLMBackend):
    """Plays back fixed drafts, to drive the repair path exactly; the real model is tested below."""

    name = "scripted"
    model_name = "scripted"

    def __init__(self, *texts: str):
        self.texts = list(texts)
        self.seen: list[list[dict]] = []

    def generate(self, messages, schema, max_new_tokens, deadline=None):
        self.seen.append(messages)
        text = self.texts.pop(0)
        return Generation(text, len(text), len(text), 0.0)


def scripted(composer: Composer, *texts: str, skeleton=None, budget_s=None) -> Composer:
    return Composer(composer.retriever, ScriptedBackend(*texts), composer.prompts, composer.rules,
                    skeleton or composer.skeleton, budget_s=budget_s)


GOOD = {"modules": [{"title": "Your edit", "items": [1, 2, 3, 4]},
                    {"title": "Goes with it", "items": [1, 2]},
                    {"title": "Hot right now", "items": [1, 2, 3]}]}
BAD = {"modules": [{"title": "Free stuff", "items": [1, 1, 1, 1]},
                   {"title": "Goes with it", "items": [1]},
                   {"title": "Hot right now", "items": [1, 2, 3]}]}


def sample_slice(folder, products: int = 400):
    """The sample's first products and their events, as data files: a short MiniLM embedding."""
    folder.mkdir()
    head, *rows = (SAMPLE_DIR / "items.csv").read_text().splitlines(keepends=True)
    (folder / "items.csv").write_text(head + "".join(rows[:products]))
    known = {r.split(",")[0] for r in rows[:products]}
    head, *rows = (SAMPLE_DIR / "interactions.csv").read_text().splitlines(keepends=True)
    (folder / "interactions.csv").write_text(head + "".join(r for r in rows if r.split(",")[1] in known))
    return folder


# -- PostgreSQL: the second engine a store's tables can live in -------------------------------------
# HOMEPAGE_TEST_POSTGRES names a server (`bash scripts/start-postgres.sh` prints one); each test that
# asks gets a fresh database on it. Without it those tests skip, unless HOMEPAGE_REQUIRE_POSTGRES=1
# (CI sets both): then a missing server fails them.
POSTGRES = os.environ.get("HOMEPAGE_TEST_POSTGRES")
_DATABASES = itertools.count()
# HOMEPAGE_TEST_STORE_ENGINE=postgresql runs the suite (less the one_engine tests) with every store's
# tables on that server: each store folder gets its own database (store_url ``…/{store}``), in this
# process and in every process a test starts (they inherit HOMEPAGE_STORE_URL).
STORE_ENGINE = os.environ.get("HOMEPAGE_TEST_STORE_ENGINE", "sqlite")
STORE_URL: str | None = None
if STORE_ENGINE == "postgresql":
    if not POSTGRES:
        raise pytest.UsageError("HOMEPAGE_TEST_STORE_ENGINE=postgresql needs HOMEPAGE_TEST_POSTGRES")
    STORE_URL = urlunsplit(urlsplit(POSTGRES)._replace(path="/" + STORE_PLACEHOLDER))
    os.environ["HOMEPAGE_STORE_URL"] = STORE_URL
elif STORE_ENGINE != "sqlite":
    raise pytest.UsageError(f"HOMEPAGE_TEST_STORE_ENGINE={STORE_ENGINE!r}: sqlite or postgresql")
sqlite_only = pytest.mark.skipif(STORE_URL is not None, reason="about the SQLite file itself")


def pytest_collection_modifyitems(config, items):
    """The PostgreSQL pass leaves out the tests marked ``one_engine``: what they check does not
    depend on the engine that holds a store's tables, and the SQLite pass has run them."""
    if STORE_URL is None:
        return
    left = [item for item in items if item.get_closest_marker("one_engine")]
    if left:
        config.hook.pytest_deselected(items=left)
        items[:] = [item for item in items if not item.get_closest_marker("one_engine")]


@pytest.fixture(scope="session", autouse=True)
def _store_databases():
    """On PostgreSQL, the databases made while this run lasted are dropped when it ends (the test
    server is one checkout's own: run one PostgreSQL-mode session on it at a time)."""
    if not STORE_URL:
        yield
        return
    import psycopg

    def made() -> set[str]:
        with psycopg.connect(POSTGRES, autocommit=True) as db:
            return {n for (n,) in db.execute("SELECT datname FROM pg_database WHERE datname LIKE 'homepage\\_%'")}

    before = made()
    yield
    with psycopg.connect(POSTGRES, autocommit=True) as db:
        for name in sorted(made() - before):
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def assert_proven(found: list, not_scanned: list[str]) -> None:
    """An erasure's receipt (``Receipt``'s fields, or the API's answer): nothing found, and every place
    scanned but the one a PostgreSQL store cannot prove from here (the server's log and backups)."""
    assert found == [], found
    assert [line.split(" ")[:2] for line in not_scanned] == ([["PostgreSQL", "database"]] if STORE_URL else []), (
        not_scanned)


def catalog_at(folder: Path) -> Catalog:
    """The catalogue of the store in ``folder``, on the engine this run tests."""
    return Catalog(Path(folder) / CATALOG_FILE, STORE_URL)


_TABLES = re.findall(r"CREATE TABLE IF NOT EXISTS (\w+)", PostgresEngine.SCHEMA)


def _database_url(folder: Path) -> str:
    return STORE_URL.replace(STORE_PLACEHOLDER, store_database(folder))


def copy_database(source: Path, target: Path) -> None:
    """The source store's rows into the target folder's own database, row numbers included."""
    import psycopg

    catalog_at(target).close()  # the copy's database and tables
    with (psycopg.connect(_database_url(source), autocommit=True) as reader,
          psycopg.connect(_database_url(target), autocommit=True) as writer):
        for table in _TABLES:
            writer.execute(f"DELETE FROM {table}")
            with (reader.cursor().copy(f"COPY {table} TO STDOUT (FORMAT BINARY)") as rows,
                  writer.cursor().copy(f"COPY {table} FROM STDIN (FORMAT BINARY)") as into):
                for block in rows:
                    into.write(block)
        writer.execute("SELECT setval(pg_get_serial_sequence('events', 'row_id'), GREATEST(MAX(row_id), 1), "
                       "MAX(row_id) IS NOT NULL) FROM events")


@pytest.fixture
def fresh_database(request):
    """A function that makes an empty database on the test server and returns its URL."""
    if not POSTGRES:
        if os.environ.get("HOMEPAGE_REQUIRE_POSTGRES") == "1":
            pytest.fail("HOMEPAGE_REQUIRE_POSTGRES=1 but HOMEPAGE_TEST_POSTGRES names no server")
        pytest.skip("no PostgreSQL server: export HOMEPAGE_TEST_POSTGRES=$(bash scripts/start-postgres.sh)")
    import psycopg

    made = []

    def make() -> str:
        name = f"test_{os.getpid()}_{next(_DATABASES)}"
        with psycopg.connect(POSTGRES, autocommit=True) as db:
            db.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return urlunsplit(urlsplit(POSTGRES)._replace(path=f"/{name}"))

    yield make
    with psycopg.connect(POSTGRES, autocommit=True) as db:
        for name in made:  # connections a test left open are closed by the server
            db.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

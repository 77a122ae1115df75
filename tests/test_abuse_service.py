"""Abuse of the service (issue 19, the service half): each test reproduces a way in where no one
belongs, a way to take the service down, or a way to leave it half-written; each failed before its fix.
Real parts: the packaged model, a real chromadb in a temp folder."""

import json
import logging
import shutil
import subprocess
import sys
import textwrap
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from agent.api import create_app
from agent.backends import LLMBackend
from agent.cache import PageCache
from agent.errors import BackendError, ConfigError
from agent.prompting import load_template
from agent.service import composer_for
from agent.settings import Settings
from retrieval import CatalogueColumns, Event, Retriever
from retrieval.history import build_history
from retrieval.loading import parse_product
from retrieval.vectors import close_embedded


# -- a timed-out call leaves no thread behind -----------------------------------------------------
@pytest.mark.parametrize("budget_ms", [1, 300])  # out before the first step / during a step
def test_a_script_whose_page_runs_out_of_budget_exits_cleanly(settings, composer, sample_users, tmp_path, budget_ms,
                                                                copy_store):
    """Was: a fallback page, then "terminate called without an active exception", exit code 134 (the
    decode thread was still inside torch when the interpreter finalised)."""
    store = tmp_path / "store"  # embedded chromadb serves one process: the script gets its own copy
    copy_store(settings.store_dir, store)
    script = textwrap.dedent(f"""
        from agent.service import compose_homepage
        from agent.settings import Settings
        settings = Settings(store_dir={str(store)!r}, model_cache_dir={str(settings.model_cache_dir)!r},
                            budget_ms={budget_ms})
        page = compose_homepage({sample_users[0]!r}, settings)
        print(page.meta.path)
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["fallback"]


def test_a_decode_waits_for_a_busy_model_no_longer_than_its_deadline(composer):
    """Was: a call behind another decode waited for the model's lock without end, past its budget."""
    backend = composer.backend
    messages = [{"role": "user", "content": "hello"}]
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    outcome = {}

    def call():
        try:
            backend.generate(messages, schema, 16, deadline=time.monotonic() + 0.3)
        except BackendError as exc:
            outcome["error"] = str(exc)

    with backend._lock:  # another decode holds the model
        thread = threading.Thread(target=call, daemon=True)
        thread.start()
        thread.join(3.0)
        assert not thread.is_alive(), "the call still waits for the model past its deadline"
    assert "budget" in outcome["error"]


# -- the HTTP service: who may read, what a body may hold ---------------------------------------------
ADMIN, READER = "admin-token", "read-token"
AS_ADMIN, AS_READER = {"Authorization": f"Bearer {ADMIN}"}, {"Authorization": f"Bearer {READER}"}
JSON = {"Content-Type": "application/json"}


@pytest.fixture(scope="module")
def own_store(settings, ingested, tmp_path_factory, copy_store) -> Path:
    """A copy of the session's sample store (these tests write to it)."""
    store = tmp_path_factory.mktemp("abuse") / "store"
    copy_store(settings.store_dir, store)
    return store


@pytest.fixture(scope="module")
def abuse_settings(settings, own_store) -> Settings:
    return settings.model_copy(update={"store_dir": own_store, "api_token": SecretStr(ADMIN),
                                       "read_token": SecretStr(READER)})


@pytest.fixture(scope="module")
def abuse_retriever(abuse_settings) -> Retriever:
    return Retriever.open(abuse_settings.retrieval_config())


def app_client(settings: Settings, retriever: Retriever, backend=None, **overrides) -> TestClient:
    """The service over the copied store: deterministic pages unless a backend is given."""
    settings = settings.model_copy(update=overrides)
    composer = composer_for(settings, retriever, backend, budget_s=None if settings.budget_ms is None
                            else settings.budget_ms / 1000)
    return TestClient(create_app(settings, composer))


@pytest.fixture(scope="module")
def client(abuse_settings, abuse_retriever):
    with app_client(abuse_settings, abuse_retriever) as c:
        yield c


def test_reads_need_a_token_and_explain_needs_the_admin(client, abuse_retriever):
    """Was: anyone who could reach the port read any user's page, with ``explain=true``."""
    user = abuse_retriever.catalog.users()[0]
    path = f"/v1/users/{user}/homepage"
    assert client.get(path).status_code == 401
    assert client.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/metrics").status_code == 401
    assert client.get(path, headers=AS_READER).status_code == 200
    assert client.get("/metrics", headers=AS_READER).status_code == 200
    assert client.get(path, params={"explain": "true"}, headers=AS_READER).status_code == 403
    assert client.get(path, params={"explain": "true"}, headers=AS_ADMIN).json()["meta"]
    assert client.post("/v1/events", json={"events": []}, headers=AS_READER).status_code == 401  # no writes
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200


def test_with_no_read_token_reads_are_refused_unless_opened(abuse_settings, abuse_retriever):
    """Was: with no token configured, pages were served to anyone (on 0.0.0.0 too)."""
    path = f"/v1/users/{abuse_retriever.catalog.users()[0]}/homepage"
    with app_client(abuse_settings, abuse_retriever, read_token=None) as c:
        assert c.get(path).status_code == 401
        assert c.get(path, headers=AS_ADMIN).status_code == 200
    with app_client(abuse_settings, abuse_retriever, read_token=None, open_reads=True) as c:
        assert c.get(path).status_code == 200
        assert c.get(path, params={"explain": "true"}).status_code == 403


def test_no_answer_tells_the_pseudonym_of_an_e_mail(client):
    """Was: GET /v1/users/<e-mail>/homepage answered ``user_id: anon-<keyed hash>``, an oracle for the key."""
    for headers, params in ((AS_READER, {}), (AS_ADMIN, {"explain": "true"})):
        answer = client.get("/v1/users/someone@example.com/homepage", headers=headers, params=params)
        assert answer.status_code == 200
        assert answer.json()["user_id"] == "someone@example.com" and "anon-" not in answer.text


def test_a_chunked_body_over_the_limit_is_refused(client):
    """Was: only Content-Length was checked; a chunked body of any size was read whole."""
    def chunks():
        for _ in range(40):
            yield b" " * 50_000  # 2 MB in all, limit 1 MB; no Content-Length

    answer = client.post("/v1/events", content=chunks(), headers={**AS_ADMIN, **JSON})
    assert answer.status_code == 413


def test_the_caller_is_checked_before_the_body_is_read(client):
    """Was: a body was read and parsed (422 for bad JSON) before the token was checked."""
    for headers in ({}, AS_READER):
        answer = client.post("/v1/events", content=b"{not json", headers={**headers, **JSON})
        assert answer.status_code == 401
    huge = client.put("/v1/catalogue/items", content=(b"x" * 50_000 for _ in range(40)))
    assert huge.status_code == 401


def test_a_lone_surrogate_is_a_422_and_nothing_of_its_batch_is_stored(client, abuse_retriever):
    """Was: a 500 after the rows before it were stored."""
    item = next(iter(abuse_retriever.products))
    rows = [{"user_id": "surrogate-1", "item_id": item, "seq_pos": 1},
            {"user_id": "surrogate-1", "item_id": item, "seq_pos": 2, "event_type": "vi\ud800ew"}]
    body = json.dumps({"events": rows})  # json escapes the surrogate as \ud800, as a client would send it
    answer = client.post("/v1/events", content=body, headers={**AS_ADMIN, **JSON})
    assert answer.status_code == 422 and "surrogate" in answer.text
    assert abuse_retriever.catalog.event_count("surrogate-1") == 0
    body = json.dumps({"items": [{"item_id": "SURR-1", "title": "ok"}, {"item_id": "SURR-2", "title": "a \udc00"}]})
    answer = client.put("/v1/catalogue/items", content=body, headers={**AS_ADMIN, **JSON})
    assert answer.status_code == 422
    assert "SURR-1" not in abuse_retriever.catalog.products


def test_event_types_and_timestamps_out_of_bounds_are_refused(client, abuse_retriever):
    """Was: a 100,000-character event type, a time before 1970 and one in the year 287,000 were stored."""
    item = next(iter(abuse_retriever.products))
    rows = [{"user_id": "bounds-1", "item_id": item, "seq_pos": 1, "event_type": "x" * 100_000},
            {"user_id": "bounds-1", "item_id": item, "timestamp": -5e12},
            {"user_id": "bounds-1", "item_id": item, "timestamp": 9e12},
            {"user_id": "bounds-1", "item_id": item, "timestamp": "9999-12-31T00:00:00Z"},
            {"user_id": "bounds-1", "item_id": item, "timestamp": time.time(), "event_type": "purchase"}]
    answer = client.post("/v1/events", json={"events": rows}, headers=AS_ADMIN)
    assert answer.status_code == 200
    result = answer.json()
    assert result["accepted"] == 1 and [r["index"] for r in result["rejected"]] == [0, 1, 2, 3]
    assert "event_type" in result["rejected"][0]["reason"] and "1970" in result["rejected"][1]["reason"]
    assert [e.event_type for e in abuse_retriever.catalog.user_events("bounds-1")] == ["purchase"]


# -- per-user state is bounded ---------------------------------------------------------------------
def test_a_flood_of_unknown_ids_evicts_no_known_shoppers_page(abuse_settings, abuse_retriever):
    """Was: one LRU for all: 200 made-up ids evicted every known shopper's cached page, and each
    made-up id left a history behind in the retriever."""
    composer = composer_for(abuse_settings, abuse_retriever, None, cache=PageCache(50))
    known = abuse_retriever.catalog.users()[:10]
    for user in known:
        composer.compose(user)
    histories = len(abuse_retriever._histories)
    for n in range(200):
        assert composer.compose(f"flood-{n}").meta.cold_start
    assert all(composer.cached(user) is not None for user in known)
    assert len(composer.cache) <= 50 and len(abuse_retriever._histories) == histories


# -- load: the probes answer, and no request waits without end ---------------------------------------
class Hanging(LLMBackend):
    """A model that answers nothing for ``seconds`` and then fails."""

    name = model_name = "hanging"

    def __init__(self, seconds: float):
        self.seconds = seconds

    def generate(self, messages, schema, max_new_tokens, deadline=None):
        time.sleep(self.seconds)
        raise RuntimeError("no answer")


def test_an_unset_budget_cannot_hang_a_request(abuse_settings, abuse_retriever):
    """Was: with budget_ms unset, a request waited for a hanging model for as long as it hung."""
    user = abuse_retriever.catalog.users()[1]
    with app_client(abuse_settings, abuse_retriever, Hanging(20.0), budget_ms=None, page_timeout_ms=1000) as c:
        started = time.monotonic()
        answer = c.get(f"/v1/users/{user}/homepage", params={"explain": "true"}, headers=AS_ADMIN)
        took = time.monotonic() - started
    assert answer.status_code == 200 and answer.json()["meta"]["path"] == "fallback"
    assert took < 5


def test_the_probes_answer_while_300_requests_wait(abuse_settings, abuse_retriever):
    """Was: /healthz and /readyz ran on the worker threads that waiting page requests held."""
    known = abuse_retriever.catalog.users()
    users = [known[n % len(known)] for n in range(300)]
    # a queue that holds them all: every worker thread of the server waits for the model
    hanging = app_client(abuse_settings, abuse_retriever, Hanging(5.0), budget_ms=None, page_timeout_ms=3000,
                         queue_max=300)
    with hanging as c, ThreadPoolExecutor(300) as pool:
        pages = [pool.submit(c.get, f"/v1/users/{u}/homepage", headers=AS_READER) for u in users]
        time.sleep(1.0)  # the requests are in: the worker threads are taken
        for probe in ("/healthz", "/readyz"):
            probed = ThreadPoolExecutor(1).submit(c.get, probe)
            started = time.monotonic()
            try:
                assert probed.result(timeout=10).status_code == 200
            except FutureTimeout:
                pytest.fail(f"{probe} did not answer")
            assert time.monotonic() - started < 2, probe
        assert all(p.result(timeout=180).status_code == 200 for p in pages)


# -- what the service tells, and how it starts --------------------------------------------------------
def test_readyz_tells_no_internal_error_text(abuse_settings, abuse_retriever, tmp_path, copy_store):
    """Was: the exception's class and text (paths, hosts) went to whoever probed /readyz."""
    store = tmp_path / "store"
    copy_store(abuse_settings.store_dir, store)
    settings = abuse_settings.model_copy(update={"store_dir": store})
    with app_client(settings, Retriever.open(settings.retrieval_config())) as c:
        close_embedded(store / "chroma")  # the vector store goes away under the service
        answer = c.get("/readyz")
    assert answer.status_code == 503
    assert answer.json() == {"detail": "the vector store is unreachable"}


def test_the_api_token_is_a_secret_and_start_up_warns_without_one(abuse_settings, abuse_retriever, caplog):
    """Was: a plain string (printed with the settings), and a service that refused every write said nothing."""
    assert isinstance(abuse_settings.api_token, SecretStr) and ADMIN not in repr(abuse_settings)
    with caplog.at_level(logging.WARNING, logger="agent.api"), app_client(abuse_settings, abuse_retriever,
                                                                          api_token=None):
        pass
    assert any("api_token" in r.getMessage() for r in caplog.records)


# -- templates cannot build huge strings ------------------------------------------------------------
@pytest.mark.parametrize("source", [
    '{{ "x" | center(10**8) }}',
    '{% set a = "x" * 5000 %}{{ a | replace("x", a) | replace("x", a) | length }}',
    '{{ "%99999999s" | format("x") }}',
    '{{ "{:>99999999}".format(1) }}',
    '{{ "x".ljust(10**8) }}',
    '{% set a = "x" * 9000 %}{% set a = a ~ a ~ a ~ a ~ a ~ a ~ a ~ a %}{{ (a ~ a ~ a ~ a ~ a ~ a ~ a ~ a) | length }}',
])
def test_a_template_cannot_build_a_huge_string(tmp_path, source):
    """Was: the string was built whole (100 MB and more) and only the finished render was measured."""
    path = tmp_path / "huge.jinja"
    path.write_text(source)
    with pytest.raises(ConfigError, match=r"too large|too long"):
        load_template(path, {})


def test_several_workers_on_the_embedded_store_are_refused_up_front(tmp_path):
    """Was: N workers started, and every one but the store's owner crashed on it."""
    try:
        done = subprocess.run([sys.executable, "-m", "homepage", "--store", str(tmp_path / "store"), "serve",
                               "--workers", "2", "--host", "127.0.0.1", "--port", "8767"],
                              capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail("the workers were started")
    assert done.returncode == 2 and "chroma_host" in done.stderr and "one worker" in done.stderr


# -- catalogue writes: SQLite and the vector store agree ---------------------------------------------
def test_a_catalogue_write_cut_short_is_repaired_by_its_retry_and_by_the_next_start(abuse_settings, abuse_retriever):
    """Was: a process stopped between the catalogue (SQLite) and the vector store left the product
    out of the vector store for good: the retry changed nothing in SQLite, so it wrote nothing."""
    row = {"item_id": "CUT-1", "title": "Rosehip facial oil", "category_path": "Beauty > Skin Care", "price_usd": 9}
    products = abuse_retriever.index.stores["products"]
    abuse_retriever.catalog.upsert_products([parse_product(row, CatalogueColumns())])  # then the process died
    assert products.get(ids=["CUT-1"])["ids"] == []
    with app_client(abuse_settings, abuse_retriever) as c:  # the retry
        assert c.put("/v1/catalogue/items", json={"items": [row]}, headers=AS_ADMIN).json()["changed"] == 0
    assert products.get(ids=["CUT-1"])["ids"] == ["CUT-1"]
    # the same cut, repaired by the next start; and a removal cut short the other way
    abuse_retriever.catalog.upsert_products([parse_product({**row, "item_id": "CUT-2"}, CatalogueColumns())])
    abuse_retriever.catalog.remove_products(["CUT-1"])
    with app_client(abuse_settings, abuse_retriever):
        pass
    assert products.get(ids=["CUT-1", "CUT-2"])["ids"] == ["CUT-2"]


# -- several workers on one store: a reload and an erasure reach every one -----------------------------
def test_a_reload_and_an_erasure_reach_every_worker(abuse_settings, tmp_path, copy_store):
    """Was: the worker that answered POST /v1/admin/reload or DELETE /v1/users/{id} reloaded or reopened
    its stores; the others kept the old templates and their handles on the replaced vector store."""
    prompts = tmp_path / "prompts"
    shutil.copytree(abuse_settings.prompts_dir, prompts, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    store = tmp_path / "store"
    copy_store(abuse_settings.store_dir, store)
    settings = abuse_settings.model_copy(update={"store_dir": store, "prompts_dir": prompts,
                                                 "rules_file": prompts / "rules.yaml",
                                                 "skeleton_file": prompts / "skeleton.yaml"})
    retriever = Retriever.open(settings.retrieval_config())
    user, other = retriever.catalog.users()[:2]
    # two workers (one process here: both hold the same embedded store)
    with app_client(settings, retriever) as a, app_client(settings, Retriever.open(settings.retrieval_config())) as b:
        b_service = b.app.state.service
        before = b_service.composer.prompts["compose"].version
        template = prompts / "compose.user.jinja"
        template.write_text(template.read_text() + "\n")
        assert a.post("/v1/admin/reload", headers=AS_ADMIN).status_code == 200
        assert b.get(f"/v1/users/{other}/homepage", headers=AS_READER).status_code == 200
        assert b_service.composer.prompts["compose"].version != before
        index = b_service.composer.retriever.index
        assert a.delete(f"/v1/users/{user}", headers=AS_ADMIN).status_code == 200
        page = b.get(f"/v1/users/{other}/homepage", params={"explain": "true"}, headers=AS_ADMIN).json()
        assert b_service.composer.retriever.index is not index  # b reopened the rewritten store
        assert not any("failed" in note for note in page["meta"]["notes"]), page["meta"]["notes"]


def test_events_sent_to_one_worker_reach_every_workers_counts(abuse_settings, tmp_path, copy_store):
    """Was: each worker counted only the events it received itself, so two workers served different
    co-visitation and popularity. Events sent to A and others sent to B: both serve the same."""
    store = copy_store(abuse_settings.store_dir, tmp_path / "store")
    settings = abuse_settings.model_copy(update={"store_dir": store})
    retriever_a = Retriever.open(settings.retrieval_config())
    retriever_b = Retriever.open(settings.retrieval_config())
    products = sorted(retriever_a.products)
    x, y, z = products[:3]  # three products; new shoppers buy x then y (sent to A), x then z (sent to B)
    probe = build_history("probe", [Event("probe", x, 1.0, None, "purchase")], retriever_a.products)

    def covisit(retriever: Retriever) -> list[tuple[str, float]]:
        return [(c.item_id, round(c.score, 9)) for c in retriever.source("covisit").candidates(probe, 50)]

    def popular(retriever: Retriever) -> list[str]:
        return retriever.source("popularity").ranked[:20]

    before = covisit(retriever_b)
    with app_client(settings, retriever_a) as a, app_client(settings, retriever_b) as b:
        hour_ago = int(time.time()) - 3600
        for client, then, who in ((a, y, "a"), (b, z, "b")):
            events = [{"user_id": f"new-{who}-{i}", "item_id": item, "timestamp": hour_ago + 10 * i + step,
                       "event_type": "purchase"} for i in range(5) for step, item in enumerate((x, then))]
            assert client.post("/v1/events", json={"events": events}, headers=AS_ADMIN).json()["accepted"] == 10
        for client in (a, b):  # a request: each worker catches up with the other's events
            assert client.get("/v1/users/new-a-0/homepage", headers=AS_READER).status_code == 200
        assert covisit(retriever_a) == covisit(retriever_b) != before
        assert {y, z} <= {item for item, _ in covisit(retriever_b)}
        assert popular(retriever_a) == popular(retriever_b)
        # counted once each: a worker that follows again finds nothing new
        assert retriever_a.follow() == retriever_b.follow() == 0
    # a worker started now builds its links from the store, with every worker's events in it (its
    # strengths differ from the observed ones by the popularity correction: CoVisit.observe)
    assert {y, z} <= {item for item, _ in covisit(Retriever.open(settings.retrieval_config()))}

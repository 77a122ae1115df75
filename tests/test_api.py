"""The HTTP service on its own copy of the sample store: pages (real model through the worker),
events, catalogue updates, reloads, auth, limits, health and metrics, and the model's faults."""

import json
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import hypothesis
import pytest
import schemathesis
from conftest import GOOD, assert_proven, assert_valid_page
from fastapi.testclient import TestClient

from agent.api import QUEUE_FULL, create_app
from agent.backends import Generation, LLMBackend
from agent.schema import ExplainedPage
from agent.service import composer_for
from agent.settings import SAMPLE_DIR, Settings
from prompts import PROMPTS_DIR
from retrieval import Retriever, ingest

TOKEN = "test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def api_settings(tmp_path_factory) -> Settings:
    root = tmp_path_factory.mktemp("api")
    prompts = root / "prompts"
    shutil.copytree(PROMPTS_DIR, prompts, ignore=shutil.ignore_patterns("__pycache__", "*.py"))
    settings = Settings(store_dir=root / "store", prompts_dir=prompts, rules_file=prompts / "rules.yaml",
                        skeleton_file=prompts / "skeleton.yaml", budget_ms=None, api_token=TOKEN)
    ingest(settings.retrieval_config(), SAMPLE_DIR / "items.csv", SAMPLE_DIR / "interactions.csv", progress=False)
    return settings


@pytest.fixture(scope="module")
def api_retriever(api_settings) -> Retriever:
    return Retriever.open(api_settings.retrieval_config())


@pytest.fixture(scope="module")
def client(api_settings, api_retriever, composer):
    """The service with the real packaged model (shared with the session's composer)."""
    served = composer_for(api_settings, api_retriever, composer.backend, budget_s=None)
    with TestClient(create_app(api_settings, served)) as c:
        yield c


def page_of(client, user: str) -> ExplainedPage:
    response = client.get(f"/v1/users/{user}/homepage", params={"explain": "true"}, headers=AUTH)
    assert response.status_code == 200, response.text
    return ExplainedPage.model_validate(response.json())


def test_a_page_comes_from_the_model_through_the_worker(client, sample_users):
    page = page_of(client, sample_users[5])
    assert_valid_page(page, client.app.state.service.composer)
    # explained: the shopper's profile beside the page, from the events the store holds for them
    catalog = client.app.state.service.composer.retriever.catalog
    assert page.profile.events == catalog.event_count(sample_users[5]) > 0 and page.profile.top_categories
    assert page.meta.path in {"llm", "repaired"} and page.meta.llm_calls >= 1
    lean = client.get(f"/v1/users/{sample_users[5]}/homepage", headers=AUTH).json()  # cached now
    assert set(lean) == {"user_id", "modules", "config_version"}
    assert [i["item_id"] for m in lean["modules"] for i in m["items"]] == page.item_ids()
    assert "reason" not in lean["modules"][0]["items"][0]


def test_unknown_and_malformed_users(client):
    page = page_of(client, "someone-new")
    assert page.meta.cold_start and page.modules
    assert page.profile.segment == "new visitor" and page.profile.events == 0 and page.profile.user_id == "someone-new"
    bad = client.get("/v1/users/bad%20id!/homepage", headers=AUTH)
    assert bad.status_code == 422
    assert bad.json()["detail"][0]["loc"] == ["path", "user_id"]


def test_writes_need_the_token(client):
    body = {"events": []}
    assert client.post("/v1/events", json=body).status_code == 401
    assert client.post("/v1/events", json=body, headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert client.post("/v1/admin/reload").status_code == 401
    assert client.delete("/v1/catalogue/items/x").status_code == 401
    assert client.post("/v1/events", json=body, headers=AUTH).status_code == 200


def test_events_are_checked_one_by_one_stored_once_and_reflected(client, api_retriever, sample_users):
    user = sample_users[7]
    shown = page_of(client, user)
    item = shown.modules[0].items[0].item_id  # a discovery item: once bought, it leaves the page
    events = [
        {"user_id": user, "item_id": item, "timestamp": time.time(), "event_type": "purchase"},
        {"user_id": user, "item_id": "no-such-item", "timestamp": time.time()},
        {"user_id": "bad id", "item_id": item, "timestamp": time.time()},
        {"user_id": user, "item_id": item, "timestamp": "yesterday-ish"},
        {"user_id": user, "item_id": item},
    ]
    answer = client.post("/v1/events", json={"events": events}, headers=AUTH).json()
    assert answer["accepted"] == 1 and answer["duplicates"] == 0
    reasons = {r["index"]: r["reason"] for r in answer["rejected"]}
    assert set(reasons) == {1, 2, 3, 4}
    assert "unknown item_id" in reasons[1] and "user_id" in reasons[2]
    assert "timestamp" in reasons[3] and "neither" in reasons[4]
    again = client.post("/v1/events", json={"events": events[:1]}, headers=AUTH).json()
    assert again == {"accepted": 0, "duplicates": 1, "rejected": []}
    assert sum(e.item_id == item for e in api_retriever.catalog.user_events(user)) == 1
    after = page_of(client, user)
    assert not after.meta.cached
    assert item not in after.item_ids()


def test_a_product_update_reaches_the_next_page(client, sample_users):
    user = sample_users[9]
    item = page_of(client, user).modules[-1].items[0]  # trending: the most popular item in stock
    row = {"item_id": item.item_id, "title": item.title, "category_path": "Beauty > Skin Care", "stock": 0}
    bad = {"item_id": "x y", "title": "A"}
    answer = client.put("/v1/catalogue/items", json={"items": [row, bad]}, headers=AUTH).json()
    assert answer["changed"] == 1 and [r["index"] for r in answer["rejected"]] == [1]
    assert item.item_id not in page_of(client, user).item_ids()
    new = {"item_id": "NEW-1", "title": "Rose water toner", "category_path": "Beauty > Skin Care > Face",
           "price_usd": "12.5", "brand": "Petal"}
    assert client.put("/v1/catalogue/items", json={"items": [new]}, headers=AUTH).json()["changed"] == 1
    retriever = client.app.state.service.composer.retriever
    assert retriever.products["NEW-1"].price == 12.5
    assert "NEW-1" in retriever.index.vectors("products", ["NEW-1"])
    assert client.delete("/v1/catalogue/items/NEW-1", headers=AUTH).json() == {"removed": "NEW-1"}
    assert client.delete("/v1/catalogue/items/NEW-1", headers=AUTH).status_code == 404
    assert "NEW-1" not in retriever.products


def test_a_user_is_forgotten_through_the_api_and_the_service_keeps_serving(client, api_retriever, sample_users):
    user, other = sample_users[7], sample_users[8]
    assert api_retriever.catalog.event_count(user) > 0 and not page_of(client, user).meta.cold_start
    assert client.delete(f"/v1/users/{user}").status_code == 401
    response = client.delete(f"/v1/users/{user}", headers=AUTH)
    assert response.status_code == 200, response.text
    receipt = response.json()
    assert_proven(receipt["found"], receipt["not_scanned"])
    assert user not in response.text
    assert sum(n for place, n in receipt["removed"].items() if place.endswith(": events")) > 0
    assert receipt["removed"][f"{api_retriever.catalog.path.parent}: vector collection behaviour"] == 1
    assert api_retriever.catalog.event_count(user) == 0
    assert page_of(client, user).meta.cold_start  # now a new visitor, not the cached page
    assert not page_of(client, other).meta.cold_start  # the rebuilt stores serve everyone else
    assert api_retriever.index.count("behaviour") > 0
    # no such user any more (nor ever a product): refused, nothing touched
    for gone in (user, next(iter(api_retriever.products))):
        again = client.delete(f"/v1/users/{gone}", headers=AUTH)
        assert again.status_code == 404 and "nothing was erased" in again.json()["detail"]


def test_a_broken_rule_set_is_refused_and_the_old_one_keeps_serving(client, api_settings, sample_users):
    rules = Path(api_settings.rules_file)
    good = rules.read_text()
    before = client.app.state.service.composer
    try:
        rules.write_text(good.replace("max_items_per_brand: 2", "max_items_per_brand: lots"))
        refused = client.post("/v1/admin/reload", headers=AUTH)
        assert refused.status_code == 422
        assert "rules.yaml" in refused.json()["detail"] and "max_items_per_brand" in refused.json()["detail"]
        assert client.app.state.service.composer is before
        assert client.get(f"/v1/users/{sample_users[2]}/homepage", headers=AUTH).status_code == 200
    finally:
        rules.write_text(good)
    template = Path(api_settings.prompts_dir) / "compose.user.jinja"
    text = template.read_text()
    try:
        template.write_text(text + "\n")
        answer = client.post("/v1/admin/reload", headers=AUTH)
        assert answer.status_code == 200
        assert answer.json()["templates"]["compose"] != before.prompts["compose"].version
        assert client.app.state.service.composer is not before
    finally:
        template.write_text(text)
        client.post("/v1/admin/reload", headers=AUTH)


def test_limits_health_and_metrics(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"status": "ready"}
    big = {"events": [{"user_id": "u", "item_id": "i", "seq_pos": n} for n in range(1001)]}
    assert client.post("/v1/events", json=big, headers=AUTH).status_code == 422  # over the batch limit
    huge = client.post("/v1/events", content=b"x" * 2_000_000, headers={**AUTH, "Content-Type": "application/json"})
    assert huge.status_code == 413
    assert client.post("/v1/events", content=b"{not json", headers=AUTH).status_code == 422
    text = client.get("/metrics", headers=AUTH).text
    assert 'homepage_page_seconds_count{path="llm"}' in text or 'homepage_page_seconds_count{path="repaired"}' in text
    assert "homepage_queue_depth" in text and 'homepage_events_total{outcome="accepted"}' in text


def test_the_checked_in_openapi_schema_is_the_apps():
    app = create_app(Settings(api_token=TOKEN))
    checked_in = json.loads((Path(__file__).parent.parent / "agent" / "openapi.json").read_text())
    assert checked_in == json.loads(json.dumps(app.openapi())), "regenerate: homepage serve --openapi"


# -- the model's faults and load: every answer is a valid page ----------------------------------------
class Faulty(LLMBackend):
    """Raises, hangs or writes garbage, as told; counts how requests were batched."""

    name = model_name = "faulty"

    def __init__(self, mode: str, seconds: float = 0.0):
        self.mode, self.seconds, self.batches = mode, seconds, []

    def generate(self, messages, schema, max_new_tokens, deadline=None):
        return self.generate_batch([(messages, schema)], max_new_tokens, deadline)[0]

    def generate_batch(self, requests, max_new_tokens, deadline=None):
        self.batches.append(len(requests))
        time.sleep(self.seconds)
        if self.mode == "raise":
            raise RuntimeError("engine crashed")
        text = '{"modules": [{"title": "}}}' if self.mode == "garbage" else json.dumps(GOOD)
        return [Generation(text, 10, 10, self.seconds) for _ in requests]


def faulty_client(api_settings, api_retriever, backend, budget_s=None, **settings):
    composer = composer_for(api_settings, api_retriever, backend, budget_s=budget_s, llm_retry=False)
    return TestClient(create_app(api_settings.model_copy(update=settings), composer))


@pytest.mark.parametrize("mode", ["raise", "garbage"])
def test_a_failing_model_still_answers_valid_pages(api_settings, api_retriever, sample_users, mode):
    with faulty_client(api_settings, api_retriever, Faulty(mode)) as c:
        page = page_of(c, sample_users[11])
    assert_valid_page(page, c.app.state.service.composer)
    assert page.meta.path == "fallback"


def test_a_hanging_model_costs_the_budget_not_more(api_settings, api_retriever, sample_users):
    with faulty_client(api_settings, api_retriever, Faulty("good", seconds=3.0), budget_s=0.5) as c:
        started = time.monotonic()
        page = page_of(c, sample_users[12])
        took = time.monotonic() - started
        again = page_of(c, sample_users[13])  # the model still hangs: the budget answers again
    assert page.meta.path == "fallback" and "budget" in page.meta.fallback_reason
    assert took < 1.5
    assert again.meta.path == "fallback" and "budget" in again.meta.fallback_reason
    assert_valid_page(again, c.app.state.service.composer)


def test_concurrent_requests_share_a_batch_and_a_full_queue_answers_at_once(api_settings, api_retriever,
                                                                              sample_users):
    backend = Faulty("good", seconds=1.0)
    users = sample_users[14:20]
    with faulty_client(api_settings, api_retriever, backend, serve_batch=4, queue_max=4, batch_wait_ms=200) as c:
        gate = threading.Barrier(len(users))

        def get(user):
            gate.wait()
            return page_of(c, user)

        with ThreadPoolExecutor(len(users)) as pool:
            pages = list(pool.map(get, users))
    for page in pages:
        assert_valid_page(page, c.app.state.service.composer)
    assert max(backend.batches) > 1  # requests that arrived together shared forward passes
    full = [p for p in pages if p.meta.fallback_reason == QUEUE_FULL]
    assert len(full) + sum(backend.batches) == len(users)


# -- fuzzing: any request the schema allows (and many it does not) gets a documented answer ---------
def test_fuzzed_requests_get_documented_answers_and_never_a_5xx(api_settings, api_retriever):
    """schemathesis against the served OpenAPI schema, every operation, with the write token;
    deterministic pages (no model): the fuzzing is about the API. Bounded: 20 cases an operation."""
    app = create_app(api_settings, composer_for(api_settings, api_retriever, None))
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) == 18
    slow = {"POST /v1/console/effect": 3}  # each case replays hundreds of shoppers

    for operation in operations:
        @hypothesis.given(case=operation.as_strategy())
        @hypothesis.settings(max_examples=slow.get(operation.label, 20), deadline=None, database=None,
                             suppress_health_check=list(hypothesis.HealthCheck))
        def check(case):
            case.call_and_validate(headers=AUTH)

        check()


def test_the_worker_learns_batch_times_and_admits_what_it_can_finish():
    """Hand-computed: times are moving averages (0.8 old + 0.2 new); a size not tried yet is
    expected to take as long as the slowest smaller one; a batch admits the most requests, most
    time left first, whose least time left still exceeds the batch's expected time."""
    from agent.worker import ModelWorker, PageRequest

    worker = ModelWorker(lambda: None, batch=4)
    assert worker.expected_s(3) == 0.0  # nothing learnt: nothing turned away
    worker._record(1, 2.0)
    worker._record(4, 5.0)
    worker._record(1, 3.0)
    assert worker.expected_s(1) == pytest.approx(2.2)
    assert worker.expected_s(3) == pytest.approx(2.2) and worker.expected_s(4) == 5.0
    now = time.monotonic()
    requests = [PageRequest(u, now + left) for u, left in [("a", 3.0), ("b", 6.0), ("c", 1.0), ("d", 4.0)]]
    due, late = worker._admit(requests)
    assert [r.user_id for r in due] == ["b", "d", "a"] and [r.user_id for r in late] == ["c"]

"""The service as deployed for more than one process: chromadb in server mode (``chroma run``),
``homepage serve`` with two uvicorn workers sharing the SQLite store (WAL, one writer at a time).
Faults: the model server down, the service stopped
(SIGTERM) while events are posted and restarted, the vector-store server killed and restarted.
No accepted event is lost or stored twice, and every answer is a valid page."""

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import pytest
from conftest import Chroma, catalog_at, free_port, wait_for

from agent.schema import ExplainedPage
from agent.settings import Settings

TOKEN = "fault-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployed")
    chroma = Chroma(root / "chroma-server", free_port())
    chroma.start()
    settings = Settings(store_dir=root / "store", chroma_host="127.0.0.1", chroma_port=chroma.port)
    port = free_port()
    env = {**os.environ, "HOMEPAGE_STORE_DIR": str(settings.store_dir), "HOMEPAGE_CHROMA_HOST": "127.0.0.1",
           "HOMEPAGE_CHROMA_PORT": str(chroma.port), "HOMEPAGE_API_TOKEN": TOKEN,
           # the model server is down: every page is the deterministic one, marked (a fault in itself)
           "HOMEPAGE_BACKEND": "openai", "HOMEPAGE_OPENAI_BASE_URL": f"http://127.0.0.1:{free_port()}/v1"}
    # every process that touches the stores is a separate one, as in a deployment
    subprocess.run([sys.executable, "-m", "homepage", "ingest"], env=env, check=True, capture_output=True)
    url = f"http://127.0.0.1:{port}"

    log = root / "serve.log"

    def serve() -> subprocess.Popen:
        with log.open("a") as out:
            proc = subprocess.Popen([sys.executable, "-m", "homepage", "serve", "--port", str(port),
                                     "--workers", "2"], env=env, stdout=out, stderr=out)
        wait_for(f"{url}/readyz")
        return proc

    serve.log = log

    yield settings, chroma, serve, url
    chroma.kill()


def valid_page(response: httpx.Response) -> ExplainedPage:
    assert response.status_code == 200, response.text
    page = ExplainedPage.model_validate_json(response.content)
    ids = page.item_ids()
    assert page.modules and len(ids) == len(set(ids))
    return page


def test_stopped_while_events_arrive_then_restarted_loses_and_doubles_nothing(deployment):
    settings, _, serve, url = deployment
    catalog = catalog_at(settings.store_dir)
    items = sorted(catalog.products)[:50]
    batches = [[{"user_id": f"fault-{b}", "item_id": items[(b + j) % len(items)], "seq_pos": j, "event_type": "view"}
                for j in range(20)] for b in range(400)]
    answered: dict[int, int] = {}
    server = serve()
    page = valid_page(httpx.get(f"{url}/v1/users/{catalog.users()[0]}/homepage?explain=true", headers=AUTH))
    assert page.meta.path == "fallback" and "unreachable" in page.meta.fallback_reason

    def post_all() -> None:
        with httpx.Client(base_url=url, headers=AUTH, timeout=10) as http:
            for b, batch in enumerate(batches):
                # the service going away leaves a batch without an answer: the client resends it
                with contextlib.suppress(httpx.HTTPError):
                    answered[b] = http.post("/v1/events", json={"events": batch}).json()["accepted"]

    writer = threading.Thread(target=post_all)
    writer.start()
    time.sleep(1.0)
    server.send_signal(signal.SIGTERM)
    # uvicorn finishes the requests in hand, shuts the app down, then ends by the signal it got
    assert server.wait(60) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in serve.log.read_text()
    writer.join(60)
    assert 0 < len(answered) < len(batches), "the stop should fall in the middle of the posts"
    assert all(n == 20 for n in answered.values())

    server = serve()
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as http:
            # the client resends what got no answer, and one batch that did (it must not count twice)
            resent = [b for b in range(len(batches)) if b not in answered] + [min(answered)]
            outcomes = [http.post("/v1/events", json={"events": batches[b]}).json() for b in resent]
        assert outcomes[-1] == {"accepted": 0, "duplicates": 20, "rejected": []}
        assert all(o["accepted"] + o["duplicates"] == 20 and not o["rejected"] for o in outcomes)
        stored = catalog._db.execute(
            "SELECT user_id, item_id, seq_pos, COUNT(*) FROM events WHERE user_id LIKE 'fault-%' "
            "GROUP BY user_id, item_id, seq_pos").fetchall()
        assert len(stored) == 400 * 20 and all(row[3] == 1 for row in stored)
        # the events reach the page
        valid_page(httpx.get(f"{url}/v1/users/fault-7/homepage?explain=true", headers=AUTH))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        catalog.close()


def test_the_vector_store_server_killed_and_restarted(deployment):
    settings, chroma, serve, url = deployment
    server = serve()
    user = catalog_at(settings.store_dir).users()[3]
    try:
        chroma.kill()
        page = valid_page(httpx.get(f"{url}/v1/users/{user}/homepage?explain=true", headers=AUTH))
        # the semantic source searches the products' vectors each worker read at its warm-up
        assert not any("semantic failed" in note for note in page.meta.notes), page.meta.notes
        ready = httpx.get(f"{url}/readyz")
        assert ready.status_code == 503 and "vector store" in ready.json()["detail"]
        chroma.start()
        wait_for(f"{url}/readyz")
        valid_page(httpx.get(f"{url}/v1/users/{user}/homepage?explain=true", headers=AUTH))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


def test_a_short_load_run_against_the_deployed_service(deployment):
    """The load tool end to end (2 clients, 3 s): the model server is down here, so every page is
    a fallback page, valid and quick; event posts are counted apart from pages."""
    from eval.service_load import run_load

    settings, _, serve, url = deployment
    server = serve()
    catalog = catalog_at(settings.store_dir)
    try:
        report = run_load(url, catalog.users()[:20], sorted(catalog.products)[:20], clients=2, seconds=3,
                          event_share=0.3, token=TOKEN)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)
        catalog.close()
    assert report["errors"] == 0 and report["invalid_pages"] == 0 and report["pages"] > 0
    assert report["fallback_share"] == 1.0
    assert report["latency_ms"]["events"]["n"] > 0
    assert report["latency_ms"]["all pages"]["n"] == report["pages"]
    assert report["requests"] == report["pages"] + report["latency_ms"]["events"]["n"]

"""The merchandiser console's API on its own copy of the sample store: who may use it, the draft and
its load errors, previews side by side, publish, history and rollback, and the version in every page.
(The console's page in a real browser: tests/test_console_browser.py.)"""

import base64
import hashlib
import shutil

import pytest
from fastapi.testclient import TestClient

from agent.api import create_app
from agent.merchandising import FILES, Console, NotPublishable, live_version, version_id
from agent.service import composer_for
from agent.settings import Settings
from prompts import PROMPTS_DIR
from retrieval import Retriever

TOKEN, READ = "console-admin-token", "console-read-token"
ADMIN = {"Authorization": f"Bearer {TOKEN}"}
OLD, NEW = "title: Trending in Beauty", "title: Trending this week"


def basic(password: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"anyone:{password}".encode()).decode()}


@pytest.fixture
def console_settings(tmp_path, settings, ingested, copy_store) -> Settings:
    prompts = tmp_path / "prompts"
    shutil.copytree(PROMPTS_DIR, prompts, ignore=shutil.ignore_patterns("__pycache__", "*.py", "full"))
    store = copy_store(settings.store_dir, tmp_path / "store")
    return Settings(store_dir=store, prompts_dir=prompts, rules_file=prompts / "rules.yaml",
                    skeleton_file=prompts / "skeleton.yaml", budget_ms=None, api_token=TOKEN, read_token=READ,
                    model_cache_dir=settings.model_cache_dir)


@pytest.fixture
def client(console_settings):
    retriever = Retriever.open(console_settings.retrieval_config())
    served = composer_for(console_settings, retriever)  # deterministic pages: the console is under test
    with TestClient(create_app(console_settings, served)) as c:
        yield c


def trending_title(page: dict) -> str:
    return next(m["title"] for m in page["modules"] if m["type"] == "trending")


def test_only_the_admin_token_opens_the_console(client):
    for headers in ({}, {"Authorization": f"Bearer {READ}"}, basic("wrong"), basic(READ)):
        for path in ("/console", "/v1/console/draft", "/v1/console/versions"):
            assert client.get(path, headers=headers).status_code == 401, (path, headers)
    # the page asks a browser for the token; the API asks for a bearer token
    assert client.get("/console").headers["www-authenticate"].startswith("Basic ")
    assert client.get("/v1/console/draft").headers["www-authenticate"] == "Bearer"
    page = client.get("/console", headers=basic(TOKEN))
    assert page.status_code == 200 and "Homepage console" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http" not in page.text.split("<script>")[1]  # no outside script or font: it works offline
    assert client.get("/v1/console/draft", headers=ADMIN).status_code == 200


def test_a_write_on_remembered_basic_credentials_needs_the_consoles_header(client):
    body = {"content": "x"}
    assert client.put("/v1/console/draft/skeleton.yaml", json=body, headers=basic(TOKEN)).status_code == 403
    assert client.delete("/v1/console/draft", headers=basic(TOKEN)).status_code == 403
    allowed = client.delete("/v1/console/draft", headers={**basic(TOKEN), "x-homepage-console": "1"})
    assert allowed.status_code == 200


def test_edit_preview_publish_and_roll_back(client, console_settings, sample_users):
    user = sample_users[3]
    found = live_version(console_settings)
    before = client.get(f"/v1/users/{user}/homepage", headers=ADMIN).json()
    assert before["config_version"] == found and trending_title(before) == "Trending in Beauty"

    draft = client.get("/v1/console/draft", headers=ADMIN).json()
    assert [f["name"] for f in draft["files"]] == list(FILES)
    assert draft["draft_version"] == draft["live_version"] == found and not draft["publishable"]
    skeleton = next(f for f in draft["files"] if f["name"] == "skeleton.yaml")["draft"]
    assert OLD in skeleton
    saved = client.put("/v1/console/draft/skeleton.yaml", json={"content": skeleton.replace(OLD, NEW)},
                       headers=ADMIN).json()
    assert saved["publishable"] and saved["problems"] == [] and saved["draft_version"] != found
    assert [f["name"] for f in saved["files"] if f["changed"]] == ["skeleton.yaml"]

    # the new title on the draft's side only; shoppers still get the live page
    preview = client.post("/v1/console/preview", json={"users": [user, "new-visitor-0001"]}, headers=ADMIN).json()
    for pair in preview["pages"]:
        assert trending_title(pair["draft"]) == "Trending this week"
        assert trending_title(pair["live"]) == "Trending in Beauty"
        assert pair["draft"]["meta"]["config_version"] == saved["draft_version"]
        assert pair["live"]["meta"]["config_version"] == found
    assert trending_title(client.get(f"/v1/users/{user}/homepage", headers=ADMIN).json()) == "Trending in Beauty"

    published = client.post("/v1/console/publish", json={"author": "Ada", "message": "weekly copy"}, headers=ADMIN)
    assert published.status_code == 200, published.text
    version = published.json()
    assert version["number"] == 2 and version["id"] == saved["draft_version"] and version["live"]
    assert f"-    {OLD}\n" in version["diff"] and f"+    {NEW}\n" in version["diff"] and version["author"] == "Ada"
    after = client.get(f"/v1/users/{user}/homepage", headers=ADMIN).json()
    assert after["config_version"] == version["id"] and trending_title(after) == "Trending this week"
    explained = client.get(f"/v1/users/{user}/homepage", params={"explain": "true"}, headers=ADMIN).json()
    assert explained["meta"]["config_version"] == version["id"]

    history = client.get("/v1/console/versions", headers=ADMIN).json()
    assert [(v["number"], v["id"], v["live"]) for v in history] == [(2, version["id"], True), (1, found, False)]
    assert client.post("/v1/console/publish", json={"author": "Ada", "message": "again"},
                       headers=ADMIN).status_code == 409  # the draft is what is live

    back = client.post("/v1/console/versions/1/rollback", json={"author": "Bo"}, headers=ADMIN).json()
    assert back["number"] == 3 and back["id"] == found and back["rollback_of"] == 1 and back["live"]
    restored = client.get(f"/v1/users/{user}/homepage", headers=ADMIN).json()
    assert restored["config_version"] == found and trending_title(restored) == "Trending in Beauty"
    assert OLD in console_settings.skeleton_file.read_text()
    assert client.post("/v1/console/versions/9/rollback", json={"author": "Bo"}, headers=ADMIN).status_code == 404


def test_a_broken_template_shows_its_file_and_line_and_cannot_be_published(client, console_settings):
    compose = (console_settings.prompts_dir / "compose.user.jinja").read_text()
    broken = compose.replace("{{ summary }}", "{{ summry }}")
    view = client.put("/v1/console/draft/compose.user.jinja", json={"content": broken}, headers=ADMIN).json()
    assert not view["publishable"]
    assert view["problems"][0]["file"] == "compose.user.jinja" and view["problems"][0]["line"] == 1
    assert "summry" in view["problems"][0]["message"]
    refused = client.post("/v1/console/publish", json={"author": "Ada", "message": "typo"}, headers=ADMIN)
    assert refused.status_code == 409 and "compose.user.jinja:1" in refused.json()["detail"]
    assert client.post("/v1/console/preview", json={"users": ["A1"]}, headers=ADMIN).status_code == 409
    assert (console_settings.prompts_dir / "compose.user.jinja").read_text() == compose  # nothing went live
    assert client.get("/v1/console/versions", headers=ADMIN).json() == []

    rules = client.put("/v1/console/draft/rules.yaml", json={"content": "title_max_chars: 2\n"}, headers=ADMIN).json()
    assert {(p["file"], p["line"]) for p in rules["problems"]} >= {("compose.user.jinja", 1)}
    assert client.delete("/v1/console/draft", headers=ADMIN).json()["problems"] == []
    assert client.put("/v1/console/draft/other.yaml", json={"content": ""}, headers=ADMIN).status_code == 404
    assert client.put("/v1/console/draft/rules.yaml", json={"content": "x" * 300_000},
                      headers=ADMIN).status_code == 422  # too long a file
    assert client.post("/v1/console/preview", json={"users": ["a b"]}, headers=ADMIN).status_code == 422


def test_the_offline_effect_compares_the_drafts_pages_with_the_live_ones(client):
    answer = client.post("/v1/console/effect", json={"users": 40}, headers=ADMIN)
    assert answer.status_code == 200, answer.text
    same = answer.json()
    assert same["users"] == 40 and same["draft_ndcg@10"] == same["live_ndcg@10"] > 0
    assert same["draft_minus_live"] == [0, 0, 0]
    skeleton = client.get("/v1/console/draft", headers=ADMIN).json()["files"][-1]["draft"]
    # the personal module off the page: only the other modules' items are left to find the basket
    start = skeleton.index("  - type: for_you")
    fewer = skeleton[:start] + skeleton[skeleton.index("  - type:", start + 1):]
    client.put("/v1/console/draft/skeleton.yaml", json={"content": fewer}, headers=ADMIN)
    changed = client.post("/v1/console/effect", json={"users": 40}, headers=ADMIN).json()
    assert changed["live_ndcg@10"] == same["live_ndcg@10"] and changed["draft_ndcg@10"] != same["draft_ndcg@10"]
    low, high = changed["draft_minus_live"][1:]
    assert low <= changed["draft_ndcg@10"] - changed["live_ndcg@10"] <= high
    assert client.post("/v1/console/effect", json={"users": 5}, headers=ADMIN).status_code == 422


def test_version_ids_are_a_digest_of_the_whole_set():
    files = {"b.yaml": "two", "a.jinja": "one"}
    expected = hashlib.sha256(b"a.jinja\x00one\x00b.yaml\x00two\x00").hexdigest()[:12]
    assert version_id(files) == expected and version_id({**files, "b.yaml": "two "}) != expected


def test_a_reload_that_fails_puts_the_live_files_back(console_settings, retriever):
    console = Console(console_settings)
    skeleton = console_settings.skeleton_file.read_text()
    console.save("skeleton.yaml", skeleton.replace(OLD, NEW))

    def failing_reload():
        raise RuntimeError("the model server went away")

    with pytest.raises(RuntimeError):
        console.publish("Ada", "copy", retriever.products, failing_reload)
    assert console_settings.skeleton_file.read_text() == skeleton
    assert [v.number for v in console.versions()] == [1]  # the set as found; the failed one is not kept
    with pytest.raises(NotPublishable):
        console.rollback(1, "Bo", retriever.products, lambda: None)  # version 1 is what is live

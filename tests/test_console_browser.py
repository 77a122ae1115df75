"""The merchandiser console in a real browser (Debian's Chromium, driven by Playwright) against the
service on a real socket: edit a fallback title, preview (draft side only), publish, the shopper's
page, roll back; a broken template; no credential. ``scripts/install-browser.sh`` installs Chromium;
CI sets HOMEPAGE_REQUIRE_BROWSER=1 so that a missing browser fails instead of skipping. With
HOMEPAGE_CONSOLE_SHOTS=folder the screenshots land there (docs/console-*.png come from this test)."""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import uvicorn
from test_console import ADMIN, NEW, OLD, TOKEN, console_settings, trending_title  # noqa: F401 (a fixture)

from agent.api import create_app
from agent.service import composer_for
from retrieval import Retriever

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# this machine's network is closed: no background connections, no first-run or update checks
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
         "--disable-component-update", "--disable-sync"]

if not Path(CHROMIUM).exists():
    reason = "Chromium is not installed (bash scripts/install-browser.sh)"
    if os.environ.get("HOMEPAGE_REQUIRE_BROWSER"):
        raise RuntimeError(reason)
    pytest.skip(reason, allow_module_level=True)


@pytest.fixture
def server(console_settings):  # noqa: F811
    retriever = Retriever.open(console_settings.retrieval_config())
    app = create_app(console_settings, composer_for(console_settings, retriever))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serving = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=serving.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not serving.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the service did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    serving.should_exit = True
    thread.join(30)


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def shopper(server):
    """The storefront's side: the page API with the admin token."""
    with httpx.Client(base_url=server, headers=ADMIN) as client:
        yield client


def shoot(page, name: str, tmp_path: Path) -> None:
    folder = Path(os.environ.get("HOMEPAGE_CONSOLE_SHOTS") or tmp_path)
    page.screenshot(path=str(folder / f"console-{name}.png"), full_page=True)


def test_the_console_edits_previews_publishes_and_rolls_back_in_a_browser(server, browser, shopper, sample_users,
                                                                          tmp_path):
    from playwright.sync_api import expect

    user = sample_users[3]
    found = shopper.get(f"/v1/users/{user}/homepage").json()
    assert trending_title(found) == "Trending in Beauty"

    # no credential: 401 and nothing of the console (a page load ends in the browser's auth error)
    anonymous = browser.new_context()
    answer = anonymous.request.get(f"{server}/console")
    assert answer.status == 401 and "console" not in answer.text().lower().replace("homepage console", "")
    with pytest.raises(Exception, match="ERR_INVALID_AUTH_CREDENTIALS"):
        anonymous.new_page().goto(f"{server}/console")
    anonymous.close()

    context = browser.new_context(http_credentials={"username": "merchandiser", "password": TOKEN},
                                  viewport={"width": 1400, "height": 900})
    page = context.new_page()
    assert page.goto(f"{server}/console").status == 200
    expect(page.locator("#live-version")).to_have_text(found["config_version"])

    # edit the trending module's fallback title and save the draft
    page.click("button[data-file='skeleton.yaml']")
    editor = page.locator("#editor")
    assert OLD in editor.input_value()
    editor.fill(editor.input_value().replace(OLD, NEW))
    page.click("#save")
    expect(page.locator("#status")).to_have_text("draft saved")
    expect(page.locator("#publish")).to_be_enabled()

    # preview: the new title on the draft's side only
    page.fill("#user", user)
    page.click("#preview")
    draft_side, live_side = page.locator("[data-side='draft']"), page.locator("[data-side='live']")
    expect(draft_side).to_contain_text("Trending this week")
    expect(live_side).to_contain_text("Trending in Beauty")
    expect(live_side).not_to_contain_text("Trending this week")
    assert trending_title(shopper.get(f"/v1/users/{user}/homepage").json()) == "Trending in Beauty"
    shoot(page, "preview", tmp_path)

    # publish: shoppers get the new title and the new version
    page.fill("#author", "Ada")
    page.fill("#message", "a fresher trending title")
    page.click("#publish")
    expect(page.locator("#status")).to_contain_text("is live")
    expect(page.locator("#live-version")).not_to_have_text(found["config_version"])
    published = page.locator("#live-version").inner_text()
    after = shopper.get(f"/v1/users/{user}/homepage").json()
    assert after["config_version"] == published and trending_title(after) == "Trending this week"
    expect(page.locator("#history tr.live")).to_contain_text("Ada")
    shoot(page, "history", tmp_path)

    # roll back to the set as found: the old title and version return
    page.click("button[data-rollback='1']")
    expect(page.locator("#live-version")).to_have_text(found["config_version"])
    back = shopper.get(f"/v1/users/{user}/homepage").json()
    assert back["config_version"] == found["config_version"] and trending_title(back) == "Trending in Beauty"

    # a broken template: its file and line are shown, and publish stays disabled
    page.click("button[data-file='compose.user.jinja']")
    editor.fill(editor.input_value().replace("{{ summary }}", "{{ summry }}"))
    page.click("#save")
    expect(page.locator("#problems .problem").first).to_contain_text("compose.user.jinja:1")
    expect(page.locator("#publish")).to_be_disabled()
    shoot(page, "broken-template", tmp_path)
    context.close()

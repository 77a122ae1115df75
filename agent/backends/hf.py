"""The embedded default: a transformers model on the CPU, decoding under an xgrammar grammar.

The decode loop is our own rather than ``generate()`` with a logits processor, for two reasons:
tokens the grammar forces (JSON keys, brackets, quotes) are appended without a model step
("jump-forward"), and we count model steps and tokens for the page meta.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from functools import lru_cache
from pathlib import Path

from agent.backends import Generation, LLMBackend
from agent.errors import BackendError, ConfigError
from retrieval.packaged import ModelNotFound, find_gguf, resolve_model


def unique_array_keys(schema: dict) -> set[str]:
    """Names of the properties whose value is an array with ``uniqueItems`` (anywhere in the schema)."""
    keys: set[str] = set()

    def walk(node):
        if isinstance(node, dict):
            for name, sub in (node.get("properties") or {}).items():
                if isinstance(sub, dict) and sub.get("type") == "array" and sub.get("uniqueItems"):
                    keys.add(name)
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(schema)
    return keys


def _converted_dir(cache_dir: Path, folder: str, gguf: str) -> Path:
    """GGUF weights are dequantised once (≈30 s) and kept as safetensors (loads in ≈1 s)."""
    source = Path(folder) / gguf
    stat = source.stat()
    key = hashlib.sha1(f"{source.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{source.stem}-{key}"


@lru_cache(maxsize=2)
def load_model(model: str, gguf_file: str | None, adapter: str | None, dtype: str, cache_dir: str):
    """Load once per process (per configuration)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-tensor bars on every load; our own commands show progress

    try:
        folder = resolve_model(model)
        gguf = gguf_file or find_gguf(folder)
    except ModelNotFound as exc:
        raise ConfigError(str(exc)) from None
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(dtype)
    if torch_dtype is None:
        raise ConfigError(f"dtype: expected float32 or bfloat16, got {dtype!r}")
    source, kwargs = folder, {"local_files_only": True}
    if gguf:
        converted = _converted_dir(Path(cache_dir), folder, gguf)
        if not (converted / "config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf, **kwargs)
            net = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf, **kwargs)
            partial = converted.with_name(converted.name + ".partial")
            # the weights are already dequantised; drop the GGUF marker so they save as plain tensors
            net.hf_quantizer = None
            if hasattr(net.config, "quantization_config"):
                del net.config.quantization_config
            net.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            partial.rename(converted)
        source = str(converted)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        net = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise ConfigError(f"model: cannot load {model!r} offline: {exc}") from None
    if adapter:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
    net.eval()
    return tokenizer, net


class TransformersBackend(LLMBackend):
    name = "transformers"

    def __init__(self, tokenizer, model, model_name: str, adapter: str | None = None):
        import xgrammar as xgr

        self.tokenizer, self.model = tokenizer, model
        self.model_name, self.adapter = model_name, adapter
        self._vocab = model.config.vocab_size
        self._compiler = xgr.GrammarCompiler(
            xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=self._vocab), max_threads=1
        )
        # single-token scalars ("1".."9", ...) that a uniqueItems array may not repeat
        self._single = {}
        for value in map(str, range(100)):
            ids = tokenizer.encode(value, add_special_tokens=False)
            if len(ids) == 1:
                self._single[value] = ids[0]
        self._pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self._lock = threading.Lock()  # one decode at a time on this model
        self._prefix: tuple[list[int], object] | None = None  # (ids, KV cache) of the system prompt

    @classmethod
    def from_settings(cls, settings) -> TransformersBackend:
        tokenizer, model = load_model(settings.model, settings.gguf_file, settings.adapter, settings.dtype,
                                      str(settings.model_cache_dir))
        return cls(tokenizer, model, settings.model, settings.adapter)

    @lru_cache(maxsize=256)  # noqa: B019 - one backend per process; schemas repeat per skeleton
    def _grammar(self, schema_json: str):
        return self._compiler.compile_json_schema(schema_json, any_whitespace=False, separators=(",", ":"))

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        encoded = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)

    def _repeats(self, output: list[int], keys: set[str]) -> list[int]:
        """Token ids that would repeat a value of the uniqueItems array being written, if any.
        xgrammar does not enforce uniqueItems; we do, for arrays of single-token values."""
        if not keys:
            return []
        text = self.tokenizer.decode(output)
        opened = [text.rfind(f'"{key}":[') + len(key) + 4 for key in keys if f'"{key}":[' in text]
        if not opened or "]" in text[max(opened):]:
            return []
        start = max(opened)
        return [self._single[v] for v in text[start:].split(",") if v in self._single]

    def _choose(self, logits, matcher, bitmask, row: int, output: list[int], keys: set[str]) -> int:
        """Greedy choice among the tokens the grammar allows, minus repeats."""
        import torch
        import xgrammar as xgr

        matcher.fill_next_token_bitmask(bitmask, row)
        row_logits = logits[row : row + 1]
        xgr.apply_token_bitmask_inplace(row_logits, bitmask[row : row + 1])
        repeats = self._repeats(output, keys)
        if repeats:
            masked = row_logits.clone()
            masked[0, repeats] = float("-inf")
            if torch.isfinite(masked).any():  # else a repeat is the only way on; the rules repair it
                row_logits = masked
        return int(row_logits.argmax(-1))

    def _system_prefix(self, messages: list[dict[str, str]], ids: list[int]):
        """The KV cache of the system prompt, computed once and reused while it is unchanged: every
        page shares it, so its prefill is paid once per process, not once per page."""
        import torch

        if not messages or messages[0]["role"] != "system":
            return 0, None
        if self._prefix is None or ids[: len(self._prefix[0])] != self._prefix[0]:
            encoded = self.tokenizer.apply_chat_template(messages[:1], tokenize=True)
            prefix = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
            if ids[: len(prefix)] != prefix:
                return 0, None
            out = self.model(input_ids=torch.tensor([prefix]), use_cache=True)
            self._prefix = (prefix, out.past_key_values)
        return len(self._prefix[0]), self._prefix[1]

    def generate(self, messages, schema, max_new_tokens, deadline=None) -> Generation:
        import torch
        import xgrammar as xgr

        started = time.perf_counter()
        matcher = xgr.GrammarMatcher(self._grammar(json.dumps(schema, sort_keys=True)))
        bitmask = xgr.allocate_token_bitmask(1, self._vocab)
        keys = unique_array_keys(schema)
        output: list[int] = []

        def force() -> list[int]:
            """Append what the grammar forces next, without a model step ("jump-forward")."""
            text = matcher.find_jump_forward_string()
            if not text:
                return []
            ids = self.tokenizer.encode(text, add_special_tokens=False)
            for token in ids:
                if not matcher.accept_token(token):
                    raise BackendError(f"grammar refused forced text {text!r}")
            output.extend(ids)
            return ids

        with self._lock, torch.inference_mode():
            ids = self.prompt_ids(messages)
            reused, past = self._system_prefix(messages, ids)
            step_ids = ids[reused:] + force()
            passes, prefill = 0, 0.0
            try:
                while len(output) < max_new_tokens and not matcher.is_completed():
                    if deadline is not None and time.monotonic() > deadline:
                        raise BackendError("the page's time budget ran out during generation", retryable=True)
                    out = self.model(input_ids=torch.tensor([step_ids]), past_key_values=past, use_cache=True)
                    passes += 1
                    past = out.past_key_values
                    if passes == 1:
                        prefill = time.perf_counter() - started
                    token = self._choose(out.logits[:, -1, : self._vocab].float(), matcher, bitmask, 0, output, keys)
                    if not matcher.accept_token(token):
                        raise BackendError(f"grammar refused token {token}")
                    if matcher.is_terminated():
                        break
                    output.append(token)
                    step_ids = [token, *force()]
            finally:
                # the shared cache was extended in place: cut it back to the system prompt alone
                extra = past.get_seq_length() - reused if reused and past is not None else 0
                if extra > 0:
                    past.crop(-extra)
        text = self.tokenizer.decode(output, skip_special_tokens=True)
        return Generation(text, len(output), passes, time.perf_counter() - started, len(ids), prefill)

    def generate_batch(self, requests, max_new_tokens) -> list[Generation]:
        """One forward pass per step for all rows (left-padded). No jump-forward here: forced tokens
        cost a step, but the step is shared by the whole batch."""
        import torch
        import xgrammar as xgr

        if len(requests) <= 1:
            return [self.generate(m, s, max_new_tokens) for m, s in requests]
        started = time.perf_counter()
        rows = len(requests)
        matchers = [xgr.GrammarMatcher(self._grammar(json.dumps(s, sort_keys=True))) for _, s in requests]
        keys = [unique_array_keys(s) for _, s in requests]
        prompts = [self.prompt_ids(m) for m, _ in requests]
        width = max(map(len, prompts))
        input_ids = torch.tensor([[self._pad] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        bitmask = xgr.allocate_token_bitmask(rows, self._vocab)
        outputs: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        past, passes = None, 0
        with self._lock, torch.inference_mode():
            while not all(done) and passes < max_new_tokens:
                out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                 past_key_values=past, use_cache=True)
                passes += 1
                past = out.past_key_values
                logits = out.logits[:, -1, : self._vocab].float()
                step = []
                for row in range(rows):
                    token = self._pad
                    if not done[row]:
                        token = self._choose(logits, matchers[row], bitmask, row, outputs[row], keys[row])
                        if not matchers[row].accept_token(token):
                            raise BackendError(f"grammar refused token {token}")
                        if matchers[row].is_terminated():
                            done[row] = True
                        else:
                            outputs[row].append(token)
                            done[row] = matchers[row].is_completed()
                    step.append(token)
                input_ids = torch.tensor(step)[:, None]
                attention = torch.cat([attention, torch.ones(rows, 1, dtype=attention.dtype)], dim=1)
                positions = positions[:, -1:] + 1
        seconds = (time.perf_counter() - started) / rows
        return [
            Generation(self.tokenizer.decode(o, skip_special_tokens=True), len(o), passes, seconds, len(p))
            for o, p in zip(outputs, prompts, strict=True)
        ]

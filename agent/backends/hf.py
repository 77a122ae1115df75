"""The embedded default: a transformers model on the CPU, decoding under an xgrammar grammar.

The decode loop is our own rather than ``generate()`` with a logits processor, because on a CPU the
cost of a page is the number of model steps, and four things cut them:
- jump-forward: tokens the grammar forces (JSON keys, brackets, commas) are appended without a step;
- speculation: a cheap guess of the next tokens (the next handles in order; or, for copy, the text
  that followed the same tokens in the prompt) is checked in the same step that produces the next
  token; every guessed token the model agrees with is one step saved. The model reads the very
  tokens it reads without guessing (a wrong guess is cut from the KV cache; forced tokens are kept
  only where the guess holds their exact tokenisation), so the output is the greedy output — a test
  checks it over a set of users (only float rounding between a one-token and a several-token step
  could tip an exact tie);
- the system prompt's KV cache is computed once and shared by every page;
- a verbalizer: at the start of a handle array (a module's items) one forward pass scores every
  candidate handle; the order ``HandleOrder`` makes of those scores is written at once, with no step
  per item (``orders_handles``).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import shutil
import threading
import time
from contextlib import contextmanager
from functools import lru_cache, wraps
from pathlib import Path

from agent.adapters import check_adapter
from agent.backends import Generation, HandleOrder, LLMBackend
from agent.backends.options import TransformersOptions
from agent.errors import BackendError, ConfigError
from retrieval.packaged import ModelNotFound, find_gguf, resolve_model

# Decodes in flight, process-wide. A caller that stops waiting (the page's budget) leaves its decode
# in a daemon thread; a thread still inside torch or xgrammar when the interpreter finalises aborts
# the process ("terminate called without an active exception", exit 134). So every decode checks
# its deadline (and the process's exit) between steps, and exit waits for the ones in flight.
_in_flight = threading.Condition()
_running = 0
_exiting = threading.Event()


@contextmanager
def _decoding():
    global _running
    with _in_flight:
        _running += 1
    try:
        yield
    finally:
        with _in_flight:
            _running -= 1
            _in_flight.notify_all()


def _drain(timeout: float = 60.0) -> None:
    """At exit: decodes stop at their next step; wait until they have."""
    _exiting.set()
    with _in_flight:
        _in_flight.wait_for(lambda: _running == 0, timeout)


def _check(deadline: float | None, what: str = "page") -> None:
    if _exiting.is_set():
        raise BackendError("the process is exiting", retryable=True)
    if deadline is not None and time.monotonic() > deadline:
        raise BackendError(f"the {what}'s time budget ran out during generation", retryable=True)


@contextmanager
def _model_lock(lock: threading.Lock, deadline: float | None):
    """The model's lock, but no wait past the deadline (another decode may hold it for long)."""
    if not lock.acquire(timeout=-1 if deadline is None else max(deadline - time.monotonic(), 0.0)):
        raise BackendError("the model stayed busy past the page's time budget", retryable=True)
    try:
        yield
    finally:
        lock.release()


def _tracked(method):
    """A decode method counted in flight (``_drain`` waits for it at exit)."""
    @wraps(method)
    def tracked(*args, **kwargs):
        with _decoding():
            return method(*args, **kwargs)
    return tracked


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


def chat_prompt_ids(tokenizer, messages: list[dict[str, str]]) -> list[int]:
    """The token ids the model reads for ``messages``, up to the assistant's turn; training examples
    are encoded with this very function, so training and serving see the same prompt."""
    encoded = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


def load_base(model: str, gguf_file: str | None, dtype: str, cache_dir: str):
    """Tokenizer and model (no adapter), from a package, a local folder or the local hub cache."""
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
            # each process writes its own folder, then renames it into place: two processes converting
            # at once both succeed, the second rename finds the folder there and drops its own copy
            partial = converted.with_name(f"{converted.name}.partial-{os.getpid()}-{threading.get_ident()}")
            # the weights are already dequantised; drop the GGUF marker so they save as plain tensors
            net.hf_quantizer = None
            if hasattr(net.config, "quantization_config"):
                del net.config.quantization_config
            net.save_pretrained(partial)
            tokenizer.save_pretrained(partial)
            try:
                partial.rename(converted)
            except OSError:  # another process finished first
                shutil.rmtree(partial, ignore_errors=True)
        source = str(converted)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        net = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except OSError as exc:
        raise ConfigError(f"model: cannot load {model!r} offline: {exc}") from None
    return tokenizer, net


@lru_cache(maxsize=2)
def load_model(model: str, gguf_file: str | None, adapter: str | None, dtype: str, cache_dir: str):
    """Load once per process (per configuration); an adapter is checked against the model first."""
    if adapter:
        check_adapter(adapter, model)
    tokenizer, net = load_base(model, gguf_file, dtype, cache_dir)
    if adapter:
        from peft import PeftModel

        net = PeftModel.from_pretrained(net, adapter)
    net.eval()
    return tokenizer, net


class TransformersBackend(LLMBackend):
    name = "transformers"
    orders_handles = True

    def __init__(self, tokenizer, model, model_name: str, adapter: str | None = None, speculate: int = 8,
                 share_system_prefix: bool = True):
        import xgrammar as xgr

        self.speculate = speculate  # tokens guessed per step (0: off)
        self.share_system_prefix = share_system_prefix
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
        atexit.unregister(_drain)  # once, and after torch's own exit handlers: it runs before them
        atexit.register(_drain)

    @classmethod
    def from_options(cls, options: TransformersOptions) -> TransformersBackend:
        tokenizer, model = load_model(options.model, options.gguf_file, options.adapter, options.dtype,
                                      str(options.model_cache_dir))
        return cls(tokenizer, model, options.model, options.adapter, options.speculate,
                   options.share_system_prefix)

    @lru_cache(maxsize=256)  # noqa: B019 - one backend per process; schemas repeat per skeleton
    def _grammar(self, schema_json: str):
        return self._compiler.compile_json_schema(schema_json, any_whitespace=False, separators=(",", ":"))

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        return chat_prompt_ids(self.tokenizer, messages)

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

    def _guess(self, context: list[int], output: list[int], keys: set[str]) -> list[int]:
        """Up to ``self.speculate`` tokens the model will probably write next: inside a uniqueItems
        array, the next handles in ascending order (models list ranked candidates in order);
        elsewhere, what followed the last two tokens where they last appeared in the prompt
        (titles echo the prompt's examples and words)."""
        n = self.speculate
        if n <= 0 or not output:
            return []
        text = self.tokenizer.decode(output)
        opened = [text.rfind(f'"{key}":[') + len(key) + 4 for key in keys if f'"{key}":[' in text]
        if opened and "]" not in text[max(opened):]:
            values = [v for v in text[max(opened):].split(",") if v.isdigit()]
            used = set(map(int, values))
            last = int(values[-1]) if values else 0
            nexts = [v for v in range(last + 1, last + 1 + n) if v not in used]
            guess = ",".join(map(str, nexts))
            guess = guess if text.endswith(("[", ",")) else "," + guess
            return self.tokenizer.encode(guess, add_special_tokens=False)[:n]
        tokens = context + output
        key = tokens[-2:]
        for start in range(len(tokens) - 3, -1, -1):
            if tokens[start : start + 2] == key:
                return tokens[start + 2 : start + 2 + n]
        return []

    def _array_opened(self, output: list[int], keys: set[str]) -> int | None:
        """The number (0-based) of the uniqueItems array whose first value comes next, else None."""
        if not keys or not output:
            return None
        text = self.tokenizer.decode(output)
        openings = [f'"{key}":[' for key in keys]
        if not text.endswith(tuple(openings)):
            return None
        return sum(text.count(opening) for opening in openings) - 1

    def _handle_scores(self, row_logits, matcher, bitmask, index: int) -> dict[int, float]:
        """The model's log-probability of each single-token value the grammar allows next."""
        import torch
        import xgrammar as xgr

        matcher.fill_next_token_bitmask(bitmask, index)
        masked = row_logits.clone()
        xgr.apply_token_bitmask_inplace(masked, bitmask[index : index + 1])
        logp = torch.log_softmax(masked[0], -1)
        return {int(v): float(logp[t]) for v, t in self._single.items() if torch.isfinite(logp[t])}

    def _choose(self, row_logits, matcher, bitmask, index: int, output: list[int], keys: set[str]) -> int:
        """Greedy choice for one sequence (``row_logits``: 1 x vocab) among the tokens the grammar
        allows (using row ``index`` of ``bitmask``), minus repeats."""
        import torch
        import xgrammar as xgr

        matcher.fill_next_token_bitmask(bitmask, index)
        row_logits = row_logits.clone()
        xgr.apply_token_bitmask_inplace(row_logits, bitmask[index : index + 1])
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

        if not self.share_system_prefix or not messages or messages[0]["role"] != "system":
            return 0, None
        if self._prefix is None or ids[: len(self._prefix[0])] != self._prefix[0]:
            encoded = self.tokenizer.apply_chat_template(messages[:1], tokenize=True)
            prefix = list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)
            if ids[: len(prefix)] != prefix:
                return 0, None
            out = self.model(input_ids=torch.tensor([prefix]), use_cache=True)
            self._prefix = (prefix, out.past_key_values)
        return len(self._prefix[0]), self._prefix[1]

    @_tracked
    def generate(self, messages, schema, max_new_tokens, deadline=None, order: HandleOrder | None = None) -> Generation:
        import torch
        import xgrammar as xgr

        _check(deadline)
        started = time.perf_counter()
        matcher = xgr.GrammarMatcher(self._grammar(json.dumps(schema)))
        _check(deadline)  # compiling a new schema's grammar can take seconds
        bitmask = xgr.allocate_token_bitmask(1, self._vocab)
        keys = unique_array_keys(schema)
        output: list[int] = []
        scored: list[dict[int, float]] = []

        def forced() -> list[int]:
            """What the grammar forces next (JSON keys, brackets, commas), as the tokens a step
            would read: appended without a model step ("jump-forward"). Not yet accepted."""
            text = matcher.find_jump_forward_string()
            return self.tokenizer.encode(text, add_special_tokens=False) if text else []

        def take(tokens: list[int]) -> list[int]:
            for token in tokens:
                if not matcher.accept_token(token):
                    raise BackendError(f"grammar refused forced token {token}")
            output.extend(tokens)
            return tokens

        def write_order(row_logits, index: int) -> list[int]:
            """The handles of array ``index`` in the order ``order`` gives, with the commas and what
            the grammar forces after them: the tokens the next step reads."""
            scores = self._handle_scores(row_logits, matcher, bitmask, 0)
            scored.append(scores)
            handles = order(index, scores)
            written: list[int] = []
            for n, handle in enumerate(handles):
                if handle not in scores:
                    raise BackendError(f"handle {handle} is not allowed here")
                written += take([self._single[str(handle)]])
                after = forced()
                if not after and n < len(handles) - 1:
                    after = self.tokenizer.encode(",", add_special_tokens=False)
                written += take(after)
                if matcher.is_completed():
                    break
            return written

        with _model_lock(self._lock, deadline), torch.inference_mode():
            ids = self.prompt_ids(messages)
            reused, past = self._system_prefix(messages, ids)
            step_ids = ids[reused:] + take(forced())
            passes, prefill = 0, 0.0
            try:
                while len(output) < max_new_tokens and not matcher.is_completed():
                    _check(deadline)
                    ordering = order is not None and self._array_opened(output, keys) is not None
                    guess = [] if ordering else self._guess(ids, output, keys)
                    out = self.model(input_ids=torch.tensor([step_ids + guess]), past_key_values=past, use_cache=True)
                    passes += 1
                    past = out.past_key_values
                    if passes == 1:
                        prefill = time.perf_counter() - started
                    # row r of these logits predicts the token after guess[:r] (r = 0: after step_ids)
                    logits = out.logits[0, len(step_ids) - 1 :, : self._vocab].float()
                    # The model reads exactly the tokens it would read without guessing: a guessed
                    # token is kept only if the model chose it, and where the grammar forces tokens
                    # after it, only if the guess holds those very tokens; else they are the next
                    # step's input, as in a step without a guess.
                    row, kept, finished = 0, 0, False
                    while True:
                        index = self._array_opened(output, keys) if order is not None else None
                        if index is not None:  # the verbalizer: every handle scored by this one row
                            step_ids = write_order(logits[row : row + 1], index)
                            finished = matcher.is_completed()
                            break
                        token = self._choose(logits[row : row + 1], matcher, bitmask, 0, output, keys)
                        if not matcher.accept_token(token):
                            raise BackendError(f"grammar refused token {token}")
                        if matcher.is_terminated():
                            finished = True
                            break
                        output.append(token)
                        if matcher.is_completed():
                            finished = True
                            break
                        if row >= len(guess) or token != guess[row]:
                            step_ids = [token, *take(forced())]
                            break
                        kept = row + 1  # its KV entry is already computed: a step saved
                        after = forced()
                        if after and (guess[kept : kept + len(after)] != after or kept + len(after) > len(guess)):
                            step_ids = take(after)
                            break
                        kept += len(take(after))
                        row = kept
                        if matcher.is_completed():
                            finished = True
                            break
                    if len(guess) > kept:  # drop the KV entries of guesses the model did not make
                        past.crop(kept - len(guess))
                    if finished:
                        break
            finally:
                # the shared cache was extended in place: cut it back to the system prompt alone
                extra = past.get_seq_length() - reused if reused and past is not None else 0
                if extra > 0:
                    past.crop(-extra)
        text = self.tokenizer.decode(output, skip_special_tokens=True)
        return Generation(text, len(output), passes, time.perf_counter() - started, len(ids), prefill, scored)

    @_tracked
    def generate_free(self, messages: list[dict[str, str]], max_new_tokens: int) -> Generation:
        """Greedy generation without a grammar, to the end-of-turn token: what the model writes
        unaided (the fine-tuning evaluation measures how often that is a valid page)."""
        import torch

        started = time.perf_counter()
        ids = self.prompt_ids(messages)
        output: list[int] = []
        with self._lock, torch.inference_mode():
            step, past = ids, None
            while len(output) < max_new_tokens:
                _check(None)
                out = self.model(input_ids=torch.tensor([step]), past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = int(out.logits[0, -1, : self._vocab].argmax())
                if token == self.tokenizer.eos_token_id:
                    break
                output.append(token)
                step = [token]
        text = self.tokenizer.decode(output, skip_special_tokens=True)
        return Generation(text, len(output), len(output) + 1, time.perf_counter() - started, len(ids))

    @_tracked
    def generate_batch(self, requests, max_new_tokens, orders: list[HandleOrder] | None = None,
                       deadline: float | None = None) -> list[Generation]:
        """One forward pass per step for all rows (left-padded). No jump-forward here: forced tokens
        cost a step, but the step is shared by the whole batch. With ``orders``, each array's handles
        are scored at its first value as in ``generate`` and then written one per step."""
        import torch
        import xgrammar as xgr

        if len(requests) <= 1:
            return [self.generate(m, s, max_new_tokens, deadline, order=orders[0] if orders else None)
                    for m, s in requests]
        started = time.perf_counter()
        rows = len(requests)
        matchers = [xgr.GrammarMatcher(self._grammar(json.dumps(s))) for _, s in requests]
        keys = [unique_array_keys(s) for _, s in requests]
        prompts = [self.prompt_ids(m) for m, _ in requests]
        width = max(map(len, prompts))
        input_ids = torch.tensor([[self._pad] * (width - len(p)) + p for p in prompts])
        attention = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        positions = (attention.cumsum(-1) - 1).clamp(min=0)
        bitmask = xgr.allocate_token_bitmask(rows, self._vocab)
        outputs: list[list[int]] = [[] for _ in range(rows)]
        done = [False] * rows
        pending: list[list[int]] = [[] for _ in range(rows)]  # ordered handles (and commas) still to write
        scored: list[list[dict[int, float]]] = [[] for _ in range(rows)]
        comma = self.tokenizer.encode(",", add_special_tokens=False)
        past, passes = None, 0
        with _model_lock(self._lock, deadline), torch.inference_mode():
            while not all(done) and passes < max_new_tokens:
                _check(deadline, "batch")
                out = self.model(input_ids=input_ids, attention_mask=attention, position_ids=positions,
                                 past_key_values=past, use_cache=True)
                passes += 1
                past = out.past_key_values
                logits = out.logits[:, -1, : self._vocab].float()
                step = []
                for row in range(rows):
                    token = self._pad
                    if not done[row]:
                        index = self._array_opened(outputs[row], keys[row]) if orders else None
                        if index is not None:
                            scores = self._handle_scores(logits[row : row + 1], matchers[row], bitmask, row)
                            scored[row].append(scores)
                            handles = orders[row](index, scores)
                            pending[row] = [t for h in handles for t in [*comma, self._single[str(h)]]][len(comma):]
                        if pending[row]:
                            token = pending[row].pop(0)
                        else:
                            token = self._choose(logits[row : row + 1], matchers[row], bitmask, row, outputs[row],
                                                 keys[row])
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
            Generation(self.tokenizer.decode(o, skip_special_tokens=True), len(o), passes, seconds, len(p),
                       handle_logprobs=s)
            for o, p, s in zip(outputs, prompts, scored, strict=True)
        ]

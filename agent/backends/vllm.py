"""vLLM, in process: the engine for GPUs (tensor parallel, LoRA adapters per request, structured
outputs compiled from the same JSON schema). Optional: ``pip install "homepage-composer[vllm]"``."""

from __future__ import annotations

import json
import time
from pathlib import Path

from agent.adapters import check_adapter
from agent.backends import Generation, LLMBackend
from agent.backends.options import VLLMOptions
from agent.errors import MissingDependency
from retrieval.packaged import find_gguf, resolve_model


def _import_vllm():
    try:
        import vllm
    except ImportError:
        raise MissingDependency('backend "vllm" needs vLLM: pip install "homepage-composer[vllm]"') from None
    return vllm


class VLLMBackend(LLMBackend):
    name = "vllm"

    def __init__(self, model: str, adapter: str | None = None, dtype: str = "bfloat16"):
        vllm = _import_vllm()
        if adapter:
            check_adapter(adapter, model)
        folder = resolve_model(model)
        gguf = find_gguf(folder)
        self.model_name, self.adapter = model, adapter
        self._vllm = vllm
        lora = {}
        if adapter:  # served per request on the shared base weights; the engine sizes its LoRA slots by rank
            rank = json.loads((Path(adapter) / "adapter_config.json").read_text()).get("r", 16)
            lora = {"enable_lora": True, "max_lora_rank": max(16, rank), "max_loras": 1}
        self._llm = vllm.LLM(model=f"{folder}/{gguf}" if gguf else folder, dtype=dtype, seed=0, **lora)
        self._lora = None
        if adapter:
            from vllm.lora.request import LoRARequest

            self._lora = LoRARequest("page-adapter", 1, adapter)

    @classmethod
    def from_options(cls, options: VLLMOptions) -> VLLMBackend:
        return cls(options.model, options.adapter, options.dtype)

    def _params(self, schema: dict, max_new_tokens: int):
        sampling = self._vllm.SamplingParams
        try:  # vLLM >= 0.11
            from vllm.sampling_params import StructuredOutputsParams

            return sampling(temperature=0, max_tokens=max_new_tokens,
                            structured_outputs=StructuredOutputsParams(json=schema))
        except ImportError:
            from vllm.sampling_params import GuidedDecodingParams

            return sampling(temperature=0, max_tokens=max_new_tokens, guided_decoding=GuidedDecodingParams(json=schema))

    def generate_batch(self, requests, max_new_tokens, deadline=None):
        # the engine cannot stop a batch early: the composer's ``before`` bounds the wait
        started = time.perf_counter()
        outputs = self._llm.chat(
            [messages for messages, _ in requests],
            [self._params(schema, max_new_tokens) for _, schema in requests],
            lora_request=self._lora, use_tqdm=False,
        )
        seconds = (time.perf_counter() - started) / max(len(requests), 1)
        return [
            Generation(o.outputs[0].text, len(o.outputs[0].token_ids), len(o.outputs[0].token_ids), seconds)
            for o in outputs
        ]

    def generate(self, messages, schema, max_new_tokens, deadline=None):
        # an in-process engine call cannot be interrupted: the composer waits for it only until the
        # deadline (agent.composer.before), then answers with the deterministic page
        return self.generate_batch([(messages, schema)], max_new_tokens)[0]

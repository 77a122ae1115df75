#!/usr/bin/env bash
# After `homepage finetune finetune/configs/verbalizer.yaml`: the adapter against the deterministic
# page on Amazon Beauty, through eval ranking's ranking-only LLM path (handle_prior chosen on
# validation users, llm_page - page paired on the test users that compose with it). Usage, from the repository root:
#   scripts/eval_verbalizer.sh [PID_TO_WAIT_FOR]
# Waits for that process (the training run) first; writes docs/results/verbalizer-beauty/.
set -euo pipefail
if [[ -n "${1:-}" ]]; then
  while kill -0 "$1" 2>/dev/null; do sleep 60; done
fi
ADAPTER=${ADAPTER:-.homepage/finetune/verbalizer/adapter}
OUT=${OUT:-docs/results/verbalizer-beauty}
if [[ ! -f "$ADAPTER/homepage_adapter.json" ]]; then
  echo "no trained adapter at $ADAPTER (did the training finish? rerun homepage finetune: it resumes)" >&2
  exit 1
fi
. .venv/bin/activate
# SOURCES: leave sasrec out (the default here) to skip its ~15 min of training: the LLM page and the
# page it is compared with share the same pools either way
SOURCES=${SOURCES:-popularity,covisit,semantic,buy_again}
LLM_USERS=${LLM_USERS:-2000}
LLM_TUNE_USERS=${LLM_TUNE_USERS:-500}
# warn, not refuse: the adapter's rules/skeleton hashes are of the files when its examples were built
HOMEPAGE_ADAPTER="$ADAPTER" HOMEPAGE_ADAPTER_MISMATCH=warn nice -n 10 homepage eval ranking \
  --data ../shared/data/amazon-beauty --threads 1 --minutes 15 --users 2000 --sources "$SOURCES" \
  --llm-users "$LLM_USERS" --llm-tune-users "$LLM_TUNE_USERS" --out "$OUT"

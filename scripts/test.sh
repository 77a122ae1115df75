#!/usr/bin/env bash
# The tests as CI runs them: ruff, then the suite once per engine a store's tables can live in —
# SQLite, then PostgreSQL (every store folder its own database on a server started from Debian's
# package; the tests marked one_engine, which check nothing that depends on the engine, run in the
# SQLite pass only). Arguments go to both pytest runs (e.g. -m "not slow").
set -euo pipefail
cd "$(dirname "$0")/.."
HOMEPAGE_TEST_POSTGRES=$(bash scripts/start-postgres.sh)
export HOMEPAGE_TEST_POSTGRES HOMEPAGE_REQUIRE_POSTGRES=1  # its tests must run, not skip
. .venv/bin/activate
ruff check .
python -m pytest "$@"
HOMEPAGE_TEST_STORE_ENGINE=postgresql python -m pytest "$@"

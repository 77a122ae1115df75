#!/usr/bin/env bash
# side by side on one machine: single process vs Ray (2 actors), 64 shoppers each, batch 8, one chroma
# server per store; then Ray killed at 150 s and run again.
set -u
cd "$(dirname "$0")/../../.."  # the repository
. .venv/bin/activate
export HOMEPAGE_CHROMA_HOST=127.0.0.1
start_chroma() { nohup chroma run --path $1/chroma --port $2 > /tmp/chroma-$2.log 2>&1 & sleep 8; }
start_chroma /tmp/store-single 8012
start_chroma /tmp/store-ray 8013
echo "== single $(date -u +%T)"
/usr/bin/time -f "wall %e s" env HOMEPAGE_CHROMA_PORT=8012 homepage --store /tmp/store-single precompute --users 64 --batch 8 2>&1 | tr '\r' '\n' | grep -v "^$" | grep -v "it/s\]$\|page/s\]$\|shopper/s\]$" | tail -4
echo "== ray $(date -u +%T)"
/usr/bin/time -f "wall %e s" env HOMEPAGE_CHROMA_PORT=8013 homepage --store /tmp/store-ray precompute --ray --workers 2 --users 64 --batch 8 2>&1 | tr '\r' '\n' | grep -v "^$" | grep -v "it/s\]$\|page/s\]$\|shopper/s\]$" | tail -4
echo "== ray, killed at 120 s, on a fresh copy $(date -u +%T)"
python -c "import sqlite3; db=sqlite3.connect('/tmp/store-ray/catalog.sqlite3'); db.execute('DELETE FROM pages'); db.commit()"
env HOMEPAGE_CHROMA_PORT=8013 timeout 120 homepage --store /tmp/store-ray precompute --ray --workers 2 --users 64 --batch 8 > /tmp/ray-killed.log 2>&1
echo "exit $?; pages stored: $(python -c "import sqlite3; print(sqlite3.connect('/tmp/store-ray/catalog.sqlite3').execute('select count(*) from pages').fetchone()[0])")"
sleep 5; ps aux | grep -c "[r]ay::" | sed 's/^/ray processes left: /'
echo "== ray, run again $(date -u +%T)"
env HOMEPAGE_CHROMA_PORT=8013 homepage --store /tmp/store-ray precompute --ray --workers 2 --users 64 --batch 8 2>&1 | tr '\r' '\n' | grep -v "^$" | grep -v "it/s\]$\|page/s\]$\|shopper/s\]$" | tail -3
echo "pages stored: $(python -c "import sqlite3; print(sqlite3.connect('/tmp/store-ray/catalog.sqlite3').execute('select count(*) from pages').fetchone()[0])")"
echo "== done $(date -u +%T)"
pkill -f "chroma run --path /tmp/store-"

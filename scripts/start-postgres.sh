#!/usr/bin/env bash
# A private PostgreSQL server for the tests (and for trying the PostgreSQL engine): Debian's package,
# one cluster per checkout under /tmp (a short Unix socket path, and a folder Debian's postgres user
# can reach whoever owns the checkout), listening on that socket only (no TCP port). Installs the
# package when missing (root or sudo); does nothing when the server already runs. Prints the URL:
#   export HOMEPAGE_TEST_POSTGRES=$(bash scripts/start-postgres.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
as_root=$([ "$(id -u)" = 0 ] || echo sudo)
bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1)
if [ -z "$bin" ]; then
  export DEBIAN_FRONTEND=noninteractive
  $as_root apt-get install -y -q postgresql >/dev/null || { $as_root apt-get update -q >/dev/null &&
    $as_root apt-get install -y -q postgresql >/dev/null; }
  bin=$(ls -d /usr/lib/postgresql/*/bin | sort -V | tail -1)
fi
dir=/tmp/homepage-pg-$(pwd | sha256sum | cut -c1-8)
# the server refuses to run as root: as root it runs as Debian's postgres user
run=()
if [ "$(id -u)" = 0 ]; then run=(runuser -u postgres --); fi
mkdir -p "$dir" && chmod 700 "$dir"  # trust auth: only its owner (and root) reach the socket
[ "$(id -u)" = 0 ] && chown postgres "$dir"
if [ ! -f "$dir/data/PG_VERSION" ]; then
  "${run[@]}" "$bin/initdb" -D "$dir/data" -U homepage --auth=trust >/dev/null
fi
if ! "${run[@]}" "$bin/pg_ctl" -D "$dir/data" status >/dev/null 2>&1; then
  "${run[@]}" "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w \
    -o "-c listen_addresses='' -k $dir -c fsync=off -c max_connections=400" start >/dev/null
fi
echo "postgresql://homepage@/postgres?host=$dir"

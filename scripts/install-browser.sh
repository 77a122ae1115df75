#!/usr/bin/env bash
# Debian's Chromium, for the console's browser test (tests/test_console_browser.py drives it with
# Playwright, which then downloads no browser of its own). Needs root or sudo; does nothing if present.
set -euo pipefail
command -v chromium >/dev/null && exit 0
as_root=$([ "$(id -u)" = 0 ] || echo sudo)
export DEBIAN_FRONTEND=noninteractive
$as_root apt-get install -y -q chromium >/dev/null || { $as_root apt-get update -q >/dev/null &&
  $as_root apt-get install -y -q chromium >/dev/null; }
chromium --version

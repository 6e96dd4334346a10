#!/usr/bin/env bash
# What tests/test_browser.py needs: Debian's Chromium and its driver, and selenium in .venv.
# Idempotent: skips apt when /usr/bin/chromedriver is already there. Called by .ci/run after
# `make setup` (needs root or sudo for apt; the runner is root).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV="${VENV:-.venv}"
[ -x "$VENV/bin/python" ] || { echo "no $VENV yet: run 'make setup' first" >&2; exit 1; }

if [ ! -x /usr/bin/chromedriver ] || [ ! -x /usr/bin/chromium ]; then
    SUDO=""
    [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    $SUDO apt-get install -y -qq --no-install-recommends \
        chromium chromium-driver fonts-liberation >/dev/null
fi

if ! "$VENV/bin/python" -c "import selenium" 2>/dev/null; then
    "$VENV/bin/python" -m pip install --quiet "selenium>=4.11"
fi

# (Debian's launcher script may print a harmless "[: ...: unexpected operator" from its
# /dev/shm size check; it passes --disable-dev-shm-usage then, which the test passes anyway.)
/usr/bin/chromium --version 2>/dev/null
/usr/bin/chromedriver --version
"$VENV/bin/python" -c "import selenium; print('selenium', selenium.__version__)"

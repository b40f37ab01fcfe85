#!/usr/bin/env bash
# Install what tests/test_live_ui.py needs to screenshot the Dagster UI with a headless browser:
#
#   scripts/install_browser.sh [VENV]        # default VENV: the repo's .venv/
#
#   1. Debian's `chromium` package (+ a small font package so the screenshot has glyphs), through apt-get, only when
#      /usr/bin/chromium is missing. Needs root; as another user it prints the command to run and carries on.
#   2. the `playwright` Python package into VENV. Only the package: `playwright install` is NEVER run (it downloads
#      its own browser builds, which is not possible offline and not needed): the tests launch Debian's chromium
#      through `chromium.launch(executable_path="/usr/bin/chromium", ...)`.
#
# Idempotent: with both present it is a ~0.1 s check and changes nothing. Always exits 0 unless an install that it
# attempted failed (the test skips itself when the browser is still missing).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-$ROOT/.venv}"
CHROMIUM="${MERGELINE_CHROMIUM:-/usr/bin/chromium}"
PLAYWRIGHT_SPEC="${MERGELINE_PLAYWRIGHT:-playwright>=1.40,<2}"

start=$(date +%s)
say() { echo "install_browser: $*"; }

# --- 1. chromium ------------------------------------------------------------------------------------------------
if [ -x "$CHROMIUM" ]; then
    say "chromium present: $CHROMIUM"
elif [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    say "installing Debian chromium (apt-get) ..."
    t=$(date +%s)
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null \
        2> >(grep -v "^debconf: delaying package configuration" >&2)
    say "chromium installed in $(( $(date +%s) - t )) s: $("$CHROMIUM" --version 2>/dev/null || echo '?')"
else
    say "chromium is missing and this is not a root shell with apt-get; to enable the live UI screenshot test run:"
    say "    sudo apt-get update && sudo apt-get install -y --no-install-recommends chromium fonts-dejavu-core"
fi

# --- 2. playwright (Python package only) ---------------------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    say "no virtual environment at $VENV (run ./dev.sh setup first); skipping the playwright package"
elif "$VENV/bin/python" -c "import playwright.sync_api" 2>/dev/null; then
    say "playwright present: $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("playwright"))')"
else
    say "installing the playwright Python package into $VENV (no browser download) ..."
    t=$(date +%s)
    # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: belt and braces, the pip package itself downloads nothing
    # (the grep drops pip's "Location ... is ignored" noise about absent local index folders)
    PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 "$VENV/bin/python" -m pip --disable-pip-version-check -q install "$PLAYWRIGHT_SPEC" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
    say "playwright $("$VENV/bin/python" -c 'from importlib.metadata import version; print(version("playwright"))') installed in $(( $(date +%s) - t )) s"
fi

say "done in $(( $(date +%s) - start )) s"

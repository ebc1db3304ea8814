#!/usr/bin/env bash
# Installs trackpipe with its test dependencies (Python venv + the Node SDKs the
# compatibility tests drive) and runs the default test suite. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[test]'

# The browser tests drive Debian's chromium through Playwright's executable_path:
# `playwright install` downloads a browser build, which a closed network refuses.
if [ ! -x /usr/bin/chromium ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    export DEBIAN_FRONTEND=noninteractive
    # `apt-get update` only when the install fails without it: a fresh image has no lists.
    apt-get install -y -q chromium || { apt-get update -q && apt-get install -y -q chromium; } \
        || echo "could not install chromium: the browser tests will skip" \
            "(or fail under TRACKPIPE_REQUIRE_SERVICES=1)" >&2
fi

if command -v npm >/dev/null 2>&1; then
    # `npm install`, not `npm ci`: the lock file leaves out other platforms' optional binaries.
    (cd tests/compat/node && npm install --no-audit --no-fund --loglevel=error)
else
    echo "npm not found: the Node SDK tests will skip (or fail under TRACKPIPE_REQUIRE_SERVICES=1)" >&2
fi

# Two workers: most tests wait on a server, a subprocess or a timer, so two halve the
# wall time even on two cores (TRACKPIPE_TEST_WORKERS=0 runs in one process; a later
# -n in the arguments wins). A module's tests stay on one worker: its shared server or
# browser starts once.
exec .venv/bin/python -m pytest -n "${TRACKPIPE_TEST_WORKERS:-2}" --dist loadscope "$@"

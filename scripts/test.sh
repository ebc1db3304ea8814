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

if command -v npm >/dev/null 2>&1; then
    # `npm install`, not `npm ci`: the lock file leaves out other platforms' optional binaries.
    (cd tests/compat/node && npm install --no-audit --no-fund --loglevel=error)
else
    echo "npm not found: the Node SDK tests will skip (or fail under TRACKPIPE_REQUIRE_SERVICES=1)" >&2
fi

exec .venv/bin/python -m pytest "$@"

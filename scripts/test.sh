#!/usr/bin/env bash
# The test command: refresh .venv, lint, run the whole test suite (extra arguments go to pytest).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
"$VENV/bin/ruff" check src tests
exec "$VENV/bin/python" -m pytest "$@"

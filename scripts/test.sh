#!/usr/bin/env bash
# The test command: refresh .venv, lint, run the whole test suite (extra arguments go to pytest), then the
# numerics-sensitive tests again under the two restricted CPU profiles (scripts/numerics.sh): a suite that
# passes only with this CPU's fast kernels would fail on our users' CPUs.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
cd "$ROOT"
"$VENV/bin/ruff" check src tests
"$VENV/bin/python" -m pytest "$@"
for profile in avx2 baseline; do
    bash "$ROOT/scripts/numerics.sh" "$profile"
done

#!/usr/bin/env bash
# The main job: refresh .venv, then run `ssamba demo` (extra arguments go to it, e.g. --out DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
exec "$VENV/bin/ssamba" demo "$@"

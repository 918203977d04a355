#!/usr/bin/env bash
# The main job: refresh .venv, then run `ssamba demo` (extra arguments go to it, e.g. --out DIR).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$ROOT/scripts/setup.sh"
# One numba thread per process: the demo runs two lanes of one thread each, and numba sizes its OpenMP pool once, at
# import; an idle pool thread spin-waits between kernels and took half of the other lane's core (two pretraining
# runs side by side: 2-3 samples/s each with two numba threads, 7 with one).
export NUMBA_NUM_THREADS="${NUMBA_NUM_THREADS:-1}"
exec "$VENV/bin/ssamba" demo "$@"

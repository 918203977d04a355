#!/usr/bin/env bash
# The numerics-sensitive tests (pytest -m numerics) under a restricted CPU profile, standing in for CPUs we do
# not have: PROFILE is
#   avx2      torch's AVX2 kernels, oneDNN and MKL capped at AVX2, numba compiled for Haswell
#             (an AVX2-only laptop or cloud VM)
#   baseline  torch's default (non-vectorised) kernels, oneDNN / MKL capped at SSE4, numba for a generic
#             x86-64 (the other extreme; also the closest stand-in for a different vector unit such as ARM's)
# Each profile has its own numba cache, so code compiled for one target is never loaded under another.
# `avx2` exists on x86-64 only: elsewhere (ARM) it is skipped, saying so, and `baseline` runs on its own.
# Usage: scripts/numerics.sh PROFILE [pytest arguments]   (expects .venv, made by scripts/setup.sh)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PROFILE="${1:?usage: scripts/numerics.sh avx2|baseline [pytest arguments]}"
shift
if [ "$PROFILE" = avx2 ] && [ "$(uname -m)" != x86_64 ]; then
    echo "[numerics] profile avx2 skipped: $(uname -m) is not x86-64"
    exit 0
fi
case "$PROFILE" in
    avx2) ENV=(ATEN_CPU_CAPABILITY=avx2 DNNL_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 NUMBA_CPU_NAME=haswell) ;;
    baseline) ENV=(ATEN_CPU_CAPABILITY=default DNNL_MAX_CPU_ISA=SSE41 MKL_ENABLE_INSTRUCTIONS=SSE4_2
                   NUMBA_CPU_NAME=generic) ;;
    *) echo "scripts/numerics.sh: unknown profile '$PROFILE' (avx2 or baseline)" >&2; exit 2 ;;
esac
cd "$ROOT"
echo "[numerics] profile $PROFILE: ${ENV[*]}"
exec env "${ENV[@]}" NUMBA_CACHE_DIR="$ROOT/.cache/numba-$PROFILE" \
    "$ROOT/.venv/bin/python" -m pytest -m numerics -p no:cacheprovider -q "$@"

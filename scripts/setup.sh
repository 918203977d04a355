#!/usr/bin/env bash
# Create or refresh the project's virtual environment (.venv) and the system tools it uses.
# Sourced by scripts/test.sh and scripts/demo.sh; safe to run again (a stamp skips the pip work
# when nothing changed).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
PYTHON="${PYTHON:-python3}"
# Installed before the package so that pip never resolves the unpinned `torch` requirement to the
# multi-GB CUDA build on a CPU machine. On this project's machines `torch==2.13.0` resolves to a local CPU
# wheel; elsewhere point pip at PyTorch's CPU-only wheel index with SSAMBA_TORCH_INDEX=<index url>,
# or choose another build with SSAMBA_TORCH (e.g. a CUDA one on a GPU machine).
TORCH_SPEC="${SSAMBA_TORCH:-torch==2.13.0}"
TORCH_INDEX=()
if [ -n "${SSAMBA_TORCH_INDEX:-}" ]; then TORCH_INDEX=(--index-url "$SSAMBA_TORCH_INDEX"); fi

# espeak-ng renders the speech of the offline demo corpus (ssamba data synth).
if ! command -v espeak-ng >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "[setup] installing espeak-ng (apt-get)"
        # Not fatal: without espeak-ng only the corpus generator (and the tests that need it) cannot run.
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq espeak-ng >/dev/null; } \
            || echo "[setup] warning: could not install espeak-ng; the demo corpus needs it" >&2
    else
        echo "[setup] warning: espeak-ng is missing; the demo corpus needs it: sudo apt-get install -y espeak-ng" >&2
    fi
fi

if [ ! -x "$VENV/bin/python" ]; then
    echo "[setup] creating $VENV"
    "$PYTHON" -m venv "$VENV"
fi

STAMP="$VENV/.ssamba-setup"
WANT="$(sha256sum < "$ROOT/pyproject.toml" | cut -c1-16) $TORCH_SPEC"
if [ "$(cat "$STAMP" 2>/dev/null || true)" != "$WANT" ]; then
    echo "[setup] installing $TORCH_SPEC and ssamba[dev,plot,tensorboard,triton] into $VENV"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check "${TORCH_INDEX[@]}" "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT[dev,plot,tensorboard,triton]"
    echo "$WANT" > "$STAMP"
fi

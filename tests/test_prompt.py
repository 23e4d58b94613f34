"""Tokenization parity: the ingress's token ids equal the ones vLLM computes itself for the same request."""

import gc

import pytest

from kvpool.prompt import PromptError, PromptRenderer

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "ls -la"},
     {"role": "assistant", "content": "total 0\ndrwxr-xr-x  2 root"}, {"role": "user", "content": "naïve café 😀"}],
    [{"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "part two"}]}],
    [{"role": "user", "content": "tool output:\n```\nerror: E402\n```"}, {"role": "assistant", "content": None},
     {"role": "user", "content": "  leading spaces and trailing  "}],
]


@pytest.fixture(scope="module")
def llm(tiny_model_dir):
    from vllm import LLM

    engine = LLM(model=str(tiny_model_dir), block_size=32, kv_cache_memory_bytes=64 << 20, enforce_eager=True,
                 max_model_len=4096)
    yield engine
    del engine
    gc.collect()


@pytest.fixture(scope="module")
def renderer(tiny_model_dir):
    return PromptRenderer.from_pretrained(str(tiny_model_dir))


@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_chat_token_ids_match_vllm(llm, renderer, messages):
    from vllm import SamplingParams

    (out,) = llm.chat(messages, SamplingParams(max_tokens=1), use_tqdm=False)
    assert renderer.chat(messages) == list(out.prompt_token_ids)


@pytest.mark.parametrize("text", ["hello world", "  def f():\n\treturn 1", "ünïcödé"])
def test_completion_token_ids_match_vllm(llm, renderer, text):
    from vllm import SamplingParams

    (out,) = llm.generate(text, SamplingParams(max_tokens=1), use_tqdm=False)
    assert renderer.completion(text) == list(out.prompt_token_ids)


def test_bad_prompts(renderer):
    with pytest.raises(PromptError):
        renderer.chat([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}])
    with pytest.raises(PromptError):
        renderer.completion([1, 2, 10**9])
    assert renderer.completion([1, 2, 3]) == [1, 2, 3]

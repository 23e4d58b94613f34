"""Tokenization parity: the ingress's token ids equal the ones vLLM computes itself for the same request."""

import pytest

from conftest import close, in_process_llm
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
    engine = in_process_llm(model=str(tiny_model_dir), block_size=32, kv_cache_memory_bytes=64 << 20,
                            enforce_eager=True, max_model_len=4096)
    yield engine
    close(engine)


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


# --- reusing a recent prompt's tokens (kvpool.prefix_tokens) ----------------------------------------------------


def _claude_code_turn_texts(tokenizer, sessions=2, turns=25):
    """The chat-template texts of real Claude Code turns, each a session's whole history so far."""
    from pathlib import Path

    from kvpool.bench.replay import load_sessions

    trace = Path(__file__).resolve().parents[2] / "shared" / "traces" / "claude-code"
    return [tokenizer.apply_chat_template(t.messages, add_generation_prompt=True, tokenize=False)
            for s in load_sessions(trace, sessions, 20_000, 0, PromptRenderer(tokenizer), turns) for t in s.turns]


def test_agent_turns_tokenize_to_the_whole_texts_tokens_reusing_the_previous_turns(renderer):
    from kvpool.prefix_tokens import PrefixTokenizer

    tokenizer = renderer.tokenizer
    reuse = PrefixTokenizer(tokenizer, audit_every=10**9)  # no audits: every equality below is the reuse's own
    assert reuse.off_reason is None
    texts = _claude_code_turn_texts(tokenizer)
    for text in texts:
        for add in (False, True):
            assert reuse.encode(text, add_special_tokens=add) == tokenizer(text, add_special_tokens=add).input_ids
    assert reuse.counts["reused"] >= len(texts) and reuse.counts["audited"] == 0
    # Truncation keeps the first max_length tokens, as the tokenizer's own (right-side) truncation does.
    assert reuse.encode(texts[-1], add_special_tokens=False, truncation=True, max_length=100) == \
        tokenizer(texts[-1], add_special_tokens=False, truncation=True, max_length=100).input_ids


def test_a_reuse_that_differs_from_the_whole_tokenization_is_caught_and_turns_reuse_off(renderer):
    from kvpool.prefix_tokens import PrefixTokenizer

    tokenizer = renderer.tokenizer
    reuse = PrefixTokenizer(tokenizer, audit_every=1)
    first, second = [t for t in _claude_code_turn_texts(tokenizer, sessions=1, turns=8)
                     if len(t) >= reuse.min_reuse_chars][-2:]
    reuse.encode(first, add_special_tokens=False)
    (entry,) = reuse._recent.values()
    entry.ids[3] = (entry.ids[3] + 1) % len(tokenizer)  # what a bug in the reuse would leave behind
    assert reuse.encode(second, add_special_tokens=False) == tokenizer(second, add_special_tokens=False).input_ids
    assert reuse.off_reason and reuse.counts["audited"] == 1
    assert reuse.encode(second, add_special_tokens=False) == tokenizer(second, add_special_tokens=False).input_ids


def test_truncation_on_either_side_keeps_what_the_tokenizer_keeps(tiny_model_dir, renderer):
    from transformers import AutoTokenizer

    from kvpool.prefix_tokens import PrefixTokenizer

    texts = [t for t in _claude_code_turn_texts(renderer.tokenizer, sessions=1, turns=8) if len(t) >= 4096][-2:]
    for side in ("left", "right"):  # vLLM's tokenizers truncate on the left
        tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir), truncation_side=side)
        reuse = PrefixTokenizer(tokenizer)
        for text in texts:
            for add in (False, True):
                assert reuse.encode(text, add_special_tokens=add, truncation=True, max_length=50) == \
                    tokenizer(text, add_special_tokens=add, truncation=True, max_length=50).input_ids
        assert reuse.counts["reused"] >= 1

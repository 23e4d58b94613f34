"""Turns an OpenAI request's prompt into token ids, once, at the ingress, exactly as vLLM would.

The ingress needs the token ids before routing (the block chain is hashed from them), so the engine receives ids and
never re-tokenizes. Parity with vLLM's own chat rendering is a tested property (tests/test_prompt.py): render the
chat template to text, then tokenize that text without adding special tokens (the template already has them).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase


class PromptError(ValueError):
    """The prompt cannot be rendered (bad message shape, template failure)."""


def _content_text(content: Any) -> str:
    """OpenAI content is a string or a list of parts; text parts are joined as vLLM does for string templates."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    texts = []
    for part in content:
        if part.get("type") != "text":
            raise PromptError(f"unsupported content part type {part.get('type')!r}: this model takes text only")
        texts.append(part.get("text", ""))
    return "\n".join(texts)


class PromptRenderer:
    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, model_path: str) -> "PromptRenderer":
        return cls(AutoTokenizer.from_pretrained(model_path))

    def chat(self, messages: list[dict[str, Any]]) -> list[int]:
        conversation = [{"role": m["role"], "content": _content_text(m.get("content"))} for m in messages]
        try:
            text = self.tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # jinja raises assorted errors for conversations a template rejects
            raise PromptError(f"chat template failed: {e}") from e
        return self.tokenizer.encode(text, add_special_tokens=False)

    def completion(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return self.tokenizer.encode(prompt, add_special_tokens=True)
        vocab = len(self.tokenizer)
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise PromptError(f"token ids out of range [0, {vocab}): {bad[:5]}")
        return list(prompt)

"""Builds a tiny random-weight Llama with a locally trained BPE tokenizer and a ChatML template (~5 s, never committed).

Fast enough for integration tests on 2 CPU cores (prefill ~8K tok/s); its output is gibberish but deterministic under
greedy decoding, which is all the correctness tests need.
"""

from __future__ import annotations

from pathlib import Path

# ChatML with tools in the Hermes / Qwen2.5 format, so vLLM's `hermes` tool parser reads the model's tool calls.
CHATML = """\
{%- if tools %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}

{% endif %}# Tools

You may call one or more functions. Function signatures within <tools></tools>:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>

For each function call, return a json object within <tool_call></tool_call>:
<tool_call>
{"name": <function-name>, "arguments": <args-json-object>}
</tool_call><|im_end|>
{% elif messages[0].role == 'system' %}<|im_start|>system
{{ messages[0].content }}<|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == 'system' and loop.first %}
{%- elif message.role == 'assistant' %}<|im_start|>assistant
{% if message.content %}{{ message.content }}{% endif %}
{%- for call in message.tool_calls or [] %}{% set fn = call.function if call.function is defined else call %}
<tool_call>
{"name": "{{ fn.name }}", "arguments": {{ fn.arguments if fn.arguments is string else fn.arguments | tojson }}}
</tool_call>
{%- endfor %}<|im_end|>
{% elif message.role == 'tool' %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Added tokens the tool parser looks up (not special: they stay in the decoded text, as Qwen's do).
TOOL_TOKENS = ["<tool_call>", "</tool_call>"]


def _corpus() -> list[str]:
    words = (
        "the quick brown fox jumps over a lazy dog while agents read files run tests and write code "
        "def class return import from yield async await error value token cache block prefix router pool"
    ).split()
    return [" ".join(words[(i * 7 + j) % len(words)] for j in range(40)) for i in range(400)]


def build_tiny_model(path: Path, seed: int = 0, sliding_window: int | None = None, all_sliding: bool = False,
                     **shape) -> Path:
    """`seed` draws the weights: another seed is another model of the same shape. `sliding_window`: every other
    layer, from the first, attends to that many tokens only (vLLM's Llama reads `layer_types`), as gpt-oss's
    interleaved sliding-window layers do; with `all_sliding`, every layer does, as Mistral 7B v0.1's. `shape`:
    LlamaConfig sizes other than the tiny default (a benchmark builds a model as costly as SmolLM2-135M)."""
    if (path / "config.json").exists():
        return path
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|im_start|>", eos_token="<|im_end|>", pad_token="<|endoftext|>"
    )
    fast.add_tokens(TOOL_TOKENS)
    fast.chat_template = CHATML
    shape = {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, **shape}
    layers = shape["num_hidden_layers"]
    config = LlamaConfig(
        vocab_size=len(fast),
        **shape,
        max_position_embeddings=8192,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
        **({"layer_types": [("full_attention", "sliding_attention")[all_sliding or i % 2 == 0]
                            for i in range(layers)],
            "sliding_window": sliding_window} if sliding_window else {}),
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    fast.save_pretrained(path)
    return path


if __name__ == "__main__":  # a benchmark's model: python tests/tiny_model.py PATH [--sliding-window N] [--smollm2-shape]
    import argparse

    ap = argparse.ArgumentParser(description="build a random-weight Llama with a local tokenizer")
    ap.add_argument("path", type=Path)
    ap.add_argument("--sliding-window", type=int, default=None)
    ap.add_argument("--smollm2-shape", action="store_true", help="SmolLM2-135M's sizes (its compute per token)")
    args = ap.parse_args()
    sizes = dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                 num_key_value_heads=3) if args.smollm2_shape else {}
    print(build_tiny_model(args.path, sliding_window=args.sliding_window, **sizes))

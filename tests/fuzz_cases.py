"""Generated hostile requests for every endpoint: valid bodies of each API, mutated (fields of the wrong type or
out of range, fields removed, vLLM's extra fields that a client should not steer, oversized and deeply nested
values) and then, some of them, broken on the wire (truncated, invalid UTF-8, non-JSON, wrong content type).
Derandomized: case i of seed s is the same on every run. Mutating valid bodies reaches past the first validation
into rendering, tokenizing, sampling parameters and the engines, where random JSON alone rarely gets.
"""

from __future__ import annotations

import copy
import json
import random
from dataclasses import dataclass, field

TOOL = {"type": "function", "function": {"name": "read_file", "description": "Read a file",
                                         "parameters": {"type": "object", "properties": {"path": {"type": "string"}},
                                                        "required": ["path"]}}}
ANTHROPIC_TOOL = {"name": "read_file", "description": "Read a file",
                  "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}

# Valid bodies per endpoint (the tiny app's model is "tiny"); answers are kept to a few tokens.
SEEDS: dict[str, list[dict]] = {
    "/v1/chat/completions": [
        {"model": "tiny", "messages": [{"role": "user", "content": "hello there"}], "max_tokens": 3},
        {"model": "tiny", "max_tokens": 2, "temperature": 0, "stream": True,
         "stream_options": {"include_usage": True},
         "messages": [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "fix the test"}]},
        {"model": "tiny", "max_completion_tokens": 2, "tools": [TOOL], "tool_choice": "auto", "messages": [
            {"role": "user", "content": "read app.py"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "call_1", "type": "function",
                 "function": {"name": "read_file", "arguments": "{\"path\": \"app.py\"}"}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "print('hi')"}]},
        {"model": "tiny", "max_tokens": 2, "logprobs": True, "top_logprobs": 2, "n": 2, "seed": 3,
         "messages": [{"role": "user", "content": [{"type": "text", "text": "two answers"}]}]},
    ],
    "/v1/completions": [
        {"model": "tiny", "prompt": "def main():", "max_tokens": 3},
        {"model": "tiny", "prompt": [5, 17, 99, 3], "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 1},
        {"model": "tiny", "prompt": "stream this", "max_tokens": 2, "stream": True, "stop": ["\n"]},
    ],
    "/v1/messages": [
        {"model": "tiny", "max_tokens": 3, "messages": [{"role": "user", "content": "hello"}]},
        {"model": "tiny", "max_tokens": 2, "stream": True, "system": [{"type": "text", "text": "Be brief.",
                                                                        "cache_control": {"type": "ephemeral"}}],
         "messages": [{"role": "user", "content": [{"type": "text", "text": "list files"}]}]},
        {"model": "tiny", "max_tokens": 2, "tools": [ANTHROPIC_TOOL], "tool_choice": {"type": "auto"}, "messages": [
            {"role": "user", "content": "read app.py"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "read_file",
                                               "input": {"path": "app.py"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "x = 1"}]}]},
    ],
    "/v1/messages/count_tokens": [
        {"model": "tiny", "messages": [{"role": "user", "content": "count me"}], "tools": [ANTHROPIC_TOOL]},
    ],
    "/tokenize": [
        {"model": "tiny", "prompt": "tokenize me"},
        {"model": "tiny", "messages": [{"role": "user", "content": "and me"}], "tools": [TOOL]},
    ],
}
GETS = ["/v1/models", "/v1/kvpool/stats", "/health", "/v1/models?limit=-1", "/v1/nope", "/v1/kvpool/stats/../x"]

# Fields vLLM's protocol models accept that a client should not be able to turn into a server error or into
# another request's harm: connector parameters, cache salts, templates, structured outputs, priorities, ids.
EXTRA_FIELDS = ["kv_transfer_params", "cache_salt", "chat_template", "chat_template_kwargs", "structured_outputs",
                "response_format", "priority", "request_id", "logit_bias", "allowed_token_ids", "bad_words",
                "min_tokens", "prompt_logprobs", "truncate_prompt_tokens", "add_generation_prompt",
                "continue_final_message", "add_special_tokens", "documents", "vllm_xargs", "return_token_ids",
                "repetition_penalty", "top_k", "min_p", "length_penalty", "use_beam_search", "best_of",
                "skip_special_tokens", "include_stop_str_in_output", "mm_processor_kwargs", "thinking",
                "stop_sequences", "top_p", "parallel_tool_calls", "user", "metadata", "service_tier",
                "reasoning_effort", "prompt_embeds", "suffix", "data_parallel_rank", "echo"]


def _nested(depth: int) -> list:
    deep: list = []
    for _ in range(depth):
        deep = [deep]
    return deep


ODD_VALUES = (None, True, False, 0, -1, 1, 2**31, 2**63, -2**63, 10**40, 0.5, -0.0, 1e308, -1e308, "", "x" * 5000,
              "\ud800", "\x00\x01", "\U0001f642" * 50, [], {}, [None], [[]], {"": None}, {"type": "text"},
              [{"type": "text", "text": 5}], {"type": "json_schema", "json_schema": {"schema": {"type": "nope"}}},
              {"regex": "(a*)*b"}, {"json": {"type": "object", "properties": {"a": {"$ref": "#/x"}}}},
              {"grammar": "root ::= root"}, {"do_remote_decode": True, "remote_block_ids": [1, 2]},
              {"{% for": "x"}, "{{ raise_exception('boom') }}", "{% for i in range(10**9) %}x{% endfor %}",
              [10**9, -1])
NESTED_DEPTHS = (40, 400, 800)  # 800: near what json.loads takes on a server thread; deeper is refused at parse


def _odd_value(rng: random.Random):
    pick = rng.randrange(len(ODD_VALUES) + 4)
    if pick == len(ODD_VALUES) + 3:
        return _nested(rng.choice(NESTED_DEPTHS))  # made anew: too deep for copy.deepcopy
    if pick == len(ODD_VALUES):
        return [rng.randrange(-5, 600) for _ in range(rng.randrange(0, 30))]
    if pick == len(ODD_VALUES) + 1:
        return rng.random() * 10 ** rng.randrange(-3, 6)
    if pick == len(ODD_VALUES) + 2:
        return rng.randrange(-2**20, 2**20)
    return copy.deepcopy(ODD_VALUES[pick])


def _paths(value, depth: int = 0):
    """Every (container, key) under a body, depth first, down to 20 levels (a deeply nested value is one spot)."""
    if depth > 20:
        return
    if isinstance(value, dict):
        for k, v in value.items():
            yield value, k
            yield from _paths(v, depth + 1)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield value, i
            yield from _paths(v, depth + 1)


def _mutate(body: dict, rng: random.Random) -> None:
    for _ in range(rng.choice([1, 1, 2, 3])):
        op = rng.random()
        spots = list(_paths(body))
        if op < 0.45 and spots:  # a value of the wrong type or out of range, anywhere
            container, key = rng.choice(spots)
            container[key] = _odd_value(rng)
        elif op < 0.6 and spots:  # a field or element removed
            container, key = rng.choice(spots)
            del container[key]
        elif op < 0.85:  # a field vLLM knows, with an odd value
            body[rng.choice(EXTRA_FIELDS)] = _odd_value(rng)
        elif op < 0.95 and spots:  # a list or string made long (under 1 MiB: 10,000 cases stay quick)
            container, key = rng.choice(spots)
            v = container[key]
            long = (v * 300)[:20000] if isinstance(v, (list, str)) else [v] * 300
            if len(json.dumps(long)) < 1 << 20:
                container[key] = long
        else:  # an unknown field
            body[rng.choice(["foo", "Model", "messages ", "__proto__", ""])] = 1


def _break_wire(raw: bytes, rng: random.Random) -> bytes:
    op = rng.randrange(7)
    if op == 0:
        return raw[:rng.randrange(len(raw) + 1)]
    if op == 1:
        i = rng.randrange(len(raw) + 1)
        return raw[:i] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\x00"]) + raw[i:]
    if op == 2:
        return rng.randbytes(rng.randrange(0, 64))
    if op == 3:
        return b"[" * 100_000 + b"]" * 100_000
    if op == 4:
        return rng.choice([b"", b"null", b"[]", b"1e999999", b"NaN", b"\"x\"", b"{\"model\": NaN}"])
    if op == 5:
        return b"\xef\xbb\xbf" + raw  # a byte-order mark
    return raw.replace(b"}", b",}", 1)


@dataclass
class Case:
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"content-type": "application/json"})
    stream: bool = False


def cases(n: int, seed: int = 0) -> list[Case]:
    """n cases spread over every endpoint, the same list for the same (n, seed)."""
    rng = random.Random(seed)
    posts = sorted(SEEDS)
    out = []
    for i in range(n):
        if i % 25 == 24:
            out.append(Case("GET", rng.choice(GETS)))
            continue
        path = posts[i % len(posts)]
        body = copy.deepcopy(rng.choice(SEEDS[path]))
        _mutate(body, rng)
        raw = json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if rng.random() < 0.1:
            raw = _break_wire(raw, rng)
        if rng.random() < 0.03:
            headers = rng.choice([{"content-type": "text/plain"}, {}, {"content-encoding": "gzip"},
                                  {"content-type": "application/json", "authorization": "Basic Zm9vOmJhcg=="}])
        out.append(Case("POST", path, raw, headers, stream=isinstance(body, dict) and body.get("stream") is True))
    return out

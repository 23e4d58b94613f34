"""Coding agents over real HTTP with the official clients: tools in, tool calls out (vLLM's `hermes` parser), the tool
result sent back, the next turn a cache hit; the Anthropic Messages API with tools and streaming; rendering parity
with vLLM's own engine, tools included.

The tiny test model has random weights, so its tool call is forced with vLLM's structured outputs (a regex that
admits exactly one call): what is tested is everything around the model, which is what this project owns.
"""

import json
import re
import time

import anthropic
import openai
import pytest

from conftest import TEST_BLOCK, close, in_process_llm

READ_FILE = {"type": "function", "function": {
    "name": "read_file", "description": "Read a file of the repository",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}, "required": ["path"]}}}
RUN_TESTS = {"type": "function", "function": {
    "name": "run_tests", "description": "Run the test suite",
    "parameters": {"type": "object", "properties": {"pattern": {"type": "string"}}}}}
TOOLS = [READ_FILE, RUN_TESTS]
SYSTEM = "You are a coding agent. Use the tools to inspect the repository before you answer. " * 6


def _forced(*calls: dict) -> dict:
    """extra_body making the model write exactly these tool calls in its (Hermes) format."""
    text = "\n".join(f"<tool_call>\n{json.dumps(c)}\n</tool_call>" for c in calls)
    return {"structured_outputs": {"regex": re.escape(text)}}


@pytest.fixture(scope="module")
def client(tiny_app):
    return openai.OpenAI(base_url=f"{tiny_app[0]}/v1", api_key="unused", max_retries=0)


def test_agent_loop_with_tools(client):
    """Turn 1: the model calls read_file; the client runs it and sends the result; turn 2's prompt (turn 1's plus the
    call and its result) is served from cache."""
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Why does test_api fail?"}]
    call = {"name": "read_file", "arguments": {"path": "tests/test_api.py"}}
    first = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=256,
                                           temperature=0, extra_body=_forced(call))
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls" and not choice.message.content
    (tool_call,) = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.function.name == "read_file"
    assert json.loads(tool_call.function.arguments) == call["arguments"]

    messages += [choice.message.model_dump(exclude_none=True),
                 {"role": "tool", "tool_call_id": tool_call.id, "content": "def test_chat(): assert False\n" * 4}]
    second = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=4,
                                            temperature=0)
    assert second.usage.prompt_tokens > first.usage.prompt_tokens
    # Every full block of turn 1's prompt is a prefix of turn 2's (the template renders history identically).
    assert second.usage.prompt_tokens_details.cached_tokens >= first.usage.prompt_tokens // TEST_BLOCK * TEST_BLOCK


def test_parallel_tool_calls_streamed(client):
    calls = [{"name": "read_file", "arguments": {"path": "app/ingress.py"}},
             {"name": "run_tests", "arguments": {"pattern": "test_agents"}}]
    kw = dict(model="tiny", messages=[{"role": "user", "content": "Read the ingress and run the agent tests."}],
              tools=TOOLS, max_tokens=400, temperature=0, extra_body=_forced(*calls))
    full = client.chat.completions.create(**kw).choices[0]
    assert full.finish_reason == "tool_calls"
    assert [(c.function.name, json.loads(c.function.arguments)) for c in full.message.tool_calls] == \
        [(c["name"], c["arguments"]) for c in calls]

    streamed: dict[int, dict] = {}
    finish = None
    for chunk in client.chat.completions.create(stream=True, **kw):
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for d in choice.delta.tool_calls or []:
                s = streamed.setdefault(d.index, {"id": None, "name": "", "arguments": ""})
                s["id"] = s["id"] or d.id
                s["name"] += d.function.name or ""
                s["arguments"] += d.function.arguments or ""
    assert finish == "tool_calls"
    assert [(s["name"], json.loads(s["arguments"])) for _, s in sorted(streamed.items())] == \
        [(c["name"], c["arguments"]) for c in calls]
    assert all(s["id"] for s in streamed.values())


def test_tool_definitions_reach_the_prompt(client):
    """Tools are rendered by the chat template, not dropped: the same conversation is longer with them."""
    messages = [{"role": "user", "content": "hello"}]
    bare = client.chat.completions.create(model="tiny", messages=messages, max_tokens=1, temperature=0)
    tooled = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS, max_tokens=1,
                                            temperature=0)
    assert tooled.usage.prompt_tokens > bare.usage.prompt_tokens + 40


def test_rendering_parity_with_vllm_tools_included(tiny_app, tiny_model_dir):
    """The ingress's token ids (its /tokenize, vLLM's route over the same renderer the endpoints use) equal what vLLM's
    own engine computes for the same conversation and tools."""
    import httpx
    from vllm import SamplingParams

    conversations = [
        ([{"role": "user", "content": "What is in app/?"}], None),
        ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Fix the bug."}], TOOLS),
        ([{"role": "user", "content": "Fix the bug."},
          {"role": "assistant", "content": None, "tool_calls": [
              {"id": "call_1", "type": "function",
               "function": {"name": "read_file", "arguments": json.dumps({"path": "a.py"})}},
              {"id": "call_2", "type": "function", "function": {"name": "run_tests", "arguments": "{}"}}]},
          {"role": "tool", "tool_call_id": "call_1", "content": "x = 1"},
          {"role": "tool", "tool_call_id": "call_2", "content": "1 failed"},
          {"role": "user", "content": "naïve café 😀 and go on"}], TOOLS),
    ]
    # An agent session's turns, each the whole history so far (longer than a reused prefix's minimum): the
    # ingress tokenizes each by reusing the previous turn's tokens (kvpool.prefix_tokens), still exactly.
    history = [{"role": "system", "content": SYSTEM * 7}, {"role": "user", "content": "Fix the bug."}]
    for turn in range(3):
        history = history + [
            {"role": "assistant", "content": None, "tool_calls": [{"id": f"call_{turn}", "type": "function", "function": {
                "name": "read_file", "arguments": json.dumps({"path": f"app/{turn}.py"})}}]},
            {"role": "tool", "tool_call_id": f"call_{turn}", "content": f"  def f{turn}():\n\treturn {turn}  \n"}]
        conversations.append((history, TOOLS))
    before = httpx.get(f"{tiny_app[0]}/v1/kvpool/stats", timeout=30).json()["prompt_tokens"]
    ingress = []
    for messages, tools in conversations:
        r = httpx.post(f"{tiny_app[0]}/tokenize", timeout=60,
                       json={"model": "tiny", "messages": messages, **({"tools": tools} if tools else {})})
        assert r.status_code == 200, r.text
        ingress.append(r.json()["tokens"])
    after = httpx.get(f"{tiny_app[0]}/v1/kvpool/stats", timeout=30).json()["prompt_tokens"]
    assert after["off"] is None and after["reused"] - before["reused"] >= 2, (before, after)
    llm = in_process_llm(model=str(tiny_model_dir), block_size=32, kv_cache_memory_bytes=64 << 20, enforce_eager=True,
                         max_model_len=4096)
    try:
        for (messages, tools), ids in zip(conversations, ingress):
            (out,) = llm.chat(messages, SamplingParams(max_tokens=1), tools=tools, use_tqdm=False)
            assert ids == list(out.prompt_token_ids)
    finally:
        close(llm)


@pytest.fixture(scope="module")
def claude(tiny_app):
    return anthropic.Anthropic(base_url=tiny_app[0], api_key="unused", max_retries=0)


ANTHROPIC_TOOLS = [{"name": t["function"]["name"], "description": t["function"]["description"],
                    "input_schema": t["function"]["parameters"]} for t in TOOLS]


def _tool_round(user: str) -> list[dict]:
    """A Claude Code-style history: the assistant used a tool, the user returned its result."""
    return [{"role": "user", "content": user},
            {"role": "assistant", "content": [
                {"type": "text", "text": "Let me look."},
                {"type": "tool_use", "id": "toolu_1", "name": "read_file", "input": {"path": "app/ingress.py"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "class OpenAIIngress: ...\n" * 8}]}]


def test_anthropic_messages_with_tools(claude):
    system = [{"type": "text", "text": SYSTEM}]
    first = claude.messages.create(model="tiny", max_tokens=8, system=system, tools=ANTHROPIC_TOOLS,
                                   messages=_tool_round("Explain the request path."), extra_body={"temperature": 0})
    assert first.type == "message" and first.role == "assistant" and first.stop_reason == "max_tokens"
    assert first.content and first.content[0].type == "text"
    assert first.usage.output_tokens == 8
    again = claude.messages.create(model="tiny", max_tokens=8, system=system, tools=ANTHROPIC_TOOLS,
                                   messages=_tool_round("Explain the request path.") + [
                                       {"role": "assistant", "content": first.content[0].text},
                                       {"role": "user", "content": "And the router?"}],
                                   extra_body={"temperature": 0})
    # Anthropic's accounting: input_tokens are the uncached ones, cache_read_input_tokens the cached. The first
    # prompt is a prefix of the second, so its full blocks are cache hits.
    first_prompt = first.usage.input_tokens + (first.usage.cache_read_input_tokens or 0)
    assert again.usage.cache_read_input_tokens >= first_prompt // TEST_BLOCK * TEST_BLOCK > 0


def test_anthropic_streaming_equals_non_streaming(claude):
    kw = dict(model="tiny", max_tokens=12, tools=ANTHROPIC_TOOLS, messages=_tool_round("Summarise the file."),
              extra_body={"temperature": 0})  # this SDK has no temperature argument; the API has
    full = claude.messages.create(**kw)
    events = []
    with claude.messages.stream(**kw) as stream:
        for event in stream:
            events.append(event.type)
        final = stream.get_final_message()
    assert events[0] == "message_start" and events[-1] == "message_stop" and "content_block_delta" in events
    assert final.content[0].text == full.content[0].text and final.stop_reason == full.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 12


def test_anthropic_bad_input_gets_an_anthropic_error(claude):
    with pytest.raises(anthropic.BadRequestError) as e:
        claude.messages.create(model="tiny", max_tokens=4, messages=[{"role": "user", "content": "x"}],
                               extra_body={"cache_policy": "forever"})
    assert e.value.body["type"] == "error" and "cache_policy" in e.value.body["error"]["message"]
    with pytest.raises(anthropic.NotFoundError):
        claude.messages.create(model="claude-opus", max_tokens=4, messages=[{"role": "user", "content": "x"}])


def _pooled(cfg) -> dict[str, bool]:
    """Every block file in the app's pool (host and disk tiers, all layouts): key -> written or used as a live
    session's."""
    from pathlib import Path

    from kvpool.pool_store import PoolStore

    dirs = cfg.pool_dirs("tiny")
    layouts = {p.name for root in dirs if Path(root).is_dir() for p in Path(root).iterdir() if p.is_dir()}
    return {f.key: f.reused for layout in layouts for f in PoolStore(*dirs, layout).scan()}


def test_cache_control_keeps_the_prompt_pooled_as_a_live_session(tiny_app, claude):
    """Claude Code marks its prefix with cache_control: those blocks are pooled as a live session's (evicted after
    idle sessions and one-off prompts), where an unmarked one-off prompt's blocks are the first to go."""
    _, cfg = tiny_app

    def ask(text: str, marked: bool) -> set[str]:
        before = _pooled(cfg)
        block = {"type": "text", "text": text, **({"cache_control": {"type": "ephemeral"}} if marked else {})}
        kw = dict(model="tiny", system=[block], messages=[{"role": "user", "content": "Go on."}])
        full_blocks = claude.messages.count_tokens(**kw).input_tokens // TEST_BLOCK
        r = claude.messages.create(max_tokens=8, extra_body={"temperature": 0}, **kw)
        assert r.usage.output_tokens == 8
        deadline = time.time() + 60  # the connector writes blocks from a thread of its own: wait until they are in
        while len(new := set(_pooled(cfg)) - set(before)) < full_blocks - 1 and time.time() < deadline:
            time.sleep(0.2)
        assert len(new) >= full_blocks - 1 > 2, (len(new), full_blocks, r.usage)
        return new

    one_off = ask("A one-off question about tomatoes. " * 30, marked=False)
    marked = ask("The agent's standing instructions: read the code before changing it. " * 30, marked=True)
    pooled = _pooled(cfg)
    assert not any(pooled[k] for k in one_off if k in pooled)
    assert all(pooled[k] for k in marked if k in pooled)

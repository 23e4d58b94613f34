"""The trace readers, token-id scaling and the infinite-cache bound on the real shared traces, and the replay plots.

Small samples of ../shared/traces: the file runs in seconds, without Ray or engines (chat traces are fitted with a
model's tokenizer: the embedded SmolLM2's, and the tiny test model's, which has a 512-token vocabulary).
"""

from pathlib import Path

import numpy as np
import pytest

from kvpool.bench.plots import plot_summaries, plot_turns
from kvpool.bench.replay import Bound, Record, load_sessions, summarize
from kvpool.prompt import PromptRenderer
from kvpool.traces import (BLOCK_TOKENS, FIRST_TOKEN_ID, MIN_BLOCK_TOKENS, Session, detect_format, fit_tokens,
                           read_sessions, scaled_tokens, tokens_per_block)

TRACES = Path(__file__).resolve().parents[2] / "shared" / "traces"
AIPERF = TRACES / "aiperf-agentic" / "dataset.jsonl"
MOONCAKE = TRACES / "mooncake" / "conversation_trace.jsonl"
KV_CACHE_TESTER = TRACES / "kv-cache-tester"
VOCAB = 49152


def sample(path: Path, sessions: int, turns: int) -> list[Session]:
    return [Session(s.name, s.turns[:turns]) for s in read_sessions(path, clients=sessions)[:sessions]]


def assert_prefix_chains(sessions: list[Session]) -> None:
    for s in sessions:
        for a, b in zip(s.turns, s.turns[1:]):
            assert b.prompt_ids[: len(a.prompt_ids)] == a.prompt_ids, s.name


@pytest.mark.parametrize("path, fmt", [
    (TRACES / "claude-code", "claude-code"),
    (TRACES / "swe-agent", "swe-agent"),
    (next((TRACES / "swe-agent").glob("*.traj")), "swe-agent"),
    (TRACES / "aiperf-agentic", "aiperf"),
    (AIPERF, "aiperf"),
    (TRACES / "mooncake", "mooncake"),
    (TRACES / "mooncake" / "synthetic_trace.jsonl", "mooncake"),
    (KV_CACHE_TESTER, "kv-cache-tester"),
    (KV_CACHE_TESTER / "trace_0003.json.gz", "kv-cache-tester"),
    (Path("/somewhere/else"), "claude-code"),
])
def test_format_is_detected_from_the_path(path, fmt):
    assert detect_format(path) == fmt


@pytest.mark.parametrize("path", [TRACES / "claude-code", TRACES / "swe-agent", AIPERF, MOONCAKE, KV_CACHE_TESTER])
def test_every_reader_yields_sessions_with_turns(path):
    sessions = read_sessions(path, clients=4)
    assert sessions and all(s.turns for s in sessions)
    for t in (t for s in sessions for t in s.turns):
        assert t.max_tokens > 0 and t.think_s >= 0
        if t.blocks is None:  # a chat request stops before the answer it asks for
            assert t.messages and t.messages[-1]["role"] != "assistant"
            assert all(m["role"] in ("system", "user", "assistant") and m["content"] for m in t.messages)
        else:
            assert not t.messages and t.blocks and all(0 < n <= BLOCK_TOKENS for _, n in t.blocks)


def test_swe_agent_turns_grow_by_appending():
    for s in read_sessions(TRACES / "swe-agent"):
        for a, b in zip(s.turns, s.turns[1:]):
            assert b.messages[: len(a.messages)] == a.messages


def test_mooncake_requests_are_dealt_round_robin():
    lines = MOONCAKE.read_text().splitlines()
    sessions = read_sessions(MOONCAKE, clients=5)
    assert len(sessions) == 5 and sum(len(s.turns) for s in sessions) == len(lines)
    assert [len(s.turns) for s in sessions] == [len(range(c, len(lines), 5)) for c in range(5)]


def test_aiperf_prompts_are_exact_prefix_chains():
    sessions = fit_tokens(sample(AIPERF, 6, 8), 8000, VOCAB)
    assert len(sessions) == 6
    assert_prefix_chains(sessions)
    assert all(len(a.prompt_ids) < len(b.prompt_ids) for s in sessions for a, b in zip(s.turns, s.turns[1:]))
    ids = np.concatenate([t.prompt_ids for s in sessions for t in s.turns])
    assert ids.min() >= FIRST_TOKEN_ID and ids.max() < VOCAB


@pytest.mark.parametrize("path", [AIPERF, MOONCAKE])
def test_equal_hash_ids_give_equal_tokens_across_sessions(path):
    raw = sample(path, 6, 6)
    max_tokens = max(sum(n for _, n in t.blocks) for s in raw for t in s.turns) // 3  # scaled, nothing cut
    per_block = tokens_per_block(raw, max_tokens)
    sessions = fit_tokens(raw, max_tokens, VOCAB)
    tokens_of: dict[object, list[int]] = {}  # the longest piece seen per key
    sessions_of: dict[object, set[str]] = {}
    for s in sessions:
        for t in s.turns:
            lengths = [scaled_tokens(n, per_block) for _, n in t.blocks]
            assert sum(lengths) == len(t.prompt_ids)
            start = 0
            for (key, _), n in zip(t.blocks, lengths):
                piece, seen = t.prompt_ids[start:start + n], tokens_of.get(key, [])
                short, long = sorted((piece, seen), key=len)
                assert long[: len(short)] == short, key  # a partial block is the start of the full one
                tokens_of[key] = long
                sessions_of.setdefault(key, set()).add(s.name)
                start += n
    assert any(len(names) > 1 for names in sessions_of.values())  # the sample does share blocks across sessions
    firsts = {tuple(ids[:8]) for ids in tokens_of.values() if len(ids) >= 8}
    assert len(firsts) == sum(len(ids) >= 8 for ids in tokens_of.values())  # distinct keys differ


def test_scaling_fits_max_context_and_keeps_prefixes():
    raw = sample(AIPERF, 6, 8)
    trace_lengths = [sum(n for _, n in t.blocks) for s in raw for t in s.turns]
    assert tokens_per_block(raw, max(trace_lengths)) == BLOCK_TOKENS  # what fits is not scaled
    unscaled = fit_tokens(raw, max(trace_lengths), VOCAB)
    assert [len(t.prompt_ids) for s in unscaled for t in s.turns] == trace_lengths
    per_block = tokens_per_block(raw, 8000)
    assert MIN_BLOCK_TOKENS < per_block < BLOCK_TOKENS
    # the largest scale that fits
    assert max(sum(scaled_tokens(n, per_block + 1) for _, n in t.blocks) for s in raw for t in s.turns) > 8000
    scaled = fit_tokens(raw, 8000, VOCAB)
    lengths = [len(t.prompt_ids) for s in scaled for t in s.turns]
    assert max(lengths) <= 8000 and lengths == [sum(scaled_tokens(n, per_block) for _, n in t.blocks)
                                                for s in raw for t in s.turns]  # nothing cut
    assert_prefix_chains(scaled)


def test_prompts_too_long_at_the_smallest_scale_are_cut():
    raw = sample(AIPERF, 6, 8)
    longest = max(len(t.blocks) for s in raw for t in s.turns)  # one token per hash block at the smallest scale
    assert tokens_per_block(raw, longest - 1) == MIN_BLOCK_TOKENS
    with pytest.warns(UserWarning, match=f"cut to {longest - 1} tokens"):
        sessions = fit_tokens(raw, longest - 1, VOCAB)
    lengths = [len(t.prompt_ids) for s in sessions for t in s.turns]
    assert len(lengths) == sum(len(s.turns) for s in raw) and max(lengths) == longest - 1
    assert_prefix_chains(sessions)


def test_kv_cache_tester_conversations_scale_into_a_small_context():
    """Real Claude Code conversations of ~100K tokens, shrunk to 4K: every request still a prefix-sharing
    extension of its session's previous one, subagents sessions of their own, and the reuse near the trace's."""
    sessions = load_sessions(KV_CACHE_TESTER, 16, 4096, 64, trace_format="kv-cache-tester")
    assert len(sessions) == 16 and any("/agent" in s.name for s in sessions)
    assert all(len(t.prompt_ids) <= 4096 - 64 for s in sessions for t in s.turns)
    bound = Bound(32)
    turns = [t for s in sessions for t in s.turns]
    cached = sum(bound.observe(t.prompt_ids) for t in turns)
    assert cached / sum(len(t.prompt_ids) for t in turns) > 0.85  # the full traces' bound is 96%


@pytest.fixture(scope="module")
def smollm2() -> PromptRenderer:
    from kvpool.model import resolve_model

    return PromptRenderer.from_pretrained(resolve_model(""))


def test_load_sessions_fits_each_format(smollm2):
    for path in (TRACES / "claude-code", TRACES / "swe-agent", AIPERF, MOONCAKE):
        sessions = load_sessions(path, 3, 2000, 16, smollm2, max_turns=4)
        assert 0 < len(sessions) <= 3 and all(0 < len(s.turns) <= 4 for s in sessions)
        for t in (t for s in sessions for t in s.turns):
            assert len(smollm2.chat(t.messages) if t.prompt_ids is None else t.prompt_ids) <= 2000 - 16


def test_chat_sessions_fit_and_fill_the_context_on_the_models_own_tokens(smollm2, tiny_model_dir):
    """The tiny model's tokenizer takes ~1.5 characters a token, SmolLM2's ~3.5: with each, every request renders
    within the context, a cut session's longest fills most of it, and every request is still a prefix of its
    session's next."""
    tiny = PromptRenderer.from_pretrained(str(tiny_model_dir))
    as_read = {s.name: s.turns[:12] for s in read_sessions(TRACES / "claude-code", clients=4)}
    for renderer in (tiny, smollm2):
        for s in load_sessions(TRACES / "claude-code", 4, 2048, 64, renderer, max_turns=12):
            longest = max(len(renderer.chat(t.messages)) for t in s.turns)
            assert longest <= 2048 - 64, s.name
            if [t.messages for t in s.turns] != [t.messages for t in as_read[s.name]]:
                assert longest >= 0.9 * (2048 - 64), s.name
            for a, b in zip(s.turns, s.turns[1:]):
                assert [m["content"] for m in b.messages[: len(a.messages)]] == [m["content"] for m in a.messages]


def test_a_session_whose_template_takes_most_of_the_context_still_fits():
    """300 messages at 12 template tokens each take 3,900 of 4,000 tokens whatever their text: the search, which
    scaled the whole count with the kept characters, ran out of tries and called such a session unfittable."""
    from kvpool.traces import Turn, fit_chat

    def count(messages):  # a tokenizer's shape: tokens per message, then 3 characters a token
        return sum(12 + -(-len(m["content"]) // 3) for m in messages)

    messages = [{"role": "user", "content": "x" * 400} for _ in range(300)]
    session = Session("s", [Turn(messages[:k], 8) for k in (100, 200, 300)])
    fitted = fit_chat(session, 4000, count)
    assert max(count(t.messages) for t in fitted.turns) <= 4000
    with pytest.raises(ValueError, match="takes 3900 tokens even cut to one character a message"):
        fit_chat(session, 3899, count)
    assert fit_chat(Session("empty", []), 10, count).turns == []


def test_a_chat_trace_without_the_models_tokenizer_is_refused():
    with pytest.raises(ValueError, match="needs the model's tokenizer"):
        load_sessions(TRACES / "claude-code", 2, 2000, 16)


def test_more_sessions_than_the_trace_are_distinct_agents(smollm2):
    sessions = load_sessions(TRACES / "swe-agent", 24, 2000, 16, smollm2, max_turns=2)
    copy = sessions[23]
    assert copy.name.endswith("#23") and copy.turns[0].messages[0]["content"].startswith("[agent 23] ")
    assert len(smollm2.chat(copy.turns[-1].messages)) <= 2000 - 16


def test_bound_on_an_aiperf_sample_is_high():
    sessions = load_sessions(AIPERF, 8, 4096, 64, max_turns=8)
    bound = Bound(32)
    cached = sum(bound.observe(t.prompt_ids) for s in sessions for t in s.turns)
    assert cached / sum(len(t.prompt_ids) for s in sessions for t in s.turns) > 0.5


def records(name: str, ttft: float) -> list[Record]:
    return [Record(name, turn, sent_at=turn, prompt_tokens=1000, cached_tokens=min(1000, 300 * turn),
                   completion_tokens=16, bound_tokens=min(1000, 320 * turn), ttft_s=ttft / (turn + 1),
                   latency_s=ttft + 0.5) for turn in range(5) for _ in range(3)]


def test_plots_write_png_files(tmp_path):
    out = tmp_path / "run.json"
    runs = {"no-cache": records("a", 2.0), "kvpool": records("b", 0.5)}
    runs["kvpool"].append(Record("b", 5, 9.0, error="HTTP 500"))  # failed requests are left out of the curves
    results = {name: summarize(recs, 10.0) for name, recs in runs.items()} | {"broken": {"error": "boom"},
                                                                              "cuda": {"skipped": "needs CUDA"}}
    for path in (plot_turns(runs, out), plot_summaries(results, out)):
        assert path.parent == tmp_path and path.name.startswith("run-") and path.suffix == ".png"
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 1000


def test_a_summary_says_what_failed():
    recs = records("a", 1.0) + [Record("a", 9, 1.0, error="HTTP 400: too long")] * 2 + [Record("a", 9, 1.0, error="x")]
    summary = summarize(recs, 10.0)
    assert summary["errors"] == 3 and summary["error_texts"] == {"HTTP 400: too long": 2, "x": 1}
    assert summarize(records("a", 1.0), 10.0)["error_texts"] == {}


def test_bound_counts_every_block_an_earlier_prompt_computed():
    """An engine computes (and caches) every full block of a prompt, the one holding its last token included, though
    it never serves a whole prompt from cache: a bound that forgot that block sat below measured hit rates."""
    bound = Bound(4)
    assert bound.observe(list(range(8))) == 0  # 2 full blocks, computed
    assert bound.observe(list(range(10))) == 8  # both served
    assert bound.observe(list(range(10))) == 8  # never the whole prompt: its last token is computed
    bound.completed(list(range(10)) + [7, 7, 7, 7, 7])  # the answer's tokens are computed and cached too
    assert bound.observe(list(range(10)) + [7, 7, 7, 7, 7, 1]) == 12

"""Fuzzing the HTTP API against the real app: whatever a client sends, the answer is never a 5xx (nor an error of
the server's inside a 200 stream), an error is a JSON body in the API's own style, the server keeps serving,
a good request sent among the bad ones gets the answer it gets alone, and no request is left counted in a replica's
queue. Two generators: hypothesis's random JSON per API, and 10,000 mutated valid requests over every endpoint
(tests/fuzz_cases.py), sent 8 at a time."""

import json
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from test_routing import stats

JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
                    | st.text(max_size=40), lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)
ANY_INT = st.integers(min_value=-2**40, max_value=2**40)
SAMPLING = {"max_tokens": st.integers(-3, 4) | ANY_INT, "temperature": st.floats(-1, 3) | JSON,
            "top_p": st.floats(-1, 2) | JSON, "n": st.integers(0, 3), "stream": st.booleans() | JSON,
            "stop": st.text(max_size=5) | st.lists(st.text(max_size=5), max_size=3) | JSON,
            "seed": ANY_INT | JSON, "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}) | JSON,
            "presence_penalty": st.floats(-3, 3), "ignore_eos": st.booleans() | JSON,
            "logprobs": st.booleans() | st.integers(-1, 6) | JSON, "top_logprobs": st.integers(-1, 21) | JSON,
            "return_tokens_as_token_ids": st.booleans() | JSON}
MESSAGE = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "tool", "developer", "bot"]),
                                 "content": st.text(max_size=60) | st.none()
                                 | st.lists(st.fixed_dictionaries({"type": st.just("text"),
                                                                   "text": st.text(max_size=30)}), max_size=2)
                                 | JSON})
CHAT = st.fixed_dictionaries({"model": st.sampled_from(["tiny", "other"]) | JSON,
                              "messages": st.lists(MESSAGE, max_size=3) | JSON},
                             optional={**SAMPLING, "max_completion_tokens": st.integers(-2, 4) | JSON})
COMPLETION = st.fixed_dictionaries({"model": st.sampled_from(["tiny", "other"]) | JSON,
                                    "prompt": st.text(max_size=80) | st.lists(st.integers(-5, 500), max_size=20)
                                    | st.lists(st.text(max_size=10), max_size=2) | JSON},
                                   optional={**SAMPLING, "echo": st.booleans()})
BODY = (st.tuples(st.just("/v1/chat/completions"), CHAT | JSON)
        | st.tuples(st.just("/v1/completions"), COMPLETION | JSON))


@settings(max_examples=120, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(case=BODY, raw=st.booleans(), garbage=st.binary(max_size=30))
def test_no_input_makes_a_5xx(tiny_app, case, raw, garbage):
    url, _ = tiny_app
    path, body = case
    if isinstance(body, dict) and isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 4:
        body["max_tokens"] = 4  # keep the valid ones quick
    content = garbage if raw else json.dumps(body).encode()
    r = httpx.post(url + path, content=content, headers={"content-type": "application/json"}, timeout=120)
    assert r.status_code < 500, (body, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert "message" in r.json()["error"]


CANARY = {"model": "tiny", "prompt": "the canary checks that bad requests harm no other " * 4, "max_tokens": 8,
          "temperature": 0, "logprobs": 1}


def _server_errors_in_stream(text: str) -> list:
    """Error events of the server's own (a 5xx code, or Anthropic's server-side error types) in a 200 stream."""
    found = []
    for line in text.splitlines():
        if not line.startswith("data:") or line.strip() == "data: [DONE]":
            continue
        try:
            event = json.loads(line[5:])
        except ValueError:
            found.append(line[:200])
            continue
        err = event.get("error") if isinstance(event, dict) else None
        # OpenAI's error chunk carries a code; Anthropic's error event a type (vLLM's own: internal_error).
        if isinstance(err, dict) and ((err.get("code") or 0) >= 500
                                      or err.get("type") in ("api_error", "internal_error", "overloaded_error")):
            found.append(err)
    return found


def test_ten_thousand_mutated_requests_over_every_endpoint(tiny_app):
    from fuzz_cases import cases

    url, _ = tiny_app
    all_cases = cases(10_000, seed=0)
    with httpx.Client(base_url=url, timeout=120) as http:
        reference = http.post("/v1/completions", json=CANARY).json()["choices"][0]

        def send(i: int):
            if i % 500 == 499:  # a good request among the bad ones gets the answer it gets alone
                r = http.post("/v1/completions", json=CANARY)
                assert r.status_code == 200, r.text
                return ("canary", r.json()["choices"][0]["text"])
            case = all_cases[i]
            r = http.request(case.method, case.path, content=case.body or None, headers=case.headers)
            text = r.text
            if r.status_code >= 500:
                return ("5xx", case.path, r.status_code, case.body[:300], text[:300])
            if r.status_code >= 400:
                body = r.json()  # JSON, in the API's own style
                anthropic = case.path.startswith("/v1/messages")
                ok = body.get("type") == "error" and "message" in body["error"] if anthropic \
                    else "message" in body["error"]
                return ("ok",) if ok else ("bad error body", case.path, text[:300])
            if "text/event-stream" in r.headers.get("content-type", ""):
                errors = _server_errors_in_stream(text)
                if errors:
                    return ("error in stream", case.path, case.body[:300], errors[:2])
            return ("ok",)

        start = time.monotonic()
        with ThreadPoolExecutor(8) as workers:
            results = list(workers.map(send, range(len(all_cases))))
        elapsed = time.monotonic() - start
    failures = [r for r in results if r[0] not in ("ok", "canary")]
    kinds = Counter((r[0], r[1], str(r[-1])[:120]) for r in failures)  # one line per kind of failure
    assert not failures, "\n".join(f"{n} x {kind}" for kind, n in kinds.most_common()) + f"\n{failures[:3]}"
    canaries = {r[1] for r in results if r[0] == "canary"}
    assert canaries == {reference["text"]}, canaries
    print(f"{len(all_cases)} cases in {elapsed:.0f} s")


def test_after_fuzzing_nothing_is_stuck(tiny_app):
    url, _ = tiny_app
    r = httpx.post(f"{url}/v1/completions", timeout=60, json={"model": "tiny", "prompt": "still fine", "max_tokens": 2})
    assert r.status_code == 200
    deadline = time.time() + 10
    while any(s["running"] or s["queued_prefill_tokens"] for s in stats(url)["replicas"].values() if s["live"]):
        assert time.time() < deadline, stats(url)["replicas"]
        time.sleep(0.2)

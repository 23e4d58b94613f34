"""The verification's comparison: a response that departs from the no-cache reference is caught, and where."""

import pytest

from kvpool.bench.replay import Record
from kvpool.bench.verify import LOGPROB_TOLERANCE, Answer, check, first_difference

REFERENCE = Answer([5, 7, 9], [-0.5, -1.0, -2.0])


def test_a_response_within_the_tolerance_matches():
    assert first_difference(REFERENCE, [5, 7, 9], [-0.5, -1.0 + LOGPROB_TOLERANCE / 2, -2.0]) is None


def test_a_different_token_is_a_mismatch_at_its_position():
    assert first_difference(REFERENCE, [5, 8, 9], [-0.5, -1.0, -2.0]) == {
        "position": 1, "expected_token": 7, "got_token": 8}


def test_a_logprob_past_the_tolerance_is_a_mismatch():
    assert first_difference(REFERENCE, [5, 7, 9], [-0.5, -1.0, -2.0 - 2 * LOGPROB_TOLERANCE]) == {
        "position": 2, "token": 9, "expected_logprob": -2.0, "got_logprob": -2.0 - 2 * LOGPROB_TOLERANCE}


def test_a_shorter_answer_is_a_mismatch_where_it_stops():
    assert first_difference(REFERENCE, [5, 7], [-0.5, -1.0]) == {"position": 2, "expected_token": 9,
                                                                 "got_token": None}


def test_check_counts_every_answered_request_and_describes_mismatches():
    def record(turn: int, output_ids: list[int], logprobs: list[float], error: str | None = None) -> Record:
        return Record("s", turn, 0.0, cached_tokens=64, latency_s=1.0, error=error, max_tokens=3, route_reason="pool",
                      prompt_ids=[1, 2, 3], output_ids=output_ids, logprobs=logprobs)

    records = [record(0, [5, 7, 9], [-0.5, -1.0002, -2.0]),
               record(1, [5, 7, 4], [-0.5, -1.0, -3.0]),
               record(2, [], [], error="HTTP 500")]
    summary = check(records, {((1, 2, 3), 3): REFERENCE})
    assert summary["verified"] == 2 and summary["mismatched"] == 1
    assert summary["mismatches"] == [{"session": "s", "turn": 1, "cached_tokens": 64, "route_reason": "pool",
                                      "position": 2, "expected_token": 9, "got_token": 4}]
    assert summary["logprob_max_abs_diff"] == pytest.approx(2e-4)
    assert summary["logprob_tolerance"] == LOGPROB_TOLERANCE

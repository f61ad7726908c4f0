"""Per-key limits and the per-address gate, without a server."""

from __future__ import annotations

import pytest

from tokenwire.server.admission.capacity import IpGate
from tokenwire.server.admission.limits import KeyLimits
from tokenwire.server.requests.errors import ErrorCode, RequestError


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_key_runs_at_most_its_cap_of_generations_and_others_are_unaffected() -> None:
    limits = KeyLimits(max_generations=2)
    limits.acquire("a")
    limits.acquire("a")
    with pytest.raises(RequestError) as err:
        limits.acquire("a")
    assert err.value.code is ErrorCode.RATE_LIMITED and "--max-generations-per-key" in err.value.message
    limits.acquire("b")  # another key
    limits.release("a", 0)
    limits.acquire("a")  # room again
    assert limits.running("a") == 2


def test_without_keys_nothing_is_limited_or_remembered() -> None:
    limits = KeyLimits(max_generations=1, tokens_per_minute=1)
    for _ in range(100):
        limits.acquire("")
        limits.release("", 1000)
    assert limits.running("") == 0 and not limits._buckets and not limits._running


def test_the_token_budget_refuses_with_the_seconds_until_it_refills() -> None:
    """60 tokens a minute (one a second): a generation that used 90 leaves the bucket 30 in debt; the next request
    is told to come back in 31 s, and is admitted then."""
    clock = Clock()
    limits = KeyLimits(tokens_per_minute=60, clock=clock)
    limits.acquire("k")
    limits.release("k", 90)
    with pytest.raises(RequestError) as err:
        limits.acquire("k")
    assert err.value.code is ErrorCode.RATE_LIMITED and err.value.retry_after == 31.0
    assert "--rate-limit" in err.value.message
    clock.now = 30.5
    with pytest.raises(RequestError):
        limits.acquire("k")
    clock.now = 31.0
    limits.acquire("k")
    limits.release("k", 1)
    clock.now = 10_000
    limits.acquire("k")  # refilled, but never above a minute's worth
    assert limits._buckets["k"].level == 60.0


def test_the_per_address_gate_counts_each_address_and_forgets_empty_ones() -> None:
    gate = IpGate(limit=2)
    assert gate.enter("1.1.1.1") and gate.enter("1.1.1.1")
    assert not gate.enter("1.1.1.1")
    assert gate.enter("2.2.2.2")
    gate.leave("1.1.1.1")
    assert gate.enter("1.1.1.1")
    for _ in range(2):
        gate.leave("1.1.1.1")
    gate.leave("2.2.2.2")
    assert gate._open == {}
    assert all(IpGate(limit=0).enter("x") for _ in range(1000))

"""The batch option coalesces deltas by token count or by time."""

from __future__ import annotations

from tokenwire.server.ws.batching import Coalescer
from tokenwire.server.ws.protocol import BatchPolicy


def test_batch_is_due_at_max_tokens() -> None:
    c = Coalescer(BatchPolicy(max_tokens=3))
    c.add("a", 1, 0.0, (7,))
    c.add("b", 1, 0.0, (8,))
    assert not c.due(100.0)  # no time limit
    c.add("c", 1, 0.0, (9,))
    assert c.due(0.0)
    assert c.take() == ("abc", 3, (7, 8, 9))  # the text, its token count, and the tokens' ids in order
    assert c.empty


def test_a_delta_that_would_overflow_the_batch_starts_a_new_one() -> None:
    """A delta covering several tokens (one character split over bytes) never pushes a batch past max_tokens."""
    c = Coalescer(BatchPolicy(max_tokens=5))
    c.add("abcd", 4, 0.0)
    assert c.would_overflow(3) and not c.would_overflow(1)
    assert not Coalescer(BatchPolicy(max_tokens=5)).would_overflow(9)  # alone, it goes whole
    assert not Coalescer(BatchPolicy(max_ms=5)).would_overflow(100)  # no token limit


def test_batch_is_due_max_ms_after_its_first_delta() -> None:
    c = Coalescer(BatchPolicy(max_ms=50))
    assert c.deadline() is None
    c.add("x", 1, 10.0)
    c.add("y", 1, 10.03)
    assert c.deadline() == 10.05
    assert not c.due(10.049)
    assert c.due(10.05)
    assert c.take() == ("xy", 2, ())
    assert c.deadline() is None


def test_whichever_comes_first() -> None:
    c = Coalescer(BatchPolicy(max_tokens=10, max_ms=20))
    c.add("x", 9, 0.0)
    assert not c.due(0.01)
    assert c.due(0.02)

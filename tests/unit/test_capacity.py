"""The connection cap and the descriptor watch say once when they are short, and once when it is over."""

from __future__ import annotations

import logging

import pytest

from tokenwire.server.admission.capacity import ConnectionGate, FdWatch, auto_max_connections, fd_limit, reserve_for


def test_the_gate_refuses_past_its_limit_and_logs_each_episode_once(caplog: pytest.LogCaptureFixture) -> None:
    gate = ConnectionGate(limit=10)
    with caplog.at_level(logging.WARNING):
        assert all(gate.enter() for _ in range(10))
        assert not any(gate.enter() for _ in range(5))
        assert gate.open == 10 and gate.refused == 5
        gate.leave()  # 9 open: not yet below 90%, no second line
        for _ in range(2):
            gate.leave()
        assert gate.enter()
    lines = [r.getMessage() for r in caplog.records]
    assert sum("connection limit reached" in x for x in lines) == 1
    assert sum("below the connection limit again" in x and "5 refused" in x for x in lines) == 1


def test_no_limit_means_no_cap() -> None:
    gate = ConnectionGate()
    assert all(gate.enter() for _ in range(10_000))


def test_the_descriptor_watch_logs_once_short_and_once_recovered(caplog: pytest.LogCaptureFixture) -> None:
    watch = FdWatch()
    with caplog.at_level(logging.WARNING):
        for used in (100, 960, 990, 999, 900, 849, 860, 700):
            watch.check(used, 1000)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2 and "running out of file descriptors: 960 of 1000" in lines[0]
    assert "recovered: 849 of 1000" in lines[1]


def test_the_automatic_cap_keeps_a_reserve_below_the_descriptor_limit() -> None:
    limit = fd_limit()
    assert limit is not None  # Linux: RLIMIT_NOFILE is always set
    assert 16 <= auto_max_connections() <= limit - reserve_for(limit)

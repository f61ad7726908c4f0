"""The stats report (the tutorial's StreamingMetrics) and the dashboard's timeline, with bounded memory."""

from __future__ import annotations

from tokenwire.metrics import StreamingMetrics, Timeline, percentile


def test_performance_report_follows_the_tutorials_fields() -> None:
    m = StreamingMetrics()
    assert m.performance_report()["total_sessions"] == 0
    m.start_session("a", "conn", "websocket")
    m.record("a", "héllo", 2)
    m.record("a", " world", 1)
    assert m.performance_report()["active_sessions"] == 1
    s = m.end_session("a", "stop")
    assert s is not None and s.tokens_sent == 3 and s.bytes_sent == len("héllo world".encode())
    report = m.performance_report()
    assert report["total_sessions"] == 1 and report["active_sessions"] == 0
    assert report["total_tokens_generated"] == 3 and report["average_tokens_per_session"] == 3
    assert {"average_duration", "average_tokens_per_second"} <= set(report)


def test_old_sessions_roll_off_but_totals_stay() -> None:
    m = StreamingMetrics(history=3)
    for i in range(10):
        m.start_session(str(i), "c", "openai")
        m.record(str(i), "x", 1)
        m.end_session(str(i), "length")
    assert [s.session_id for s in m.completed] == ["7", "8", "9"]
    report = m.performance_report()
    assert report["total_sessions"] == 10 and report["total_tokens_generated"] == 10
    assert report["sessions_in_report"] == 3


def test_unknown_sessions_are_ignored() -> None:
    m = StreamingMetrics()
    m.record("nope", "x", 1)
    assert m.end_session("nope", "stop") is None


def test_timeline_gives_one_point_a_second_and_forgets_old_seconds() -> None:
    t = Timeline(seconds=5)
    t.tokens(10, now=100.2)
    t.tokens(5, now=100.7)
    t.ttft(0.2, now=100.5)
    t.ttft(0.4, now=100.6)
    t.active(3, now=100.1)
    t.tokens(7, now=102.0)
    pts = t.series(now=102.5, window=4)
    assert [p["t"] for p in pts] == [99, 100, 101, 102]
    assert [p["tokens_per_second"] for p in pts] == [0, 15, 0, 7]
    assert pts[1]["active_streams"] == 3 and pts[1]["ttft_p50_ms"] == 200.0 and pts[1]["ttft_p99_ms"] == 400.0
    for s in range(103, 120):
        t.tokens(1, now=float(s))
    assert t.series(now=119, window=20)[0]["tokens_per_second"] == 0  # 100 rolled off


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert percentile([float(i) for i in range(100)], 99) == 98.0

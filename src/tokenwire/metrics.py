"""What the server records, and the reports built from it: Prometheus metrics and the tutorial's stats.

``Metrics`` owns one Prometheus registry per app (no global state, so tests can build many apps).
``StreamingMetrics`` is the tutorial's session tracker with bounded memory: finished sessions roll off after
``history``. ``Timeline`` keeps per-second samples for the dashboard's charts (the last ``seconds``).
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from tokenwire.engine.interface import EngineStats

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
REQUEST_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)


class _Gauges(Collector):
    """Gauges read at scrape time from the engine and the server, so they are never stale."""

    def __init__(
        self,
        engine_stats: Callable[[], EngineStats],
        connections: Callable[[], int],
        resumable: Callable[[], tuple[int, int]] | None,
    ) -> None:
        self._engine_stats = engine_stats
        self._connections = connections
        self._resumable = resumable

    def collect(self) -> Iterator[GaugeMetricFamily]:
        s = self._engine_stats()
        yield GaugeMetricFamily("tokenwire_num_requests_running", "Requests in the running batch.", value=s.running)
        yield GaugeMetricFamily("tokenwire_num_requests_waiting", "Requests waiting for a batch slot.", value=s.waiting)
        yield GaugeMetricFamily(
            "tokenwire_num_requests_paused",
            "Requests out of the batch until their reader catches up or resumes them.",
            value=s.paused,
        )
        yield GaugeMetricFamily(
            "tokenwire_websocket_connections", "Open WebSocket connections.", value=self._connections()
        )
        yield GaugeMetricFamily(
            "tokenwire_kv_cache_used_tokens",
            "KV-cache positions holding running sequences.",
            value=s.kv_cache_tokens_used,
        )
        yield GaugeMetricFamily(
            "tokenwire_kv_cache_paused_tokens",
            "KV-cache positions kept for paused requests (transformers engine; OpenVINO's prefix cache holds them).",
            value=s.kv_cache_tokens_paused,
        )
        yield GaugeMetricFamily(
            "tokenwire_kv_cache_capacity_tokens", "KV-cache positions allocated.", value=s.kv_cache_tokens_capacity
        )
        # Under the names an inference gateway reads from a model server by default (the Kubernetes Gateway API
        # Inference Extension's endpoint picker, llm-d): queue, running, and KV use as a fraction of the budget.
        yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting for a batch slot.", value=s.waiting)
        yield GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch.", value=s.running)
        budget_used = s.kv_cache_tokens_used / s.kv_cache_tokens_budget if s.kv_cache_tokens_budget else 0.0
        for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):  # the current name, and the older
            yield GaugeMetricFamily(name, "KV-cache use as a fraction of its budget (1 = full).", value=budget_used)
        usage = s.kv_cache_tokens_used / s.kv_cache_tokens_capacity if s.kv_cache_tokens_capacity else 0.0
        yield GaugeMetricFamily(
            "tokenwire_kv_cache_usage_ratio", "Used over allocated KV-cache positions.", value=usage
        )
        if self._resumable is not None:
            orphaned, kept = self._resumable()
            yield GaugeMetricFamily(
                "tokenwire_orphaned_generations",
                "WebSocket generations whose connection dropped, kept (paused) to be resumed.",
                value=orphaned,
            )
            yield GaugeMetricFamily(
                "tokenwire_resume_buffer_bytes",
                "Bytes of messages kept so that generations can be resumed.",
                value=kept,
            )


class Metrics:
    """Prometheus metrics of one server."""

    def __init__(
        self,
        engine_stats: Callable[[], EngineStats],
        connections: Callable[[], int],
        resumable: Callable[[], tuple[int, int]] | None = None,
    ) -> None:
        r = self.registry = CollectorRegistry()
        self.ttft = Histogram(
            "tokenwire_time_to_first_token_seconds",
            "Time from request to its first token.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.itl = Histogram(
            "tokenwire_inter_token_latency_seconds",
            "Time between two text deltas of one request.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.e2e = Histogram(
            "tokenwire_e2e_request_latency_seconds",
            "Time from request to its last token.",
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.queue = Histogram(
            "tokenwire_request_queue_time_seconds",
            "Time a request waited for a batch slot.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.prompt_tokens = Counter("tokenwire_prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("tokenwire_generation_tokens", "Tokens generated.", registry=r)
        self.prefix_cache_queries = Counter(
            "tokenwire_prefix_cache_queries_tokens", "Prompt tokens looked up in the prefix cache.", registry=r
        )
        self.prefix_cache_hits = Counter(
            "tokenwire_prefix_cache_hits_tokens", "Prompt tokens whose KV came from the prefix cache.", registry=r
        )
        self.requests = Counter(
            "tokenwire_requests", "Finished requests by finish reason and door.", ["finish_reason", "api"], registry=r
        )
        self.errors = Counter("tokenwire_errors", "Errors sent to clients, by code.", ["code"], registry=r)
        self.ws_messages = Counter("tokenwire_websocket_messages_sent", "WebSocket messages sent.", registry=r)
        self.ws_bytes = Counter("tokenwire_websocket_bytes_sent", "WebSocket payload bytes sent.", registry=r)
        self.flow_pauses = Counter(
            "tokenwire_flow_pauses",
            "Generations paused because their reader fell behind or went away (they compute nothing until it is back).",
            registry=r,
        )
        self.resumes = Counter(
            "tokenwire_websocket_resumes",
            "WebSocket resume requests by outcome (resumed, not_found, ambiguous, invalid, refused: no resume_token).",
            ["outcome"],
            registry=r,
        )
        r.register(_Gauges(engine_stats, connections, resumable))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


@dataclass(slots=True)
class Session:
    """One generation, as the tutorial's StreamingMetrics tracks it."""

    session_id: str
    connection: str
    api: str
    start_time: float = field(default_factory=time.time)
    tokens_sent: int = 0
    bytes_sent: int = 0
    duration: float = 0.0
    tokens_per_second: float = 0.0
    finish_reason: str = ""
    ttft: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "connection": self.connection,
            "api": self.api,
            "start_time": self.start_time,
            "tokens_sent": self.tokens_sent,
            "bytes_sent": self.bytes_sent,
            "duration": round(self.duration, 4),
            "tokens_per_second": round(self.tokens_per_second, 2),
            "finish_reason": self.finish_reason,
        }


class StreamingMetrics:
    """The tutorial's StreamingMetrics, bounded: keeps the last ``history`` finished sessions."""

    def __init__(self, history: int = 1000) -> None:
        self.current: dict[str, Session] = {}
        self.completed: deque[Session] = deque(maxlen=history)
        self.total_sessions = 0
        self.total_tokens = 0

    def start_session(self, session_id: str, connection: str, api: str) -> None:
        self.current[session_id] = Session(session_id, connection, api)

    def record(self, session_id: str, text: str, tokens: int) -> None:
        s = self.current.get(session_id)
        if s is None:
            return
        if s.ttft is None and tokens:
            s.ttft = time.time() - s.start_time
        s.tokens_sent += tokens
        s.bytes_sent += len(text.encode("utf-8"))

    def end_session(self, session_id: str, finish_reason: str) -> Session | None:
        s = self.current.pop(session_id, None)
        if s is None:
            return None
        s.duration = time.time() - s.start_time
        s.tokens_per_second = s.tokens_sent / s.duration if s.duration > 0 else 0.0
        s.finish_reason = finish_reason
        self.completed.append(s)
        self.total_sessions += 1
        self.total_tokens += s.tokens_sent
        return s

    def performance_report(self) -> dict[str, Any]:
        """The tutorial's report over the sessions still in the history, plus all-time totals."""
        done = list(self.completed)
        n = len(done)
        tokens = sum(s.tokens_sent for s in done)
        return {
            "total_sessions": self.total_sessions,
            "active_sessions": len(self.current),
            "average_duration": round(sum(s.duration for s in done) / n, 2) if n else 0.0,
            "average_tokens_per_second": round(sum(s.tokens_per_second for s in done) / n, 2) if n else 0.0,
            "total_tokens_generated": self.total_tokens,
            "average_tokens_per_session": round(tokens / n, 2) if n else 0.0,
            "sessions_in_report": n,
        }


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[k]


class Timeline:
    """Per-second samples for the dashboard: tokens sent, active streams, TTFTs; the last ``seconds`` kept."""

    def __init__(self, seconds: int = 600) -> None:
        self._buckets: deque[dict[str, Any]] = deque(maxlen=seconds)

    def _bucket(self, now: float) -> dict[str, Any]:
        second = int(now)
        if not self._buckets or self._buckets[-1]["t"] != second:
            self._buckets.append({"t": second, "tokens": 0, "ttfts": [], "active": 0})
        return self._buckets[-1]

    def tokens(self, n: int, now: float | None = None) -> None:
        self._bucket(now or time.time())["tokens"] += n

    def ttft(self, seconds: float, now: float | None = None) -> None:
        self._bucket(now or time.time())["ttfts"].append(seconds)

    def active(self, streams: int, now: float | None = None) -> None:
        b = self._bucket(now or time.time())
        b["active"] = max(b["active"], streams)

    def series(self, now: float | None = None, window: int = 300) -> list[dict[str, Any]]:
        """One point a second over the last ``window`` seconds: tokens/s, active streams, TTFT p50/p99 (ms)."""
        end = int(now or time.time())
        by_t = {b["t"]: b for b in self._buckets}
        points = []
        for t in range(end - window + 1, end + 1):
            b = by_t.get(t)
            ttfts = b["ttfts"] if b else []
            p50, p99 = percentile(ttfts, 50), percentile(ttfts, 99)
            points.append(
                {
                    "t": t,
                    "tokens_per_second": b["tokens"] if b else 0,
                    "active_streams": b["active"] if b else 0,
                    "ttft_p50_ms": round(p50 * 1000, 1) if p50 is not None else None,
                    "ttft_p99_ms": round(p99 * 1000, 1) if p99 is not None else None,
                }
            )
        return points

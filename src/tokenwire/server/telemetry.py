"""One place where both doors (WebSocket, HTTP) report what happens to a request.

A :class:`Trace` follows one generation: deltas feed the inter-token latency and the dashboard's timeline,
the end feeds the histograms, the session report and one log line (never the prompt text).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable

from tokenwire.engine.interface import EngineStats, RequestOutput
from tokenwire.metrics import Metrics, StreamingMetrics, Timeline

request_log = logging.getLogger("tokenwire.requests")


def public_ref(identifier: str) -> str:
    """What /v1/stats shows instead of a session or generation id: a digest that tells them apart but cannot be
    used to resume anything (resume trusts the ids, and /v1/stats needs no key)."""
    return hashlib.sha256(identifier.encode("utf-8")).hexdigest()[:12]


class Telemetry:
    def __init__(
        self,
        engine_stats: Callable[[], EngineStats],
        connections: Callable[[], int],
        resumable: Callable[[], tuple[int, int]] | None = None,
        history: int = 1000,
    ) -> None:
        self.metrics = Metrics(engine_stats, connections, resumable)
        self.sessions = StreamingMetrics(history)
        self.timeline = Timeline()

    def trace(self, request_id: str, connection: str, api: str) -> Trace:
        self.sessions.start_session(request_id, connection, api)
        return Trace(self, request_id, connection, api)

    def error(self, code: str) -> None:
        self.metrics.errors.labels(code=code).inc()

    def flow_paused(self) -> None:
        self.metrics.flow_pauses.inc()

    def resume(self, outcome: str) -> None:
        self.metrics.resumes.labels(outcome=outcome).inc()

    def websocket_sent(self, data: str) -> None:
        self.metrics.ws_messages.inc()
        self.metrics.ws_bytes.inc(len(data.encode("utf-8")))


class Trace:
    __slots__ = ("_done", "_last_delta", "_start", "_t", "api", "connection", "request_id")

    def __init__(self, telemetry: Telemetry, request_id: str, connection: str, api: str) -> None:
        self._t = telemetry
        self.request_id = request_id
        self.connection = connection
        self.api = api
        self._start = time.monotonic()
        self._last_delta: float | None = None
        self._done = False

    def delta(self, text: str, tokens: int) -> None:
        now = time.monotonic()
        t = self._t
        if self._last_delta is not None:
            t.metrics.itl.observe(now - self._last_delta)
        else:
            t.timeline.ttft(now - self._start)
        self._last_delta = now
        t.sessions.record(self.request_id, text, tokens)
        t.timeline.tokens(tokens)
        t.timeline.active(len(t.sessions.current))

    def finished(self, out: RequestOutput) -> None:
        if self._done:
            return
        self._done = True
        t, m = self._t, self._t.metrics
        if out.num_tokens and not out.text:  # tokens whose bytes never completed a character
            t.sessions.record(self.request_id, "", out.num_tokens)
        reason = out.finish_reason.value if out.finish_reason else "stop"
        m.requests.labels(finish_reason=reason, api=self.api).inc()
        m.prompt_tokens.inc(out.prompt_tokens)
        m.prefix_cache_queries.inc(out.prompt_tokens)
        m.prefix_cache_hits.inc(out.cached_tokens)
        m.generation_tokens.inc(out.completion_tokens)
        tm = out.timings
        if tm is not None:
            m.queue.observe(tm.queue_ms / 1000)
            if out.completion_tokens:
                m.ttft.observe(tm.ttft_ms / 1000)
            m.e2e.observe(tm.total_ms / 1000)
        t.sessions.end_session(self.request_id, reason)
        request_log.info(
            "request %s finished: %s, %d prompt + %d completion tokens, ttft %.0f ms, total %.0f ms",
            self.request_id,
            reason,
            out.prompt_tokens,
            out.completion_tokens,
            tm.ttft_ms if tm else 0.0,
            tm.total_ms if tm else 0.0,
            extra={
                "fields": {
                    "request_id": self.request_id,
                    "connection": self.connection,
                    "api": self.api,
                    "prompt_tokens": out.prompt_tokens,
                    "completion_tokens": out.completion_tokens,
                    "ttft_ms": tm.ttft_ms if tm else None,
                    "total_ms": tm.total_ms if tm else None,
                    "finish_reason": reason,
                }
            },
        )

    def failed(self, code: str) -> None:
        if self._done:
            return
        self._done = True
        self._t.error(code)
        self._t.sessions.end_session(self.request_id, "error")
        request_log.info(
            "request %s failed: %s",
            self.request_id,
            code,
            extra={
                "fields": {"request_id": self.request_id, "connection": self.connection, "api": self.api, "error": code}
            },
        )

    def abandoned(self) -> None:
        """The client went away before the end (no complete or error could be sent)."""
        if not self._done:
            self._done = True
            self._t.metrics.requests.labels(finish_reason="cancelled", api=self.api).inc()
            self._t.sessions.end_session(self.request_id, "cancelled")

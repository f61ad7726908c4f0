"""Token coalescing for the ``batch`` option: fewer, larger ``tokens`` messages. Pure, clock passed in."""

from __future__ import annotations

from tokenwire.server.ws.protocol import BatchPolicy


class Coalescer:
    """Collects text deltas; a batch is due at ``max_tokens`` tokens or ``max_ms`` after its first delta."""

    __slots__ = ("_ids", "_opened_at", "_policy", "_text", "_tokens")

    def __init__(self, policy: BatchPolicy) -> None:
        self._policy = policy
        self._text: list[str] = []
        self._tokens = 0
        self._ids: list[int] = []  # the token ids of the collected deltas
        self._opened_at: float | None = None

    def would_overflow(self, tokens: int) -> bool:
        """Adding a delta of ``tokens`` would push the open batch past ``max_tokens``: flush it first.

        (A single delta larger than ``max_tokens``, one character spread over many tokens, still goes whole.)"""
        limit = self._policy.max_tokens
        return limit is not None and not self.empty and self._tokens + tokens > limit

    def add(self, text: str, tokens: int, now: float, ids: tuple[int, ...] = ()) -> None:
        if self._opened_at is None:
            self._opened_at = now
        self._text.append(text)
        self._tokens += tokens
        self._ids.extend(ids)

    @property
    def timed(self) -> bool:
        """Whether batches have a time limit (and so a deadline to wait for)."""
        return self._policy.max_ms is not None

    @property
    def empty(self) -> bool:
        return self._opened_at is None

    def deadline(self) -> float | None:
        """When the open batch must go out (monotonic seconds), or None."""
        if self._opened_at is None or self._policy.max_ms is None:
            return None
        return self._opened_at + self._policy.max_ms / 1000.0

    def due(self, now: float) -> bool:
        if self._opened_at is None:
            return False
        if self._policy.max_tokens is not None and self._tokens >= self._policy.max_tokens:
            return True
        deadline = self.deadline()
        return deadline is not None and now >= deadline

    def take(self) -> tuple[str, int, tuple[int, ...]]:
        text, tokens, ids = "".join(self._text), self._tokens, tuple(self._ids)
        self._text.clear()
        self._ids.clear()
        self._tokens = 0
        self._opened_at = None
        return text, tokens, ids

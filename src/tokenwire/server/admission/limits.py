"""Per-API-key limits, shared by every door: generations at once, and a token budget per minute.

- ``max_generations``: a key may run this many generations at once over all its connections and doors (WebSocket,
  HTTP, Realtime); one more is refused with ``rate_limited`` (HTTP 429).
- ``tokens_per_minute``: each key has a token bucket holding at most a minute's worth, refilled continuously. A
  generation is admitted while the bucket is not empty and charged its prompt and generated tokens when it ends;
  an empty bucket refuses with ``rate_limited`` and ``retry_after``, the seconds until it holds a token again.
  (A generation may overdraw the bucket: the key then waits longer.)

Only keys the server knows are tracked (``tenant`` is the digest of one, auth.owner_of), so memory is bounded
by the number of configured keys; without API keys (tenant ``""``) nothing is limited here. Plain Python; the
clock is injectable.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from tokenwire.server.requests.errors import ErrorCode, RequestError


@dataclass(slots=True)
class _Bucket:
    level: float
    at: float


@dataclass(slots=True)
class KeyLimits:
    max_generations: int = 0  # 0: no cap
    tokens_per_minute: int = 0  # 0: no budget
    clock: Callable[[], float] = time.monotonic
    _running: dict[str, int] = field(default_factory=dict)
    _buckets: dict[str, _Bucket] = field(default_factory=dict)

    @property
    def enabled(self) -> bool:
        return self.max_generations > 0 or self.tokens_per_minute > 0

    def running(self, tenant: str) -> int:
        return self._running.get(tenant, 0)

    def acquire(self, tenant: str) -> None:
        """Admit one generation of ``tenant``, or raise ``RequestError(rate_limited)`` saying which limit and when
        to try again. The caller calls :meth:`release` when it ends, however it ends."""
        if not tenant:
            return
        cap = self.max_generations
        if cap and self._running.get(tenant, 0) >= cap:
            raise RequestError(
                ErrorCode.RATE_LIMITED,
                f"this API key already runs {cap} generations (--max-generations-per-key); wait for one to end",
                retry_after=1.0,
            )
        wait = self._wait(tenant)
        if wait > 0:
            raise RequestError(
                ErrorCode.RATE_LIMITED,
                f"this API key used its budget of {self.tokens_per_minute} tokens per minute (--rate-limit); "
                f"try again in {math.ceil(wait)} s",
                retry_after=float(math.ceil(wait)),
            )
        self._running[tenant] = self._running.get(tenant, 0) + 1

    def release(self, tenant: str, tokens: int) -> None:
        """A generation of ``tenant`` ended having used ``tokens`` (prompt and generated)."""
        if not tenant:
            return
        left = self._running.get(tenant, 0) - 1
        if left > 0:
            self._running[tenant] = left
        else:
            self._running.pop(tenant, None)
        if self.tokens_per_minute > 0 and tokens > 0:
            bucket = self._refill(tenant)
            bucket.level -= tokens

    def _refill(self, tenant: str) -> _Bucket:
        now = self.clock()
        rate = self.tokens_per_minute / 60.0
        bucket = self._buckets.get(tenant)
        if bucket is None:
            bucket = self._buckets[tenant] = _Bucket(float(self.tokens_per_minute), now)
        else:
            bucket.level = min(float(self.tokens_per_minute), bucket.level + (now - bucket.at) * rate)
            bucket.at = now
        return bucket

    def _wait(self, tenant: str) -> float:
        """Seconds until ``tenant``'s bucket holds a token again (0: it does)."""
        if self.tokens_per_minute <= 0:
            return 0.0
        bucket = self._refill(tenant)
        if bucket.level >= 1.0:
            return 0.0
        return (1.0 - bucket.level) / (self.tokens_per_minute / 60.0)

"""After a backend's process dies with requests in it: who goes on, who is to blame, and when to give up.

A backend that runs the model in another process (OpenVINO's worker) restarts it when it dies (kill -9, the
out-of-memory killer, a crash in the model's own code) and hands back the requests that were in it
(``StepOutput.lost``). The engine core queues them again, first in line, each with its prompt plus the tokens it
generated (as after a pause), so they go on where they were: a greedy answer reads on seamlessly. But a request
that makes the process die would make it die again, and every request of a step dies with it, so each loss is a
strike, and:

- after a first loss every request goes on together (most deaths are no request's doing);
- a request with two strikes is a *suspect*: suspects run alone, one at a time, first in line, each until it has
  made ``PROBE_TOKENS`` tokens (a request that kills the process does so at its admission or first steps); then
  it leaves the batch again, cleared, and waits first in line while the next suspect runs;
- a request alone in the process when it died, with a strike before, is the *culprit*: it fails with
  ``generation_failed`` saying so, and the deaths it was in are not held against the restart limit
  (:class:`RestartBudget`), so a request that kills the worker costs at most three restarts and never the
  server. Deaths no request is blamed for count: past ``limit`` in ``window`` seconds the engine gives up and the
  server exits for its supervisor.

Plain Python, no clock of its own: tested without an engine.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

PROBE_TOKENS = 8  # tokens a suspect makes alone before it is cleared
CULPRIT_MESSAGE = (
    "the engine process died twice while running this request, the second time with this request alone in it: it "
    "is taken to be the cause and is not run again (the other requests went on)"
)


@dataclass(slots=True)
class Triage:
    """Strikes per request, and the suspect running alone now (the engine core's model thread only)."""

    probe_tokens: int = PROBE_TOKENS
    strikes: dict[str, int] = field(default_factory=dict)
    probing: str | None = None
    _left: int = 0

    def lost(self, request_ids: Iterable[str]) -> tuple[str | None, list[str]]:
        """The process died with ``request_ids`` in it: the culprit, if one is certain, and those that go on
        (suspects first)."""
        lost = list(request_ids)
        for rid in lost:
            self.strikes[rid] = self.strikes.get(rid, 0) + 1
        self.probing = None
        culprit = lost[0] if len(lost) == 1 and self.strikes[lost[0]] >= 2 else None
        if culprit is not None:
            del self.strikes[culprit]
        go_on = [rid for rid in lost if rid != culprit]
        go_on.sort(key=lambda rid: not self.suspect(rid))  # stable: suspects first, each group in its order
        return culprit, go_on

    def suspect(self, request_id: str) -> bool:
        return self.strikes.get(request_id, 0) >= 2

    def may_admit(self, request_id: str, running: int) -> bool:
        """Whether ``request_id`` may join the batch now: nothing joins a suspect's probe, and a suspect joins
        only an empty batch."""
        if self.probing is not None:
            return False
        return running == 0 if self.suspect(request_id) else True

    def admitted(self, request_id: str) -> None:
        if self.suspect(request_id):
            self.probing = request_id
            self._left = self.probe_tokens

    def made(self, request_id: str, tokens: int) -> bool:
        """``request_id`` made ``tokens``; True when that ends its probe: it is cleared, and should leave the
        batch so that the next suspect runs alone."""
        if request_id != self.probing:
            return False
        self._left -= tokens
        if self._left > 0:
            return False
        self.probing = None
        self.strikes.pop(request_id, None)
        return True

    def left(self, request_id: str) -> None:
        """It left the batch (paused, ended): a probe of it is over, not passed."""
        if self.probing == request_id:
            self.probing = None

    def forget(self, request_id: str) -> None:
        self.left(request_id)
        self.strikes.pop(request_id, None)


@dataclass(slots=True)
class RestartBudget:
    """A backend process's deaths within ``window`` seconds, each with the requests it held; past ``limit`` the
    backend gives up. A culprit's deaths are forgiven."""

    limit: int = 3
    window: float = 300.0
    deaths: list[tuple[float, frozenset[str]]] = field(default_factory=list)

    def died(self, request_ids: Iterable[str], now: float) -> bool:
        """Record a death; True while restarting is still allowed."""
        self.deaths = [d for d in self.deaths if now - d[0] < self.window]
        self.deaths.append((now, frozenset(request_ids)))
        return len(self.deaths) <= self.limit

    def forgive(self, request_id: str) -> None:
        """``request_id`` was found to kill the process: the deaths it was in are not held against the limit."""
        self.deaths = [d for d in self.deaths if request_id not in d[1]]

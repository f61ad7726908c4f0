"""What a backend is to the engine core: load, then step (loop.py runs it in its model thread)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from tokenwire.engine.interface import EngineError, EngineStats, FinishReason, SamplingParams


@dataclass(slots=True, frozen=True)
class LoadedModel:
    """What a backend's load gives the engine core."""

    tokenizer: Any
    eos_ids: frozenset[int]
    max_context: int


@dataclass(slots=True)
class StepOutput:
    """One step of a backend: the new token ids of each request that got some (in order), the requests scheduled
    for the first time, the requests that failed and those the backend ended by itself (both already removed
    from the backend), and how many model steps this was (a backend in another process may report several)."""

    tokens: dict[str, list[int]] = field(default_factory=dict)
    scheduled: list[str] = field(default_factory=list)
    failed: dict[str, EngineError] = field(default_factory=dict)
    finished: dict[str, FinishReason] = field(default_factory=dict)
    cached: dict[str, int] = field(default_factory=dict)  # prompt tokens a request found in the prefix cache
    lost: list[str] = field(default_factory=list)  # its process died and was restarted: these go on (recovery.py)
    steps: int = 1


class Backend(Protocol):
    """A model and how to step it. Every method runs in the model thread, except :meth:`stats`."""

    name: str  # the model's
    kind: str  # the engine's: transformers, openvino

    def load(self) -> LoadedModel: ...

    @property
    def alive(self) -> bool:
        """False once the backend cannot run anything any more (its process died)."""
        ...

    def close(self) -> None:
        """Stop for good (the model thread ends)."""

    def add(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, max_new_tokens: int, continued: int = 0
    ) -> None:
        """Queue a request; it joins the running batch at a coming step. ``continued`` > 0: a paused request goes
        on, and the last ``continued`` of ``prompt_ids`` are tokens it generated itself (output, for penalties)."""

    def park(self, request_id: str) -> None:
        """Take a paused request out of the batch (no compute, its row freed), keeping what the backend can to
        continue it cheaply when it comes back through :meth:`add`; :meth:`remove` forgets it for good."""

    def remove(self, request_id: str) -> None:
        """Free a request's slot and anything kept for it (it ended or was aborted); unknown ids are ignored."""

    def forgive(self, request_id: str) -> None:
        """``request_id`` was found to kill the backend's process (recovery.py): the deaths it was in do not count
        toward the backend's restart limit. A backend without a process of its own does nothing."""

    @property
    def has_work(self) -> bool: ...

    def step(self) -> StepOutput: ...

    def idle(self) -> None:
        """Nothing runs: give memory back."""

    def stats(self) -> EngineStats: ...

"""What a shared journal keeps of a generation beside its messages, and how it is read back.

A :class:`Record` is written once, with the generation's first message, by the replica that runs it: enough for
another replica to find it (session and id), check who may resume it (owner, the resume token's digest), and go
on with it when its replica dies (model, tenant, sampling parameters, batching, the prompt's token ids). It is
written as JSON and read back into the engine's own types here (:meth:`Record.sampling`), beside the journal that
stores it, so that nothing else rebuilds a request from a dictionary.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import Any

from tokenwire.engine.interface import SamplingParams


@dataclass(slots=True, frozen=True)
class Record:
    """What another replica needs to find a generation, check who may resume it, and go on with it."""

    session: str
    gen_id: str
    owner: str | None
    token_digest: str
    model: str
    tenant: str
    params: dict[str, Any]  # SamplingParams' fields
    batch: dict[str, Any] | None  # the WebSocket door's BatchPolicy's fields, or None
    prompt_ids: tuple[int, ...] = ()

    @classmethod
    def of(
        cls,
        session: str,
        gen_id: str,
        owner: str | None,
        token_digest: str,
        model: str,
        tenant: str,
        params: SamplingParams,
        batch: Any | None,
    ) -> Record:
        """The record of a generation starting now (``batch``: a dataclass of the door's batching, or None)."""
        fields = dataclasses.asdict(batch) if batch is not None else None
        return cls(session, gen_id, owner, token_digest, model, tenant, dataclasses.asdict(params), fields)

    def sampling(self) -> SamplingParams:
        """The generation's sampling parameters, as the engine takes them."""
        return SamplingParams(**{**self.params, "stop": tuple(self.params.get("stop") or ())})

    def encode(self) -> str:
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))

    @classmethod
    def decode(cls, text: str | bytes) -> Record:
        data = json.loads(text)
        data["prompt_ids"] = tuple(data.get("prompt_ids", ()))
        return cls(**data)


@dataclass(slots=True, frozen=True)
class Remote:
    """A generation found in the shared journal."""

    key: str
    record: Record
    replica: str | None  # who holds its lease (runs it); None: nobody does
    held: bool  # a connection on that replica delivers it
    closed: bool  # it was aborted: nobody may go on with it

"""A running request as the scheduler sees it (plain Python, no torch): its prompt, its place in the batch, its
tokens. Its KV-cache blocks are the block manager's, under its request id."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from tokenwire.engine.interface import SamplingParams


class SeqState(enum.Enum):
    WAITING = "waiting"  # tokenized, not in the batch yet
    PREFILL = "prefill"  # in the batch; prompt partly in the KV cache
    DECODE = "decode"  # producing one token per step
    FINISHED = "finished"


@dataclass(slots=True, eq=False)
class Sequence:
    request_id: str
    prompt_ids: list[int]
    max_new_tokens: int  # max_tokens clipped to the room left in the context window
    params: SamplingParams = field(default_factory=SamplingParams)
    state: SeqState = SeqState.WAITING
    row: int = -1  # place in the running batch (decoding ones first) while running
    num_computed: int = 0  # prompt tokens already in the KV cache
    cached_tokens: int = 0  # of those, found in the prefix cache (not computed for this request)
    output_ids: list[int] = field(default_factory=list)
    generated_before: int = 0  # the last prompt ids are this many tokens it generated before it was paused

    @property
    def penalized_ids(self) -> list[int]:
        """What presence and frequency penalties count: everything this request generated, pauses included."""
        if not self.generated_before:
            return self.output_ids
        return self.prompt_ids[len(self.prompt_ids) - self.generated_before :] + self.output_ids

    @property
    def length(self) -> int:
        """Tokens in the KV cache once the last sampled token is fed back."""
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def reserved_length(self) -> int:
        """The most KV positions this sequence can ever need."""
        return len(self.prompt_ids) + self.max_new_tokens

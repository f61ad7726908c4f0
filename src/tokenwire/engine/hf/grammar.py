"""Constrained decoding for the transformers engine: a request with a JSON Schema samples only tokens that can
continue a document valid against it (llguidance computes each step's allowed tokens as a bitmask).

One matcher per constrained request, fed every token it samples; a paused request keeps its matcher, and a
request continued from token ids (after a failover) replays them into a fresh one. Once the document is complete
only the end-of-sequence token is allowed, so the answer ends there.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

import torch

from tokenwire.engine.interface import EngineError, EngineErrorCode, SamplingParams

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions

log = logging.getLogger(__name__)

COMPACT: JsonCompileOptions = {"whitespace_flexible": False}  # no runs of spaces and newlines from a small model
FLEXIBLE: JsonCompileOptions = {"whitespace_flexible": True}  # --json-whitespace flexible


COMPILED_KEPT = 64  # schemas kept compiled


class Grammars:
    """The matchers of the running (and paused) constrained requests."""

    def __init__(self, tokenizer: Any, vocab_size: int, compact: bool = True) -> None:
        self._whitespace = COMPACT if compact else FLEXIBLE
        self._hf_tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._tokenizer: Any = None  # llguidance's view of the tokenizer, built on first use (~0.3 s)
        self._matchers: dict[str, Any] = {}
        self._parked: dict[str, Any] = {}
        self._compiled: dict[str, Any] = {}  # schema -> a matcher fed nothing, to copy

    def _lltokenizer(self) -> Any:
        if self._tokenizer is None:
            import llguidance.hf

            self._tokenizer = llguidance.hf.from_tokenizer(self._hf_tokenizer, n_vocab=self._vocab_size)
        return self._tokenizer

    def add(self, request_id: str, schema: str, replay: list[int]) -> None:
        """Start constraining ``request_id``; ``replay``: tokens it already generated (a continuation)."""
        matcher = self._parked.pop(request_id, None)
        if matcher is None:
            matcher = self._fresh(schema)
            if replay and not matcher.consume_tokens(replay):
                raise ValueError(f"the tokens generated so far do not fit the schema: {matcher.get_error()}")
        self._matchers[request_id] = matcher

    def admit(self, request_id: str, params: SamplingParams, generated: list[int]) -> EngineError | None:
        """Constrain ``request_id`` if its ``params`` carry a schema (:meth:`add`); the error to fail it with when
        the schema cannot be enforced (the request fails alone, at the next step)."""
        if params.json_schema is None:
            return None
        try:
            self.add(request_id, params.json_schema, generated)
        except Exception as exc:
            log.warning("request %s: its schema could not be enforced: %s", request_id, exc)
            return EngineError(
                EngineErrorCode.INVALID_REQUEST, f"the schema could not be enforced: {exc}", "json_schema"
            )
        return None

    def _fresh(self, schema: str) -> Any:
        """A new matcher for ``schema``: a copy of a compiled one (compiling takes tens of ms on the model thread;
        the same schema, as an app sends again and again, is compiled once)."""
        compiled = self._compiled.pop(schema, None)
        if compiled is None:
            import llguidance

            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=self._whitespace)
            compiled = llguidance.LLMatcher(self._lltokenizer(), grammar)
        self._compiled[schema] = compiled  # most recently used last
        while len(self._compiled) > COMPILED_KEPT:
            self._compiled.pop(next(iter(self._compiled)))
        return compiled.deep_copy()

    def park(self, request_id: str) -> None:
        matcher = self._matchers.pop(request_id, None)
        if matcher is not None:
            self._parked[request_id] = matcher

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
        self._parked.pop(request_id, None)

    def constrains(self, request_id: str) -> bool:
        return request_id in self._matchers

    @torch.inference_mode()
    def mask(self, logits: torch.Tensor, request_ids: list[str]) -> None:
        """Set the scores of tokens a constrained row may not take to -inf, in place."""
        for i, rid in enumerate(request_ids):
            matcher = self._matchers.get(rid)
            if matcher is None:
                continue
            # one byte per token of the tokenizer, 0 (not allowed) or 200; bytearray: frombuffer needs it writable
            allowed = torch.frombuffer(bytearray(matcher.compute_logit_bias()), dtype=torch.uint8)
            n = min(int(allowed.numel()), int(logits.shape[-1]))
            row = logits[i]
            row[:n].masked_fill_(allowed[:n].to(row.device) == 0, float("-inf"))
            row[n:] = float("-inf")  # ids past the tokenizer's (padding of the output layer)

    def consume(self, request_id: str, token: int) -> str | None:
        """Feed a sampled token; returns why it was refused (None when it fits)."""
        matcher = self._matchers.get(request_id)
        if matcher is None or matcher.consume_token(token):
            return None
        return matcher.get_error() or "the token does not fit the schema"

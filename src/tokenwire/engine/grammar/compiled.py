"""JSON Schemas as grammar texts for an engine's grammar backend (OpenVINO GenAI's EBNF), compiled once each."""

from __future__ import annotations

import threading

from tokenwire.engine.grammar.bnf import Grammar
from tokenwire.engine.grammar.residual import residual
from tokenwire.engine.grammar.schema import Unsupported, compile_schema

KEPT = 64  # schemas kept compiled (an app sends the same one again and again)


class SchemaGrammars:
    """Compiles JSON Schemas (compact JSON unless ``compact`` is False) and keeps the last ``KEPT``; thread-safe
    (the event loop checks a schema when a request comes, the model thread writes its grammar)."""

    def __init__(self, compact: bool = True) -> None:
        self.compact = compact
        self._kept: dict[str, Grammar | Unsupported] = {}
        self._lock = threading.Lock()

    def refusal(self, schema: str) -> str | None:
        """Why ``schema`` cannot be enforced here (None: it can)."""
        got = self._compiled(schema)
        return str(got) if isinstance(got, Unsupported) else None

    def ebnf(self, schema: str, text: str = "") -> str:
        """The grammar of a document valid against ``schema``, or of its rest after ``text`` (what a request
        generated before it left the engine). Unsupported, or NotAPrefix when no valid document begins so."""
        got = self._compiled(schema)
        if isinstance(got, Unsupported):
            raise got
        return residual(got, text).ebnf()

    def _compiled(self, schema: str) -> Grammar | Unsupported:
        with self._lock:
            got = self._kept.pop(schema, None)
        if got is None:
            try:
                got = compile_schema(schema, self.compact)
            except Unsupported as exc:
                got = exc
            except ValueError as exc:  # not a schema this reads (the server checked it with llguidance first)
                got = Unsupported(str(exc))
        with self._lock:
            self._kept[schema] = got  # most recently used last
            while len(self._kept) > KEPT:
                self._kept.pop(next(iter(self._kept)))
        return got

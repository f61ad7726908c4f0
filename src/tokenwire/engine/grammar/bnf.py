"""A context-free grammar over characters, as plain data: rules of alternatives of symbols, a symbol being a rule's
name or one character from a set. Written out as the EBNF that OpenVINO GenAI's structured output reads (its
XGrammar backend: ``root ::= ...``, quoted strings, ``[...]`` classes, ``\\uXXXX`` escapes).

Everything the schema compiler (schema.py) builds is lowered to this one form (strings to one symbol a character,
repetition to recursion), so that residual.py can run a parser over it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_CODE_POINT = 0x10FFFF


@dataclass(slots=True, frozen=True)
class Chars:
    """One character from a set: sorted, disjoint code point ranges (inclusive)."""

    ranges: tuple[tuple[int, int], ...]

    @staticmethod
    def of(text: str) -> Chars:
        return Chars.ranges_of([(ord(c), ord(c)) for c in text])

    @staticmethod
    def ranges_of(ranges: list[tuple[int, int]]) -> Chars:
        merged: list[tuple[int, int]] = []
        for lo, hi in sorted(ranges):
            if merged and lo <= merged[-1][1] + 1:
                merged[-1] = (merged[-1][0], max(hi, merged[-1][1]))
            else:
                merged.append((lo, hi))
        return Chars(tuple(merged))

    def negated(self) -> Chars:
        out: list[tuple[int, int]] = []
        at = 0
        for lo, hi in self.ranges:
            if lo > at:
                out.append((at, lo - 1))
            at = hi + 1
        if at <= MAX_CODE_POINT:
            out.append((at, MAX_CODE_POINT))
        return Chars(tuple(out))

    def minus(self, other: Chars) -> Chars:
        return self.intersect(other.negated())

    def intersect(self, other: Chars) -> Chars:
        out: list[tuple[int, int]] = []
        for lo, hi in self.ranges:
            for olo, ohi in other.ranges:
                a, b = max(lo, olo), min(hi, ohi)
                if a <= b:
                    out.append((a, b))
        return Chars.ranges_of(out)

    def union(self, other: Chars) -> Chars:
        return Chars.ranges_of([*self.ranges, *other.ranges])

    def matches(self, char: str) -> bool:
        c = ord(char)
        return any(lo <= c <= hi for lo, hi in self.ranges)

    @property
    def empty(self) -> bool:
        return not self.ranges

    def ebnf(self) -> str:
        if len(self.ranges) == 1 and self.ranges[0][0] == self.ranges[0][1]:
            return '"' + _escape(self.ranges[0][0]) + '"'
        full = self.negated()
        if len(full.ranges) < len(self.ranges):  # shorter as "not these"
            return "[^" + "".join(_class_range(lo, hi) for lo, hi in full.ranges) + "]"
        return "[" + "".join(_class_range(lo, hi) for lo, hi in self.ranges) + "]"


Symbol = str | Chars  # a rule's name, or one character
Alternative = tuple[Symbol, ...]


@dataclass(slots=True)
class Grammar:
    """Rules by name, each a list of alternatives; ``start`` is the rule a document is."""

    rules: dict[str, list[Alternative]] = field(default_factory=dict)
    start: str = ""

    def ebnf(self) -> str:
        """The grammar in GenAI's EBNF; its ``root`` is ``start``; a run of single characters as one string."""
        lines = [f"root ::= {self.start}"]
        for name, alternatives in self.rules.items():
            body = " | ".join(_sequence(alt) if alt else '""' for alt in alternatives)
            lines.append(f"{name} ::= {body}")
        return "\n".join(lines) + "\n"


class Builder:
    """Makes rules with fresh names; a rule with the same alternatives as an earlier one is that one."""

    def __init__(self) -> None:
        self.grammar = Grammar()
        self._by_body: dict[tuple[Alternative, ...], str] = {}
        self._count = 0

    def name(self, hint: str) -> str:
        """A fresh name, for a rule defined later with :meth:`define` (recursion, references)."""
        self._count += 1
        base = "".join(c if c.isascii() and c.isalnum() else "_" for c in hint)[:24] or "r"
        return f"{base}_{self._count}"

    def define(self, name: str, alternatives: list[Alternative]) -> str:
        self.grammar.rules[name] = alternatives
        return name

    def rule(self, hint: str, alternatives: list[Alternative]) -> str:
        """A rule with these alternatives (an existing one if it has the same)."""
        key = tuple(alternatives)
        found = self._by_body.get(key)
        if found is not None:
            return found
        name = self.define(self.name(hint), alternatives)
        self._by_body[key] = name
        return name

    @staticmethod
    def literal(text: str) -> Alternative:
        return tuple(Chars.of(c) for c in text)

    def star(self, item: Alternative, hint: str = "star") -> str:
        """Zero or more of ``item``, as right recursion with ``item``'s alternatives inlined (``r ::= "" | a r |
        b r``): XGrammar computes token masks for that form at the speed of its own JSON grammar, and more than
        twice as slowly for ``(a | b)*`` or ``"" | x r`` (measured on a string's characters and escapes)."""
        name = self.name(hint)
        return self.define(name, [(), *((*alt, name) for alt in self.inlined(item))])

    def inlined(self, item: Alternative) -> list[Alternative]:
        """``item`` as alternatives: a lone rule's own (one level), else just it."""
        if len(item) == 1 and isinstance(item[0], str) and len(self.grammar.rules.get(item[0], ())) > 1:
            return list(self.grammar.rules[item[0]])
        return [item]

    def repeat(self, item: Alternative, least: int, most: int | None, hint: str = "rep") -> Alternative:
        """``least`` to ``most`` (None: no bound) of ``item``, in a row."""
        tail: Alternative
        if most is None:
            tail = (self.star(item, hint),)
        else:
            tail = ()
            for _ in range(most - least):  # nested optionals: at most most - least more
                tail = (self.rule(hint, [(), *((*alt, *tail) for alt in self.inlined(item))]),)
        return tuple(s for _ in range(least) for s in item) + tail


def _escape(code: int) -> str:
    char = chr(code)
    if char in '"\\':
        return "\\" + char
    if 0x20 <= code < 0x7F:
        return char
    if code <= 0xFFFF:
        return f"\\u{code:04x}"
    return f"\\U{code:08x}"


def _class_char(code: int) -> str:
    char = chr(code)
    if char in "]\\^-[":
        return "\\" + char
    return _escape(code) if char != '"' else '"'


def _class_range(lo: int, hi: int) -> str:
    if lo == hi:
        return _class_char(lo)
    return f"{_class_char(lo)}-{_class_char(hi)}"


def _symbol(symbol: Symbol) -> str:
    return symbol if isinstance(symbol, str) else symbol.ebnf()


def _sequence(symbols: Alternative) -> str:
    """Symbols written in a row, consecutive single characters as one string."""
    out: list[str] = []
    run: list[str] = []
    for symbol in symbols:
        if isinstance(symbol, Chars) and len(symbol.ranges) == 1 and symbol.ranges[0][0] == symbol.ranges[0][1]:
            run.append(_escape(symbol.ranges[0][0]))
            continue
        if run:
            out.append('"' + "".join(run) + '"')
            run = []
        out.append(_symbol(symbol))
    if run:
        out.append('"' + "".join(run) + '"')
    return " ".join(out)

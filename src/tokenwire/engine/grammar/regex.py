"""A JSON Schema ``pattern`` (an ECMAScript regular expression) to grammar symbols for a string's characters.

The common subset: literals, ``.``, classes (``[a-z]``, ``[^...]``, ``\\d \\w \\s`` and their negations), groups
(``(...)``, ``(?:...)``), ``|``, and the quantifiers ``* + ? {m} {m,} {m,n}`` (lazy ones as greedy: the same
strings). ``^`` and ``$`` anchor; without them the pattern may match anywhere in the string, as JSON Schema says.
Backreferences and lookarounds are refused (:class:`~tokenwire.engine.grammar.schema.Unsupported`). Characters a
JSON string must escape (``"``, ``\\``, control characters) are left out of classes.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenwire.engine.grammar.bnf import Alternative, Builder, Chars

MAX_REPEAT = 1024
_DIGIT = Chars.ranges_of([(48, 57)])
_WORD = Chars.ranges_of([(48, 57), (65, 90), (95, 95), (97, 122)])
_SPACE = Chars.of(" \t\n\r\f\v")
_CLASSES = {"d": _DIGIT, "w": _WORD, "s": _SPACE}
_ESCAPES = {"t": "\t", "n": "\n", "r": "\r", "f": "\f", "v": "\v", "0": "\0"}


class PatternError(ValueError):
    pass


@dataclass(slots=True, frozen=True)
class _Any:
    """``.``: any character of a string."""


@dataclass(slots=True, frozen=True)
class _Seq:
    items: tuple[Node, ...]


@dataclass(slots=True, frozen=True)
class _Alt:
    branches: tuple[Node, ...]


@dataclass(slots=True, frozen=True)
class _Rep:
    node: Node
    least: int
    most: int | None


Node = Chars | _Any | _Seq | _Alt | _Rep


def compile_regex(source: str, builder: Builder, allowed: Chars, any_char: str, hint: str) -> Alternative:
    """Symbols for the characters of a JSON string that ``source`` matches; ``allowed``: the characters a string
    holds as they are; ``any_char``: the rule of one string character (escapes included), for ``.``."""
    from tokenwire.engine.grammar.schema import Unsupported

    try:
        parser = _Parser(source)
        anchored_start = parser.eat("^")
        node = parser.alternation()
        anchored_end = parser.at_end_anchor()
        if parser.pos != len(source):
            raise PatternError(f"unexpected {source[parser.pos]!r} at {parser.pos}")
    except PatternError as exc:
        raise Unsupported(f"the pattern {source!r} ({exc})") from None
    try:
        body = _Emitter(builder, allowed, any_char, hint).node(node)
    except PatternError as exc:
        raise Unsupported(f"the pattern {source!r} ({exc})") from None
    anything = (builder.star((any_char,), "anychars"),)
    return (*(() if anchored_start else anything), *body, *(() if anchored_end else anything))


class _Parser:
    def __init__(self, source: str) -> None:
        self.src = source
        self.pos = 0

    def peek(self) -> str | None:
        return self.src[self.pos] if self.pos < len(self.src) else None

    def eat(self, char: str) -> bool:
        if self.peek() == char:
            self.pos += 1
            return True
        return False

    def at_end_anchor(self) -> bool:
        return self.eat("$") and self.pos == len(self.src)

    def alternation(self) -> Node:
        branches = [self.sequence()]
        while self.eat("|"):
            branches.append(self.sequence())
        return branches[0] if len(branches) == 1 else _Alt(tuple(branches))

    def sequence(self) -> Node:
        items: list[Node] = []
        while (c := self.peek()) is not None and c not in "|)":
            if c == "$" and self.pos == len(self.src) - 1:
                break
            items.append(self.quantified(self.atom()))
        return _Seq(tuple(items))

    def quantified(self, atom: Node) -> Node:
        c = self.peek()
        if c == "*":
            least, most = 0, None
        elif c == "+":
            least, most = 1, None
        elif c == "?":
            least, most = 0, 1
        elif c == "{" and self._is_counted():
            return self._counted(atom)
        else:
            return atom
        self.pos += 1
        self.eat("?")  # lazy: the same strings
        return _Rep(atom, least, most)

    def _is_counted(self) -> bool:
        end = self.src.find("}", self.pos)
        inner = self.src[self.pos + 1 : end] if end > 0 else ""
        return bool(inner) and all(ch.isdigit() or ch == "," for ch in inner) and inner[0].isdigit()

    def _counted(self, atom: Node) -> Node:
        end = self.src.index("}", self.pos)
        inner = self.src[self.pos + 1 : end]
        self.pos = end + 1
        self.eat("?")
        lo, _, hi = inner.partition(",")
        least = int(lo)
        most = least if "," not in inner else (int(hi) if hi else None)
        if least > MAX_REPEAT or (most is not None and (most > MAX_REPEAT or most < least)):
            raise PatternError(f"the count {{{inner}}} (at most {MAX_REPEAT}, and in order)")
        return _Rep(atom, least, most)

    def atom(self) -> Node:
        c = self.src[self.pos]
        self.pos += 1
        if c == "(":
            if self.eat("?") and not self.eat(":"):
                raise PatternError("lookarounds and named groups are not supported")
            node = self.alternation()
            if not self.eat(")"):
                raise PatternError("a group is not closed")
            return node
        if c == "[":
            return self.char_class()
        if c == ".":
            return _Any()
        if c == "\\":
            return self.escape(in_class=False)
        if c in "*+?{":
            if c == "{":
                return Chars.of(c)
            raise PatternError(f"nothing to repeat before {c!r}")
        if c in "^$":
            raise PatternError(f"{c!r} inside the pattern")
        return Chars.of(c)

    def escape(self, in_class: bool) -> Chars:
        if self.pos >= len(self.src):
            raise PatternError("a trailing backslash")
        c = self.src[self.pos]
        self.pos += 1
        if c.lower() in _CLASSES:
            chars = _CLASSES[c.lower()]
            return chars.negated() if c.isupper() else chars
        if c in _ESCAPES:
            return Chars.of(_ESCAPES[c])
        if c == "u" and len(self.src) >= self.pos + 4:
            code = self.src[self.pos : self.pos + 4]
            self.pos += 4
            try:
                return Chars.ranges_of([(int(code, 16), int(code, 16))])
            except ValueError:
                raise PatternError(f"the escape \\u{code}") from None
        if c.isdigit() or c in "bBkpP":
            raise PatternError(f"the escape \\{c} (backreferences, word boundaries, properties)")
        return Chars.of(c)

    def char_class(self) -> Chars:
        negate = self.eat("^")
        ranges: list[tuple[int, int]] = []
        first = True
        while True:
            if self.pos >= len(self.src):
                raise PatternError("a class is not closed")
            c = self.src[self.pos]
            if c == "]" and not first:
                self.pos += 1
                break
            first = False
            self.pos += 1
            lo_set = self.escape(in_class=True) if c == "\\" else Chars.of(c)
            if (
                len(lo_set.ranges) == 1
                and lo_set.ranges[0][0] == lo_set.ranges[0][1]
                and self.peek() == "-"
                and self.pos + 1 < len(self.src)
                and self.src[self.pos + 1] != "]"
            ):
                self.pos += 1
                h = self.src[self.pos]
                self.pos += 1
                hi_set = self.escape(in_class=True) if h == "\\" else Chars.of(h)
                lo, hi = lo_set.ranges[0][0], hi_set.ranges[0][0]
                if hi < lo:
                    raise PatternError("a range out of order")
                ranges.append((lo, hi))
            else:
                ranges.extend(lo_set.ranges)
        chars = Chars.ranges_of(ranges)
        return chars.negated() if negate else chars


class _Emitter:
    def __init__(self, builder: Builder, allowed: Chars, any_char: str, hint: str) -> None:
        self.b = builder
        self.allowed = allowed
        self.any_char = any_char
        self.hint = hint

    def node(self, node: Node) -> Alternative:
        if isinstance(node, _Any):
            return (self.any_char,)
        if isinstance(node, Chars):
            chars = node.intersect(self.allowed)
            if chars.empty:
                raise PatternError("it needs a character a JSON string must escape")
            return (chars,)
        if isinstance(node, _Seq):
            return tuple(s for part in node.items for s in self.node(part))
        if isinstance(node, _Alt):
            return (self.b.rule(self.hint, [self.node(part) for part in node.branches]),)
        return self.b.repeat(self.node(node.node), node.least, node.most, self.hint)

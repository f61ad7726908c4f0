"""The grammar of what may follow a text: for a grammar G and a text p, one whose language is every w with p + w
in G. A constrained request that leaves the engine (a flow-control pause, a worker restart) and comes back with
its text so far in its prompt goes on with this grammar, so its document continues where it is instead of
starting again.

An Earley parser reads p over G's characters. Each item in the last chart set that a character of p moved past a
terminal stands for one way the document can go on: the rest of its alternative, then whatever followed the rule
it is in where that rule began (the items that predicted it, in turn). Those become new rules, beside G's; G has
no left recursion (schema.py writes repetition to the right), so none of them refers to itself before a character.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tokenwire.engine.grammar.bnf import Alternative, Chars, Grammar

Item = tuple[str, int, int, int]  # rule, alternative, dot, origin (the chart set where the rule began)


class NotAPrefix(ValueError):
    """The text is not the beginning of any document of the grammar."""


@dataclass(slots=True)
class _Set:
    items: set[Item] = field(default_factory=set)
    waiting: dict[str, list[Item]] = field(default_factory=dict)  # rule -> items whose dot is before it


def residual(grammar: Grammar, text: str) -> Grammar:
    """G's rules with a new start: the documents' rests after ``text`` (NotAPrefix if none begins with it)."""
    if not text:
        return grammar
    chart, scanned = _parse(grammar, text)
    out = Grammar(dict(grammar.rules), "")
    names: dict[tuple[str, ...], str] = {}

    def fresh(kind: str, key: tuple[str, ...]) -> tuple[str, bool]:
        name = names.get(key)
        if name is not None:
            return name, False
        name = f"{kind}_r{len(names)}"
        names[key] = name
        return name, True

    def rest(item: Item) -> str:
        """The rule: the rest of ``item``'s alternative, then what follows its rule."""
        rule, alt, dot, origin = item
        name, new = fresh("rest", ("rest", rule, str(alt), str(dot), str(origin)))
        if new:
            out.rules[name] = []  # defined before its parts: they may come back to it
            symbols: Alternative = grammar.rules[rule][alt][dot:]
            out.rules[name] = [(*symbols, after(rule, origin))]
        return name

    def after(rule: str, origin: int) -> str:
        """The rule: what may follow ``rule`` begun at chart set ``origin`` (the document's end, for the start)."""
        name, new = fresh("after", ("after", rule, str(origin)))
        if new:
            out.rules[name] = []
            alternatives: list[Alternative] = [()] if rule == grammar.start and origin == 0 else []
            for parent_rule, parent_alt, parent_dot, parent_origin in chart[origin].waiting.get(rule, ()):
                alternatives.append((rest((parent_rule, parent_alt, parent_dot + 1, parent_origin)),))
            out.rules[name] = alternatives
        return name

    out.start, _ = fresh("start", ("start",))
    out.rules[out.start] = [(rest(item),) for item in sorted(scanned)]
    return out


def accepts(grammar: Grammar, text: str) -> bool:
    """Whether ``text`` is a whole document of ``grammar``."""
    try:
        chart, _ = _parse(grammar, text)
    except NotAPrefix:
        return False
    rules = grammar.rules
    return any(
        rule == grammar.start and origin == 0 and dot == len(rules[rule][alt])
        for rule, alt, dot, origin in chart[-1].items
    )


def _parse(grammar: Grammar, text: str) -> tuple[list[_Set], set[Item]]:
    """The Earley chart of ``text`` (one set per position), and the items of the last set that scanned its last
    character."""
    rules = grammar.rules
    nullable = _nullable(grammar)
    chart = [_Set()]
    _close(chart, 0, {(grammar.start, a, 0, 0) for a in range(len(rules[grammar.start]))}, rules, nullable)
    scanned: set[Item] = set()
    for i, char in enumerate(text):
        scanned = set()
        for rule, alt, dot, origin in chart[i].items:
            symbols = rules[rule][alt]
            if dot < len(symbols):
                symbol = symbols[dot]
                if isinstance(symbol, Chars) and symbol.matches(char):
                    scanned.add((rule, alt, dot + 1, origin))
        if not scanned:
            raise NotAPrefix(f"the text does not fit the grammar at character {i} ({char!r})")
        chart.append(_Set())
        _close(chart, i + 1, set(scanned), rules, nullable)
    return chart, scanned


def _close(
    chart: list[_Set], i: int, seeds: set[Item], rules: dict[str, list[Alternative]], nullable: set[str]
) -> None:
    """Predict and complete from ``seeds`` until chart set ``i`` has every item it implies."""
    here = chart[i]
    agenda = [item for item in seeds if item not in here.items]
    here.items.update(agenda)

    def add(item: Item) -> None:
        if item not in here.items:
            here.items.add(item)
            agenda.append(item)

    while agenda:
        item = agenda.pop()
        rule, alt, dot, origin = item
        symbols = rules[rule][alt]
        if dot == len(symbols):  # complete: advance whoever waited for this rule where it began
            for parent in list(chart[origin].waiting.get(rule, ())):
                add((parent[0], parent[1], parent[2] + 1, parent[3]))
            continue
        symbol = symbols[dot]
        if isinstance(symbol, Chars):
            continue
        waiting = here.waiting.setdefault(symbol, [])
        waiting.append(item)
        if len(waiting) == 1:  # first time this rule is wanted here: predict it
            for a in range(len(rules[symbol])):
                add((symbol, a, 0, i))
        if symbol in nullable:  # it may be empty: step over it (completion would not, it began here)
            add((rule, alt, dot + 1, origin))


def _nullable(grammar: Grammar) -> set[str]:
    found: set[str] = set()
    changed = True
    while changed:
        changed = False
        for name, alternatives in grammar.rules.items():
            if name in found:
                continue
            if any(all(isinstance(s, str) and s in found for s in alt) for alt in alternatives):
                found.add(name)
                changed = True
    return found

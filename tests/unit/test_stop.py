"""Stop strings are cut from the text and no part of one is ever sent."""

from __future__ import annotations

import pytest

from tokenwire.engine.stop import StopStringFilter


def run(stops: tuple[str, ...], deltas: list[str]) -> tuple[str, bool, list[str]]:
    f = StopStringFilter(stops)
    sent: list[str] = []
    for d in deltas:
        r = f.push(d)
        sent.append(r.text)
        if r.stopped:
            return "".join(sent), True, sent
    sent.append(f.flush())
    return "".join(sent), False, sent


def test_stop_string_spanning_three_deltas_is_cut_and_never_sent() -> None:
    text, stopped, sent = run(("END",), ["Hello E", "N", "D and more"])
    assert stopped
    assert text == "Hello "
    assert all("E" not in s for s in sent)


def test_text_held_back_is_released_when_it_turns_out_not_to_be_a_stop() -> None:
    text, stopped, sent = run(("END",), ["Hello E", "N", "x"])
    assert not stopped
    assert text == "Hello ENx"
    assert sent[0] == "Hello "  # "E" was held until "x" proved it harmless


def test_held_text_is_released_at_the_end_of_the_generation() -> None:
    text, stopped, _ = run(("END",), ["abc E"])
    assert not stopped and text == "abc E"


def test_earliest_of_several_stop_strings_wins() -> None:
    text, stopped, _ = run(("world", "lo"), ["Hello world"])
    assert stopped and text == "Hel"


def test_stop_at_the_very_start_sends_nothing() -> None:
    text, stopped, _ = run(("\n\n",), ["\n", "\nrest"])
    assert stopped and text == ""


@pytest.mark.parametrize("split", range(1, 12))
def test_any_split_of_the_text_gives_the_same_result(split: int) -> None:
    full = "one two <stop> three"
    text, stopped, _ = run(("<stop>",), [full[:split], full[split:]])
    assert stopped and text == "one two "


def test_no_stop_strings_passes_everything_through() -> None:
    assert run((), ["a", "b"])[0] == "ab"

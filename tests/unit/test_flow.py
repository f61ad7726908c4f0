"""server/streaming/flow.py: one rule for pausing a generation whose reader is behind, and letting it go on."""

from __future__ import annotations

from tokenwire.server.streaming.flow import SOCKET_UNREAD, Change, Valve, WaterMarks


def test_a_valve_pauses_at_the_high_mark_and_goes_on_at_the_low_one_once_each() -> None:
    valve = Valve(WaterMarks.halving(64))
    assert [valve.update(level) for level in (0, 63)] == [None, None]
    assert valve.update(64) is Change.PAUSE and valve.paused
    assert [valve.update(level) for level in (100, 64, 33)] == [None, None, None]  # between the marks: still paused
    assert valve.update(32) is Change.GO_ON and not valve.paused
    assert valve.update(40) is None  # under the high mark again: going on


def test_force_pauses_whatever_the_level_and_hold_keeps_it_paused() -> None:
    valve = Valve(WaterMarks.halving(64))
    assert valve.update(0, force=True, hold=True) is Change.PAUSE  # the reader is gone
    assert valve.update(0, hold=True) is None  # still gone
    assert valve.update(0) is Change.GO_ON  # back, and caught up


def test_a_high_mark_of_zero_pauses_only_when_forced_and_goes_on_at_once() -> None:
    valve = Valve(WaterMarks.halving(0))
    assert not valve.marks.enabled and valve.update(10**9) is None
    assert valve.update(10**9, force=True) is Change.PAUSE
    assert valve.update(10**9) is Change.GO_ON


def test_every_door_shares_the_socket_marks_16_kib_and_half() -> None:
    from tokenwire.server.streaming.flow import FlowPolicy

    assert WaterMarks(16 << 10, 8 << 10) == SOCKET_UNREAD
    assert FlowPolicy().max_socket_bytes == SOCKET_UNREAD.high
    assert FlowPolicy(max_unsent_tokens=64).unsent_tokens == WaterMarks(64, 32)


class _Transport:
    """A transport whose write buffer holds ``levels`` bytes in turn (then the last one), and no socket."""

    def __init__(self, levels: list[int]) -> None:
        self.levels = levels

    def get_extra_info(self, name: str) -> None:
        return None

    def get_write_buffer_size(self) -> int:
        return self.levels.pop(0) if len(self.levels) > 1 else self.levels[0]


async def test_room_waits_for_a_reader_that_reads_and_gives_up_on_one_that_takes_nothing() -> None:
    """A socket under the limit has room at once; one over it has room once its reader takes enough, however slowly
    (each poll a little less unread restarts the clock); one whose unread bytes never go down is stuck after
    ``stuck_after`` seconds; an unknown backlog or a limit of 0 never waits."""
    from tokenwire.server.streaming.backlog import Backlog

    assert await Backlog(_Transport([10])).room(100, 0.05)
    slow = [200 - 10 * i for i in range(12)]  # drains below 100 after 11 polls, longer than stuck_after
    assert await Backlog(_Transport(slow)).room(100, 0.05, poll=0.01)
    assert not await Backlog(_Transport([500])).room(100, 0.05, poll=0.01)
    assert await Backlog(None).room(100, 0.05) and await Backlog(_Transport([500])).room(0, 0.05)

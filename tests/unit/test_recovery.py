"""Who goes on after a backend's process dies, who is to blame, and when the engine gives up (engine/recovery.py)."""

from __future__ import annotations

from tokenwire.engine.recovery import RestartBudget, Triage


def test_after_a_first_death_everyone_goes_on_together() -> None:
    triage = Triage()
    assert triage.lost(["a", "b"]) == (None, ["a", "b"])
    assert triage.may_admit("a", 0) and triage.may_admit("b", 1)


def test_a_request_alone_in_the_process_at_its_second_death_is_the_culprit() -> None:
    triage = Triage()
    assert triage.lost(["a"]) == (None, ["a"])  # once alone: an operator's kill, the OOM killer...
    assert triage.lost(["a"]) == ("a", [])


def test_suspects_go_first_run_alone_one_at_a_time_and_are_cleared_after_their_probe() -> None:
    triage = Triage(probe_tokens=4)
    triage.lost(["a", "b", "c"])
    assert triage.lost(["c", "a", "new"]) == (None, ["c", "a", "new"])
    assert triage.suspect("c") and triage.suspect("a") and not triage.suspect("new")
    assert not triage.may_admit("c", 1)  # a suspect joins only an empty batch
    assert triage.may_admit("c", 0)
    triage.admitted("c")
    assert not triage.may_admit("new", 1) and not triage.may_admit("a", 0)  # nothing joins a probe
    assert not triage.made("c", 3)
    assert triage.made("c", 1)  # probe passed: cleared
    assert not triage.suspect("c") and triage.may_admit("a", 0)


def test_a_suspect_that_leaves_during_its_probe_ends_the_probe_without_clearing_it() -> None:
    triage = Triage()
    triage.lost(["a", "b"])
    triage.lost(["a", "b"])
    triage.admitted("a")
    triage.left("a")  # paused by flow control
    assert triage.probing is None and triage.suspect("a")


def test_the_budget_allows_limit_deaths_in_the_window_and_forgives_a_culprits() -> None:
    budget = RestartBudget(limit=3, window=300.0)
    assert budget.died(["a", "x"], 0.0) and budget.died(["a", "x"], 1.0) and budget.died(["a"], 2.0)
    budget.forgive("a")  # the three deaths were its doing
    assert budget.died([], 3.0) and budget.died([], 4.0) and budget.died([], 5.0)
    assert not budget.died([], 6.0)  # a fourth in five minutes that no request is blamed for
    assert budget.died([], 400.0)  # the window has passed

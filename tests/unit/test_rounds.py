"""Unit tests for client selection and the round state machine (aggregator/rounds.py).

Time is a plain float: the tests are the clock.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.rounds import RoundPhase, RoundState, Verdict, select_clients

BASE = "b" * 64
OTHER_BASE = "c" * 64
T0 = 1000.0
DEADLINE = T0 + 60.0


def _state(
    selected: tuple[str, ...] = ("c1", "c2", "c3"), min_clients: int = 2, round_id: int = 5
) -> RoundState:
    return RoundState(
        round_id=round_id,
        base_hash=BASE,
        selected=set(selected),
        min_clients=min_clients,
        deadline=DEADLINE,
        started_at=T0,
    )


def _online(n: int) -> list[str]:
    return [f"pi-{i:02d}" for i in range(n)]


# --- select_clients --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("n", "fraction", "min_clients", "expected"),
    [
        (10, 1.0, 2, 10),
        (10, 0.25, 2, 3),  # ceil(2.5) = 3
        (10, 0.1, 3, 3),  # min_clients wins over ceil(1.0) = 1
        (10, 0.5, 20, 10),  # capped at the online count
        (7, 0.01, 1, 1),
        (1, 0.5, 1, 1),
        (0, 0.5, 2, 0),
    ],
)
def test_selection_size_is_max_of_quorum_and_fraction_capped_at_online(
    n: int, fraction: float, min_clients: int, expected: int
) -> None:
    picked = select_clients(_online(n), fraction, min_clients, np.random.default_rng(0))

    assert len(picked) == expected


@settings(max_examples=100, deadline=None)
@given(
    n=st.integers(0, 40),
    fraction=st.floats(0.001, 1.0),
    min_clients=st.integers(1, 50),
    seed=st.integers(0, 2**32 - 1),
)
def test_selection_is_a_sorted_unique_subset_of_the_right_size(
    n: int, fraction: float, min_clients: int, seed: int
) -> None:
    online = _online(n)

    picked = select_clients(online, fraction, min_clients, np.random.default_rng(seed))

    assert len(picked) == min(n, max(min_clients, math.ceil(fraction * n)))
    assert set(picked) <= set(online)
    assert len(set(picked)) == len(picked)
    assert picked == sorted(picked)


def test_selection_is_deterministic_for_a_seed() -> None:
    online = _online(20)

    first = select_clients(online, 0.3, 2, np.random.default_rng(42))
    second = select_clients(online, 0.3, 2, np.random.default_rng(42))

    assert first == second


def test_selection_does_not_depend_on_online_order() -> None:
    online = _online(20)

    forward = select_clients(online, 0.3, 2, np.random.default_rng(7))
    backward = select_clients(list(reversed(online)), 0.3, 2, np.random.default_rng(7))

    assert forward == backward


def test_selection_varies_with_the_seed() -> None:
    online = _online(30)

    picks = {tuple(select_clients(online, 0.2, 1, np.random.default_rng(s))) for s in range(10)}

    assert len(picks) > 1


def test_duplicate_online_entries_are_counted_once() -> None:
    picked = select_clients(["a", "b", "a", "b"], 1.0, 1, np.random.default_rng(0))

    assert picked == ["a", "b"]


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.0001, 2.0, math.nan])
def test_fraction_out_of_range_is_rejected(fraction: float) -> None:
    with pytest.raises(ValueError, match="fraction"):
        select_clients(_online(5), fraction, 1, np.random.default_rng(0))


# --- RoundState construction -----------------------------------------------------------------


def test_round_needs_positive_min_clients() -> None:
    with pytest.raises(ValueError, match="min_clients"):
        _state(min_clients=0)


def test_round_needs_a_selected_client() -> None:
    with pytest.raises(ValueError, match="selected"):
        _state(selected=())


# --- phases ----------------------------------------------------------------------------------


def test_new_round_is_open_before_deadline() -> None:
    assert _state().phase(T0) is RoundPhase.OPEN


def test_round_stays_open_while_some_selected_have_not_reported() -> None:
    state = _state()
    state.accept("c1", 10)
    state.accept("c2", 10)

    assert state.phase(T0 + 30) is RoundPhase.OPEN


def test_round_is_complete_when_every_selected_client_is_accepted() -> None:
    state = _state()

    for cid in ("c1", "c2", "c3"):
        state.accept(cid, 10)

    assert state.phase(T0 + 1) is RoundPhase.COMPLETE


def test_complete_takes_precedence_over_deadline() -> None:
    state = _state()
    for cid in ("c1", "c2", "c3"):
        state.accept(cid, 10)

    assert state.phase(DEADLINE + 100) is RoundPhase.COMPLETE


def test_deadline_with_quorum_gives_quorum() -> None:
    state = _state(min_clients=2)
    state.accept("c1", 10)
    state.accept("c3", 20)

    assert state.phase(DEADLINE) is RoundPhase.QUORUM


def test_deadline_below_quorum_gives_starved() -> None:
    state = _state(min_clients=2)
    state.accept("c1", 10)

    assert state.phase(DEADLINE) is RoundPhase.STARVED


def test_just_before_deadline_is_still_open() -> None:
    state = _state(min_clients=2)
    state.accept("c1", 10)

    assert state.phase(DEADLINE - 1e-6) is RoundPhase.OPEN


def test_extend_reopens_a_starved_round_with_new_deadline_and_clients() -> None:
    state = _state(min_clients=2)
    state.accept("c1", 10)
    assert state.phase(DEADLINE) is RoundPhase.STARVED

    state.extend(DEADLINE + 30, ["c4", "c5"])

    assert state.phase(DEADLINE + 1) is RoundPhase.OPEN
    assert state.deadline == DEADLINE + 30
    assert {"c4", "c5"} <= state.selected
    assert state.extensions == 1


def test_client_added_by_extend_can_then_be_accepted() -> None:
    state = _state(min_clients=2)
    state.accept("c1", 10)
    state.extend(DEADLINE + 30, ["c4"])

    verdict = state.screen("c4", 5, BASE)
    state.accept("c4", 10)

    assert verdict.accepted
    assert state.phase(DEADLINE + 30) is RoundPhase.QUORUM


def test_closed_round_reports_closed() -> None:
    state = _state()
    state.accept("c1", 10)

    state.close()

    assert state.phase(T0) is RoundPhase.CLOSED
    assert state.phase(DEADLINE + 100) is RoundPhase.CLOSED


# --- screening -------------------------------------------------------------------------------


def test_selected_client_with_current_round_and_base_is_accepted() -> None:
    assert _state().screen("c1", 5, BASE) == Verdict("accepted")


def test_duplicate_update_from_same_client_is_rejected() -> None:
    state = _state()
    state.accept("c1", 10)

    verdict = state.screen("c1", 5, BASE)

    assert not verdict.accepted
    assert verdict.reason.startswith("duplicate")


def test_accepting_a_duplicate_raises() -> None:
    state = _state()
    state.accept("c1", 10)

    with pytest.raises(ValueError, match="duplicate"):
        state.accept("c1", 10)

    assert state.accepted == {"c1": 10}


def test_update_for_a_future_round_is_rejected() -> None:
    verdict = _state(round_id=5).screen("c1", 6, BASE)

    assert not verdict.accepted
    assert verdict.reason.startswith("wrong round")


@pytest.mark.parametrize("past", [0, 4])
def test_update_for_a_past_round_is_late(past: int) -> None:
    verdict = _state(round_id=5).screen("c1", past, BASE)

    assert not verdict.accepted
    assert verdict.reason.startswith("late")


def test_update_for_a_closed_round_is_late() -> None:
    state = _state()
    state.close()

    verdict = state.screen("c1", 5, BASE)

    assert not verdict.accepted
    assert verdict.reason.startswith("late")


def test_unselected_client_is_rejected() -> None:
    verdict = _state().screen("intruder", 5, BASE)

    assert not verdict.accepted
    assert verdict.reason.startswith("not selected")


def test_stale_base_hash_is_rejected() -> None:
    verdict = _state().screen("c1", 5, OTHER_BASE)

    assert not verdict.accepted
    assert verdict.reason.startswith("stale base")


def test_accept_of_unselected_client_raises_and_records_nothing() -> None:
    state = _state()

    with pytest.raises(ValueError, match="not selected"):
        state.accept("intruder", 10)

    assert state.accepted == {}


def test_accept_records_samples_and_clears_earlier_rejection() -> None:
    state = _state()
    state.reject("c1", "invalid update: bad shape")

    state.accept("c1", 40)

    assert state.accepted == {"c1": 40}
    assert "c1" not in state.rejected


def test_reject_records_the_last_reason() -> None:
    state = _state()

    state.reject("c2", "first")
    state.reject("c2", "second")

    assert state.rejected == {"c2": "second"}


def test_num_samples_sums_accepted_updates() -> None:
    state = _state()
    state.accept("c1", 10)
    state.accept("c2", 30)

    assert state.num_samples == 40


def test_a_round_whose_selection_grew_is_complete_only_when_the_newcomers_report() -> None:
    state = _state()
    for cid in ("c1", "c2", "c3"):
        state.accept(cid, 10)
    state.extend(DEADLINE + 60, ["c4"])

    open_before = state.phase(T0 + 1)
    state.accept("c4", 10)

    assert (open_before, state.phase(T0 + 1)) == (RoundPhase.OPEN, RoundPhase.COMPLETE)


def test_a_round_is_complete_without_the_clients_that_declined_it() -> None:
    state = RoundState(1, "h" * 64, {"a", "b", "c"}, min_clients=2, deadline=100.0, started_at=0)
    state.accept("a", 10)
    state.decline("c", "wrong model")
    assert state.phase(now=1.0) is RoundPhase.OPEN  # b may still send

    state.accept("b", 10)

    assert state.phase(now=1.0) is RoundPhase.COMPLETE
    assert state.rejected == {"c": "wrong model"}


def test_declines_do_not_complete_a_round_below_quorum() -> None:
    state = RoundState(1, "h" * 64, {"a", "b", "c"}, min_clients=2, deadline=100.0, started_at=0)
    state.accept("a", 10)
    state.decline("b", "wrong model")
    state.decline("c", "wrong model")

    assert state.phase(now=1.0) is RoundPhase.OPEN


def test_a_final_refusal_of_a_client_not_selected_counts_as_a_rejection_only() -> None:
    state = RoundState(1, "h" * 64, {"a"}, min_clients=1, deadline=100.0, started_at=0)

    state.decline("intruder", "undecodable: not a frame")

    assert state.rejected == {"intruder": "undecodable: not a frame"} and not state.declined
    assert state.phase(now=1.0) is RoundPhase.OPEN  # a is still waited for

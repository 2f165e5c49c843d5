"""Per-requester budgets of the inference server (pure: time is passed in)."""

from __future__ import annotations

import pytest

from edge_agent.requester_budget import BudgetLimits, Outcome, RequesterBudgets, Verdict

LIMITS = BudgetLimits(
    requests_per_s=2.0,
    burst_requests=3,
    bytes_per_s=100.0,
    burst_bytes=1000,
    max_requesters=2,
    report_every_s=10.0,
)


def _verdicts(budgets: RequesterBudgets, who: str, count: int, now: float = 0.0) -> list[Verdict]:
    return [budgets.admit(who, 10, now) for _ in range(count)]


def test_burst_is_admitted_then_the_first_refusal_is_answered_and_the_rest_counted() -> None:
    budgets = RequesterBudgets(LIMITS)

    verdicts = _verdicts(budgets, "app", 6)

    assert verdicts == [Verdict.ADMIT] * 3 + [Verdict.REFUSE_AND_REPLY] + [Verdict.REFUSE] * 2


def test_budget_refills_at_the_configured_rate() -> None:
    budgets = RequesterBudgets(LIMITS)
    _verdicts(budgets, "app", 4)

    assert budgets.admit("app", 10, now=0.4) is Verdict.REFUSE  # 0.8 of a request refilled
    assert budgets.admit("app", 10, now=0.5) is Verdict.ADMIT


def test_bytes_budget_refuses_a_request_larger_than_what_is_left() -> None:
    budgets = RequesterBudgets(LIMITS)

    assert budgets.admit("app", 900, now=0.0) is Verdict.ADMIT
    assert budgets.admit("app", 200, now=0.0) is Verdict.REFUSE_AND_REPLY
    assert budgets.admit("app", 100, now=0.0) is Verdict.ADMIT


def test_one_requester_flooding_does_not_spend_another_requesters_budget() -> None:
    budgets = RequesterBudgets(LIMITS)
    _verdicts(budgets, "flooder", 50)

    assert _verdicts(budgets, "app", 3) == [Verdict.ADMIT] * 3


def test_newcomer_is_refused_while_the_table_is_full_of_active_requesters() -> None:
    budgets = RequesterBudgets(LIMITS)
    budgets.admit("a", 10, 0.0)
    budgets.admit("b", 10, 0.0)

    assert budgets.admit("c", 10, 0.0) is Verdict.REFUSE
    assert len(budgets) == 2


def test_newcomer_replaces_the_oldest_requester_once_its_budget_has_refilled() -> None:
    budgets = RequesterBudgets(LIMITS)
    budgets.admit("a", 10, 0.0)
    budgets.admit("b", 10, 0.0)

    assert budgets.admit("c", 10, now=1.0) is Verdict.ADMIT
    assert len(budgets) == 2


def test_report_is_one_line_per_requester_with_refusals_once_per_period() -> None:
    budgets = RequesterBudgets(LIMITS)
    _verdicts(budgets, "flooder", 8)
    budgets.admit("app", 10, 0.0)
    budgets.record("app", Outcome.ANSWERED)

    early = budgets.report(now=5.0)
    lines = budgets.report(now=10.0)
    after = budgets.report(now=20.0)

    assert early == []
    assert len(lines) == 1 and "requester 'flooder'" in lines[0]
    assert "5 refused over budget (50 bytes" in lines[0]
    assert after == []  # counters reset with each report


def test_error_replies_are_reported_for_the_period() -> None:
    budgets = RequesterBudgets(LIMITS)
    budgets.admit("app", 10, 0.0)
    budgets.record("app", Outcome.ERROR)

    (line,) = budgets.report(now=10.0)

    assert "0 answered, 1 error replies" in line


@pytest.mark.parametrize(
    "bad",
    [
        {"requests_per_s": 0.0},
        {"bytes_per_s": -1.0},
        {"burst_requests": 0},
        {"max_requesters": 0},
    ],
)
def test_limits_out_of_range_are_refused(bad: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BudgetLimits(**bad)  # type: ignore[arg-type]

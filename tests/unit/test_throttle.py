"""Per-sender token buckets and aggregated warnings (shared/throttle.py), on hand-moved time."""

from __future__ import annotations

import logging

import pytest

from shared.throttle import AggregatedLog, TokenBuckets

LOG = logging.getLogger("test.throttle")


# --- token buckets ------------------------------------------------------------------------
def test_a_new_key_may_send_its_burst_at_once_and_no_more() -> None:
    buckets = TokenBuckets(rate=1.0, burst=3)

    allowed = [buckets.allow("pi-0", now=0.0) for _ in range(5)]

    assert allowed == [True, True, True, False, False]


def test_an_empty_bucket_refills_at_the_rate() -> None:
    buckets = TokenBuckets(rate=2.0, burst=1)
    buckets.allow("pi-0", now=0.0)

    assert not buckets.allow("pi-0", now=0.4)  # 0.8 tokens
    assert buckets.allow("pi-0", now=0.5)  # 1.0 token
    assert not buckets.allow("pi-0", now=0.5)


def test_a_bucket_never_holds_more_than_its_burst() -> None:
    buckets = TokenBuckets(rate=10.0, burst=2)
    buckets.allow("pi-0", now=0.0)

    allowed = [buckets.allow("pi-0", now=3600.0) for _ in range(3)]

    assert allowed == [True, True, False]


def test_one_key_spending_its_tokens_leaves_the_others_untouched() -> None:
    buckets = TokenBuckets(rate=0.0, burst=2)
    for _ in range(100):
        buckets.allow("flooder", now=0.0)

    assert buckets.allow("honest", now=0.0)


def test_refill_gives_every_key_its_burst_again() -> None:
    buckets = TokenBuckets(rate=0.0, burst=1)
    buckets.allow("pi-0", now=0.0)

    buckets.refill()

    assert buckets.allow("pi-0", now=0.0)


def test_the_number_of_keys_is_bounded_by_forgetting_the_least_recently_seen() -> None:
    buckets = TokenBuckets(rate=0.0, burst=1, max_keys=2)
    buckets.allow("a", now=0.0)
    buckets.allow("b", now=0.0)
    buckets.allow("a", now=0.0)  # "a" is now the most recently seen

    buckets.allow("c", now=0.0)  # "b" is forgotten

    assert len(buckets._buckets) == 2
    assert buckets.allow("b", now=0.0)  # a fresh, full bucket
    assert not buckets.allow("c", now=0.0)


@pytest.mark.parametrize("rate, burst", [(-1.0, 1), (1.0, 0)])
def test_nonsense_bounds_are_refused(rate: float, burst: int) -> None:
    with pytest.raises(ValueError):
        TokenBuckets(rate=rate, burst=burst)


# --- aggregated warnings -------------------------------------------------------------------
def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOG.name]


def test_the_first_warning_of_a_key_is_written_at_once(caplog: pytest.LogCaptureFixture) -> None:
    agg = AggregatedLog(LOG, interval_s=10.0)

    written = agg.warn("pi-0", 0.0, "bad update from %s", "pi-0")

    assert written is True
    assert _lines(caplog) == ["bad update from pi-0"]


def test_repeats_within_the_interval_become_one_line_with_a_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agg = AggregatedLog(LOG, interval_s=10.0)
    written = [agg.warn("pi-0", t / 1000, "junk number %d", t) for t in range(1000)]

    agg.flush(now=10.0)

    assert written.count(True) == 1
    assert _lines(caplog) == [
        "junk number 0",
        "pi-0: 999 more like this within 10s; the last: junk number 999",
    ]


def test_each_key_has_its_own_interval(caplog: pytest.LogCaptureFixture) -> None:
    agg = AggregatedLog(LOG, interval_s=10.0)
    agg.warn("flooder", 0.0, "junk")
    agg.warn("flooder", 1.0, "junk")

    written = agg.warn("honest", 2.0, "one bad status")

    assert written is True
    assert _lines(caplog) == ["junk", "one bad status"]


def test_a_key_is_written_at_once_again_after_its_interval(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agg = AggregatedLog(LOG, interval_s=10.0)
    agg.warn("pi-0", 0.0, "first")

    written = agg.warn("pi-0", 10.0, "second")

    assert written is True
    assert _lines(caplog) == ["first", "second"]  # no summary: nothing was counted


def test_close_writes_pending_counts(caplog: pytest.LogCaptureFixture) -> None:
    agg = AggregatedLog(LOG, interval_s=10.0)
    agg.warn("pi-0", 0.0, "junk")
    agg.warn("pi-0", 0.1, "junk")

    agg.close()

    assert _lines(caplog)[-1] == "pi-0: 1 more like this within 10s; the last: junk"


def test_the_number_of_open_keys_is_bounded_and_an_evicted_key_keeps_its_count(
    caplog: pytest.LogCaptureFixture,
) -> None:
    agg = AggregatedLog(LOG, interval_s=10.0, max_keys=2)
    agg.warn("a", 0.0, "from a")
    agg.warn("a", 0.0, "from a again")
    agg.warn("b", 0.0, "from b")

    agg.warn("c", 0.0, "from c")

    assert len(agg._open) == 2
    assert "a: 1 more like this within 10s; the last: from a again" in _lines(caplog)

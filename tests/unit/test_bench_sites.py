"""``fedmq bench sites`` bookkeeping: flags, the loopback bridge, rows and the comparison."""

from __future__ import annotations

import argparse

import pytest

from aggregator.ops.bench.sites import (
    add_arguments,
    bridge_config,
    complete,
    device_ids,
    observed_topics,
)
from aggregator.ops.bench.sites_cut import (
    BridgeCut,
    check_cut_arguments,
    cut_rounds,
    cut_summary,
    cut_verdict,
)
from aggregator.ops.bench.sites_report import (
    SitesEvents,
    compare,
    layout_rows,
    markdown_table,
    summary,
)
from aggregator.ops.bridge import topic_lines
from shared.protocol import messages as msg
from shared.protocol.topics import Topics

T = Topics("sites")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_have_the_defaults_of_this_machine() -> None:
    args = _parse([])
    assert (args.sites, args.agents_per_site, args.rounds) == (4, 25, 5)
    assert (args.samples_per_agent, args.codec, args.model) == (60, "int8", "lenet5")


def test_flags_take_sites_devices_and_rounds() -> None:
    args = _parse(["--sites", "2", "--agents-per-site", "3", "--rounds", "2", "--codec", "fp32"])
    assert (args.sites, args.agents_per_site, args.rounds, args.codec) == (2, 3, 2, "fp32")


@pytest.mark.parametrize("bad", [["--sites", "0"], ["--agents-per-site", "-1"], ["--rounds", "x"]])
def test_flags_refuse_non_positive_sizes(bad: list[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(bad)


def test_each_site_gets_its_own_consecutive_devices() -> None:
    by_site = device_ids(2, 3)
    assert by_site == {
        "site-0": ["dev-00000", "dev-00001", "dev-00002"],
        "site-1": ["dev-00003", "dev-00004", "dev-00005"],
    }


def test_the_bridge_carries_the_generated_topic_lines_and_notifications() -> None:
    conf = bridge_config("sites", "site-1", 18830)
    lines = conf.splitlines()
    assert lines[0] == "connection fedmq-site-site-1"
    assert "address 127.0.0.1:18830" in lines
    assert "notification_topic fl/v1/sites/sites/site-1/bridge" in lines
    assert "local_clientid fedmq:bridge:site-1" in lines
    for setting in ("cleansession false", "local_cleansession false", "try_private true"):
        assert setting in lines
    assert "bridge_protocol_version mqttv311" in lines
    assert [line for line in lines if line.startswith("topic ")] == topic_lines("sites", "site-1")
    assert not any(line.startswith(("bridge_cafile", "remote_password")) for line in lines)


def test_the_observer_follows_updates_partials_and_their_chunks() -> None:
    subs = observed_topics("sites")
    for topic in (T.update_any, f"{T.update_any}/chunk/+", T.site_partial_any):
        assert topic in subs
    assert "$SYS/broker/bytes/received" in subs


def _events(layout: str) -> SitesEvents:
    """Two rounds announced at t=10 and t=20; $SYS bytes received at t=9, 19 and 30."""
    ev = SitesEvents()
    for r, t in ((1, 10.0), (2, 20.0)):
        ann = msg.RoundStart(
            federation="sites",
            round=r,
            base_hash="a" * 64,
            selected=["site-0"],
            deadline=t + 60,
            ts=t,
            model=msg.ModelSpec(arch="lenet5", input_shape=(1, 28, 28), num_classes=10),
            train=msg.TrainParams(),
        )
        ev.record(T.round_start(r), ann.to_json(), t + 0.1)
        if layout == "flat":
            ev.record(T.update(r, "dev-00000"), b"u" * 400, t + 1)
            ev.record(T.update(r, "dev-00001"), b"u" * 400, t + 1)
        else:
            ev.record(T.site_partial(r, "site-0"), b"p" * 100, t + 1)
            ev.record(f"{T.site_partial(r, 'site-0')}/chunk/1", b"p" * 50, t + 1)
    counters = (1000.0, 5000.0, 8000.0) if layout == "flat" else (1000.0, 2000.0, 4000.0)
    for t, v in zip((9.0, 19.0, 30.0), counters, strict=True):
        ev.record("$SYS/broker/bytes/received", str(v).encode(), t)
    return ev


def _metrics(participants: list[str], accuracies: list[float]) -> list[dict[str, object]]:
    return [
        {"round": r, "participants": participants, "test_accuracy": a, "round_time_s": 1.5}
        for r, a in enumerate(accuracies, start=1)
    ]


def test_rows_take_wan_bytes_per_round_from_sys_and_payloads_from_the_observer() -> None:
    flat = layout_rows("flat", _events("flat"), _metrics(["dev-00000", "dev-00001"], [0.5, 0.6]))
    sites = layout_rows("sites", _events("sites"), _metrics(["site-0"], [0.51, 0.598]))

    assert [r["wan_bytes"] for r in flat] == [4000, 3000]
    assert [r["wan_bytes"] for r in sites] == [1000, 2000]
    assert [(r["update_payload_bytes"], r["updates_on_central"]) for r in flat] == [(800, 2)] * 2
    # A chunk's bytes count with its partial, the partial once.
    assert [(r["partial_payload_bytes"], r["partials"]) for r in sites] == [(150, 1)] * 2
    assert all(r["applied"] and r["participants_unique"] for r in flat + sites)


def test_the_comparison_gives_the_ratio_and_the_largest_accuracy_difference() -> None:
    flat = layout_rows("flat", _events("flat"), _metrics(["a", "b"], [0.5, 0.6]))
    sites = layout_rows("sites", _events("sites"), _metrics(["site-0"], [0.51, 0.598]))

    table = compare(flat, sites)
    summ = summary(table)

    assert [row["accuracy_diff_pts"] for row in table] == [1.0, -0.2]
    assert summ["max_abs_accuracy_diff_pts"] == 1.0
    assert summ["wan_ratio"] == round(3500 / 1500, 2)
    assert summ["payload_ratio"] == round(800 / 150, 2)
    assert "| 1 | 4,000 | 1,000 |" in markdown_table(table, summ)


def test_summary_without_measurements_has_no_ratio() -> None:
    summ = summary(compare([], []))
    assert summ["wan_ratio"] is None and summ["max_abs_accuracy_diff_pts"] is None


def _row(r: int, **kw: object) -> dict[str, object]:
    base = {"round": r, "applied": True, "participants": 2, "participants_unique": True}
    base.update(partials=2, partial_sites=2, updates_on_central=0)
    return {**base, **kw}


def test_a_run_is_complete_when_both_layouts_applied_every_round_with_one_partial_per_site() -> (
    None
):
    runs = {
        "flat": {"rows": [_row(1, participants=6), _row(2, participants=6)], "exit": 0},
        "sites": {"rows": [_row(1), _row(2)], "exit": 0},
    }
    assert complete(runs, rounds=2, sites=2)
    runs["sites"]["rows"][1] = _row(2, partials=3)  # a partial counted twice
    assert not complete(runs, rounds=2, sites=2)
    runs["sites"]["rows"][1] = _row(2)
    runs["flat"]["rows"].pop()
    assert not complete(runs, rounds=2, sites=2)


def _cut_args(*argv: str) -> argparse.Namespace:
    return _parse(["--sites", "2", "--rounds", "6", *argv])


def test_cut_flags_name_a_site_and_leave_a_round_after_the_cut() -> None:
    sites = ["site-0", "site-1"]
    assert check_cut_arguments(_cut_args(), sites) is None
    assert check_cut_arguments(_cut_args("--cut-site", "site-1"), sites) is None
    # Rounds 2 and 3, and round 4, announced at the heal before the bridge is back.
    assert cut_rounds(_cut_args("--cut-site", "site-1")) == [2, 3, 4]
    assert "not one of" in str(check_cut_arguments(_cut_args("--cut-site", "x"), sites))
    late = _cut_args("--cut-site", "site-1", "--cut-rounds", "3")
    assert "--rounds at least 7" in str(check_cut_arguments(late, sites))
    assert "--sites 2 or more" in str(check_cut_arguments(_cut_args("--cut-site", "a"), ["a"]))


class _FakeProxy:
    def __init__(self) -> None:
        self.calls: list[str] = []

    def cut(self) -> None:
        self.calls.append("cut")

    def heal(self) -> None:
        self.calls.append("heal")


def _status(site: str, open_round: int) -> bytes:
    return msg.SiteStatus(site=site, state="online", devices=3, open_round=open_round).to_json()


def test_the_bridge_is_cut_when_the_site_sums_the_first_round_and_healed_k_rounds_later() -> None:
    proxy = _FakeProxy()
    cut = BridgeCut("site-1", proxy, first=2, rounds=2)  # type: ignore[arg-type]
    ev = _events("sites")  # rounds 1 and 2 announced

    cut.follow(ev)
    assert proxy.calls == []  # round 2 announced, the site not summing it yet
    ev.record(T.site_status("site-1"), _status("site-1", 2), 21.0)
    cut.follow(ev)
    cut.follow(ev)
    assert proxy.calls == ["cut"]
    ev.starts[4] = ev.starts[2]
    cut.follow(ev)
    cut.heal("the run ended")
    assert proxy.calls == ["cut", "heal"]


def _receipt(r: int, site: str, code: str) -> bytes:
    status = "accepted" if code == "accepted" else "rejected"
    return msg.Receipt(round=r, client_id=site, status=status, code=code).to_json()  # type: ignore[arg-type]


def test_a_cut_rounds_partial_refused_late_is_not_counted_twice() -> None:
    ev = _events("sites")
    ev.record(T.site_receipt(2, "site-0"), _receipt(2, "site-0", "accepted"), 25.0)
    ev.record(T.site_receipt(2, "site-1"), _receipt(2, "site-1", "late"), 60.0)
    ev.partials[2].append("site-1")
    metrics = [
        {"round": 2, "participants": ["site-0"]},
        {"round": 3, "participants": ["site-0"]},
        {"round": 4, "participants": ["site-0", "site-1"]},
    ]

    verdict = cut_verdict("site-1", metrics, ev)

    assert verdict["ok"] and verdict["rejoined_at"] == 4
    assert [(r["receipts"], r["counted"]) for r in verdict["rounds"]] == [(["late"], 0), ([], 0)]
    assert "nothing counted twice" in cut_summary(verdict)
    # A site that never came back before the end fails the verdict.
    assert not cut_verdict("site-1", metrics[:2], ev)["ok"]


def test_a_cut_rounds_partial_counted_without_an_accepted_receipt_fails_the_verdict() -> None:
    ev = _events("sites")
    ev.partials[2].append("site-1")
    metrics = [{"round": 2, "participants": ["site-0", "site-1"]}]

    verdict = cut_verdict("site-1", metrics, ev)

    assert not verdict["ok"]
    assert "COUNTED TWICE OR LOST" in cut_summary(verdict)


def test_a_run_with_a_cut_skips_the_partial_count_of_the_cut_rounds() -> None:
    runs = {
        "flat": {"rows": [_row(r, participants=6) for r in (1, 2, 3)], "exit": 0},
        "sites": {
            "rows": [_row(1), _row(2, participants=1, partials=1, partial_sites=1), _row(3)],
            "exit": 0,
            "cut": {"ok": True},
        },
    }
    assert complete(runs, rounds=3, sites=2, cut=[2])
    assert not complete(runs, rounds=3, sites=2)
    runs["sites"]["cut"] = {"ok": False}
    assert not complete(runs, rounds=3, sites=2, cut=[2])

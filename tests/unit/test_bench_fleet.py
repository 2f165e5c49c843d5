"""``fedmq bench fleet`` bookkeeping: flags, id ranges, shards and the rows from recorded events."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.ops.bench.fleet import _split, add_arguments, broker_config, write_shards
from aggregator.ops.bench.fleet_agents import parse_ids
from aggregator.ops.bench.fleet_report import (
    FleetEvents,
    markdown_table,
    medians_by_size,
    round_rows,
    run_summary,
)
from shared.protocol import messages as msg
from shared.protocol.topics import Topics
from shared.runtime.data import ArrayDataset, load_device_data

T = Topics("fleet")
SPEC = msg.ModelSpec(arch="lenet5", input_shape=(1, 28, 28), num_classes=10)


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def test_flags_take_a_list_of_fleet_sizes() -> None:
    args = _parse(["--agents", "10,100,1000", "--rounds", "2", "--codec", "lowrank:4+int4"])
    assert (args.agents, args.rounds, args.codec) == ([10, 100, 1000], 2, "lowrank:4+int4")
    assert _parse([]).agents == [10]


@pytest.mark.parametrize("bad", ["0", "10,x", "", "-5"])
def test_flags_refuse_bad_fleet_sizes(bad: str) -> None:
    with pytest.raises(SystemExit):
        _parse(["--agents", bad])


def test_id_ranges_name_each_agent_once() -> None:
    assert parse_ids("dev-00998:3") == ["dev-00998", "dev-00999", "dev-01000"]
    with pytest.raises(argparse.ArgumentTypeError):
        parse_ids("dev-:3")
    with pytest.raises(argparse.ArgumentTypeError):
        parse_ids("dev-001:0")


def test_clients_are_split_into_contiguous_processes() -> None:
    clients = [f"dev-{i:05d}" for i in range(10)]
    parts = _split(clients, 3)
    assert [len(p) for p in parts] == [4, 4, 2]
    assert [c for part in parts for c in part] == clients
    assert _split(clients, 50) == [[c] for c in clients]  # never an empty process


def test_the_broker_queue_holds_a_round_for_the_aggregator() -> None:
    assert "max_queued_messages 20000" in broker_config(1000)  # the development config's
    assert "max_queued_messages 40100" in broker_config(10_000)
    assert "sys_interval 1" in broker_config(10)


def test_shards_are_distinct_samples_and_cycle_past_the_dataset(tmp_path: Path) -> None:
    x = (np.arange(10 * 4, dtype=np.float32) / 40).reshape(10, 1, 2, 2)
    train = ArrayDataset(x, np.arange(10) % 3)
    clients = ["dev-00000", "dev-00001", "dev-00002"]
    write_shards(train, clients, 4, tmp_path)  # 12 samples wanted, 10 held: two repeat
    shards = [load_device_data(tmp_path / f"{c}.npz") for c in clients]
    assert [len(s) for s in shards] == [4, 4, 4]
    firsts = [tuple(s.x[:, 0, 0, 0]) for s in shards[:2]]
    assert not set(firsts[0]) & set(firsts[1])  # the first 8 are distinct samples


def _announce(ev: FleetEvents, r: int, ts: float, selected: list[str]) -> None:
    ann = msg.RoundStart(
        federation="fleet",
        round=r,
        base_hash="a" * 64,
        deadline=ts + 60,
        selected=selected,
        model=SPEC,
        train=msg.TrainParams(),
        ts=ts,
    )
    ev.record(T.round_start(r), ann.to_json(), ts + 0.01)


def _receipt(ev: FleetEvents, t: float, r: int, client: str, code: str = "accepted") -> None:
    status = "accepted" if code in ("accepted", "duplicate") else "rejected"
    body = msg.Receipt(round=r, client_id=client, status=status, code=code)  # type: ignore[arg-type]
    ev.record(T.receipt(r, client), body.to_json(), t)


def _meta(ev: FleetEvents, t: float, r: int) -> None:
    body = msg.GlobalMeta(federation="fleet", round=r, model_hash="b" * 64, model=SPEC, nbytes=1)
    ev.record(T.global_meta, body.to_json(), t)


def _agent_round(client: str, r: int, t0: float, *, resend: bool = False) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = [
        {"ev": "train", "client": client, "asked": t0, "start": t0 + 0.5, "end": t0 + 1.0},
        {"ev": "send", "client": client, "round": r, "t": t0 + 1.0, "bytes": 100},
    ]
    if resend:
        events.append({"ev": "send", "client": client, "round": r, "t": t0 + 31.0, "bytes": 100})
    return events


def _fleet_of_two() -> tuple[FleetEvents, list[dict[str, Any]], list[dict[str, Any]]]:
    """Round 1: a and b accepted. Round 2: a's receipt lost (it re-sends), b's came late."""
    ev = FleetEvents()
    for t, value in ((99.0, 1_000), (102.9, 3_000_000), (200.0, 5_000_000)):
        ev.record("$SYS/broker/bytes/sent", str(value).encode(), t)
    ev.sample(99.0, "agg_cpu_s", 10.0)
    ev.sample(101.4, "agg_cpu_s", 10.2)
    ev.sample(101.4, "agg_rss_mb", 500.0)
    ev.sample(99.0, "broker_cpu_s", 1.0)
    ev.sample(102.9, "broker_cpu_s", 1.25)
    _announce(ev, 1, 100.0, ["a", "b"])
    _receipt(ev, 101.1, 1, "a")
    _receipt(ev, 101.2, 1, "b")
    _meta(ev, 101.5, 1)
    _announce(ev, 2, 103.0, ["a", "b"])
    _receipt(ev, 104.2, 2, "b")
    _receipt(ev, 134.1, 2, "a")  # a's first receipt was lost: this answers its re-send
    _meta(ev, 104.5, 2)
    agents = (
        _agent_round("a", 1, 100.0)
        + _agent_round("b", 1, 100.1)
        + _agent_round("a", 2, 103.0, resend=True)
        + _agent_round("b", 2, 103.1)
        + [
            {"ev": "receipt", "client": "a", "round": 1, "code": "accepted", "t": 101.1},
            {"ev": "receipt", "client": "b", "round": 1, "code": "accepted", "t": 101.2},
            {"ev": "receipt", "client": "b", "round": 2, "code": "accepted", "t": 104.2},
        ]
    )
    metrics = [
        {"round": 1, "participants": ["a", "b"], "accepted": 2, "aggregate_latency_ms": 12.0},
        {"round": 2, "participants": ["a", "b"], "accepted": 2, "aggregate_latency_ms": 15.0},
    ]
    return ev, agents, metrics


def test_rows_give_the_round_its_training_its_overhead_and_its_receipts() -> None:
    ev, agents, metrics = _fleet_of_two()

    one, two = round_rows(2, ev, agents, metrics)

    assert (one["agents"], one["round"], one["selected"], one["accepted"]) == (2, 1, 2, 2)
    assert one["counted_once"] and two["counted_once"]
    assert one["round_s"] == 1.5  # announced at 100.0, its model's meta at 101.5
    assert one["slowest_train_s"] == 0.5
    assert one["train_span_s"] == 1.1  # b finished at 101.1
    assert one["overhead_s"] == 0.4
    assert one["last_update_to_model_ms"] == 12.0
    assert one["agg_cpu_ms_per_update"] == 100.0  # 0.2 CPU s for 2 updates
    assert one["agg_rss_mb"] == 500.0
    assert one["broker_cpu_s"] == 0.25  # from its announcement to round 2's
    assert one["broker_mb_out"] == 3.0  # bytes sent from 100.0 to round 2's announcement
    assert (one["receipts_lost"], one["resends"]) == (0, 0)
    # Round 2: a's receipt never reached a; a re-sent once.
    assert (two["receipts_lost"], two["resends"]) == (1, 1)
    assert one["announce_bytes"] > 0 and one["announce_parse_ms"] >= 0


def test_an_update_accepted_twice_is_not_counted_once() -> None:
    ev, agents, metrics = _fleet_of_two()
    _receipt(ev, 101.3, 1, "a")  # a second "accepted" for a in round 1

    one, _ = round_rows(2, ev, agents, metrics)

    assert not one["counted_once"]


def test_a_participant_without_an_accepted_receipt_is_not_counted_once() -> None:
    ev, agents, metrics = _fleet_of_two()
    metrics[0]["participants"] = ["a", "b", "c"]

    one, _ = round_rows(2, ev, agents, metrics)

    assert not one["counted_once"]


def test_a_round_without_a_new_model_has_no_duration() -> None:
    ev, agents, metrics = _fleet_of_two()
    _announce(ev, 3, 110.0, ["a", "b"])

    three = round_rows(2, ev, agents, metrics)[2]

    assert (three["round_s"], three["overhead_s"], three["counted_once"]) == (None, None, False)


def test_summary_counts_reconnects_and_averages_broker_traffic() -> None:
    ev, _, _ = _fleet_of_two()
    ended = [
        {"ev": "agent", "client": "a", "connects": 3, "exit_code": 0},
        {"ev": "agent", "client": "b", "connects": 1, "exit_code": 1},
    ]

    summary = run_summary(2, ev, ended, 0)

    assert (summary["agents_ended"], summary["agents_failed"], summary["reconnects"]) == (2, 1, 2)
    assert summary["broker_mb_out_per_round"] == 2.5  # 5 MB over the run's 2 rounds
    assert summary["aggregator_exit"] == 0


def test_table_and_medians_show_every_size() -> None:
    ev, agents, metrics = _fleet_of_two()
    rows = round_rows(2, ev, agents, metrics)

    table = markdown_table(rows)

    assert table.count("\n") == 3  # header, rule, two rounds
    assert medians_by_size(rows)[2]["last_update_to_model_ms"] == 13.5

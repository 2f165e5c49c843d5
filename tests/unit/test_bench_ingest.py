"""``fedmq bench ingest`` bookkeeping: its flags and its figures from recorded events."""

from __future__ import annotations

import argparse

import pytest

from aggregator.ops.bench.ingest import add_arguments, broker_queue
from aggregator.ops.bench.ingest_report import (
    IngestEvents,
    RunFacts,
    markdown_table,
    parse_vm_hwm,
    spread,
    summarize,
)
from shared.protocol import messages as msg
from shared.protocol.topics import Topics

T = Topics("bench")
CLIENTS = ["dev-00000", "dev-00001", "dev-00002"]


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return parser.parse_args(argv)


def _receipt(events: IngestEvents, t: float, client: str, code: str = "accepted") -> None:
    status = "accepted" if code == "accepted" else "rejected"
    body = msg.Receipt(round=1, client_id=client, status=status, code=code)  # type: ignore[arg-type]
    events.record(T.receipt(1, client), body.to_json(), t)


def _meta(events: IngestEvents, t: float, round_id: int) -> None:
    spec = msg.ModelSpec(arch="lenet5", input_shape=(1, 28, 28), num_classes=10)
    body = msg.GlobalMeta(
        federation="bench", round=round_id, model_hash="a" * 64, model=spec, nbytes=1
    )
    events.record(T.global_meta, body.to_json(), t)


def _facts(clients: list[str] = CLIENTS) -> RunFacts:
    return RunFacts(clients, 0.5, 0.6, 42_000, 500 * 1024, 600 * 1024, 0)


def _metrics(participants: list[str] = CLIENTS) -> dict[str, object]:
    return {"participants": participants, "accepted": len(participants), "rejected": 0}


def test_the_flags_default_to_a_thousand_lenet_int8_updates() -> None:
    args = _parse([])

    assert (args.updates, args.codec, args.model, args.repeat) == (1000, "int8", "lenet5", 1)


def test_the_flags_take_a_parameterised_codec() -> None:
    args = _parse(["--updates", "20", "--codec", "lowrank:4+int4", "--model", "cnn"])

    assert (args.updates, args.codec, args.model) == (20, "lowrank:4+int4", "cnn")


@pytest.mark.parametrize("argv", [["--codec", "int7"], ["--updates", "0"], ["--model", "vgg"]])
def test_the_flags_refuse_what_cannot_run(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        _parse(argv)


def test_the_broker_queue_holds_every_status_and_update() -> None:
    assert broker_queue(10) == "max_queued_messages 20000"  # the development config's
    assert broker_queue(20_000) == "max_queued_messages 40100"


def test_the_rate_runs_from_the_first_publish_to_the_last_accepted_receipt() -> None:
    events = IngestEvents()
    _meta(events, 0.1, 0)
    for t, client in zip((1.0, 1.5, 2.0), CLIENTS, strict=True):
        _receipt(events, t, client)
    _meta(events, 2.05, 1)

    row = summarize(events, _facts(), _metrics())

    assert (row["accepted"], row["ingest_s"], row["updates_per_s"]) == (3, 1.5, 2.0)
    assert (row["last_accepted_to_model_ms"], row["publish_s"]) == (50.0, 0.1)
    assert (row["rss_before_mb"], row["rss_peak_mb"], row["counted_once"]) == (500.0, 600.0, True)


def test_refusals_are_counted_by_code_and_silence_as_unanswered() -> None:
    events = IngestEvents()
    _receipt(events, 1.0, CLIENTS[0])
    _receipt(events, 1.1, CLIENTS[0], "duplicate")
    _receipt(events, 1.2, CLIENTS[1], "over-norm")

    row = summarize(events, _facts(), _metrics(CLIENTS[:1]))

    assert (row["refused"], row["unanswered"]) == ({"duplicate": 1, "over-norm": 1}, 1)
    assert row["counted_once"] is False


def test_an_update_accepted_twice_is_not_counted_once() -> None:
    events = IngestEvents()
    for t, client in ((1.0, CLIENTS[0]), (1.1, CLIENTS[0]), (1.2, CLIENTS[1]), (1.3, CLIENTS[2])):
        _receipt(events, t, client)

    row = summarize(events, _facts(), _metrics())

    assert (row["accepted_twice"], row["counted_once"]) == ([CLIENTS[0]], False)


def test_without_metrics_or_receipts_the_figures_are_missing_not_invented() -> None:
    row = summarize(IngestEvents(), _facts(), None)

    assert (row["accepted"], row["updates_per_s"], row["aggregator_latency_ms"]) == (0, None, None)
    assert row["counted_once"] is False


def test_a_cleared_announcement_is_ignored() -> None:
    events = IngestEvents()

    events.record(T.round_start(1), b"", 1.0)

    assert events.starts == {}


def test_peak_rss_is_read_from_vmhwm() -> None:
    status = "Name:\tpython\nVmPeak:\t  900 kB\nVmHWM:\t  612340 kB\nVmRSS:\t  500 kB\n"

    assert parse_vm_hwm(status) == 612340
    assert parse_vm_hwm("State:\tZ (zombie)\n") is None


def test_several_runs_give_min_median_max() -> None:
    rows = [{"updates_per_s": v, "rss_peak_mb": 600.0} for v in (900.0, 1300.0, 1100.0)]

    stats = spread(rows)

    assert stats["updates_per_s"] == {"min": 900.0, "median": 1100.0, "max": 1300.0}
    assert "ingest_s" not in stats


def test_the_table_has_one_line_per_run() -> None:
    events = IngestEvents()
    _receipt(events, 1.0, CLIENTS[0])
    row = summarize(events, _facts(CLIENTS[:1]), _metrics(CLIENTS[:1]))

    table = markdown_table("`fedmq bench ingest --updates 1`", [row, row])

    assert table.count("| 1/1 |") == 2
    assert "updates_per_s: min 2, median 2, max 2" in table

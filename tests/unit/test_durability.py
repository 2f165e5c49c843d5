"""Agent outbox, aggregator checkpoint and round journal: durable state, no broker."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from safetensors.numpy import save as st_save

from aggregator.checkpoint import Checkpoint, CheckpointError, CheckpointStore, config_fingerprint
from aggregator.config import AggregatorConfig
from aggregator.journal import RoundJournal
from aggregator.resume import Durability, rng_state, set_rng_state, starved_action
from aggregator.rounds import RoundState
from edge_agent.outbox import Outbox, receipt_is_final
from shared.protocol.frames import FrameHeader, encode_frame, tensors_hash
from shared.protocol.messages import Receipt

PARAMS = {"w": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(3, np.float32)}


def _update(round_id: int, client: str = "pi-0", fed: str = "f", base: str = "a" * 64) -> bytes:
    head = FrameHeader(
        kind="update",
        federation=fed,
        round=round_id,
        codec="fp32",
        client_id=client,
        base_hash=base,
        num_samples=10,
    )
    return encode_frame(head, PARAMS).payload


# --- outbox ------------------------------------------------------------------------------
def test_outbox_keeps_an_update_across_instances(tmp_path: Path) -> None:
    Outbox(tmp_path, "f", "pi-0").put(3, _update(3))

    reopened = Outbox(tmp_path, "f", "pi-0")

    assert reopened.rounds() == [3]
    assert reopened.get(3) == _update(3)
    assert reopened.base_hash(3) == "a" * 64


def test_outbox_discards_foreign_and_corrupt_entries(tmp_path: Path) -> None:
    box = Outbox(tmp_path, "f", "pi-0")
    box.put(1, _update(1, client="pi-9"))
    box.put(2, b"garbage")
    (box.dir / ".update-crash.tmp").write_bytes(b"half")

    assert box.rounds() == []
    assert list(box.dir.iterdir()) == []


def test_outbox_drops_rounds_that_are_over(tmp_path: Path) -> None:
    box = Outbox(tmp_path, "f", "pi-0")
    for r in (1, 2, 3):
        box.put(r, _update(r))

    assert box.drop_before(3) == [1, 2]
    assert box.rounds() == [3]


@pytest.mark.parametrize(
    ("status", "reason", "final"),
    [
        ("accepted", "", True),
        ("rejected", "duplicate: an update from pi-0 was already counted", True),
        ("rejected", "late: round 1 is closed", True),
        ("rejected", "no round is open", False),
        ("rejected", "wrong round: 2 has not started (current 1)", False),
    ],
)
def test_which_receipts_of_an_older_aggregator_end_the_resending(
    status: Literal["accepted", "rejected"], reason: str, final: bool
) -> None:
    receipt = Receipt(round=1, client_id="pi-0", status=status, reason=reason)

    assert receipt_is_final(receipt.effective_code()) is final


# --- checkpoint --------------------------------------------------------------------------
def _ckpt(fp: str, round_id: int = 4) -> Checkpoint:
    rng = np.random.default_rng(7)
    rng.random(5)
    return Checkpoint(round_id, PARAMS, tensors_hash(PARAMS), rng_state(rng), fp, [{"round": 1}])


def test_checkpoint_round_trips_params_round_and_rng(tmp_path: Path) -> None:
    fp = config_fingerprint(AggregatorConfig())
    CheckpointStore(tmp_path).save(_ckpt(fp))

    loaded = CheckpointStore(tmp_path).load(fp)

    assert loaded is not None and loaded.round == 4
    assert all(np.array_equal(loaded.params[k], PARAMS[k]) for k in PARAMS)
    a, b = np.random.default_rng(0), np.random.default_rng(7)
    b.random(5)
    set_rng_state(a, loaded.rng_state)
    assert a.random() == b.random()
    assert (tmp_path / "checkpoint.json").exists()


def test_checkpoint_round_trips_the_download_residual(tmp_path: Path) -> None:
    fp = config_fingerprint(AggregatorConfig())
    residual = {
        n: np.full(v.shape, 1e-4, np.float32) * (i + 1) for i, (n, v) in enumerate(PARAMS.items())
    }
    CheckpointStore(tmp_path).save(replace(_ckpt(fp), residual=residual))

    loaded = CheckpointStore(tmp_path).load(fp)

    assert loaded is not None and loaded.residual is not None
    assert loaded.params.keys() == PARAMS.keys()  # the residual is not part of the model
    assert loaded.model_hash == tensors_hash(PARAMS)
    assert all(np.array_equal(loaded.residual[k], residual[k]) for k in PARAMS)


def test_checkpoint_round_trips_the_strategy_state_apart_from_the_model(tmp_path: Path) -> None:
    fp = config_fingerprint(AggregatorConfig())
    moments = {
        f"{m}/{n}": np.full(v.shape, 0.5, np.float32) for m in "mv" for n, v in PARAMS.items()
    }
    doc = {"optimizer": {"strategy": "fedadam", "step": 3}, "clip": {"bound": 1.5, "rounds": 3}}
    CheckpointStore(tmp_path).save(replace(_ckpt(fp), strategy_tensors=moments, strategy=doc))

    loaded = CheckpointStore(tmp_path).load(fp)

    assert loaded is not None and loaded.params.keys() == PARAMS.keys()
    assert loaded.model_hash == tensors_hash(PARAMS)
    assert loaded.strategy == doc
    assert loaded.strategy_tensors.keys() == moments.keys()
    assert all(np.array_equal(loaded.strategy_tensors[k], moments[k]) for k in moments)


def test_checkpoint_written_before_strategies_loads_without_strategy_state(tmp_path: Path) -> None:
    fp = config_fingerprint(AggregatorConfig())
    CheckpointStore(tmp_path).save(_ckpt(fp))

    loaded = CheckpointStore(tmp_path).load(fp)

    assert loaded is not None and loaded.strategy is None and loaded.strategy_tensors == {}


def test_the_strategy_settings_are_part_of_the_fingerprint_only_when_not_default() -> None:
    default = AggregatorConfig()

    assert config_fingerprint(replace(default, strategy="fedavg")) == config_fingerprint(default)
    for change in (
        {"strategy": "fedadam"},
        {"robust": "median"},
        {"clip": "none"},
        {"dp_accountant": "pld"},
    ):
        assert config_fingerprint(replace(default, **change)) != config_fingerprint(default)


def test_checkpoint_written_before_download_deltas_loads_without_a_residual(
    tmp_path: Path,
) -> None:
    fp = config_fingerprint(AggregatorConfig())
    ck = _ckpt(fp)
    # Exactly what the previous version wrote: the parameters and the JSON document only.
    doc = {"format": 1, "round": ck.round, "model_hash": ck.model_hash,
           "rng_state": ck.rng_state, "fingerprint": fp, "history": ck.history}  # fmt: skip
    blob = st_save(dict(PARAMS), metadata={"fedmq": json.dumps(doc)})
    (tmp_path / "checkpoint.safetensors").write_bytes(blob)

    loaded = CheckpointStore(tmp_path).load(fp)

    assert loaded is not None and loaded.round == 4 and loaded.residual is None
    assert all(np.array_equal(loaded.params[k], PARAMS[k]) for k in PARAMS)


def test_checkpoint_with_a_residual_of_another_shape_is_refused(tmp_path: Path) -> None:
    fp = config_fingerprint(AggregatorConfig())
    residual = {"w": np.zeros((3, 2), np.float32), "b": np.zeros(3, np.float32)}
    CheckpointStore(tmp_path).save(replace(_ckpt(fp), residual=residual))

    with pytest.raises(CheckpointError, match="residual does not match"):
        CheckpointStore(tmp_path).load(fp)


def test_checkpoint_of_other_settings_is_refused(tmp_path: Path) -> None:
    CheckpointStore(tmp_path).save(_ckpt(config_fingerprint(AggregatorConfig())))
    other = config_fingerprint(replace(AggregatorConfig(), model="cnn"))

    with pytest.raises(CheckpointError, match="other model"):
        CheckpointStore(tmp_path).load(other)


def test_fingerprint_ignores_transport_settings() -> None:
    a = AggregatorConfig()
    assert config_fingerprint(a) == config_fingerprint(replace(a, broker="mqtt://x:1"))


def test_corrupt_checkpoint_is_an_error_not_a_fresh_start(tmp_path: Path) -> None:
    (tmp_path / "checkpoint.safetensors").write_bytes(b"\x00" * 20)

    with pytest.raises(CheckpointError):
        CheckpointStore(tmp_path).load("x")


# --- journal -----------------------------------------------------------------------------
def test_journal_replays_accepted_updates_once_in_order(tmp_path: Path) -> None:
    j = RoundJournal(tmp_path)
    j.announce(2, "h" * 64, ["pi-0", "pi-1"], 100.0, 0, {"s": 1})
    j.accept(2, "pi-1", 10, b"one")
    j.accept(2, "pi-0", 10, b"two")
    j.accept(2, "pi-1", 10, b"one")  # never happens, but must not count twice

    jr = j.load(2)

    assert jr is not None and jr.announce["selected"] == ["pi-0", "pi-1"]
    assert list(j.frames(jr)) == [("pi-1", b"one"), ("pi-0", b"two")]


def test_journal_skips_a_torn_last_line(tmp_path: Path) -> None:
    j = RoundJournal(tmp_path)
    j.announce(1, "h" * 64, ["pi-0"], 1.0, 0, {})
    with (j.dir / "round-1.jsonl").open("a") as fh:
        fh.write('{"event": "accep')

    jr = j.load(1)

    assert jr is not None and jr.accepted == []


def test_applied_round_leaves_the_journal_for_the_checkpoint(tmp_path: Path) -> None:
    cfg = AggregatorConfig()
    d = Durability(tmp_path, cfg)
    state = RoundState(1, tensors_hash(PARAMS), {"pi-0"}, 1, 10.0, 0.0)
    rng = np.random.default_rng(0)
    d.announced(state, rng)
    d.accepted(1, "pi-0", 10, b"frame")
    state.accept("pi-0", 10)

    residual = {n: np.full(v.shape, 0.5, np.float32) for n, v in PARAMS.items()}
    d.applied(state, PARAMS, tensors_hash(PARAMS), rng, residual)
    restored = Durability(tmp_path, cfg).restore()

    assert restored.checkpoint is not None and restored.checkpoint.round == 1
    assert restored.checkpoint.residual is not None
    assert all(np.array_equal(restored.checkpoint.residual[n], residual[n]) for n in PARAMS)
    assert restored.checkpoint.history == [{"round": 1, "accepted": {"pi-0": 10}}]
    assert restored.open_round is None
    assert not (tmp_path / "journal" / "round-1.jsonl").exists()


def test_starved_policy_gives_up_after_the_allowed_extensions() -> None:
    assert starved_action(0, "extend", 2) == "extend"
    assert starved_action(1, "retry", 2) == "retry"
    assert starved_action(2, "retry", 2) == "fail"

"""Runs on the aggregator's side: which run it signs, how it is kept, what it refuses to start.

A run epoch is created when an aggregator starts afresh, kept in the checkpoint (and, before
the first one, in the journal), continued by a resumed aggregator, and signed into every
model and announcement (tests/unit/test_claims.py, test_agent_control.py: the agents' side).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from aggregator.checkpoint import Checkpoint, CheckpointError, CheckpointStore, config_fingerprint
from aggregator.config import AggregatorConfig
from aggregator.resume import Durability, new_run_epoch, resolve_run
from aggregator.rounds import RoundState
from shared.protocol import messages as msg
from shared.protocol.claims import verify_model_v2, verify_round_start
from shared.protocol.frames import tensors_hash
from shared.protocol.signing import generate_keypair, load_public_key, private_pem, public_pem
from tests.unit.inprocess import Federation, T

PARAMS = {"w": np.ones((2, 2), np.float32), "b": np.zeros(2, np.float32)}


# --- resolve_run ---------------------------------------------------------------------------
def test_a_fresh_aggregator_starts_a_new_run_at_its_start_time_in_milliseconds() -> None:
    assert resolve_run(None, None, new_run_epoch(1_800_000_000.5)) == 1_800_000_000_500


def test_an_operator_given_run_is_used_for_a_fresh_start() -> None:
    assert resolve_run(42, None, 1_800_000_000_500) == 42


def test_a_resumed_aggregator_continues_the_saved_run() -> None:
    assert resolve_run(None, 7, 1_800_000_000_500) == 7


def test_a_run_flag_contradicting_the_saved_run_is_an_error() -> None:
    with pytest.raises(CheckpointError, match="--run 8 but the state directory holds run 7"):
        resolve_run(8, 7, 1_800_000_000_500)


# --- persistence ---------------------------------------------------------------------------
def _state(round_id: int) -> RoundState:
    return RoundState(round_id, tensors_hash(PARAMS), {"pi-0"}, 1, 10.0, 0.0)


def test_the_run_is_kept_in_the_checkpoint(tmp_path: Path) -> None:
    cfg = AggregatorConfig()
    d = Durability(tmp_path, cfg)
    d.run = 1234
    rng = np.random.default_rng(0)
    d.applied(_state(1), PARAMS, tensors_hash(PARAMS), rng)

    assert Durability(tmp_path, cfg).restore().run == 1234


def test_before_the_first_checkpoint_the_run_is_kept_in_the_journal(tmp_path: Path) -> None:
    cfg = AggregatorConfig()
    d = Durability(tmp_path, cfg)
    d.run = 1234
    d.announced(_state(1), np.random.default_rng(0))

    restored = Durability(tmp_path, cfg).restore()

    assert restored.checkpoint is None and restored.run == 1234


def test_a_checkpoint_written_before_runs_resumes_with_no_saved_run(tmp_path: Path) -> None:
    fp = config_fingerprint(AggregatorConfig())
    rng = {"bit_generator": "PCG64"}
    CheckpointStore(tmp_path).save(Checkpoint(1, PARAMS, tensors_hash(PARAMS), rng, fp))

    loaded = CheckpointStore(tmp_path).load(fp)

    assert loaded is not None and loaded.run is None


# --- what the aggregator refuses to start with ---------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lr": 1e30}, "lr must be in"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"weight_decay": 5.0}, "weight-decay must be in"),
        ({"local_epochs": 5000}, "local-epochs must be"),
        ({"batch_size": 10**6}, "batch-size must be"),
        ({"seed": -1}, "seed must be in"),
        ({"input_shape": (1, 8, 10_000)}, "input-shape dimensions"),
        ({"run": -5}, "run must be in"),
    ],
)
def test_the_aggregator_refuses_settings_its_agents_would_refuse(
    change: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        replace(AggregatorConfig(), **change)


# --- the service ---------------------------------------------------------------------------
def _keys(tmp_path: Path) -> tuple[str, str]:
    key = generate_keypair()
    (tmp_path / "model.key").write_bytes(private_pem(key))
    (tmp_path / "model.pub").write_bytes(public_pem(key))
    return str(tmp_path / "model.key"), str(tmp_path / "model.pub")


def test_a_signing_aggregator_signs_its_announcements_and_pinned_agents_run_every_round(
    fed: Federation, tmp_path: Path
) -> None:
    private, public = _keys(tmp_path)
    service = fed.start_aggregator(rounds=2, min_clients=2, signing_key=private)
    for i in range(2):
        fed.start_agent(f"pi-{i}", seed=i + 1, model_public_key=public)

    codes = fed.finish()

    assert set(codes.values()) == {0}
    assert [r["accepted"] for r in fed.rounds()] == [2, 2]
    announcements = [
        msg.decode(m.payload, msg.RoundStart)
        for m in fed.broker.messages(T.round_start_any)
        if m.payload
    ]
    assert [a.round for a in announcements] == [1, 2]
    for ann in announcements:
        assert ann.run == service.run_epoch
        verify_round_start(load_public_key(public), ann)


def test_a_resumed_aggregator_signs_the_same_run_and_a_fresh_one_a_newer_run(
    fed: Federation, tmp_path: Path
) -> None:
    private, public = _keys(tmp_path)
    state = str(tmp_path / "agg-state")
    first = fed.start_aggregator(rounds=1, min_clients=1, signing_key=private, state_dir=state)
    fed.start_agent("pi-0", seed=1, model_public_key=public)
    assert set(fed.finish().values()) == {0}
    fed.clock.advance(5.0)

    resumed = fed.start_aggregator(rounds=1, min_clients=1, signing_key=private, state_dir=state)
    assert fed.workers["aggregator"].join() == 0
    fresh = fed.start_aggregator(rounds=1, min_clients=1, signing_key=private)
    late = fed.start_agent("pi-1", seed=2, model_public_key=public)
    assert set(fed.finish().values()) == {0}
    meta = msg.decode(fed.broker.retained(T.global_meta) or b"", msg.GlobalMeta)

    assert resumed.run_epoch == first.run_epoch < fresh.run_epoch == meta.run
    assert late.rounds_trained == 1 and late.sync.model is not None
    assert late.sync.model.run == fresh.run_epoch
    verify_model_v2(
        load_public_key(public),
        meta.federation,
        meta.run,
        meta.round,
        meta.model_hash,
        meta.signature_v2,
    )

"""The agent's side of global deltas (edge_agent/model_sync.py): policy and verification."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from aggregator.downloads import model_frame
from edge_agent.model_guard import HeldModel, ModelRejected
from edge_agent.model_sync import ModelSync, SyncPolicy
from shared.protocol.claims import sign_model_v2
from shared.protocol.frames import FrameError, FrameHeader, encode_frame, tensors_hash
from shared.protocol.global_delta import apply_delta, delta_frame, server_step
from shared.protocol.messages import ModelSpec
from shared.protocol.signing import generate_keypair

FED = "lab"
SHAPES = {"w": (4, 50), "b": (4,)}
SPEC = ModelSpec(arch="mlp")


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


# --- the policy ----------------------------------------------------------------------------
def test_policy_needs_the_full_model_until_it_holds_one_and_knows_deltas_come() -> None:
    policy = SyncPolicy(5.0, Clock())
    assert policy.why_full() == "no global model held yet"

    policy.holds(HeldModel(0, "a" * 64))
    assert policy.why_full() == "no round announced yet"  # deltas may never come

    policy.announced(1, "a" * 64, deltas=True)
    assert not policy.wants_full()


def test_policy_waits_for_the_delta_of_an_announced_round_then_falls_back() -> None:
    clock = Clock()
    policy = SyncPolicy(5.0, clock)
    policy.holds(HeldModel(1, "a" * 64))

    policy.announced(3, "b" * 64, deltas=True)  # round 3 trains model 2: we hold 1
    clock.now += 4.9
    assert not policy.wants_full()
    policy.announced(3, "b" * 64, deltas=True)  # re-announced: the grace period runs on
    clock.now += 0.2
    assert "no usable delta" in policy.why_full()

    policy.holds(HeldModel(2, "b" * 64))  # the full model arrived
    assert not policy.wants_full()


def test_policy_follows_deltas_when_the_announced_base_is_held() -> None:
    clock = Clock()
    policy = SyncPolicy(5.0, clock)
    policy.holds(HeldModel(2, "b" * 64))
    policy.announced(3, "b" * 64, deltas=True)
    clock.now += 60

    assert not policy.wants_full()


def test_policy_ignores_an_announcement_older_than_the_held_model() -> None:
    clock = Clock()
    policy = SyncPolicy(5.0, clock)
    policy.holds(HeldModel(3, "c" * 64))
    policy.announced(3, "b" * 64, deltas=True)  # the retained start of a round now closed
    clock.now += 60

    assert not policy.wants_full()


def test_policy_fetches_the_full_model_at_once_for_a_round_of_a_newer_run() -> None:
    policy = SyncPolicy(5.0, Clock())
    policy.holds(HeldModel(9, "c" * 64, run=5))

    policy.announced(1, "d" * 64, deltas=True, run=6)  # no delta leads into another run

    assert policy.why_full() == "run 6 supersedes the run 5 of the model held"


def test_policy_keeps_the_full_model_when_the_aggregator_sends_no_deltas() -> None:
    policy = SyncPolicy(5.0, Clock())
    policy.holds(HeldModel(2, "b" * 64))

    policy.announced(3, "b" * 64, deltas=False)

    assert policy.why_full() == "the aggregator publishes no global deltas"


def test_policy_falls_back_until_a_new_model_is_held() -> None:
    policy = SyncPolicy(5.0, Clock())
    policy.holds(HeldModel(2, "b" * 64))
    policy.announced(3, "b" * 64, deltas=True)

    policy.fall_back("global delta of round 3 refused: bad signature")
    assert policy.why_full() == "global delta of round 3 refused: bad signature"

    policy.holds(HeldModel(3, "c" * 64))
    assert not policy.wants_full()


# --- applying deltas -----------------------------------------------------------------------
class Aggregator:
    """What the aggregator publishes, built with its own functions."""

    def __init__(
        self, key: Ed25519PrivateKey | None = None, codec: str = "int8", run: int = 0
    ) -> None:
        rng = np.random.default_rng(0)
        self.key, self.codec, self.run = key, codec, run
        self.params = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in SHAPES.items()}
        self.hash, self.round, self.residual = tensors_hash(self.params), 0, None
        self.rng = rng

    def sign(self, round_id: int, h: str) -> str:
        """The run-bound signature agents verify (signature_v2)."""
        return sign_model_v2(self.key, FED, self.run, round_id, h) if self.key else ""

    def full(self) -> bytes:
        sig = self.sign(self.round, self.hash)
        return model_frame(FED, self.round, SPEC, self.params, run=self.run, signature_v2=sig)

    def next_round(self) -> bytes:
        """Apply a FedAvg-like step; return the delta frame."""
        target = {n: v + self.rng.laplace(0, 1e-3, v.shape) for n, v in self.params.items()}
        r = self.round + 1
        step = server_step(self.params, target, self.residual, codec=self.codec, seed=0, round_id=r)
        frame = delta_frame(
            step,
            federation=FED,
            base_hash=self.hash,
            base_round=self.round,
            run=self.run,
            signature_v2=self.sign(r, step.model_hash),
        )
        self.params, self.hash, self.round = step.published, step.model_hash, r
        self.residual = step.residual  # type: ignore[assignment]
        return frame


def _sync(key: Ed25519PrivateKey | None = None) -> ModelSync:
    pub = key.public_key() if key is not None else None
    sync = ModelSync(FED, pub, max_frame_bytes=1 << 20, delta_wait_s=5.0, clock=Clock())
    sync.on_announcement(0, "0" * 64, "int8")  # the aggregator publishes int8 deltas
    return sync


def test_agent_follows_three_rounds_of_deltas_bit_identically() -> None:
    key = generate_keypair()
    agg, sync = Aggregator(key), _sync(key)
    full = agg.full()
    sync.on_full_model(full)
    sizes = [len(full)]
    for _ in range(3):
        delta = agg.next_round()
        sizes.append(len(delta))
        model = sync.on_delta(delta)
        assert model is not None and model.model_hash == agg.hash and model.round_id == agg.round
        assert all(np.array_equal(model.params[n], agg.params[n]) for n in SHAPES)

    assert sync.deltas_applied == 3 and not sync.policy.wants_full()
    assert sync.take_download_bytes() == sum(sizes)
    assert sync.take_download_bytes() == 0


def test_a_delta_before_any_model_or_for_the_held_model_is_ignored() -> None:
    agg, sync = Aggregator(), _sync()
    first = agg.next_round()

    assert sync.on_delta(first) is None  # nothing to apply it to: the full model comes
    sync.on_full_model(agg.full())
    assert sync.on_delta(first) is None  # the retained delta of the model just fetched

    assert sync.model is not None and sync.model.model_hash == agg.hash
    assert not sync.policy.wants_full() and sync.deltas_applied == 0


def test_a_delta_on_a_model_we_missed_fetches_the_full_model() -> None:
    agg, sync = Aggregator(), _sync()
    sync.on_full_model(agg.full())
    agg.next_round()  # missed
    second = agg.next_round()

    assert sync.on_delta(second) is None

    assert "builds on" in sync.policy.why_full()
    sync.on_full_model(agg.full())
    assert sync.model is not None and sync.model.round_id == 2
    assert not sync.policy.wants_full()


def test_an_older_delta_is_refused_without_a_fallback() -> None:
    agg, sync = Aggregator(), _sync()
    first = agg.next_round()
    agg.next_round()
    sync.on_full_model(agg.full())

    with pytest.raises(ModelRejected, match=r"older model refused \(round 1 < 2\)"):
        sync.on_delta(first)
    assert not sync.policy.wants_full()


def _forged(agg: Aggregator, **changes: Any) -> bytes:
    """A delta frame on the agent's model with some header fields or tensors changed."""
    tensors = changes.pop("tensors", {n: np.full(s, 1e-3, np.float32) for n, s in SHAPES.items()})
    try:
        h = tensors_hash(apply_delta(agg.params, tensors))
    except FrameError:  # the claim of a delta that cannot be applied: any hash
        h = "f" * 64
    fields: dict[str, Any] = {
        "kind": "global_delta",
        "federation": FED,
        "round": agg.round + 1,
        "codec": "fp32",
        "base_hash": agg.hash,
        "meta": {
            "model_hash": h,
            "base_round": agg.round,
            "run": agg.run,
            "signature_v2": agg.sign(agg.round + 1, h),
        },
    }
    fields.update(changes)
    return encode_frame(FrameHeader(**fields), tensors).payload


@pytest.mark.parametrize(
    ("forge", "signer", "reason"),
    [
        ({"meta": {"model_hash": "e" * 64}}, "aggregator", "model hash mismatch"),
        ({"tensors": {"w": np.zeros((4, 49)), "b": np.zeros(4)}}, "aggregator", "shapes"),
        ({"tensors": {"w": np.zeros((4, 50), np.float32)}}, "aggregator", "shapes"),
        ({"tensors": {"w": np.full((4, 50), 3e38, np.float32), "b": np.zeros(4)}}, "aggregator",
         "overflow"),
        ({}, "another key", "bad signature"),
        ({}, "nobody", "not signed"),
    ],
    ids=["hash-mismatch", "wrong-shape", "missing-tensor", "non-finite", "bad-signature",
         "unsigned"],
)  # fmt: skip
def test_bad_deltas_are_refused_the_model_kept_and_the_full_model_fetched(
    forge: dict[str, Any], signer: str, reason: str
) -> None:
    key = generate_keypair()
    agg, sync = Aggregator(key), _sync(key)
    agg.params["w"][0, 0] = 3e38  # room to overflow
    agg.hash = tensors_hash(agg.params)
    sync.on_full_model(agg.full())
    held = sync.model
    agg.key = {"aggregator": key, "another key": generate_keypair(), "nobody": None}[signer]

    with pytest.raises(FrameError, match=reason):
        sync.on_delta(_forged(agg, **forge))

    assert sync.model is held
    assert "refused" in sync.policy.why_full()


def test_a_delta_of_another_federation_is_refused() -> None:
    agg, sync = Aggregator(), _sync()
    sync.on_full_model(agg.full())

    with pytest.raises(ModelRejected, match="not a global delta of 'lab'"):
        sync.on_delta(_forged(agg, federation="elsewhere"))
    with pytest.raises(ModelRejected, match="not a global delta"):
        sync.on_delta(agg.full())  # a full model on the delta topic


def test_fp16_and_fp32_deltas_are_applied_too() -> None:
    for codec in ("fp16", "fp32"):
        agg, sync = Aggregator(codec=codec), _sync()
        sync.on_full_model(agg.full())
        model = sync.on_delta(agg.next_round())
        assert model is not None and model.model_hash == agg.hash


# --- runs ----------------------------------------------------------------------------------
def test_the_initial_model_of_a_newer_run_replaces_a_later_model_of_an_older_run() -> None:
    key = generate_keypair()
    old_run, sync = Aggregator(key, run=5), _sync(key)
    for _ in range(3):
        old_run.next_round()
    sync.on_full_model(old_run.full())
    new_run = Aggregator(key, run=6)  # round 0 again

    model = sync.on_full_model(new_run.full())

    assert (model.run, model.round_id, model.model_hash) == (6, 0, new_run.hash)


def test_a_replayed_delta_of_an_older_run_is_refused() -> None:
    key = generate_keypair()
    old_run, sync = Aggregator(key, run=5), _sync(key)
    old_delta = [old_run.next_round() for _ in range(3)][-1]
    sync.on_full_model(Aggregator(key, run=6).full())

    with pytest.raises(ModelRejected, match=r"older run refused \(run 5 < 6"):
        sync.on_delta(old_delta)

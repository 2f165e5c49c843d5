"""The benchmark's malicious devices (aggregator/ops/bench/attacks.py): each attack on fixed
vectors, and a malicious agent's frames accepted like an honest one's (in-memory broker)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from aggregator.ops.bench.attacks import (
    Attack,
    AttackError,
    Collusion,
    MaliciousTrainer,
    alie,
    alie_z,
    flip_labels,
    poison,
)
from edge_agent.agent import EdgeAgent
from edge_agent.local_training import LocalTrainer
from shared.protocol import messages as msg
from shared.protocol.frames import decode_frame
from shared.runtime.data import ArrayDataset
from tests.synthetic import INPUT_SHAPE, NUM_CLASSES, make_dataset
from tests.unit.inprocess import Federation, Worker

DELTA = {"w": np.array([[1.0, -2.0], [0.5, 0.0]], np.float32), "b": np.array([3.0], np.float32)}
RNG = np.random.default_rng(0)


def test_attacks_parse_with_their_default_factors() -> None:
    assert Attack.parse("scale") == Attack("scale", 100.0)
    assert Attack.parse("scale:10") == Attack("scale", 10.0)
    assert Attack.parse("sign-flip").label == "sign-flip"
    assert Attack.parse("scale:10").label == "scale ×10"
    with pytest.raises(AttackError, match="not one of"):
        Attack.parse("backdoor")
    with pytest.raises(AttackError, match="positive"):
        Attack.parse("noise:-1")


def test_sign_flip_and_scale_multiply_the_honest_update() -> None:
    flipped = poison(Attack("sign-flip", 1.0), DELTA, RNG)
    scaled = poison(Attack("scale", 100.0), DELTA, RNG)

    assert all(np.array_equal(flipped[n], -DELTA[n]) for n in DELTA)
    assert all(np.array_equal(scaled[n], 100 * DELTA[n]) for n in DELTA)


def test_noise_is_as_long_as_the_honest_update_times_its_factor() -> None:
    big = {"w": np.full((100, 100), 0.01, np.float32)}
    noise = poison(Attack("noise", 3.0), big, np.random.default_rng(1))

    assert float(np.linalg.norm(noise["w"])) == pytest.approx(
        3 * np.linalg.norm(big["w"]), rel=0.02
    )
    assert abs(float(noise["w"].mean())) < 0.005  # zero mean: no honest direction left


def test_alie_z_for_two_of_ten_by_hand() -> None:
    # s = ⌊10/2 + 1⌋ − 2 = 4; z = Φ⁻¹(6/10)
    assert alie_z(10, 2) == pytest.approx(0.2533471, abs=1e-6)


def test_alie_is_the_mean_minus_z_standard_deviations_per_coordinate() -> None:
    a = {"w": np.array([1.0, 2.0], np.float32)}
    b = {"w": np.array([3.0, 2.0], np.float32)}

    out = alie([a, b], z=0.5)

    np.testing.assert_allclose(out["w"], [2.0 - 0.5 * 1.0, 2.0])


def test_label_flip_maps_class_c_to_the_last_minus_c() -> None:
    data = ArrayDataset(np.zeros((3, 1, 2, 2), np.float32), np.array([0, 1, 3]))

    assert flip_labels(data, 4).y.tolist() == [3, 2, 0]


def test_colluders_wait_for_each_other_and_send_the_same_alie_update() -> None:
    collusion = Collusion(members=2, num_clients=10, wait_s=30.0)
    honest = {"a": {"w": np.array([1.0], np.float32)}, "b": {"w": np.array([3.0], np.float32)}}
    sent: dict[str, dict[str, np.ndarray]] = {}

    def colluder(cid: str) -> None:
        sent[cid] = collusion.alie_update(7, cid, honest[cid])

    threads = [threading.Thread(target=colluder, args=(c,)) for c in honest]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)

    z = alie_z(10, 2)
    assert sent["a"]["w"][0] == sent["b"]["w"][0] == pytest.approx(2.0 - z * 1.0)


def _spec() -> msg.ModelSpec:
    return msg.ModelSpec(arch="mlp", input_shape=INPUT_SHAPE, num_classes=NUM_CLASSES)


def test_a_malicious_trainer_trains_like_the_agent_then_poisons() -> None:
    import torch

    from shared.runtime.modelio import get_params
    from shared.runtime.models import build_model

    torch.manual_seed(0)
    params = get_params(build_model("mlp", INPUT_SHAPE, NUM_CLASSES))
    data, train = make_dataset(60, seed=3), msg.TrainParams(lr=0.05, seed=11)
    honest = LocalTrainer("pi-9").train(_spec(), params, train, data, None)
    evil = MaliciousTrainer("pi-9", Attack("sign-flip", 2.0)).train(
        _spec(), params, train, data, None
    )

    assert all(np.array_equal(evil.delta[n], -2 * honest.delta[n]) for n in honest.delta)
    assert evil.num_samples == honest.num_samples


def test_a_malicious_agents_updates_are_valid_frames_the_aggregator_accepts(
    fed: Federation,
) -> None:
    fed.start_aggregator(rounds=2, min_clients=2, clip="none", max_update_norm=math.inf)
    fed.start_agent("pi-0", seed=1)
    evil = EdgeAgent(
        fed.agent_config("pi-x", seed=2),
        fed.broker.connector,
        fed.clock,
        trainer=MaliciousTrainer("pi-x", Attack("scale", 100.0)),
    )
    fed.agents["pi-x"] = evil
    fed.workers["pi-x"] = Worker("pi-x", evil.run)

    assert set(fed.finish().values()) == {0}
    assert [r["accepted"] for r in fed.rounds()] == [2, 2]
    frames = [decode_frame(p) for p in fed.updates(1, "pi-x") + fed.updates(1, "pi-0")]
    norms = [math.sqrt(sum(float(np.sum(v**2)) for v in f.tensors.values())) for f in frames]
    assert norms[0] > 20 * norms[1]  # ×100 of an update on other data, int8-encoded

"""The configured strategy inside the running service, over the in-memory broker: exact resume
after a crash, ε and the clipping bound in the metrics, and the refusals of the privacy
budget and of a round too large to hold.

Updates come from the test, one device after another in a fixed order (fp32 frames that
depend only on the round and the device), so two runs sum the same updates in the same order
and can be compared bit for bit.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from aggregator.round_strategy import StrategyError
from aggregator.service import AggregatorService
from shared.mqtt.base import Inbound
from shared.protocol import messages as msg
from shared.protocol.frames import FrameHeader, encode_frame
from tests.unit.inprocess import FED, Federation, SilentDevice, T, Worker, wait_for

DEVICES = ("dev-a", "dev-b", "dev-c")
ROUNDS = 4


class Crash(BaseException):
    """What kill -9 is to the service thread: it stops where it is, nothing cleaned up."""


def _frame(fed: Federation, round_id: int, client: str) -> bytes:
    """The update of ``client`` for ``round_id`` on the announced base model."""
    ann = msg.decode(fed.broker.retained(T.round_start(round_id)) or b"", msg.RoundStart)
    assert fed.service is not None
    rng = np.random.default_rng([round_id, zlib.crc32(client.encode())])
    scale = 0.01 * (1 + DEVICES.index(client) ** 2)  # dev-c's are the longest: clipped
    delta = {
        n: (rng.standard_normal(s) * scale).astype(np.float32)
        for n, s in fed.service.shapes.items()
    }
    header = FrameHeader(
        kind="update", federation=FED, round=round_id, client_id=client,
        base_hash=ann.base_hash, codec="fp32", num_samples=20 + 10 * DEVICES.index(client),
    )  # fmt: skip
    return encode_frame(header, delta).payload


def _start(fed: Federation, overrides: dict[str, Any], dp_seed: int | None) -> AggregatorService:
    service = AggregatorService(
        fed.aggregator_config(rounds=ROUNDS, min_clients=3, **overrides),
        fed.broker.connector,
        fed.clock,
    )
    if dp_seed is not None:  # the OS's entropy otherwise: two runs could not be compared
        service.strategy.dp_rng = np.random.default_rng(dp_seed)
    fed.service = service
    fed.workers["aggregator"] = Worker("aggregator", service.run)
    return service


def _send(
    fed: Federation, devices: dict[str, SilentDevice], round_id: int, who: tuple[str, ...]
) -> None:
    wait_for(lambda: fed.open_round() == round_id, f"round {round_id} announced")
    for client in who:
        devices[client].transport.publish(T.update(round_id, client), _frame(fed, round_id, client))
        wait_for(lambda c=client: len(fed.receipts(round_id, c)) >= 1, f"{client}'s receipt")


def _devices(fed: Federation) -> dict[str, SilentDevice]:
    devices = {c: fed.silent_device(c) for c in DEVICES}
    fed.wait_online(*DEVICES)
    return devices


def _uninterrupted(fed: Federation, overrides: dict[str, Any]) -> AggregatorService:
    devices = _devices(fed)
    service = _start(fed, overrides, dp_seed=7)
    for r in range(1, ROUNDS + 1):
        _send(fed, devices, r, DEVICES)
    assert fed.workers["aggregator"].join() == 0
    return service


def _crash_when(service: AggregatorService, topic: str) -> None:
    """Make the service thread die where it stands when a message on ``topic`` arrives."""
    handle = service._handle

    def handle_or_crash(item: Inbound, intake: Any) -> bool:
        if item.topic == topic:
            raise Crash
        return handle(item, intake)

    service._handle = handle_or_crash  # type: ignore[method-assign]


def _killed_and_resumed(fed: Federation, overrides: dict[str, Any]) -> AggregatorService:
    devices = _devices(fed)
    state = {"state_dir": str(fed.tmp / "agg-state")}
    first = _start(fed, {**overrides, **state}, dp_seed=7)
    _crash_when(first, T.agent_status("kill-9"))
    for r in (1, 2):
        _send(fed, devices, r, DEVICES)
    _send(fed, devices, 3, DEVICES[:1])  # round 3: one update journaled, then the crash
    trigger = fed.silent_device("kill-9")
    with pytest.raises(Crash):
        fed.workers["aggregator"].join()
    trigger.leave()  # not a device of the federation: never selected
    fed.broker.disconnect("aggregator")  # the connection dies with the process: its will

    resumed = _start(fed, {**overrides, **state}, dp_seed=None)  # restored from the checkpoint
    wait_for(lambda: len(fed.receipts(3, DEVICES[0])) >= 1, "round 3 re-announced")
    _send(fed, devices, 3, DEVICES[1:])
    _send(fed, devices, 4, DEVICES)
    assert fed.workers["aggregator"].join() == 0
    return resumed


@pytest.mark.parametrize(
    "overrides",
    [
        {"strategy": "fedadam", "server_lr": 0.01, "clip": "adaptive", "clip_lr": 0.5},
        {},
        {
            "strategy": "fedavgm",
            "dp_noise_multiplier": 0.5,
            "dp_expected_clients": 3.0,
            "dp_clip": 0.5,
            "clip": "adaptive",
        },
    ],
    ids=["fedadam-adaptive-clip", "default", "fedavgm-dp"],
)
def test_after_a_crash_mid_round_the_resumed_run_ends_bit_for_bit_like_an_uninterrupted_one(
    tmp_path: Path, overrides: dict[str, Any]
) -> None:
    straight_fed, crashed_fed = Federation(tmp_path / "straight"), Federation(tmp_path / "crashed")
    try:
        straight = _uninterrupted(straight_fed, overrides)
        resumed = _killed_and_resumed(crashed_fed, overrides)
    finally:
        straight_fed.stop()
        crashed_fed.stop()

    assert resumed.round_id == straight.round_id == ROUNDS
    assert resumed.model_hash == straight.model_hash
    assert all(np.array_equal(resumed.params[n], straight.params[n]) for n in straight.params)
    (got_t, got), (want_t, want) = resumed.strategy.state(), straight.strategy.state()
    assert got == want and got_t.keys() == want_t.keys()
    assert all(np.array_equal(got_t[k], want_t[k]) for k in want_t)
    assert [r["model_hash"] for r in crashed_fed.rounds()] == [
        r["model_hash"] for r in straight_fed.rounds()
    ]


def test_each_rounds_metrics_carry_the_clipping_bound_and_the_epsilon_spent(
    fed: Federation,
) -> None:
    overrides = {"dp_epsilon": 20.0, "dp_expected_clients": 3.0, "dp_clip": 0.5, "clip": "fixed"}
    devices = _devices(fed)
    _start(fed, overrides, dp_seed=1)
    for r in range(1, ROUNDS + 1):
        _send(fed, devices, r, DEVICES)
    assert fed.workers["aggregator"].join() == 0

    rounds = fed.rounds()
    spent = [r["dp_epsilon"] for r in rounds]
    assert spent == sorted(spent) and spent[0] > 0 and spent[-1] <= 20.0
    assert {r["dp_delta"] for r in rounds} == {1e-5}
    assert {r["clip_bound"] for r in rounds} == {0.5}
    published = msg.decode(fed.broker.retained(T.metrics) or b"", msg.RoundMetrics)
    assert published.dp_epsilon == spent[-1]


def test_without_dp_the_metrics_show_the_adaptive_bound_from_round_1(fed: Federation) -> None:
    devices = _devices(fed)
    _start(fed, {}, dp_seed=None)
    for r in range(1, ROUNDS + 1):
        _send(fed, devices, r, DEVICES)
    assert fed.workers["aggregator"].join() == 0

    rounds = fed.rounds()
    assert all(r["clip_bound"] > 0 and r["dp_epsilon"] is None for r in rounds)
    assert rounds[0]["clipped"] == 1  # round 1: its median norm, dev-c's is the longest


def test_the_aggregator_refuses_to_start_when_the_rounds_exceed_the_privacy_budget(
    fed: Federation,
) -> None:
    cfg = fed.aggregator_config(
        rounds=20, dp_epsilon=1.0, dp_noise_multiplier=0.5, dp_expected_clients=3.0
    )

    with pytest.raises(StrategyError, match=r"allows 0 rounds .* not 20"):
        AggregatorService(cfg, fed.broker.connector, fed.clock)


def test_a_spent_budget_stops_the_federation_with_exit_code_4(fed: Federation) -> None:
    devices = _devices(fed)
    service = _start(fed, {"dp_epsilon": 50.0, "dp_expected_clients": 3.0}, dp_seed=1)
    # As if the budget had been spent faster than planned: after round 2, no further round.
    service.strategy.budget_refusal = (  # type: ignore[method-assign]
        lambda: "privacy budget: spent" if service.strategy.dp_rounds >= 2 else None
    )
    for r in (1, 2):
        _send(fed, devices, r, DEVICES)

    assert fed.workers["aggregator"].join() == 4
    status = msg.decode(fed.broker.retained(T.aggregator_status) or b"", msg.AggregatorStatus)
    assert status.state == "finished" and len(fed.rounds()) == 2


def test_a_selection_too_large_for_the_round_memory_stops_before_announcing(
    fed: Federation,
) -> None:
    devices = _devices(fed)
    more = [fed.silent_device(f"dev-{i}") for i in range(60)]
    fed.wait_online(*(f"dev-{i}" for i in range(60)))
    # Room for three MLP updates (the quorum), not for the 63 online agents a round selects.
    service = _start(fed, {"robust": "median", "max_round_memory": 10_000_000}, dp_seed=None)

    assert fed.workers["aggregator"].join() == 2
    assert fed.open_round() == 0 and service.round_id == 0
    del devices, more

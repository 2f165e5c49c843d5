"""A whole federation in one process: the real service and agents over the in-memory broker.

Nothing here sleeps: every wait polls a condition against a deadline, and time that matters
to the protocol (round deadlines, re-send timers) is a :class:`~shared.clock.ManualClock`
that only the test moves.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from aggregator.config import AggregatorConfig
from aggregator.service import AggregatorService
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from shared.clock import ManualClock
from shared.mqtt.base import Outbound, Session
from shared.mqtt.memory import MemoryBroker, MemoryTransport
from shared.protocol import messages as msg
from shared.protocol.frames import FrameHeader, encode_frame
from shared.protocol.topics import Topics
from shared.runtime.data import save_npz
from tests.synthetic import INPUT_SHAPE, NUM_CLASSES, make_dataset

FED = "unit"
T = Topics(FED)
# Real seconds a condition may take: generous, a loaded machine is slow, and nothing waits
# this long when things work.
DEADLINE_S = 60.0


def wait_for(pred: Callable[[], bool], what: str, timeout: float = DEADLINE_S) -> None:
    """Poll ``pred`` until it holds, or fail naming ``what``."""
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.005)


@dataclass
class SilentDevice:
    """A device that is online but never trains; :meth:`leave` says goodbye (offline)."""

    transport: MemoryTransport
    offline: Outbound

    def leave(self) -> None:
        """Go offline cleanly, as an agent does when stopped."""
        self.transport.stop([self.offline])


class Worker:
    """Runs ``target`` on a thread and keeps its result or exception."""

    def __init__(self, name: str, target: Callable[[], int]) -> None:
        self.result: int | None = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(target,), name=name, daemon=True)
        self.thread.start()

    def _run(self, target: Callable[[], int]) -> None:
        try:
            self.result = target()
        except BaseException as exc:  # handed to the test thread by join()
            self.error = exc

    def join(self, timeout: float = DEADLINE_S) -> int | None:
        """Wait for the thread; re-raise what it raised; return its result."""
        self.thread.join(timeout)
        if self.thread.is_alive():
            raise AssertionError(f"{self.thread.name} still running after {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        return self.result

    @property
    def done(self) -> bool:
        """True once the thread has ended."""
        return not self.thread.is_alive()


@dataclass
class Federation:
    """A broker, a manual clock, an aggregator and agents, all in this process."""

    tmp: Path
    broker: MemoryBroker = field(init=False)
    clock: ManualClock = field(default_factory=ManualClock)
    service: AggregatorService | None = None
    agents: dict[str, EdgeAgent] = field(default_factory=dict)
    workers: dict[str, Worker] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.broker = MemoryBroker(self.clock)
        (self.tmp / "data").mkdir(parents=True, exist_ok=True)
        save_npz(self.tmp / "data" / "eval.npz", make_dataset(200, seed=999))

    # --- building ---------------------------------------------------------------------
    def aggregator_config(self, **overrides: Any) -> AggregatorConfig:
        """The small MLP task, ONNX off, every bound generous."""
        base = AggregatorConfig(
            federation=FED,
            model="mlp",
            input_shape=INPUT_SHAPE,
            num_classes=NUM_CLASSES,
            rounds=3,
            min_clients=3,
            round_timeout=60.0,
            wait_clients_timeout=3600.0,
            lr=0.05,
            eval_data=str(self.tmp / "data" / "eval.npz"),
            metrics_file=str(self.tmp / "metrics.json"),
            onnx=False,
        )
        return replace(base, **overrides)

    def agent_config(self, client_id: str, seed: int, **overrides: Any) -> AgentConfig:
        """An agent with its own generated data and state directory."""
        data = self.tmp / "data" / f"{client_id}.npz"
        if not data.exists():
            save_npz(data, make_dataset(120, seed=seed))
        base = AgentConfig(
            federation=FED,
            client_id=client_id,
            data=str(data),
            state_dir=str(self.tmp / "state" / client_id),
            resend_after_s=30.0,
        )
        return replace(base, **overrides)

    def start_aggregator(self, **overrides: Any) -> AggregatorService:
        """Build the service and run it on a thread."""
        self.service = AggregatorService(
            self.aggregator_config(**overrides), self.broker.connector, self.clock
        )
        self.workers["aggregator"] = Worker("aggregator", self.service.run)
        return self.service

    def start_agent(self, client_id: str, seed: int, **overrides: Any) -> EdgeAgent:
        """Build an agent and run it on a thread."""
        agent = EdgeAgent(
            self.agent_config(client_id, seed, **overrides), self.broker.connector, self.clock
        )
        self.agents[client_id] = agent
        self.workers[client_id] = Worker(client_id, agent.run)
        return agent

    def wait_online(self, *client_ids: str) -> None:
        """Wait until each device's retained status says online (so a selection sees it)."""

        def online(cid: str) -> bool:
            raw = self.broker.retained(T.agent_status(cid))
            return raw is not None and msg.decode(raw, msg.AgentStatus).state == "online"

        wait_for(lambda: all(online(c) for c in client_ids), f"{client_ids} online")

    def silent_device(self, client_id: str) -> SilentDevice:
        """A device that says it is online (and so is selected) but never trains."""
        status = msg.AgentStatus(client_id=client_id, state="online", num_samples=50).to_json()
        offline = Outbound(
            T.agent_status(client_id),
            msg.AgentStatus(client_id=client_id, state="offline").to_json(),
            retain=True,
        )
        session = Session(
            client_id,
            will=offline,
            births=lambda: [Outbound(T.agent_status(client_id), status, retain=True)],
        )
        return SilentDevice(self.broker.connector(session).start(), offline)

    # --- observing --------------------------------------------------------------------
    def rounds(self) -> list[dict[str, Any]]:
        """The metrics of every applied round so far."""
        return list(self.service.metrics.entries) if self.service else []

    def receipts(self, round_id: int, client_id: str) -> list[msg.Receipt]:
        """Receipts the aggregator sent ``client_id`` for ``round_id`` (lost ones too)."""
        return [
            msg.decode(m.payload, msg.Receipt)
            for m in self.broker.messages(T.receipt(round_id, client_id))
        ]

    def updates(self, round_id: int, client_id: str) -> list[bytes]:
        """Update frames ``client_id`` published for ``round_id``, in order."""
        return [m.payload for m in self.broker.messages(T.update(round_id, client_id))]

    def open_round(self) -> int:
        """The round the aggregator has announced and not yet applied (0: none)."""
        live = [
            msg.decode(m.payload, msg.RoundStart).round
            for m in self.broker.messages(T.round_start_any)
            if m.payload
        ]
        applied = len(self.rounds())
        return max((r for r in live if r > applied), default=0)

    def finish(self, timeout: float = DEADLINE_S) -> dict[str, int | None]:
        """Join every thread; return their exit codes by name."""
        return {name: w.join(timeout) for name, w in self.workers.items()}

    def stop(self) -> None:
        """Ask every agent to stop (for tests that end early)."""
        for agent in self.agents.values():
            agent.stop()


def update_frame(
    service: AggregatorService,
    round_id: int,
    client_id: str,
    *,
    num_samples: int = 10,
    scale: float = 0.01,
    base_hash: str | None = None,
    federation: str = FED,
) -> bytes:
    """A well-formed update frame on ``service``'s current model (its shapes and hash)."""
    rng = np.random.default_rng(round_id * 1000 + len(client_id))
    delta = {
        n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in service.shapes.items()
    }
    header = FrameHeader(
        kind="update",
        federation=federation,
        round=round_id,
        client_id=client_id,
        base_hash=service.model_hash if base_hash is None else base_hash,
        codec="int8",
        num_samples=num_samples,
    )
    return encode_frame(header, delta, rng=np.random.default_rng(0)).payload

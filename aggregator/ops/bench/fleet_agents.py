"""One process of ``fedmq bench fleet``: many real edge agents, each on its own thread.

``python -m aggregator.ops.bench.fleet_agents --broker URL --federation F --ids dev-00000:125
--data-dir D --state-dir S --events FILE`` runs one :class:`~edge_agent.agent.EdgeAgent` per
client id, unchanged: its own MQTT connection (paho, own client id, last will, births), its own
durable outbox and state directory, its own data shard, receipts and re-sends. What the agents
of one process share is what a simulator must share to fit 1,000 devices on two cores: one
model object per architecture, trained by one agent at a time (a lock), one BLAS thread.

Each agent's events go to ``FILE`` as JSON lines, with wall-clock times (the same clock as the
bench and the aggregator, all on one machine): ``train`` (waited for the lock from, trained
from/until, done after a slow device's extra time), ``send`` (every publish of an update: the
first and each re-send), ``receipt`` (code), and at the end ``agent`` (connections made,
rounds trained, its slowdown and on-line fraction, the off-line spells it went through, exit
code).

A heterogeneous fleet (``fedmq bench fleet --slow-fraction``, ``--online``: docs/async.md):
``--slow ID,ID --slowdown X`` make those agents train X times as long, ``--min-batch-ms`` and
``--online P --online-spell-s S`` apply to every agent of the process. Each goes into the
agent's own :class:`~edge_agent.config.AgentConfig`, which the agent follows as ``fedmq-agent``
does (the shared trainer's slowdown; the on-line spells of ``edge_agent/availability.py``).
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from edge_agent.local_training import LocalRound, LocalTrainer
from shared.mqtt.base import Inbound
from shared.mqtt.connector import connector_for
from shared.protocol import messages as msg
from shared.runtime.data import ArrayDataset

log = logging.getLogger("fedmq.bench.fleet")


class EventLog:
    """JSON lines, one per event, from every agent thread of the process."""

    def __init__(self, path: Path) -> None:
        self._fh = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - closed in close()
        self._lock = threading.Lock()

    def write(self, **event: Any) -> None:
        line = json.dumps(event, separators=(",", ":"))
        with self._lock:
            self._fh.write(line + "\n")

    def close(self) -> None:
        with self._lock:
            self._fh.close()


class SharedTrainer(LocalTrainer):
    """The agent's own trainer on the process's one model object, one training at a time.

    Records when the agent asked to train (the round it was selected for has arrived), when it
    got the model and when it was done: on a real device there is no wait for the lock.
    """

    def __init__(
        self,
        client_id: str,
        models: dict[tuple[Any, ...], Any],
        lock: threading.Lock,
        events: EventLog,
    ) -> None:
        super().__init__(client_id, threads=1, models=models)
        self._lock = lock
        self._events = events

    def train(
        self,
        spec: msg.ModelSpec,
        global_params: dict[str, Any],
        params: msg.TrainParams,
        data: ArrayDataset,
        val: ArrayDataset | None,
        slowdown: float = 1.0,
        min_batch_s: float = 0.0,
    ) -> LocalRound:
        asked = time.time()
        with self._lock:
            start = time.time()
            result = super().train(spec, global_params, params, data, val)
            end = time.time()
        # A slower device: its extra time is its own, not the shared model's (the lock).
        took = end - start
        time.sleep(slowdown * max(took, min_batch_s * result.meta.get("steps", 0)) - took)
        self._events.write(
            ev="train",
            client=self.client_id,
            asked=asked,
            start=start,
            end=end,
            done=time.time(),  # after the slow device's own extra time
            seed=params.seed,
        )
        return result


class FleetAgent(EdgeAgent):
    """The edge agent, unchanged, with its sends and receipts written to the event log."""

    events: EventLog

    def _send(self, round_id: int, payload: bytes) -> None:
        self.events.write(
            ev="send", client=self.cfg.client_id, round=round_id, t=time.time(), bytes=len(payload)
        )
        super()._send(round_id, payload)

    def _on_receipt(self, item: Inbound) -> None:
        try:
            receipt = msg.decode(item.payload, msg.Receipt)
        except msg.MessageError:
            receipt = None
        if receipt is not None and receipt.client_id == self.cfg.client_id:
            self.events.write(
                ev="receipt",
                client=self.cfg.client_id,
                round=receipt.round,
                code=receipt.effective_code(),
                t=time.time(),
            )
        super()._on_receipt(item)


def parse_ids(text: str) -> list[str]:
    """``dev-00100:25`` → dev-00100 … dev-00124 (the prefix, the first number, how many)."""
    first, _, count = text.partition(":")
    prefix = first.rstrip("0123456789")
    digits = first[len(prefix) :]
    if not digits or not count.isdigit() or int(count) < 1:
        raise argparse.ArgumentTypeError(f"expected PREFIX<NUMBER>:COUNT, got {text!r}")
    width, start = len(digits), int(digits)
    return [f"{prefix}{start + i:0{width}d}" for i in range(int(count))]


def _id_set(text: str) -> frozenset[str]:
    return frozenset(part for part in text.split(",") if part)


def build_agents(args: argparse.Namespace, events: EventLog) -> list[FleetAgent]:
    """One agent per id, each with its own connection, state directory and data shard."""
    models: dict[tuple[Any, ...], Any] = {}
    lock = threading.Lock()
    agents = []
    for client_id in args.ids:
        cfg = AgentConfig(
            broker=args.broker,
            federation=args.federation,
            client_id=client_id,
            data=str(args.data_dir / f"{client_id}.npz"),
            state_dir=str(args.state_dir / client_id),
            resend_after_s=args.resend_after,
            connect_timeout=args.connect_timeout,
            mqtt_version=args.mqtt_version,
            allow_plaintext=True,
            # A heterogeneous fleet: as fedmq-agent's --slowdown, --min-batch-ms, --online.
            slowdown=args.slowdown if client_id in args.slow else 1.0,
            min_batch_ms=args.min_batch_ms,
            online=args.online,
            online_spell_s=args.online_spell_s,
            site=args.site,
        )
        # The agent command line's own connector (fedmq-agent: edge_agent.cli._mqtt).
        agent = FleetAgent(
            cfg, connector_for(cfg), trainer=SharedTrainer(client_id, models, lock, events)
        )
        agent.events = events
        agents.append(agent)
    return agents


def run_agents(agents: list[FleetAgent], events: EventLog) -> int:
    """Run every agent on its own thread until all have stopped; 0 when all ended well."""
    codes: dict[str, int] = {}

    def run(agent: FleetAgent) -> None:
        try:
            codes[agent.cfg.client_id] = agent.run()
        except Exception:  # one agent's crash is a finding, not the end of the others
            log.exception("%s crashed", agent.cfg.client_id)
            codes[agent.cfg.client_id] = 1
        events.write(
            ev="agent",
            client=agent.cfg.client_id,
            connects=agent.transport.connect_count,
            rounds_trained=agent.rounds_trained,
            slowdown=agent.cfg.slowdown,
            online=agent.cfg.online,
            offline_spells=agent.offline_spells,
            exit_code=codes[agent.cfg.client_id],
            t=time.time(),
        )

    threads = [
        threading.Thread(target=run, args=(a,), name=a.cfg.client_id, daemon=True) for a in agents
    ]
    for t in threads:
        t.start()
    parent = os.getppid()
    for t in threads:
        while t.is_alive():
            t.join(timeout=1.0)
            if os.getppid() != parent:  # the bench is gone: nobody will end this fleet
                log.error("the bench (pid %d) exited: stopping %d agents", parent, len(agents))
                for agent in agents:
                    agent.stop()
                parent = os.getppid()
    return 0 if all(c == 0 for c in codes.values()) and len(codes) == len(agents) else 1


def _lower_priority(how: str) -> None:
    """Yield the CPU to the system under test; threads started later inherit it.

    Hundreds of agent threads wake together when a new model arrives. At niceness 10 they
    still outweighed Mosquitto's one thread (the new model acknowledged after ~1 s at 1,000
    agents); confined to one of the two cores they starved themselves into keep-alive
    timeouts. SCHED_IDLE runs them whenever the broker and the aggregator do not need the CPU.
    """
    if how == "idle" and hasattr(os, "SCHED_IDLE"):
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    elif how in ("idle", "nice"):
        os.nice(10)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The process's flags: its agents, where they write, and how heterogeneous they are."""
    p = argparse.ArgumentParser(prog="python -m aggregator.ops.bench.fleet_agents")
    p.add_argument("--broker", required=True)
    p.add_argument("--federation", required=True)
    p.add_argument("--ids", type=parse_ids, required=True, help="PREFIX<NUMBER>:COUNT")
    p.add_argument("--data-dir", type=Path, required=True, help="one <client id>.npz each")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--events", type=Path, required=True)
    p.add_argument("--resend-after", type=float, default=30.0)
    p.add_argument("--connect-timeout", type=float, default=120.0)
    p.add_argument("--mqtt-version", default="auto")
    p.add_argument(
        "--site", default="", help="every agent's site (its broker is the site's; docs/sites.md)"
    )
    p.add_argument(
        "--priority",
        choices=("idle", "nice", "normal"),
        default="idle",
        help="idle (default): the agents take only CPU time the broker and the aggregator "
        "leave (SCHED_IDLE), as if the devices were other machines; nice: niceness 10",
    )
    p.add_argument(
        "--slow",
        type=_id_set,
        default=frozenset(),
        help="ID,ID,...: these train --slowdown× as long",
    )
    p.add_argument("--slowdown", type=float, default=1.0, help="(fedmq-agent --slowdown)")
    p.add_argument("--min-batch-ms", type=float, default=0.0, help="(fedmq-agent --min-batch-ms)")
    p.add_argument("--online", type=float, default=1.0, help="(fedmq-agent --online)")
    p.add_argument("--online-spell-s", type=float, default=60.0, help="(fedmq-agent's)")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the agents until they all stop (the federation finished, or SIGTERM)."""
    args = parse_args(argv)
    # A crash in native code (numpy, torch, msgspec) leaves every thread's stack in the log.
    faulthandler.enable(all_threads=False)  # the crashing one: 100s of threads are too many
    _lower_priority(args.priority)
    import torch  # before the agents go online: the first round is not slowed by the import

    torch.set_num_threads(1)
    events = EventLog(args.events)
    agents = build_agents(args, events)

    def stop_all(*_: object) -> None:
        for agent in agents:
            agent.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_all)
    try:
        return run_agents(agents, events)
    finally:
        events.close()


if __name__ == "__main__":
    sys.exit(main())

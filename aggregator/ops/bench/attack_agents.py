"""One process of malicious devices for ``fedmq bench strategies``: real edge agents whose
trainer is poisoned (:mod:`aggregator.ops.bench.attacks`), each on its own thread.

``python -m aggregator.ops.bench.attack_agents --broker URL --federation F --attack scale:100
--num-clients 10 --device agent-00=DATA.npz --device agent-01=DATA.npz --state-dir S`` runs one
:class:`~edge_agent.agent.EdgeAgent` per ``--device``, unchanged but for its trainer: its own
MQTT connection, outbox, receipts and re-sends, and update frames encoded with the announced
codec, as valid as any honest device's. The devices of one process collude (ALIE pools their
honest updates); each has its own model object (they train concurrently, one thread each).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from pathlib import Path

from aggregator.ops.bench.attacks import Attack, AttackError, Collusion, MaliciousTrainer
from edge_agent.agent import EdgeAgent
from edge_agent.config import AgentConfig
from shared.mqtt.connector import connector_for

log = logging.getLogger("fedmq.bench.attack")


def build_agents(args: argparse.Namespace, attack: Attack) -> list[EdgeAgent]:
    """One malicious agent per ``--device``; ALIE devices share one :class:`Collusion`."""
    collusion = Collusion(len(args.device), args.num_clients) if attack.kind == "alie" else None
    agents = []
    for client_id, data in args.device:
        cfg = AgentConfig(
            broker=args.broker,
            federation=args.federation,
            client_id=client_id,
            data=data,
            val_fraction=args.val_fraction,
            state_dir=str(args.state_dir / client_id),
            mqtt_version=args.mqtt_version,
            allow_plaintext=True,
            warm_up=True,
        )
        trainer = MaliciousTrainer(client_id, attack, collusion)
        agents.append(EdgeAgent(cfg, connector_for(cfg), trainer=trainer))
    return agents


def run_agents(agents: list[EdgeAgent]) -> int:
    """Run every agent on its own thread until all have stopped; 0 when all ended well."""
    codes: dict[str, int] = {}

    def run(agent: EdgeAgent) -> None:
        try:
            codes[agent.cfg.client_id] = agent.run()
        except Exception:
            log.exception("%s crashed", agent.cfg.client_id)
            codes[agent.cfg.client_id] = 1

    threads = [threading.Thread(target=run, args=(a,), name=a.cfg.client_id) for a in agents]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return 0 if len(codes) == len(agents) and not any(codes.values()) else 1


def _device(text: str) -> tuple[str, str]:
    client_id, sep, data = text.partition("=")
    if not sep or not client_id or not data:
        raise argparse.ArgumentTypeError(f"expected CLIENT_ID=DATA, got {text!r}")
    return client_id, data


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the malicious devices until the federation finishes."""
    p = argparse.ArgumentParser(prog="python -m aggregator.ops.bench.attack_agents")
    p.add_argument("--broker", required=True)
    p.add_argument("--federation", required=True)
    p.add_argument(
        "--attack", required=True, help="KIND[:FACTOR] (aggregator/ops/bench/attacks.py)"
    )
    p.add_argument("--num-clients", type=int, required=True, help="devices in the federation")
    p.add_argument("--device", type=_device, action="append", required=True, help="ID=DATA")
    p.add_argument("--state-dir", type=Path, required=True)
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--mqtt-version", default="auto")
    p.add_argument("--log-level", default="INFO")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        agents = build_agents(args, Attack.parse(args.attack))
    except (AttackError, ValueError, OSError) as exc:
        log.error("%s", exc)
        return 1

    def stop_all(*_: object) -> None:
        for agent in agents:
            agent.stop()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop_all)
    return run_agents(agents)


if __name__ == "__main__":
    sys.exit(main())

"""FedProx end to end over the in-memory broker: μ goes out in the round announcement, the
agents train with the proximal term and say so in their updates, signed or not."""

from __future__ import annotations

from pathlib import Path

from shared.protocol import messages as msg
from shared.protocol.frames import read_header
from shared.protocol.signing import generate_keypair, private_pem, public_pem
from tests.unit.inprocess import Federation, T


def _announced_mu(fed: Federation) -> set[float]:
    return {
        msg.decode(m.payload, msg.RoundStart).train.proximal_mu
        for m in fed.broker.messages(T.round_start_any)
        if m.payload
    }


def _update_mu(fed: Federation, client: str) -> set[object]:
    return {read_header(p).meta.get("proximal_mu") for r in (1, 2) for p in fed.updates(r, client)}


def test_agents_train_with_the_announced_proximal_term(fed: Federation) -> None:
    fed.start_aggregator(rounds=2, min_clients=2, proximal_mu=0.1)
    for i in range(2):
        fed.start_agent(f"pi-{i}", seed=i + 1)

    assert set(fed.finish().values()) == {0}
    assert _announced_mu(fed) == {0.1}
    assert _update_mu(fed, "pi-0") == _update_mu(fed, "pi-1") == {0.1}
    assert fed.rounds()[-1]["test_accuracy"] > 0.5


def test_without_fedprox_announcements_and_updates_carry_mu_0(fed: Federation) -> None:
    fed.start_aggregator(rounds=2, min_clients=1)
    fed.start_agent("pi-0", seed=1)

    assert set(fed.finish().values()) == {0}
    assert _announced_mu(fed) == {0.0} and _update_mu(fed, "pi-0") == {None}


def test_pinned_agents_verify_a_signed_fedprox_announcement(
    fed: Federation, tmp_path: Path
) -> None:
    key = generate_keypair()
    (tmp_path / "agg.pem").write_bytes(private_pem(key))
    (tmp_path / "agg.pub").write_bytes(public_pem(key.public_key()))
    fed.start_aggregator(
        rounds=2, min_clients=1, proximal_mu=0.5, signing_key=str(tmp_path / "agg.pem")
    )
    agent = fed.start_agent("pi-0", seed=1, model_public_key=str(tmp_path / "agg.pub"))

    assert set(fed.finish().values()) == {0}
    assert agent.rounds_trained == 2 and _update_mu(fed, "pi-0") == {0.5}

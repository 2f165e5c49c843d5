"""Sites over in-memory brokers: the central aggregator, site aggregators, real agents.

The bridge is :class:`tests.unit.inprocess_sites.MemoryBridge`; tests/integration/test_sites.py
runs the generated Mosquitto bridge.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from shared.protocol import messages as msg
from tests.unit.inprocess import Federation, wait_for
from tests.unit.inprocess_sites import Sites, T, start_central

ROUNDS = 2
SEEDS = {"a-0": 1, "a-1": 2, "b-0": 3, "b-1": 4}


def _sites(tmp: Path) -> Sites:
    fed = Sites(tmp)
    for site in ("a", "b"):
        fed.add_site(site, clip="none")  # as the central aggregator: flat-comparable
    for client, seed in SEEDS.items():
        fed.start_site_agent(client[0], client, seed)
    for site in ("a", "b"):
        wait_for(lambda s=site: fed.site_online(s, 2), f"site {site} online with 2 devices")
    return fed


def test_two_sites_give_the_flat_federations_model(tmp_path: Path) -> None:
    sites = _sites(tmp_path / "sites")
    flat = Federation(tmp_path / "flat")
    try:
        central = start_central(
            sites, rounds=ROUNDS, min_clients=2, codec="fp32", download_codec="none"
        )
        assert set(sites.finish().values()) == {0}
        for client, seed in SEEDS.items():
            flat.start_agent(client, seed)
        flat.wait_online(*SEEDS)
        reference = flat.start_aggregator(
            rounds=ROUNDS, min_clients=4, codec="fp32", download_codec="none", clip="none"
        )
        assert set(flat.finish().values()) == {0}
    finally:
        sites.stop()
        flat.stop()

    rounds = sites.rounds()
    assert [r["participants"] for r in rounds] == [["a", "b"]] * ROUNDS
    assert [r["num_samples"] for r in rounds] == [4 * 120] * ROUNDS
    for name, value in reference.params.items():
        np.testing.assert_allclose(central.params[name], value, rtol=0, atol=2e-5)
    assert [r["num_samples"] for r in flat.rounds()] == [4 * 120] * ROUNDS
    for agent in sites.agents.values():
        assert agent.rounds_trained == ROUNDS
        assert agent.outbox.rounds() == []  # the site acknowledged every update
    # Nothing a device published reached the central broker: only the sites' partials.
    assert not sites.broker.messages(T.update_any)
    assert len(sites.broker.messages(T.site_partial_any)) == 2 * ROUNDS


def test_a_cut_bridge_delivers_its_partial_once_when_restored(tmp_path: Path) -> None:
    fed = _sites(tmp_path)
    try:
        start_central(fed, rounds=2, min_clients=2, round_timeout=60.0, codec="fp32")
        wait_for(lambda: len(fed.rounds()) == 1, "round 1 applied")
        fed.bridges["b"].set_cut(True)
        # Round 2's announcement may have crossed before the cut: then b sums it (its partial
        # waits in the cut), else b sees it only after the restore. Either way, b must be done
        # with what it has before the clock passes the deadlines.
        b = fed.site_services["b"]
        if any(m.payload for m in fed.site_brokers["b"].messages(T.round_start(2))):
            wait_for(lambda: 2 in b.outbox.pending, "b's round-2 partial, held by the cut")
        fed.clock.advance(61.0)  # central: round 2 below quorum at its deadline: extended
        wait_for(lambda: _decisions(fed, 2) == ["extended"], "round 2 extended")
        fed.bridges["b"].set_cut(False)
        wait_for(lambda: len(fed.rounds()) == 2, "round 2 applied once b is back")
        codes = fed.finish()
    finally:
        fed.stop()

    assert set(codes.values()) == {0}
    assert [r["participants"] for r in fed.rounds()] == [["a", "b"], ["a", "b"]]
    receipts = [
        msg.decode(m.payload, msg.Receipt) for m in fed.broker.messages(T.site_receipt(2, "b"))
    ]
    assert [r.effective_code() for r in receipts].count("accepted") == 1
    assert fed.site_services["b"].outbox.rounds() == []


def _decisions(fed: Federation, round_id: int) -> list[str]:
    return [
        msg.decode(m.payload, msg.RoundDecision).decision
        for m in fed.broker.messages(T.round_decision(round_id))
    ]


def test_a_site_and_a_plain_device_mix_in_one_federation(tmp_path: Path) -> None:
    mixed = Sites(tmp_path / "mixed")
    flat = Federation(tmp_path / "flat")
    settings = {"rounds": 2, "codec": "fp32", "download_codec": "none", "clip": "none"}
    try:
        mixed.add_site("a", clip="none")
        mixed.start_site_agent("a", "a-0", SEEDS["a-0"])
        mixed.start_site_agent("a", "a-1", SEEDS["a-1"])
        mixed.start_agent("pi-c", 9)  # on the central broker, as today
        wait_for(lambda: mixed.site_online("a", 2), "site a online with 2 devices")
        mixed.wait_online("pi-c")
        central = mixed.start_aggregator(min_clients=2, **settings)
        assert set(mixed.finish().values()) == {0}
        for client, seed in (("a-0", SEEDS["a-0"]), ("a-1", SEEDS["a-1"]), ("pi-c", 9)):
            flat.start_agent(client, seed)
        flat.wait_online("a-0", "a-1", "pi-c")
        reference = flat.start_aggregator(min_clients=3, **settings)
        assert set(flat.finish().values()) == {0}
    finally:
        mixed.stop()
        flat.stop()

    assert [r["participants"] for r in mixed.rounds()] == [["a", "pi-c"]] * 2
    assert [r["num_samples"] for r in mixed.rounds()] == [3 * 120] * 2
    for name, value in reference.params.items():
        np.testing.assert_allclose(central.params[name], value, rtol=0, atol=2e-5)

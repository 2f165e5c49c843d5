"""Sites with real processes: the central aggregator, a site aggregator and agents over two
real Mosquittos bridged as generated (tests/integration/site_brokers.py)."""

from __future__ import annotations

import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from aggregator.ops.demo import aggregator_command
from shared.protocol import messages as msg
from tests.integration import federation as fed
from tests.integration.site_brokers import (
    BRIDGE_WAIT,
    FED,
    SITE,
    Sites,
    T,
    bridged_sites,
    connect,
)

pytestmark = pytest.mark.integration


@pytest.fixture
def sites(tmp_path: Path) -> Iterator[Sites]:
    """The central broker (device pi-c) and factory-1's broker (device pi-0), started."""
    yield from bridged_sites(tmp_path)


def _held_model(log: Path) -> str:
    """The ``round: hash`` an agent logged holding when it stopped."""
    found = re.search(r"holding the global model of round (\S+): (\w+)", log.read_text())
    assert found, f"no final model line in {log}"
    return f"{found[1]}: {found[2]}"


def test_a_pinned_device_at_the_site_follows_the_central_aggregators_signed_run(
    sites: Sites, tmp_path: Path
) -> None:
    # A real signing aggregator and a device (pi-c) on the central broker; pi-0 at the site,
    # pinned to the central key (its bundle's model-signing.pub). No site aggregator runs
    # here, so its site is not selected: it must get the signed model, its deltas and the signed
    # `finished` through the bridge, and its presence must not reach the central aggregator.
    data = fed.write_client_data(tmp_path / "data", 2)
    central_url = f"mqtts://localhost:{sites.central.broker.port}"
    site_url = f"mqtts://localhost:{sites.site.broker.port}"
    agg_toml = sites.central.root / "identities" / "aggregator" / "aggregator.toml"
    procs = [
        fed.start_aggregator(
            central_url, tmp_path, "--config", str(agg_toml), rounds=2, min_clients=1
        )
    ]
    for name, tier, url, path in (
        ("pi-c", sites.central, central_url, data[0]),
        ("pi-0", sites.site, site_url, data[1]),
    ):
        toml = tier.root / "devices" / name / "agent.toml"
        procs.append(fed.start_agent(url, name, path, tmp_path, "--config", str(toml)))
    try:
        assert fed.wait_exit(procs[0], 180, tmp_path / "aggregator.log") == 0
        codes = fed.wait_agents(procs[1:], ["pi-c", "pi-0"], tmp_path)
    finally:
        fed.stop(procs)

    assert codes == [0, 0]  # pi-0 too: the central's signed `finished` crossed the bridge
    assert [r["participants"] for r in fed.metrics(tmp_path)] == [["pi-c"], ["pi-c"]]
    site_log = (tmp_path / "pi-0.log").read_text()
    assert "global model of round 0" in site_log  # the signed full model, verified
    assert "refused" not in site_log and "rejected" not in site_log
    assert _held_model(tmp_path / "pi-0.log") == _held_model(tmp_path / "pi-c.log")
    assert _held_model(tmp_path / "pi-0.log").startswith("2: ")
    assert "pi-0" not in (tmp_path / "aggregator.log").read_text()


def test_a_site_aggregator_counts_its_devices_once_per_round_across_a_two_round_cut(
    sites: Sites, tmp_path: Path
) -> None:
    # Central: a signing aggregator and pi-c. Site factory-1: its aggregator (the generated
    # aggregator.toml: --site, pinned to the central key) and pi-0. The uplink is cut for
    # two central rounds: they close without the site (quorum 1: pi-c), whatever the site
    # sent meanwhile waits in the bridge's queue and is answered when it heals, and the site
    # takes part again in the next round.
    data = fed.write_client_data(tmp_path / "data", 2)
    central_url = f"mqtts://localhost:{sites.central.broker.port}"
    site_url = f"mqtts://localhost:{sites.site.broker.port}"
    agg_toml = sites.central.root / "identities" / "aggregator" / "aggregator.toml"
    site_toml = sites.site.root / "identities" / "aggregator" / "aggregator.toml"
    watcher = connect(sites.central, "monitor")
    site_status = fed.collect(watcher, T.site_status(SITE))
    site_log = tmp_path / "site-aggregator.log"
    with site_log.open("wb") as out:
        site = subprocess.Popen(
            [*aggregator_command(site_url, FED, "--config", str(site_toml)), "--clip", "none",
             "--state-dir", str(tmp_path / "site-state")],
            stdout=out, stderr=subprocess.STDOUT, env=fed._env(tmp_path), cwd=fed.REPO,
        )  # fmt: skip
    procs = [site]
    for name, tier, url, path, pace in (
        # pi-c paced (about 2 s a round), so rounds after the heal wait for its update while
        # the bridge reconnects: the site can take part again.
        ("pi-c", sites.central, central_url, data[0], "200"),
        ("pi-0", sites.site, site_url, data[1], "0"),
    ):
        toml = tier.root / "devices" / name / "agent.toml"
        procs.append(
            fed.start_agent(
                url, name, path, tmp_path, "--config", str(toml), "--min-batch-ms", pace
            )
        )
    try:
        # The central aggregator starts once the site's status (1 device) is on its broker.
        fed.until(site_status, _site_with_devices, BRIDGE_WAIT, "the site's status on central")
        central = fed.start_aggregator(
            central_url, tmp_path, "--config", str(agg_toml), "--round-timeout", "20",
            "--clip", "none", rounds=9, min_clients=1,
        )  # fmt: skip
        procs.append(central)
        rounds = lambda: fed.metrics(tmp_path) if (tmp_path / "metrics.json").exists() else []  # noqa: E731
        fed.wait_for(lambda: len(rounds()) >= 1, 120, "round 1 applied")
        # Refused, not accepted-and-closed: Mosquitto 2.0.11's TLS bridge, retrying every
        # 1-2 s into a link that accepts and drops it mid-handshake, froze the whole site
        # broker here after a few attempts (docs/sites.md, "Bridge caveats").
        sites.uplink.unplug()
        cut_at = len(rounds())
        fed.wait_for(lambda: len(rounds()) >= cut_at + 3, 120, "two rounds during the cut")
        sites.uplink.heal()
        assert fed.wait_exit(central, 240, tmp_path / "aggregator.log") == 0
        assert fed.wait_exit(site, 60, site_log) == 0  # the signed `finished` crossed
        codes = fed.wait_agents(procs[1:3], ["pi-c", "pi-0"], tmp_path)
    finally:
        fed.stop(procs)
        watcher.disconnect()

    assert codes == [0, 0]
    parts = [r["participants"] for r in fed.metrics(tmp_path)]
    assert parts[0] == [SITE, "pi-c"]
    # The cut rounds (the round open when it began may still have had the site's partial).
    assert parts[cut_at + 1 : cut_at + 3] == [["pi-c"], ["pi-c"]]
    assert [SITE, "pi-c"] in parts[cut_at + 3 :]  # it caught up
    text = site_log.read_text()
    counted = re.findall(r"round (\d+): central counted the partial", text)
    assert len(counted) == len(set(counted)) == sum(SITE in p for p in parts)
    refused = re.findall(r"round (\d+): central refused the partial \((\w[\w-]*)\)", text)
    assert all(code == "late" for _, code in refused)  # sent into the cut, answered after
    assert not set(counted) & {r for r, _ in refused}
    assert (tmp_path / "site-state" / "partials").is_dir()
    assert not list((tmp_path / "site-state" / "partials").iterdir())  # every one answered
    assert "pi-0" not in (tmp_path / "aggregator.log").read_text()  # only the site crossed


def _site_with_devices(m: mqtt.MQTTMessage) -> bool:
    if m.topic != T.site_status(SITE) or not m.payload:
        return False
    status = msg.decode(m.payload, msg.SiteStatus)
    return status.state == "online" and status.devices >= 1

"""Sites: topic names, the generated bridge config and ACLs, site provisioning (no broker).

tests/integration/test_sites.py runs two real Mosquittos with these files.
"""

from __future__ import annotations

import json
import stat
import tomllib
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from paho.mqtt.client import topic_matches_sub

from aggregator.ops import provision
from aggregator.ops.bridge import (
    SiteUplink,
    Upstream,
    bridge_local_clientid,
    central_site_acl,
    parse_upstream,
    site_acl,
)
from aggregator.ops.broker_templates import ACL, BRIDGE_CONF_TEMPLATE
from aggregator.ops.sites import site_add
from shared.protocol.topics import ParsedTopic, TopicError, Topics, parse, validate_name

REPO = Path(__file__).resolve().parents[2]
FED = "fx"
SITE = "factory-1"
T = Topics(FED)
device_ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,57}", fullmatch=True).filter(
    lambda n: not n.endswith("-infer")
)
round_ids = st.integers(min_value=0, max_value=999_999_999)


def _conf_lines(text: str) -> list[tuple[str, str]]:
    """(key, value) of every setting of a Mosquitto config, comments and blanks skipped."""
    out = []
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, value = line.partition(" ")
            out.append((key, value))
    return out


def _bridge(conf: str) -> list[tuple[str, str]]:
    """The settings from the ``connection`` line on (Mosquitto: all the bridge's)."""
    lines = _conf_lines(conf)
    start = [k for k, _ in lines].index("connection")
    return lines[start:]


def _central_and_site(tmp_path: Path, **kw: object) -> tuple[Path, Path]:
    central, site = tmp_path / "central", tmp_path / "site"
    provision.broker_init(central, host="central.lan", port=18883, federation=FED)
    site_add(central, SITE)
    uplink = SiteUplink(SITE, Upstream("central.lan", 18883), central / "sites" / SITE)
    provision.broker_init(site, port=18884, site=uplink, **kw)  # type: ignore[arg-type]
    return central, site


# ------------------------------------------------------------------ topics


def test_site_topics_parse_back_to_their_site_and_round() -> None:
    assert parse(T.site_partial(7, SITE)) == ParsedTopic(FED, "site_partial", 7, site=SITE)
    assert parse(T.site_receipt(7, SITE)) == ParsedTopic(FED, "site_receipt", 7, site=SITE)
    assert parse(T.site_status(SITE)) == ParsedTopic(FED, "site_status", site=SITE)
    assert parse(T.site_bridge(SITE)) == ParsedTopic(FED, "site_bridge", site=SITE)


@pytest.mark.parametrize("name", ["", "a/b", "+", "#", "-x", "x" * 65])
def test_site_names_are_validated_like_client_ids(name: str) -> None:
    with pytest.raises(TopicError, match="site name"):
        T.site_partial(1, name)
    with pytest.raises(TopicError):
        parse(f"fl/v1/{FED}/sites/{name}/status")


def test_unknown_site_topics_are_refused() -> None:
    with pytest.raises(TopicError, match="unknown"):
        parse(f"fl/v1/{FED}/sites/{SITE}/round/1/update")


@given(device_ids, round_ids)
def test_nothing_a_device_publishes_matches_the_uplink(device: str, round_id: int) -> None:
    published = [
        T.update(round_id, device),
        T.update(round_id, device) + "/chunk/0",
        T.agent_status(device),
        T.infer_request(device, device),
        T.infer_response(device, device),
        T.receipt(round_id, device),
    ]
    for topic in published:
        assert not any(topic_matches_sub(p, topic) for p in T.site_uplink(SITE)), topic


@given(round_ids)
def test_the_uplink_carries_the_sites_partials_and_status_only(round_id: int) -> None:
    up = T.site_uplink(SITE)
    assert any(topic_matches_sub(p, T.site_partial(round_id, SITE)) for p in up)
    assert any(topic_matches_sub(p, T.site_partial(round_id, SITE) + "/chunk/3") for p in up)
    assert any(topic_matches_sub(p, T.site_status(SITE)) for p in up)
    assert not any(topic_matches_sub(p, T.site_partial(round_id, "factory-2")) for p in up)
    assert not any(topic_matches_sub(p, T.site_receipt(round_id, SITE)) for p in up)


@given(round_ids)
def test_the_downlink_carries_what_devices_join_with(round_id: int) -> None:
    down = T.site_downlink(SITE)
    needed = [
        T.global_meta,
        T.global_model,
        T.global_model + "/chunk/0",
        T.global_delta,
        T.global_delta + "/chunk/2",
        T.global_onnx,
        T.round_start(round_id),
        T.round_decision(round_id),
        T.aggregator_status,
        T.site_receipt(round_id, SITE),
    ]
    for topic in needed:
        assert any(topic_matches_sub(p, topic) for p in down), topic
    for topic in (T.site_receipt(round_id, "factory-2"), T.metrics, T.update(round_id, "pi")):
        assert not any(topic_matches_sub(p, topic) for p in down), topic


def test_downlink_and_uplink_are_disjoint_so_nothing_loops() -> None:
    down, up = T.site_downlink(SITE), T.site_uplink(SITE)
    for d in down:
        for u in up:
            probe = u.replace("+", "1")
            assert not topic_matches_sub(d, probe), (d, u)


# ------------------------------------------------------------------ --upstream


@pytest.mark.parametrize(
    ("text", "host", "port"),
    [
        ("central.lan:8883", "central.lan", 8883),
        ("10.0.0.5:1", "10.0.0.5", 1),
        ("[::1]:8883", "::1", 8883),
    ],
)
def test_upstream_accepts_host_port(text: str, host: str, port: int) -> None:
    up = parse_upstream(text)

    assert (up.host, up.port) == (host, port)
    assert str(up) == text


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("central.lan", "expected HOST:PORT"),
        (":8883", "expected HOST:PORT"),
        ("central.lan:", "expected HOST:PORT"),
        ("central.lan:0", "port must be in 1..65535"),
        ("central.lan:65536", "port must be in 1..65535"),
        ("central.lan:88a3", "port must be in 1..65535"),
        ("bad host:8883", "not a host name"),
        ("mqtts://central.lan:8883", "not a host name"),
        ("[::zz]:8883", "not an IPv6 address"),
        ("-lead:8883", "not a host name"),
    ],
)
def test_a_bad_upstream_gets_a_clear_error(text: str, why: str) -> None:
    with pytest.raises(ValueError, match="bad --upstream") as err:
        parse_upstream(text)
    assert why in str(err.value)


# ------------------------------------------------------------------ generated configs


def test_site_conf_bridges_with_tls_the_sites_login_and_a_persistent_session(
    tmp_path: Path,
) -> None:
    _, site = _central_and_site(tmp_path)
    conf = (site / "mosquitto.conf").read_text()
    bridge = dict(_bridge(conf))
    password = (site / "uplink" / "password").read_text().strip()

    assert "{" not in conf
    assert bridge["connection"] == f"fedmq-site-{SITE}"
    assert bridge["address"] == "central.lan:18883"
    assert bridge["remote_username"] == bridge["remote_clientid"] == SITE
    assert bridge["remote_password"] == password
    assert bridge["local_clientid"] == bridge_local_clientid(SITE)
    with pytest.raises(TopicError):  # no provisioned login can take over the bridge locally
        validate_name("login", bridge["local_clientid"])
    for key, name in (("cafile", "ca.crt"), ("certfile", "client.crt"), ("keyfile", "client.key")):
        assert bridge[f"bridge_{key}"] == str(site.resolve() / "uplink" / name)
    assert bridge["bridge_insecure"] == "false"
    assert bridge["bridge_protocol_version"] == "mqttv311"
    assert bridge["cleansession"] == bridge["local_cleansession"] == "false"
    assert bridge["try_private"] == "true"
    assert bridge["restart_timeout"] == "5 60"
    assert bridge["notification_topic"] == T.site_bridge(SITE)
    assert bridge["bridge_max_packet_size"] == "2000000"


def test_site_conf_bridge_comes_last_and_keeps_the_queue_bounds(tmp_path: Path) -> None:
    _, site = _central_and_site(tmp_path)
    lines = _conf_lines((site / "mosquitto.conf").read_text())
    keys = [k for k, _ in lines]
    bridge_keys = {k for k, _ in _bridge((site / "mosquitto.conf").read_text())}

    assert keys.index("connection") > max(i for i, k in enumerate(keys) if k == "listener")
    assert "listener" not in bridge_keys and "acl_file" not in bridge_keys
    settings = dict(lines[: keys.index("connection")])
    assert settings["max_queued_messages"] == "20000"
    assert settings["max_queued_bytes"] == "134217728"
    assert settings["persistence"] == "true"  # the site's queued partials survive a restart


def test_bridge_topic_lines_send_downlink_in_and_uplink_out(tmp_path: Path) -> None:
    _, site = _central_and_site(tmp_path)
    topics = [v.split() for k, v in _bridge((site / "mosquitto.conf").read_text()) if k == "topic"]

    assert [(p, d, q) for p, d, q in topics if d == "in"] == [
        (p, "in", "0" if p in T.global_payloads else "1") for p in T.site_downlink(SITE)
    ]
    assert {p for p, _, q in topics if q == "0"} == {
        T.global_model,
        T.global_model + "/chunk/+",
        T.global_delta,
        T.global_delta + "/chunk/+",
        T.global_onnx,
        T.global_onnx + "/chunk/+",
    }
    assert [(p, d, q) for p, d, q in topics if d == "out"] == [
        (p, "out", "1") for p in T.site_uplink(SITE)
    ]
    assert all(len(t) == 3 for t in topics)  # no "both", no remapping prefixes


def test_central_acl_confines_a_site_to_its_own_topics(tmp_path: Path) -> None:
    central = tmp_path / "central"
    provision.broker_init(central, port=18883, federation=FED)
    site_add(central, SITE)
    acl = (central / "acl.conf").read_text()
    block = acl.split(f"user {SITE}\n", 1)[1].splitlines()

    assert acl.startswith(ACL)
    assert block == central_site_acl(FED, SITE).splitlines()[2:]
    denies = [i for i, line in enumerate(block) if line.startswith("topic deny")]
    assert denies == [0, 1, 2]  # before any grant
    writes = [line.split()[2] for line in block if line.startswith("topic write")]
    assert writes and all(w.startswith(f"fl/v1/{FED}/sites/{SITE}/") for w in writes)
    reads = {line.split()[2] for line in block if line.startswith("topic read")}
    assert reads == set(T.site_downlink(SITE))
    assert not any("readwrite" in line or line.endswith("#") for line in block[3:])


def test_site_acl_keeps_the_device_rules_and_narrows_the_aggregator() -> None:
    acl = site_acl(FED, SITE)
    aggregator = acl.split("user aggregator\n", 1)[1].split("\n\n", 1)[0].splitlines()

    for line in ACL.splitlines():
        if line.startswith("pattern"):
            assert line in acl
    assert "topic read fl/v1/#" in aggregator
    writes = [line.split()[2] for line in aggregator if line.startswith("topic write")]
    assert not any("global" in w or w.endswith("/start") or "aggregator" in w for w in writes)
    assert f"fl/v1/{FED}/sites/{SITE}/round/+/partial" in writes
    assert "topic readwrite fl/v1/#" not in acl


# ------------------------------------------------------------------ provisioning


def test_add_site_writes_a_bundle_a_login_and_its_acl_block(tmp_path: Path) -> None:
    central = tmp_path / "central"
    provision.broker_init(central, host="central.lan", port=18883, federation=FED)

    site_add(central, SITE)

    bundle = central / "sites" / SITE
    assert json.loads((bundle / "uplink.json").read_text()) == {
        "site": SITE,
        "federation": FED,
        "upstream": "central.lan:18883",
        "server_names": ["localhost", "central.lan", "127.0.0.1"],
    }
    assert (bundle / "ca.crt").read_bytes() == (central / "ca.crt").read_bytes()
    assert (bundle / "model-signing.pub").read_bytes() == (
        central / "model-signing.pub"
    ).read_bytes()
    assert stat.S_IMODE((bundle / "client.key").stat().st_mode) == 0o600
    users = [line.split(":")[0] for line in (central / "passwd").read_text().splitlines()]
    assert SITE in users
    assert f"user {SITE}\n" in (central / "acl.conf").read_text()


def test_add_site_twice_keeps_everything(tmp_path: Path) -> None:
    central = tmp_path / "central"
    provision.broker_init(central, port=18883, federation=FED)
    site_add(central, SITE)
    before = {p: p.read_bytes() for p in central.rglob("*") if p.is_file()}

    site_add(central, SITE)
    provision.broker_init(central, port=18883, federation=FED)

    assert {p: p.read_bytes() for p in central.rglob("*") if p.is_file()} == before


@pytest.mark.parametrize("name", ["aggregator", "monitor", "pi-0", "pi-0-infer", "x/y"])
def test_a_site_cannot_take_a_login_already_in_use(tmp_path: Path, name: str) -> None:
    central = tmp_path / "central"
    provision.broker_init(central, port=18883, federation=FED)
    provision.device_add(central, "pi-0")

    with pytest.raises((ValueError, TopicError)):
        site_add(central, name)


def test_a_device_cannot_take_a_sites_login(tmp_path: Path) -> None:
    central = tmp_path / "central"
    provision.broker_init(central, port=18883, federation=FED)
    site_add(central, SITE)

    with pytest.raises(ValueError, match="site"):
        provision.device_add(central, SITE)


def test_site_broker_pins_the_central_key_and_makes_no_signing_key(tmp_path: Path) -> None:
    central, site = _central_and_site(tmp_path)
    provision.device_add(site, "pi-7")

    assert not (site / "model-signing.key").exists()
    central_pub = (central / "model-signing.pub").read_bytes()
    assert (site / "model-signing.pub").read_bytes() == central_pub
    assert (site / "devices" / "pi-7" / "model-signing.pub").read_bytes() == central_pub
    agg = tomllib.loads((site / "identities/aggregator/aggregator.toml").read_text())
    assert "signing_key" not in agg["aggregator"]
    assert agg["aggregator"]["federation"] == FED  # from the bundle
    # `fedmq-aggregator --config aggregator.toml` runs as the site's aggregator, pinned.
    assert agg["aggregator"]["site"] == SITE
    assert agg["aggregator"]["central_key"] == str(site.resolve() / "model-signing.pub")
    device = tomllib.loads((site / "devices/pi-7/agent.toml").read_text())
    assert device["agent"]["site"] == SITE  # it trains the rounds that select its site
    assert "site" not in device["inference"]
    assert (site / "acl.conf").read_text() == site_acl(FED, SITE)
    assert stat.S_IMODE((site / "mosquitto.conf").stat().st_mode) == 0o600
    assert stat.S_IMODE((site / "uplink" / "client.key").stat().st_mode) == 0o600


def test_site_broker_refuses_a_contradicting_federation_or_someone_elses_bundle(
    tmp_path: Path,
) -> None:
    central = tmp_path / "central"
    provision.broker_init(central, port=18883, federation=FED)
    site_add(central, SITE)
    bundle = central / "sites" / SITE
    up = Upstream("localhost", 18883)

    with pytest.raises(ValueError, match="contradicts"):
        provision.broker_init(
            tmp_path / "s1", federation="other", site=SiteUplink(SITE, up, bundle)
        )
    with pytest.raises(ValueError, match="factory-1'"):
        provision.broker_init(tmp_path / "s2", site=SiteUplink("factory-2", up, bundle))
    with pytest.raises(ValueError, match="not a site bundle"):
        provision.broker_init(tmp_path / "s3", site=SiteUplink(SITE, up, tmp_path))
    assert not (tmp_path / "s1").exists()


@pytest.mark.parametrize("host", ["central.lan", "CENTRAL.lan", "127.0.0.1", "localhost"])
def test_the_upstream_may_be_any_name_of_the_central_certificate(tmp_path: Path, host: str) -> None:
    central = tmp_path / "central"
    provision.broker_init(central, host="central.lan", port=18883, federation=FED)
    site_add(central, SITE)
    uplink = SiteUplink(SITE, Upstream(host, 18883), central / "sites" / SITE)

    provision.broker_init(tmp_path / "site", site=uplink)

    assert f"address {host}:18883\n" in (tmp_path / "site" / "mosquitto.conf").read_text()


def test_an_upstream_the_central_certificate_does_not_name_is_refused(tmp_path: Path) -> None:
    central = tmp_path / "central"
    provision.broker_init(central, host="central.lan", port=18883, federation=FED)
    site_add(central, SITE)
    uplink = SiteUplink(SITE, Upstream("10.0.0.9", 18883), central / "sites" / SITE)

    with pytest.raises(ValueError, match=r"bad --upstream 10\.0\.0\.9:18883") as err:
        provision.broker_init(tmp_path / "site", site=uplink)
    assert "localhost, central.lan, 127.0.0.1" in str(err.value)
    assert not (tmp_path / "site").exists()


def test_a_reissued_bundle_brings_its_new_password_into_the_bridge(tmp_path: Path) -> None:
    central, site = _central_and_site(tmp_path)
    site_add(central, SITE, force=True)  # the central side rotated the site's secrets
    uplink = SiteUplink(SITE, Upstream("central.lan", 18883), central / "sites" / SITE)

    provision.broker_init(site, port=18884, site=uplink)

    new = (central / "sites" / SITE / "password").read_text().strip()
    assert dict(_bridge((site / "mosquitto.conf").read_text()))["remote_password"] == new


def test_a_rerun_with_another_upstream_rewrites_the_bridge_and_keeps_the_rest(
    tmp_path: Path,
) -> None:
    central, site = _central_and_site(tmp_path)
    before = {p: p.read_bytes() for p in site.rglob("*") if p.is_file()}
    uplink = SiteUplink(SITE, Upstream("127.0.0.1", 18883), central / "sites" / SITE)

    report = provision.broker_init(site, port=18884, site=uplink)

    conf = site.resolve() / "mosquitto.conf"
    assert report.of(conf) == "updated"
    assert dict(_bridge(conf.read_text()))["address"] == "127.0.0.1:18883"
    changed = {p for p in site.rglob("*") if p.is_file() and p.read_bytes() != before.get(p)}
    assert changed == {site / "mosquitto.conf", site / "provision.json"}
    assert json.loads((site / "provision.json").read_text())["upstream"] == "127.0.0.1:18883"


def test_sites_are_added_on_the_central_broker_only(tmp_path: Path) -> None:
    _, site = _central_and_site(tmp_path)

    with pytest.raises(ValueError, match="central"):
        site_add(site, "factory-2")


def test_embedded_bridge_template_matches_broker_config_file() -> None:
    assert (REPO / "broker_config/mosquitto-bridge.conf").read_text() == BRIDGE_CONF_TEMPLATE


def test_cli_adds_a_site_and_inits_its_broker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aggregator.ops.cli import main

    central, site = str(tmp_path / "c"), str(tmp_path / "s")
    assert main(["broker", "init", central, "--federation", FED, "--no-dashboard"]) == 0
    assert main(["broker", "add-site", SITE, "--dir", central]) == 0
    bundle = str(tmp_path / "c" / "sites" / SITE)
    site_args = ["--site", SITE, "--uplink", bundle, "--no-dashboard", "--port", "18884"]
    assert main(["broker", "init", site, "--upstream", "localhost:8883", *site_args]) == 0
    capsys.readouterr()

    assert main(["broker", "init", site + "2", "--upstream", "localhost", *site_args]) == 1
    assert main(["broker", "init", site + "3", "--site", SITE]) == 1

    out = capsys.readouterr().out
    assert "error: bad --upstream 'localhost': expected HOST:PORT" in out
    assert "missing ['--upstream', '--uplink']" in out
    assert "topic fl/v1/fx/round/+/start in 1" in (tmp_path / "s" / "mosquitto.conf").read_text()


def test_a_central_monitor_takes_the_sites_topics_as_known_not_as_problems() -> None:
    from aggregator.ops.monitor_view import MonitorState
    from shared.protocol import messages as msg

    state = MonitorState(FED)
    status = msg.SiteStatus(site=SITE, state="online", devices=3)
    receipt = msg.Receipt(round=1, client_id=SITE, status="accepted", code="accepted")
    for topic, payload in [
        (T.site_bridge(SITE), b"1"),
        (T.site_status(SITE), status.to_json()),
        (T.site_partial(1, SITE), b"partial"),  # the monitor does not read partials
        (T.site_receipt(1, SITE), receipt.to_json()),
    ]:
        state.apply(topic, payload, retain=False)

    assert list(state.problems) == []
    assert state.sites[SITE].devices == 3 and state.sites[SITE].partial == "accepted"
    state.apply(T.site_status(SITE), b'{"state": "running"}', retain=False)
    assert "invalid SiteStatus" in state.problems[-1]  # a broken status: shown, not raised


def test_an_explicit_default_federation_contradicting_the_bundle_is_refused(tmp_path: Path) -> None:
    central = tmp_path / "central"
    provision.broker_init(central, port=18883, federation=FED)
    site_add(central, SITE)
    uplink = SiteUplink(SITE, Upstream("localhost", 18883), central / "sites" / SITE)

    with pytest.raises(ValueError, match=r"--federation default contradicts .*\(fx\)"):
        provision.broker_init(tmp_path / "site", federation="default", site=uplink)

"""Unit tests for broker/device provisioning (aggregator/ops/provision.py, aggregator/ops/pki.py).

No broker here: tests/integration/test_security.py starts Mosquitto with these files.
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import stat
import subprocess
import tomllib
from pathlib import Path

import pytest
from cryptography import x509

from aggregator.ops import pki, provision
from aggregator.ops.broker_templates import ACL, DASHBOARD_CONF_TEMPLATE, PROD_CONF_TEMPLATE
from edge_agent.config import AgentConfig
from shared.protocol.signing import load_private_key, load_public_key
from shared.settings import load_toml

REPO = Path(__file__).resolve().parents[2]
SECRETS = (
    "ca.key",
    "broker.key",
    "model-signing.key",
    "passwd",
    "identities/aggregator/password",
    "identities/aggregator/client.key",
    "identities/aggregator/aggregator.toml",
    "identities/monitor/password",
)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _init(root: Path, **kw: object) -> provision.Report:
    return provision.broker_init(root, host="broker.lan", port=18883, federation="lab", **kw)  # type: ignore[arg-type]


def test_broker_init_creates_every_file_with_secrets_private(tmp_path: Path) -> None:
    _init(tmp_path)

    for name in SECRETS:
        assert _mode(tmp_path / name) == 0o600, name
    assert _mode(tmp_path / "ca.crt") == 0o644
    assert (tmp_path / "acl.conf").read_text() == ACL
    conf = (tmp_path / "mosquitto.conf").read_text()
    assert "listener 18883\n" in conf and "allow_anonymous false" in conf
    assert f"password_file {tmp_path.resolve()}/passwd" in conf
    assert "{" not in conf  # every placeholder rendered
    load_private_key(tmp_path / "model-signing.key")
    load_public_key(tmp_path / "model-signing.pub")


def test_broker_certificate_names_localhost_loopback_and_host(tmp_path: Path) -> None:
    _init(tmp_path)
    cert = x509.load_pem_x509_certificate((tmp_path / "broker.crt").read_bytes())

    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert set(san.get_values_for_type(x509.DNSName)) == {"localhost", "broker.lan"}
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("127.0.0.1")]
    ca = x509.load_pem_x509_certificate((tmp_path / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)


def test_rerun_keeps_everything_and_reports_it(tmp_path: Path) -> None:
    _init(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    report = _init(tmp_path)

    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before
    assert {a for a, _ in report.actions} == {"kept"}


def test_force_rotates_keys_and_passwords(tmp_path: Path) -> None:
    _init(tmp_path)
    old_pw = (tmp_path / "identities/aggregator/password").read_text()
    old_key = (tmp_path / "model-signing.key").read_bytes()

    report = _init(tmp_path, force=True)

    assert (tmp_path / "identities/aggregator/password").read_text() != old_pw
    assert (tmp_path / "model-signing.key").read_bytes() != old_key
    assert report.of(tmp_path / "ca.key") == "rotated"
    assert _mode(tmp_path / "ca.key") == 0o600
    toml = (tmp_path / "identities/aggregator/aggregator.toml").read_text()
    assert (tmp_path / "identities/aggregator/password").read_text().strip() in toml


def test_device_add_writes_a_loadable_agent_config(tmp_path: Path) -> None:
    _init(tmp_path)

    provision.device_add(tmp_path, "pi-7")

    ddir = tmp_path / "devices/pi-7"
    settings = load_toml(AgentConfig, ddir / "agent.toml", "agent")
    cfg = AgentConfig(**settings, data="x.npz")
    assert cfg.broker == "mqtts://broker.lan:18883"
    assert (cfg.client_id, cfg.username, cfg.federation) == ("pi-7", "pi-7", "lab")
    assert cfg.password == (ddir / "password").read_text().strip()
    assert Path(cfg.ca_file or "").read_bytes() == (tmp_path / "ca.crt").read_bytes()
    assert cfg.model_public_key == str(ddir / "model-signing.pub")
    assert _mode(ddir / "agent.toml") == _mode(ddir / "client.key") == 0o600


def test_password_file_has_one_valid_entry_per_identity(tmp_path: Path) -> None:
    _init(tmp_path)
    provision.device_add(tmp_path, "pi-1")
    provision.device_add(tmp_path, "pi-2")

    entries = dict(line.split(":", 1) for line in (tmp_path / "passwd").read_text().splitlines())
    assert sorted(entries) == ["aggregator", "monitor", "pi-1", "pi-1-infer", "pi-2", "pi-2-infer"]
    pw = (tmp_path / "devices/pi-2/password").read_text().strip()
    server_pw = (tmp_path / "devices/pi-2/infer/password").read_text().strip()
    assert pki.mosquitto_verify(pw, entries["pi-2"])
    assert pki.mosquitto_verify(server_pw, entries["pi-2-infer"])
    assert not pki.mosquitto_verify(pw, entries["pi-1"])
    assert not pki.mosquitto_verify(pw, entries["pi-2-infer"])


def test_device_add_twice_keeps_the_password_and_force_rotates_it(tmp_path: Path) -> None:
    _init(tmp_path)
    provision.device_add(tmp_path, "pi-1")
    first = (tmp_path / "devices/pi-1/password").read_text()

    again = provision.device_add(tmp_path, "pi-1")
    assert (tmp_path / "devices/pi-1/password").read_text() == first
    assert again.of(tmp_path / "passwd") == "kept"

    provision.device_add(tmp_path, "pi-1", force=True)
    assert (tmp_path / "devices/pi-1/password").read_text() != first


@pytest.mark.parametrize(
    "name",
    [
        "aggregator",
        "monitor",
        "a/b",
        "+",
        "#",
        "",
        pytest.param("pi-7-infer", id="an-inference-server-name"),
        pytest.param("p" * 59, id="no-room-for-its-server-name"),
    ],
)
def test_reserved_or_unsafe_device_names_are_refused(tmp_path: Path, name: str) -> None:
    _init(tmp_path)

    with pytest.raises(ValueError):
        provision.device_add(tmp_path, name)


def test_device_add_needs_an_initialised_directory(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="broker init"):
        provision.device_add(tmp_path, "pi-1")


def test_hash_matches_mosquitto_passwd_format() -> None:
    hashed = pki.mosquitto_hash("s3cret", salt=b"\x01" * 12)

    assert hashed.startswith("$7$101$AQEBAQEBAQEBAQEB$")
    assert pki.mosquitto_verify("s3cret", hashed)
    assert not pki.mosquitto_verify("s3cre", hashed)


def test_we_verify_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.skip("mosquitto_passwd not installed")
    subprocess.run([tool, "-c", "-b", str(tmp_path / "pw"), "alice", "s3cret"], check=True)

    _, hashed = (tmp_path / "pw").read_text().strip().split(":", 1)

    assert pki.mosquitto_verify("s3cret", hashed)


def test_embedded_templates_match_broker_config_files() -> None:
    assert (REPO / "broker_config/mosquitto-prod.conf").read_text() == PROD_CONF_TEMPLATE
    assert (REPO / "broker_config/acl.conf").read_text() == ACL
    assert (REPO / "broker_config/mosquitto-dashboard.conf").read_text() == DASHBOARD_CONF_TEMPLATE


def test_cli_runs_broker_init_and_device_add(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from aggregator.ops.cli import main

    assert main(["broker", "init", str(tmp_path), "--port", "18884"]) == 0
    assert main(["device", "add", "pi-3", "--dir", str(tmp_path)]) == 0
    assert main(["device", "add", "monitor", "--dir", str(tmp_path)]) == 1

    out = capsys.readouterr().out
    assert "created" in out and "reserved" in out


def test_device_add_writes_an_inference_table_serve_can_load(tmp_path: Path) -> None:
    from edge_agent.serve import ServeConfig

    _init(tmp_path)
    provision.device_add(tmp_path, "pi-7")

    ddir = tmp_path / "devices/pi-7"
    cfg = ServeConfig(**load_toml(ServeConfig, ddir / "agent.toml", "inference"))
    assert (cfg.client_id, cfg.username, cfg.federation) == ("pi-7", "pi-7-infer", "lab")
    assert cfg.password == (ddir / "infer/password").read_text().strip()
    assert cfg.model_public_key == str(ddir / "model-signing.pub")
    server = (str(ddir / "infer/client.crt"), str(ddir / "infer/client.key"))
    assert (cfg.cert_file, cfg.key_file) == server
    cert = x509.load_pem_x509_certificate((ddir / "infer/client.crt").read_bytes())
    names = cert.subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    assert [n.value for n in names] == ["pi-7-infer"]


def test_device_add_rerun_adds_a_missing_inference_identity_and_keeps_the_device_password(
    tmp_path: Path,
) -> None:
    # A device provisioned before inference had an identity of its own: no infer/ directory.
    _init(tmp_path)
    provision.device_add(tmp_path, "pi-7")
    ddir = tmp_path / "devices/pi-7"
    password = (ddir / "password").read_text()
    shutil.rmtree(ddir / "infer")

    report = provision.device_add(tmp_path, "pi-7")

    assert (ddir / "password").read_text() == password
    assert report.of(ddir / "infer/password") == "created"
    assert report.of(ddir / "agent.toml") == "rotated"
    inference = tomllib.loads((ddir / "agent.toml").read_text())["inference"]
    assert inference["password"] == (ddir / "infer/password").read_text().strip()
    assert "pi-7-infer:" in (tmp_path / "passwd").read_text()


def test_broker_init_writes_a_private_monitor_config_and_mosquitto_sub_defaults(
    tmp_path: Path,
) -> None:
    from aggregator.ops.monitor_view import MonitorConfig

    _init(tmp_path)

    ident = tmp_path / "identities/monitor"
    password = (ident / "password").read_text().strip()
    cfg = MonitorConfig(**load_toml(MonitorConfig, ident / "monitor.toml", "monitor"))
    assert (cfg.username, cfg.password, cfg.federation) == ("monitor", password, "lab")
    assert cfg.cert_file == str(ident / "client.crt")
    options = (ident / "mosquitto_sub").read_text().splitlines()
    assert f"-P {password}" in options and "-u monitor" in options and "-p 18883" in options
    assert _mode(ident / "monitor.toml") == _mode(ident / "mosquitto_sub") == 0o600


def test_forced_init_rewrites_the_monitor_files_with_the_new_password(tmp_path: Path) -> None:
    _init(tmp_path)

    _init(tmp_path, force=True)

    ident = tmp_path / "identities/monitor"
    password = (ident / "password").read_text().strip()
    assert f"-P {password}\n" in (ident / "mosquitto_sub").read_text()
    assert json.dumps(password) in (ident / "monitor.toml").read_text()


def test_acl_confines_inference_topics_to_the_logins_of_a_device_and_its_server() -> None:
    rules = [line for line in ACL.splitlines() if not line.startswith("#")]
    infer_lines = {line for line in rules if "/infer/" in line}

    assert infer_lines == {
        # the server (login NAME-infer): the requests addressed to it, its answers
        "pattern read fl/v1/+/infer/%u/request/+",
        "pattern read fl/v1/+/infer/%u/request/+/chunk/+",
        "pattern write fl/v1/+/infer/%u/response/+",
        # the device (login NAME): its own server, as itself
        "pattern write fl/v1/+/infer/%u-infer/request/%u",
        "pattern write fl/v1/+/infer/%u-infer/request/%u/chunk/+",
        "pattern read fl/v1/+/infer/%u-infer/response/%u",
        "topic deny fl/v1/+/infer/#",  # the monitor's
    }


def test_the_broker_takes_client_ids_from_usernames(tmp_path: Path) -> None:
    _init(tmp_path)

    conf = (tmp_path / "mosquitto.conf").read_text()

    # After `listener`: with per_listener_settings it belongs to the TLS listener.
    assert "\nuse_username_as_clientid true\n" in conf.split("\nlistener ", 1)[1]


def test_every_provisioned_process_uses_its_username_as_client_id(tmp_path: Path) -> None:
    # The broker replaces a client id by the username: a process whose two differed would
    # take over another identity's connection, or be taken over.
    from edge_agent.serve import ServeConfig

    _init(tmp_path)
    provision.device_add(tmp_path, "pi-7")
    aggregator = tomllib.loads((tmp_path / "identities/aggregator/aggregator.toml").read_text())
    agent_toml = tmp_path / "devices/pi-7/agent.toml"
    agent = AgentConfig(**load_toml(AgentConfig, agent_toml, "agent"), data="x.npz")
    serve = ServeConfig(**load_toml(ServeConfig, agent_toml, "inference"))

    connections = [
        (aggregator["aggregator"]["client_id"], aggregator["aggregator"]["username"]),
        (agent.client_id, agent.username),
        (serve.server_id, serve.username),  # what InferenceServer connects as
    ]

    assert all(client_id == username for client_id, username in connections), connections
    assert len({username for _, username in connections}) == 3  # one login per process

"""``fedmq broker init`` and ``fedmq device add``: a secure-by-default broker directory.

Layout of DIR (secrets 0600)::

    provision.json            host, port, federation: what `device add` builds URLs from
    ca.crt  ca.key            the fedmq CA (ECDSA P-256): signs broker and client certs
    broker.crt  broker.key    TLS server cert, SAN localhost, 127.0.0.1 and --host
    model-signing.key/.pub    Ed25519 key the aggregator signs global models with
    passwd  acl.conf          Mosquitto password file ($7$ PBKDF2-SHA512) and ACL
    dashboard.passwd          the monitor's line of passwd alone: the only login of the
                              dashboard's wss listener (nobody.passwd, empty: of its page's)
    mosquitto.conf            rendered broker_config/mosquitto-prod.conf (+ mosquitto-dashboard.conf
                              with a dashboard port): `mosquitto -c` it
    dashboard/                the web dashboard's page (http_dir) and its config.json
    identities/aggregator/    password, client.crt/.key, aggregator.toml
    identities/monitor/       password, client.crt/.key, monitor.toml, mosquitto_sub
                              (read-only identity; the last two: `fedmq monitor --config`
                              and mosquitto_sub defaults, so no password on a command line)
    devices/NAME/             password, client.crt/.key, ca.crt, model-signing.pub, agent.toml
                              ([agent]: the training agent, logs in as NAME; [inference]:
                              `fedmq-agent serve --config`, logs in as NAME-infer)
    devices/NAME/infer/       password, client.crt/.key of NAME-infer, the device's inference
                              server: one login per process that connects, since the broker
                              gives each login one connection (use_username_as_clientid)
    sites/NAME/               (central broker, `fedmq broker add-site NAME`) the bundle of
                              site NAME's bridge: password, client.crt/.key, ca.crt,
                              model-signing.pub, uplink.json; acl.conf gets its block
    uplink/                   (site broker, `broker init --site NAME --uplink BUNDLE`) the
                              copy of that bundle the bridge section of mosquitto.conf (then
                              0600: it holds the uplink password) reads; model-signing.pub is
                              the central one, so the site's devices pin the central key

Re-running is safe: an existing file is kept and reported; ``--force`` rotates (rewrites)
what the command creates. ``passwd`` is derived from the identities' password files and is
rewritten only when an entry is missing or no longer matches.
"""

from __future__ import annotations

import getpass
import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aggregator.ops import pki
from aggregator.ops.bridge import (
    SITES_DIR,
    UPLINK_DIR,
    UPLINK_FILES,
    SiteUplink,
    central_site_acl,
    render_bridge_conf,
    site_acl,
    uplink_info,
)
from aggregator.ops.broker_templates import ACL, DASHBOARD_CONF_TEMPLATE, PROD_CONF_TEMPLATE
from aggregator.ops.client_files import mosquitto_sub_defaults, toml_file, toml_table
from aggregator.ops.dashboard import dashboard_url, install_page
from shared.protocol import signing
from shared.protocol.topics import inference_server_id, validate_name

STATE_FILE = "provision.json"
RESERVED = ("aggregator", "monitor")
INFER_DIR = "infer"  # devices/NAME/infer/: the identity of NAME's inference server
DASHBOARD_DIR = "dashboard"  # DIR/dashboard/: the page the wss listener serves
# The logins of the dashboard's listener (dashboard.passwd): the read-only identity only.
DASHBOARD_LOGINS = ("monitor",)


@dataclass
class Report:
    """What a provisioning command did to each file: created, kept, rotated, updated."""

    actions: list[tuple[str, Path]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, action: str, path: Path) -> None:
        """Record one file's fate."""
        self.actions.append((action, path))

    def of(self, path: Path) -> str | None:
        """The last action recorded for ``path``."""
        found = [a for a, p in self.actions if p == path]
        return found[-1] if found else None

    def lines(self) -> list[str]:
        """Human-readable report."""
        out = [f"{action:8} {path}" for action, path in self.actions]
        if any(a == "kept" for a, _ in self.actions):
            out.append("(kept files already existed; pass --force to rotate them)")
        return out + self.notes


@dataclass
class _Writer:
    force: bool
    report: Report

    def write(self, path: Path, data: bytes, *, secret: bool, rotate: bool = False) -> bool:
        """Write ``data`` unless ``path`` exists (and neither force nor rotate); True if written."""
        existed = path.exists()
        if existed and not (self.force or rotate):
            self.report.add("kept", path)
            return False
        path.parent.mkdir(parents=True, exist_ok=True)
        mode = 0o600 if secret else 0o644
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # an existing file keeps its mode otherwise
            fh.write(data)
        self.report.add("rotated" if existed else "created", path)
        return True


def broker_init(
    root: Path,
    *,
    host: str | None = None,
    port: int = 8883,
    bind: str = "",
    federation: str | None = None,
    run_as: str | None = None,
    require_certificate: bool = False,
    dashboard_port: int | None = None,
    dashboard_page_port: int | None = None,
    site: SiteUplink | None = None,
    force: bool = False,
) -> Report:
    """Create (or complete) a provisioned broker directory; see the module docstring.

    ``federation`` defaults to ``default``. ``site`` makes it a site broker's (docs/sites.md):
    the federation comes from the site's bundle (``federation``, if given, must agree), the
    central model-signing key is pinned instead of a key made here, acl.conf gives the
    aggregator the site aggregator's rights, and mosquitto.conf ends with the bridge to the
    central broker.

    ``dashboard_port`` adds the web dashboard's wss listener on that port (same ``bind``,
    same certificate, the monitor's login only), and a plain HTTP listener serving its page
    on ``dashboard_page_port`` (default: the next port), and copies the page into
    ``DIR/dashboard``; None (the default here; ``fedmq broker init`` passes 8884) leaves
    them out.
    """
    if site is not None:
        federation = str(uplink_info(site, federation)["federation"])
    federation = validate_name("federation", federation or "default")
    if dashboard_port is not None and dashboard_page_port is None:
        dashboard_page_port = dashboard_port + 1
    ports = {"port": port, "dashboard port": dashboard_port, "page port": dashboard_page_port}
    for what, number in ports.items():
        if number is not None and not 0 < number < 65536:
            raise ValueError(f"{what} must be in 1..65535, got {number}")
    if dashboard_port is not None and len(set(ports.values())) < 3:
        raise ValueError(f"the MQTT, dashboard and page ports must differ: {ports}")
    report = Report()
    w = _Writer(force, report)
    root = root.resolve()
    (root / "data").mkdir(parents=True, exist_ok=True)
    state: dict[str, object] = {"host": host or "localhost", "port": port, "federation": federation}
    if site is not None:
        state |= {"site": site.name, "upstream": str(site.upstream)}
    state_text = json.dumps(state, indent=1)
    if site is None:
        w.write(root / STATE_FILE, state_text.encode() + b"\n", secret=False)
    else:  # records the --upstream the bridge uses, so it follows it as mosquitto.conf does
        _sync(root / STATE_FILE, state_text.splitlines(), report, secret=False)
    new_ca = not (root / "ca.key").exists() or not (root / "ca.crt").exists() or force
    if new_ca:
        ca = pki.make_ca()
        w.write(root / "ca.key", ca.key_pem, secret=True, rotate=True)
        w.write(root / "ca.crt", ca.cert_pem, secret=False, rotate=True)
    else:
        ca = _load_ca(root)
        report.add("kept", root / "ca.crt")
    names = ["localhost", "127.0.0.1", *([host] if host else [])]
    _keypair(
        w,
        root / "broker.crt",
        root / "broker.key",
        new_ca,
        lambda: pki.issue(ca, "fedmq broker", server_names=names),
    )
    if site is not None:  # the site's devices verify the central aggregator's models
        for name in UPLINK_FILES:
            _copy(w, site.bundle / name, root / UPLINK_DIR / name, secret=name.endswith("key"))
        _copy(w, site.bundle / "model-signing.pub", root / "model-signing.pub", secret=False)
    elif force or not (root / "model-signing.key").exists():
        key = signing.generate_keypair()
        w.write(root / "model-signing.key", signing.private_pem(key), secret=True, rotate=True)
        w.write(root / "model-signing.pub", signing.public_pem(key), secret=False, rotate=True)
    else:
        report.add("kept", root / "model-signing.key")
    for name in RESERVED:
        _identity(w, root / "identities" / name, name, ca, new_ca)
    _aggregator_toml(w, root)
    _monitor_files(w, root)
    sync_acl(root, report)
    conf = render_conf(root, port, bind, run_as, require_certificate)
    if dashboard_port is not None and dashboard_page_port is not None:
        conf += "\n" + render_dashboard_conf(root, dashboard_port, dashboard_page_port, bind)
        for action, path in install_page(root / DASHBOARD_DIR, dashboard_port, federation):
            report.add(action, path)
        w.write(root / "nobody.passwd", b"", secret=False)
    if site is not None:  # last: every line after `connection` is the bridge's
        password = (root / UPLINK_DIR / "password").read_text().strip()
        conf += "\n" + render_bridge_conf(
            root, federation, site.name, site.upstream, password, site.restart_timeout
        )
        report.notes.append(f"bridge: to {site.upstream} as site {site.name} (docs/sites.md)")
    if site is None:
        w.write(root / "mosquitto.conf", conf.encode(), secret=False)
    else:  # derived from the flags and the bundle, and holds the uplink password: kept in
        # step with them (another --upstream, a re-issued bundle), private as passwd is
        _sync(root / "mosquitto.conf", conf.splitlines(), report)
    sync_password_file(root, report)
    if new_ca and any((root / "devices").glob("*/password")):
        report.notes.append(
            "the CA changed: re-run `fedmq device add NAME --dir DIR --force` for every device"
        )
    report.notes.append(f"start the broker: mosquitto -c {root / 'mosquitto.conf'}")
    if dashboard_page_port is not None:
        url = dashboard_url(str(state["host"]), dashboard_page_port, federation, login=True)
        report.notes.append(
            f"dashboard: {url} (log in as monitor, password in "
            f"{root / 'identities' / 'monitor' / 'password'}; the browser must trust "
            f"{root / 'ca.crt'} for wss://{state['host']}:{dashboard_port}: docs/dashboard.md)"
        )
    return report


def device_add(
    root: Path,
    name: str,
    *,
    federation: str | None = None,
    install_dir: str | None = None,
    force: bool = False,
) -> Report:
    """Provision one device: credentials, client cert, trust anchors and ``agent.toml``."""
    root = root.resolve()
    validate_name("device name", name)
    server = inference_server_id(name)  # also refuses "-infer" names and ones too long for it
    if name in RESERVED:
        raise ValueError(f"{name!r} is a reserved identity; choose another device name")
    if (root / SITES_DIR / name).exists():
        raise ValueError(f"{name!r} is a site's login here; choose another device name")
    state = load_state(root)
    fed = validate_name("federation", federation or str(state["federation"]))
    report = Report()
    w = _Writer(force, report)
    ddir = root / "devices" / name
    ca = _load_ca(root)
    _identity(w, ddir, name, ca, False)
    _identity(w, ddir / INFER_DIR, server, ca, False)
    w.write(ddir / "ca.crt", (root / "ca.crt").read_bytes(), secret=False)
    w.write(ddir / "model-signing.pub", (root / "model-signing.pub").read_bytes(), secret=False)
    where = Path(install_dir) if install_dir else ddir
    toml = _device_toml(state, fed, name, ddir, where)
    # Rewritten when a password in it is new (an upgrade adds the inference identity).
    fresh = any(
        report.of(d / "password") in ("created", "rotated") for d in (ddir, ddir / INFER_DIR)
    )
    w.write(ddir / "agent.toml", toml.encode(), secret=True, rotate=fresh)
    sync_password_file(root, report)
    report.notes.append(
        f"copy {ddir} to the device ({where}); run: fedmq-agent --config {where / 'agent.toml'} "
        f"--data YOUR_DATA (and for inference: fedmq-agent serve --config {where / 'agent.toml'}, "
        f"as {server}); reload a running broker: kill -HUP $(pidof mosquitto)"
    )
    return report


def sync_acl(root: Path, report: Report) -> None:
    """Write acl.conf from the template and the provisioned sites (a site broker: the site's
    form of it), unless it already says exactly that."""
    state = load_state(root)
    federation = str(state["federation"])
    if "site" in state:
        text = site_acl(federation, str(state["site"]))
    else:
        sites = sorted(p.parent.name for p in (root / SITES_DIR).glob("*/password"))
        text = "\n".join([ACL, *[central_site_acl(federation, s) for s in sites]])
    _sync(root / "acl.conf", text.splitlines(), report, secret=False)


def _copy(w: _Writer, src: Path, dst: Path, *, secret: bool) -> None:
    """Copy ``src`` to ``dst`` when it differs (a bundle re-issued on the central side)."""
    data = src.read_bytes()
    if dst.exists() and dst.read_bytes() == data and not w.force:
        w.report.add("kept", dst)
        return
    w.write(dst, data, secret=secret, rotate=True)


def _device_toml(
    state: Mapping[str, object], federation: str, name: str, ddir: Path, where: Path
) -> str:
    """``agent.toml``: ``[agent]`` logs in as the device, ``[inference]`` as its server."""
    common = {
        "broker": f"mqtts://{state['host']}:{state['port']}",
        "federation": federation,
        "client_id": name,
    }
    site = {"site": str(state["site"])} if "site" in state else {}  # a site broker's device
    trust = {"ca_file": str(where / "ca.crt"), "model_public_key": str(where / "model-signing.pub")}
    toml = toml_file(
        "agent",
        {**common, **site, **_login(ddir, where, name), **trust},
        '# data = "/var/lib/fedmq/data.npz"   # or pass --data\n',
    )
    # `fedmq-agent serve --config agent.toml` reads this table: the device's client id (its
    # server's topics are infer/NAME-infer/...), the server's own login and certificate.
    server = _login(ddir / INFER_DIR, where / INFER_DIR, inference_server_id(name))
    return toml + "\n" + toml_table("inference", {**common, **server, **trust})


def render_conf(root: Path, port: int, bind: str, run_as: str | None, require_cert: bool) -> str:
    """The production template with this directory's paths and settings filled in."""
    values = {
        "{listener}": f"{port} {bind}".strip(),
        "{dir}": str(root),
        "{user}": run_as or _current_user(),
        "{require_certificate}": "true" if require_cert else "false",
    }
    text = PROD_CONF_TEMPLATE
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def render_dashboard_conf(root: Path, port: int, page_port: int, bind: str) -> str:
    """The dashboard's listeners (wss, and the page's), appended after the production template."""
    values = {
        "{dashboard_listener}": f"{port} {bind}".strip(),
        "{dashboard_page_listener}": f"{page_port} {bind}".strip(),
        "{dir}": str(root),
    }
    text = DASHBOARD_CONF_TEMPLATE
    for placeholder, value in values.items():
        text = text.replace(placeholder, value)
    return text


def sync_password_file(root: Path, report: Report) -> None:
    """Make ``passwd`` hold exactly the identities' passwords, keeping still-valid hashes;
    ``dashboard.passwd`` the same lines of the dashboard's logins (the monitor) only."""
    path = root / "passwd"
    existing: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            user, sep, hashed = line.partition(":")
            if sep:
                existing[user] = hashed
    lines = []
    for user, pw_file in _identities(root):
        password = pw_file.read_text().strip()
        old = existing.get(user)
        hashed = (
            old if old and pki.mosquitto_verify(password, old) else pki.mosquitto_hash(password)
        )
        lines.append(f"{user}:{hashed}")
    dashboard = [line for line in lines if line.partition(":")[0] in DASHBOARD_LOGINS]
    _sync(path, lines, report)
    _sync(root / "dashboard.passwd", dashboard, report)


def _sync(path: Path, lines: list[str], report: Report, *, secret: bool = True) -> None:
    """Write a derived file (password file, ACL) unless it already holds exactly ``lines``."""
    text = "\n".join(lines) + "\n"
    if path.exists() and path.read_text() == text:
        report.add("kept", path)
        return
    existed = path.exists()
    _Writer(True, report).write(path, text.encode(), secret=secret)
    report.actions[-1] = ("updated" if existed else "created", path)


def load_state(root: Path) -> dict[str, object]:
    """What `broker init` recorded; ValueError when DIR was never initialised."""
    try:
        state: dict[str, object] = json.loads((root / STATE_FILE).read_text())
    except FileNotFoundError:
        raise ValueError(
            f"{root} is not a broker directory: run `fedmq broker init {root}` first"
        ) from None
    return state


def _identities(root: Path) -> list[tuple[str, Path]]:
    found = [(n, root / "identities" / n / "password") for n in RESERVED]
    for p in sorted((root / "devices").glob("*/password")):
        found.append((p.parent.name, p))
        server = p.parent / INFER_DIR / "password"
        if server.exists():  # device_add writes it only for a name that has a server id
            found.append((inference_server_id(p.parent.name), server))
    found += [(p.parent.name, p) for p in sorted((root / SITES_DIR).glob("*/password"))]
    return [(user, p) for user, p in found if p.exists()]


def _login(directory: Path, installed: Path, username: str) -> dict[str, str]:
    """The connection keys of one identity: its login and its certificate where installed."""
    return {
        "username": username,
        "password": (directory / "password").read_text().strip(),
        "cert_file": str(installed / "client.crt"),
        "key_file": str(installed / "client.key"),
    }


def _identity(w: _Writer, directory: Path, username: str, ca: pki.Issued, new_ca: bool) -> None:
    w.write(directory / "password", (pki.new_password() + "\n").encode(), secret=True)
    _keypair(
        w,
        directory / "client.crt",
        directory / "client.key",
        new_ca,
        lambda: pki.issue(ca, username),
    )


def _keypair(
    w: _Writer, cert: Path, key: Path, new_ca: bool, make: Callable[[], pki.Issued]
) -> None:
    """(Re)issue a cert/key pair when missing, forced, or when the CA under it changed."""
    if cert.exists() and key.exists() and not (w.force or new_ca):
        w.report.add("kept", cert)
        return
    issued = make()
    w.write(key, issued.key_pem, secret=True, rotate=True)
    w.write(cert, issued.cert_pem, secret=False, rotate=True)


def _aggregator_toml(w: _Writer, root: Path) -> None:
    state = load_state(root)
    ident = root / "identities" / "aggregator"
    settings = {
        "broker": f"mqtts://{state['host']}:{state['port']}",
        "federation": state["federation"],
        "client_id": "aggregator",
        "username": "aggregator",
        "password": (ident / "password").read_text().strip(),
        "ca_file": str(root / "ca.crt"),
        "cert_file": str(ident / "client.crt"),
        "key_file": str(ident / "client.key"),
        "signing_key": str(root / "model-signing.key"),
    }
    if "site" in state:  # a site aggregator signs nothing: its devices pin the central key
        del settings["signing_key"]
        # `fedmq-aggregator --config aggregator.toml` runs as this site's aggregator, and
        # follows only announcements the central aggregator signed.
        settings["site"] = str(state["site"])
        settings["central_key"] = str(root / "model-signing.pub")
    # Rewritten when the password was rotated in this run, so the two never disagree.
    rotate = w.report.of(ident / "password") in ("created", "rotated")
    w.write(
        ident / "aggregator.toml",
        toml_file("aggregator", settings).encode(),
        secret=True,
        rotate=rotate,
    )


def _monitor_files(w: _Writer, root: Path) -> None:
    """``monitor.toml`` for ``fedmq monitor --config`` and ``mosquitto_sub`` defaults, so the
    monitor's password never goes on a command line (where ``ps`` and shell history see it)."""
    state = load_state(root)
    ident = root / "identities" / "monitor"
    password = (ident / "password").read_text().strip()
    settings = {
        "broker": f"mqtts://{state['host']}:{state['port']}",
        "federation": state["federation"],
        "username": "monitor",
        "password": password,
        "ca_file": str(root / "ca.crt"),
        "cert_file": str(ident / "client.crt"),
        "key_file": str(ident / "client.key"),
    }
    rotate = w.report.of(ident / "password") in ("created", "rotated")
    w.write(
        ident / "monitor.toml", toml_file("monitor", settings).encode(), secret=True, rotate=rotate
    )
    text = mosquitto_sub_defaults(
        str(state["host"]), int(str(state["port"])), root / "ca.crt", ident, "monitor", password
    )
    w.write(ident / "mosquitto_sub", text.encode(), secret=True, rotate=rotate)


def _load_ca(root: Path) -> pki.Issued:
    try:
        return pki.Issued((root / "ca.crt").read_bytes(), (root / "ca.key").read_bytes())
    except FileNotFoundError:
        raise ValueError(f"{root} has no CA: run `fedmq broker init {root}` first") from None


def _current_user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):
        return "mosquitto"

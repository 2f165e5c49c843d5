"""``fedmq broker add-site``: provision a site's bridge on the central broker (docs/sites.md)."""

from __future__ import annotations

import json
from pathlib import Path

from aggregator.ops import pki
from aggregator.ops.bridge import SITES_DIR, UPLINK_FILE, Upstream
from aggregator.ops.provision import (
    RESERVED,
    Report,
    _identity,
    _load_ca,
    _Writer,
    load_state,
    sync_acl,
    sync_password_file,
)
from shared.protocol.topics import INFERENCE_SUFFIX, validate_name


def site_add(root: Path, name: str, *, force: bool = False) -> Report:
    """Provision site ``name`` on the central broker: its bridge's login, client certificate
    and trust anchors in ``sites/NAME/`` (the bundle to copy to the site), its ACL block."""
    root = root.resolve()
    validate_name("site name", name)
    if name in RESERVED or name.endswith(INFERENCE_SUFFIX) or (root / "devices" / name).exists():
        raise ValueError(
            f"{name!r} is taken (a reserved identity, a device or an inference server's "
            "login): a site logs in to the central broker under its name; choose another"
        )
    state = load_state(root)
    if "site" in state:
        raise ValueError(f"{root} is site {state['site']}'s broker: add sites on the central one")
    report = Report()
    w = _Writer(force, report)
    sdir = root / SITES_DIR / name
    _identity(w, sdir, name, _load_ca(root), False)
    for trust in ("ca.crt", "model-signing.pub"):
        w.write(sdir / trust, (root / trust).read_bytes(), secret=False, rotate=True)
    info: dict[str, object] = {"site": name, "federation": state["federation"]}
    info["upstream"] = str(Upstream(str(state["host"]), int(str(state["port"]))))
    # What a bridge may call the central broker: its TLS check wants one of these names.
    info["server_names"] = pki.server_names((root / "broker.crt").read_bytes())
    w.write(sdir / UPLINK_FILE, json.dumps(info, indent=1).encode() + b"\n", secret=False)
    sync_password_file(root, report)
    sync_acl(root, report)
    report.notes.append(
        f"copy {sdir} to the site (say to /etc/fedmq-uplink), and there run: fedmq broker init "
        f"SITE_DIR --site {name} --upstream {info['upstream']} --uplink /etc/fedmq-uplink; "
        "reload this broker (passwd, acl.conf): kill -HUP $(pidof mosquitto)"
    )
    return report

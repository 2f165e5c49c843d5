"""The live web dashboard: static files a broker serves over HTTP on its WebSockets listener.

``static/`` is the whole page (``index.html``, its scripts and styles, and in ``vendor/`` the
pinned MQTT.js and uPlot bundles with their licences, rebuilt by ``deploy/vendor-dashboard.sh``).
Mosquitto serves it with ``http_dir``: the development broker straight from this package
(:class:`aggregator.ops.local_broker.LocalBroker`), a provisioned broker from a copy that
``fedmq broker init`` makes in its directory. ``docs/dashboard.md`` describes the panels.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["CONFIG_FILE", "STATIC_DIR", "dashboard_url", "install_page", "static_files"]

#: The page's files, as Mosquitto's ``http_dir`` serves them.
STATIC_DIR = Path(__file__).resolve().parent / "static"
#: Written beside a provisioned copy of the page: the wss port it connects to on its own host
#: and the federation it shows first (the packaged one is empty: the same port).
CONFIG_FILE = "config.json"


def static_files() -> list[Path]:
    """Every file of the page, relative to :data:`STATIC_DIR`, sorted."""
    return sorted(p.relative_to(STATIC_DIR) for p in STATIC_DIR.rglob("*") if p.is_file())


def dashboard_url(host: str, port: int, federation: str, *, login: bool = False) -> str:
    """The page's address on a broker's WebSockets listener, naming the federation to show.

    The loopback development broker takes no credentials: the page connects at once
    (``connect=1``); with ``login`` (a provisioned broker) it asks for the monitor's login.
    """
    auto = "" if login else "&connect=1"
    return f"http://{host}:{port}/?federation={federation}{auto}"


def install_page(dest: Path, wss_port: int, federation: str) -> list[tuple[str, Path]]:
    """Copy the page into ``dest`` (a provisioned broker's ``http_dir``) with a config.json
    naming the ``wss_port`` it connects to (on the host it was loaded from) and the
    ``federation`` it shows first. What was done to each file: ``created``, ``updated`` (a
    newer fedmq brings a newer page) or ``removed`` (a file the page no longer has): the
    broker serves exactly this version's page."""
    done: list[tuple[str, Path]] = []
    config = json.dumps({"wss_port": wss_port, "federation": federation}, indent=1) + "\n"
    files = {rel: (STATIC_DIR / rel).read_bytes() for rel in static_files()}
    files[Path(CONFIG_FILE)] = config.encode()
    wanted = set(files)
    for rel in sorted(wanted):
        target, data = dest / rel, files[rel]
        if target.exists() and target.read_bytes() == data:
            continue
        done.append(("updated" if target.exists() else "created", target))
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
        target.chmod(0o644)
    for old in sorted(dest.rglob("*"), reverse=True):
        if old.is_file() and old.relative_to(dest) not in wanted:
            old.unlink()
            done.append(("removed", old))
    return done

"""The dashboard's files, its vendored libraries and how brokers are configured to serve it.

No browser and no broker here: tests/integration/test_dashboard.py opens the page in Chromium.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import json
import re
import tomllib
from pathlib import Path

from aggregator.ops import provision
from aggregator.ops.dashboard import CONFIG_FILE, STATIC_DIR, dashboard_url, static_files

REPO = Path(__file__).resolve().parents[2]
VENDOR = STATIC_DIR / "vendor"
PAGE_LIMIT = 300_000  # bytes, compressed: the bound on the initial page weight


def _loaded_at_start() -> list[str]:
    """What a browser fetches to show the page: index.html, what it links, what the loader
    fetches (the libraries' .gz copies) and the page's config.json."""
    html = (STATIC_DIR / "index.html").read_text()
    linked = re.findall(r'<(?:script|link)[^>]*(?:src|href)="([^"]+)"', html)
    loader = (STATIC_DIR / "loader.js").read_text()
    libraries = [f"{path}.gz" for path in re.findall(r'load\("([^"]+)"', loader)]
    return [
        "index.html",
        *[f for f in linked if not f.startswith("data:")],
        *libraries,
        CONFIG_FILE,
    ]


def test_vendored_files_match_their_pinned_checksums() -> None:
    lines = (VENDOR / "SHA256SUMS").read_text().splitlines()
    sums = dict(reversed(line.split("  ", 1)) for line in lines)

    assert {"mqtt.min.js", "uPlot.iife.min.js", "LICENSE-mqtt.txt", "LICENSE-uplot.txt"} <= set(
        sums
    )
    for name, digest in sums.items():
        assert hashlib.sha256((VENDOR / name).read_bytes()).hexdigest() == digest, name


def test_compressed_copies_inflate_to_the_vendored_bundles() -> None:
    for name in ("mqtt.min.js", "uPlot.iife.min.js"):
        packed = (VENDOR / f"{name}.gz").read_bytes()
        assert gzip.decompress(packed) == (VENDOR / name).read_bytes(), name


def test_vendor_script_pins_the_versions_the_page_names() -> None:
    script = (REPO / "deploy/vendor-dashboard.sh").read_text()
    footer = (STATIC_DIR / "index.html").read_text()

    for package, version in (("mqtt", "5.16.0"), ("uplot", "1.6.32")):
        assert re.search(rf'"{package}@{re.escape(version)} [0-9a-f]{{64}}"', script)
        assert version in footer


def test_page_loads_only_its_own_files() -> None:
    loaded = _loaded_at_start()

    assert not [f for f in loaded if "//" in f or f.startswith("/")]  # no CDN, no other host
    assert all((STATIC_DIR / f).is_file() for f in loaded), loaded


def test_initial_page_weight_is_under_300_kB_compressed() -> None:
    # Mosquitto serves files as they are: the .gz copies cross the network compressed, the
    # page's own files uncompressed. Both figures stay under the bound.
    files = [(STATIC_DIR / f).read_bytes() for f in _loaded_at_start()]
    served = sum(len(data) for data in files)
    compressed = sum(
        len(data if data[:2] == b"\x1f\x8b" else gzip.compress(data, 9)) for data in files
    )

    print(f"dashboard at load: {served} bytes as served, {compressed} gzip-compressed")
    assert compressed <= served <= PAGE_LIMIT


def test_every_page_file_ships_in_the_wheel() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["package-data"]["aggregator.ops.dashboard"]

    for rel in static_files():
        assert any(fnmatch.fnmatch(f"static/{rel}", p) for p in patterns), rel


def test_broker_init_adds_the_dashboard_listeners_for_the_monitor_only(tmp_path: Path) -> None:
    provision.broker_init(tmp_path, host="broker.lan", port=18883, dashboard_port=18884)
    provision.device_add(tmp_path, "pi-1")

    conf = (tmp_path / "mosquitto.conf").read_text()
    wss = conf[conf.index("listener 18884\n") :]
    assert "protocol websockets" in wss and f"certfile {tmp_path}/broker.crt" in wss
    assert f"password_file {tmp_path}/dashboard.passwd" in wss
    assert "listener 18885\n" in wss and f"password_file {tmp_path}/nobody.passwd" in wss
    logins = [
        line.split(":")[0] for line in (tmp_path / "dashboard.passwd").read_text().splitlines()
    ]
    assert logins == ["monitor"]
    assert (tmp_path / "nobody.passwd").read_text() == ""
    config = json.loads((tmp_path / "dashboard" / CONFIG_FILE).read_text())
    assert config == {"wss_port": 18884, "federation": "default"}
    copied = sorted(
        p.relative_to(tmp_path / "dashboard")
        for p in (tmp_path / "dashboard").rglob("*")
        if p.is_file()
    )
    assert copied == static_files()
    assert "{" not in conf


def test_broker_init_without_a_dashboard_port_opens_no_websockets_listener(tmp_path: Path) -> None:
    provision.broker_init(tmp_path, port=18883)

    assert "protocol websockets" not in (tmp_path / "mosquitto.conf").read_text()
    assert not (tmp_path / "dashboard").exists()


def test_a_provisioned_dashboard_url_asks_for_the_login() -> None:
    assert (
        dashboard_url("broker.lan", 8885, "shop", login=True)
        == "http://broker.lan:8885/?federation=shop"
    )

"""The web dashboard in a real Chromium (Playwright) against a real Mosquitto.

The development broker serves the page on its WebSockets listener; a short real federation
(aggregator and agent processes) runs behind it. The provisioned broker (`fedmq broker init`)
serves the page on its plain page listener and takes the monitor's login over wss only.
No fixed sleeps: every wait is Playwright's expect, or a bounded wait on a queue or a port.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion

from aggregator.ops import provision
from aggregator.ops.dashboard import STATIC_DIR
from aggregator.ops.local_broker import LocalBroker, free_port
from shared.protocol import messages as msg
from shared.protocol.topics import Topics
from tests.conftest import MqttClientFactory, require_mosquitto
from tests.integration import federation as fed
from tests.integration.browser import SocketLog, require_browser

pytestmark = pytest.mark.integration

T = Topics(fed.FEDERATION)
# Topic levels the page must never subscribe to nor receive: large or private payloads.
FORBIDDEN = ("update", "model", "delta", "onnx", "chunk", "infer")
UI = 10_000  # ms: the page reacting to a message or a connection change
# Where the dashboard's screenshot goes when FEDMQ_DASHBOARD_SCREENSHOT names a file.
SCREENSHOT_ENV = "FEDMQ_DASHBOARD_SCREENSHOT"


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    """One headless system Chromium for the module (Playwright downloads nothing)."""
    path = require_browser()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=path)
        try:
            yield browser
        finally:
            browser.close()


def _open(chromium: Any, url: str, **context: Any) -> tuple[Any, SocketLog, list[str]]:
    """A new page at ``url``: the page, its WebSocket traffic and its console errors."""
    page = chromium.new_context(viewport={"width": 1100, "height": 1400}, **context).new_page()
    page.add_init_script(HISTORY)
    sockets, errors = SocketLog(), []
    page.on("websocket", sockets.watch)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.goto(url)
    return page, sockets, errors


# Keeps every value the page showed for the round and the chart's points, so a test sees the
# round advancing however fast the rounds go (Playwright's expect would only see the last).
HISTORY = """document.addEventListener("DOMContentLoaded", () => {
  const seen = (window.__history = {rounds: [], points: []});
  const keep = (list, value) => list[list.length - 1] !== value && list.push(value);
  const summary = document.getElementById("round-summary");
  const chart = document.getElementById("quality-chart");
  new MutationObserver(() => keep(seen.rounds, summary.textContent))
    .observe(summary, {childList: true, characterData: true, subtree: true});
  new MutationObserver(() => keep(seen.points, Number(chart.dataset.points)))
    .observe(chart, {attributes: true, attributeFilter: ["data-points"]});
});"""


def _expect() -> Any:
    from playwright.sync_api import expect

    return expect


def _assert_never_subscribed_to_payloads(sockets: SocketLog) -> None:
    filters = sockets.subscriptions()
    assert filters, "the page subscribed to nothing"
    assert not [f for f in filters if "#" in f or any(w in f.split("/") for w in FORBIDDEN)]
    delivered = sockets.published_to_page()
    assert not [t for t in delivered if any(w in t.split("/") for w in FORBIDDEN)]


def test_dev_broker_gets_a_websockets_listener_serving_the_page(tmp_path: Path) -> None:
    broker = LocalBroker(tmp_path)  # not started: its config only

    conf = broker.render_config()

    assert broker.ws_port is not None and broker.ws_port != broker.port
    assert f"listener {broker.ws_port} 127.0.0.1\nprotocol websockets\n" in conf
    assert f"http_dir {STATIC_DIR}\n" in conf
    assert (
        broker.dashboard_url("demo")
        == f"http://127.0.0.1:{broker.ws_port}/?federation=demo&connect=1"
    )


def test_page_follows_a_live_federation(chromium: Any, broker: LocalBroker, tmp_path: Path) -> None:
    expect = _expect()
    clients = fed.write_client_data(tmp_path / "data", 3)
    url = broker.dashboard_url(fed.FEDERATION)
    assert url is not None
    page, sockets, errors = _open(chromium, url)
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected", timeout=UI)
    names = [f"pi-{i}" for i in range(3)]
    agg = fed.start_aggregator(broker.url, tmp_path, rounds=3)
    agents = [fed.start_agent(broker.url, n, clients[i], tmp_path) for i, n in enumerate(names)]
    try:
        expect(page.locator("#devices tbody tr")).to_have_count(3, timeout=60_000)
        expect(page.locator("#devices tbody")).to_contain_text("Python")  # hardware column
        expect(page.locator("#round-summary")).to_contain_text("Round 1", timeout=60_000)
        expect(page.locator("#countdown")).to_contain_text("left")
        expect(page.locator("#round-summary")).to_contain_text("Round 3", timeout=60_000)
        expect(page.locator("#quality-chart")).to_have_attribute("data-points", "3", timeout=60_000)
        expect(page.locator("#bytes-chart")).to_have_attribute("data-points", "3")
        expect(page.locator("#agg-state")).to_contain_text("finished", timeout=30_000)
        expect(page.locator("#model-round")).to_contain_text("3")
        expect(page.locator("#model-signature")).to_have_text("unsigned")
        expect(page.locator("#receipts tbody")).to_contain_text("accepted")
        if os.environ.get(SCREENSHOT_ENV):
            page.screenshot(path=os.environ[SCREENSHOT_ENV], full_page=True)
        history = page.evaluate("() => window.__history")
        assert fed.wait_exit(agg, 60, tmp_path / "aggregator.log") == 0
    finally:
        fed.stop([agg, *agents])
        page.context.close()

    rounds = [int(s.split()[1]) for s in history["rounds"] if s.startswith("Round ")]
    assert rounds == sorted(set(rounds)) and rounds[0] == 1 and rounds[-1] == 3, history
    assert history["points"] == sorted(set(history["points"])), history  # only ever gaining
    assert history["points"][-1] == 3 and len(history["points"]) >= 3, history
    _assert_never_subscribed_to_payloads(sockets)
    assert errors == []


def _publish(client: mqtt.Client, topic: str, message: msg.Message, retain: bool = True) -> None:
    """Publish a control message (retained unless told otherwise), waiting for the PUBACK."""
    client.publish(topic, message.to_json(), qos=1, retain=retain).wait_for_publish(5)


def test_page_shows_what_the_messages_say_and_treats_text_as_text(
    chromium: Any, broker: LocalBroker, mqtt_client: MqttClientFactory
) -> None:
    expect = _expect()
    pub = mqtt_client(broker.url)
    spec = msg.ModelSpec(arch="sensor-net", input_shape=(3, 32), task="regression")
    ann = msg.RoundStart(
        federation=fed.FEDERATION, round=7, base_hash="a" * 64, deadline=0.0, selected=["pi-9"],
        model=spec, train=msg.TrainParams(), ts=0.0,
    )  # fmt: skip
    _publish(pub, T.round_start(7), msg.RoundStart(**{**msg.to_builtins(ann), "deadline": 95.0}))
    _publish(pub, T.agent_status("pi-9"), msg.AgentStatus(
        client_id="pi-9", state="online", num_samples=512, round=7,
        device={"machine": "aarch64", "python": "3.11.2"},
    ))  # fmt: skip
    _publish(pub, T.metrics, msg.RoundMetrics(
        federation=fed.FEDERATION, round=6, participants=["pi-9"], accepted=1, rejected=0,
        num_samples=512, task="regression", test_rmse=0.4321, test_mae=0.3, test_loss=0.19,
    ))  # fmt: skip
    _publish(pub, T.global_meta, msg.GlobalMeta(
        federation=fed.FEDERATION, round=6, model_hash="b" * 64, model=spec, nbytes=2048,
        signature_v2="c2lnbmVk",
    ))  # fmt: skip
    page, sockets, errors = _open(chromium, broker.dashboard_url(fed.FEDERATION) or "")

    expect(page.locator("#countdown")).to_contain_text("at most 1 min 3", timeout=UI)
    reason = "L2 norm 44.1 > 20 <img src=x onerror=document.title='pwned'>"
    _publish(pub, T.receipt(7, "pi-9"), msg.Receipt(
        round=7, client_id="pi-9", status="rejected", code="over-norm", reason=reason,
    ), retain=False)  # fmt: skip
    expect(page.locator("#receipts tbody td").last).to_have_text(reason, timeout=UI)
    expect(page.locator("#n-rejected")).to_have_text("1")
    expect(page.locator("#quality-title")).to_contain_text("RMSE")
    expect(page.locator("#quality-chart")).to_have_attribute(
        "aria-label", "1 rounds charted; round 6: test RMSE 0.4321, test MAE 0.3000, train loss –."
    )
    expect(page.locator("#model-signature")).to_contain_text("signed (signature present;")
    expect(page.locator("#devices tbody")).to_contain_text("aarch64 · Python 3.11.2")
    pub.publish(T.metrics, b'{"round": 7, "accepted": 1, "bytes_up": "lots"}', qos=1)
    expect(page.locator("#problems")).to_contain_text("metrics: field bytes_up is not a number")
    expect(page.locator("#quality-chart")).to_have_attribute("data-points", "1")  # not charted
    assert page.title() == "fedmq dashboard"
    wire = page.evaluate(WIRE_BYTES)
    print(f"dashboard: {wire} bytes over the network at load (headers included)")
    assert wire <= 300_000
    assert page.locator("#receipts img").count() == 0
    _assert_never_subscribed_to_payloads(sockets)
    assert errors == []


# What the page's load moved over the network: the document and every resource, headers
# included (Mosquitto compresses nothing; the loader fetches the libraries' .gz copies).
WIRE_BYTES = """() => performance.getEntriesByType("navigation")
  .concat(performance.getEntriesByType("resource"))
  .reduce((sum, e) => sum + e.transferSize, 0)"""


def test_page_shows_reconnecting_and_comes_back_after_a_broker_restart(
    chromium: Any, broker: LocalBroker, mqtt_client: MqttClientFactory
) -> None:
    expect = _expect()
    page, _sockets, errors = _open(chromium, broker.dashboard_url(fed.FEDERATION) or "")
    connection = page.locator("#connection")
    expect(connection).to_have_attribute("data-state", "connected", timeout=UI)

    broker.kill()
    expect(connection).to_have_attribute("data-state", "reconnecting", timeout=UI)
    expect(connection).to_contain_text("reconnecting")
    broker.restart()
    expect(connection).to_have_attribute("data-state", "connected", timeout=UI)
    status = msg.AggregatorStatus(federation=fed.FEDERATION, state="running", rounds_total=4)
    _publish(mqtt_client(broker.url), T.aggregator_status, status)

    expect(page.locator("#agg-state")).to_have_text("running", timeout=UI)
    assert [e for e in errors if "WebSocket" not in e] == []  # the refused reconnects are logged


# --- the provisioned broker -------------------------------------------------------------------


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class Provisioned:
    """A `fedmq broker init` directory with the dashboard listeners, and its running broker."""

    def __init__(self, tmp_path: Path) -> None:
        self.root = tmp_path / "pki"
        self.port, self.wss, self.page = free_port(), free_port(), free_port()
        provision.broker_init(
            self.root, port=self.port, bind="127.0.0.1", federation=fed.FEDERATION,
            dashboard_port=self.wss, dashboard_page_port=self.page,
        )  # fmt: skip
        provision.device_add(self.root, "pi-0")
        self.broker = LocalBroker(
            tmp_path / "run", port=self.port, template=self.root / "mosquitto.conf"
        )

    def password(self, user: str) -> str:
        sub = "identities" if user in provision.RESERVED else "devices"
        return (self.root / sub / user / "password").read_text().strip()

    def mqtt(self, user: str) -> mqtt.Client:
        client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=user, protocol=mqtt.MQTTv5)
        client.tls_set(ca_certs=str(self.root / "ca.crt"))
        client.username_pw_set(user, self.password(user))
        client.connect("localhost", self.port)
        client.loop_start()
        return client


@pytest.fixture
def provisioned(tmp_path: Path) -> Iterator[Provisioned]:
    require_mosquitto()
    p = Provisioned(tmp_path)
    p.broker.start()
    try:
        fed.wait_for(lambda: _accepts(p.wss) and _accepts(p.page), 10, "the dashboard ports")
        yield p
    finally:
        p.broker.stop()


@pytest.fixture
def secure_page(chromium: Any, provisioned: Provisioned) -> Iterator[tuple[Any, list[str]]]:
    """The provisioned page, in a browser context that accepts the broker's certificate (an
    operator imports the fedmq CA instead: docs/dashboard.md)."""
    url = f"http://localhost:{provisioned.page}/"
    page, _sockets, errors = _open(chromium, url, ignore_https_errors=True)
    yield page, errors
    page.context.close()


def test_wrong_password_shows_a_clear_error(
    secure_page: tuple[Any, list[str]], provisioned: Provisioned
) -> None:
    expect = _expect()
    page, _errors = secure_page
    expect(page.locator("#broker-url")).to_have_text(f"wss://localhost:{provisioned.wss}/mqtt")
    expect(page.locator("#federation")).to_have_value(fed.FEDERATION)
    page.fill("#username", "monitor")
    page.fill("#password", "not-the-password")
    page.click("#connect")

    connection = page.locator("#connection")
    expect(connection).to_have_attribute("data-state", "refused", timeout=UI)
    expect(connection).to_contain_text("refused the login as monitor (bad username or password")


# In the page, as the monitor over wss: subscribe to everything and keep every topic seen
# until the marker arrives (or the login is refused) in window.__watch.
WATCH = """([url, password, marker]) => {
  const seen = [];
  window.__watch = {subscribed: false};
  window.__watch.result = new Promise((resolve) => {
    const c = mqtt.connect(url, {protocolVersion: 5, username: "monitor", password,
                                 reconnectPeriod: 0});
    c.on("error", (e) => { c.end(true); resolve({error: e.message, seen}); });
    c.on("connect", () => c.subscribe("fl/#", {qos: 1}, () => {
      window.__watch.subscribed = true;
    }));
    c.on("message", (topic) => {
      seen.push(topic);
      if (topic === marker) { c.end(true); resolve({seen}); }
    });
  });
}"""


def test_monitor_over_wss_sees_no_update_topic(
    secure_page: tuple[Any, list[str]], provisioned: Provisioned
) -> None:
    expect = _expect()
    page, _errors = secure_page
    page.fill("#username", "monitor")
    page.fill("#password", provisioned.password("monitor"))
    page.click("#connect")
    expect(page.locator("#connection")).to_have_attribute("data-state", "connected", timeout=UI)
    page.click("#disconnect")  # one connection per login: the watcher below takes it over
    wss = f"wss://localhost:{provisioned.wss}/mqtt"
    page.evaluate(WATCH, [wss, provisioned.password("monitor"), T.global_meta])
    page.wait_for_function("() => window.__watch.subscribed", timeout=UI)
    device, aggregator = provisioned.mqtt("pi-0"), provisioned.mqtt("aggregator")

    device.publish(T.agent_status("pi-0"), b"{}", qos=1).wait_for_publish(5)
    device.publish(T.update(1, "pi-0"), b"private delta", qos=1).wait_for_publish(5)
    device.publish(f"{T.update(1, 'pi-0')}/chunk/0", b"chunk", qos=1).wait_for_publish(5)
    aggregator.publish(T.global_meta, b"marker", qos=1).wait_for_publish(5)
    result = page.evaluate("() => window.__watch.result")
    for c in (device, aggregator):
        c.loop_stop()
        c.disconnect()

    assert "error" not in result, result
    assert result["seen"] == [T.agent_status("pi-0"), T.global_meta]


def test_dashboard_listeners_admit_only_the_monitor(
    secure_page: tuple[Any, list[str]], provisioned: Provisioned
) -> None:
    page, _errors = secure_page
    attempts = {
        "device on wss": (f"wss://localhost:{provisioned.wss}/mqtt", "pi-0"),
        "monitor on the page's port": (f"ws://localhost:{provisioned.page}/mqtt", "monitor"),
    }
    outcome = {}
    # The loader inflates the vendored MQTT.js after the page's load event: wait for it.
    page.wait_for_function("() => typeof window.mqtt !== 'undefined'", timeout=UI)
    for what, (url, user) in attempts.items():
        outcome[what] = page.evaluate(LOGIN, [url, user, provisioned.password(user)])

    assert outcome == {what: "refused" for what in attempts}


LOGIN = """([url, username, password]) => new Promise((resolve) => {
  const c = mqtt.connect(url, {protocolVersion: 5, username, password, reconnectPeriod: 0});
  c.on("connect", () => { c.end(true); resolve("connected"); });
  c.on("error", (e) => {
    c.end(true);
    resolve([134, 135].includes(e.code) ? "refused" : e.message);
  });
  setTimeout(() => { c.end(true); resolve("no answer"); }, 8000);
})"""

"""Helpers for integration tests: generated device data and real agent/aggregator processes."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest

from aggregator.ops.datasets import load_named_dataset
from aggregator.ops.demo import agent_command, aggregator_command, stop_processes
from shared.runtime.data import DataFormatError, save_npz
from tests.synthetic import INPUT_SHAPE, NUM_CLASSES, make_dataset

FEDERATION = "itest"
REPO = Path(__file__).resolve().parents[2]
# Bound on a wait for the broker itself (SUBACK, a marker message): loopback answers in
# milliseconds, so this only limits how long a broken broker can hang a test.
BROKER_WAIT = 10.0


def _fashion_mnist_installed() -> bool:
    try:
        load_named_dataset("fashion-mnist", train=False)
    except DataFormatError:
        return False
    return True


# The benches train on real Fashion-MNIST (Debian's dataset-fashion-mnist; never downloaded).
needs_fashion_mnist = pytest.mark.skipif(
    not _fashion_mnist_installed(), reason="needs dataset-fashion-mnist"
)


def write_client_data(directory: Path, clients: int, n: int = 300) -> list[Path]:
    """One .npz per client plus ``eval.npz``; returns the client paths."""
    directory.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(clients):
        path = directory / f"client-{i}.npz"
        save_npz(path, make_dataset(n, seed=i + 1))
        paths.append(path)
    save_npz(directory / "eval.npz", make_dataset(500, seed=999))
    return paths


def _env(workdir: Path | None = None, extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a service process; ``extra`` is added (a ``PYTHONPATH`` in it goes
    before the repository's)."""
    extra = dict(extra or {})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    paths = [extra.pop("PYTHONPATH", ""), str(REPO), env.get("PYTHONPATH", "")]
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    env.update(extra)
    if workdir is not None:
        # Device state (outbox, residuals) defaults to ~/.local/state/fedmq/<client-id>:
        # shared by every run on the machine (pi-0 of another test, another checkout), where
        # a leftover outbox re-sends or a concurrent run deletes files. Each test has its own.
        env["XDG_STATE_HOME"] = str(workdir / "xdg-state")
    return env


def start_aggregator(
    url: str,
    workdir: Path,
    *extra: str,
    rounds: int = 3,
    min_clients: int = 3,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Launch ``fedmq-aggregator`` (as a module) on the MLP for the generated task (flags in
    ``extra`` come last: they win); ``env``: more environment."""
    cmd = aggregator_command(
        url,
        FEDERATION,
        "--model",
        "mlp",
        "--input-shape",
        ",".join(map(str, INPUT_SHAPE)),
        "--num-classes",
        str(NUM_CLASSES),
        "--rounds",
        str(rounds),
        "--min-clients",
        str(min_clients),
        "--round-timeout",
        "60",
        "--lr",
        "0.05",
        "--eval-data",
        str(workdir / "data" / "eval.npz"),
        "--metrics-file",
        str(workdir / "metrics.json"),
        "--wait-clients-timeout",
        "120",
        *extra,
    )
    log = open(workdir / "aggregator.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(workdir, env), cwd=REPO
    )


def start_agent(
    url: str,
    client_id: str,
    data: Path,
    workdir: Path,
    *extra: str,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    """Launch ``fedmq-agent`` (as a module) for one device; ``env``: more environment."""
    cmd = agent_command(url, FEDERATION, client_id, data, "--val-fraction", "0.1", *extra)
    log = open(workdir / f"{client_id}.log", "wb")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        cmd, stdout=log, stderr=subprocess.STDOUT, env=_env(workdir, env), cwd=REPO
    )


def wait_exit(proc: subprocess.Popen[bytes], timeout: float, log: Path) -> int:
    """Wait for ``proc``; on timeout kill it and fail with the tail of its log."""
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        tail = log.read_text(errors="replace")[-3000:] if log.exists() else ""
        args = proc.args  # [python, "-m", module, ...] as started here
        what = str(args[2]) if isinstance(args, list) and len(args) > 2 else str(args)
        raise AssertionError(f"{what} did not exit in {timeout}s; log tail:\n{tail}") from None


def wait_agents(
    agents: list[subprocess.Popen[bytes]], names: list[str], workdir: Path, timeout: float = 30
) -> list[int]:
    """Exit codes of agents started as ``names`` (their logs: ``workdir/<name>.log``)."""
    return [wait_exit(a, timeout, workdir / f"{n}.log") for a, n in zip(agents, names, strict=True)]


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Terminate whatever still runs."""
    stop_processes(procs)


def metrics(workdir: Path) -> list[dict[str, Any]]:
    """The per-round entries the aggregator wrote (JSON: numbers, strings, lists)."""
    return list(json.loads((workdir / "metrics.json").read_text())["rounds"])


def wait_for(pred: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``pred`` until true or fail naming ``what``.

    The one polling loop of the integration tests, for conditions nothing announces (a
    file written, a log line); messages are awaited on their queue (:func:`until`).
    """
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def logged(path: Path, text: str) -> Callable[[], bool]:
    """A :func:`wait_for` condition: ``text`` appears in the log at ``path``."""
    return lambda: path.exists() and text in path.read_text(errors="replace")


Inbox = queue.Queue[mqtt.MQTTMessage]


def collect(client: mqtt.Client, *subscriptions: str) -> Inbox:
    """Subscribe ``client`` at QoS 1 and wait for the SUBACK; its messages land in the queue.

    Once this returns, the broker routes to ``client`` everything published afterwards.
    """
    inbox: Inbox = queue.Queue()
    granted = threading.Event()
    client.on_message = lambda _c, _u, m: inbox.put(m)
    client.on_subscribe = lambda *_a: granted.set()
    client.subscribe([(s, 1) for s in subscriptions])
    if not granted.wait(BROKER_WAIT):
        raise AssertionError(f"no SUBACK for {subscriptions} within {BROKER_WAIT}s")
    return inbox


def until(
    inbox: Inbox, last: Callable[[mqtt.MQTTMessage], bool], timeout: float, what: str
) -> list[mqtt.MQTTMessage]:
    """Every message up to and including the first one ``last`` accepts; fail after ``timeout``.

    With a marker as ``last`` this is how the tests show that something did *not* arrive:
    mosquitto routes messages in the order it receives them and acknowledges a QoS 1
    publish only once routed, so whatever was published (and acknowledged) before the
    marker, by anyone, is in the list if it was routed to this client at all.
    """
    end = time.monotonic() + timeout
    out: list[mqtt.MQTTMessage] = []
    while True:
        try:
            out.append(inbox.get(timeout=max(0.0, end - time.monotonic())))
        except queue.Empty:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}") from None
        if last(out[-1]):
            return out


def on(topic: str) -> Callable[[mqtt.MQTTMessage], bool]:
    """An :func:`until` condition: a non-empty message on ``topic``."""
    return lambda m: m.topic == topic and bool(m.payload)


def until_each(
    inbox: Inbox, topics: Iterable[str], timeout: float, what: str
) -> list[mqtt.MQTTMessage]:
    """Every message until each of ``topics`` has had a non-empty one, in any order."""
    pending = set(topics)

    def all_seen(m: mqtt.MQTTMessage) -> bool:
        if m.payload:
            pending.discard(m.topic)
        return not pending

    return until(inbox, all_seen, timeout, what)


def next_on(inbox: Inbox, topic: str, timeout: float) -> mqtt.MQTTMessage:
    """The next non-empty message on ``topic`` (others are skipped)."""
    return until(inbox, on(topic), timeout, f"a message on {topic}")[-1]


def pause(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGSTOP: the processes keep their connections but do nothing until :func:`resume`."""
    for p in procs:
        os.kill(p.pid, signal.SIGSTOP)


def resume(procs: Iterable[subprocess.Popen[bytes]]) -> None:
    """SIGCONT whatever still runs (safe on processes that were never paused)."""
    for p in procs:
        if p.poll() is None:
            os.kill(p.pid, signal.SIGCONT)

"""amqtt, a pure-Python MQTT 3.1.1-only broker, on a free loopback port for the 3.1.1 tests.

amqtt lives in a virtualenv of its own (its dependencies conflict with fedmq's):
``deploy/quickstart.sh setup`` makes ``<repo>/.venv-amqtt`` with the version pinned in
``deploy/constraints-amqtt.txt``. ``$FEDMQ_AMQTT`` names another ``amqtt`` executable.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from types import TracebackType

from aggregator.ops.local_broker import LOOPBACK, free_port
from tests.integration.federation import REPO, wait_for

AMQTT_ENV = "FEDMQ_AMQTT"
DEFAULT_AMQTT = REPO / ".venv-amqtt" / "bin" / "amqtt"
# Anonymous clients, one plain listener on loopback, no $SYS publisher: what a test needs.
CONFIG = """\
listeners:
  default:
    type: tcp
    bind: {host}:{port}
plugins:
  amqtt.plugins.authentication.AnonymousAuthPlugin:
    allow_anonymous: true
"""
# A bare MQTT 3.1.1 CONNECT (empty client id, clean session, keepalive 60) and its answer.
CONNECT_311 = b"\x10\x0c\x00\x04MQTT\x04\x02\x00\x3c\x00\x00"
CONNACK_OK = b"\x20\x02\x00\x00"
DISCONNECT = b"\xe0\x00"


def find_amqtt() -> str:
    """The amqtt executable: ``$FEDMQ_AMQTT``, ``<repo>/.venv-amqtt``, then PATH.

    Raises FileNotFoundError naming how to install it.
    """
    override = os.environ.get(AMQTT_ENV)
    candidates = [override] if override else [str(DEFAULT_AMQTT), shutil.which("amqtt")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    raise FileNotFoundError(
        f"amqtt not found at {override or DEFAULT_AMQTT} or on PATH: `deploy/quickstart.sh "
        f"setup` creates {DEFAULT_AMQTT.parent.parent} (or point ${AMQTT_ENV} at an amqtt)"
    )


def answers_mqtt_311(host: str, port: int) -> bool:
    """True when the broker at host:port accepts an MQTT 3.1.1 connection right now."""
    try:
        with socket.create_connection((host, port), timeout=1.0) as sock:
            sock.sendall(CONNECT_311)
            answer = sock.recv(4)
            sock.sendall(DISCONNECT)
    except OSError:
        return False
    return answer == CONNACK_OK


class AmqttBroker:
    """An amqtt process on 127.0.0.1 with its config and log in ``workdir``."""

    def __init__(self, executable: str, workdir: Path) -> None:
        self.executable = executable
        self.workdir = workdir
        self.host = LOOPBACK
        self.port = free_port(self.host)
        self.log_path = workdir / "amqtt.log"
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{self.host}:{self.port}"

    def start(self, timeout: float = 30.0) -> AmqttBroker:
        """Write the config, launch amqtt, wait until it answers an MQTT 3.1.1 CONNECT."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "amqtt.yaml"
        config.write_text(CONFIG.format(host=self.host, port=self.port))
        with open(self.log_path, "wb") as log:
            self._proc = subprocess.Popen(
                [self.executable, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
            )
        proc = self._proc
        try:
            wait_for(
                lambda: proc.poll() is not None or answers_mqtt_311(self.host, self.port),
                timeout,
                f"amqtt to accept MQTT 3.1.1 on port {self.port}",
            )
        except AssertionError:
            self.stop()
            raise
        if proc.poll() is not None:
            tail = self.log_path.read_text(errors="replace")[-2000:]
            raise AssertionError(f"amqtt exited with {proc.returncode}:\n{tail}")
        return self

    def stop(self) -> None:
        """Terminate amqtt (SIGKILL if it does not exit within 10 s)."""
        if self._proc is None or self._proc.poll() is not None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(10)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()

    def __enter__(self) -> AmqttBroker:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

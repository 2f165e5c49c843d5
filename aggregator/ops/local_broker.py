"""Start a real Mosquitto broker on loopback for the local demo and the integration tests.

Modelled on Mosquitto's own test suite: every broker gets a generated config file in its
own work directory and a free port, and the caller waits until the port accepts TCP
connections before using it. Nothing here relies on a system broker being up.

    with LocalBroker(tmp_path) as broker:
        client.connect(broker.host, broker.port)
        print(broker.dashboard_url("demo"))  # the web dashboard, on the WebSockets port

The config comes from ``broker_config/mosquitto-dev.conf`` (a template, see that
directory's README); when the package is installed without the repository checkout, an
equivalent template embedded below is used instead.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
import weakref
from pathlib import Path
from types import TracebackType

from aggregator.ops.dashboard import STATIC_DIR, dashboard_url

__all__ = [
    "DEFAULT_TEMPLATE_PATH",
    "BrokerError",
    "LocalBroker",
    "find_mosquitto",
    "free_port",
]

LOOPBACK = "127.0.0.1"

#: The dev broker template in a source checkout (absent in a non-editable install).
DEFAULT_TEMPLATE_PATH = Path(__file__).resolve().parents[2] / "broker_config" / "mosquitto-dev.conf"

# Environment variable naming a mosquitto binary to use instead of the one on PATH, so the
# same tests can run against another broker build (e.g. a 2.1 build with its size limit).
MOSQUITTO_ENV = "FEDMQ_MOSQUITTO"

# Same settings as broker_config/mosquitto-dev.conf (the integration tests compare the
# two); the reasons for each setting are documented there, not duplicated here.
EMBEDDED_TEMPLATE = """\
# fedmq development broker (embedded copy of broker_config/mosquitto-dev.conf).
per_listener_settings false
listener {port} 127.0.0.1
allow_anonymous true
user {user}
persistence false
persistence_location {data_dir}/
max_inflight_messages 100
max_queued_messages 20000
max_queued_bytes 536870912
max_packet_size 2000000
retain_available true
set_tcp_nodelay true
log_type error
log_type warning
log_type notice
log_type information
log_dest file {log_file}
log_timestamp_format %Y-%m-%dT%H:%M:%S
connection_messages true
listener {ws_port} 127.0.0.1
protocol websockets
http_dir {http_dir}
"""

_ADDRESS_IN_USE = "Address already in use"
# How many fresh ports start() tries when it chose the port itself and lost the race
# between free_port() closing its probe socket and mosquitto binding the port.
_PORT_ATTEMPTS = 3
_POLL_INTERVAL = 0.05
_LOG_TAIL_LINES = 25


class BrokerError(RuntimeError):
    """The local Mosquitto broker could not be found, started or stopped."""


def find_mosquitto() -> str:
    """Return the path of the mosquitto executable, or raise BrokerError with an install hint.

    ``$FEDMQ_MOSQUITTO`` wins if set; then ``mosquitto`` on PATH; then ``/usr/sbin/mosquitto``,
    because Debian installs it there and /usr/sbin is not on an ordinary user's PATH.
    """
    override = os.environ.get(MOSQUITTO_ENV)
    if override:
        if os.access(override, os.X_OK):
            return override
        raise BrokerError(f"${MOSQUITTO_ENV}={override!r} is not an executable file")
    found = shutil.which("mosquitto")
    if found:
        return found
    fallback = "/usr/sbin/mosquitto"
    if os.access(fallback, os.X_OK):
        return fallback
    raise BrokerError(
        "mosquitto not found on PATH or at /usr/sbin/mosquitto; install it with "
        "`sudo apt-get install mosquitto mosquitto-clients` (Debian/Ubuntu/Raspberry Pi OS) "
        f"or point ${MOSQUITTO_ENV} at a mosquitto binary"
    )


def free_port(host: str = LOOPBACK) -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    The OS picks it (bind to port 0); the probe socket is closed before returning, so
    another process may take the port before the caller binds it. LocalBroker.start()
    handles that race by retrying with a new port.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def _port_accepts(host: str, port: int, timeout: float = 0.2) -> bool:
    """Return True if a TCP connection to host:port succeeds right now."""
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def _run_as_user() -> str:
    """Account name for the config's ``user`` line.

    Mosquitto started as root drops to the ``mosquitto`` account before opening its log
    file, which then cannot write into a private work directory (pytest's tmp_path is
    mode 0700). Keeping the identity that started it avoids that. For non-root users
    mosquitto ignores the setting, so any name will do when the uid has no passwd entry.
    """
    euid = os.geteuid()
    if euid == 0:
        return "root"
    try:
        return pwd.getpwuid(euid).pw_name
    except KeyError:
        return "mosquitto"


def _wait_dead(proc: subprocess.Popen[bytes], timeout: float) -> None:
    """Wait for a SIGKILLed broker to be reaped; BrokerError if even that does not happen."""
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        # Only a process stuck in the kernel (e.g. uninterruptible I/O) survives SIGKILL.
        raise BrokerError(f"mosquitto (pid {proc.pid}) did not exit after SIGKILL") from exc


def _reap(proc: subprocess.Popen[bytes]) -> None:
    """Kill a broker that its LocalBroker forgot to stop (garbage collection, interpreter exit)."""
    if proc.poll() is None:
        proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=5.0)


def _read_from(path: Path, offset: int) -> str:
    """Return the text of ``path`` from byte ``offset`` on ('' if the file does not exist)."""
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            return fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ""


def _size(path: Path) -> int:
    """Return the size of ``path`` in bytes, 0 if it does not exist."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _tail(text: str, lines: int = _LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` non-empty lines of ``text``."""
    kept = [line for line in text.splitlines() if line.strip()]
    return "\n".join(kept[-lines:])


class LocalBroker:
    """A Mosquitto process on 127.0.0.1 with its config, log and data in ``workdir``.

    Files written: ``mosquitto.conf`` (generated), ``mosquitto.log`` (broker log),
    ``mosquitto.out`` (the process's stdout/stderr: config errors appear only here) and
    ``data/`` (persistence location, unused by the dev template).

    A template with a ``{ws_port}`` placeholder (the dev template has one) gets a second,
    WebSockets listener on a free port too, whose ``http_dir`` serves the dashboard
    (``http_dir``, default :data:`aggregator.ops.dashboard.STATIC_DIR`); ``ws_port`` is None
    for a template without one.
    """

    host: str
    port: int
    ws_port: int | None

    def __init__(
        self,
        workdir: Path,
        port: int | None = None,
        template: Path | None = None,
        extra_config: str = "",
        ws_port: int | None = None,
        http_dir: Path | None = None,
    ) -> None:
        """Prepare (but do not start) a broker; ``port=None`` picks a free port at start(), and
        so does ``ws_port=None`` when the template has a WebSockets listener."""
        # Absolute: mosquitto runs with its cwd here and must still find its config by name.
        self.workdir = Path(workdir).absolute()
        self.host = LOOPBACK
        # Remember whether the port is ours to change: a caller-chosen port is never
        # silently replaced, an automatic one is re-picked if another process grabs it.
        self._auto_port = port is None
        self.port = free_port(self.host) if port is None else port
        self.template = template
        self.extra_config = extra_config
        self.http_dir = Path(http_dir).absolute() if http_dir is not None else STATIC_DIR
        self._auto_ws_port = ws_port is None
        self.ws_port = ws_port
        if ws_port is None and self._has_ws_listener():
            self.ws_port = free_port(self.host)
        self.conf_path = self.workdir / "mosquitto.conf"
        self.log_path = self.workdir / "mosquitto.log"
        self.out_path = self.workdir / "mosquitto.out"
        self.data_dir = self.workdir / "data"
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], LocalBroker] | None = None

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        """Broker address in the form fedmq's configuration takes: ``mqtt://127.0.0.1:PORT``."""
        return f"mqtt://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str | None:
        """MQTT over WebSockets: ``ws://127.0.0.1:WS_PORT/mqtt`` (None without that listener)."""
        return None if self.ws_port is None else f"ws://{self.host}:{self.ws_port}/mqtt"

    def dashboard_url(self, federation: str) -> str | None:
        """The dashboard's address showing ``federation`` (None without a WebSockets listener)."""
        return None if self.ws_port is None else dashboard_url(self.host, self.ws_port, federation)

    @property
    def pid(self) -> int | None:
        """Process id of the running broker, or None when it is not running."""
        return self._proc.pid if self.is_running() and self._proc is not None else None

    def is_running(self) -> bool:
        """Return True while the broker process is alive."""
        return self._proc is not None and self._proc.poll() is None

    # ------------------------------------------------------------------ lifecycle

    def start(self, timeout: float = 10.0) -> LocalBroker:
        """Write the config, launch mosquitto and wait until its port accepts connections.

        Raises BrokerError (with the tail of the broker's output) if mosquitto exits early
        or is not accepting connections within ``timeout`` seconds. When the port was
        chosen automatically and turns out to be taken, up to three fresh ports are tried.
        Returns self, so ``broker = LocalBroker(d).start()`` reads naturally.
        """
        if self.is_running():
            return self
        deadline = time.monotonic() + timeout
        # Retried only when every port is the broker's own choice.
        auto = self._auto_port and (self.ws_port is None or self._auto_ws_port)
        attempts = _PORT_ATTEMPTS if auto else 1
        for attempt in range(1, attempts + 1):
            try:
                self._start_once(deadline)
                return self
            except BrokerError as exc:
                lost_race = _ADDRESS_IN_USE in str(exc)
                if not (lost_race and attempt < attempts and time.monotonic() < deadline):
                    raise
                self.port = free_port(self.host)
                if self.ws_port is not None and self._auto_ws_port:
                    self.ws_port = free_port(self.host)
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the broker: SIGTERM, wait up to ``timeout``, then SIGKILL. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    _wait_dead(proc, timeout)
        finally:
            self._forget_process()

    def kill(self) -> None:
        """Kill the broker with SIGKILL (no clean shutdown), as a crash would. Idempotent."""
        proc = self._proc
        if proc is None:
            return
        try:
            if proc.poll() is None:
                proc.kill()
                _wait_dead(proc, 5.0)
        finally:
            self._forget_process()

    def restart(self, timeout: float = 10.0) -> None:
        """Start the broker again on the same port (stopping it first if it still runs).

        The listening port may briefly refuse to bind again after the old process died
        (sockets still closing), so "Address already in use" is retried until ``timeout``.
        Clients see the same URL before and after, as they would with a real broker restart.
        """
        self.stop()
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._start_once(deadline)
                return
            except BrokerError as exc:
                if _ADDRESS_IN_USE not in str(exc) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.2)

    def log_text(self) -> str:
        """Return everything the broker wrote: its log file, then its stdout/stderr."""
        log = _read_from(self.log_path, 0)
        out = _read_from(self.out_path, 0)
        if log and not log.endswith("\n"):
            log += "\n"
        return log + out

    def __enter__(self) -> LocalBroker:
        """Start the broker (if not already running) for a ``with`` block."""
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the broker when the ``with`` block ends."""
        self.stop()

    def __repr__(self) -> str:
        """Show the URL and state, which is what a failing test's output needs."""
        state = f"pid {self.pid}" if self.is_running() else "stopped"
        return f"LocalBroker({self.url}, {state}, workdir={str(self.workdir)!r})"

    # ------------------------------------------------------------------ internals

    def _template_text(self) -> str:
        """Return the template text: the given file, the repo's dev config, or the embedded copy."""
        if self.template is not None:
            try:
                return self.template.read_text(encoding="utf-8")
            except OSError as exc:
                raise BrokerError(
                    f"cannot read broker config template {self.template}: {exc}"
                ) from exc
        if DEFAULT_TEMPLATE_PATH.is_file():
            return DEFAULT_TEMPLATE_PATH.read_text(encoding="utf-8")
        return EMBEDDED_TEMPLATE

    def render_config(self) -> str:
        """Return the config text for the current port and work directory.

        Only the known placeholders are replaced (not ``str.format``), so a template may
        contain other braces. ``extra_config`` is appended last, where Mosquitto lets it
        override the template's single-valued settings (e.g. ``max_packet_size``).
        """
        text = self._template_text()
        if "{port}" not in text and self._auto_port:
            # Without it mosquitto would listen elsewhere and start() would wait in vain.
            # A caller-chosen port may come with an already rendered config (e.g. from
            # `fedmq broker init --port N`): the caller vouches that they agree.
            raise BrokerError("broker config template has no {port} placeholder")
        if "{ws_port}" in text and self.ws_port is None:
            raise BrokerError("broker config template has a {ws_port} placeholder but no port")
        values = {
            "{port}": str(self.port),
            "{ws_port}": str(self.ws_port),
            "{http_dir}": str(self.http_dir),
            "{data_dir}": str(self.data_dir),
            "{log_file}": str(self.log_path),
            "{user}": _run_as_user(),
        }
        for placeholder, value in values.items():
            text = text.replace(placeholder, value)
        if not text.endswith("\n"):
            text += "\n"
        if self.extra_config:
            text += "\n# extra_config from LocalBroker\n" + self.extra_config.strip() + "\n"
        return text

    def _start_once(self, deadline: float) -> None:
        """Launch mosquitto on ``self.port`` and wait for it; raise BrokerError on failure."""
        ports = self._ports()
        for port in ports:
            if _port_accepts(self.host, port):
                # Someone else is listening: our readiness probe would connect to *them* and
                # report success before mosquitto fails to bind, so fail fast instead.
                raise BrokerError(
                    f"port {port} on {self.host} is already in use "
                    f"({_ADDRESS_IN_USE} before mosquitto was started)"
                )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data_dir.mkdir(exist_ok=True)
        self.conf_path.write_text(self.render_config(), encoding="utf-8")
        log_offset, out_offset = _size(self.log_path), _size(self.out_path)
        binary = find_mosquitto()
        with self.out_path.open("ab") as out:
            # The child keeps its own copy of the descriptor, so ours can close at once.
            proc = subprocess.Popen(
                [binary, "-c", str(self.conf_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        self._proc = proc
        self._finalizer = weakref.finalize(self, _reap, proc)

        while True:
            code = proc.poll()
            if code is not None:
                self._forget_process()
                raise self._failure(
                    f"mosquitto exited with code {code} during startup", log_offset, out_offset
                )
            if all(_port_accepts(self.host, p) for p in ports) and proc.poll() is None:
                return
            if time.monotonic() >= deadline:
                self.kill()
                raise self._failure(
                    f"mosquitto did not accept connections on {self.host} port(s) "
                    f"{', '.join(map(str, ports))} in time",
                    log_offset,
                    out_offset,
                )
            time.sleep(_POLL_INTERVAL)

    def _has_ws_listener(self) -> bool:
        """Whether the template has a WebSockets listener to give a port (unreadable: no)."""
        try:
            return "{ws_port}" in self._template_text()
        except BrokerError:
            return False  # start() reports the unreadable template

    def _ports(self) -> list[int]:
        """The listeners' ports: MQTT, and WebSockets when the template has that listener."""
        return [self.port] if self.ws_port is None else [self.port, self.ws_port]

    def _failure(self, what: str, log_offset: int, out_offset: int) -> BrokerError:
        """Build a BrokerError that quotes what this launch wrote to its log and stderr."""
        output = (
            _read_from(self.log_path, log_offset) + "\n" + _read_from(self.out_path, out_offset)
        )
        tail = _tail(output) or "(the broker wrote nothing)"
        return BrokerError(f"{what}\nconfig: {self.conf_path}\nlast broker output:\n{tail}")

    def _forget_process(self) -> None:
        """Drop the handle of a process that has exited, and its safety-net finalizer."""
        if self._finalizer is not None:
            self._finalizer.detach()
            self._finalizer = None
        self._proc = None

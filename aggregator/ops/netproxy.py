"""A small threaded TCP proxy that a test or a bench can cut and heal: a network failure.

    with NetProxy(broker.host, broker.port) as proxy:
        agent connects to proxy.url ...
        proxy.cut()    # every open connection dies, new ones are closed at once until heal()
        proxy.unplug() # the same, and nothing listens: new connections are refused
        proxy.heal()

``stall()`` keeps connections open but stops forwarding (a black-holed link): the client
notices only through its keepalive. Used by the integration tests (a device's or a site's
link) and ``fedmq bench sites --cut-site`` (a site's bridge).
"""

from __future__ import annotations

import contextlib
import socket
import threading
from types import TracebackType


class NetProxy:
    """Forwards 127.0.0.1:<port> to ``target``; ``cut`` / ``stall`` / ``heal`` inject faults."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self._server = socket.create_server(("127.0.0.1", 0))
        self.port = self._server.getsockname()[1]
        self._lock = threading.Lock()
        self._conns: list[socket.socket] = []
        self._up = threading.Event()
        self._up.set()
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = False
        self.accepted = 0
        self.refused = 0  # connection attempts while the link was down
        threading.Thread(target=self._accept_loop, daemon=True).start()

    @property
    def url(self) -> str:
        """Where clients connect instead of the broker."""
        return f"mqtt://127.0.0.1:{self.port}"

    def cut(self) -> None:
        """Close every proxied connection and refuse new ones until :meth:`heal`."""
        self._up.clear()
        self._drop_connections()

    def unplug(self) -> None:
        """Close every proxied connection and stop listening until :meth:`heal`: connection
        attempts are refused by the kernel (what a client sees when the far end is gone),
        not accepted and closed (which a TLS client sees as a broken handshake)."""
        self._up.clear()
        with contextlib.suppress(OSError):  # wakes the accept loop: it ends
            self._server.shutdown(socket.SHUT_RDWR)
        self._server.close()
        self._drop_connections()

    def _drop_connections(self) -> None:
        with self._lock:
            conns, self._conns = self._conns, []
        for s in conns:
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)
            s.close()

    def stall(self) -> None:
        """Stop forwarding bytes without closing anything."""
        self._flowing.clear()

    def heal(self) -> None:
        """Accept and forward again (listening again after :meth:`unplug`)."""
        self._flowing.set()
        self._up.set()
        if self._server.fileno() == -1:  # unplugged: listen on the same port again
            self._server = socket.create_server(("127.0.0.1", self.port))
            threading.Thread(target=self._accept_loop, daemon=True).start()

    def close(self) -> None:
        """Stop the proxy and drop every connection."""
        self._closed = True
        self.cut()
        self._server.close()

    def __enter__(self) -> NetProxy:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _accept_loop(self) -> None:
        while not self._closed:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            if not self._up.is_set():
                client.close()  # the link is down: the connection attempt fails
                self.refused += 1
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._conns += [client, upstream]
                self.accepted += 1
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(65536)
                if not data:
                    break
                self._flowing.wait()
                if not self._up.is_set():
                    break
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

"""TCP relays in front of the real servers, for tests: one that can cut every connection
(:class:`OutageProxy`), and one that counts the Redis commands a client sends (
:class:`tests.redis_counter.CountingRelay`). Each client pointed at a relay reaches the real server
through it; nothing else that shares the server (other tests) is touched."""

from __future__ import annotations

import socket
import threading

from tests.private_broker import free_port


class Relay:
    """127.0.0.1:``port`` forwards each connection to 127.0.0.1:``target_port``, both ways;
    :meth:`on_request` sees the client's bytes as they go by. :meth:`up` listens, :meth:`down`
    refuses new connections and resets the open ones."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.port = free_port()
        self._server: socket.socket | None = None
        self._sockets: list[socket.socket] = []

    def on_request(self, data: bytes) -> None:
        """Bytes a client sent, just before they are forwarded."""

    def up(self) -> None:
        server = socket.socket()
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(16)
        self._server = server
        threading.Thread(target=self._accept, args=(server,), daemon=True).start()

    def down(self) -> None:
        for sock in [self._server, *self._sockets]:
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)  # also wakes the thread blocked in accept()
                except OSError:
                    pass
                sock.close()
        self._server, self._sockets = None, []

    def _accept(self, server: socket.socket) -> None:
        while True:
            try:
                downstream, _ = server.accept()
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                return
            self._sockets += [downstream, upstream]
            threading.Thread(target=self._pipe, args=(downstream, upstream, True), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, downstream, False), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, requests: bool) -> None:
        try:
            while data := source.recv(65536):
                if requests:
                    self.on_request(data)
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class OutageProxy(Relay):
    """A relay that a test turns off and on, to take Redis or RabbitMQ away from the client (and
    only from the client)."""

    def down_for(self, seconds: float) -> None:
        self.down()
        timer = threading.Timer(seconds, self.up)
        timer.daemon = True
        timer.start()

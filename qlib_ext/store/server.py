"""The TCP server: one thread per connection, each reading messages and answering in order.

A connection that sends something unreadable (oversized, malformed, garbage) is closed with one
log line; every other connection carries on. Threads rather than asyncio: the engine serialises
commands anyway, and a writer blocked in ``fdatasync`` releases the GIL for the others.
"""

from __future__ import annotations

import itertools
import logging
import socket
import threading
import time

from qlib_ext import defaults
from qlib_ext.store.engine import Engine
from qlib_ext.store.wire import HEADER, ProtocolError, encode_reply, parse_header, parse_message

logger = logging.getLogger(__name__)


def _recv_exactly(conn: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None if the peer closed the connection before the first byte."""
    chunks, got = [], 0
    while got < n:
        chunk = conn.recv(min(n - got, 1 << 20))
        if not chunk:
            if got:
                raise ProtocolError(f"connection closed mid-message ({got} of {n} bytes)")
            return None
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class StoreServer:
    """Accepts connections on ``host:port`` and runs their commands on ``engine``.

    Thread-safe: :meth:`shutdown` may be called from any thread (a signal handler included).
    """

    def __init__(self, engine: Engine, host: str, port: int,
                 max_message_bytes: int = defaults.MAX_MESSAGE_BYTES):
        self.engine = engine
        self.max_message_bytes = max_message_bytes
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.sock.settimeout(0.2)  # lets serve_forever notice shutdown()
        self.host, self.port = host, self.sock.getsockname()[1]
        self.stopping = threading.Event()
        self.last_activity = time.monotonic()
        self.connections = 0
        self._count_lock = threading.Lock()
        self._ids = itertools.count(1)

    def serve_forever(self, idle_exit: float | None = None) -> None:
        """Accept until :meth:`shutdown`, or until idle (no connection) for ``idle_exit`` seconds."""
        while not self.stopping.is_set():
            try:
                conn, peer = self.sock.accept()
            except TimeoutError:
                idle = time.monotonic() - self.last_activity
                if idle_exit and self.connections == 0 and idle > idle_exit:
                    logger.info("store: idle for %.0f s, exiting", idle)
                    break
                continue
            except OSError:
                if self.stopping.is_set():
                    break
                raise
            threading.Thread(target=self._serve_connection, args=(conn, peer), daemon=True,
                             name=f"store-conn-{peer}").start()
        self.sock.close()

    def shutdown(self) -> None:
        """Stop accepting; :meth:`serve_forever` returns within a fraction of a second."""
        self.stopping.set()

    def _serve_connection(self, conn: socket.socket, peer: tuple) -> None:
        conn.settimeout(None)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self._count_lock:
            self.connections += 1
        try:
            while not self.stopping.is_set() and self._serve_one(conn):
                self.last_activity = time.monotonic()
        except ProtocolError as e:
            logger.warning("store: closing connection from %s: %s", peer, e)
        except OSError as e:
            logger.warning("store: connection from %s failed: %s", peer, e)
        finally:
            with self._count_lock:
                self.connections -= 1
            self.last_activity = time.monotonic()
            conn.close()

    def _serve_one(self, conn: socket.socket) -> bool:
        header = _recv_exactly(conn, HEADER.size)
        if header is None:
            return False
        length, request_id, op_code = parse_header(header, self.max_message_bytes)
        rest = _recv_exactly(conn, length - HEADER.size)
        if rest is None:
            raise ProtocolError("connection closed after a message header")
        request = parse_message(request_id, op_code, header + rest)
        db = request.body.pop("$db", None) or "admin"
        reply = self.engine.execute(db, request.body, request.sequences)
        if not request.more_to_come:
            conn.sendall(encode_reply(request, next(self._ids), reply))
        return True

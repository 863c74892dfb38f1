"""The TCP server: one thread per connection, each reading messages and answering in order.

A connection that sends something unreadable (oversized, malformed, garbage) is closed with one
log line; every other connection carries on. So is a connection that stays silent for
``idle_timeout`` seconds between messages, or takes longer than ``read_timeout`` to finish a
message (or a TLS handshake) it started. At most ``max_connections`` are served at once (lowered at
start to fit the open-file limit, :mod:`qlib_ext.store.capacity`); more are closed on arrival, with a
log line at most every few seconds. Clients other than the owner's own (peer-identified) ones share
all but ``STORE_OWNER_CONNECTIONS`` of them, so no other user can lock the owner out. A failed
``accept`` (out of file descriptors, say) is logged and retried after a pause: nothing a client
does ends the server. Threads rather than asyncio: the
engine serialises commands anyway, and a writer blocked in ``fdatasync`` releases the GIL.

With a :class:`~qlib_ext.store.auth.Verifier`, each connection must authenticate (SCRAM-SHA-256)
before anything but the handshake; with an ``ssl.SSLContext``, each connection is TLS.
"""

from __future__ import annotations

import itertools
import logging
import socket
import ssl
import threading
import time

import bson

from qlib_ext import defaults
from qlib_ext.store.auth import Session, Verifier
from qlib_ext.store.capacity import connection_cap, others_cap, raise_open_file_limit
from qlib_ext.store.engine import Engine
from qlib_ext.store.peer import loopback_peer_uid, owner_uid
from qlib_ext.store.wire import HEADER, ProtocolError, encode_reply, parse_header, parse_message

logger = logging.getLogger(__name__)

_HELLO = {"hello", "ismaster"}
_REFUSAL_LOG_SECONDS = 10.0


class IdleTimeout(Exception):
    """The client sent nothing for the idle timeout."""


def _recv_exactly(conn: socket.socket, n: int, first_timeout: float, rest_timeout: float) -> bytes | None:
    """``n`` bytes, or None if the peer closed the connection before the first byte.

    The first byte may take ``first_timeout`` s (IdleTimeout), each later one ``rest_timeout`` s
    (ProtocolError): a peer cannot hold the thread by sending half a message.
    """
    chunks, got = [], 0
    conn.settimeout(first_timeout)
    while got < n:
        try:
            chunk = conn.recv(min(n - got, 1 << 20))
        except TimeoutError:
            if got or first_timeout == rest_timeout:
                raise ProtocolError(f"no complete message within {rest_timeout:g} s "
                                    f"({got} of {n} bytes)") from None
            raise IdleTimeout from None
        if not chunk:
            if got:
                raise ProtocolError(f"connection closed mid-message ({got} of {n} bytes)")
            return None
        if not got:
            conn.settimeout(rest_timeout)
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


class StoreServer:
    """Accepts connections on ``host:port`` and runs their commands on ``engine``.

    Thread-safe: :meth:`shutdown` may be called from any thread (a signal handler included).
    ``idle_timeout``, ``read_timeout`` and ``max_connections`` may be changed before serving.
    """

    def __init__(self, engine: Engine, host: str, port: int,
                 max_message_bytes: int = defaults.MAX_MESSAGE_BYTES,
                 verifier: Verifier | None = None, tls: ssl.SSLContext | None = None,
                 peer_auth: bool = True):
        self.engine = engine
        self.peer_auth = peer_auth  # a loopback client running as the store's owner needs no password
        self.max_message_bytes = max_message_bytes
        self.verifier = verifier
        self.tls = tls
        self.idle_timeout = defaults.STORE_IDLE_CONNECTION_SECONDS
        self.read_timeout = defaults.STORE_READ_TIMEOUT_SECONDS
        self.max_connections = connection_cap(defaults.STORE_MAX_CONNECTIONS, raise_open_file_limit())
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
        self.others = 0  # connections not identified as the owner's (other users, remote, unknown)
        self.refused = 0
        self._accept_failing = False
        self._last_refusal_log = 0.0
        self._count_lock = threading.Lock()
        self._ids = itertools.count(1)
        engine.on_failure = self.shutdown

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
            except OSError as e:
                if self.stopping.is_set():
                    break
                self._accept_failed(e)
                continue
            self._accept_failing = False
            if not self._admit(conn, peer):
                continue
            threading.Thread(target=self._serve_connection, args=(conn, peer), daemon=True,
                             name=f"store-conn-{peer}").start()
        self.sock.close()

    def _accept_failed(self, error: OSError) -> None:
        """Log the first of a run of failed ``accept`` calls, then pause briefly before the next."""
        if not self._accept_failing:
            self._accept_failing = True
            logger.error("store: accepting a connection failed (%s); retrying every %g s, still serving "
                         "open connections", error, defaults.STORE_ACCEPT_BACKOFF_SECONDS)
        self.stopping.wait(defaults.STORE_ACCEPT_BACKOFF_SECONDS)

    def _admit(self, conn: socket.socket, peer: tuple) -> bool:
        with self._count_lock:
            if self.connections < self.max_connections:
                self.connections += 1
                return True
        self._refuse(conn, peer, f"{self.max_connections} connections open, the limit (STORE_MAX_CONNECTIONS)")
        return False

    def _admit_other(self) -> bool:
        """Count a connection that is not the owner's, unless others already hold their share."""
        with self._count_lock:
            if self.others < others_cap(self.max_connections):
                self.others += 1
                return True
        return False

    def _refuse(self, conn: socket.socket, peer: tuple, why: str) -> None:
        with self._count_lock:
            self.refused += 1
        now = time.monotonic()
        if now - self._last_refusal_log > _REFUSAL_LOG_SECONDS:
            self._last_refusal_log = now
            logger.warning("store: refusing connection from %s: %s; %d refused so far", peer, why, self.refused)
        conn.close()

    def shutdown(self) -> None:
        """Stop accepting; :meth:`serve_forever` returns within a fraction of a second."""
        self.stopping.set()

    def _serve_connection(self, conn: socket.socket, peer: tuple) -> None:
        # The peer is judged once, now, while the kernel still vouches for the client's socket; the
        # verdict lives and dies with this connection (docs/security.md, "peer authentication").
        is_owner = owner_uid(loopback_peer_uid(conn))
        other = not is_owner
        if other and not self._admit_other():
            other = False  # not counted
            with self._count_lock:
                self.connections -= 1
            self._refuse(conn, peer, f"clients other than the owner hold {others_cap(self.max_connections)} "
                                     "connections, their share (STORE_MAX_CONNECTIONS less STORE_OWNER_CONNECTIONS)")
            return
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self.tls is not None:
                conn.settimeout(self.read_timeout)
                conn = self.tls.wrap_socket(conn, server_side=True)
            trusted = self.peer_auth and self.tls is None and is_owner
            session = Session(self.verifier, trusted_peer=(lambda: trusted) if trusted else None)
            while not self.stopping.is_set() and self._serve_one(conn, session):
                self.last_activity = time.monotonic()
        except IdleTimeout:
            logger.info("store: closing connection from %s: idle for %g s", peer, self.idle_timeout)
        except ProtocolError as e:
            logger.warning("store: closing connection from %s: %s", peer, e)
        except ssl.SSLError as e:
            logger.warning("store: TLS handshake with %s failed: %s", peer, e)
        except OSError as e:
            logger.warning("store: connection from %s failed: %s", peer, e)
        finally:
            with self._count_lock:
                self.connections -= 1
                self.others -= other
            self.last_activity = time.monotonic()
            conn.close()

    def _serve_one(self, conn: socket.socket, session: Session) -> bool:
        header = _recv_exactly(conn, HEADER.size, self.idle_timeout, self.read_timeout)
        if header is None:
            return False
        length, request_id, op_code = parse_header(header, self.max_message_bytes)
        rest = _recv_exactly(conn, length - HEADER.size, self.read_timeout, self.read_timeout)
        if rest is None:
            raise ProtocolError("connection closed after a message header")
        request = parse_message(request_id, op_code, header + rest)
        db = request.body.pop("$db", None) or "admin"
        name = next(iter(request.body), "")
        early = session.gate(name, db, request.body)
        if early is not None:
            reply = bson.encode(early)
        else:
            reply = self.engine.execute(db, request.body, request.sequences)
            if name.lower() in _HELLO and self.verifier is not None:
                extras = session.hello_extras(request.body)
                if extras:
                    reply = bson.encode({**bson.decode(reply), **extras})
        if not request.more_to_come:
            conn.sendall(encode_reply(request, next(self._ids), reply))
        return True

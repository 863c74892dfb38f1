"""Peer authentication on loopback: a TCP client that runs as the store's owner needs no password.

On Linux the kernel lists every TCP socket of this network namespace in ``/proc/net/tcp`` and
``/proc/net/tcp6`` with the uid that owns it. For a loopback connection the client's end is there
too (local address = our peer, remote address = us), so the store can tell which user connected
without the client saying anything — as PostgreSQL's ``peer`` method does on Unix sockets.

Trusting the owner's own processes grants nothing new: they can read the credentials file in the
store directory anyway. It is what lets Qlib's own tools (``python -m qlib.workflow.task.manage -t
POOL task_stat``, ``TaskManager(pool)``), which connect to ``mongodb://127.0.0.1:27017/`` with no
credentials, keep working for the owner while every other user of the host is refused.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


def _hex_addr(addr: tuple, family: int) -> str:
    """An address as ``/proc/net/tcp*`` spells it: the IP's 32-bit words in host (little-endian) order."""
    raw = socket.inet_pton(family, addr[0])
    words = "".join(f"{int.from_bytes(raw[i:i + 4], 'little'):08X}" for i in range(0, len(raw), 4))
    return f"{words}:{addr[1]:04X}"


def loopback_peer_uid(conn: socket.socket) -> int | None:
    """The uid owning the other end of a loopback TCP connection, or None (not loopback, not Linux,
    or the client's socket is already gone)."""
    try:
        peer, local = conn.getpeername(), conn.getsockname()
        family = conn.family
        if not _is_loopback(peer[0]):
            return None
        want = (_hex_addr(peer, family), _hex_addr(local, family))
        table = "/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6"
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if (cols[1], cols[2]) == want:
                    return int(cols[7])
    except (OSError, ValueError, IndexError, StopIteration) as e:
        logger.debug("store: no peer uid for a connection: %s", e)
    return None


def is_owner(conn: socket.socket) -> bool:
    """Whether the client at the other end of ``conn`` runs as the user this store runs as."""
    return loopback_peer_uid(conn) == os.geteuid()


def _is_loopback(ip: str) -> bool:
    return ip == "::1" or ip.startswith(("127.", "::ffff:127."))  # IPv4, IPv6, IPv4-mapped IPv6 loopback

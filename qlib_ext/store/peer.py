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


_ESTABLISHED = "01"  # the ``st`` column of /proc/net/tcp*: TCP_ESTABLISHED


def loopback_peer_uid(conn: socket.socket) -> int | None:
    """The uid owning the other end of a live loopback TCP connection, or None when in doubt.

    Only the client's own row counts, and only while the kernel vouches for it: state ESTABLISHED
    and a non-zero inode (a socket some process still holds). A client that has already closed
    leaves an orphan (FIN_WAIT*, TIME_WAIT) whose uid reads 0 and inode 0: that is None, never
    root. None also for a non-loopback peer, no ``/proc`` (not Linux) or a row that does not parse.
    """
    try:
        peer, local = conn.getpeername(), conn.getsockname()
        if not _is_loopback(peer[0]):
            return None
        return _row_uid(_table(conn.family), (_hex_addr(peer, conn.family), _hex_addr(local, conn.family)))
    except (OSError, ValueError, IndexError, StopIteration) as e:
        logger.debug("store: no peer uid for a connection: %s", e)
    return None


def _table(family: int) -> str:
    return "/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6"


def _row_uid(table: str, want: tuple[str, str]) -> int | None:
    """The uid of the live, established row for (local, remote) = ``want`` in ``table``, else None."""
    with open(table) as f:
        next(f)
        for line in f:
            cols = line.split()
            if (cols[1], cols[2]) == want:
                if cols[3] != _ESTABLISHED or int(cols[9]) == 0:
                    return None  # closing or orphaned: no process vouches for this uid
                return int(cols[7])
    return None


def is_owner(conn: socket.socket) -> bool:
    """Whether the client at the other end of ``conn`` runs as the user this store runs as."""
    return owner_uid(loopback_peer_uid(conn))


def owner_uid(uid: int | None) -> bool:
    """Whether a peer uid from :func:`loopback_peer_uid` is this store's owner (None never is)."""
    return uid is not None and uid == os.geteuid()


def _is_loopback(ip: str) -> bool:
    return ip == "::1" or ip.startswith(("127.", "::ffff:127."))  # IPv4, IPv6, IPv4-mapped IPv6 loopback

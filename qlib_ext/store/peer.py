"""Peer authentication on loopback: a TCP client that runs as the store's owner needs no password.

On Linux the kernel lists every TCP socket of this network namespace in ``/proc/net/tcp`` and
``/proc/net/tcp6`` with the uid that owns it. For a loopback connection the client's end is there
too (local address = our peer, remote address = us), so the store can tell which user connected
without the client saying anything — as PostgreSQL's ``peer`` method does on Unix sockets. The
store asks for that one socket through ``sock_diag`` (netlink, what ``ss`` uses), and reads the
tables only where that is unavailable. Either way it trusts the answer only for an ESTABLISHED
socket that a process still holds (non-zero inode), once, when the connection is accepted
(docs/security.md explains the race this closes).

Trusting the owner's own processes grants nothing new: they can read the credentials file in the
store directory anyway. It is what lets Qlib's own tools (``python -m qlib.workflow.task.manage -t
POOL task_stat``, ``TaskManager(pool)``), which connect to ``mongodb://127.0.0.1:27017/`` with no
credentials, keep working for the owner while every other user of the host is refused.
"""

from __future__ import annotations

import logging
import os
import socket
import struct

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
        try:
            return _diag_uid(conn.family, peer, local)
        except OSError as e:  # no sock_diag (an old kernel, a sandbox): the same test over /proc
            logger.debug("store: sock_diag unavailable (%s); reading %s", e, _table(conn.family))
        return _row_uid(_table(conn.family), (_hex_addr(peer, conn.family), _hex_addr(local, conn.family)))
    except (OSError, ValueError, IndexError, struct.error) as e:
        logger.debug("store: no peer uid for a connection: %s", e)
    return None


_SOCK_DIAG_BY_FAMILY = 20
_NLMSG_ERROR = 2
_NETLINK_SOCK_DIAG = 4
_NO_COOKIE = 0xFFFFFFFF
_MSG_HEADER = struct.Struct("=IHHII")  # nlmsghdr: length, type, flags, seq, pid


def _diag_uid(family: int, client: tuple, server: tuple) -> int | None:
    """The uid of the client's socket asked of the kernel by its exact 4-tuple (``sock_diag``,
    as ``ss`` does: one hash lookup, not a scan of every connection), under the same rule as
    :func:`_row_uid`: ESTABLISHED with a live inode, else None.

    Raises:
        OSError: this kernel or sandbox offers no ``sock_diag`` netlink socket.
    """
    def addr(ip: str) -> bytes:
        raw = socket.inet_pton(family, ip)
        return raw + bytes(16 - len(raw))

    sockid = (struct.pack("!HH", client[1], server[1]) + addr(client[0]) + addr(server[0])
              + struct.pack("=III", 0, _NO_COOKIE, _NO_COOKIE))  # inet_diag_sockid
    request = struct.pack("=BBBBI", family, socket.IPPROTO_TCP, 0, 0, 0xFFFFFFFF) + sockid  # inet_diag_req_v2
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, _NETLINK_SOCK_DIAG) as nl:
        nl.settimeout(2.0)
        nl.sendto(_MSG_HEADER.pack(_MSG_HEADER.size + len(request), _SOCK_DIAG_BY_FAMILY, 1, 1, 0) + request, (0, 0))
        reply = nl.recv(65536)
    _, kind, _, _, _ = _MSG_HEADER.unpack_from(reply)
    if kind != _SOCK_DIAG_BY_FAMILY:  # NLMSG_ERROR: no such socket (ENOENT), or refused
        return None
    state = reply[_MSG_HEADER.size + 1]  # inet_diag_msg: family, state, timer, retrans, id (48), ...
    uid, inode = struct.unpack_from("=II", reply, _MSG_HEADER.size + 4 + 48 + 12)
    return uid if state == int(_ESTABLISHED) and inode != 0 else None


def _table(family: int) -> str:
    return "/proc/net/tcp" if family == socket.AF_INET else "/proc/net/tcp6"


def _row_uid(table: str, want: tuple[str, str]) -> int | None:
    """The uid of the live, established row for (local, remote) = ``want`` in ``table``, else None.

    The row is found by a substring search over the whole table (C speed: the table holds every
    connection of the host, and each new connection reads it once).
    """
    with open(table) as f:
        text = f.read()
    key, at = f" {want[0]} {want[1]} ", 0
    while (at := text.find(key, at)) >= 0:  # one live socket per 4-tuple; old orphans may share it
        cols = text[at:text.find("\n", at)].split()  # local, remote, st, queues, timer, retrnsmt, uid, timeout, inode
        if cols[2] == _ESTABLISHED and int(cols[8]) != 0:
            return int(cols[6])
        at += len(key)  # closing or orphaned: no process vouches for this uid
    return None


def is_owner(conn: socket.socket) -> bool:
    """Whether the client at the other end of ``conn`` runs as the user this store runs as."""
    return owner_uid(loopback_peer_uid(conn))


def owner_uid(uid: int | None) -> bool:
    """Whether a peer uid from :func:`loopback_peer_uid` is this store's owner (None never is)."""
    return uid is not None and uid == os.geteuid()


def _is_loopback(ip: str) -> bool:
    return ip == "::1" or ip.startswith(("127.", "::ffff:127."))  # IPv4, IPv6, IPv4-mapped IPv6 loopback

"""How many connections the store can hold: the open-file limit and the caps under it.

Each connection is one file descriptor. A store that runs out of them cannot ``accept``, cannot
open its journal or write a snapshot, so the cap on connections must sit below the process's
open-file limit with room to spare. At start the store raises its soft limit to the hard one (the
most an unprivileged process may take), then lowers the connection cap to fit under it.
"""

from __future__ import annotations

import logging

from qlib_ext import defaults

logger = logging.getLogger(__name__)


def raise_open_file_limit() -> int | None:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one; return the soft limit now in force.

    Returns:
        The open-file limit, or None where there is none to read (not POSIX) or it is unlimited.
    """
    try:
        import resource
    except ImportError:  # not POSIX
        return None
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (OSError, ValueError) as e:  # e.g. a hard limit above the kernel's nr_open
            logger.warning("store: could not raise the open-file limit from %d to %d: %s", soft, hard, e)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(wanted: int, file_limit: int | None) -> int:
    """The connections the store may hold: ``wanted``, lowered to fit under ``file_limit``.

    Args:
        wanted: the configured cap (``STORE_MAX_CONNECTIONS``).
        file_limit: the open-file limit (:func:`raise_open_file_limit`), None for no limit.

    Returns:
        At most ``file_limit - STORE_RESERVED_FILES``, and at least enough for the owner's reserve
        plus one other client.
    """
    if file_limit is None:
        return wanted
    room = max(file_limit - defaults.STORE_RESERVED_FILES, defaults.STORE_OWNER_CONNECTIONS + 1)
    if room < wanted:
        logger.info("store: at most %d connections (open-file limit %d, %d files kept for the store)",
                    room, file_limit, defaults.STORE_RESERVED_FILES)
    return min(wanted, room)


def others_cap(total: int) -> int:
    """Connections every client but the owner may hold together, out of ``total``: the owner keeps
    ``STORE_OWNER_CONNECTIONS`` (or half of a very small cap)."""
    return total - min(defaults.STORE_OWNER_CONNECTIONS, total // 2)

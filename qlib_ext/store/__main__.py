"""``python -m qlib_ext.store serve --dir DIR [--host H] [--port P] [--idle-exit S]``.

The process :func:`qlib_ext.store.resolve_mongo_url` starts in the background. Kept free of click
so the detached store starts fast.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from qlib_ext import defaults
from qlib_ext.errors import StoreError
from qlib_ext.store.lifecycle import serve


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and serve; exit code 2 on a store error."""
    parser = argparse.ArgumentParser(prog="python -m qlib_ext.store")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("serve", help="run the embedded store in the foreground")
    p.add_argument("--dir", type=Path, default=None)
    p.add_argument("--host", default=defaults.STORE_HOST)
    p.add_argument("--port", type=int, default=defaults.STORE_PORT)
    p.add_argument("--idle-exit", type=float, default=None, help="exit after S seconds with no client")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args.dir, host=args.host, port=args.port, idle_exit=args.idle_exit)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

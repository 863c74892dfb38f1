"""``python -m qlib_ext.store serve --dir DIR [--host H] [--port P] [--idle-exit S] [--no-auth] [--no-peer-auth]
[--tls-cert-file PEM [--tls-key-file PEM] [--tls-ca-file PEM]]``.

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
    p.add_argument("--no-auth", action="store_true", help="no authentication (loopback binds only)")
    p.add_argument("--no-peer-auth", action="store_true",
                   help="ask the owner's own loopback clients for the password too")
    p.add_argument("--tls-cert-file", type=Path, default=None, help="PEM certificate: serve TLS only")
    p.add_argument("--tls-key-file", type=Path, default=None, help="PEM private key of the certificate")
    p.add_argument("--tls-ca-file", type=Path, default=None, help="CA local clients verify with")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        serve(args.dir, host=args.host, port=args.port, idle_exit=args.idle_exit, auth=not args.no_auth,
              tls_cert_file=args.tls_cert_file, tls_key_file=args.tls_key_file, tls_ca_file=args.tls_ca_file,
              peer_auth=not args.no_peer_auth)
    except StoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

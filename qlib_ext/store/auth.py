"""Authentication: SCRAM-SHA-256 as pymongo speaks it, with credentials kept in the store directory.

At first start the store writes ``credentials.json`` (one user, a random password; mode 0600) to
its directory; every local client that resolves the store through :mod:`qlib_ext.store.lifecycle`
reads it and puts it into the URL it returns, so a user of the same host who cannot read the
owner's files cannot connect. The password never leaves the file in clear: SCRAM sends proofs.

A connection starts unauthenticated and may only run the handshake commands
(:data:`OPEN_COMMANDS`); anything else gets MongoDB's ``Unauthorized`` (13). ``saslStart`` /
``saslContinue`` run the RFC 5802/7677 exchange, also inside ``hello`` as
``speculativeAuthenticate`` (pymongo's one-round-trip variant).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bson.binary import Binary

from qlib_ext.errors import StoreError
from qlib_ext.store.errors import error_reply

logger = logging.getLogger(__name__)

CREDENTIALS_FILE = "credentials.json"
USER = "qlib-ext"
MECHANISM = "SCRAM-SHA-256"
ITERATIONS = 15_000
"""PBKDF2 iterations of the salted password (MongoDB's default for SCRAM-SHA-256)."""

OPEN_COMMANDS = frozenset({"hello", "ismaster", "ping", "buildinfo", "saslstart", "saslcontinue",
                           "endsessions", "getnonce"})
"""Commands (lower case) an unauthenticated connection may run, as on a MongoDB with auth."""

_AUTH_FAILED = 18


@dataclass(frozen=True)
class Credentials:
    """The store's one user."""

    user: str
    password: str


def create_credentials(directory: Path) -> Credentials:
    """Credentials of the store in ``directory``, generated (owner-only file) if there are none yet."""
    path = directory / CREDENTIALS_FILE
    if not path.exists():
        creds = Credentials(USER, secrets.token_urlsafe(24))
        tmp = path.with_suffix(".tmp")
        tmp.unlink(missing_ok=True)
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as f:
            json.dump({"user": creds.user, "password": creds.password}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        logger.warning("store: generated credentials for user %r in %s (owner-only)", creds.user, path)
    if path.stat().st_mode & 0o077:
        logger.warning("store: %s was readable by others; made it owner-only", path)
        path.chmod(0o600)
    found = read_credentials(directory)
    assert found is not None
    return found


def read_credentials(directory: Path) -> Credentials | None:
    """Credentials in ``directory``, or None when there is no credentials file.

    Raises:
        StoreError: the file exists but cannot be read (another user's store) or is damaged.
    """
    path = directory / CREDENTIALS_FILE
    try:
        data = json.loads(path.read_text())
        return Credentials(str(data["user"]), str(data["password"]))
    except FileNotFoundError:
        return None
    except PermissionError as e:
        raise StoreError(f"cannot read {path}: {e.strerror}; the store belongs to another user "
                         "(only its owner can connect)") from e
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise StoreError(f"{path} is damaged ({e!r}); delete it and restart the store to generate "
                         "new credentials") from e


_URL_PASSWORD = re.compile(r"(\w[\w+.-]*://[^:/@\s]+):[^@\s]+@")


def mask(text: str) -> str:
    """``mongodb://user:secret@host`` -> ``mongodb://user:***@host`` (for anything logged or shown)."""
    return _URL_PASSWORD.sub(r"\1:***@", text)


def _h(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def _hmac(key: bytes, data: bytes) -> bytes:
    return hmac.new(key, data, hashlib.sha256).digest()


class Verifier:
    """The server's SCRAM secrets for one user (salt fixed for the server's life, so clients cache)."""

    def __init__(self, creds: Credentials):
        self.user = creds.user
        self.salt = secrets.token_bytes(16)
        salted = hashlib.pbkdf2_hmac("sha256", creds.password.encode(), self.salt, ITERATIONS)
        self.stored_key = _h(_hmac(salted, b"Client Key"))
        self.server_key = _hmac(salted, b"Server Key")


def _fields(message: bytes) -> dict[bytes, bytes]:
    return dict(part.split(b"=", 1) for part in message.split(b",") if b"=" in part)


class Session:
    """Authentication state of one connection. Used by that connection's thread only."""

    def __init__(self, verifier: Verifier | None, trusted_peer: Callable[[], bool] | None = None):
        self.verifier = verifier
        self.authenticated = verifier is None
        self._trusted_peer = trusted_peer  # asked once, at the first gated command (peer authentication)
        self._conversation: dict[str, Any] | None = None

    def gate(self, name: str, db: str, body: dict[str, Any]) -> dict[str, Any] | None:
        """The reply to send instead of running ``body``, or None to run it."""
        lowered = name.lower()
        if lowered == "saslstart":
            return self.sasl_start(db, body)
        if lowered == "saslcontinue":
            return self.sasl_continue(body)
        if self.authenticated or lowered in OPEN_COMMANDS:
            return None
        if self._trusted_peer is not None:
            self.authenticated, self._trusted_peer = self._trusted_peer(), None
            if self.authenticated:
                return None
        return error_reply(13, f"command {name} requires authentication")

    def hello_extras(self, body: dict[str, Any]) -> dict[str, Any]:
        """Fields to add to a ``hello`` reply: supported mechanisms, speculative authentication."""
        extras: dict[str, Any] = {}
        if self.verifier is None:
            return extras
        if body.get("saslSupportedMechs") == f"admin.{self.verifier.user}":
            extras["saslSupportedMechs"] = [MECHANISM]
        spec = body.get("speculativeAuthenticate")
        if isinstance(spec, dict) and spec.get("mechanism") == MECHANISM:
            reply = self.sasl_start(str(spec.get("db") or "admin"), spec)
            if reply.get("ok"):
                extras["speculativeAuthenticate"] = {k: reply[k] for k in ("conversationId", "done", "payload")}
        return extras

    def sasl_start(self, db: str, body: dict[str, Any]) -> dict[str, Any]:
        """First SCRAM step: check the user, answer with nonce, salt and iteration count."""
        if self.verifier is None:
            return error_reply(_AUTH_FAILED, "authentication is disabled on this store")
        payload = bytes(body.get("payload") or b"")
        first_bare = payload[3:] if payload.startswith(b"n,,") else b""
        fields = _fields(first_bare)
        user = fields.get(b"n", b"").replace(b"=2C", b",").replace(b"=3D", b"=").decode(errors="replace")
        if db != "admin" or user != self.verifier.user or not fields.get(b"r"):
            logger.warning("store: authentication failed (unknown user %r in %r)", user, db)
            return error_reply(_AUTH_FAILED, "Authentication failed.")
        if body.get("mechanism") != MECHANISM:
            return error_reply(334, f"mechanism {body.get('mechanism')!r} is not supported; "
                                    f"the embedded store speaks {MECHANISM}")
        nonce = fields[b"r"] + base64.b64encode(secrets.token_bytes(24))
        server_first = b"r=%s,s=%s,i=%d" % (nonce, base64.b64encode(self.verifier.salt), ITERATIONS)
        skip_empty = bool((body.get("options") or {}).get("skipEmptyExchange"))
        self._conversation = {"first_bare": first_bare, "server_first": server_first, "nonce": nonce,
                              "skip_empty": skip_empty, "step": 1}
        return {"conversationId": 1, "done": False, "payload": Binary(server_first), "ok": 1.0}

    def sasl_continue(self, body: dict[str, Any]) -> dict[str, Any]:
        """Second SCRAM step: verify the client's proof, prove the server's identity."""
        conv, self._conversation = self._conversation, None
        if conv is None or self.verifier is None:
            return error_reply(_AUTH_FAILED, "no SASL conversation in progress")
        if conv["step"] == 2:  # the empty third message of clients that do not skip it
            self.authenticated = True
            return {"conversationId": 1, "done": True, "payload": Binary(b""), "ok": 1.0}
        final = bytes(body.get("payload") or b"")
        without_proof, _, proof = final.rpartition(b",p=")
        fields = _fields(without_proof)
        if fields.get(b"r") != conv["nonce"] or fields.get(b"c") != b"biws" or not proof:
            return error_reply(_AUTH_FAILED, "Authentication failed.")
        auth_message = b",".join((conv["first_bare"], conv["server_first"], without_proof))
        signature = _hmac(self.verifier.stored_key, auth_message)
        try:
            client_key = bytes(a ^ b for a, b in zip(base64.b64decode(proof), signature, strict=True))
        except ValueError:
            client_key = b""
        if not hmac.compare_digest(_h(client_key), self.verifier.stored_key):
            logger.warning("store: authentication failed for user %r (wrong password)", self.verifier.user)
            return error_reply(_AUTH_FAILED, "Authentication failed.")
        server_signature = base64.b64encode(_hmac(self.verifier.server_key, auth_message))
        if conv["skip_empty"]:
            self.authenticated = True
        else:
            self._conversation = dict(conv, step=2)
        return {"conversationId": 1, "done": conv["skip_empty"], "payload": Binary(b"v=" + server_signature),
                "ok": 1.0}

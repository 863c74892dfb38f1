"""MongoDB wire protocol framing: OP_MSG and the legacy OP_QUERY handshake, and their replies.

Only what pymongo 4.x sends is understood. Parsing is strict: anything malformed raises
:class:`ProtocolError`, and the server closes that one connection.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass, field
from typing import Any

import bson
from bson.codec_options import CodecOptions

logger = logging.getLogger(__name__)

OP_REPLY = 1
OP_QUERY = 2004
OP_COMPRESSED = 2012
OP_MSG = 2013

FLAG_CHECKSUM = 1 << 0
FLAG_MORE_TO_COME = 1 << 1
FLAG_EXHAUST_ALLOWED = 1 << 16
_KNOWN_FLAGS = FLAG_CHECKSUM | FLAG_MORE_TO_COME | FLAG_EXHAUST_ALLOWED

HEADER = struct.Struct("<iiii")
CODEC = CodecOptions(document_class=dict)
"""Decode into plain dicts, datetimes naive UTC, UUIDs left as Binary: an exact round trip."""


class ProtocolError(Exception):
    """The peer sent bytes that are not a message this server understands."""


@dataclass
class Request:
    """One decoded client message."""

    request_id: int
    op_code: int
    body: dict[str, Any]
    more_to_come: bool = False
    sequences: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
        table.append(crc)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    """CRC-32C (Castagnoli) as OP_MSG checksums use; pure Python, only run when a client asks."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def parse_header(raw: bytes, max_bytes: int) -> tuple[int, int, int]:
    """Return ``(length, request_id, op_code)`` of a 16-byte header, or raise ProtocolError."""
    length, request_id, _response_to, op_code = HEADER.unpack(raw)
    if length < HEADER.size + 4 or length > max_bytes:
        raise ProtocolError(f"message length {length} outside 20..{max_bytes} bytes")
    if op_code not in (OP_MSG, OP_QUERY):
        raise ProtocolError(f"unsupported opCode {op_code} (expected OP_MSG or OP_QUERY)")
    return length, request_id, op_code


def parse_message(request_id: int, op_code: int, whole: bytes) -> Request:
    """Decode a complete message (header included) into a :class:`Request`."""
    try:
        if op_code == OP_MSG:
            return _parse_op_msg(request_id, whole)
        return _parse_op_query(request_id, whole)
    except ProtocolError:
        raise
    except Exception as e:  # bson.errors.InvalidBSON, struct.error, IndexError...
        raise ProtocolError(f"malformed message: {e}") from e


def _parse_op_msg(request_id: int, whole: bytes) -> Request:
    (flags,) = struct.unpack_from("<I", whole, 16)
    if flags & 0xFFFF & ~_KNOWN_FLAGS:
        raise ProtocolError(f"unknown required OP_MSG flag bits {flags:#x}")
    end = len(whole)
    if flags & FLAG_CHECKSUM:
        end -= 4
        (expected,) = struct.unpack_from("<I", whole, end)
        if crc32c(whole[:end]) != expected:
            raise ProtocolError("OP_MSG checksum mismatch")
    body, sequences, pos = None, {}, 20
    while pos < end:
        kind = whole[pos]
        pos += 1
        if kind == 0:
            (size,) = struct.unpack_from("<i", whole, pos)
            body = bson.decode(whole[pos:pos + size], CODEC)
            pos += size
        elif kind == 1:
            (size,) = struct.unpack_from("<i", whole, pos)
            section_end = pos + size
            name_end = whole.index(b"\x00", pos + 4)
            name = whole[pos + 4:name_end].decode()
            sequences[name] = bson.decode_all(whole[name_end + 1:section_end], CODEC)
            pos = section_end
        else:
            raise ProtocolError(f"unknown OP_MSG section kind {kind}")
    if body is None or pos != end:
        raise ProtocolError("OP_MSG without a body section or with trailing bytes")
    return Request(request_id, OP_MSG, body, bool(flags & FLAG_MORE_TO_COME), sequences)


def _parse_op_query(request_id: int, whole: bytes) -> Request:
    name_end = whole.index(b"\x00", 20)
    collection = whole[20:name_end].decode()
    if not collection.endswith(".$cmd"):
        raise ProtocolError(f"legacy OP_QUERY on {collection!r}; only commands are supported")
    pos = name_end + 1 + 8  # skip numberToSkip, numberToReturn
    (size,) = struct.unpack_from("<i", whole, pos)
    query = bson.decode(whole[pos:pos + size], CODEC)
    if "$query" in query:
        query = query["$query"]
    query.setdefault("$db", collection[: -len(".$cmd")])
    return Request(request_id, OP_QUERY, query)


def encode_reply(request: Request, reply_id: int, body: dict[str, Any] | bytes) -> bytes:
    """Encode ``body`` (a dict or already-encoded BSON) as the reply matching ``request``."""
    payload = body if isinstance(body, bytes) else bson.encode(body)
    if request.op_code == OP_QUERY:
        prefix = struct.pack("<iqii", 0, 0, 0, 1)
    else:
        prefix = struct.pack("<IB", 0, 0)
    length = HEADER.size + len(prefix) + len(payload)
    op = OP_REPLY if request.op_code == OP_QUERY else OP_MSG
    return HEADER.pack(length, reply_id, request.request_id, op) + prefix + payload

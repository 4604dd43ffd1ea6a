"""Frames on the wire, encoded once per encoding for a whole fan-out.

An event going to N sockets is serialised once per encoding (:meth:`Framer.prepare`); each
socket's writer then splices its own ``socket_sequence`` into those bytes
(:meth:`Framer.frame`), which costs a string concatenation instead of a full encode
(bench/ws_framing.py measures the difference).
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from typing import Any, Protocol

import msgpack

from bridge import Codec

SEQUENCE = "socket_sequence"
HEARTBEAT = {"type": "heartbeat"}


def _without_sequence(body: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in body.items() if k != SEQUENCE}


def _uint(n: int) -> bytes:
    """``n`` (0 <= n < 2**64) as msgpack encodes it."""
    if n < 0x80:
        return bytes((n,))
    if n <= 0xFF:
        return bytes((0xCC, n))
    if n <= 0xFFFF:
        return b"\xcd" + n.to_bytes(2, "big")
    if n <= 0xFFFFFFFF:
        return b"\xce" + n.to_bytes(4, "big")
    return b"\xcf" + n.to_bytes(8, "big")


class Framer(Protocol):
    name: str
    binary: bool

    def prepare(self, body: Mapping[str, Any]) -> Any:
        """``body`` serialised without a sequence, ready for :meth:`frame`."""

    def frame(self, prepared: Any, sequence: int) -> str | bytes:
        """The frame to send: ``prepared`` with ``socket_sequence`` = ``sequence``."""

    def heartbeat(self, sequence: int) -> str | bytes:
        """A heartbeat frame."""

    def decode(self, data: bytes) -> Any:
        """A client frame, decoded (raises :class:`bridge.DecodeError`)."""


class JsonFramer:
    """Text frames. ``{"socket_sequence":N,`` goes in front of the encoded object."""

    binary = False

    def __init__(self, codec: Codec) -> None:
        self.name = codec.name
        self._codec = codec
        self._heartbeat = self.prepare(HEARTBEAT)

    def prepare(self, body: Mapping[str, Any]) -> str:
        return self._codec.encode(_without_sequence(body)).decode()

    def frame(self, prepared: str, sequence: int) -> str:
        rest = prepared[1:]
        return f'{{"{SEQUENCE}":{sequence:d}{"," if rest != "}" else ""}{rest}'

    def heartbeat(self, sequence: int) -> str:
        return self.frame(self._heartbeat, sequence)

    def decode(self, data: bytes) -> Any:
        return self._codec.decode(data)


class MsgpackFramer:
    """Binary frames. The map header is rewritten to one more entry (once, in
    :meth:`prepare`) and the sequence pair goes in front of the encoded entries."""

    binary = True
    _KEY: bytes = msgpack.packb(SEQUENCE)

    def __init__(self, codec: Codec) -> None:
        self.name = codec.name
        self._codec = codec
        self._heartbeat = self.prepare(HEARTBEAT)

    def prepare(self, body: Mapping[str, Any]) -> tuple[bytes, bytes]:
        data = self._codec.encode(_without_sequence(body))
        first = data[0]
        if 0x80 <= first <= 0x8F:
            count, entries = first & 0x0F, data[1:]
        elif first == 0xDE:
            count, entries = struct.unpack(">H", data[1:3])[0], data[3:]
        elif first == 0xDF:
            count, entries = struct.unpack(">I", data[1:5])[0], data[5:]
        else:
            raise ValueError("a frame body must encode as a msgpack map")
        count += 1
        if count <= 0x0F:
            header = bytes((0x80 | count,))
        elif count <= 0xFFFF:
            header = b"\xde" + struct.pack(">H", count)
        else:
            header = b"\xdf" + struct.pack(">I", count)
        return header + self._KEY, entries

    def frame(self, prepared: tuple[bytes, bytes], sequence: int) -> bytes:
        head, entries = prepared
        return head + _uint(sequence) + entries

    def heartbeat(self, sequence: int) -> bytes:
        return self.frame(self._heartbeat, sequence)

    def decode(self, data: bytes) -> Any:
        return self._codec.decode(data)


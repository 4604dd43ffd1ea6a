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
    """Binary frames. The map header is rewritten to one more entry and the sequence pair
    goes in front of the encoded entries."""

    binary = True
    _KEY: bytes = msgpack.packb(SEQUENCE)

    def __init__(self, codec: Codec) -> None:
        self.name = codec.name
        self._codec = codec
        self._heartbeat = self.prepare(HEARTBEAT)

    def prepare(self, body: Mapping[str, Any]) -> tuple[int, bytes]:
        data = self._codec.encode(_without_sequence(body))
        first = data[0]
        if 0x80 <= first <= 0x8F:
            return first & 0x0F, data[1:]
        if first == 0xDE:
            return struct.unpack(">H", data[1:3])[0], data[3:]
        if first == 0xDF:
            return struct.unpack(">I", data[1:5])[0], data[5:]
        raise ValueError("a frame body must encode as a msgpack map")

    def frame(self, prepared: tuple[int, bytes], sequence: int) -> bytes:
        count, entries = prepared
        count += 1
        if count <= 0x0F:
            header = bytes((0x80 | count,))
        elif count <= 0xFFFF:
            header = b"\xde" + struct.pack(">H", count)
        else:
            header = b"\xdf" + struct.pack(">I", count)
        value: bytes = msgpack.packb(sequence)
        return header + self._KEY + value + entries

    def heartbeat(self, sequence: int) -> bytes:
        return self.frame(self._heartbeat, sequence)

    def decode(self, data: bytes) -> Any:
        return self._codec.decode(data)


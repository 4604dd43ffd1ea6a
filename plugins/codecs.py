"""Wire encodings: JSON (text) and msgpack (binary)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgpack

from bridge import Codec, DecodeError, hookimpl


def _json_encode(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def _json_decode(data: bytes) -> Any:
    try:
        return json.loads(data)
    except UnicodeDecodeError as e:
        raise DecodeError(f"not valid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DecodeError(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise DecodeError("not valid JSON: nested too deeply") from None


def _msgpack_encode(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _msgpack_decode(data: bytes) -> Any:
    try:
        return msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise DecodeError(f"not valid msgpack: {e}") from None
    except Exception as e:  # msgpack raises several unrelated types on hostile input
        raise DecodeError(f"not valid msgpack: {type(e).__name__}") from None


JSON = Codec("json", "application/json", False, _json_encode, _json_decode)
MSGPACK = Codec("msgpack", "application/msgpack", True, _msgpack_encode, _msgpack_decode)
MSGPACK_ALIAS = Codec("x-msgpack", "application/x-msgpack", True, _msgpack_encode, _msgpack_decode)


@hookimpl
def bridge_register_codecs(register: Callable[[Codec], None]) -> None:
    register(JSON)
    register(MSGPACK)
    register(MSGPACK_ALIAS)

"""Wire encodings: JSON (text) and msgpack (binary).

Decoding is strict, so that whatever decodes can be encoded again in either codec (the
message shapes are JSON's, whichever encoding carried them): JSON must be UTF-8 (no BOM, no
UTF-16/32 guessing), without ``NaN``/``Infinity``, numbers out of float range, integers
outside int64/uint64 (msgpack's range) or lone ``\\ud800``-style surrogates; msgpack may hold
only what JSON can (no binary, extension or timestamp values, string map keys, finite
floats). Any other input raises :class:`bridge.DecodeError` and nothing else
(tests/test_fuzz.py, fuzz/).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable
from typing import Any

import msgpack

from bridge import Codec, DecodeError, hookimpl

# One encoder and one decoder for every message: ``json.dumps``/``json.loads`` with options
# build a new one per call, about 0.8 µs and 1.8 µs of each call on the development VM.
_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def _json_encode(value: Any) -> bytes:
    return _ENCODER.encode(value).encode()


def _refuse_constant(name: str) -> Any:
    raise DecodeError(f"not valid JSON: {name} is not a JSON number")


#: The integers msgpack carries (int64 and uint64): a JSON client's integer must reach a
#: msgpack client too.
INT_MIN, INT_MAX = -(2**63), 2**64 - 1


def _bounded_int(text: str) -> int:
    value = int(text) if len(text) <= 21 else INT_MAX + 1  # no 4300-digit int() to parse
    if not INT_MIN <= value <= INT_MAX:
        raise DecodeError(f"not valid: integer {text[:24]} is out of range (int64/uint64)")
    return value


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise DecodeError(f"not valid JSON: {text[:20]} is out of range")
    return value


#: A ``\\uD800``-``\\uDFFF`` escape: the only way a JSON text can smuggle in a surrogate.
_ESCAPED_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]")
_SURROGATE = re.compile("[\ud800-\udfff]")


_DECODER = json.JSONDecoder(parse_constant=_refuse_constant, parse_float=_finite_float,
                            parse_int=_bounded_int)


def _json_decode(data: bytes) -> Any:
    if data.startswith(b"\xef\xbb\xbf"):  # json.loads said so; JSONDecoder.decode does not
        raise DecodeError("not valid JSON: it starts with a UTF-8 byte order mark")
    try:
        value = _DECODER.decode(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise DecodeError(f"not valid UTF-8 at byte {e.start}") from None
    except json.JSONDecodeError as e:
        raise DecodeError(f"not valid JSON: {e.msg} at line {e.lineno} column {e.colno}") from None
    except RecursionError:
        raise DecodeError("not valid JSON: nested too deeply") from None
    if _ESCAPED_SURROGATE.search(data):  # a valid pair is one character; a lone half is not
        _check_json_compatible(value, surrogates=True)
    return value


def _check_json_compatible(value: Any, *, surrogates: bool) -> None:
    """Raise DecodeError unless ``value`` holds only what JSON carries; with ``surrogates``
    also refuse strings holding a lone surrogate (JSON escapes can make them; strict UTF-8,
    which msgpack strings are decoded with, cannot). Iterative, so deep input cannot hit the
    recursion limit, and dispatching on exact types: it runs on every msgpack frame."""
    pending: list[Iterable[Any]] = [(value,)]
    while pending:
        for item in pending.pop():
            kind = type(item)
            if kind is str:
                if surrogates and _SURROGATE.search(item):
                    raise DecodeError("not valid: a string holds a lone UTF-16 surrogate")
            elif kind is dict:
                for key in item:
                    if type(key) is not str:
                        raise DecodeError(f"not valid: map keys must be strings, not "
                                          f"{type(key).__name__}")
                    if surrogates and _SURROGATE.search(key):
                        raise DecodeError("not valid: a key holds a lone UTF-16 surrogate")
                pending.append(item.values())
            elif kind is list:
                pending.append(item)
            elif kind is float:
                if not math.isfinite(item):
                    raise DecodeError(f"not valid: {item} is not a JSON number")
            elif not (kind is int or kind is bool or item is None):
                raise DecodeError(f"not valid: {kind.__name__} values have no JSON form")


def _msgpack_encode(value: Any) -> bytes:
    packed: bytes = msgpack.packb(value, use_bin_type=True)
    return packed


def _msgpack_decode(data: bytes) -> Any:
    try:
        value = msgpack.unpackb(data, raw=False, strict_map_key=True)
    except (ValueError, msgpack.ExtraData, msgpack.FormatError, msgpack.StackError) as e:
        raise DecodeError(f"not valid msgpack: {e}") from None
    except Exception as e:  # msgpack raises several unrelated types on hostile input
        raise DecodeError(f"not valid msgpack: {type(e).__name__}") from None
    _check_json_compatible(value, surrogates=False)
    return value


_TOKEN_CHARS = r"[!#$%&'*+.^_`|~0-9A-Za-z-]+"
_TOKEN = re.compile(_TOKEN_CHARS)
_PARAMETER = re.compile(rf"""\s*;\s*({_TOKEN_CHARS})=({_TOKEN_CHARS}|"(?:[^"\\]|\\.)*")\s*""")


def media_type(content_type: str) -> tuple[str, dict[str, str]]:
    """The media type of a ``Content-Type`` value, lower-cased, and its parameters (names
    lower-cased, quoted values unquoted), as RFC 9110 §8.3.1 defines them:
    ``Application/JSON; charset="UTF-8"`` is ``("application/json", {"charset": "UTF-8"})``.
    Raises :class:`bridge.DecodeError` on a value that is not one."""
    head, sep, rest = content_type.partition(";")
    kind, slash, sub = head.strip().partition("/")
    if not (_TOKEN.fullmatch(kind) and slash and _TOKEN.fullmatch(sub)):
        raise DecodeError(f"content type {content_type[:100]!r} is not a media type")
    params: dict[str, str] = {}
    pos, rest = 0, sep + rest
    while pos < len(rest):
        m = _PARAMETER.match(rest, pos)
        if m is None:
            raise DecodeError(f"content type {content_type[:100]!r} has a malformed"
                              f" parameter")
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[m.group(1).lower()] = value
        pos = m.end()
    return f"{kind}/{sub}".lower(), params


def codec_for(codecs: Callable[[str], Codec], content_type: str) -> Codec:
    """The codec of ``content_type``, matched as a media type (case-insensitive, parameters
    allowed), found by ``codecs`` (which raises KeyError for an unknown type). A ``charset``
    parameter must name UTF-8, the only one the codecs read. Raises
    :class:`bridge.DecodeError`."""
    kind, params = media_type(content_type)
    try:
        codec = codecs(kind)
    except KeyError:
        raise DecodeError(f"unsupported content type {content_type[:100]!r}") from None
    charset = params.get("charset")
    if charset is not None and charset.lower() not in ("utf-8", "utf8"):
        raise DecodeError(f"unsupported charset {charset[:40]!r} in content type"
                          f" {kind!r}: only utf-8 is read")
    return codec


JSON = Codec("json", "application/json", False, _json_encode, _json_decode)
MSGPACK = Codec("msgpack", "application/msgpack", True, _msgpack_encode, _msgpack_decode)
MSGPACK_ALIAS = Codec("x-msgpack", "application/x-msgpack", True, _msgpack_encode, _msgpack_decode)


@hookimpl
def bridge_register_codecs(register: Callable[[Codec], None]) -> None:
    register(JSON)
    register(MSGPACK)
    register(MSGPACK_ALIAS)

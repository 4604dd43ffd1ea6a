"""Property tests of frame decoding: hostile bytes only ever raise DecodeError, and whatever
decodes can be encoded again by either codec (so one client's frame cannot break the fan-out
to the others). Longer runs: fuzz/README.md."""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator
from strategies import (
    client_frames,
    client_updates,
    encoded,
    invalid_client_updates,
    json_values,
)

from bridge import Codec, DecodeError
from bridge_plugins.codecs import JSON, MSGPACK

CODECS = [JSON, MSGPACK]
fuzz_settings = settings(max_examples=400, suppress_health_check=[HealthCheck.too_slow])


def decode_or_refuse(codec: Codec, data: bytes) -> Any:
    """``codec.decode(data)``, or None when it raises DecodeError; anything else fails."""
    try:
        value = codec.decode(data)
    except DecodeError:
        return None
    for other in CODECS:  # what decodes must encode again, in both encodings
        assert other.decode(other.encode(value)) == value
    return value


@st.composite
def mangled(draw: st.DrawFn, codec: Codec) -> bytes:
    """A valid frame with a few bytes flipped, cut or inserted: near misses reach deeper
    into a decoder than random bytes do."""
    data = bytearray(draw(encoded(codec, client_frames())))
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(data)))
        how = draw(st.sampled_from(("flip", "cut", "insert")))
        if how == "flip" and at < len(data):
            data[at] = draw(st.integers(0, 255))
        elif how == "cut":
            del data[at:at + draw(st.integers(1, 8))]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@fuzz_settings
@given(data=st.binary(max_size=512))
@example(data=b"1" * 5000)               # int() digit limit: a ValueError
@example(data=b"18446744073709551616")   # 2**64: JSON carries it, msgpack cannot (atheris)
@example(data=b"-9223372036854775809")
@example(data=b'"\\ud800"')              # a lone surrogate cannot be encoded again
@example(data=b'["\\udfff", {"\\ud83d": 1}]')
@example(data=b"NaN")
@example(data=b"[1e999]")
@example(data=b"-Infinity")
@example(data=b"\xef\xbb\xbf{}")         # UTF-8 BOM
@example(data=b"\x00{\x00}")             # UTF-16 that json.loads(bytes) would guess
@example(data=b"[" * 100_000)            # recursion
@example(data=b"\x91" * 100_000)         # msgpack nesting
@example(data=b"\xdd\xff\xff\xff\xff")   # msgpack array claiming 4 G entries
@example(data=b"\xc7\x05\x01abcde")      # msgpack ext type
@example(data=b"\xd6\xff\x00\x00\x00\x01")  # msgpack timestamp
@example(data=b"\xc4\x03abc")            # msgpack bin
@example(data=b"\x81\xc4\x01k\x01")      # msgpack map with a binary key
@example(data=b"\x81\x01\x01")           # msgpack map with an integer key
@example(data=b"\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00")  # msgpack NaN
def test_arbitrary_bytes_decode_or_raise_decode_error(codec: Codec, data: bytes) -> None:
    decode_or_refuse(codec, data)


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@fuzz_settings
@given(st.data())
def test_mangled_frames_decode_or_raise_decode_error(codec: Codec, data: st.DataObject) -> None:
    decode_or_refuse(codec, data.draw(mangled(codec)))


@pytest.mark.parametrize("data", [
    b"1" * 5000, b"18446744073709551616", b"-9223372036854775809", b'"\\ud800"',
    b'{"a": "\\udc00"}', b"NaN", b"[1e999]", b"\xef\xbb\xbf{}",
    b"\x00{\x00}", b"[" * 100_000,
])
def test_hostile_json_is_refused(data: bytes) -> None:
    with pytest.raises(DecodeError):
        JSON.decode(data)


def test_a_byte_order_mark_is_named() -> None:
    with pytest.raises(DecodeError, match="byte order mark"):
        JSON.decode(b"\xef\xbb\xbf{}")


@pytest.mark.parametrize("value", [
    b"bin", {b"key": 1}, {1: 1}, float("nan"), float("inf"), msgpack.ExtType(1, b"x"),
    msgpack.Timestamp(1), [[[b"deep"]]],
], ids=repr)
def test_msgpack_values_json_cannot_carry_are_refused(value: Any) -> None:
    data = msgpack.packb(value, use_bin_type=True, strict_types=False)
    with pytest.raises(DecodeError):
        MSGPACK.decode(data)


def test_surrogate_pairs_and_integer_limits_are_fine() -> None:
    assert JSON.decode(b'{"t": "\\ud83d\\ude00"}') == {"t": "\N{GRINNING FACE}"}
    assert JSON.decode(b"[18446744073709551615, -9223372036854775808, 0, -0]") == [
        2**64 - 1, -(2**63), 0, 0]


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@given(value=json_values())
def test_round_trip(codec: Codec, value: Any) -> None:
    assert codec.decode(codec.encode(value)) == value


@pytest.mark.parametrize("codec", CODECS, ids=lambda c: c.name)
@given(frame=client_frames())
def test_client_frames_round_trip(codec: Codec, frame: dict[str, Any]) -> None:
    assert codec.decode(codec.encode(frame)) == frame


#: The client update contract (SPEC section 2, the seed's item schema), as a reference for the
#: strategies until the validation plugin lands.
CLIENT_UPDATE = {
    "type": "object",
    "required": ["type", "message"],
    "properties": {
        "type": {"const": "update"},
        "message": {"type": "array", "minItems": 1, "items": {
            "type": "object",
            "additionalProperties": False,
            "required": ["type", "text"],
            "properties": {"type": {"enum": ["message", "chat_event"]}, "text": {"type": "string"},
                           "sender": {"type": "string"}, "send_date": {"type": "integer"}}}},
    },
}


def broken_fields(frame: Any) -> set[str]:
    """The dotted fields the reference schema names in its errors about ``frame``."""
    fields = set()
    for error in Draft202012Validator(CLIENT_UPDATE).iter_errors(frame):
        path = [str(p) for p in error.absolute_path]
        if error.validator == "required":
            path += [n for n in error.validator_value if n not in error.instance][:1]
        elif error.validator == "additionalProperties":
            path += sorted(set(error.instance) - set(error.schema["properties"]))[:1]
        fields.add(".".join(path))
    return fields


@given(update=client_updates())
def test_client_updates_keep_the_contract(update: dict[str, Any]) -> None:
    assert broken_fields(update) == set()


@given(case=invalid_client_updates())
def test_invalid_client_updates_break_the_field_they_name(case: tuple[dict[str, Any], str]
                                                          ) -> None:
    frame, field = case
    assert field in broken_fields(frame)
    for codec in CODECS:  # still decodable: the contract, not the codec, must refuse it
        assert codec.decode(codec.encode(frame)) == frame

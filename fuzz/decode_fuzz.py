"""atheris (libFuzzer) harness: hostile client frames against the codecs.

The first byte picks the codec (even: JSON, odd: msgpack), the rest is the frame. The
property is the one tests/test_fuzz.py checks with hypothesis, for longer runs: a frame
either raises :class:`bridge.DecodeError` or decodes to a value that both codecs encode and
decode back unchanged (so one client's frame cannot break the fan-out to other sockets).
Anything else is a crash that libFuzzer saves as ``crash-<sha1>``. See fuzz/README.md.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports():
    from bridge import DecodeError
    from bridge_plugins.codecs import JSON, MSGPACK

CODECS = (JSON, MSGPACK)


def test_one_input(data: bytes) -> None:
    if not data:
        return
    codec, frame = CODECS[data[0] % len(CODECS)], data[1:]
    try:
        value = codec.decode(frame)
    except DecodeError:
        return
    for other in CODECS:
        again = other.decode(other.encode(value))
        if again != value:
            raise AssertionError(f"{codec.name} frame {frame!r}: {other.name} round trip "
                                 f"changed {value!r} into {again!r}")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

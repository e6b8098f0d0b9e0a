"""The message codec: what a client sends is classified into the documented error codes, and nothing a
client sends can make the decoder fail in an undocumented way."""

from __future__ import annotations

import contextlib

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from inference.protocol import (
    FRAME_HEADER_BYTES,
    MAX_RENDER_MS,
    MAX_TEXT_MESSAGE_BYTES,
    MAX_WAITED_MS,
    Error,
    ErrorCode,
    Hello,
    Params,
    ProtocolError,
    Ready,
    RenderMode,
    Usage,
    Warming,
    decode_client_message,
    decode_server_message,
    encode_message,
    pack_frame,
    unpack_frame,
)


def test_client_messages_decode_to_their_structs() -> None:
    assert decode_client_message('{"type": "hello", "ticket": "abc"}') == Hello(ticket="abc")
    assert decode_client_message('{"type": "params", "prompt": "anime", "steps": 4, "seed": 7}') == Params(
        prompt="anime", steps=4, seed=7
    )
    # Omitted and null fields both mean "unchanged"; unknown fields are ignored for forward compatibility.
    assert decode_client_message('{"type": "params", "steps": 1, "extra": true}') == Params(steps=1)
    assert decode_client_message('{"type": "params", "prompt": null}') == Params()


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", ErrorCode.BAD_JSON),
        ("{", ErrorCode.BAD_JSON),
        ('"hello"', ErrorCode.BAD_JSON),
        ('{"ticket": "abc"}', ErrorCode.BAD_JSON),
        ('{"type": 3}', ErrorCode.BAD_JSON),
        ('{"type": "frame"}', ErrorCode.UNKNOWN_TYPE),
        ('{"type": "params", "steps": 0}', ErrorCode.BAD_PARAMS),
        ('{"type": "params", "steps": 5}', ErrorCode.BAD_PARAMS),
        ('{"type": "params", "steps": 2.5}', ErrorCode.BAD_PARAMS),
        ('{"type": "params", "seed": -1}', ErrorCode.BAD_PARAMS),
        ('{"type": "params", "seed": 4294967296}', ErrorCode.BAD_PARAMS),
        ('{"type": "params", "prompt": 12}', ErrorCode.BAD_PARAMS),
        ('{"type": "hello", "ticket": 12}', ErrorCode.BAD_JSON),
    ],
)
def test_bad_client_messages_get_stable_error_codes(text: str, code: ErrorCode) -> None:
    with pytest.raises(ProtocolError) as raised:
        decode_client_message(text)
    assert raised.value.code is code


def test_prompt_limit_counts_characters_not_bytes() -> None:
    assert decode_client_message(msgspec.json.encode({"type": "params", "prompt": "é" * 500})) == Params(
        prompt="é" * 500
    )
    with pytest.raises(ProtocolError) as raised:
        decode_client_message(msgspec.json.encode({"type": "params", "prompt": "é" * 501}))
    assert raised.value.code is ErrorCode.BAD_PARAMS


def test_oversized_text_messages_are_refused_before_parsing() -> None:
    with pytest.raises(ProtocolError) as raised:
        decode_client_message('{"type": "params", "prompt": "' + "a" * MAX_TEXT_MESSAGE_BYTES + '"}')
    assert raised.value.code is ErrorCode.MESSAGE_TOO_LARGE


def test_server_messages_are_json_tagged_by_type() -> None:
    mode = RenderMode(id="preview", label="Preview", approximate=False, detail="filters")
    ready = Ready(
        engine="preview", model="Preview filters", worker_id="w1", preview=True, modes=[mode], mode="preview"
    )
    assert msgspec.json.decode(encode_message(ready)) == {
        "type": "ready",
        "engine": "preview",
        "model": "Preview filters",
        "worker_id": "w1",
        "preview": True,
        "modes": [{"id": "preview", "label": "Preview", "approximate": False, "detail": "filters"}],
        "mode": "preview",
        "pace": False,
        "adapters": [],  # a worker without LoRA adapters serves none
        "adapter": None,
        "adapter_scale": None,
    }
    assert encode_message(Warming()) == '{"type":"warming"}'
    assert msgspec.json.decode(encode_message(Error(code=ErrorCode.NOT_JPEG, message="m"))) == {
        "type": "error",
        "code": "not_jpeg",
        "message": "m",
        "frame": None,
    }
    for message in (ready, Warming(), Usage(seconds_used=3, seconds_remaining=57)):
        assert decode_server_message(encode_message(message)) == message


def test_frame_header_is_an_id_and_two_millisecond_counts_little_endian() -> None:
    packed = pack_frame(0x01020304, b"\xff\xd8jpeg", render_ms=260, waited_ms=7)
    assert packed[:FRAME_HEADER_BYTES] == bytes([4, 3, 2, 1, 260 % 256, 1, 7, 0])
    assert unpack_frame(packed) == (0x01020304, 260, 7, b"\xff\xd8jpeg")
    # A negative wait (the engine was idle when the frame came) is two's complement.
    assert pack_frame(1, b"", waited_ms=-2)[6:8] == bytes([0xFE, 0xFF])
    # Input frames carry zeros; times beyond the header's range are reported as its bounds.
    assert unpack_frame(pack_frame(5, b"")) == (5, 0, 0, b"")
    limited = unpack_frame(pack_frame(5, b"", render_ms=70_000, waited_ms=-40_000))
    assert limited == (5, MAX_RENDER_MS, -MAX_WAITED_MS, b"")
    with pytest.raises(ProtocolError) as raised:
        unpack_frame(b"\x00" * (FRAME_HEADER_BYTES - 1))
    assert raised.value.code is ErrorCode.BAD_FRAME


@given(st.text(max_size=300) | st.binary(max_size=300))
def test_no_client_text_crashes_the_decoder(data: str | bytes) -> None:
    with contextlib.suppress(ProtocolError):  # the only exception it may raise
        decode_client_message(data)


@given(
    st.integers(0, 2**32 - 1),
    st.binary(max_size=64),
    st.integers(0, MAX_RENDER_MS),
    st.integers(-MAX_WAITED_MS, MAX_WAITED_MS),
)
def test_frames_round_trip(frame_id: int, payload: bytes, render_ms: int, waited_ms: int) -> None:
    packed = pack_frame(frame_id, payload, render_ms=render_ms, waited_ms=waited_ms)
    assert unpack_frame(packed) == (frame_id, render_ms, waited_ms, payload)

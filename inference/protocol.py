"""The worker's wire protocol, defined once: WebSocket messages, binary frame framing, close codes, limits,
render modes and the usage report the worker posts to the app. docs/protocol.md describes the same thing
for humans and JS; everything else (engines, the worker, the app, the tools) takes it from here.

Text messages are JSON objects tagged by their "type" field. Binary messages are video frames: an 8-byte
little-endian header followed by JPEG bytes. A client's binary message whose header says
``BinaryKind.STYLE_IMAGE`` carries the session's style image (JPEG, PNG or WebP bytes) instead.
"""

from __future__ import annotations

import struct
from enum import IntEnum, StrEnum
from typing import Annotated, Final, NamedTuple

import msgspec

# Limits a client must respect; anything beyond is answered with an `error` and the session goes on.
MAX_PROMPT_CHARS: Final = 500
MIN_STEPS: Final = 1
MAX_STEPS: Final = 4
DEFAULT_STEPS: Final = 2
MAX_SEED: Final = 2**32 - 1  # every UI and generator agrees on uint32; larger values lose precision in JS
MAX_FRAME_JPEG_BYTES: Final = 1024 * 1024
MAX_TEXT_MESSAGE_BYTES: Final = 16 * 1024  # a 500-char prompt is at most ~3 KiB of escaped JSON
# Flow control: a client keeps at most this many of its frames unacknowledged (`Ack`).
MAX_UNACKED: Final = 2
# A client never sends more input frames a second than this, nor more than its camera produces
# (docs/protocol.md, "Flow control"). 60 is the fastest common webcam; a mode that renders faster than 30
# frames a second shows that rate to one viewer only through a camera that keeps up.
MAX_CLIENT_FPS: Final = 60
# What a webcam usually delivers: the load generator's camera, unless told otherwise.
TYPICAL_CAMERA_FPS: Final = 30
# Output frames are OUTPUT_SIZE x OUTPUT_SIZE JPEGs; input frames are center-cropped and resized to it.
OUTPUT_SIZE: Final = 512
# Style images (client -> worker, a binary message of kind STYLE_IMAGE): the file's bytes, which a browser
# resizes before sending; a WebSocket message on Modal is at most 2 MiB, header included.
MAX_STYLE_IMAGE_BYTES: Final = 2 * 1024 * 1024 - 64
MAX_STYLE_IMAGE_SIDE: Final = 4096  # pixels, either dimension, as the image's header declares them
STYLE_IMAGE_FORMATS: Final = ("JPEG", "PNG", "WEBP")  # Pillow's names
# The worker center-crops a style image to a square and resizes it to this side before engines see it.
STYLE_IMAGE_SIZE: Final = 512
# A render mode's id as it travels in `params` and `ready` messages and worker settings.
MODE_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9-]{0,31}$"
# A LoRA adapter's name as FLUX2_LORAS gives it and `params.adapter` chooses it, and the range of its scale
# (0: no effect, 1: as trained, 2: twice as strong).
ADAPTER_ID_PATTERN: Final = r"^[a-z0-9][a-z0-9_-]{0,31}$"
MIN_ADAPTER_SCALE: Final = 0.0
MAX_ADAPTER_SCALE: Final = 2.0

# Binary frame header, both directions, little-endian: uint32 frame id, uint16 render milliseconds, int16
# waited milliseconds. Input frames: the client picks the id (the worker echoes it) and sends zeros.
# Output frames: the id of the input frame they were rendered from, how long the render took, and how long
# that frame waited for the engine after it arrived, negative when the engine had been idle that long when
# it arrived (what a pacing client steers by, docs/protocol.md).
FRAME_HEADER: Final = struct.Struct("<IHh")
FRAME_HEADER_BYTES: Final = FRAME_HEADER.size
MAX_FRAME_ID: Final = 2**32 - 1
MAX_RENDER_MS: Final = 2**16 - 1  # longer renders are reported as this
MAX_WAITED_MS: Final = 2**15 - 1  # longer waits (and idle times) are reported as this (and its negative)
# Byte offset of the uint16 that says what a client's binary message is (BinaryKind); in output frames the
# same field is the render time.
BINARY_KIND_AT: Final = 4


class BinaryKind(IntEnum):
    """What a client's binary message carries, from its header's uint16 at BINARY_KIND_AT."""

    FRAME = 0  # a video frame (JPEG)
    STYLE_IMAGE = 1  # the session's style image (JPEG/PNG/WebP file bytes); the frame id field is ignored


Prompt = Annotated[str, msgspec.Meta(max_length=MAX_PROMPT_CHARS)]
Steps = Annotated[int, msgspec.Meta(ge=MIN_STEPS, le=MAX_STEPS)]
Seed = Annotated[int, msgspec.Meta(ge=0, le=MAX_SEED)]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]
ModeId = Annotated[str, msgspec.Meta(pattern=MODE_ID_PATTERN)]
AdapterId = Annotated[str, msgspec.Meta(pattern=ADAPTER_ID_PATTERN)]
AdapterScale = Annotated[float, msgspec.Meta(ge=MIN_ADAPTER_SCALE, le=MAX_ADAPTER_SCALE)]


class CloseCode(IntEnum):
    NORMAL = 1000
    GOING_AWAY = 1001  # the worker is shutting down; reconnect with a new ticket
    INTERNAL_ERROR = 1011  # the engine failed to load; the worker cannot render
    TRY_AGAIN_LATER = 1013  # the app could not confirm the stream's claim; reconnect with a new ticket
    BAD_TICKET = 4401  # first message was not a valid, unexpired, unused `hello` ticket
    ALLOWANCE_USED = 4402  # the ticket's allowance of billable seconds is used up
    HELLO_TIMEOUT = 4408  # no `hello` within HELLO_TIMEOUT_SECONDS of connecting
    IDLE = 4410  # no frame for IDLE_TIMEOUT_SECONDS; the reservation is released, resume with a new ticket
    WORKER_FULL = 4503  # another session would drop every session below MIN_SESSION_FPS: try another worker


class ErrorCode(StrEnum):
    """Stable codes of `error` messages. None of them ends the session."""

    BAD_JSON = "bad_json"  # a text message that is not a JSON object with a string "type"
    UNKNOWN_TYPE = "unknown_type"  # a "type" this worker does not know
    BAD_PARAMS = "bad_params"  # a `params` message with an invalid field; nothing of it was applied
    UNEXPECTED_HELLO = "unexpected_hello"  # `hello` after the session was already authenticated
    MESSAGE_TOO_LARGE = "message_too_large"  # a text message over MAX_TEXT_MESSAGE_BYTES
    BAD_FRAME = "bad_frame"  # a binary message shorter than the frame header
    NOT_JPEG = "not_jpeg"  # the frame's payload is not a baseline/progressive JPEG
    FRAME_TOO_LARGE = "frame_too_large"  # over MAX_FRAME_JPEG_BYTES, or pixel dimensions too large
    RENDER_FAILED = "render_failed"  # the engine could not render this frame; later frames may work
    BAD_STYLE_IMAGE = "bad_style_image"  # empty, not a JPEG/PNG/WebP picture, or corrupt; the old one stays
    STYLE_IMAGE_TOO_LARGE = "style_image_too_large"  # over MAX_STYLE_IMAGE_BYTES or MAX_STYLE_IMAGE_SIDE
    BAD_BINARY_KIND = "bad_binary_kind"  # a binary message of a kind this worker does not know


class RenderMode(msgspec.Struct, frozen=True, kw_only=True):
    """One way an engine can render, offered to the user in `ready`. An engine's first mode is its default,
    and it is the fastest one that reproduces the model's reference pipeline (within rounding); modes that
    trade fidelity for speed say so with ``approximate`` and explain the trade in ``detail``."""

    id: ModeId  # "exact", "fast", "turbo", "preview"
    label: str  # short, for a select box: "Exact", "Fast"
    approximate: bool  # True: output differs from the reference pipeline by more than rounding
    detail: str  # one sentence for a tooltip/help text: what it changes and what it costs


class AdapterInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A LoRA style adapter the worker serves, offered in `ready`."""

    name: str  # what `params.adapter` chooses
    scale: float  # the default strength, used until the session sets `adapter_scale`
    trigger: str = ""  # words appended to the prompt (after ", ") while the adapter is active


# ---- client -> worker (text) ----


class Hello(msgspec.Struct, tag="hello", tag_field="type", frozen=True):
    """Must be the first message, within HELLO_TIMEOUT_SECONDS."""

    ticket: str


class Params(msgspec.Struct, tag="params", tag_field="type", frozen=True):
    """Style settings for the frames sent after it. Omitted (or null) fields keep their current value."""

    prompt: Prompt | None = None
    steps: Steps | None = None
    seed: Seed | None = None
    mode: ModeId | None = None  # one of the `modes` ids in `ready`; an unknown id is a bad_params error
    # One of the `adapters` names in `ready` (an unknown one is a bad_params error), or null for none.
    # Unlike the other fields, null is a value here: only an omitted `adapter` keeps the current one.
    adapter: AdapterId | msgspec.UnsetType | None = msgspec.UNSET
    # The adapter's strength; null or omitted keeps the current one. Choosing another adapter without a
    # scale resets it to that adapter's default.
    adapter_scale: AdapterScale | None = None


class ClearStyle(msgspec.Struct, tag="clear_style", tag_field="type", frozen=True):
    """Drop the session's style image: frames sent after it are styled by the prompt alone."""


ClientMessage = Hello | Params | ClearStyle


# ---- worker -> client (text) ----


class Admitted(msgspec.Struct, tag="admitted", tag_field="type", frozen=True):
    """The worker's first message: it has a place for this connection, so the client may now get a ticket
    and send `hello` (within HELLO_TIMEOUT_SECONDS). A full worker closes with 4503 instead, before the
    client has spent a ticket on it."""

    worker_id: str


class Warming(msgspec.Struct, tag="warming", tag_field="type", frozen=True):
    """The model is loading. Frames sent now are kept (the latest one) and rendered once ready; not billed."""


class Ready(msgspec.Struct, tag="ready", tag_field="type", frozen=True):
    engine: str  # "preview", "flux2"
    model: str  # human label of what produces the pixels, e.g. "FLUX.2 [klein] 4B"
    worker_id: str
    preview: bool  # True: classical filters standing in for the model; the UI must say so
    modes: list[RenderMode]  # what `params.mode` may choose; the first is the default
    mode: str  # the session's current mode
    # True: the worker renders one frame per engine call, and a client should pace its frames to arrive
    # just before its turn (docs/protocol.md, "Pacing"). False: it batches sessions, and a client should
    # send at camera rate so that a frame of every session waits at each batch boundary.
    pace: bool = False
    adapters: list[AdapterInfo] = msgspec.field(default_factory=list)  # what `params.adapter` may choose
    adapter: str | None = None  # the session's current adapter
    adapter_scale: float | None = None  # its current scale


class Ack(msgspec.Struct, tag="ack", tag_field="type", frozen=True):
    """Input frame `frame` arrived and is now the session's waiting frame. It is rendered when the engine
    is next free unless a newer frame replaces it first (latest frame wins); either way the client may
    count it as off the wire. Flow control: a client keeps at most MAX_UNACKED frames unacknowledged."""

    frame: int
    # How long one round of the sessions streaming on this worker takes, each rendering one frame (at what
    # its latest frames cost; a session whose camera is slower than its turns, only the turns it uses), over
    # the engine replicas: how often a paced client gets a turn (docs/protocol.md, "Pacing"). 0 when the
    # worker does not know yet (nothing rendered) or batches sessions (`ready.pace` is false).
    round_ms: NonNegative = 0


class Usage(msgspec.Struct, tag="usage", tag_field="type", frozen=True):
    seconds_used: int  # billable seconds of this stream so far
    seconds_remaining: int  # of the ticket's allowance


class Error(msgspec.Struct, tag="error", tag_field="type", frozen=True):
    code: ErrorCode
    message: str
    frame: int | None = None  # the input frame this answers, when it is about one (it gets no output)


class StyleImageState(msgspec.Struct, tag="style_image", tag_field="type", frozen=True):
    """The session's style image changed: set (from a STYLE_IMAGE message) or cleared. Frames sent after the
    message that changed it are rendered with the new state."""

    active: bool
    width: int = 0  # of the picture as sent, when active
    height: int = 0


ServerMessage = Admitted | Warming | Ready | Ack | Usage | Error | StyleImageState


# ---- worker -> app (HTTP) ----


class UsageReport(msgspec.Struct, frozen=True, kw_only=True):
    """Body of `POST USAGE_REPORT_URL`. `seconds` is CUMULATIVE for the stream: the app keeps the maximum
    it has seen per stream_id, so retries, reordering and duplicates can never double-bill."""

    stream_id: str
    user_id: str
    worker_id: str
    seconds: NonNegative
    final: bool  # the stream has ended; no further report for this stream_id follows
    sent_at: float  # worker's Unix time when this attempt was signed


class StreamClaim(msgspec.Struct, frozen=True, kw_only=True):
    """Body of `POST STREAM_CLAIM_URL`, signed like a usage report: before it sends `ready`, the worker asks
    the app to mark the ticket's stream as served. The app grants each stream to one connection, on
    whichever worker it arrives first (200); any other claim for it is refused (409), so a ticket streams
    once across every worker."""

    stream_id: str
    user_id: str
    worker_id: str
    ticket_id: str
    sent_at: float  # worker's Unix time when this attempt was signed


# ---- codecs ----

_client_decoder: Final = msgspec.json.Decoder(ClientMessage)
_encoder: Final = msgspec.json.Encoder()
_CLIENT_TYPES: Final = frozenset({"hello", "params", "clear_style"})


class ProtocolError(Exception):
    """A client message the worker rejects; `code` is what the client is told."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def decode_client_message(data: str | bytes) -> Hello | Params | ClearStyle:
    """Parse one text message, classifying failures into the stable error codes."""
    raw = data.encode() if isinstance(data, str) else data
    if len(raw) > MAX_TEXT_MESSAGE_BYTES:
        raise ProtocolError(
            ErrorCode.MESSAGE_TOO_LARGE, f"text messages are limited to {MAX_TEXT_MESSAGE_BYTES} bytes"
        )
    try:
        return _client_decoder.decode(raw)
    except msgspec.ValidationError as exc:
        # Valid JSON of the wrong shape: tell "what is this type?" apart from "bad field of a known type".
        try:
            loose = msgspec.json.decode(raw)
        except msgspec.DecodeError:  # e.g. "0:" fails the type check before the syntax check
            raise ProtocolError(ErrorCode.BAD_JSON, "not valid JSON") from exc
        kind = loose.get("type") if isinstance(loose, dict) else None
        if not isinstance(kind, str):
            raise ProtocolError(ErrorCode.BAD_JSON, 'expected a JSON object with a string "type"') from exc
        if kind not in _CLIENT_TYPES:
            raise ProtocolError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {kind!r}") from exc
        code = ErrorCode.BAD_PARAMS if kind == "params" else ErrorCode.BAD_JSON
        raise ProtocolError(code, f"invalid {kind!r} message: {exc}") from exc
    except msgspec.DecodeError as exc:
        raise ProtocolError(ErrorCode.BAD_JSON, f"not valid JSON: {exc}") from exc


def encode_message(message: ServerMessage | ClientMessage) -> str:
    return _encoder.encode(message).decode()


def decode_server_message(
    data: str | bytes,
) -> Admitted | Warming | Ready | Ack | Usage | Error | StyleImageState:
    """For clients written in Python (tests, load generators)."""
    return msgspec.json.decode(data, type=ServerMessage)


class Frame(NamedTuple):
    frame_id: int
    render_ms: int  # output frames: how long the render took; input frames: 0
    waited_ms: int  # output frames: how long the input waited for the engine (< 0: idle); input frames: 0
    jpeg: bytes


def pack_frame(frame_id: int, jpeg: bytes, render_ms: int = 0, waited_ms: int = 0) -> bytes:
    render_ms = min(max(render_ms, 0), MAX_RENDER_MS)
    waited_ms = min(max(waited_ms, -MAX_WAITED_MS), MAX_WAITED_MS)
    return FRAME_HEADER.pack(frame_id, render_ms, waited_ms) + jpeg


def unpack_frame(data: bytes) -> Frame:
    """Raises ProtocolError(BAD_FRAME) when there is no header."""
    if len(data) < FRAME_HEADER_BYTES:
        raise ProtocolError(
            ErrorCode.BAD_FRAME, f"binary messages start with a {FRAME_HEADER_BYTES}-byte frame header"
        )
    return Frame(*FRAME_HEADER.unpack_from(data), data[FRAME_HEADER_BYTES:])


def binary_kind(data: bytes) -> int:
    """The BinaryKind value of a client's binary message (any uint16; unknown ones are the caller's error).
    Raises ProtocolError(BAD_FRAME) when there is no header."""
    return unpack_frame(data).render_ms


def pack_style_image(image: bytes) -> bytes:
    """A client's style image message: the frame header with kind STYLE_IMAGE, then the file's bytes."""
    return FRAME_HEADER.pack(0, BinaryKind.STYLE_IMAGE, 0) + image

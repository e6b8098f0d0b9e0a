"""One client's WebSocket session: authentication, per-session settings, frame intake, delivery, billing.

Two tasks per connection: the handler's task reads from the socket, and a sender task owns every write
(results, text messages, the close), so nothing writes to the socket concurrently and a slow client only
delays its own frames. Results waiting for the sender are latest-wins too: at most one is ever held.

Flow control: every valid input frame is acknowledged (`ack`) as soon as it is the session's waiting frame,
and every rejected one is answered with an `error` naming it; a client keeps at most two frames
unacknowledged. Text messages are written before any waiting result, so a frame's `ack` always precedes
its output.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import re
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import msgspec
from litestar.connection import WebSocket
from litestar.exceptions import WebSocketDisconnect

from inference.admission import Admission
from inference.billable_time import BillingMeter, Clock
from inference.claims import ClaimOutcome
from inference.config import WorkerConfig
from inference.engines import is_preview
from inference.engines.base import Engine, FrameJob, mode_ids, served_adapters
from inference.imaging import ImageTooLarge, InvalidJpeg, inspect_jpeg
from inference.metrics import WorkerMetrics
from inference.protocol import (
    FRAME_HEADER_BYTES,
    MAX_FRAME_JPEG_BYTES,
    MODE_ID_PATTERN,
    Ack,
    BinaryKind,
    ClearStyle,
    CloseCode,
    Error,
    ErrorCode,
    Hello,
    Params,
    ProtocolError,
    Ready,
    ServerMessage,
    StyleImageState,
    Usage,
    Warming,
    binary_kind,
    decode_client_message,
    encode_message,
    pack_frame,
    unpack_frame,
)
from inference.scheduler import RenderResult, Scheduler
from inference.style_image import StyleImage, decode_style_image
from inference.tickets import Ticket, TicketError, verify_ticket
from inference.usage_reporter import ReportedStream, UsageReporter

log = logging.getLogger(__name__)

# How often the sender wakes up without news, to notice an allowance that ran out while no frame came.
TICK_SECONDS: Final = 0.2
# Acks and errors queued beyond this are dropped, so a client that floods frames or garbage without reading
# its socket cannot grow our memory. A client that follows the flow control has at most two acks queued.
MAX_QUEUED_MESSAGES: Final = 64
# A session that sent no frame for this long is not streaming (a hidden tab, a stall): its turns are not
# part of the round that paced clients are told. Also the longest gap between frames that counts towards
# its frame interval.
STREAMING_GAP_SECONDS: Final = 2.0
# Share of each new gap in the running average of the time between a session's frames.
FRAME_INTERVAL_SMOOTHING: Final = 0.25
# A session whose frames come more than this many of the rounds it was told apart uses only some of its
# turns (its camera is slower than its share). Within it, it is taken to use every turn: a paced session's
# frames come once a round, give or take its corrections, and counting only part of its turns would tell
# every session a round shorter than it is. Compared with the running average of the rounds it was told
# (smoothed like its frame interval), not with the round now: after another session leaves, its frames
# come at the old, longer round for a few more frames, and both averages follow the change alike.
SLOW_STREAM_ROUNDS: Final = 1.5
# A session's cost per frame is the median of its latest frames (its prompt, steps and style image cost
# what they cost), once it has this many; before that, its mode's median across the worker.
OWN_COST_FRAMES: Final = 5
MIN_OWN_COST_FRAMES: Final = 3
# Close reasons are limited to 123 bytes by RFC 6455.
MAX_CLOSE_REASON: Final = 120
_session_ids = itertools.count(1)
_MODE_ID: Final = re.compile(MODE_ID_PATTERN)

# What writing to a socket whose client is gone raises.
SOCKET_ERRORS: Final = (WebSocketDisconnect, OSError, RuntimeError)


@dataclass(frozen=True, slots=True)
class SessionServices:
    """The parts of the worker a session works with, fixed from the worker's start to its stop."""

    config: WorkerConfig
    scheduler: Scheduler  # renders the session's frames
    metrics: WorkerMetrics
    admission: Admission  # told how long each frame of a mode took to render
    reporter: UsageReporter | None  # posts the stream's billable seconds to the app; None: not reported
    clock: Clock  # the billing clock
    # How long a round of the worker's streaming sessions takes (Admission.round_seconds); None: not known.
    round_seconds: Callable[[], float | None] = lambda: None


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


def _smoothed(average: float | None, sample: float) -> float:
    """A running average (FRAME_INTERVAL_SMOOTHING) with `sample` taken in; the first sample starts it."""
    return sample if average is None else average + FRAME_INTERVAL_SMOOTHING * (sample - average)


def _unknown_mode(mode: str, engine: Engine) -> str:
    offered = ", ".join(repr(option.id) for option in engine.modes)
    return f"unknown mode {mode!r}; the {engine.name} engine offers {offered}"


def _unknown_adapter(adapter: str, engine: Engine) -> str:
    offered = ", ".join(repr(info.name) for info in served_adapters(engine)) or "none"
    return f"unknown adapter {adapter!r}; this worker serves {offered}"


def requested_mode(socket: WebSocket) -> str | None:
    """The mode the session will start in (`/ws?mode=turbo`), so admission counts what it will really cost;
    None (the engine's default) when absent or not a mode id."""
    mode = socket.query_params.get("mode")
    if mode is not None and not _MODE_ID.match(mode):
        return None
    return mode


async def close_socket(socket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(*SOCKET_ERRORS):
        await socket.close(code=code, reason=reason.encode()[:MAX_CLOSE_REASON].decode(errors="ignore"))


async def authenticate(
    socket: WebSocket, config: WorkerConfig, claim: Callable[[Ticket], Awaitable[ClaimOutcome]]
) -> Ticket | None:
    """Wait for `hello` and `claim` its ticket; close with 4408 (too slow), 4401 (anything but a valid,
    unused ticket) or 1013 (the claim could not be decided) and return None instead."""
    timeout = config.hello_timeout_seconds
    try:
        event = await asyncio.wait_for(socket.receive(), timeout=timeout)
    except TimeoutError:
        await close_socket(socket, CloseCode.HELLO_TIMEOUT, f"send hello within {timeout:g} s")
        return None
    except WebSocketDisconnect:
        return None
    if event["type"] != "websocket.receive":
        return None
    text = event.get("text")
    if text is None:
        await close_socket(socket, CloseCode.BAD_TICKET, "the first message must be hello")
        return None
    try:
        message = decode_client_message(text)
    except ProtocolError:
        message = None
    if not isinstance(message, Hello):
        await close_socket(socket, CloseCode.BAD_TICKET, "the first message must be hello")
        return None
    try:
        ticket = verify_ticket(config.stream_secret, message.ticket)
    except TicketError as exc:
        await close_socket(socket, CloseCode.BAD_TICKET, str(exc))
        return None
    outcome = await claim(ticket)
    if outcome is ClaimOutcome.REFUSED:
        await close_socket(socket, CloseCode.BAD_TICKET, "ticket already used")
        return None
    if outcome is ClaimOutcome.UNAVAILABLE:
        await close_socket(socket, CloseCode.TRY_AGAIN_LATER, "the stream could not be claimed; try again")
        return None
    return ticket


class StreamSession:
    def __init__(
        self, services: SessionServices, socket: WebSocket, ticket: Ticket, *, mode: str | None = None
    ) -> None:
        self.services = services
        self.socket = socket
        self.ticket = ticket
        self.session_id = f"{ticket.stream_id}#{next(_session_ids)}"
        self.meter = BillingMeter(ticket.allowance_seconds)
        self.prompt = ""
        self.steps = services.config.default_steps
        self.seed = 0
        self.mode = ""  # a mode id of the engine, validated; "" is the engine's default (its first mode)
        # The LoRA adapter (validated against the engine's; None: none) and its scale (None: its default).
        self.adapter: str | None = None
        self.adapter_scale: float | None = None
        # The session's own style image, in every job it submits; the engine's encoding of it lives as long
        # as this reference (and the jobs holding it) does, so it goes when the session ends.
        self.style: StyleImage | None = None
        self.engine: Engine | None = None  # None while the worker is warming
        # Asked for at connect or while warming; validated once the engine is ready (at once if it is).
        self._requested_mode: str | None = mode
        self._outbox: deque[ServerMessage | _Close] = deque()
        self._result: RenderResult | None = None
        self._wakeup = asyncio.Event()
        self._finished = False
        self._usage: ReportedStream | None = None
        # Monotonic time of the last valid frame (or of the start): the idle timeout counts from it.
        self._last_frame_at = time.monotonic()
        self._frames = 0
        # Running average of the time between its valid frames; None until there are two.
        self.frame_interval: float | None = None
        self._told_round: float | None = None  # running average of the rounds its acks said, in seconds
        self._costs: deque[float] = deque(maxlen=OWN_COST_FRAMES)  # replica seconds of its latest frames
        self.ended = asyncio.Event()

    async def run(self, engine: Engine | None = None) -> None:
        """Serve the session until it ends. ``engine``: the worker's engine if it is ready, else None
        (``engine_ready`` follows)."""
        services = self.services
        services.metrics.sessions.inc()
        if services.reporter is not None:
            self._usage = services.reporter.open(self.ticket, lambda: self.meter.seconds_used)
        if engine is not None:
            self.engine_ready(engine)
        else:
            self._queue(Warming())
        sender = asyncio.create_task(self._send_loop(), name=f"send-{self.session_id}")
        try:
            await self._receive_loop()
        finally:
            self._finished = True
            services.scheduler.cancel(self.session_id)
            self._wakeup.set()
            try:
                # The sender exits on its own once it has written what is queued (a close, usually).
                await asyncio.wait({sender}, timeout=2)
            finally:
                sender.cancel()
                # After the sender: its last delivery may have opened a billable second.
                if self._usage is not None:
                    self._usage.finish()
                services.metrics.sessions.dec()
                self.ended.set()

    # ---- called by the worker, on the event loop ----

    def engine_ready(self, engine: Engine) -> None:
        self.engine = engine
        requested, self._requested_mode = self._requested_mode, None
        if requested is not None:  # chosen while warming, when the engine's modes were not known yet
            if requested in mode_ids(engine):
                self.mode = requested
            else:
                self._error(ErrorCode.BAD_PARAMS, _unknown_mode(requested, engine) + "; using the default")
        self._queue(
            Ready(
                engine=engine.name,
                model=engine.model,
                worker_id=self.services.config.worker_id,
                preview=is_preview(engine),
                modes=list(engine.modes),
                mode=self.mode or engine.modes[0].id,
                pace=engine.max_batch == 1,
                adapters=list(served_adapters(engine)),
                adapter=self.adapter,
                adapter_scale=self.adapter_scale,
            )
        )
        self._queue(self._usage_message())

    def close(self, code: int, reason: str) -> None:
        """Ask the sender to close the socket after what is already queued."""
        self._outbox.append(_Close(code, reason))
        self._wakeup.set()

    # ---- reading ----

    async def _receive_loop(self) -> None:
        while True:
            try:
                event = await self.socket.receive()
            except WebSocketDisconnect:
                return
            if event["type"] != "websocket.receive":
                return
            data = event.get("bytes")
            if data is not None:
                if len(data) >= FRAME_HEADER_BYTES and binary_kind(data) == BinaryKind.STYLE_IMAGE:
                    # Decoded before the next message is read, so the frames sent after it carry it.
                    await self._on_style_image(data[FRAME_HEADER_BYTES:])
                else:
                    self._on_frame(data)
                continue
            text = event.get("text")
            if text is not None:
                self._on_text(text)

    def _on_text(self, text: str) -> None:
        try:
            message = decode_client_message(text)
        except ProtocolError as exc:
            self._error(exc.code, exc.message)
            return
        if isinstance(message, Params):
            self._apply_params(message)
        elif isinstance(message, ClearStyle):
            self.style = None
            self._queue(StyleImageState(active=False))
        else:
            self._error(ErrorCode.UNEXPECTED_HELLO, "this session is already authenticated")

    def _apply_params(self, params: Params) -> None:
        """All of it or (bad_params) nothing of it."""
        engine = self.engine
        if params.mode is not None and engine is not None and params.mode not in mode_ids(engine):
            self._error(ErrorCode.BAD_PARAMS, _unknown_mode(params.mode, engine))
            return
        adapter = params.adapter
        if isinstance(adapter, str):
            # Adapters are known once the engine is: none can be chosen while the worker is warming.
            served = {info.name for info in served_adapters(engine)} if engine is not None else set()
            if adapter not in served:
                self._error(
                    ErrorCode.BAD_PARAMS,
                    _unknown_adapter(adapter, engine) if engine is not None else "adapters: wait for ready",
                )
                return
        if adapter is not msgspec.UNSET and adapter != self.adapter:
            self.adapter = adapter  # type: ignore[assignment]
            self.adapter_scale = None  # the new adapter's default, unless this message sets one
        if params.adapter_scale is not None:
            self.adapter_scale = params.adapter_scale
        if params.prompt is not None:
            self.prompt = params.prompt
        if params.steps is not None:
            self.steps = params.steps
        if params.seed is not None:
            self.seed = params.seed
        if params.mode is not None:
            if engine is None:
                # Warming: validated in engine_ready; frames until then render in the default mode.
                self._requested_mode = params.mode
            else:
                self.mode = params.mode

    async def _on_style_image(self, image: bytes) -> None:
        """Set the session's style image; a bad one is refused with an error and the old one stays."""
        try:
            style = await asyncio.to_thread(decode_style_image, image)
        except ProtocolError as exc:
            self._error(exc.code, exc.message)
            return
        self.style = style
        width, height = style.source_size
        self._queue(StyleImageState(active=True, width=width, height=height))

    def _on_frame(self, data: bytes) -> None:
        metrics = self.services.metrics
        metrics.frames_in.inc()
        frame_id: int | None = None
        try:
            frame_id, kind, _, jpeg = unpack_frame(data)
            if kind != BinaryKind.FRAME:
                raise ProtocolError(
                    ErrorCode.BAD_BINARY_KIND,
                    f"binary message kind {kind} is not one of {', '.join(str(k.value) for k in BinaryKind)}",
                )
            if len(jpeg) > MAX_FRAME_JPEG_BYTES:
                raise ProtocolError(
                    ErrorCode.FRAME_TOO_LARGE,
                    f"frame {frame_id} is {len(jpeg)} bytes; the limit is {MAX_FRAME_JPEG_BYTES}",
                )
            try:
                inspect_jpeg(jpeg)
            except ImageTooLarge as exc:
                raise ProtocolError(ErrorCode.FRAME_TOO_LARGE, f"frame {frame_id}: {exc}") from exc
            except InvalidJpeg as exc:
                raise ProtocolError(ErrorCode.NOT_JPEG, f"frame {frame_id}: {exc}") from exc
        except ProtocolError as exc:
            self._error(exc.code, exc.message, frame=frame_id)
            return
        self._count_frame(time.monotonic())
        job = FrameJob(
            self.session_id,
            frame_id,
            jpeg,
            self.prompt,
            self.steps,
            self.seed,
            self.mode,
            style=self.style,
            adapter=self.adapter,
            adapter_scale=self.adapter_scale,
        )
        if self.services.scheduler.submit(job, self._on_rendered):
            metrics.frames_dropped.labels("input").inc()
        self._queue_droppable(Ack(frame=frame_id, round_ms=self._round_ms()))

    def _count_frame(self, now: float) -> None:
        gap = now - self._last_frame_at
        if self._frames and gap <= STREAMING_GAP_SECONDS:
            self.frame_interval = _smoothed(self.frame_interval, gap)
        self._frames += 1
        self._last_frame_at = now

    def streaming(self, now: float) -> bool:
        """Whether the session sends frames: one came within STREAMING_GAP_SECONDS of `now`."""
        return self._frames > 0 and now - self._last_frame_at <= STREAMING_GAP_SECONDS

    @property
    def frame_cost(self) -> float | None:
        """What one of its frames costs, in seconds of a replica; None while nothing was measured."""
        if len(self._costs) >= MIN_OWN_COST_FRAMES:
            return statistics.median(self._costs)
        return self.services.admission.frame_seconds(self._mode_id())

    @property
    def partial_turns_interval(self) -> float | None:
        """How far apart its frames come when that is further than the rounds it was told (a camera slower
        than its share of the engine); None: it uses every turn."""
        interval, told = self.frame_interval, self._told_round
        if interval is None or told is None or interval <= SLOW_STREAM_ROUNDS * told:
            return None
        return interval

    def _round_ms(self) -> int:
        """The round that paced clients steer by; 0 when the worker batches or has not measured it."""
        if self.engine is None or self.engine.max_batch != 1:
            return 0
        seconds = self.services.round_seconds()
        if seconds is None:
            return 0
        self._told_round = _smoothed(self._told_round, seconds)
        return round(seconds * 1000)

    def _mode_id(self) -> str:
        """The session's mode id, the engine's default when it chose none ("" while warming)."""
        return self.mode or (self.engine.modes[0].id if self.engine is not None else "")

    def _on_rendered(self, result: RenderResult) -> None:
        if result.jpeg is not None:
            seconds_per_frame = result.cycle_seconds / max(result.batch_size, 1)
            default = self.engine.modes[0].id if self.engine is not None else ""
            self.services.admission.observe(result.job.mode or default, seconds_per_frame)
            self._costs.append(seconds_per_frame)
        if result.late:  # a newer frame of this session, rendered on another replica, was handed on first
            self.services.metrics.frames_dropped.labels("late").inc()
            return
        if self._finished:
            return
        if self._result is not None:
            self.services.metrics.frames_dropped.labels("output").inc()
        self._result = result
        self._wakeup.set()

    # ---- writing (sender task only) ----

    def _queue(self, message: ServerMessage) -> None:
        self._outbox.append(message)
        self._wakeup.set()

    def _queue_droppable(self, message: Ack | Error) -> None:
        """Acks and errors: dropped once MAX_QUEUED_MESSAGES are waiting (a client that is not reading)."""
        if len(self._outbox) < MAX_QUEUED_MESSAGES:
            self._queue(message)

    def _error(self, code: ErrorCode, message: str, *, frame: int | None = None) -> None:
        self.services.metrics.frame_errors.labels(code.value).inc()
        self._queue_droppable(Error(code=code, message=message, frame=frame))

    def _usage_message(self) -> Usage:
        return Usage(seconds_used=self.meter.seconds_used, seconds_remaining=self.meter.seconds_remaining)

    async def _send_loop(self) -> None:
        services = self.services
        clock = services.clock
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=TICK_SECONDS)
                self._wakeup.clear()
                while self._outbox:
                    item = self._outbox.popleft()
                    if isinstance(item, _Close):
                        await close_socket(self.socket, item.code, item.reason)
                        return
                    await self.socket.send_text(encode_message(item))
                if self._finished:
                    return
                idle = services.config.idle_timeout_seconds
                if time.monotonic() - self._last_frame_at >= idle:
                    services.metrics.sessions_idle.inc()
                    await close_socket(self.socket, CloseCode.IDLE, f"no frame for {idle:g} s")
                    return
                if self.meter.exhausted(clock()):
                    await self._end_allowance()
                    return
                result, self._result = self._result, None
                if result is not None and not await self._deliver(result):
                    return
        except SOCKET_ERRORS:
            return  # the client is gone; the receive loop sees the disconnect and cleans up

    async def _deliver(self, result: RenderResult) -> bool:
        """Send one result; False when the session has ended instead (allowance used up)."""
        job = result.job
        if result.jpeg is None:
            self._error(
                ErrorCode.RENDER_FAILED,
                f"frame {job.frame_id} could not be rendered: {result.error}",
                frame=job.frame_id,
            )
            return True
        # Read the clock after the render: the second the user sees the frame in is the one billed.
        now = self.services.clock()
        if self.meter.exhausted(now):
            await self._end_allowance()
            return False
        await self.socket.send_bytes(
            pack_frame(job.frame_id, result.jpeg, render_ms=result.render_ms, waited_ms=result.waited_ms)
        )
        self.services.metrics.frames_out.inc()
        if self.meter.record_delivery(now):
            self.services.metrics.billable_seconds.inc()
            await self.socket.send_text(encode_message(self._usage_message()))
        return True

    async def _end_allowance(self) -> None:
        await self.socket.send_text(encode_message(self._usage_message()))
        await close_socket(self.socket, CloseCode.ALLOWANCE_USED, "allowance used up")

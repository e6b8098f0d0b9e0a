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
import time
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from litestar.connection import WebSocket
from litestar.exceptions import WebSocketDisconnect

from inference.billable_time import BillingMeter
from inference.claims import ClaimOutcome
from inference.engines import is_preview
from inference.engines.base import MODE_ID_PATTERN, Engine, FrameJob, mode_ids
from inference.imaging import ImageTooLarge, InvalidJpeg, inspect_jpeg
from inference.protocol import (
    MAX_FRAME_JPEG_BYTES,
    Ack,
    Admitted,
    CloseCode,
    Error,
    ErrorCode,
    Hello,
    Params,
    ProtocolError,
    Ready,
    ServerMessage,
    Usage,
    Warming,
    decode_client_message,
    encode_message,
    pack_frame,
    unpack_frame,
)
from inference.scheduler import RenderResult
from inference.tickets import Ticket, TicketError, verify_ticket

if TYPE_CHECKING:
    from inference.usage_reporter import ReportedStream
    from inference.worker import Worker

log = logging.getLogger(__name__)

# How often the sender wakes up without news, to notice an allowance that ran out while no frame came.
TICK_SECONDS: Final = 0.2
# Acks and errors queued beyond this are dropped, so a client that floods frames or garbage without reading
# its socket cannot grow our memory. A client that follows the flow control has at most two acks queued.
MAX_QUEUED_MESSAGES: Final = 64
# Close reasons are limited to 123 bytes by RFC 6455.
MAX_CLOSE_REASON: Final = 120
_session_ids = itertools.count(1)
_MODE_ID: Final = re.compile(MODE_ID_PATTERN)

_SOCKET_ERRORS: Final = (WebSocketDisconnect, OSError, RuntimeError)


@dataclass(frozen=True, slots=True)
class _Close:
    code: int
    reason: str


def _unknown_mode(mode: str, engine: Engine) -> str:
    offered = ", ".join(repr(option.id) for option in engine.modes)
    return f"unknown mode {mode!r}; the {engine.name} engine offers {offered}"


async def serve_connection(worker: Worker, socket: WebSocket) -> None:
    """The whole life of one connection, from accept to close: admission, hello, claim, session."""
    await socket.accept()
    # The mode the session starts in (`/ws?mode=turbo`), so admission counts what it will really cost.
    mode = socket.query_params.get("mode")
    if mode is not None and not _MODE_ID.match(mode):
        mode = None
    if not worker.admit(mode):
        await _close(socket, CloseCode.WORKER_FULL, "every session here is at the frame-rate floor")
        return
    try:
        with contextlib.suppress(*_SOCKET_ERRORS):
            await socket.send_text(encode_message(Admitted(worker_id=worker.worker_id)))
        ticket = await _authenticate(worker, socket)
        if ticket is None:
            return
        session = StreamSession(worker, socket, ticket, mode=mode)
    finally:
        worker.release(mode)
    await session.run()  # registers itself in worker.sessions before its first await


async def _close(socket: WebSocket, code: int, reason: str) -> None:
    with contextlib.suppress(*_SOCKET_ERRORS):
        await socket.close(code=code, reason=reason.encode()[:MAX_CLOSE_REASON].decode(errors="ignore"))


async def _authenticate(worker: Worker, socket: WebSocket) -> Ticket | None:
    """Wait for `hello`; close with 4408 (too slow) or 4401 (anything but a valid, unused ticket)."""
    timeout = worker.config.hello_timeout_seconds
    try:
        event = await asyncio.wait_for(socket.receive(), timeout=timeout)
    except TimeoutError:
        await _close(socket, CloseCode.HELLO_TIMEOUT, f"send hello within {timeout:g} s")
        return None
    except WebSocketDisconnect:
        return None
    if event["type"] != "websocket.receive":
        return None
    text = event.get("text")
    if text is None:
        await _close(socket, CloseCode.BAD_TICKET, "the first message must be hello")
        return None
    try:
        message = decode_client_message(text)
    except ProtocolError:
        message = None
    if not isinstance(message, Hello):
        await _close(socket, CloseCode.BAD_TICKET, "the first message must be hello")
        return None
    try:
        ticket = verify_ticket(worker.config.stream_secret, message.ticket)
    except TicketError as exc:
        await _close(socket, CloseCode.BAD_TICKET, str(exc))
        return None
    outcome = await worker.claim(ticket)
    if outcome is ClaimOutcome.REFUSED:
        await _close(socket, CloseCode.BAD_TICKET, "ticket already used")
        return None
    if outcome is ClaimOutcome.UNAVAILABLE:
        await _close(socket, CloseCode.TRY_AGAIN_LATER, "the stream could not be claimed; try again")
        return None
    return ticket


class StreamSession:
    def __init__(self, worker: Worker, socket: WebSocket, ticket: Ticket, *, mode: str | None = None) -> None:
        self.worker = worker
        self.socket = socket
        self.ticket = ticket
        self.session_id = f"{ticket.stream_id}#{next(_session_ids)}"
        self.meter = BillingMeter(ticket.allowance_seconds)
        self.prompt = ""
        self.steps = worker.config.default_steps
        self.seed = 0
        self.mode = ""  # a mode id of the engine, validated; "" is the engine's default (its first mode)
        # Asked for at connect or while warming; validated once the engine is ready (at once if it is).
        self._requested_mode: str | None = mode
        self._outbox: deque[ServerMessage | _Close] = deque()
        self._result: RenderResult | None = None
        self._wakeup = asyncio.Event()
        self._finished = False
        self._usage: ReportedStream | None = None
        # Monotonic time of the last valid frame (or of the start): the idle timeout counts from it.
        self._last_frame_at = time.monotonic()
        self.ended = asyncio.Event()

    async def run(self) -> None:
        worker = self.worker
        worker.metrics.sessions.inc()
        worker.sessions.add(self)
        if worker.reporter is not None:
            self._usage = worker.reporter.open(self.ticket, lambda: self.meter.seconds_used)
        if worker.engine is not None:
            self.engine_ready(worker.engine)
        else:
            self._queue(Warming())
        sender = asyncio.create_task(self._send_loop(), name=f"send-{self.session_id}")
        try:
            await self._receive_loop()
        finally:
            self._finished = True
            worker.scheduler.cancel(self.session_id)
            self._wakeup.set()
            try:
                # The sender exits on its own once it has written what is queued (a close, usually).
                await asyncio.wait({sender}, timeout=2)
            finally:
                sender.cancel()
                # After the sender: its last delivery may have opened a billable second.
                if self._usage is not None:
                    self._usage.finish()
                worker.sessions.discard(self)
                worker.metrics.sessions.dec()
                self.ended.set()

    # ---- called by the worker, on the event loop ----

    def engine_ready(self, engine: Engine) -> None:
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
                worker_id=self.worker.worker_id,
                preview=is_preview(engine),
                modes=list(engine.modes),
                mode=self.mode or engine.modes[0].id,
                pace=engine.max_batch == 1,
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
        else:
            self._error(ErrorCode.UNEXPECTED_HELLO, "this session is already authenticated")

    def _apply_params(self, params: Params) -> None:
        """All of it or (bad_params) nothing of it."""
        engine = self.worker.engine
        if params.mode is not None and engine is not None and params.mode not in mode_ids(engine):
            self._error(ErrorCode.BAD_PARAMS, _unknown_mode(params.mode, engine))
            return
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

    def _on_frame(self, data: bytes) -> None:
        metrics = self.worker.metrics
        metrics.frames_in.inc()
        frame_id: int | None = None
        try:
            frame_id, _, _, jpeg = unpack_frame(data)
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
        self._last_frame_at = time.monotonic()
        job = FrameJob(self.session_id, frame_id, jpeg, self.prompt, self.steps, self.seed, self.mode)
        if self.worker.scheduler.submit(job, self._on_rendered):
            metrics.frames_dropped.labels("input").inc()
        self._queue_droppable(Ack(frame=frame_id))

    def _on_rendered(self, result: RenderResult) -> None:
        if result.jpeg is not None:
            seconds_per_frame = result.render_ms / 1000 / max(result.batch_size, 1)
            self.worker.admission.observe(result.job.mode or self.worker.default_mode(), seconds_per_frame)
        if self._finished:
            return
        if self._result is not None:
            self.worker.metrics.frames_dropped.labels("output").inc()
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
        self.worker.metrics.frame_errors.labels(code.value).inc()
        self._queue_droppable(Error(code=code, message=message, frame=frame))

    def _usage_message(self) -> Usage:
        return Usage(seconds_used=self.meter.seconds_used, seconds_remaining=self.meter.seconds_remaining)

    async def _send_loop(self) -> None:
        clock = self.worker.clock
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wakeup.wait(), timeout=TICK_SECONDS)
                self._wakeup.clear()
                while self._outbox:
                    item = self._outbox.popleft()
                    if isinstance(item, _Close):
                        await _close(self.socket, item.code, item.reason)
                        return
                    await self.socket.send_text(encode_message(item))
                if self._finished:
                    return
                if time.monotonic() - self._last_frame_at >= self.worker.config.idle_timeout_seconds:
                    self.worker.metrics.sessions_idle.inc()
                    idle = self.worker.config.idle_timeout_seconds
                    await _close(self.socket, CloseCode.IDLE, f"no frame for {idle:g} s")
                    return
                if self.meter.exhausted(clock()):
                    await self._end_allowance()
                    return
                result, self._result = self._result, None
                if result is not None and not await self._deliver(result):
                    return
        except _SOCKET_ERRORS:
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
        now = self.worker.clock()
        if self.meter.exhausted(now):
            await self._end_allowance()
            return False
        await self.socket.send_bytes(
            pack_frame(job.frame_id, result.jpeg, render_ms=result.render_ms, waited_ms=result.waited_ms)
        )
        self.worker.metrics.frames_out.inc()
        if self.meter.record_delivery(now):
            self.worker.metrics.billable_seconds.inc()
            await self.socket.send_text(encode_message(self._usage_message()))
        return True

    async def _end_allowance(self) -> None:
        await self.socket.send_text(encode_message(self._usage_message()))
        await _close(self.socket, CloseCode.ALLOWANCE_USED, "allowance used up")

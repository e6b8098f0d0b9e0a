"""A session against a socket the test controls: what a client that floods frames without reading its socket
costs the worker (nothing that grows)."""

from __future__ import annotations

import asyncio
from typing import Any

from inference.protocol import Ack, Warming, decode_server_message, pack_frame
from inference.session import MAX_QUEUED_MESSAGES, StreamSession
from inference.tickets import verify_ticket
from inference.worker import Worker
from tests.inference.helpers import SECRET, new_ticket, webcam_jpeg, worker_config


class UnreadSocket:
    """Delivers `frames` as fast as the session asks, then nothing until `hang_up`; every write blocks
    until `start_reading`, like a client that never reads (once the kernel's buffers are full)."""

    def __init__(self, frames: list[bytes]) -> None:
        self.frames = frames
        self.reading = asyncio.Event()
        self.hung_up = asyncio.Event()
        self.written: list[str | bytes] = []

    async def receive(self) -> dict[str, Any]:
        if self.frames:
            return {"type": "websocket.receive", "bytes": self.frames.pop(0)}
        await self.hung_up.wait()
        return {"type": "websocket.disconnect", "code": 1000}

    async def send_text(self, data: str) -> None:
        await self.reading.wait()
        self.written.append(data)

    async def send_bytes(self, data: bytes) -> None:
        await self.reading.wait()
        self.written.append(data)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        return None


def test_a_client_flooding_frames_without_reading_holds_one_frame_and_a_bounded_outbox() -> None:
    frames = 1000
    jpeg = webcam_jpeg(64, 48)

    async def scenario() -> tuple[list[str | bytes], int, float]:
        worker = Worker(worker_config())  # not started: the engine stays "warming", frames just wait
        socket = UnreadSocket([pack_frame(frame_id, jpeg) for frame_id in range(1, frames + 1)])
        ticket = verify_ticket(SECRET, new_ticket())
        session = StreamSession(worker.session_services(), socket, ticket)  # type: ignore[arg-type]
        running = asyncio.create_task(session.run())
        await asyncio.sleep(0.1)  # every frame has been read; the sender is stuck on its first write
        waiting = worker.scheduler.pending_count
        socket.reading.set()
        await asyncio.sleep(0.1)
        socket.hung_up.set()
        await asyncio.wait_for(running, 5)
        dropped = worker.metrics.registry.get_sample_value(
            "stylecast_worker_frames_dropped_total", {"stage": "input"}
        )
        return socket.written, waiting, dropped or 0.0

    written, waiting, dropped = asyncio.run(scenario())
    assert waiting == 1, "latest frame wins: one waiting frame, however many arrived"
    assert dropped == frames - 1
    messages = [decode_server_message(text) for text in written if isinstance(text, str)]
    assert messages[0] == Warming()
    acks = [message.frame for message in messages if isinstance(message, Ack)]
    # Acks beyond the bound were dropped rather than queued: what waited for the socket stayed bounded...
    assert len(messages) <= MAX_QUEUED_MESSAGES + 1
    # ...and those that were queued name the first frames, in order.
    assert acks == list(range(1, len(acks) + 1))
    assert len(acks) >= MAX_QUEUED_MESSAGES - 2

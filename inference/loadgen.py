"""Drive a worker's `/ws` the way the studio does, and measure what a user would see.

    STREAM_SECRET=... python -m inference.loadgen --url ws://127.0.0.1:8001/ws --sessions 1 2 4 --seconds 15

Each session signs its own ticket with STREAM_SECRET, says `hello`, sets a prompt of its own and sends
webcam-sized JPEG frames at up to `--fps` with the studio's flow control: at most two frames unanswered,
and an answer to frame N settles every older frame (the worker keeps only the latest frame per session).
It reports, per session and in total, delivered frames per second and send-to-receive latency, and writes
the result as JSON when `--out` is given.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
from PIL import Image
from websockets.asyncio.client import connect

from inference.protocol import (
    Hello,
    Params,
    Ready,
    decode_server_message,
    encode_message,
    pack_frame,
    unpack_frame,
)
from inference.tickets import issue_ticket

MAX_IN_FLIGHT = 2
PROMPTS = (
    "an expressive oil painting, thick impasto brushwork",
    "16-bit pixel art, limited palette",
    "a claymation character, soft plasticine texture",
    "neon cyberpunk portrait, magenta and cyan rim light",
)


def webcam_frames(count: int = 30, width: int = 640, height: int = 480) -> list[bytes]:
    """A short loop of moving, textured JPEG frames, the size a laptop camera sends."""
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, size=(height // 8, width // 8, 3), dtype=np.uint8)
    frames = []
    for index in range(count):
        shifted = np.roll(base, shift=index, axis=1)
        image = Image.fromarray(shifted).resize((width, height), Image.Resampling.BILINEAR)
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=80)
        frames.append(buffer.getvalue())
    return frames


@dataclass
class SessionResult:
    prompt: str
    sent: int = 0
    delivered: int = 0
    latencies_ms: list[float] = field(default_factory=list)
    max_unanswered: int = 0
    engine: str = ""

    def summary(self, seconds: float) -> dict[str, float | int | str]:
        ordered = sorted(self.latencies_ms) or [float("nan")]
        return {
            "prompt": self.prompt,
            "engine": self.engine,
            "sent": self.sent,
            "delivered": self.delivered,
            "fps": self.delivered / seconds,
            "latency_p50_ms": statistics.median(ordered),
            "latency_p95_ms": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "max_unanswered": self.max_unanswered,
        }


async def run_session(
    url: str, secret: str, prompt: str, seconds: float, fps: float, steps: int, frames: list[bytes]
) -> SessionResult:
    result = SessionResult(prompt=prompt)
    ticket = issue_ticket(
        secret,
        user_id=f"loadgen_{uuid.uuid4().hex[:8]}",
        stream_id=f"st_{int(time.time())}_{uuid.uuid4().hex[:12]}",
        allowance_seconds=int(seconds) + 3600,
    )
    sent_at: dict[int, float] = {}
    answered = asyncio.Event()
    async with connect(url, max_size=4 * 1024 * 1024, open_timeout=60) as socket:
        await socket.send(encode_message(Hello(ticket=ticket)))
        while True:  # wait until the engine is warm: cold start is not what this measures
            message = decode_server_message(await socket.recv())
            if isinstance(message, Ready):
                result.engine = message.engine
                break
        await socket.send(encode_message(Params(prompt=prompt, steps=steps, seed=7)))

        async def receive() -> None:
            async for data in socket:
                if isinstance(data, str):
                    continue
                frame_id, _, _ = unpack_frame(data)
                now = time.perf_counter()
                if frame_id in sent_at:
                    result.latencies_ms.append((now - sent_at[frame_id]) * 1000)
                    result.delivered += 1
                for pending in [pending for pending in sent_at if pending <= frame_id]:
                    del sent_at[pending]
                answered.set()

        receiver = asyncio.create_task(receive())
        interval = 1.0 / fps
        next_frame_id = 1
        deadline = time.perf_counter() + seconds
        next_send = time.perf_counter()
        while time.perf_counter() < deadline:
            if len(sent_at) >= MAX_IN_FLIGHT:
                answered.clear()
                try:
                    await asyncio.wait_for(answered.wait(), timeout=max(0.0, deadline - time.perf_counter()))
                except TimeoutError:
                    break
                continue
            await asyncio.sleep(max(0.0, next_send - time.perf_counter()))
            next_send = max(next_send + interval, time.perf_counter())
            sent_at[next_frame_id] = time.perf_counter()
            result.max_unanswered = max(result.max_unanswered, len(sent_at))
            await socket.send(pack_frame(next_frame_id, frames[next_frame_id % len(frames)]))
            result.sent += 1
            next_frame_id += 1
        receiver.cancel()
    return result


async def run_load(
    url: str, secret: str, sessions: int, seconds: float, fps: float, steps: int
) -> dict[str, object]:
    frames = webcam_frames()
    prompts = [PROMPTS[index % len(PROMPTS)] for index in range(sessions)]
    results = await asyncio.gather(
        *(run_session(url, secret, prompt, seconds, fps, steps, frames) for prompt in prompts)
    )
    per_session = [result.summary(seconds) for result in results]
    rates = [float(summary["fps"]) for summary in per_session]
    fair_share = sum(rates) / len(rates)
    return {
        "sessions": sessions,
        "seconds": seconds,
        "target_fps": fps,
        "steps": steps,
        "aggregate_fps": sum(rates),
        "min_session_share": min(rates) / fair_share if fair_share else 0.0,
        "per_session": per_session,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8001/ws")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--fps", type=float, default=30.0, help="the most frames a session sends per second")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    args = parser.parse_args(argv)
    secret = os.environ.get("STREAM_SECRET", "")
    if not secret:
        print(
            "error: STREAM_SECRET must be the worker's secret (the load generator signs tickets)",
            file=sys.stderr,
        )
        return 2
    runs = []
    for sessions in args.sessions:
        run = asyncio.run(run_load(args.url, secret, sessions, args.seconds, args.fps, args.steps))
        runs.append(run)
        for index, session in enumerate(run["per_session"]):  # type: ignore[arg-type]
            print(
                f"sessions={sessions} #{index} fps={session['fps']:.2f} "
                f"p50={session['latency_p50_ms']:.1f}ms p95={session['latency_p95_ms']:.1f}ms "
                f"max_unanswered={session['max_unanswered']}"
            )
        print(
            f"sessions={sessions} aggregate_fps={run['aggregate_fps']:.2f} "
            f"min_share={run['min_session_share']:.2f}"
        )
    if args.out:
        args.out.write_text(json.dumps(msgspec.to_builtins(runs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

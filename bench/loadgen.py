"""Drive a worker's `/ws` the way the studio does, and measure what a user would see.

    STREAM_SECRET=... python -m bench.loadgen --url ws://127.0.0.1:8001/ws --sessions 1 2 4 --seconds 15

Each session signs its own ticket with STREAM_SECRET, says `hello`, sets a prompt of its own (and `--mode`,
if given) and sends webcam-sized JPEG frames with the studio's flow control: at most two frames
unacknowledged (the worker acks a frame as soon as it is the session's waiting frame, and answers a rejected
one with an error naming it), never faster than the camera (`--fps`) and, as the studio does when the
worker's `ready` says `pace`, paced to arrive just before the engine takes them (`inference.pacing`);
`--pacing`/`--no-pacing` overrule the worker.
It reports, per session and in total, delivered frames per second, send-to-receive latency of the outputs,
how long the rendered frames waited for the engine, the engine's render time, acks and errors, and writes
the result as JSON when `--out` is given.

    STREAM_SECRET=... python -m bench.loadgen --arrivals 3 --every 8 --mode turbo

lets sessions arrive one by one instead, to show admission at work (MIN_SESSION_FPS): which are admitted,
which are refused with 4503, and what each admitted one gets while the next arrives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import math
import os
import statistics
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import numpy as np
from PIL import Image
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from inference.pacing import FramePacer
from inference.protocol import (
    MAX_CLIENT_FPS,
    MAX_UNACKED,
    TYPICAL_CAMERA_FPS,
    Ack,
    Admitted,
    Error,
    Hello,
    Params,
    Ready,
    decode_server_message,
    encode_message,
    pack_frame,
    unpack_frame,
)
from inference.tickets import issue_ticket

STALE_FRAME_SECONDS = 4.0  # an unacknowledged frame older than this no longer counts (a lost ack)
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


def _percentile(values: list[float], fraction: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class SessionResult:
    prompt: str
    sent: int = 0
    delivered: int = 0
    acks: int = 0
    errors: Counter[str] = field(default_factory=Counter)
    latencies_ms: list[float] = field(default_factory=list)
    waits_ms: list[int] = field(default_factory=list)  # how long each rendered frame waited (worker's word)
    # Per delivered output: whether its frame was sent while the pacer still sent one frame at a time (each
    # such frame waits about a whole round by design, so the steady pace is judged without them).
    sent_settling: list[bool] = field(default_factory=list)
    render_ms: list[int] = field(default_factory=list)
    received_at: list[float] = field(default_factory=list)  # perf_counter() of each delivered output
    max_unanswered: int = 0  # sent frames neither answered (output, error) nor superseded by a newer output
    max_unacked: int = 0  # sent frames not acknowledged yet: the flow control keeps it <= MAX_UNACKED
    engine: str = ""
    mode: str = ""  # the session's mode, as `ready` said (or as chosen with --mode)
    modes: list[str] = field(default_factory=list)
    pacing: bool = False  # whether this session paced its frames (else: camera rate)
    refused: int | None = None  # the close code when the worker did not admit the session (4503: full)
    started_at: float = 0.0  # perf_counter() when the session got `ready`

    def _settled(self, per_output: list[float]) -> list[float]:
        """A per-output figure without the outputs of frames sent while the pacer was settling."""
        return [value for value, settling in zip(per_output, self.sent_settling, strict=True) if not settling]

    def summary(self, seconds: float) -> dict[str, object]:
        latency_p50 = _median(self.latencies_ms)
        render_p50 = _median([float(ms) for ms in self.render_ms])
        span = self.received_at[-1] - self.received_at[0] if len(self.received_at) > 1 else 0.0
        return {
            "prompt": self.prompt,
            "engine": self.engine,
            "mode": self.mode,
            "modes": self.modes,
            "pacing": self.pacing,
            "sent": self.sent,
            "acks": self.acks,
            "errors": dict(self.errors),
            "delivered": self.delivered,
            "fps": self.delivered / seconds,
            # Between the first and the last output: the rate without the start-up and the cut-off.
            "steady_fps": (len(self.received_at) - 1) / span if span > 0 else 0.0,
            "sent_fps": self.sent / seconds,
            "latency_p50_ms": latency_p50,
            "latency_p95_ms": _percentile(self.latencies_ms, 0.95),
            "wait_ms_p50": _median([float(ms) for ms in self.waits_ms]),
            # The same two without the frames of a paced start's one-at-a-time outputs (how many: below).
            "settling_outputs": sum(self.sent_settling),
            "settled_wait_ms_p50": _median(self._settled([float(ms) for ms in self.waits_ms])),
            "settled_latency_p50_ms": _median(self._settled(self.latencies_ms)),
            "render_ms_p50": render_p50,
            "render_ms_mean": statistics.fmean(self.render_ms) if self.render_ms else float("nan"),
            # Send-to-receive over the engine call's own time; 1.0 would be a frame that never waited.
            "latency_over_render": latency_p50 / render_p50 if render_p50 > 0 else float("nan"),
            "max_unanswered": self.max_unanswered,
            "max_unacked": self.max_unacked,
        }


async def run_session(
    url: str,
    secret: str,
    prompt: str,
    seconds: float,
    fps: float,
    steps: int,
    frames: list[bytes],
    mode: str | None = None,
    *,
    pacing: bool | None = None,
) -> SessionResult:
    """One studio-like client for `seconds` after the engine is ready. `mode`: a mode id of the engine
    (ValueError when the worker does not offer it), or None for the engine's default. `pacing`: True
    paces frames with FramePacer, False sends at camera rate, None does what `ready` says (the studio)."""
    result = SessionResult(prompt=prompt)
    ticket = issue_ticket(
        secret,
        user_id=f"loadgen_{uuid.uuid4().hex[:8]}",
        stream_id=f"st_{int(time.time())}_{uuid.uuid4().hex[:12]}",
        allowance_seconds=int(seconds) + 3600,
    )
    settling_frames: set[int] = set()  # frames sent while the pacer sent one at a time
    unacked: dict[int, float] = {}  # frame id -> when sent, until acked or answered with an error
    sent_at: dict[int, float] = {}  # frame id -> when sent, until its output or a newer one arrives
    news = asyncio.Event()  # set by every message from the worker: a send may be due now
    pacer = FramePacer(fps)
    # The connect sequence: open, wait for `admitted` (a full worker closes with 4503), then the ticket.
    target = f"{url}?mode={mode}" if mode else url
    async with connect(target, max_size=4 * 1024 * 1024, open_timeout=60) as socket:
        try:
            first = decode_server_message(await socket.recv())
        except ConnectionClosed as closed:
            result.refused = closed.rcvd.code if closed.rcvd is not None else -1
            return result
        if not isinstance(first, Admitted):
            raise RuntimeError(f"the worker's first message was {first!r}, not admitted")
        await socket.send(encode_message(Hello(ticket=ticket)))
        while True:  # wait until the engine is warm: cold start is not what this measures
            message = decode_server_message(await socket.recv())
            if isinstance(message, Ready):
                result.started_at = time.perf_counter()
                result.engine = message.engine
                result.modes = [option.id for option in message.modes]
                result.mode = message.mode
                result.pacing = message.pace if pacing is None else pacing
                break
        if mode is not None:
            if mode not in result.modes:
                offered = ", ".join(result.modes)
                raise ValueError(f"mode {mode!r} is not offered by the {result.engine} engine ({offered})")
            result.mode = mode
        await socket.send(encode_message(Params(prompt=prompt, steps=steps, seed=7, mode=mode)))

        async def receive() -> None:
            async for data in socket:
                now = time.perf_counter()
                news.set()
                if isinstance(data, str):
                    message = decode_server_message(data)
                    if isinstance(message, Ack):
                        result.acks += 1
                        unacked.pop(message.frame, None)
                        pacer.acknowledged(message.round_ms)
                    elif isinstance(message, Error):
                        result.errors[message.code.value] += 1
                        if message.frame is not None:
                            sent_at.pop(message.frame, None)
                            unacked.pop(message.frame, None)
                    continue
                frame_id, render_ms, waited_ms, _ = unpack_frame(data)
                pacer.rendered(frame_id, waited_ms, now)
                if frame_id in sent_at:
                    result.waits_ms.append(waited_ms)
                    result.latencies_ms.append((now - sent_at[frame_id]) * 1000)
                    result.render_ms.append(render_ms)
                    result.received_at.append(now)
                    result.sent_settling.append(frame_id in settling_frames)
                    result.delivered += 1
                # Ids increase and the worker keeps only a session's latest frame: an output for `frame_id`
                # means every older frame was either rendered or replaced, and will never come back.
                for pending in [pending for pending in sent_at if pending <= frame_id]:
                    del sent_at[pending]
                for pending in [pending for pending in unacked if pending <= frame_id]:
                    del unacked[pending]

        receiver = asyncio.create_task(receive())
        interval = 1.0 / fps
        next_frame_id = 1
        deadline = time.perf_counter() + seconds
        camera_due = time.perf_counter()
        try:
            while time.perf_counter() < deadline:
                now = time.perf_counter()
                for stale in [frame for frame, at in unacked.items() if now - at > STALE_FRAME_SECONDS]:
                    del unacked[stale]
                    sent_at.pop(stale, None)
                # Unpaced: the camera's next frame, at most `fps` a second and not a backlog of missed ones.
                due = pacer.due() if result.pacing else camera_due
                if len(unacked) >= MAX_UNACKED or due > now:
                    # Until the worker says something (an ack frees a place; an output moves `due`).
                    timeout = min(STALE_FRAME_SECONDS, max(0.0, deadline - now))
                    if len(unacked) < MAX_UNACKED:
                        timeout = min(timeout, due - now)
                    news.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(news.wait(), timeout=timeout)
                    continue
                sent = time.perf_counter()
                camera_due = max(camera_due + interval, sent)
                if result.pacing and pacer.settling:
                    settling_frames.add(next_frame_id)
                pacer.sent(next_frame_id, sent)
                unacked[next_frame_id] = sent
                sent_at[next_frame_id] = sent
                result.max_unacked = max(result.max_unacked, len(unacked))
                result.max_unanswered = max(result.max_unanswered, len(sent_at))
                await socket.send(pack_frame(next_frame_id, frames[next_frame_id % len(frames)]))
                result.sent += 1
                next_frame_id += 1
        finally:
            receiver.cancel()
    return result


async def run_load(
    url: str,
    secret: str,
    sessions: int,
    seconds: float,
    fps: float,
    steps: int,
    *,
    mode: str | None = None,
    pacing: bool | None = None,
) -> dict[str, object]:
    """`sessions` concurrent studio-like clients for `seconds`; `mode` is sent by every session (None:
    the engine's default); `pacing` as in run_session. Per-session figures are under "per_session"."""
    frames = webcam_frames()
    prompts = [PROMPTS[index % len(PROMPTS)] for index in range(sessions)]
    results = await asyncio.gather(
        *(
            run_session(url, secret, prompt, seconds, fps, steps, frames, mode, pacing=pacing)
            for prompt in prompts
        )
    )
    per_session = [result.summary(seconds) for result in results]
    rates = [float(summary["fps"]) for summary in per_session]  # type: ignore[arg-type]
    fair_share = sum(rates) / len(rates)
    latencies = [latency for result in results for latency in result.latencies_ms]
    waits = [float(wait) for result in results for wait in result.waits_ms]
    render_ms = [float(ms) for result in results for ms in result.render_ms]
    latency_p50 = _median(latencies)
    render_p50 = _median(render_ms)
    return {
        "sessions": sessions,
        "seconds": seconds,
        "target_fps": fps,
        "steps": steps,
        "mode": results[0].mode if results else "",
        "pacing": [result.pacing for result in results],
        "aggregate_fps": sum(rates),
        "min_session_share": min(rates) / fair_share if fair_share else 0.0,
        "latency_p50_ms": latency_p50,
        "latency_p95_ms": _percentile(latencies, 0.95),
        "wait_ms_p50": _median(waits),
        "render_ms_p50": render_p50,
        "latency_over_render": latency_p50 / render_p50 if render_p50 > 0 else math.nan,
        "per_session": per_session,
    }


async def run_arrivals(
    url: str, secret: str, arrivals: int, every: float, steps: int, *, mode: str | None = None
) -> dict[str, object]:
    """Sessions that arrive one by one, `every` seconds apart, each streaming until the last has had
    `every` seconds: which ones the worker admits against MIN_SESSION_FPS, and the rate of each admitted
    one while the next arrives (the window between its arrival and the one after)."""
    frames = webcam_frames()
    total = every * arrivals
    begun = time.perf_counter()

    async def arrive(index: int) -> SessionResult:
        await asyncio.sleep(index * every)
        remaining = total - (time.perf_counter() - begun)
        prompt = PROMPTS[index % len(PROMPTS)]
        return await run_session(url, secret, prompt, remaining, 30.0, steps, frames, mode)

    results = await asyncio.gather(*(arrive(index) for index in range(arrivals)))
    windows = []
    for index in range(arrivals):
        start, end = begun + index * every, begun + (index + 1) * every
        # Skip the first second of each window: a newcomer's first frames and its mode's warm-up.
        counted = [
            sum(1 for at in result.received_at if start + 1.0 <= at < end) / (end - start - 1.0)
            for result in results[: index + 1]
            if result.refused is None
        ]
        windows.append(
            {
                "arrived": index + 1,
                "admitted": [result.refused is None for result in results[: index + 1]],
                "refused_code": results[index].refused,
                "session_fps": counted,
            }
        )
    return {
        "mode": mode or (results[0].mode if results else ""),
        "every_seconds": every,
        "windows": windows,
        "render_ms_p50": _median([float(ms) for result in results for ms in result.render_ms]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.loadgen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", default="ws://127.0.0.1:8001/ws")
    parser.add_argument("--sessions", type=int, nargs="+", default=[1])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument(
        "--fps",
        type=float,
        default=float(TYPICAL_CAMERA_FPS),
        help=f"camera rate: frames a second at most (<= {MAX_CLIENT_FPS})",
    )
    parser.add_argument(
        "--pacing",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="pace frames to the engine, or send at camera rate (default: as the worker's ready says)",
    )
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--mode", help="a render mode id of the engine (default: the engine's default mode)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON")
    parser.add_argument(
        "--arrivals",
        type=int,
        help="instead: this many sessions arriving one by one (--every apart), to see admission at work",
    )
    parser.add_argument("--every", type=float, default=8.0, help="seconds between arrivals")
    args = parser.parse_args(argv)
    if not 0 < args.fps <= MAX_CLIENT_FPS:
        parser.error(f"--fps must be in (0, {MAX_CLIENT_FPS}]: no client sends faster (docs/protocol.md)")
    secret = os.environ.get("STREAM_SECRET", "")
    if not secret:
        print(
            "error: STREAM_SECRET must be the worker's secret (the load generator signs tickets)",
            file=sys.stderr,
        )
        return 2
    if args.arrivals:
        run = asyncio.run(
            run_arrivals(args.url, secret, args.arrivals, args.every, args.steps, mode=args.mode)
        )
        for window in run["windows"]:  # type: ignore[attr-defined]
            rates = ", ".join(f"{fps:.1f}" for fps in window["session_fps"])
            print(
                f"mode={run['mode']} arrived={window['arrived']} admitted={window['admitted']} "
                f"refused_code={window['refused_code']} fps per admitted session=[{rates}]"
            )
        if args.out:
            args.out.write_text(json.dumps(msgspec.to_builtins(run), indent=2))
        return 0
    runs = []
    for sessions in args.sessions:
        run = asyncio.run(
            run_load(
                args.url,
                secret,
                sessions,
                args.seconds,
                args.fps,
                args.steps,
                mode=args.mode,
                pacing=args.pacing,
            )
        )
        runs.append(run)
        for index, session in enumerate(run["per_session"]):  # type: ignore[arg-type]
            print(
                f"sessions={sessions} #{index} mode={session['mode']} fps={session['fps']:.2f} "
                f"sent_fps={session['sent_fps']:.1f} p50={session['latency_p50_ms']:.1f}ms "
                f"p95={session['latency_p95_ms']:.1f}ms wait_p50={session['wait_ms_p50']:.1f}ms "
                f"render_p50={session['render_ms_p50']:.1f}ms "
                f"acks={session['acks']} errors={session['errors']} max_unacked={session['max_unacked']}"
            )
        print(
            f"sessions={sessions} aggregate_fps={run['aggregate_fps']:.2f} "
            f"min_share={run['min_session_share']:.2f} p50={run['latency_p50_ms']:.1f}ms "
            f"latency/render={run['latency_over_render']:.2f}"
        )
    if args.out:
        args.out.write_text(json.dumps(msgspec.to_builtins(runs), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

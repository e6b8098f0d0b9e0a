"""The worker's lifecycle: engine, render loop, usage reporter and the live sessions, in one object that
either the standalone worker app or the web app (sandbox, in-process) starts and stops."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from enum import StrEnum

import httpx
from litestar.connection import WebSocket

from inference.admission import Admission
from inference.billable_time import Clock
from inference.claims import ClaimOutcome, LocalClaims, StreamClaimer
from inference.config import WorkerConfig
from inference.engines import create_engine, replica_devices
from inference.engines.base import Engine
from inference.metrics import WorkerMetrics
from inference.protocol import Admitted, CloseCode, encode_message
from inference.scheduler import EngineFactory, ReplicaState, Scheduler, SchedulerHooks
from inference.session import (
    SOCKET_ERRORS,
    SessionServices,
    StreamSession,
    authenticate,
    close_socket,
    requested_mode,
)
from inference.tickets import Ticket
from inference.usage_reporter import UsageReporter

log = logging.getLogger(__name__)


class WorkerStatus(StrEnum):
    STOPPED = "stopped"
    WARMING = "warming"  # loading and warming the engine; clients are told `warming`
    READY = "ready"
    FAILED = "failed"  # the engine could not load; clients are closed with 1011


class Worker:
    def __init__(
        self,
        config: WorkerConfig,
        *,
        engine_factory: Callable[[], Engine] | None = None,
        replicas: Sequence[tuple[str, EngineFactory]] | None = None,
        clock: Clock = time.time,
        http_client: httpx.AsyncClient | None = None,
    ) -> None:
        """The engine: `engine_factory` (one replica), or `replicas` (a label, e.g. the device, and a
        factory each), by default the engine named in the config on each of its devices (FLUX2_DEVICES,
        inference.engines.replica_devices); `clock` is the billing clock; `http_client` is what usage
        reports are posted with (one of the worker's own by default)."""
        if engine_factory is not None and replicas is not None:
            raise ValueError("pass engine_factory or replicas, not both")
        self.config = config
        self.worker_id = config.worker_id
        self.clock = clock
        self.metrics = WorkerMetrics()
        self._replicas: list[tuple[str, EngineFactory]] | None = (
            [("replica 0", engine_factory)] if engine_factory is not None else None
        )
        if replicas is not None:
            if not replicas:
                raise ValueError("a worker needs at least one replica")
            self._replicas = list(replicas)
        self.scheduler = self._new_scheduler(self._replicas or [("replica 0", lambda: create_engine(config))])
        self.reporter: UsageReporter | None = None
        self._http_client = http_client
        self.sessions: set[StreamSession] = set()
        self.status = WorkerStatus.STOPPED
        self.engine: Engine | None = None
        self.failure: str | None = None
        self.admission = Admission(config.min_session_fps)
        # The modes of connections admitted but not yet sessions (waiting for hello, or for their claim):
        # they hold a place, so two arriving together cannot both take the last one.
        self._admitting_modes: list[str] = []
        self.claimer: StreamClaimer | None = None
        self._claims_client: httpx.AsyncClient | None = None
        self._local_claims = LocalClaims()

    async def start(self) -> None:
        """Returns once the replicas are known (the flux2 engine without FLUX2_DEVICES or FLUX2_DEVICE counts
        the CUDA devices, importing torch in a thread); their engines load and warm up in the render
        threads."""
        if self.status is not WorkerStatus.STOPPED:
            return
        if self.config.usage_report_url:
            self.reporter = UsageReporter(
                url=self.config.usage_report_url,
                secret=self.config.stream_secret,
                worker_id=self.worker_id,
                interval=self.config.usage_report_interval_seconds,
                retry_base=self.config.usage_retry_base_seconds,
                retry_max=self.config.usage_retry_max_seconds,
                final_attempts=self.config.usage_final_attempts,
                client=self._http_client,
            )
        claim_url = self.config.claim_url
        if claim_url:
            client = self._http_client
            if client is None:
                client = self._claims_client = httpx.AsyncClient(timeout=httpx.Timeout(3.0))
            self.claimer = StreamClaimer(
                url=claim_url, secret=self.config.stream_secret, worker_id=self.worker_id, client=client
            )
        self.status = WorkerStatus.WARMING
        self.engine = None
        replicas = self._replicas
        if replicas is None:
            replicas = await self._configured_replicas()
        self.scheduler = self._new_scheduler(replicas)  # a render thread runs once; restart gets new ones
        hooks = SchedulerHooks(
            on_ready=self._engine_ready,
            on_failed=self._engine_failed,
            on_batch=self.metrics.observe_batch,
            on_replicas=self._replicas_changed,
        )
        self.scheduler.start(asyncio.get_running_loop(), hooks)
        self._replicas_changed()

    async def _configured_replicas(self) -> list[tuple[str, EngineFactory]]:
        """The config's engine on each of its devices."""
        config = self.config
        if config.engine == "flux2" and not config.device_list and config.device is None:
            devices = await asyncio.to_thread(replica_devices, config)  # counts CUDA devices: imports torch
        else:
            devices = replica_devices(config)
        # Labelled by device where one is named (logs, /health), else by position.
        return [
            (
                device or f"replica {index}",
                lambda device=device: create_engine(config, device),
            )
            for index, device in enumerate(devices)
        ]

    @staticmethod
    def _new_scheduler(replicas: Sequence[tuple[str, EngineFactory]]) -> Scheduler:
        return Scheduler(*(factory for _, factory in replicas), labels=[label for label, _ in replicas])

    async def stop(self, grace_seconds: float = 10.0) -> None:
        """Close every session (1001), stop the render loop, then flush final usage reports."""
        if self.status is WorkerStatus.STOPPED:
            return
        for session in list(self.sessions):
            session.close(CloseCode.GOING_AWAY, "worker shutting down")
        if self.sessions:
            waiters = [asyncio.ensure_future(session.ended.wait()) for session in self.sessions]
            _, late = await asyncio.wait(waiters, timeout=3.0)
            for waiter in late:
                waiter.cancel()
        await asyncio.to_thread(self.scheduler.stop, grace_seconds)
        if self.reporter is not None:
            await self.reporter.aclose(grace_seconds)
        if self._claims_client is not None:
            await self._claims_client.aclose()
            self._claims_client = None
        self.status = WorkerStatus.STOPPED
        self.metrics.engine_ready.set(0)
        self.metrics.replicas.clear()

    @asynccontextmanager
    async def lifespan(self, app: object = None) -> AsyncIterator[Worker]:
        """For `Litestar(lifespan=[worker.lifespan])`: started with the app, stopped with it."""
        await self.start()
        try:
            yield self
        finally:
            await self.stop()

    async def handle(self, socket: WebSocket) -> None:
        """Serve one WebSocket connection (the `/ws` route), from accept to close: admission, hello, claim,
        session."""
        if self.status is WorkerStatus.STOPPED:
            await socket.accept()
            await socket.close(code=CloseCode.INTERNAL_ERROR, reason="worker not started")
            return
        if self.status is WorkerStatus.FAILED:
            await socket.accept()
            await socket.close(code=CloseCode.INTERNAL_ERROR, reason=self._failure_reason())
            return
        await socket.accept()
        mode = requested_mode(socket)
        if not self.admit(mode):
            await close_socket(socket, CloseCode.WORKER_FULL, "every session here is at the frame-rate floor")
            return
        try:
            with contextlib.suppress(*SOCKET_ERRORS):
                await socket.send_text(encode_message(Admitted(worker_id=self.worker_id)))
            ticket = await authenticate(socket, self.config, self.claim)
            if ticket is None:
                return
            session = StreamSession(self.session_services(), socket, ticket, mode=mode)
        finally:
            self.release(mode)
        # Registered before the session's first await, so it sees the engine now or gets engine_ready().
        self.sessions.add(session)
        try:
            await session.run(self.engine)
        finally:
            self.sessions.discard(session)

    def session_services(self) -> SessionServices:
        """What this worker's sessions work with, until it stops."""
        return SessionServices(
            config=self.config,
            scheduler=self.scheduler,
            metrics=self.metrics,
            admission=self.admission,
            reporter=self.reporter,
            clock=self.clock,
            round_seconds=self.round_seconds,
        )

    def round_seconds(self) -> float | None:
        """How long one round of the streaming sessions takes, each rendering one frame at what its latest
        frames cost, over the ready replicas (Admission.round_seconds); None when it cannot be told yet."""
        now = time.monotonic()
        streams = []
        for session in self.sessions:
            if session.streaming(now):
                cost = session.frame_cost
                if cost is None:
                    return None
                streams.append((cost, session.partial_turns_interval))
        return self.admission.round_seconds(streams)

    def default_mode(self) -> str:
        return self.engine.modes[0].id if self.engine is not None else ""

    def admit(self, mode: str | None = None) -> bool:
        """Take a place for a new connection that will start in `mode` (None: the default) unless it would
        drop every session below the floor; the caller gives it back with `release()` unless the
        connection becomes a session."""
        default = self.default_mode()
        in_use = [session.mode or default for session in self.sessions] + self._admitting_modes
        if not self.admission.admits(in_use, mode or default):
            self.metrics.sessions_refused.inc()
            return False
        self._admitting_modes.append(mode or default)
        return True

    def release(self, mode: str | None = None) -> None:
        default = self.default_mode()
        with contextlib.suppress(ValueError):
            self._admitting_modes.remove(mode or default)

    async def claim(self, ticket: Ticket) -> ClaimOutcome:
        """One ticket, one stream: refused if this worker saw the ticket, else the app decides."""
        if not self._local_claims.claim(ticket):
            return ClaimOutcome.REFUSED
        if self.claimer is None:
            return ClaimOutcome.GRANTED
        return await self.claimer.claim(ticket)

    # ---- render-thread callbacks, delivered on the event loop ----

    def _engine_ready(self, engine: Engine) -> None:
        if self.status is not WorkerStatus.WARMING:
            return
        self.engine = engine
        self.status = WorkerStatus.READY
        self.metrics.engine_ready.set(1)
        for session in list(self.sessions):
            session.engine_ready(engine)

    def _replicas_changed(self) -> None:
        """A replica became ready or failed: admission counts the ready ones, the metrics show all."""
        counts = Counter(replica.state for replica in self.scheduler.replicas())
        for state in ReplicaState:
            self.metrics.replicas.labels(state.value).set(counts[state])
        if counts[ReplicaState.READY]:
            self.admission.replicas = counts[ReplicaState.READY]

    def replica_report(self) -> list[dict[str, str | int]]:
        """Each replica's label (its device), state, frames rendered and (failed) error, for /health."""
        report = []
        for replica in self.scheduler.replicas():
            entry: dict[str, str | int] = {
                "replica": replica.label,
                "state": replica.state.value,
                "frames": replica.frames,
            }
            if replica.error is not None:
                entry["error"] = replica.error
            report.append(entry)
        return report

    def _engine_failed(self, exc: BaseException) -> None:
        self.status = WorkerStatus.FAILED
        self.failure = f"{type(exc).__name__}: {exc}"
        for session in list(self.sessions):
            session.close(CloseCode.INTERNAL_ERROR, self._failure_reason())

    def _failure_reason(self) -> str:
        return f"engine failed to load: {self.failure}"

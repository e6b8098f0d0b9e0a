"""Fixtures shared across areas: the whole product as `python -m app` on a free port, and Chromium."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from clerk_backend_api import Clerk

from app.settings import LIVE_ALSO_REQUIRED, LIVE_KEYS, SANDBOX_CLERK_PREFIX, load_settings
from inference.protocol import TYPICAL_CAMERA_FPS
from tests.live_server import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")

# The suite runs on two pytest-xdist workers (pyproject's addopts: `-n 2`): most tests leave one of this
# 2-core machine's cores idle. Tests that assert a rate, a latency or a time window measured on the CPU
# would measure the other worker's load instead, so they wait until every other test has run and then run
# one after another on one worker, with the other stopped (`ParallelThenAlone`).
TIMED_TESTS = (  # node id prefixes: a file, or one test of it
    "tests/soak/",
    "tests/studio/test_camera_rate_browser.py",
    "tests/studio/test_frame_header_browser.py",
    # Whole files of browser tests: a browser's processes use more than one core, so even the tests that
    # only wait for what they check would slow the other worker's timed tests if they ran beside them.
    "tests/studio/test_studio_browser.py",
    "tests/studio/test_studio_readouts.py",
    "tests/inference/engines/test_preview.py::test_each_style_runs_at_15_fps_or_more_on_one_core",
    "tests/inference/test_admission.py",
    "tests/inference/test_pacing.py",
    "tests/inference/test_replicas.py",
    "tests/inference/test_replicas_bench.py",
    "tests/inference/test_replicas_ws.py",
    "tests/inference/test_scheduler.py",
    "tests/inference/test_stream.py",
    "tests/inference/test_ws_flow_control.py",
    "tests/bench/test_app_load_smoke.py",
    "tests/bench/test_loadgen.py",
    "tests/bench/test_preview.py",
    "tests/bench/test_system.py::test_sessions_through_the_scheduler",
    "tests/bench/test_system.py::test_websocket_on_loopback_with_its_levers",
    "tests/bench/test_timeline.py",
    "tests/billing/test_ledger_store.py",
    "tests/billing/test_write_budget_e2e.py",
    "tests/sandbox/test_clerk_emulator.py",
    "tests/sandbox/test_session_token_cost.py",
    "tests/app/test_collector.py",
)


@pytest.hookimpl(optionalhook=True)  # an xdist hook: absent under `-p no:xdist` or `-n 0`
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    from xdist.scheduler import LoadScheduling

    class ParallelThenAlone(LoadScheduling):
        """xdist's load balancing for the untimed tests, a few at a time so that the workers finish
        together; then TIMED_TESTS, all to the first worker that runs out of work, and the others stopped.
        (A worker holds its last test back until it is sent more or told to stop, so "out of work" is one
        test left.)"""

        timed: list[int] | None = None

        def schedule(self) -> None:
            if self.collection is None and self._check_nodes_have_same_collection():
                collection = next(iter(self.node2collection.values()))
                timed = [nodeid.startswith(TIMED_TESTS) for nodeid in collection]
                self.timed = [index for index, is_timed in enumerate(timed) if is_timed]
                untimed = [index for index, is_timed in enumerate(timed) if not is_timed]
                self.collection = collection
                self.maxschedchunk = self.maxschedchunk or len(collection)
                self.pending[:] = untimed
                for node in self.nodes:
                    self._send_tests(node, 2)
                if not self.pending:
                    self._hand_over_timed(self.nodes[0])
                return
            super().schedule()

        def check_schedule(self, node: Any, duration: float = 0) -> None:
            if node.shutting_down:
                return
            if self.pending:
                if len(self.node2pending[node]) < 2:
                    self._send_tests(node, 2 - len(self.node2pending[node]))
            elif self.timed:
                if len(self.node2pending[node]) <= 1:
                    self._hand_over_timed(node)
            else:
                node.shutdown()

        def _hand_over_timed(self, node: Any) -> None:
            assert self.timed is not None
            timed, self.timed = self.timed, []
            if timed:
                self.node2pending[node].extend(timed)
                node.send_runtest_some(timed)
            for each in self.nodes:
                each.shutdown()

    return ParallelThenAlone(config, log)


@dataclass
class AppProcess:
    url: str
    state_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def clerk(self) -> Clerk:
        """The real Clerk SDK against this app's sandbox Clerk, with the secret key its state holds."""
        settings = load_settings({}, state_dir=self.state_dir, dotenv=None)
        return Clerk(bearer_auth=settings.clerk_secret_key, server_url=f"{self.url}{SANDBOX_CLERK_PREFIX}")


def clean_environment(**overrides: str) -> dict[str, str]:
    """The test runner's environment without any live key, so the app always starts in sandbox mode."""
    env = {k: v for k, v in os.environ.items() if k not in (*LIVE_KEYS, *LIVE_ALSO_REQUIRED, "INFERENCE_URL")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides)
    return env


@pytest.fixture
def start_app(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[..., AppProcess]]:
    """Start `python -m app` in sandbox mode on a free port; extra keyword arguments become env vars."""
    started: list[AppProcess] = []

    def start(state_dir: Path | None = None, **env: str) -> AppProcess:
        state = state_dir or tmp_path_factory.mktemp("state")
        port = free_port()
        log_path = state.parent / f"app-{port}.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, "-m", "app", "--port", str(port), "--state-dir", str(state)],
                cwd=tmp_path_factory.getbasetemp(),  # no stray .env from the developer's checkout
                env=clean_environment(PYTHONPATH=str(ROOT), **env),
                stdout=log_file,
                stderr=subprocess.STDOUT,
            )
        running = AppProcess(
            url=f"http://127.0.0.1:{port}", state_dir=state, process=process, log_path=log_path
        )
        started.append(running)
        wait_until_healthy(process, running.url, running.log_path, "python -m app")
        return running

    yield start
    for running in started:
        stop_process(running.process)


def wait_until_healthy(process: subprocess.Popen[bytes], url: str, log_path: Path, command: str) -> None:
    """Until `url`/health answers 200; fails with the process's log if it exits or takes over a minute."""
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{command} exited early:\n{log_path.read_text(errors='replace')}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{command} did not become healthy:\n{log_path.read_text(errors='replace')}")
        time.sleep(0.1)


def stop_process(process: subprocess.Popen[bytes]) -> None:
    process.terminate()
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()


def chromium_available() -> bool:
    return Path(CHROMIUM).is_file() or shutil.which(CHROMIUM) is not None


@pytest.fixture
def camera_fps() -> int:
    """The fake webcam's frame rate: a typical webcam's, unless a test parametrizes ``camera_fps``."""
    return TYPICAL_CAMERA_FPS


@pytest.fixture
def browser(camera_fps: int) -> Iterator[object]:
    """Headless Debian Chromium with a fake webcam (``camera_fps`` frames a second; Chromium's own default
    is 20). In CI a missing browser is a failure, not a skip.

    Per test, not per session: Playwright's sync API keeps an event loop running on the main thread
    while it is started, which would break `asyncio.run()` in every later test."""
    if not chromium_available():
        if IN_CI:
            pytest.fail(f"Chromium not found at {CHROMIUM}; .ci/run installs it from Debian packages")
        pytest.skip(f"Chromium not found at {CHROMIUM} (install Debian's chromium to run browser tests)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=CHROMIUM,
            headless=True,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--use-fake-device-for-media-stream=fps={camera_fps}",
                "--use-fake-ui-for-media-stream",
                "--autoplay-policy=no-user-gesture-required",
            ],
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: object) -> Iterator[object]:
    context = browser.new_context(accept_downloads=True, viewport={"width": 1280, "height": 900})  # type: ignore[attr-defined]
    context.set_default_timeout(15_000)
    opened = context.new_page()
    yield opened
    close_context(context)


def close_context(context: Any) -> None:
    """Close a browser context with its request routes removed first. A routed request that arrives while
    the context closes is held by Playwright, and the close waits for the route's handler, which waits for
    that request: both wait for good. Routes removed without waiting for their handlers cannot."""
    for opened in context.pages:
        opened.unroute_all(behavior="ignoreErrors")
    context.unroute_all(behavior="ignoreErrors")
    # Each page left for a blank one first, so no socket, camera, poll or request of the app's is still in
    # flight when the context closes (a studio that had streamed, signed out and stopped once held a close
    # for minutes).
    for opened in context.pages:
        with contextlib.suppress(Exception):
            opened.goto("about:blank", timeout=5_000)
    context.close()


def save_screenshot(page: object, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)  # type: ignore[attr-defined]
    return path


def sign_in(page: object, base_url: str, email: str, next_path: str = "/studio") -> None:
    """Sign in through the sandbox form as a person would."""
    page.goto(f"{base_url}/sign-in?next={next_path}")  # type: ignore[attr-defined]
    page.fill("input[name=email]", email)  # type: ignore[attr-defined]
    page.click("[data-testid=sign-in]")  # type: ignore[attr-defined]
    page.wait_for_url(f"{base_url}{next_path}*")  # type: ignore[attr-defined]

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

from app.settings import LIVE_ALSO_REQUIRED, LIVE_KEYS
from inference.protocol import TYPICAL_CAMERA_FPS
from tests.live_server import free_port

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = os.environ.get("CHROMIUM_PATH", "/usr/bin/chromium")
ARTIFACTS = ROOT / "test-artifacts"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


@dataclass
class AppProcess:
    url: str
    state_dir: Path
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


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

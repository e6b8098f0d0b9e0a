"""`python -m app`: serve the whole product, in the mode app/settings.py decides (sandbox on loopback)."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import uvicorn

from app.collector import CollectorPolicy
from app.settings import ConfigError, load_settings

# How long an idle HTTP connection stays open. Longer than the studio's meter poll (every 5 s), so a tab's
# polls reuse one connection instead of opening a new one each time (uvicorn's default is 5 s).
KEEP_ALIVE_SECONDS = 30

log = logging.getLogger("stylecast")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="Serve Stylecast.")
    parser.add_argument("--host", help="interface to bind (env STYLECAST_HOST, default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to bind (env STYLECAST_PORT, default 8000)")
    parser.add_argument("--state-dir", type=Path, help="sandbox state directory (env STYLECAST_STATE_DIR)")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = load_settings(host=args.host, port=args.port, state_dir=args.state_dir)
    except ConfigError as exc:
        log.error("refusing to start: %s", exc)
        return 2

    logging.getLogger().setLevel(settings.log_level)
    from app.factory import create_app
    from inference.config import WorkerConfigError
    from inference.server import WEBSOCKET_SERVER_OPTIONS

    try:
        app = create_app(settings)
    except WorkerConfigError as exc:  # the in-process worker's settings
        log.error("refusing to start: %s", exc)
        return 2
    log.info("Stylecast in %s mode at %s", settings.mode.value, settings.app_url)
    if settings.sandbox_exposure:
        # Only reachable with STYLECAST_MODE=sandbox: the operator asked for it, but must not miss it.
        log.warning(
            "SANDBOX MODE IS EXPOSED (%s): anyone who reaches this server can sign in as any email "
            "without a password and get any plan for free. Never serve real users like this; "
            "set the live keys for a public deployment.",
            "; ".join(settings.sandbox_exposure),
        )
    log.debug("settings: %s", settings.redacted())
    if settings.is_sandbox:
        log.info(
            "sandbox state in %s (Clerk and ChargeBee emulators, generated keys)",
            settings.state_dir.resolve(),
        )
    # Everything built so far lives as long as the process, and full collections must stay short
    # (app/collector.py).
    CollectorPolicy().install()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        timeout_keep_alive=KEEP_ALIVE_SECONDS,
        log_level=settings.log_level.lower(),
        proxy_headers=True,
        **WEBSOCKET_SERVER_OPTIONS,  # the sandbox serves the worker's /ws from this process
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

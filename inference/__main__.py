"""Serve the worker on its own: `uv run python -m inference --host 0.0.0.0 --port 8001 --engine flux2`."""

from __future__ import annotations

import argparse
import logging
import sys

import uvicorn

from inference.config import ENGINE_NAMES, WorkerConfigError, load_worker_config
from inference.server import WEBSOCKET_SERVER_OPTIONS, create_inference_app


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m inference", description="Stylecast GPU worker")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8001, help="port (default 8001)")
    parser.add_argument("--engine", choices=ENGINE_NAMES, help="overrides INFERENCE_ENGINE")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    args = parser.parse_args(argv)

    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        config = load_worker_config(engine=args.engine)
    except WorkerConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    app = create_inference_app(config)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, **WEBSOCKET_SERVER_OPTIONS)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Every setting of the web app, read from the environment (and an optional `.env`) in one place.

Two modes:

* **sandbox** (default, no Clerk/ChargeBee keys set): the app mounts local emulators of the Clerk and
  ChargeBee APIs and talks to them over HTTP through the real SDKs; secrets are generated once and kept in
  the state directory.
* **live** (every key set): the real Clerk instance and ChargeBee site.

Anything in between refuses to start and names every missing variable.
"""

from __future__ import annotations

import base64
import hashlib
import os
from collections.abc import Mapping
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from app.sandbox.keys import SandboxSecrets, load_or_create_sandbox_secrets

# Variables that decide the mode: all of them set means live, none of them means sandbox.
LIVE_KEYS: tuple[str, ...] = (
    "CLERK_SECRET_KEY",
    "CLERK_PUBLISHABLE_KEY",
    "CLERK_JWT_KEY",
    "CHARGEBEE_SITE",
    "CHARGEBEE_API_KEY",
    "CHARGEBEE_WEBHOOK_USERNAME",
    "CHARGEBEE_WEBHOOK_PASSWORD",
)
# Live mode also needs these: the secret shared with the GPU worker and the public origin.
LIVE_ALSO_REQUIRED: tuple[str, ...] = ("STREAM_SECRET", "APP_URL")

# HS256 keys shorter than the hash output weaken ticket and report signatures.
MIN_STREAM_SECRET_BYTES = 32

SANDBOX_CLERK_PREFIX = "/sandbox/clerk/v1"
SANDBOX_CHARGEBEE_PREFIX = "/sandbox/chargebee"
SANDBOX_CHARGEBEE_SITE = "stylecast-sandbox"


class Mode(StrEnum):
    SANDBOX = "sandbox"
    LIVE = "live"


class ConfigError(Exception):
    """The environment does not describe a deployment that can start."""


class Settings(msgspec.Struct, frozen=True, kw_only=True):
    mode: Mode
    host: str
    port: int
    state_dir: Path
    # The origin browsers use to reach the app. Session tokens must name it as their authorized party.
    app_url: str
    # Where the app itself reaches its own HTTP server (the sandbox emulators live there).
    internal_url: str

    clerk_secret_key: str
    clerk_publishable_key: str
    clerk_jwt_key: str
    clerk_api_url: str
    # Sandbox only: the private half of the key pair that signs sandbox session tokens.
    sandbox_jwt_private_key: str | None

    chargebee_site: str
    chargebee_api_key: str
    # The SDK builds its endpoint as "{protocol}://{site}.{domain}/api/v2".
    chargebee_domain: str
    chargebee_protocol: str
    chargebee_webhook_username: str
    chargebee_webhook_password: str
    chargebee_item_price_pro: str
    chargebee_item_price_ultra: str
    price_pro_display: str
    price_ultra_display: str

    stream_secret: str
    # Public WebSocket URL of the GPU worker; None serves the worker in-process at /ws.
    inference_url: str | None
    inference_engine: str
    # Where the worker posts usage reports; defaults to this app.
    usage_report_url: str

    free_plan_seconds: int
    csrf_secret: str
    log_level: str

    @property
    def is_sandbox(self) -> bool:
        return self.mode is Mode.SANDBOX

    @property
    def clerk_frontend_api(self) -> str | None:
        """The Clerk Frontend API host encoded in the publishable key (live mode only)."""
        return frontend_api_from_publishable_key(self.clerk_publishable_key) if not self.is_sandbox else None

    def redacted(self) -> dict[str, object]:
        """The settings with every secret masked, safe to log."""
        shown = msgspec.structs.asdict(self)
        for name in _SECRET_FIELDS:
            if shown.get(name):
                shown[name] = "***"
        return shown


_SECRET_FIELDS = (
    "clerk_secret_key",
    "clerk_jwt_key",
    "sandbox_jwt_private_key",
    "chargebee_api_key",
    "chargebee_webhook_password",
    "stream_secret",
    "csrf_secret",
)


def frontend_api_from_publishable_key(publishable_key: str) -> str:
    """`pk_test_<base64("example.clerk.accounts.dev$")>` -> `example.clerk.accounts.dev`."""
    try:
        encoded = publishable_key.split("_", 2)[2]
        decoded = base64.b64decode(encoded + "=" * (-len(encoded) % 4)).decode()
    except (IndexError, ValueError) as exc:
        raise ConfigError("CLERK_PUBLISHABLE_KEY is not a Clerk publishable key") from exc
    if not decoded.endswith("$"):
        raise ConfigError("CLERK_PUBLISHABLE_KEY is not a Clerk publishable key")
    return decoded[:-1]


def read_dotenv(path: Path) -> dict[str, str]:
    """A small `.env` reader: KEY=VALUE lines, `#` comments, optional `export` and quotes."""
    values: dict[str, str] = {}
    if not path.is_file():
        return values
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#") or "=" not in line:
            continue
        key, _, value = line.removeprefix("export ").partition("=")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        values[key.strip()] = value
    return values


def load_settings(
    environ: Mapping[str, str] | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    state_dir: Path | str | None = None,
    dotenv: Path | None = Path(".env"),
) -> Settings:
    """Build the settings; explicit arguments (the CLI's options) win over the environment.

    Variables already in the environment win over `.env`, as with every dotenv loader.
    """
    env: dict[str, str] = dict(read_dotenv(dotenv)) if dotenv is not None else {}
    env.update(os.environ if environ is None else environ)

    def get(name: str, default: str = "") -> str:
        return env.get(name, "").strip() or default

    bind_host = host or get("STYLECAST_HOST", "127.0.0.1")
    try:
        bind_port = port if port is not None else int(get("STYLECAST_PORT", "8000"))
    except ValueError as exc:
        raise ConfigError("STYLECAST_PORT must be a number") from exc
    state = Path(state_dir or get("STYLECAST_STATE_DIR", ".stylecast")).expanduser()

    present = [k for k in LIVE_KEYS if get(k)]
    mode = Mode.LIVE if present else Mode.SANDBOX
    if mode is Mode.LIVE:
        missing = [k for k in (*LIVE_KEYS, *LIVE_ALSO_REQUIRED) if not get(k)]
        if missing:
            raise ConfigError(
                "Half-configured deployment: some live keys are set "
                f"({', '.join(present)}) but these are missing: {', '.join(missing)}. "
                "Set all of them for live mode, or none of the Clerk/ChargeBee keys for sandbox mode."
            )

    # The address the app reaches itself on: a wildcard bind is still reachable on loopback.
    loopback = bind_host if bind_host.count(".") == 3 and bind_host != "0.0.0.0" else "127.0.0.1"  # noqa: S104
    internal_url = f"http://{_host_for_url(loopback)}:{bind_port}"
    browser_host = loopback if bind_host == "0.0.0.0" else bind_host  # noqa: S104
    app_url = get("APP_URL", f"http://{_host_for_url(browser_host)}:{bind_port}").rstrip("/")
    if urlsplit(app_url).scheme not in ("http", "https"):
        raise ConfigError("APP_URL must be an http(s) origin such as https://stylecast.example.com")

    if mode is Mode.SANDBOX:
        sandbox = load_or_create_sandbox_secrets(state)
        clerk = _sandbox_clerk(sandbox, internal_url)
        chargebee = _sandbox_chargebee(sandbox, internal_url, bind_port)
        stream_secret = get("STREAM_SECRET", sandbox.stream_secret)
        csrf_secret = sandbox.csrf_secret
    else:
        clerk = {
            "clerk_secret_key": get("CLERK_SECRET_KEY"),
            "clerk_publishable_key": get("CLERK_PUBLISHABLE_KEY"),
            "clerk_jwt_key": get("CLERK_JWT_KEY").replace("\\n", "\n"),
            "clerk_api_url": get("CLERK_API_URL", "https://api.clerk.com/v1"),
            "sandbox_jwt_private_key": None,
        }
        frontend_api_from_publishable_key(clerk["clerk_publishable_key"])  # validates the key's shape
        chargebee = {
            "chargebee_site": get("CHARGEBEE_SITE"),
            "chargebee_api_key": get("CHARGEBEE_API_KEY"),
            "chargebee_domain": get("CHARGEBEE_DOMAIN", "chargebee.com"),
            "chargebee_protocol": "https",
            "chargebee_webhook_username": get("CHARGEBEE_WEBHOOK_USERNAME"),
            "chargebee_webhook_password": get("CHARGEBEE_WEBHOOK_PASSWORD"),
        }
        stream_secret = get("STREAM_SECRET")
        if len(stream_secret.encode()) < MIN_STREAM_SECRET_BYTES:
            raise ConfigError(f"STREAM_SECRET must be at least {MIN_STREAM_SECRET_BYTES} bytes long")
        csrf_secret = get("CSRF_SECRET") or _derive_csrf_secret(stream_secret)

    try:
        free_plan_seconds = int(get("FREE_PLAN_SECONDS", "60"))
    except ValueError as exc:
        raise ConfigError("FREE_PLAN_SECONDS must be a whole number of seconds") from exc

    return Settings(
        mode=mode,
        host=bind_host,
        port=bind_port,
        state_dir=state,
        app_url=app_url,
        internal_url=internal_url,
        **clerk,
        **chargebee,
        chargebee_item_price_pro=get("CHARGEBEE_ITEM_PRICE_PRO", "stylecast-pro-USD-monthly"),
        chargebee_item_price_ultra=get("CHARGEBEE_ITEM_PRICE_ULTRA", "stylecast-ultra-USD-monthly"),
        price_pro_display=get("PRICE_PRO_DISPLAY", "$12 / month"),
        price_ultra_display=get("PRICE_ULTRA_DISPLAY", "$20 / month"),
        stream_secret=stream_secret,
        inference_url=get("INFERENCE_URL") or None,
        inference_engine=get("INFERENCE_ENGINE", "preview"),
        usage_report_url=get("USAGE_REPORT_URL", f"{internal_url}/api/usage/report"),
        free_plan_seconds=free_plan_seconds,
        csrf_secret=csrf_secret,
        log_level=get("LOG_LEVEL", "INFO").upper(),
    )


def _host_for_url(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def _derive_csrf_secret(stream_secret: str) -> str:
    # A stable CSRF secret across restarts and replicas without one more variable to set.
    return hashlib.sha256(b"stylecast-csrf:" + stream_secret.encode()).hexdigest()


def _sandbox_clerk(sandbox: SandboxSecrets, internal_url: str) -> dict[str, str | None]:
    return {
        "clerk_secret_key": sandbox.clerk_secret_key,
        "clerk_publishable_key": "pk_test_sandbox",
        "clerk_jwt_key": sandbox.jwt_public_key_pem,
        "clerk_api_url": f"{internal_url}{SANDBOX_CLERK_PREFIX}",
        "sandbox_jwt_private_key": sandbox.jwt_private_key_pem,
    }


def _sandbox_chargebee(sandbox: SandboxSecrets, internal_url: str, port: int) -> dict[str, str]:
    # The SDK only knows "{protocol}://{site}.{domain}/api/v2". Splitting the loopback host at its
    # first dot lets it reach "http://127.0.0.1:PORT/sandbox/chargebee/api/v2" unchanged.
    host = urlsplit(internal_url).hostname or "127.0.0.1"
    site, _, rest = host.partition(".")
    return {
        "chargebee_site": site,
        "chargebee_api_key": sandbox.chargebee_api_key,
        "chargebee_domain": f"{rest}:{port}{SANDBOX_CHARGEBEE_PREFIX}",
        "chargebee_protocol": "http",
        "chargebee_webhook_username": "chargebee",
        "chargebee_webhook_password": sandbox.chargebee_webhook_password,
    }

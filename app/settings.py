"""Every setting of the web app, read from the environment (and an optional `.env`) in one place.

Two modes:

* **sandbox**: the app mounts local emulators of the Clerk and ChargeBee APIs and talks to them over HTTP
  through the real SDKs; secrets are generated once and kept in the state directory. Anyone who reaches
  it can sign in as any email without a password and "pay" for any plan, so it only starts where that is
  safe: bound to a loopback address with a plain-http APP_URL, or when STYLECAST_MODE=sandbox says so
  (and then warns loudly).
* **live**: the real Clerk instance and ChargeBee site; every live variable must be set.

`STYLECAST_MODE` (sandbox | live) chooses; unset, the environment must make the choice unambiguous: every
live key set means live, none of them on loopback means sandbox, anything else refuses to start and names
what is missing.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import os
from collections.abc import Callable, Mapping
from enum import StrEnum
from pathlib import Path
from urllib.parse import urlsplit

import msgspec

from inference.config import MIN_SECRET_BYTES
from sandbox.keys import SandboxSecrets, load_or_create_sandbox_secrets

# Variables that decide the mode when STYLECAST_MODE is unset: all of them set means live, none of them
# (on a loopback address) means sandbox.
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

# The webhook's Basic password is the only thing that authenticates ChargeBee's events, and anyone on the
# internet can try it: long enough that guessing is hopeless (a random 16-character string is ~95 bits).
MIN_WEBHOOK_PASSWORD_CHARS = 16
_HOW_TO_GENERATE = "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'"

SANDBOX_CLERK_PREFIX = "/sandbox/clerk/v1"
SANDBOX_CHARGEBEE_PREFIX = "/sandbox/chargebee"
SANDBOX_CHARGEBEE_SITE = "stylecast-sandbox"


class Mode(StrEnum):
    SANDBOX = "sandbox"
    LIVE = "live"


class ConfigError(Exception):
    """The environment does not describe a deployment that can start."""


def is_loopback_host(host: str) -> bool:
    """127.0.0.0/8, ::1 and `localhost`: addresses no other machine can connect to."""
    name = host.strip().removeprefix("[").removesuffix("]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


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
    # Whether /schema (the OpenAPI document) is served: sandbox by default, live only with STYLECAST_OPENAPI.
    openapi: bool

    @property
    def is_sandbox(self) -> bool:
        return self.mode is Mode.SANDBOX

    @property
    def sandbox_exposure(self) -> tuple[str, ...]:
        """Why this sandbox may be reachable from other machines (empty: loopback only, or live mode)."""
        if not self.is_sandbox:
            return ()
        reasons = []
        if not is_loopback_host(self.host):
            reasons.append(f"it listens on {self.host}, which is not a loopback address")
        app_url = urlsplit(self.app_url)
        if app_url.scheme == "https":
            reasons.append(f"APP_URL={self.app_url} is https")
        elif not is_loopback_host(app_url.hostname or ""):
            reasons.append(f"APP_URL={self.app_url} names a host other than this machine")
        return tuple(reasons)

    @property
    def worker_url(self) -> str:
        """The GPU worker's WebSocket URL the studio connects to: INFERENCE_URL, or this app's own /ws (the
        in-process worker) on the public origin, which is also what the Content-Security-Policy allows."""
        if self.inference_url:
            return self.inference_url
        origin = urlsplit(self.app_url)
        return f"{'wss' if origin.scheme == 'https' else 'ws'}://{origin.netloc}/ws"

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
    # How the operator named the bind host, for messages: the CLI option wins over the variable.
    host_source = f"--host {bind_host}" if host else f"STYLECAST_HOST={bind_host}"
    try:
        bind_port = port if port is not None else int(get("STYLECAST_PORT", "8000"))
    except ValueError as exc:
        raise ConfigError("STYLECAST_PORT must be a number") from exc
    state = Path(state_dir or get("STYLECAST_STATE_DIR", ".stylecast")).expanduser()

    loopback = _self_address(bind_host)
    internal_url = f"http://{_host_for_url(loopback)}:{bind_port}"
    browser_host = loopback if bind_host == "0.0.0.0" else bind_host  # noqa: S104
    app_url = get("APP_URL", f"http://{_host_for_url(browser_host)}:{bind_port}").rstrip("/")
    if urlsplit(app_url).scheme not in ("http", "https"):
        raise ConfigError("APP_URL must be an http(s) origin such as https://stylecast.example.com")

    mode = _decide_mode(get, host_source=host_source, bind_host=bind_host, app_url=app_url)

    if mode is Mode.SANDBOX:
        if ":" in loopback:
            # The ChargeBee SDK only builds "{protocol}://{site}.{domain}": no way to write "[::1]".
            raise ConfigError(
                f"{host_source}: the sandbox reaches its ChargeBee emulator through the ChargeBee SDK, which "
                "cannot address an IPv6 literal; bind 127.0.0.1 or localhost instead"
            )
        sandbox = load_or_create_sandbox_secrets(state)
        clerk = _sandbox_clerk(sandbox, internal_url)
        chargebee = _sandbox_chargebee(sandbox, internal_url, bind_port)
        stream_secret = get("STREAM_SECRET", sandbox.stream_secret)
        default_csrf_secret = sandbox.csrf_secret
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
        _check_webhook_credentials(
            chargebee["chargebee_webhook_username"], chargebee["chargebee_webhook_password"]
        )
        stream_secret = get("STREAM_SECRET")
        default_csrf_secret = _derive_csrf_secret(stream_secret)
    # Checked in both modes: a sandbox override reaches the same signatures, and the in-process worker
    # would otherwise refuse it later with a less clear error.
    _check_secret("STREAM_SECRET", stream_secret)
    csrf_secret = get("CSRF_SECRET")
    if csrf_secret:
        _check_secret("CSRF_SECRET", csrf_secret)
    else:
        csrf_secret = default_csrf_secret

    openapi = _flag(get, "STYLECAST_OPENAPI", default=mode is Mode.SANDBOX)

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
        openapi=openapi,
    )


def _decide_mode(get: Callable[[str], str], *, host_source: str, bind_host: str, app_url: str) -> Mode:
    """The mode the environment asks for, or ConfigError when it does not say so unambiguously."""
    chosen = get("STYLECAST_MODE").lower()
    present = [k for k in LIVE_KEYS if get(k)]
    missing_for_live = [k for k in (*LIVE_KEYS, *LIVE_ALSO_REQUIRED) if not get(k)]
    if chosen == Mode.LIVE:
        if missing_for_live:
            raise ConfigError(f"STYLECAST_MODE=live but these are missing: {', '.join(missing_for_live)}")
        return Mode.LIVE
    if chosen == Mode.SANDBOX:
        if present:
            raise ConfigError(
                f"STYLECAST_MODE=sandbox but live keys are set ({', '.join(present)}): ambiguous. "
                "Unset them for sandbox mode, or set STYLECAST_MODE=live."
            )
        return Mode.SANDBOX
    if chosen:
        raise ConfigError(f"STYLECAST_MODE must be sandbox or live (or unset), not {chosen!r}")

    if present:
        if missing_for_live:
            raise ConfigError(
                "Half-configured deployment: some live keys are set "
                f"({', '.join(present)}) but these are missing: {', '.join(missing_for_live)}. "
                "Set all of them for live mode, or none of the Clerk/ChargeBee keys for sandbox mode."
            )
        return Mode.LIVE
    unsafe = []
    if not is_loopback_host(bind_host):
        unsafe.append(f"{host_source} is not a loopback address")
    if urlsplit(app_url).scheme == "https":
        unsafe.append(f"APP_URL={app_url} is https, which only a public deployment needs")
    if unsafe:
        raise ConfigError(
            f"{' and '.join(unsafe)}: sandbox mode (passwordless sign-in as any email, free checkout) only "
            "starts on a loopback address with a plain-http APP_URL unless STYLECAST_MODE=sandbox; "
            f"for live mode set: {', '.join(missing_for_live)}"
        )
    return Mode.SANDBOX


def _check_secret(name: str, value: str) -> None:
    # HMAC keys shorter than the hash output weaken every signature. The worker's own minimum, so the app
    # never accepts a stream secret its worker refuses.
    if len(value.encode()) < MIN_SECRET_BYTES:
        raise ConfigError(f"{name} must be at least {MIN_SECRET_BYTES} bytes long; {_HOW_TO_GENERATE}")


def _check_webhook_credentials(username: str, password: str) -> None:
    # RFC 7617: the user-id of Basic credentials cannot contain a colon; the first colon ends it.
    if ":" in username:
        raise ConfigError("CHARGEBEE_WEBHOOK_USERNAME must not contain ':' (HTTP Basic cannot carry it)")
    if len(password) < MIN_WEBHOOK_PASSWORD_CHARS:
        raise ConfigError(
            f"CHARGEBEE_WEBHOOK_PASSWORD must be at least {MIN_WEBHOOK_PASSWORD_CHARS} characters long "
            f"(set the same one on the webhook in ChargeBee); {_HOW_TO_GENERATE}"
        )


def _flag(get: Callable[[str], str], name: str, *, default: bool) -> bool:
    value = get(name).lower()
    if not value:
        return default
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name} must be 1 or 0 (true/false), not {value!r}")


def _self_address(bind_host: str) -> str:
    """The address the app reaches its own server on: the bind address itself, or IPv4 loopback for a
    wildcard or a name (a wildcard bind is reachable there, and `localhost` binds it too)."""
    name = bind_host.removeprefix("[").removesuffix("]")
    try:
        address = ipaddress.ip_address(name)
    except ValueError:
        return "127.0.0.1"
    return "127.0.0.1" if address.is_unspecified else str(address)


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

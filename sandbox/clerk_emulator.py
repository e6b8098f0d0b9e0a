"""An emulator of the part of Clerk's Backend API that Stylecast uses, for sandbox mode (no Clerk keys).

The web app talks to it only through the official `clerk-backend-api` SDK over HTTP, exactly as it would
talk to api.clerk.com, so the emulator has to answer with Clerk's JSON shapes, status codes and error
codes. It also enforces the limits real Clerk enforces on user metadata (8 KB, a per-user write rate),
so code that would break in production breaks in the sandbox first.

It also plays the part of Clerk's Frontend API that a browser uses to stay signed in (clients, sessions,
60-second session tokens; see sandbox/clerk_sessions.py), on the same origin as the app, the way a
Frontend API proxy serves it: `{api_path}/client...` (`/sandbox/clerk/v1/client` where the web app mounts
it), authenticated by the browser's `__client` cookie instead of the secret key.

Users live in one JSON file, replaced atomically after every change, so a restart loses nothing; clients
and sessions live in a second file that several app processes share.
"""

from __future__ import annotations

import asyncio
import hmac
import math
import os
import re
import secrets
import string
import time
from collections import deque
from collections.abc import Callable, Iterable
from datetime import datetime
from pathlib import Path
from typing import Any

import msgspec
from litestar import Request, Response, Router, delete, get, patch, post, put
from litestar.datastructures import Cookie
from litestar.enums import MediaType
from litestar.exceptions import HTTPException
from litestar.params import FromPath

from sandbox import clerk_sessions as sessions
from sandbox.clerk_sessions import FrontendSettings, SessionStore
from sandbox.files import write_private_file

# Where Clerk serves its Backend API (api.clerk.com/v1), unless the mounting app says otherwise.
API_PATH = "/v1"
CLIENT_COOKIE = "__client"
CLIENT_UAT_COOKIE = "__client_uat"
SESSION_COOKIE = "__session"
STORE_FORMAT = "stylecast-clerk-emulator/1"
# The journal is folded into a new snapshot once it is larger than this and than the snapshot.
DEFAULT_JOURNAL_MIN_BYTES = 1 << 20

# Clerk documents 8 KB for user metadata; we count public and private together because both ride in the
# same backend writes and both end up in the session token claims we build.
METADATA_MAX_BYTES = 8 * 1024
METADATA_WRITES_PER_WINDOW = 10
METADATA_WRITE_WINDOW_S = 10.0
# Clerk's Backend API limit for a production instance: 1,000 requests per 10 s, all callers together.
INSTANCE_REQUESTS_PER_WINDOW = 1000
INSTANCE_WINDOW_S = 10.0
LIST_LIMIT_MAX = 500

_ID_ALPHABET = string.ascii_letters + string.digits
_EMAIL_SHAPE = re.compile(r"^[^@\s]+@[^@\s]+\.[^@\s.]+$")
_ORDERABLE = {
    "created_at",
    "updated_at",
    "email_address",
    "web3wallet",
    "first_name",
    "last_name",
    "phone_number",
    "username",
    "last_active_at",
    "last_sign_in_at",
}
_NULLABLE_STRINGS = ("external_id", "first_name", "last_name", "username", "locale")
_OPTIONAL_BOOLS = ("delete_self_enabled", "create_organization_enabled", "bypass_client_trust")
_METADATA_FIELDS = ("public_metadata", "private_metadata", "unsafe_metadata")
# The SDK sends some of these by default (e.g. notify_primary_email_address_changed=false); they change
# nothing the emulator models, so accepting them keeps SDK calls working.
_NO_OP_CREATE = {
    "skip_password_checks",
    "skip_password_requirement",
    "skip_legal_checks",
    "skip_user_requirement",
}
_NO_OP_UPDATE = {"notify_primary_email_address_changed", "sign_out_of_other_sessions", "skip_password_checks"}
_CREATE_FIELDS = {
    *_NULLABLE_STRINGS,
    *_OPTIONAL_BOOLS,
    *_METADATA_FIELDS,
    "email_address",
    "create_organizations_limit",
    "legal_accepted_at",
    "created_at",
    "banned",
    "locked",
    *_NO_OP_CREATE,
}
_UPDATE_FIELDS = {
    *_NULLABLE_STRINGS,
    *_OPTIONAL_BOOLS,
    *_METADATA_FIELDS,
    "primary_email_address_id",
    "create_organizations_limit",
    "legal_accepted_at",
    "created_at",
    *_NO_OP_UPDATE,
}

_BAD_KEY = "The provided Clerk Secret Key is invalid. Make sure that your Clerk Secret Key is correct."

_json_encoder = msgspec.json.Encoder()


class ClerkAPIError(Exception):
    """An error the emulator answers in Clerk's shape: `{"errors": [...], "clerk_trace_id": ...}`."""

    def __init__(
        self,
        status_code: int,
        code: str,
        message: str,
        long_message: str | None = None,
        *,
        meta: dict[str, Any] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status_code} {code}: {message}")
        self.status_code = status_code
        self.code = code
        self.message = message
        self.long_message = long_message or message
        self.meta = meta or {}
        self.headers = headers or {}

    def to_response(self) -> Response[bytes]:
        body = {
            "errors": [
                {
                    "message": self.message,
                    "long_message": self.long_message,
                    "code": self.code,
                    "meta": self.meta,
                }
            ],
            "clerk_trace_id": secrets.token_hex(16),
        }
        return Response(
            content=_json_encoder.encode(body),
            status_code=self.status_code,
            media_type=MediaType.JSON,
            headers=self.headers,
        )


def _now_ms() -> int:
    return int(time.time() * 1000)


def _new_id(prefix: str) -> str:
    # Clerk ids are a prefix plus a 27-character base62 KSUID; random base62 keeps the same look.
    return prefix + "".join(secrets.choice(_ID_ALPHABET) for _ in range(27))


def _json_response(content: Any, status_code: int = 200) -> Response[bytes]:
    return Response(content=_json_encoder.encode(content), status_code=status_code, media_type=MediaType.JSON)


async def _settled(durable: asyncio.Future[None] | None, refusal: ClerkAPIError | None) -> None:
    """Wait until what a change was decided against is on disk (the change itself, or the state that
    refused it), then raise the refusal, if there is one."""
    if durable is not None:
        await durable
    if refusal is not None:
        raise refusal


def _param_error(status_code: int, code: str, param: str, message: str, long_message: str) -> ClerkAPIError:
    return ClerkAPIError(status_code, code, message, long_message, meta={"param_name": param})


def _invalid_format(param: str, expected: str) -> ClerkAPIError:
    return _param_error(422, "form_param_format_invalid", param, "is invalid", f"{param} must be {expected}.")


def _not_found(user_id: str) -> ClerkAPIError:
    return ClerkAPIError(404, "resource_not_found", "not found", f"No user was found with id {user_id}")


def _session_not_found(session_id: str) -> ClerkAPIError:
    return ClerkAPIError(404, "resource_not_found", "not found", f"No session was found with id {session_id}")


def _session_json(session: dict[str, Any]) -> dict[str, Any]:
    return {**session, "actor": None, "last_active_organization_id": None, "latest_activity": None}


def merge_metadata(current: dict[str, Any], change: dict[str, Any]) -> dict[str, Any]:
    """Clerk's metadata merge (RFC 7396 JSON merge patch): objects merge key by key at every depth, a
    null deletes the key, and any other value replaces what was there."""
    merged = dict(current)
    for key, value in change.items():
        if value is None:
            merged.pop(key, None)
        elif isinstance(value, dict):
            existing = merged.get(key)
            merged[key] = merge_metadata(existing if isinstance(existing, dict) else {}, value)
        else:
            merged[key] = value
    return merged


def _metadata_size(user: dict[str, Any]) -> int:
    return len(_json_encoder.encode(user["public_metadata"])) + len(
        _json_encoder.encode(user["private_metadata"])
    )


def _normalize_email(value: Any) -> str:
    if not isinstance(value, str) or not _EMAIL_SHAPE.match(value.strip()):
        raise _param_error(
            422,
            "form_param_format_invalid",
            "email_address",
            "is invalid",
            "email_address must be a valid email address.",
        )
    return value.strip().lower()


def _parse_rfc3339_ms(param: str, value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise _invalid_format(param, "an RFC 3339 date-time string")
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise _invalid_format(param, "an RFC 3339 date-time string") from None
    if parsed.tzinfo is None:
        raise _invalid_format(param, "an RFC 3339 date-time string with a time zone")
    return int(parsed.timestamp() * 1000)


def _split_signed(values: Iterable[str]) -> tuple[set[str], set[str]]:
    """Clerk's `+id` / `-id` filter syntax. An unencoded `+` arrives as a space, so that counts too."""
    include: set[str] = set()
    exclude: set[str] = set()
    for raw in values:
        if raw.startswith("-"):
            exclude.add(raw[1:])
        elif raw[:1] in {"+", " "}:
            include.add(raw[1:])
        elif raw:
            include.add(raw)
    return include, exclude


def _email_verification() -> dict[str, Any]:
    # Addresses added through the Backend API are verified by the admin, which is what Clerk reports.
    return {
        "status": "verified",
        "strategy": "admin",
        "attempts": None,
        "expire_at": None,
        "object": "verification_admin",
    }


def _email_object(address: str, now: int) -> dict[str, Any]:
    return {
        "id": _new_id("idn_"),
        "object": "email_address",
        "email_address": address,
        "reserved": False,
        "verification": _email_verification(),
        "linked_to": [],
        "matches_sso_connection": False,
        "created_at": now,
        "updated_at": now,
    }


class _Body:
    """A request's JSON object, read once, with the checks every write shares."""

    def __init__(self, data: dict[str, Any], allowed: set[str]) -> None:
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise _param_error(
                422,
                "form_param_unknown",
                unknown[0],
                "is unknown",
                f"{unknown[0]} is not a parameter this endpoint accepts in the sandbox Clerk emulator.",
            )
        self.data = data

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def nullable_str(self, key: str) -> str | None:
        value = self.data[key]
        if value is not None and not isinstance(value, str):
            raise _invalid_format(key, "a string or null")
        return value

    def optional_bool(self, key: str) -> bool | None:
        value = self.data.get(key)
        if value is not None and not isinstance(value, bool):
            raise _invalid_format(key, "a boolean")
        return value

    def optional_int(self, key: str) -> int | None:
        value = self.data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise _invalid_format(key, "a non-negative integer")
        return value

    def metadata(self, key: str) -> dict[str, Any] | None:
        """The object given for `key`; None when absent. An explicit null clears the metadata."""
        if key not in self.data:
            return None
        value = self.data[key]
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise _invalid_format(key, "a JSON object")
        return value


async def _read_json_object(request: Request[Any, Any, Any]) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        return {}
    try:
        data = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        raise ClerkAPIError(
            400, "request_body_invalid", "Request body invalid", "The request body is not valid JSON."
        ) from None
    if not isinstance(data, dict):
        raise ClerkAPIError(
            400, "request_body_invalid", "Request body invalid", "The request body must be a JSON object."
        )
    return data


def _query_int(request: Request[Any, Any, Any], name: str, default: int, low: int, high: int | None) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _invalid_format(name, "an integer") from None
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _param_error(422, "form_param_value_invalid", name, "is invalid", f"{name} must be {bound}.")
    return value


def _too_many_requests(retry_in_seconds: float) -> ClerkAPIError:
    return ClerkAPIError(
        429,
        "too_many_requests",
        "Too many requests",
        "Too many requests, retry later",
        headers={"Retry-After": str(max(1, math.ceil(retry_in_seconds)))},
    )


class ClerkEmulator:
    """The Clerk Backend API endpoints Stylecast uses (users, sessions, sign-in tokens), served by `.router`
    under `api_path`; given `frontend`, also the Frontend API's client resource under `{api_path}/client`,
    beside the Backend API on the app's origin.

    `request_count`, `metadata_write_count()` and `reset_counters()` let tests see how hard the app leans
    on Clerk's Backend API (e.g. that usage is batched rather than written per frame).
    """

    def __init__(
        self,
        store_path: Path,
        secret_key: str,
        *,
        frontend: FrontendSettings | None = None,
        api_path: str = API_PATH,
        metadata_writes_per_window: int = METADATA_WRITES_PER_WINDOW,
        metadata_write_window_s: float = METADATA_WRITE_WINDOW_S,
        instance_requests_per_window: int = INSTANCE_REQUESTS_PER_WINDOW,
        instance_window_s: float = INSTANCE_WINDOW_S,
        journal_min_bytes: int = DEFAULT_JOURNAL_MIN_BYTES,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not secret_key:
            raise ValueError("the Clerk emulator needs a non-empty secret key")
        self._store_path = Path(store_path)
        self._secret_key = secret_key.encode()
        self._frontend = frontend
        self.api_path = api_path.rstrip("/")
        self.frontend_path = f"{self.api_path}/client"
        self._writes_per_window = metadata_writes_per_window
        self._window_s = metadata_write_window_s
        self._clock = clock
        self._wall_clock = wall_clock
        self.sessions = SessionStore(self._store_path.with_name(sessions.STORE_FILE), clock=wall_clock)
        # Changes are decided one at a time under `_lock` against `_accepted`; `_users` is what is on disk
        # and what is served. A write is answered once the file holding it is on disk (group commit: the
        # changes accepted while one file write runs share the next), so an answered change survives a
        # restart and the cost of a write does not grow with the number of writers.
        self._lock = asyncio.Lock()
        self._journal_path = self._store_path.with_name(self._store_path.name + ".journal")
        self._journal_min_bytes = journal_min_bytes
        self._snapshot_bytes = 0
        self._journal_bytes = 0
        self._users: dict[str, dict[str, Any]] = self._load()
        self._accepted: dict[str, dict[str, Any]] = self._users
        self._changed: dict[str, dict[str, Any] | None] = {}
        self._waiting: list[asyncio.Future[None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._recent_writes: dict[str, deque[float]] = {}
        self._instance_limit = instance_requests_per_window
        self._instance_window_s = instance_window_s
        self._recent_requests: deque[float] = deque()
        self._request_count = 0
        self._rate_limited_count = 0
        self._metadata_writes: dict[str, int] = {}
        self.router = self._build_router()

    # ---- observable counters ---------------------------------------------------------------------------

    @property
    def request_count(self) -> int:
        """Requests that reached the emulator since construction or the last `reset_counters()`."""
        return self._request_count

    @property
    def rate_limited_count(self) -> int:
        """Requests answered 429 (the instance's or a user's limit) since construction or the last reset."""
        return self._rate_limited_count

    def metadata_write_count(self, user_id: str) -> int:
        """Successful metadata writes to `user_id` (merge, replace, or metadata given to an update)."""
        return self._metadata_writes.get(user_id, 0)

    def metadata_write_counts(self) -> dict[str, int]:
        return dict(self._metadata_writes)

    def reset_counters(self) -> None:
        """Zero the counters. The rate limiter keeps its window: resetting statistics is not waiting."""
        self._request_count = 0
        self._rate_limited_count = 0
        self._metadata_writes.clear()

    # ---- persistence -----------------------------------------------------------------------------------

    # The store is a snapshot (`clerk.json`, the whole state) and a journal beside it (`clerk.json.journal`,
    # one line per changed user since the snapshot), so a write appends one user's record instead of
    # rewriting every user's. The journal is folded into a new snapshot once it outgrows the snapshot.

    def _load(self) -> dict[str, dict[str, Any]]:
        users: dict[str, dict[str, Any]] = {}
        if self._store_path.exists():
            stored = msgspec.json.decode(self._store_path.read_bytes())
            if not isinstance(stored, dict) or stored.get("format") != STORE_FORMAT:
                raise ValueError(f"{self._store_path} is not a Clerk emulator store ({STORE_FORMAT})")
            users = {user["id"]: user for user in stored["users"]}
            self._snapshot_bytes = self._store_path.stat().st_size
        if self._journal_path.exists():
            lines = self._journal_path.read_bytes().split(b"\n")
            for number, line in enumerate(lines, start=1):
                if not line:
                    continue
                try:
                    entry = msgspec.json.decode(line)
                except msgspec.DecodeError:
                    if number == len(lines):
                        break  # a change cut off mid-write was never answered: it did not happen
                    raise ValueError(f"{self._journal_path}: line {number} is not a journal entry") from None
                if "put" in entry:
                    users[entry["put"]["id"]] = entry["put"]
                else:
                    users.pop(entry["delete"], None)
            self._journal_bytes = self._journal_path.stat().st_size
        return users

    def _write_store(self, payload: bytes) -> None:
        """A new snapshot of everything, then an empty journal (a crash in between replays the old journal
        over the new snapshot, which changes nothing)."""
        write_private_file(self._store_path, payload)
        self._journal_path.unlink(missing_ok=True)

    def _append_journal(self, lines: bytes) -> None:
        self._journal_path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self._journal_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            view = memoryview(lines)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    def _stage(self, users: dict[str, dict[str, Any]], user_id: str) -> asyncio.Future[None]:
        """Make `users` (in which `user_id` changed or was deleted) the state later changes build on; the
        future is done once it is on disk (and served), or fails with the write's error, in which case none
        of the changes since the last successful write is kept. Callers hold `self._lock` and await the
        future after releasing it."""
        self._accepted = users
        self._changed[user_id] = users.get(user_id)
        durable = asyncio.get_running_loop().create_future()
        self._waiting.append(durable)
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        return durable

    async def _flush(self) -> None:
        try:
            while self._waiting:
                users, batch, changed = self._accepted, self._waiting, self._changed
                self._waiting, self._changed = [], {}
                lines = b"".join(
                    _json_encoder.encode({"put": user} if user is not None else {"delete": user_id}) + b"\n"
                    for user_id, user in changed.items()
                )
                try:
                    if self._journal_bytes + len(lines) > max(self._journal_min_bytes, self._snapshot_bytes):
                        snapshot = _json_encoder.encode(
                            {"format": STORE_FORMAT, "users": list(users.values())}
                        )
                        await asyncio.to_thread(self._write_store, snapshot)
                        self._snapshot_bytes, self._journal_bytes = len(snapshot), 0
                    else:
                        await asyncio.to_thread(self._append_journal, lines)
                        self._journal_bytes += len(lines)
                except Exception as exc:  # every waiter gets the error
                    failed, self._waiting, self._changed = [*batch, *self._waiting], [], {}
                    self._accepted = self._users
                    for waiter in failed:
                        if not waiter.done():
                            waiter.set_exception(exc)
                    return
                self._users = users
                for waiter in batch:
                    if not waiter.done():
                        waiter.set_result(None)
        finally:
            self._flusher = None

    # ---- rules -----------------------------------------------------------------------------------------

    def _user_or_404(self, user_id: str, *, accepted: bool = False) -> dict[str, Any]:
        """The user as served, or (`accepted`, for a change under `_lock`) as the next change finds it."""
        user = (self._accepted if accepted else self._users).get(user_id)
        if user is None:
            raise _not_found(user_id)
        return user

    def _check_rate(self, user_id: str) -> None:
        now = self._clock()
        recent = self._recent_writes.setdefault(user_id, deque())
        while recent and now - recent[0] >= self._window_s:
            recent.popleft()
        if len(recent) >= self._writes_per_window:
            self._rate_limited_count += 1
            raise _too_many_requests(self._window_s - (now - recent[0]))
        recent.append(now)

    def _check_instance_rate(self) -> ClerkAPIError | None:
        """Clerk's instance-wide limit: every Backend API request counts, whoever makes it."""
        now = self._clock()
        recent = self._recent_requests
        while recent and now - recent[0] >= self._instance_window_s:
            recent.popleft()
        if len(recent) >= self._instance_limit:
            self._rate_limited_count += 1
            return _too_many_requests(self._instance_window_s - (now - recent[0]))
        recent.append(now)
        return None

    @staticmethod
    def _check_metadata_size(user: dict[str, Any], written: Iterable[str]) -> None:
        size = _metadata_size(user)
        if size > METADATA_MAX_BYTES:
            param = next((key for key in written if key != "unsafe_metadata"), "public_metadata")
            message = (
                f"The given {param} exceeds the maximum allowed size of {METADATA_MAX_BYTES} bytes (8 KB); "
                f"public and private metadata together would be {size} bytes."
            )
            raise _param_error(422, "form_param_exceeds_allowed_size", param, message, message)

    def _identifier_taken(
        self, emails: Iterable[str], username: str | None, skip_user: str | None
    ) -> ClerkAPIError | None:
        """The refusal for an email address or username another user holds, as the next change finds
        them; None when they are free."""
        wanted = set(emails)
        for user in self._accepted.values():
            if user["id"] == skip_user:
                continue
            if wanted & {entry["email_address"] for entry in user["email_addresses"]}:
                message = "That email address is taken. Please try another."
                return _param_error(422, "form_identifier_exists", "email_address", message, message)
            if username is not None and user["username"] == username:
                message = "That username is taken. Please try another."
                return _param_error(422, "form_identifier_exists", "username", message, message)
        return None

    def _durable_point(self) -> asyncio.Future[None] | None:
        """A future done once every change accepted so far is on disk and served; None when it already is.
        Callers hold `self._lock`. A refusal decided against an accepted change is answered only then, as
        a database answers a conflicting insert only once the winner has committed: whoever is told
        "taken" can find the one who took it."""
        if self._accepted is self._users:
            return None
        durable = asyncio.get_running_loop().create_future()
        self._waiting.append(durable)
        if self._flusher is None:
            self._flusher = asyncio.ensure_future(self._flush())
        return durable

    async def _write_metadata(
        self, user_id: str, change: Callable[[dict[str, Any]], list[str]]
    ) -> dict[str, Any]:
        """Apply a metadata `change` (which edits a copy and names the fields it touched) under the
        per-user rate limit and the size limit, then persist it."""
        async with self._lock:
            current = self._user_or_404(user_id, accepted=True)
            self._check_rate(user_id)
            updated = {**current}
            written = change(updated)
            self._check_metadata_size(updated, written)
            updated["updated_at"] = _now_ms()
            durable = self._stage({**self._accepted, user_id: updated}, user_id)
        await durable
        self._metadata_writes[user_id] = self._metadata_writes.get(user_id, 0) + 1
        return updated

    # ---- listing ---------------------------------------------------------------------------------------

    def _filtered(self, request: Request[Any, Any, Any]) -> list[dict[str, Any]]:
        params = request.query_params
        users = list(self._users.values())
        emails = {value.strip().lower() for value in params.getall("email_address", [])}
        if emails:
            users = [u for u in users if emails & {e["email_address"] for e in u["email_addresses"]}]
        for param, field in (("user_id", "id"), ("external_id", "external_id")):
            include, exclude = _split_signed(params.getall(param, []))
            if include:
                users = [u for u in users if u[field] in include]
            if exclude:
                users = [u for u in users if u[field] not in exclude]
        usernames = set(params.getall("username", []))
        if usernames:
            users = [u for u in users if u["username"] in usernames]
        query = (params.get("query") or "").strip().lower()
        if query:
            users = [u for u in users if any(query in text for text in _searchable(u))]
        email_query = (params.get("email_address_query") or "").strip().lower()
        if email_query:
            users = [u for u in users if any(email_query in e["email_address"] for e in u["email_addresses"])]
        name_query = (params.get("name_query") or "").strip().lower()
        if name_query:
            users = [u for u in users if name_query in _full_name(u).lower()]
        banned = params.get("banned")
        if banned in {"true", "false"}:
            users = [u for u in users if u["banned"] is (banned == "true")]
        return users

    def _ordered(self, users: list[dict[str, Any]], order_by: str) -> list[dict[str, Any]]:
        descending = order_by.startswith("-")
        field = order_by.lstrip("+- ")
        if field not in _ORDERABLE:
            raise _param_error(
                422,
                "form_param_value_invalid",
                "order_by",
                "is invalid",
                f"order_by must be one of {', '.join(sorted(_ORDERABLE))}, optionally prefixed with + or -.",
            )
        position = {user_id: index for index, user_id in enumerate(self._users)}

        def key(user: dict[str, Any]) -> tuple[bool, Any, int]:
            value = _order_value(user, field)
            # Like Postgres: NULLs sort after every value ascending, before them descending.
            return (value is None, value if value is not None else 0, position[user["id"]])

        return sorted(users, key=key, reverse=descending)

    # ---- routes ----------------------------------------------------------------------------------------

    def _build_router(self) -> Router:
        emulator = self

        async def authenticate(request: Request[Any, Any, Any]) -> Response[bytes] | None:
            emulator._request_count += 1
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(
                token.strip().encode(), emulator._secret_key
            ):
                return ClerkAPIError(401, "clerk_key_invalid", _BAD_KEY, _BAD_KEY).to_response()
            limited = emulator._check_instance_rate()
            return limited.to_response() if limited is not None else None

        @get("/users")
        async def list_users(request: Request[Any, Any, Any]) -> Response[bytes]:
            limit = _query_int(request, "limit", 10, 1, LIST_LIMIT_MAX)
            offset = _query_int(request, "offset", 0, 0, None)
            order_by = request.query_params.get("order_by") or "-created_at"
            users = emulator._ordered(emulator._filtered(request), order_by)
            return _json_response(users[offset : offset + limit])

        @get("/users/count")
        async def count_users(request: Request[Any, Any, Any]) -> Response[bytes]:
            return _json_response({"object": "total_count", "total_count": len(emulator._filtered(request))})

        @get("/users/{user_id:str}")
        async def get_user(user_id: FromPath[str]) -> Response[bytes]:
            return _json_response(emulator._user_or_404(user_id))

        @post("/users", status_code=200)
        async def create_user(request: Request[Any, Any, Any]) -> Response[bytes]:
            body = _Body(await _read_json_object(request), _CREATE_FIELDS)
            return _json_response(await emulator._create(body))

        @patch("/users/{user_id:str}")
        async def update_user(user_id: FromPath[str], request: Request[Any, Any, Any]) -> Response[bytes]:
            body = _Body(await _read_json_object(request), _UPDATE_FIELDS)
            return _json_response(await emulator._update(user_id, body))

        @patch("/users/{user_id:str}/metadata")
        async def merge_user_metadata(
            user_id: FromPath[str], request: Request[Any, Any, Any]
        ) -> Response[bytes]:
            body = _Body(await _read_json_object(request), set(_METADATA_FIELDS))

            def merge(user: dict[str, Any]) -> list[str]:
                written = []
                for field in _METADATA_FIELDS:
                    change = body.metadata(field)
                    if change is not None:
                        # A null in place of the whole object deletes all of it, as a null deletes a key.
                        cleared = body.data[field] is None
                        user[field] = {} if cleared else merge_metadata(user[field], change)
                        written.append(field)
                return written

            return _json_response(await emulator._write_metadata(user_id, merge))

        @put("/users/{user_id:str}/metadata", status_code=200)
        async def replace_user_metadata(
            user_id: FromPath[str], request: Request[Any, Any, Any]
        ) -> Response[bytes]:
            body = _Body(await _read_json_object(request), set(_METADATA_FIELDS))

            def replace(user: dict[str, Any]) -> list[str]:
                written = []
                for field in _METADATA_FIELDS:
                    value = body.metadata(field)
                    if value is not None:
                        user[field] = value
                        written.append(field)
                return written

            return _json_response(await emulator._write_metadata(user_id, replace))

        @delete("/users/{user_id:str}", status_code=200)
        async def delete_user(user_id: FromPath[str]) -> Response[bytes]:
            async with emulator._lock:
                emulator._user_or_404(user_id, accepted=True)
                remaining = {uid: user for uid, user in emulator._accepted.items() if uid != user_id}
                durable = emulator._stage(remaining, user_id)
            await durable
            emulator._recent_writes.pop(user_id, None)
            # Clerk ends a deleted user's sessions: no browser can refresh a token for them any more.
            theirs = await asyncio.to_thread(emulator.sessions.sessions_of, user_id=user_id)
            if any(session["status"] == sessions.ACTIVE for session in theirs):
                await asyncio.to_thread(
                    emulator.sessions.update,
                    lambda state, now: sessions.end_sessions_of_user(state, now, user_id),
                )
            return _json_response({"object": "user", "id": user_id, "deleted": True})

        @post("/sign_in_tokens", status_code=200)
        async def create_sign_in_token(request: Request[Any, Any, Any]) -> Response[bytes]:
            body = _Body(await _read_json_object(request), {"user_id", "expires_in_seconds", "org_id"})
            user_id = body.data.get("user_id")
            if not isinstance(user_id, str) or not user_id:
                raise _param_error(
                    422, "form_param_missing", "user_id", "is missing", "user_id must be included."
                )
            emulator._user_or_404(user_id)
            lifetime = body.optional_int("expires_in_seconds") or 30 * 24 * 3600
            secret = secrets.token_urlsafe(32)

            def create(state: dict[str, Any], now: int) -> dict[str, Any]:
                token = {
                    "object": "sign_in_token",
                    "id": sessions.new_id("sit_"),
                    "status": "pending",
                    "user_id": user_id,
                    "token_hash": sessions.secret_hash(secret),
                    "expire_at": now + lifetime * 1000,
                    "created_at": now,
                    "updated_at": now,
                }
                state["sign_in_tokens"][token["id"]] = token
                return token

            token = await asyncio.to_thread(emulator.sessions.update, create)
            shown = {key: value for key, value in token.items() if key not in {"token_hash", "expire_at"}}
            return _json_response({**shown, "token": secret, "url": None})

        @get("/sessions")
        async def list_sessions(request: Request[Any, Any, Any]) -> Response[bytes]:
            params = request.query_params
            user_id, client_id = params.get("user_id"), params.get("client_id")
            if not user_id and not client_id:
                raise _param_error(
                    400,
                    "form_param_missing",
                    "user_id",
                    "is missing",
                    "Either user_id or client_id must be included.",
                )
            limit = _query_int(request, "limit", 10, 1, LIST_LIMIT_MAX)
            offset = _query_int(request, "offset", 0, 0, None)
            status = params.get("status")
            found = emulator.sessions.sessions_of(client_id=client_id or None, user_id=user_id or None)
            if status:
                found = [session for session in found if session["status"] == status]
            found.sort(key=lambda session: session["created_at"], reverse=True)
            return _json_response([_session_json(session) for session in found[offset : offset + limit]])

        @get("/sessions/{session_id:str}")
        async def get_session(session_id: FromPath[str]) -> Response[bytes]:
            session = emulator.sessions.session(session_id)
            if session is None:
                raise _session_not_found(session_id)
            return _json_response(_session_json(session))

        @post("/sessions/{session_id:str}/revoke", status_code=200)
        async def revoke_session(session_id: FromPath[str]) -> Response[bytes]:
            revoked = await asyncio.to_thread(
                emulator.sessions.update, lambda state, now: sessions.end_session(state, now, session_id)
            )
            if revoked is None:
                raise _session_not_found(session_id)
            return _json_response(_session_json(revoked))

        def clerk_error(_: Request[Any, Any, Any], exc: ClerkAPIError) -> Response[bytes]:
            return exc.to_response()

        def http_error(_: Request[Any, Any, Any], exc: HTTPException) -> Response[bytes]:
            return ClerkAPIError(
                exc.status_code, "request_invalid", str(exc.detail), str(exc.detail)
            ).to_response()

        backend = Router(
            path=self.api_path,
            route_handlers=[
                list_users,
                count_users,
                get_user,
                create_user,
                update_user,
                merge_user_metadata,
                replace_user_metadata,
                delete_user,
                create_sign_in_token,
                list_sessions,
                get_session,
                revoke_session,
            ],
            before_request=authenticate,
            exception_handlers={ClerkAPIError: clerk_error, HTTPException: http_error},
            include_in_schema=False,
        )
        if self._frontend is None:
            return backend
        frontend = Router(
            path=self.frontend_path,
            route_handlers=self._frontend_handlers(self._frontend),
            exception_handlers={ClerkAPIError: clerk_error, HTTPException: http_error},
            include_in_schema=False,
        )
        return Router(path="/", route_handlers=[backend, frontend], include_in_schema=False)

    # ---- the Frontend API's client resource ------------------------------------------------------------

    def _frontend_handlers(self, config: FrontendSettings) -> list[Any]:
        """`GET /v1/client`, `POST /v1/client/sign_ins` (the ticket strategy: a sign-in token the Backend
        API issued) and `POST /v1/client/sessions/{id}/tokens`, authenticated by the `__client` cookie."""
        store = self.sessions
        wall_clock = self._wall_clock

        def cookie(key: str, value: str, **options: Any) -> Cookie:
            return Cookie(key=key, value=value, samesite="lax", secure=config.secure_cookies, **options)

        def client_cookie(token: str) -> Cookie:
            return cookie(
                CLIENT_COOKIE,
                token,
                path=self.frontend_path,
                max_age=sessions.CLIENT_COOKIE_SECONDS,
                httponly=True,
            )

        def uat_cookie(updated_at_ms: int) -> Cookie:
            # Seconds, as Clerk writes it; readable by scripts, which is the point of it.
            return cookie(
                CLIENT_UAT_COOKIE,
                str(updated_at_ms // 1000),
                path="/",
                max_age=sessions.CLIENT_UAT_COOKIE_SECONDS,
                httponly=False,
            )

        def session_cookie(session: dict[str, Any]) -> tuple[str, Cookie]:
            token = sessions.mint_session_token(
                config.signing_key,
                issuer=config.issuer,
                authorized_party=config.origin,
                user_id=session["user_id"],
                session_id=session["id"],
                now=wall_clock(),
            )
            # No Max-Age: the token's own `exp` decides, and an expired token tells the server "refresh".
            return token, cookie(SESSION_COOKIE, token, path="/", httponly=True)

        def signed_out_cookies() -> list[Cookie]:
            return [
                cookie(CLIENT_UAT_COOKIE, "0", path="/", max_age=sessions.CLIENT_UAT_COOKIE_SECONDS),
                cookie(SESSION_COOKIE, "", path="/", max_age=0, httponly=True),
            ]

        def same_origin(request: Request[Any, Any, Any]) -> None:
            # Clerk's Frontend API only answers the instance's own origins; a cross-site page cannot mint
            # tokens or sign someone in (SameSite=Lax already keeps the client cookie off such requests).
            if request.headers.get("origin") != config.origin:
                raise ClerkAPIError(
                    403, "origin_invalid", "Origin not allowed", "Requests must come from the app's origin."
                )

        def client_json(client: dict[str, Any]) -> dict[str, Any]:
            active = [s for s in store.sessions_of(client_id=client["id"]) if s["status"] == sessions.ACTIVE]
            active.sort(key=lambda session: session["created_at"], reverse=True)
            return {
                "object": "client",
                "id": client["id"],
                "sessions": [_session_json(session) for session in active],
                "sign_in": None,
                "sign_up": None,
                "last_active_session_id": active[0]["id"] if active else None,
                "created_at": client["created_at"],
                "updated_at": client["updated_at"],
            }

        @get("/")
        async def read_client(request: Request[Any, Any, Any]) -> Response[bytes]:
            client = store.client_by_token(request.cookies.get(CLIENT_COOKIE))
            if client is None:
                return Response(
                    content=_json_encoder.encode({"response": None, "client": None}),
                    media_type=MediaType.JSON,
                    cookies=signed_out_cookies(),
                )
            shown = client_json(client)
            return _json_response({"response": shown, "client": shown})

        @post("/sign_ins", status_code=200)
        async def sign_in(request: Request[Any, Any, Any]) -> Response[bytes]:
            same_origin(request)
            form = await request.form()
            strategy, ticket = form.get("strategy"), form.get("ticket")
            if strategy != "ticket":
                raise _param_error(
                    422,
                    "form_param_value_invalid",
                    "strategy",
                    "is invalid",
                    "The sandbox Frontend API signs in with the ticket strategy only.",
                )
            if not isinstance(ticket, str) or not ticket:
                raise _param_error(
                    422, "form_param_missing", "ticket", "is missing", "ticket must be included."
                )

            def redeem(state: dict[str, Any], now: int) -> tuple[dict[str, Any], dict[str, Any], str]:
                wanted = sessions.secret_hash(ticket)
                found = next(
                    (
                        t
                        for t in state["sign_in_tokens"].values()
                        if hmac.compare_digest(t["token_hash"], wanted)
                    ),
                    None,
                )
                if found is None or found["status"] != "pending" or found["expire_at"] <= now:
                    raise ClerkAPIError(
                        400,
                        "ticket_invalid",
                        "Sign-in token invalid",
                        "The sign-in token is unknown, already used or expired.",
                    )
                found.update(status="accepted", updated_at=now)
                client, client_token = sessions.new_client(state, now)
                session = sessions.new_session(state, now, client_id=client["id"], user_id=found["user_id"])
                return client, session, client_token

            client, session, client_token = await asyncio.to_thread(store.update, redeem)
            _, session_jar = session_cookie(session)
            attempt = {
                "object": "sign_in_attempt",
                "id": sessions.new_id("sia_"),
                "status": "complete",
                "created_session_id": session["id"],
            }
            return Response(
                content=_json_encoder.encode({"response": attempt, "client": client_json(client)}),
                media_type=MediaType.JSON,
                cookies=[client_cookie(client_token), uat_cookie(client["updated_at"]), session_jar],
            )

        @post("/sessions/{session_id:str}/tokens", status_code=200)
        async def create_token(session_id: FromPath[str], request: Request[Any, Any, Any]) -> Response[bytes]:
            same_origin(request)
            client = store.client_by_token(request.cookies.get(CLIENT_COOKIE))
            mine = store.sessions_of(client_id=client["id"]) if client is not None else []
            session = next((s for s in mine if s["id"] == session_id), None)
            if session is not None and session["status"] == sessions.ACTIVE:
                token, session_jar = session_cookie(session)
                return Response(
                    content=_json_encoder.encode({"object": "token", "jwt": token}),
                    media_type=MediaType.JSON,
                    cookies=[session_jar],
                )
            if any(s["status"] == sessions.ACTIVE for s in mine):
                # This client is still signed in, with another session: the caller should re-read the client.
                raise _session_not_found(session_id)
            error = ClerkAPIError(
                401, "signed_out", "Signed out", "This browser has no active session; sign in again."
            ).to_response()
            error.cookies.extend(signed_out_cookies())
            return error

        return [read_client, sign_in, create_token]

    # ---- writes ----------------------------------------------------------------------------------------

    async def _create(self, body: _Body) -> dict[str, Any]:
        raw_emails = body.data.get("email_address") or []
        if not isinstance(raw_emails, list):
            raise _invalid_format("email_address", "a list of email addresses")
        emails = list(dict.fromkeys(_normalize_email(value) for value in raw_emails))
        if not emails:
            raise _param_error(
                422, "form_param_missing", "email_address", "is missing", "email_address must be included."
            )
        metadata = {field: body.metadata(field) or {} for field in _METADATA_FIELDS}
        now = _now_ms()
        addresses = [_email_object(address, now) for address in emails]
        user: dict[str, Any] = {
            "id": _new_id("user_"),
            "object": "user",
            "external_id": None,
            "primary_email_address_id": addresses[0]["id"],
            "primary_phone_number_id": None,
            "primary_web3_wallet_id": None,
            "username": None,
            "first_name": None,
            "last_name": None,
            "locale": None,
            "has_image": False,
            **metadata,
            "email_addresses": addresses,
            "phone_numbers": [],
            "web3_wallets": [],
            "passkeys": [],
            "password_enabled": False,
            "two_factor_enabled": False,
            "totp_enabled": False,
            "backup_code_enabled": False,
            "mfa_enabled_at": None,
            "mfa_disabled_at": None,
            "password_last_updated_at": None,
            "external_accounts": [],
            "saml_accounts": [],
            "enterprise_accounts": [],
            "organization_memberships": [],
            "last_sign_in_at": None,
            "banned": bool(body.optional_bool("banned")),
            "locked": bool(body.optional_bool("locked")),
            "lockout_expires_in_seconds": None,
            "verification_attempts_remaining": None,
            "created_at": now,
            "updated_at": now,
            "delete_self_enabled": True,
            "create_organization_enabled": True,
            "create_organizations_limit": None,
            "bypass_client_trust": False,
            "last_active_at": None,
            "legal_accepted_at": None,
        }
        self._apply_profile_fields(user, body)
        self._check_metadata_size(user, [field for field in _METADATA_FIELDS if field in body])
        async with self._lock:
            taken = self._identifier_taken(emails, user["username"], skip_user=None)
            if taken is None:
                durable = self._stage({**self._accepted, user["id"]: user}, user["id"])
            else:
                durable = self._durable_point()
        await _settled(durable, taken)
        return user

    async def _update(self, user_id: str, body: _Body) -> dict[str, Any]:
        written = [field for field in _METADATA_FIELDS if field in body]
        async with self._lock:
            current = self._user_or_404(user_id, accepted=True)
            if written:
                self._check_rate(user_id)
            updated = {**current}
            self._apply_profile_fields(updated, body)
            if "primary_email_address_id" in body:
                primary = body.nullable_str("primary_email_address_id")
                if primary is not None:
                    if primary not in {entry["id"] for entry in updated["email_addresses"]}:
                        raise _param_error(
                            422,
                            "form_param_value_invalid",
                            "primary_email_address_id",
                            "is invalid",
                            f"primary_email_address_id {primary} is not an email address of user {user_id}.",
                        )
                    updated["primary_email_address_id"] = primary
            # Metadata given to an update replaces the stored value whole, unlike the metadata endpoint.
            for field in written:
                updated[field] = body.metadata(field)
            self._check_metadata_size(updated, written)
            taken = None
            if updated["username"] != current["username"]:
                taken = self._identifier_taken((), updated["username"], skip_user=user_id)
            if taken is None:
                updated["updated_at"] = _now_ms()
                durable = self._stage({**self._accepted, user_id: updated}, user_id)
            else:
                durable = self._durable_point()
        await _settled(durable, taken)
        if written:
            self._metadata_writes[user_id] = self._metadata_writes.get(user_id, 0) + 1
        return updated

    @staticmethod
    def _apply_profile_fields(user: dict[str, Any], body: _Body) -> None:
        for field in _NULLABLE_STRINGS:
            if field in body:
                user[field] = body.nullable_str(field)
        for field in _OPTIONAL_BOOLS:
            value = body.optional_bool(field)
            if value is not None:
                user[field] = value
        if "create_organizations_limit" in body:
            user["create_organizations_limit"] = body.optional_int("create_organizations_limit")
        if "legal_accepted_at" in body:
            user["legal_accepted_at"] = _parse_rfc3339_ms("legal_accepted_at", body.data["legal_accepted_at"])
        if "created_at" in body and body.data["created_at"] is not None:
            user["created_at"] = _parse_rfc3339_ms("created_at", body.data["created_at"])


def _full_name(user: dict[str, Any]) -> str:
    return " ".join(part for part in (user["first_name"], user["last_name"]) if part)


def _searchable(user: dict[str, Any]) -> list[str]:
    texts = [user["id"].lower(), _full_name(user).lower()]
    texts += [entry["email_address"] for entry in user["email_addresses"]]
    texts += [value.lower() for value in (user["username"], user["external_id"]) if value]
    return texts


def _order_value(user: dict[str, Any], field: str) -> Any:
    if field == "email_address":
        primary = user["primary_email_address_id"]
        return next((e["email_address"] for e in user["email_addresses"] if e["id"] == primary), None)
    if field in {"web3wallet", "phone_number"}:
        return None
    value = user[field]
    return value.lower() if isinstance(value, str) else value

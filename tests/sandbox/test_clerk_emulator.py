"""The sandbox Clerk emulator, driven the way the app drives Clerk: the official SDK over a real socket."""

from __future__ import annotations

import asyncio
import json
import os
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import httpx
import jwt
import pytest
from clerk_backend_api import Clerk, models
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from litestar import Litestar, get

from app.clerk import create_clerk_client, find_or_create_user_by_email, normalize_email
from sandbox.clerk_emulator import API_PATH, ClerkEmulator
from sandbox.clerk_sessions import FrontendSettings
from tests.live_server import free_port, serve

# The SDK itself trips this by reading a deprecated list filter while building every list query.
pytestmark = pytest.mark.filterwarnings(r"ignore:.*\*\* DEPRECATED \*\*:DeprecationWarning")

SECRET = "sk_test_emulator_suite"
T = TypeVar("T")


@dataclass
class Sandbox:
    emulator: ClerkEmulator
    api_url: str
    store_path: Path

    def call(self, body: Callable[[Clerk], Awaitable[T]], *, secret: str = SECRET) -> T:
        """Run `body` with a fresh SDK client on a fresh event loop, as a request handler would."""

        async def main() -> T:
            async with create_clerk_client(secret, self.api_url) as clerk:
                return await body(clerk)

        return asyncio.run(main())


@contextmanager
def serving(emulator: ClerkEmulator, store_path: Path) -> Iterator[Sandbox]:
    with serve(Litestar(route_handlers=[emulator.router])) as base_url:
        yield Sandbox(emulator, base_url + API_PATH, store_path)


@pytest.fixture
def sandbox(tmp_path: Path) -> Iterator[Sandbox]:
    store = tmp_path / "clerk.json"
    with serving(ClerkEmulator(store, SECRET), store) as running:
        yield running


def error_codes(exc: models.ClerkErrors) -> list[str]:
    return [item.code for item in exc.data.errors]


# ---- users: create, get, list, filter -----------------------------------------------------------------


def test_created_user_reads_back_with_clerks_shape(sandbox: Sandbox) -> None:
    async def body(clerk: Clerk) -> tuple[models.User, models.User]:
        created = await clerk.users.create_async(
            email_address=["Ada@Example.COM"],
            first_name="Ada",
            last_name="Lovelace",
            external_id="ext-1",
            public_metadata={"plan": "free"},
            private_metadata={"chargebee_customer": "cb_1"},
            unsafe_metadata={"theme": "dark"},
        )
        return created, await clerk.users.get_async(user_id=created.id)

    created, fetched = sandbox.call(body)
    assert created.id.startswith("user_")
    assert created.object == models.UserObject.USER
    assert fetched == created
    [email] = fetched.email_addresses
    assert email.email_address == "ada@example.com"  # Clerk stores addresses lower-cased
    assert email.id is not None
    assert email.id.startswith("idn_")
    assert fetched.primary_email_address_id == email.id
    assert isinstance(email.verification, models.Admin)
    assert email.verification.status == models.VerificationAdminVerificationStatus.VERIFIED
    assert (fetched.first_name, fetched.last_name, fetched.external_id) == ("Ada", "Lovelace", "ext-1")
    assert fetched.public_metadata == {"plan": "free"}
    assert fetched.private_metadata == {"chargebee_customer": "cb_1"}
    assert fetched.unsafe_metadata == {"theme": "dark"}
    # Milliseconds since the epoch, like Clerk, not seconds.
    assert abs(fetched.created_at - time.time() * 1000) < 60_000
    assert fetched.updated_at >= fetched.created_at


def test_list_filters_by_repeated_email_user_id_and_query(sandbox: Sandbox) -> None:
    async def body(clerk: Clerk) -> dict[str, Any]:
        ada = await clerk.users.create_async(email_address=["ada@example.com"], first_name="Ada")
        bob = await clerk.users.create_async(email_address=["bob@example.com"], first_name="Bob")
        cyd = await clerk.users.create_async(email_address=["cyd@other.org"], last_name="Lovelace")
        return {
            "ids": (ada.id, bob.id, cyd.id),
            "two_emails": await clerk.users.list_async(
                request={"email_address": ["ADA@example.com", "cyd@other.org", "nobody@example.com"]}
            ),
            "by_ids": await clerk.users.list_async(request={"user_id": [ada.id, bob.id]}),
            "excluding": await clerk.users.list_async(request={"user_id": [f"-{bob.id}"]}),
            "query": await clerk.users.list_async(request={"query": "example.com"}),
            "query_name": await clerk.users.list_async(request={"query": "lovel"}),
            "oldest_first": await clerk.users.list_async(request={"order_by": "+created_at"}),
            "newest_first": await clerk.users.list_async(),
            "page": await clerk.users.list_async(
                request={"order_by": "+created_at", "limit": 1, "offset": 1}
            ),
            "count_all": await clerk.users.count_async(),
            "count_query": await clerk.users.count_async(request={"query": "example.com"}),
        }

    result = sandbox.call(body)
    ada, bob, cyd = result["ids"]

    def ids(users: list[models.User]) -> list[str]:
        return [user.id for user in users]

    assert sorted(ids(result["two_emails"])) == sorted([ada, cyd])
    assert sorted(ids(result["by_ids"])) == sorted([ada, bob])
    assert sorted(ids(result["excluding"])) == sorted([ada, cyd])
    assert sorted(ids(result["query"])) == sorted([ada, bob])
    assert ids(result["query_name"]) == [cyd]
    assert ids(result["oldest_first"]) == [ada, bob, cyd]
    assert ids(result["newest_first"]) == [cyd, bob, ada]  # Clerk's default order is -created_at
    assert ids(result["page"]) == [bob]
    assert result["count_all"].total_count == 3
    assert result["count_query"].total_count == 2


def test_deleted_user_is_gone_and_frees_its_address(sandbox: Sandbox) -> None:
    async def body(clerk: Clerk) -> tuple[models.DeletedObject, list[models.User], models.User]:
        user = await clerk.users.create_async(email_address=["gone@example.com"])
        deleted = await clerk.users.delete_async(user_id=user.id)
        remaining = await clerk.users.list_async(request={"email_address": ["gone@example.com"]})
        again = await clerk.users.create_async(email_address=["gone@example.com"])
        return deleted, remaining, again

    deleted, remaining, again = sandbox.call(body)
    assert (deleted.object, deleted.deleted) == ("user", True)
    assert remaining == []
    assert again.id != deleted.id


# ---- metadata: merge, replace, limits -------------------------------------------------------------------


def test_metadata_patch_deep_merges_and_null_deletes(sandbox: Sandbox) -> None:
    async def body(clerk: Clerk) -> models.User:
        user = await clerk.users.create_async(
            email_address=["merge@example.com"],
            public_metadata={"plan": "pro", "usage": {"seconds": 10, "month": "2026-01"}, "flag": True},
            private_metadata={"billing": {"customer": "cb_1", "subscription": "sub_1"}},
        )
        return await clerk.users.update_metadata_async(
            user_id=user.id,
            public_metadata={"usage": {"seconds": 25, "resets": {"day": 1}}, "flag": None},
            private_metadata={"billing": {"subscription": None}},
        )

    user = sandbox.call(body)
    assert user.public_metadata == {
        "plan": "pro",
        "usage": {"seconds": 25, "month": "2026-01", "resets": {"day": 1}},
    }
    assert user.private_metadata == {"billing": {"customer": "cb_1"}}
    assert user.unsafe_metadata == {}


def test_replace_metadata_and_update_leave_no_stale_keys(sandbox: Sandbox) -> None:
    async def body(clerk: Clerk) -> tuple[models.User, models.User]:
        user = await clerk.users.create_async(
            email_address=["replace@example.com"],
            public_metadata={"plan": "pro", "usage": {"seconds": 10}},
            private_metadata={"keep": "me"},
        )
        replaced = await clerk.users.replace_metadata_async(user_id=user.id, public_metadata={"plan": "free"})
        renamed = await clerk.users.update_async(user_id=user.id, first_name="Renamed")
        return replaced, renamed

    replaced, renamed = sandbox.call(body)
    assert replaced.public_metadata == {"plan": "free"}  # replaced whole, nested usage gone
    assert replaced.private_metadata == {"keep": "me"}  # not given, so untouched
    assert renamed.first_name == "Renamed"
    assert renamed.public_metadata == {"plan": "free"}
    assert renamed.updated_at >= replaced.updated_at


def test_metadata_over_8kb_is_rejected_and_nothing_changes(sandbox: Sandbox) -> None:
    async def body(clerk: Clerk) -> tuple[models.ClerkErrors, models.ClerkErrors, models.User]:
        user = await clerk.users.create_async(email_address=["big@example.com"])
        await clerk.users.update_metadata_async(user_id=user.id, public_metadata={"blob": "p" * 5000})
        # Each half alone is under 8 KB; public and private together are not.
        with pytest.raises(models.ClerkErrors) as merged:
            await clerk.users.update_metadata_async(user_id=user.id, private_metadata={"blob": "q" * 3500})
        with pytest.raises(models.ClerkErrors) as created:
            await clerk.users.create_async(
                email_address=["bigger@example.com"], public_metadata={"b": "x" * 9000}
            )
        return merged.value, created.value, await clerk.users.get_async(user_id=user.id)

    merged, created, user = sandbox.call(body)
    for error in (merged, created):
        assert error.raw_response.status_code == 422
        assert error_codes(error) == ["form_param_exceeds_allowed_size"]
    assert merged.data.errors[0].meta == {"param_name": "private_metadata"}
    assert user.public_metadata == {"blob": "p" * 5000}
    assert user.private_metadata == {}
    assert sandbox.call(lambda clerk: clerk.users.count_async()).total_count == 1


def test_metadata_writes_are_rate_limited_per_user_with_retry_after(tmp_path: Path) -> None:
    now = [1000.0]
    store = tmp_path / "clerk.json"
    emulator = ClerkEmulator(store, SECRET, clock=lambda: now[0])

    async def eleven_writes(clerk: Clerk) -> tuple[str, str, models.SDKError]:
        busy = await clerk.users.create_async(email_address=["busy@example.com"])
        calm = await clerk.users.create_async(email_address=["calm@example.com"])
        for i in range(10):
            await clerk.users.update_metadata_async(user_id=busy.id, public_metadata={"n": i})
        with pytest.raises(models.SDKError) as limited:
            await clerk.users.update_metadata_async(user_id=busy.id, public_metadata={"n": 10})
        # The limit is per user: another user's write still goes through.
        await clerk.users.update_metadata_async(user_id=calm.id, public_metadata={"n": 0})
        return busy.id, calm.id, limited.value

    with serving(emulator, store) as sandbox:
        busy, calm, limited = sandbox.call(eleven_writes)
        assert limited.status_code == 429
        assert limited.raw_response.headers["Retry-After"] == "10"
        payload = json.loads(limited.body)
        assert [item["code"] for item in payload["errors"]] == ["too_many_requests"]
        assert set(payload["errors"][0]) == {"message", "long_message", "code", "meta"}
        assert "clerk_trace_id" in payload
        assert emulator.metadata_write_count(busy) == 10
        assert emulator.metadata_write_count(calm) == 1

        now[0] += 10.0  # the window has passed
        user = sandbox.call(
            lambda clerk: clerk.users.update_metadata_async(user_id=busy, public_metadata={"n": 11})
        )
        assert user.public_metadata == {"n": 11}


# ---- errors -----------------------------------------------------------------------------------------------


def test_errors_surface_as_the_sdks_typed_clerk_errors(sandbox: Sandbox) -> None:
    async def body(clerk: Clerk) -> dict[str, models.ClerkErrors]:
        await clerk.users.create_async(email_address=["taken@example.com"])
        errors = {}
        with pytest.raises(models.ClerkErrors) as missing:
            await clerk.users.get_async(user_id="user_doesnotexist")
        errors["missing"] = missing.value
        with pytest.raises(models.ClerkErrors) as missing_metadata:
            await clerk.users.update_metadata_async(user_id="user_doesnotexist", public_metadata={"a": 1})
        errors["missing_metadata"] = missing_metadata.value
        with pytest.raises(models.ClerkErrors) as duplicate:
            await clerk.users.create_async(email_address=["Taken@Example.com"])
        errors["duplicate"] = duplicate.value
        with pytest.raises(models.ClerkErrors) as junk:
            await clerk.users.create_async(email_address=["not an address"])
        errors["junk"] = junk.value
        with pytest.raises(models.ClerkErrors) as bad_order:
            await clerk.users.list_async(request={"order_by": "-shoe_size"})
        errors["bad_order"] = bad_order.value
        return errors

    errors = sandbox.call(body)
    for key in ("missing", "missing_metadata"):
        assert errors[key].raw_response.status_code == 404
        assert error_codes(errors[key]) == ["resource_not_found"]
        assert "user_doesnotexist" in errors[key].data.errors[0].long_message
    assert errors["duplicate"].raw_response.status_code == 422
    assert error_codes(errors["duplicate"]) == ["form_identifier_exists"]
    assert errors["duplicate"].data.errors[0].meta == {"param_name": "email_address"}
    assert error_codes(errors["junk"]) == ["form_param_format_invalid"]
    assert errors["bad_order"].raw_response.status_code == 422
    assert errors["bad_order"].data.errors[0].meta == {"param_name": "order_by"}
    assert "clerk_trace_id" in json.loads(errors["duplicate"].body)


def test_wrong_secret_key_is_refused_with_401(sandbox: Sandbox) -> None:
    with pytest.raises(models.ClerkErrors) as refused:
        sandbox.call(lambda clerk: clerk.users.list_async(), secret="sk_test_wrong")
    assert refused.value.raw_response.status_code == 401
    assert error_codes(refused.value) == ["clerk_key_invalid"]
    assert sandbox.emulator.request_count == 1  # refused requests are still served, and counted


# ---- persistence and concurrency ------------------------------------------------------------------------


def test_state_survives_a_restart_on_the_same_file(tmp_path: Path) -> None:
    store = tmp_path / "state" / "clerk.json"

    async def populate(clerk: Clerk) -> models.User:
        user = await clerk.users.create_async(email_address=["keep@example.com"], first_name="Kept")
        await clerk.users.update_metadata_async(user_id=user.id, public_metadata={"plan": "pro"})
        await clerk.users.update_metadata_async(user_id=user.id, private_metadata={"cb": "cust_1"})
        doomed = await clerk.users.create_async(email_address=["doomed@example.com"])
        await clerk.users.delete_async(user_id=doomed.id)
        return await clerk.users.get_async(user_id=user.id)

    with serving(ClerkEmulator(store, SECRET), store) as first:
        before = first.call(populate)

    # Private metadata is in the files, so only their owner may read them; no temporary file is left.
    files = list(store.parent.iterdir())
    assert {path.name for path in files} <= {"clerk.json", "clerk.json.journal"}
    assert [stat.S_IMODE(os.stat(path).st_mode) for path in files] == [0o600] * len(files)

    async def read_back(clerk: Clerk) -> tuple[models.User, list[models.User]]:
        return await clerk.users.get_async(user_id=before.id), await clerk.users.list_async()

    with serving(ClerkEmulator(store, SECRET), store) as second:
        after, everyone = second.call(read_back)
    assert after == before
    assert [user.id for user in everyone] == [before.id]


def test_concurrent_metadata_patches_to_one_user_lose_nothing(tmp_path: Path) -> None:
    store = tmp_path / "clerk.json"
    writers = 25
    emulator = ClerkEmulator(store, SECRET, metadata_writes_per_window=writers)

    async def body(clerk: Clerk) -> models.User:
        user = await clerk.users.create_async(email_address=["busy@example.com"])
        await asyncio.gather(
            *(
                clerk.users.update_metadata_async(user_id=user.id, public_metadata={"usage": {f"s{i}": i}})
                for i in range(writers)
            )
        )
        return await clerk.users.get_async(user_id=user.id)

    with serving(emulator, store) as sandbox:
        user = sandbox.call(body)
    assert user.public_metadata == {"usage": {f"s{i}": i for i in range(writers)}}
    assert emulator.metadata_write_count(user.id) == writers
    with serving(ClerkEmulator(store, SECRET), store) as restarted:
        reloaded = restarted.call(lambda clerk: clerk.users.get_async(user_id=user.id))
    assert reloaded.public_metadata == user.public_metadata


class CountingEmulator(ClerkEmulator):
    """Counts the store's file writes (snapshots and journal appends); with `fail_writes` set, every file
    write fails like a full disk."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.file_writes = 0
        self.fail_writes = False

    def _written(self) -> None:
        if self.fail_writes:
            raise OSError(28, "No space left on device")
        self.file_writes += 1
        time.sleep(0.02)  # a disk that takes a while, so writes queue up behind it

    def _write_store(self, payload: bytes) -> None:
        self._written()
        super()._write_store(payload)

    def _append_journal(self, lines: bytes) -> None:
        self._written()
        super()._append_journal(lines)


def test_concurrent_writes_for_many_users_are_each_on_disk_when_answered(tmp_path: Path) -> None:
    store = tmp_path / "clerk.json"
    emulator = CountingEmulator(store, SECRET)
    users = 40

    async def body(clerk: Clerk) -> list[str]:
        created = [await clerk.users.create_async(email_address=[f"u{i}@example.com"]) for i in range(users)]
        before = emulator.file_writes
        await asyncio.gather(
            *(
                clerk.users.update_metadata_async(user_id=user.id, public_metadata={"seconds": index})
                for index, user in enumerate(created)
            )
        )
        # Answered writes share file writes instead of each rewriting the whole store.
        assert emulator.file_writes - before < users / 2
        return [user.id for user in created]

    with serving(emulator, store) as sandbox:
        ids = sandbox.call(body)
    with serving(ClerkEmulator(store, SECRET), store) as restarted:
        reloaded = restarted.call(
            lambda clerk: clerk.users.list_async(request={"user_id": ids, "limit": 100})
        )
    assert {user.id: user.public_metadata for user in reloaded} == {
        user_id: {"seconds": index} for index, user_id in enumerate(ids)
    }


def test_the_journal_folds_into_a_snapshot_and_a_restart_replays_both(tmp_path: Path) -> None:
    store = tmp_path / "clerk.json"
    journal = Path(f"{store}.journal")
    # Folded after a few writes instead of a megabyte of them.
    emulator = ClerkEmulator(store, SECRET, metadata_writes_per_window=100, journal_min_bytes=4096)

    async def body(clerk: Clerk) -> tuple[str, str, int]:
        kept = await clerk.users.create_async(email_address=["kept@example.com"])
        gone = await clerk.users.create_async(email_address=["gone@example.com"])
        snapshots = 0
        for step in range(40):
            await clerk.users.update_metadata_async(user_id=kept.id, public_metadata={"step": step})
            snapshots += not await asyncio.to_thread(journal.exists)
        await clerk.users.delete_async(user_id=gone.id)
        return kept.id, gone.id, snapshots

    with serving(emulator, store) as sandbox:
        kept, gone, snapshots = sandbox.call(body)
    assert snapshots >= 2  # the journal was folded into the snapshot along the way
    assert store.stat().st_size > 0
    with serving(ClerkEmulator(store, SECRET), store) as restarted:
        users = restarted.call(lambda clerk: clerk.users.list_async())
    assert [(user.id, user.public_metadata) for user in users] == [(kept, {"step": 39})]
    assert gone not in {user.id for user in users}


def test_a_change_cut_off_mid_write_is_dropped_and_anything_else_unreadable_refuses(tmp_path: Path) -> None:
    store = tmp_path / "clerk.json"
    with serving(ClerkEmulator(store, SECRET), store) as sandbox:
        user = sandbox.call(lambda clerk: clerk.users.create_async(email_address=["torn@example.com"]))
    journal = Path(f"{store}.journal")
    with journal.open("ab") as handle:
        handle.write(b'{"put": {"id": "user_torn", "email')  # the process died here
    with serving(ClerkEmulator(store, SECRET), store) as restarted:
        users = restarted.call(lambda clerk: clerk.users.list_async())
    assert [found.id for found in users] == [user.id]

    journal.write_bytes(b"not json\n" + journal.read_bytes())
    with pytest.raises(ValueError, match="line 1 is not a journal entry"):
        ClerkEmulator(store, SECRET)


def test_a_failed_disk_write_fails_the_request_and_keeps_what_was_there(tmp_path: Path) -> None:
    store = tmp_path / "clerk.json"
    emulator = CountingEmulator(store, SECRET)

    async def body(clerk: Clerk) -> tuple[int, models.User, models.User]:
        user = await clerk.users.create_async(email_address=["disk@example.com"])
        await clerk.users.update_metadata_async(user_id=user.id, public_metadata={"plan": "pro"})
        emulator.fail_writes = True
        results = await asyncio.gather(
            *(
                clerk.users.update_metadata_async(user_id=user.id, public_metadata={"plan": f"p{i}"})
                for i in range(3)
            ),
            return_exceptions=True,
        )
        failed = sum(isinstance(result, Exception) for result in results)
        during = await clerk.users.get_async(user_id=user.id)
        emulator.fail_writes = False
        await clerk.users.update_metadata_async(user_id=user.id, private_metadata={"ok": True})
        return failed, during, await clerk.users.get_async(user_id=user.id)

    with serving(emulator, store) as sandbox:
        failed, during, after = sandbox.call(body)
    assert failed == 3
    assert during.public_metadata == {"plan": "pro"}
    # The next change builds on what was on disk, not on the writes that failed.
    assert after.public_metadata == {"plan": "pro"}
    assert after.private_metadata == {"ok": True}


def test_counters_count_requests_and_metadata_writes_and_reset(sandbox: Sandbox) -> None:
    async def body(clerk: Clerk) -> str:
        user = await clerk.users.create_async(email_address=["count@example.com"])
        await clerk.users.update_metadata_async(user_id=user.id, public_metadata={"a": 1})
        await clerk.users.replace_metadata_async(user_id=user.id, public_metadata={"b": 2})
        await clerk.users.update_async(user_id=user.id, first_name="NoMetadata")
        await clerk.users.get_async(user_id=user.id)
        return user.id

    user_id = sandbox.call(body)
    assert sandbox.emulator.request_count == 5
    assert sandbox.emulator.metadata_write_counts() == {user_id: 2}
    sandbox.emulator.reset_counters()
    assert sandbox.emulator.request_count == 0
    assert sandbox.emulator.metadata_write_count(user_id) == 0


# ---- app/clerk.py -----------------------------------------------------------------------------------------


def test_find_or_create_user_by_email_is_idempotent(sandbox: Sandbox) -> None:
    async def body(clerk: Clerk) -> list[models.User]:
        first = await find_or_create_user_by_email(clerk, "Pat@Example.com")
        second = await find_or_create_user_by_email(clerk, "  pat@example.COM ")
        # Concurrent first sign-ins for one new address: the creates race, everyone gets the winner.
        racing = await asyncio.gather(
            *(find_or_create_user_by_email(clerk, "race@example.com") for _ in range(6))
        )
        return [first, second, *racing]

    first, second, *racing = sandbox.call(body)
    assert second.id == first.id
    assert [e.email_address for e in first.email_addresses] == ["pat@example.com"]
    assert len({user.id for user in racing}) == 1
    assert sandbox.call(lambda clerk: clerk.users.count_async()).total_count == 2


def test_find_or_create_rejects_junk_before_calling_clerk(sandbox: Sandbox) -> None:
    junk = ["", "   ", "no-at-sign", "a@b", "a@@b.com", "a b@c.com", "@example.com", "x@.com", "x@a..com"]

    async def body(clerk: Clerk) -> None:
        for address in junk:
            with pytest.raises(ValueError, match="not a valid email address"):
                await find_or_create_user_by_email(clerk, address)

    sandbox.call(body)
    assert sandbox.emulator.request_count == 0


def test_normalize_email_lowercases_and_trims() -> None:
    assert normalize_email("  Mixed.Case+tag@Sub.Example.ORG ") == "mixed.case+tag@sub.example.org"


def test_client_does_not_retry_a_dead_server() -> None:
    dead_url = f"http://127.0.0.1:{free_port()}{API_PATH}"

    async def body() -> None:
        async with create_clerk_client(SECRET, dead_url) as clerk:
            await clerk.users.list_async()

    started = time.monotonic()
    with pytest.raises(httpx.ConnectError):
        asyncio.run(body())
    # The SDK's default would keep retrying with backoff for up to an hour.
    assert time.monotonic() - started < 2


def test_client_gives_up_after_its_timeout() -> None:
    release = threading.Event()

    @get(f"{API_PATH}/users")
    async def stuck() -> list[Any]:
        # Answers only once the test is done, so a client that waited would hang well past the bound.
        await asyncio.to_thread(release.wait, 10)
        return []

    async def body(api_url: str) -> None:
        async with create_clerk_client(SECRET, api_url, timeout_ms=150) as clerk:
            await clerk.users.list_async()

    with serve(Litestar(route_handlers=[stuck])) as base_url:
        try:
            started = time.monotonic()
            with pytest.raises(httpx.TimeoutException):
                asyncio.run(body(base_url + API_PATH))
            assert time.monotonic() - started < 2
        finally:
            release.set()


# ---- sessions: the Frontend API's client resource and the Backend API's sessions ------------------------

ORIGIN = "http://app.example"
FRONTEND = f"{API_PATH}/client"


class Clock:
    """A wall clock the test moves: sessions and sign-in tokens expire by it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


@dataclass
class Frontend:
    """An emulator with its Frontend API, the key that verifies its tokens, and a browser per name."""

    sandbox: Sandbox
    base_url: str
    public_key: str
    clock: Clock
    browsers: dict[str, httpx.Client]

    def browser(self, name: str) -> httpx.Client:
        if name not in self.browsers:
            self.browsers[name] = httpx.Client(base_url=self.base_url, headers={"Origin": ORIGIN}, timeout=10)
        return self.browsers[name]

    def user(self, email: str) -> str:
        return self.sandbox.call(lambda clerk: clerk.users.create_async(email_address=[email])).id

    def ticket(self, user_id: str, seconds: int = 60) -> str:
        token = self.sandbox.call(
            lambda clerk: clerk.sign_in_tokens.create_async(
                request={"user_id": user_id, "expires_in_seconds": seconds}
            )
        )
        assert token.status == "pending"
        assert token.user_id == user_id
        assert token.token
        return token.token

    def sign_in(self, browser: str, user_id: str) -> httpx.Response:
        return self.browser(browser).post(
            f"{FRONTEND}/sign_ins", data={"strategy": "ticket", "ticket": self.ticket(user_id)}
        )

    def refresh(self, browser: str, session_id: str) -> httpx.Response:
        return self.browser(browser).post(f"{FRONTEND}/sessions/{session_id}/tokens")

    def claims(self, token: str) -> dict[str, Any]:
        # Signature only: the test's clock runs ahead of the real one.
        unchecked = {"verify_exp": False, "verify_iat": False, "verify_nbf": False}
        return jwt.decode(token, self.public_key, algorithms=["RS256"], options=unchecked)


def frontend_settings(private_pem: str) -> FrontendSettings:
    return FrontendSettings(
        signing_key=private_pem,
        issuer="http://app.example/sandbox/clerk",
        origin=ORIGIN,
        secure_cookies=False,
    )


@pytest.fixture(scope="module")
def signing_keys() -> tuple[str, str]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private, public.decode()


@contextmanager
def frontend_on(store: Path, signing_keys: tuple[str, str], clock: Clock | None = None) -> Iterator[Frontend]:
    clock = clock or Clock()
    emulator = ClerkEmulator(store, SECRET, frontend=frontend_settings(signing_keys[0]), wall_clock=clock)
    with serving(emulator, store) as sandbox:
        running = Frontend(sandbox, sandbox.api_url.removesuffix(API_PATH), signing_keys[1], clock, {})
        try:
            yield running
        finally:
            for browser in running.browsers.values():
                browser.close()


@pytest.fixture
def frontend(tmp_path: Path, signing_keys: tuple[str, str]) -> Iterator[Frontend]:
    with frontend_on(tmp_path / "clerk.json", signing_keys) as running:
        yield running


def set_cookies(answer: httpx.Response) -> dict[str, str]:
    return {header.split("=", 1)[0]: header for header in answer.headers.get_list("set-cookie")}


def test_a_sign_in_token_signs_one_browser_in_once_with_a_sixty_second_token(frontend: Frontend) -> None:
    user_id = frontend.user("sid@example.com")
    ticket = frontend.ticket(user_id)
    answer = frontend.browser("laptop").post(
        f"{FRONTEND}/sign_ins", data={"strategy": "ticket", "ticket": ticket}
    )
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["response"]["status"] == "complete"
    session_id = body["response"]["created_session_id"]
    assert body["client"]["last_active_session_id"] == session_id

    cookies = set_cookies(answer)
    assert f"Path={FRONTEND}" in cookies["__client"]
    assert "HttpOnly" in cookies["__client"]
    assert int(frontend.browser("laptop").cookies["__client_uat"]) == int(frontend.clock.now)
    assert "HttpOnly" not in cookies["__client_uat"]  # scripts read it: it says whether to refresh
    claims = frontend.claims(frontend.browser("laptop").cookies["__session"])
    assert claims["exp"] - claims["iat"] == 60
    assert (claims["sub"], claims["sid"], claims["azp"]) == (user_id, session_id, ORIGIN)
    assert claims["iss"] == "http://app.example/sandbox/clerk"

    session = frontend.sandbox.call(lambda clerk: clerk.sessions.get_async(session_id=session_id))
    assert (session.status, session.user_id, session.client_id) == ("active", user_id, body["client"]["id"])

    again = frontend.browser("thief").post(
        f"{FRONTEND}/sign_ins", data={"strategy": "ticket", "ticket": ticket}
    )
    assert again.status_code == 400
    assert again.json()["errors"][0]["code"] == "ticket_invalid"
    assert "__session" not in frontend.browser("thief").cookies


def test_a_sign_in_token_past_its_life_is_refused(frontend: Frontend) -> None:
    ticket = frontend.ticket(frontend.user("late@example.com"), seconds=30)
    frontend.clock.now += 31
    answer = frontend.browser("laptop").post(
        f"{FRONTEND}/sign_ins", data={"strategy": "ticket", "ticket": ticket}
    )
    assert answer.status_code == 400
    assert answer.json()["errors"][0]["code"] == "ticket_invalid"


def test_tokens_are_minted_for_the_clients_own_active_session_only(frontend: Frontend) -> None:
    ada, bob = frontend.user("ada@example.com"), frontend.user("bob@example.com")
    ada_session = frontend.sign_in("ada", ada).json()["response"]["created_session_id"]
    frontend.sign_in("bob", bob)
    first = frontend.browser("ada").cookies["__session"]

    frontend.clock.now += 45
    fresh = frontend.refresh("ada", ada_session)
    assert fresh.status_code == 200
    assert fresh.json()["object"] == "token"
    renewed = frontend.browser("ada").cookies["__session"]
    assert renewed == fresh.json()["jwt"] != first
    assert frontend.claims(renewed)["exp"] == int(frontend.clock.now) + 60

    # Bob's browser is signed in, but not with Ada's session: told to re-read its client.
    assert frontend.refresh("bob", ada_session).status_code == 404
    # A browser without a client cookie (or with a made-up one) is signed out.
    stranger = frontend.refresh("stranger", ada_session)
    assert stranger.status_code == 401
    assert stranger.json()["errors"][0]["code"] == "signed_out"
    frontend.browser("forger").cookies.set("__client", "made-up", path=FRONTEND)
    assert frontend.refresh("forger", ada_session).status_code == 401


def test_a_revoked_session_can_no_longer_be_refreshed(frontend: Frontend) -> None:
    user_id = frontend.user("leaving@example.com")
    session_id = frontend.sign_in("laptop", user_id).json()["response"]["created_session_id"]
    revoked = frontend.sandbox.call(lambda clerk: clerk.sessions.revoke_async(session_id=session_id))
    assert revoked.status == "revoked"

    answer = frontend.refresh("laptop", session_id)
    assert answer.status_code == 401
    assert frontend.browser("laptop").cookies["__client_uat"] == "0"
    assert "__session" not in frontend.browser("laptop").cookies
    client = frontend.browser("laptop").get(FRONTEND).json()["response"]
    assert (client["sessions"], client["last_active_session_id"]) == ([], None)


def test_deleting_a_user_ends_their_sessions(frontend: Frontend) -> None:
    user_id = frontend.user("deleted@example.com")
    laptop = frontend.sign_in("laptop", user_id).json()["response"]["created_session_id"]
    phone = frontend.sign_in("phone", user_id).json()["response"]["created_session_id"]
    frontend.sandbox.call(lambda clerk: clerk.users.delete_async(user_id=user_id))

    listed = frontend.sandbox.call(lambda clerk: clerk.sessions.list_async(user_id=user_id))
    assert sorted((s.id, s.status) for s in listed) == sorted([(laptop, "revoked"), (phone, "revoked")])
    assert frontend.refresh("laptop", laptop).status_code == 401
    assert frontend.refresh("phone", phone).status_code == 401


def test_a_session_ends_at_its_maximum_lifetime(frontend: Frontend) -> None:
    user_id = frontend.user("week@example.com")
    session_id = frontend.sign_in("laptop", user_id).json()["response"]["created_session_id"]
    frontend.clock.now += 7 * 24 * 3600 - 60
    assert frontend.refresh("laptop", session_id).status_code == 200
    frontend.clock.now += 61
    assert frontend.refresh("laptop", session_id).status_code == 401
    session = frontend.sandbox.call(lambda clerk: clerk.sessions.get_async(session_id=session_id))
    assert session.status == "expired"


def test_the_frontend_api_answers_only_the_apps_origin(frontend: Frontend) -> None:
    user_id = frontend.user("origin@example.com")
    ticket = frontend.ticket(user_id)
    with httpx.Client(base_url=frontend.base_url, headers={"Origin": "https://evil.example"}) as evil:
        refused = evil.post(f"{FRONTEND}/sign_ins", data={"strategy": "ticket", "ticket": ticket})
        assert refused.status_code == 403
        assert refused.json()["errors"][0]["code"] == "origin_invalid"
    # The refused attempt used nothing up.
    signed_in = frontend.browser("laptop").post(
        f"{FRONTEND}/sign_ins", data={"strategy": "ticket", "ticket": ticket}
    )
    assert signed_in.status_code == 200
    session_id = signed_in.json()["response"]["created_session_id"]
    client_cookie = frontend.browser("laptop").cookies["__client"]
    with httpx.Client(base_url=frontend.base_url, cookies={"__client": client_cookie}) as no_origin:
        assert no_origin.post(f"{FRONTEND}/sessions/{session_id}/tokens").status_code == 403


def test_sessions_survive_a_restart_and_are_shared_by_two_processes(
    tmp_path: Path, signing_keys: tuple[str, str]
) -> None:
    store = tmp_path / "clerk.json"
    with frontend_on(store, signing_keys) as first:
        user_id = first.user("shared@example.com")
        session_id = first.sign_in("laptop", user_id).json()["response"]["created_session_id"]
        client_cookie = first.browser("laptop").cookies["__client"]
        # A second emulator on the same files: another app process on the same state directory.
        with frontend_on(store, signing_keys) as second:
            second.browser("laptop").cookies.set("__client", client_cookie, path=FRONTEND)
            assert second.refresh("laptop", session_id).status_code == 200
            second.sandbox.call(lambda clerk: clerk.sessions.revoke_async(session_id=session_id))
        assert first.refresh("laptop", session_id).status_code == 401

    assert stat.S_IMODE(os.stat(tmp_path / "clerk-sessions.json").st_mode) == 0o600
    with frontend_on(store, signing_keys) as restarted:
        session = restarted.sandbox.call(lambda clerk: clerk.sessions.get_async(session_id=session_id))
        assert session.status == "revoked"


def test_concurrent_sign_ins_lose_no_session(frontend: Frontend) -> None:
    user_id = frontend.user("many@example.com")
    tickets = [frontend.ticket(user_id) for _ in range(12)]

    def redeem(ticket: str) -> str:
        with httpx.Client(base_url=frontend.base_url, headers={"Origin": ORIGIN}, timeout=20) as browser:
            answer = browser.post(f"{FRONTEND}/sign_ins", data={"strategy": "ticket", "ticket": ticket})
            assert answer.status_code == 200, answer.text
            return str(answer.json()["response"]["created_session_id"])

    with ThreadPoolExecutor(max_workers=12) as pool:
        created = set(pool.map(redeem, tickets))
    listed = frontend.sandbox.call(lambda clerk: clerk.sessions.list_async(user_id=user_id, limit=50))
    assert {session.id for session in listed} == created
    assert len(created) == 12


def test_sign_in_tokens_and_sessions_need_the_secret_key(frontend: Frontend) -> None:
    user_id = frontend.user("secret@example.com")
    with pytest.raises(models.SDKError) as refused:
        frontend.sandbox.call(
            lambda clerk: clerk.sign_in_tokens.create_async(request={"user_id": user_id}),
            secret="sk_test_wrong",
        )
    assert refused.value.status_code == 401
    assert "clerk_key_invalid" in refused.value.body
    with pytest.raises(models.ClerkErrors) as unknown:
        frontend.sandbox.call(
            lambda clerk: clerk.sign_in_tokens.create_async(request={"user_id": "user_nobody"})
        )
    assert error_codes(unknown.value) == ["resource_not_found"]


# ---- the instance-wide limit -------------------------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_the_instance_limit_counts_every_backend_request_and_answers_429(tmp_path: Path) -> None:
    # Clerk's 1,000 requests per 10 s, scaled down: 5 per 10 s, across users and kinds of request.
    store = tmp_path / "clerk.json"
    clock = _Clock()
    emulator = ClerkEmulator(store, SECRET, instance_requests_per_window=5, clock=clock)

    async def body(clerk: Clerk) -> list[int | None]:
        outcomes: list[int | None] = []
        users = [await clerk.users.create_async(email_address=[f"u{i}@example.com"]) for i in range(2)]
        for index in range(5):
            try:
                await clerk.users.get_async(user_id=users[index % 2].id)
                outcomes.append(None)
            except models.SDKError as error:
                outcomes.append(error.status_code)
            except models.ClerkErrors as error:
                outcomes.append(error.status_code)
        return outcomes

    with serving(emulator, store) as sandbox:
        outcomes = sandbox.call(body)
        # Two creates and three reads fit; the fourth and fifth read are over the instance's limit.
        assert outcomes == [None, None, None, 429, 429]
        assert emulator.rate_limited_count == 2
        clock.now += 10.0  # the window has passed
        assert sandbox.call(lambda clerk: clerk.users.list_async()) is not None
    assert emulator.rate_limited_count == 2


def test_the_instance_limit_tells_when_to_retry(tmp_path: Path) -> None:
    store = tmp_path / "clerk.json"
    clock = _Clock()
    emulator = ClerkEmulator(store, SECRET, instance_requests_per_window=1, clock=clock)
    auth = {"Authorization": f"Bearer {SECRET}"}
    with serving(emulator, store) as sandbox, httpx.Client(base_url=sandbox.api_url, headers=auth) as client:
        assert client.get("/users").status_code == 200
        clock.now += 3.0
        refused = client.get("/users")
    assert refused.status_code == 429
    assert refused.headers["Retry-After"] == "7"
    assert refused.json()["errors"][0]["code"] == "too_many_requests"

"""Which mode the app starts in, and when it refuses to start (app/settings.py `_decide_mode`).

Sandbox mode signs anyone in as any email without a password and sells every plan for free, so it must
only start where nobody else can reach it, or when the operator says so explicitly (and then loudly).
"""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from app.settings import LIVE_KEYS, ConfigError, Mode, load_settings
from tests.app.test_settings import assert_one_clear_refusal, live_environment, run_app
from tests.conftest import AppProcess

# What an operator who forgot the Clerk/ChargeBee keys deploys.
FORGOTTEN_KEYS = {
    "APP_URL": "https://stylecast.example.com",
    "STYLECAST_HOST": "0.0.0.0",
    "STREAM_SECRET": "a-stream-secret-that-is-long-enough-0123456789",
}


def live_variables_named(message: str) -> list[str]:
    """The variables after "for live mode set:" in a refusal."""
    _, _, listed = message.partition("for live mode set: ")
    return [name.strip() for name in listed.split(",") if name.strip()]


# ---- load_settings ----------------------------------------------------------------------------------------


def test_forgotten_live_keys_on_a_public_address_refuse_and_name_what_is_missing(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings(FORGOTTEN_KEYS, state_dir=tmp_path, dotenv=None)
    message = str(error.value)
    assert "STYLECAST_HOST=0.0.0.0 is not a loopback address" in message
    assert "APP_URL=https://stylecast.example.com is https" in message
    assert "STYLECAST_MODE=sandbox" in message
    # Exactly what live mode still lacks: every Clerk/ChargeBee key, not the STREAM_SECRET that is set.
    assert live_variables_named(message) == list(LIVE_KEYS)
    assert not (tmp_path / "sandbox-secrets.json").exists()  # nothing was set up for a sandbox


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.20", "10.0.0.5", "stylecast.example.com"])
def test_sandbox_does_not_start_implicitly_on_an_address_others_can_reach(tmp_path: Path, host: str) -> None:
    with pytest.raises(ConfigError, match="is not a loopback address") as error:
        load_settings({"STYLECAST_HOST": host}, state_dir=tmp_path, dotenv=None)
    assert f"STYLECAST_HOST={host}" in str(error.value)


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "LOCALHOST"])
def test_sandbox_starts_on_loopback_without_any_setting(tmp_path: Path, host: str) -> None:
    settings = load_settings({"STYLECAST_HOST": host}, state_dir=tmp_path, dotenv=None)
    assert settings.mode is Mode.SANDBOX
    assert settings.sandbox_exposure == ()


@pytest.mark.parametrize("host", ["::1", "[::1]"])
def test_ipv6_loopback_is_safe_but_the_sandbox_cannot_reach_itself_there(tmp_path: Path, host: str) -> None:
    # Loopback, so not refused as exposed; but the ChargeBee SDK cannot address [::1], and a sandbox whose
    # sign-in and checkout fail is refused up front rather than started.
    with pytest.raises(ConfigError, match="cannot address an IPv6 literal") as error:
        load_settings({"STYLECAST_HOST": host}, state_dir=tmp_path, dotenv=None)
    assert "not a loopback address" not in str(error.value)
    live = load_settings(
        {**live_environment(), "STYLECAST_HOST": host}, port=8123, state_dir=tmp_path, dotenv=None
    )
    # Live mode reaches itself (the in-process worker's usage reports) on the address it is bound to.
    assert live.usage_report_url == "http://[::1]:8123/api/usage/report"


def test_an_https_app_url_without_live_keys_refuses_even_on_loopback(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({"APP_URL": "https://stylecast.example.com"}, state_dir=tmp_path, dotenv=None)
    message = str(error.value)
    assert "APP_URL=https://stylecast.example.com is https" in message
    assert "STYLECAST_HOST" not in message  # the host is fine; only the URL is named as the problem
    assert live_variables_named(message) == [*LIVE_KEYS, "STREAM_SECRET"]


def test_the_host_option_counts_as_the_bind_host(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"--host 0\.0\.0\.0 is not a loopback address"):
        load_settings({}, host="0.0.0.0", state_dir=tmp_path, dotenv=None)
    # ...and a loopback option beats a public variable, as every option beats the environment.
    settings = load_settings({"STYLECAST_HOST": "0.0.0.0"}, host="127.0.0.1", state_dir=tmp_path, dotenv=None)
    assert settings.mode is Mode.SANDBOX
    assert settings.host == "127.0.0.1"


def test_an_explicit_sandbox_starts_on_a_public_address_and_says_why_it_is_exposed(tmp_path: Path) -> None:
    settings = load_settings({**FORGOTTEN_KEYS, "STYLECAST_MODE": "sandbox"}, state_dir=tmp_path, dotenv=None)
    assert settings.mode is Mode.SANDBOX
    assert settings.host == "0.0.0.0"
    assert settings.sandbox_exposure == (
        "it listens on 0.0.0.0, which is not a loopback address",
        "APP_URL=https://stylecast.example.com is https",
    )


def test_an_explicit_sandbox_with_live_keys_set_is_ambiguous(tmp_path: Path) -> None:
    env = {"STYLECAST_MODE": "sandbox", "CLERK_SECRET_KEY": "sk_live_x", "CHARGEBEE_API_KEY": "live_key"}
    with pytest.raises(ConfigError, match="ambiguous") as error:
        load_settings(env, state_dir=tmp_path, dotenv=None)
    assert "CLERK_SECRET_KEY, CHARGEBEE_API_KEY" in str(error.value)
    assert "sk_live_x" not in str(error.value)
    # Every live key set and STYLECAST_MODE=sandbox is no clearer.
    with pytest.raises(ConfigError, match="ambiguous"):
        load_settings({**live_environment(), "STYLECAST_MODE": "sandbox"}, state_dir=tmp_path, dotenv=None)


def test_an_explicit_live_mode_needs_every_live_variable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({"STYLECAST_MODE": "live"}, state_dir=tmp_path, dotenv=None)
    message = str(error.value)
    for name in (*LIVE_KEYS, "STREAM_SECRET", "APP_URL"):
        assert name in message
    assert not (tmp_path / "sandbox-secrets.json").exists()
    settings = load_settings(
        {**live_environment(), "STYLECAST_MODE": "Live"}, state_dir=tmp_path, dotenv=None
    )
    assert settings.mode is Mode.LIVE
    assert settings.sandbox_exposure == ()


def test_an_unknown_mode_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="STYLECAST_MODE must be sandbox or live"):
        load_settings({"STYLECAST_MODE": "production"}, state_dir=tmp_path, dotenv=None)


def test_a_plain_http_app_url_for_another_host_is_reported_as_exposure(tmp_path: Path) -> None:
    # Allowed on loopback (a local reverse proxy on plain http), but the start-up warning says so.
    settings = load_settings({"APP_URL": "http://stylecast.lan:8000"}, state_dir=tmp_path, dotenv=None)
    assert settings.mode is Mode.SANDBOX
    assert settings.sandbox_exposure == (
        "APP_URL=http://stylecast.lan:8000 names a host other than this machine",
    )


# ---- python -m app, as an operator starts it --------------------------------------------------------------


def test_python_m_app_refuses_the_forgotten_keys_deployment(tmp_path: Path) -> None:
    result = run_app(tmp_path, **FORGOTTEN_KEYS)
    refusal = assert_one_clear_refusal(result)
    assert "STYLECAST_HOST=0.0.0.0 is not a loopback address" in refusal
    assert live_variables_named(refusal) == list(LIVE_KEYS)
    assert FORGOTTEN_KEYS["STREAM_SECRET"] not in result.stderr
    assert "Uvicorn running" not in result.stderr


def test_python_m_app_refuses_a_public_host_option_without_live_keys(tmp_path: Path) -> None:
    refusal = assert_one_clear_refusal(run_app(tmp_path, "--host", "0.0.0.0"))
    assert "--host 0.0.0.0 is not a loopback address" in refusal
    assert "STYLECAST_MODE=sandbox" in refusal


def test_python_m_app_explicit_sandbox_behind_https_starts_with_a_loud_warning(
    start_app: object,
) -> None:
    # Loopback bind (nothing is exposed by this test), but an https APP_URL: only the opt-in starts it.
    running: AppProcess = start_app(  # type: ignore[operator]
        STYLECAST_MODE="sandbox", APP_URL="https://stylecast.example.com"
    )
    assert httpx.get(f"{running.url}/health", timeout=10).status_code == 200
    warnings = [line for line in running.log().splitlines() if "WARNING" in line and "SANDBOX" in line]
    assert len(warnings) == 1, running.log()
    assert "APP_URL=https://stylecast.example.com is https" in warnings[0]
    assert "sign in as any email without a password" in warnings[0]


def test_python_m_app_on_loopback_starts_the_sandbox_without_a_warning(start_app: object) -> None:
    running: AppProcess = start_app()  # type: ignore[operator]
    assert httpx.get(f"{running.url}/health", timeout=10).status_code == 200
    assert "sandbox mode" in running.log()
    assert "EXPOSED" not in running.log()

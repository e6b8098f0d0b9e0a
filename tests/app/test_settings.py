from __future__ import annotations

import base64
import subprocess
import sys
from pathlib import Path

import pytest

from app.settings import LIVE_KEYS, ConfigError, Mode, frontend_api_from_publishable_key, load_settings
from tests.conftest import ROOT, clean_environment
from tests.live_server import free_port

PUBLISHABLE = "pk_test_" + base64.b64encode(b"brave-otter-12.clerk.accounts.dev$").decode()


def run_app(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`python -m app` as an operator runs it, outside the checkout (no stray .env). A server that starts
    when it should not is stopped by the timeout, which fails the test."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "app",
            "--state-dir",
            str(tmp_path / "state"),
            "--port",
            str(free_port()),
            *args,
        ],
        env=clean_environment(PYTHONPATH=str(ROOT), **env),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_one_clear_refusal(result: subprocess.CompletedProcess[str]) -> str:
    """Exit status 2, no traceback, one `refusing to start:` line; returns that line."""
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    refusals = [line for line in result.stderr.splitlines() if "refusing to start:" in line]
    assert len(refusals) == 1, result.stderr
    return refusals[0]


def live_environment() -> dict[str, str]:
    return {
        "CLERK_SECRET_KEY": "sk_live_x",
        "CLERK_PUBLISHABLE_KEY": PUBLISHABLE,
        "CLERK_JWT_KEY": "-----BEGIN PUBLIC KEY-----\\nMIIB\\n-----END PUBLIC KEY-----",
        "CHARGEBEE_SITE": "stylecast",
        "CHARGEBEE_API_KEY": "live_key",
        "CHARGEBEE_WEBHOOK_USERNAME": "hook",
        "CHARGEBEE_WEBHOOK_PASSWORD": "hook-password-long-enough",
        "STREAM_SECRET": "stream-secret-value-that-is-long-enough-1234",
        "INFERENCE_URL": "wss://worker.example.com/ws",
        "APP_URL": "https://stylecast.example.com/",
    }


def test_no_keys_means_sandbox_with_generated_secrets_kept_across_restarts(tmp_path: Path) -> None:
    first = load_settings({}, state_dir=tmp_path, dotenv=None)
    second = load_settings({}, state_dir=tmp_path, dotenv=None)
    assert first.mode is Mode.SANDBOX
    assert first.app_url == "http://127.0.0.1:8000"
    assert first.clerk_api_url == "http://127.0.0.1:8000/sandbox/clerk/v1"
    # The ChargeBee SDK joins site and domain with a dot; the result must be the emulator's endpoint.
    assert f"http://{first.chargebee_site}.{first.chargebee_domain}/api/v2" == (
        "http://127.0.0.1:8000/sandbox/chargebee/api/v2"
    )
    assert first.stream_secret == second.stream_secret
    assert first.clerk_jwt_key == second.clerk_jwt_key
    assert (tmp_path / "sandbox-secrets.json").stat().st_mode & 0o077 == 0


def test_every_live_key_set_means_live(tmp_path: Path) -> None:
    settings = load_settings(live_environment(), state_dir=tmp_path, dotenv=None)
    assert settings.mode is Mode.LIVE
    assert settings.app_url == "https://stylecast.example.com"
    assert settings.clerk_frontend_api == "brave-otter-12.clerk.accounts.dev"
    assert "\n" in settings.clerk_jwt_key  # escaped newlines in a one-line variable become a real PEM
    assert not (tmp_path / "sandbox-secrets.json").exists()


@pytest.mark.parametrize("dropped", [*LIVE_KEYS, "STREAM_SECRET", "APP_URL"])
def test_half_configured_refuses_and_names_what_is_missing(tmp_path: Path, dropped: str) -> None:
    env = live_environment()
    del env[dropped]
    with pytest.raises(ConfigError) as error:
        load_settings(env, state_dir=tmp_path, dotenv=None)
    assert dropped in str(error.value)


def test_every_missing_variable_is_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        load_settings({"CHARGEBEE_SITE": "stylecast"}, state_dir=tmp_path, dotenv=None)
    message = str(error.value)
    for name in ("CLERK_SECRET_KEY", "CLERK_JWT_KEY", "CHARGEBEE_API_KEY", "STREAM_SECRET", "APP_URL"):
        assert name in message


def test_options_beat_environment_and_environment_beats_dotenv(tmp_path: Path) -> None:
    dotenv = tmp_path / ".env"
    dotenv.write_text(
        "# local overrides\nSTYLECAST_PORT=9100\nexport LOG_LEVEL='debug'\nFREE_PLAN_SECONDS=15\n"
    )
    from_files = load_settings({"FREE_PLAN_SECONDS": "30"}, state_dir=tmp_path, dotenv=dotenv)
    assert from_files.port == 9100
    assert from_files.log_level == "DEBUG"
    assert from_files.free_plan_seconds == 30
    explicit = load_settings(
        {"STYLECAST_PORT": "9200", "STYLECAST_MODE": "sandbox"},
        host="0.0.0.0",
        port=9300,
        state_dir=tmp_path,
        dotenv=dotenv,
    )
    assert explicit.port == 9300
    assert explicit.internal_url == "http://127.0.0.1:9300"


def test_redacted_settings_hide_every_secret(tmp_path: Path) -> None:
    settings = load_settings(live_environment(), state_dir=tmp_path, dotenv=None)
    shown = repr(settings.redacted())
    for secret in ("sk_live_x", "live_key", "hook-password-long-enough", "stream-secret-value-that"):
        assert secret not in shown


def test_publishable_key_must_be_clerk_shaped() -> None:
    assert frontend_api_from_publishable_key(PUBLISHABLE) == "brave-otter-12.clerk.accounts.dev"
    with pytest.raises(ConfigError):
        frontend_api_from_publishable_key("pk_test_bm90LWEta2V5")


def test_python_m_app_refuses_half_configured_environment(tmp_path: Path) -> None:
    env = clean_environment(CLERK_SECRET_KEY="sk_test_only_this", PYTHONPATH=str(ROOT))
    result = subprocess.run(
        [sys.executable, "-m", "app", "--state-dir", str(tmp_path), "--port", "0"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 2
    assert "CLERK_PUBLISHABLE_KEY" in result.stderr
    assert "CHARGEBEE_WEBHOOK_PASSWORD" in result.stderr
    assert "sk_test_only_this" not in result.stderr  # the secret itself is never echoed


def test_live_stream_secret_must_be_long_enough(tmp_path: Path) -> None:
    env = {**live_environment(), "STREAM_SECRET": "short"}
    with pytest.raises(ConfigError, match="STREAM_SECRET"):
        load_settings(env, state_dir=tmp_path, dotenv=None)


def test_processes_racing_on_a_fresh_state_directory_share_one_set_of_secrets(tmp_path: Path) -> None:
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(max_workers=4) as pool:
        loaded = list(pool.map(lambda _: load_settings({}, state_dir=tmp_path, dotenv=None), range(4)))
    assert len({settings.clerk_jwt_key for settings in loaded}) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["sandbox-secrets.json"]  # no temporary files left


# ---- secrets set by hand are strong enough ---------------------------------------------------------------


@pytest.mark.parametrize("password", ["x", "short-password1"])
def test_live_webhook_password_must_be_long_enough(tmp_path: Path, password: str) -> None:
    env = {**live_environment(), "CHARGEBEE_WEBHOOK_PASSWORD": password}
    with pytest.raises(ConfigError, match="CHARGEBEE_WEBHOOK_PASSWORD must be at least 16") as error:
        load_settings(env, state_dir=tmp_path, dotenv=None)
    assert repr(password) not in str(error.value)
    accepted = load_settings({**env, "CHARGEBEE_WEBHOOK_PASSWORD": "p" * 16}, state_dir=tmp_path, dotenv=None)
    assert accepted.chargebee_webhook_password == "p" * 16


def test_live_webhook_username_cannot_hold_a_colon(tmp_path: Path) -> None:
    # HTTP Basic splits at the first colon, so "hook:x" could never be presented by ChargeBee.
    env = {**live_environment(), "CHARGEBEE_WEBHOOK_USERNAME": "hook:x"}
    with pytest.raises(ConfigError, match="CHARGEBEE_WEBHOOK_USERNAME"):
        load_settings(env, state_dir=tmp_path, dotenv=None)


def test_a_short_sandbox_stream_secret_override_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="STREAM_SECRET must be at least 32 bytes") as error:
        load_settings({"STREAM_SECRET": "too-short-secret"}, state_dir=tmp_path, dotenv=None)
    assert "too-short-secret" not in str(error.value)
    long_enough = "s" * 32
    assert load_settings({"STREAM_SECRET": long_enough}, state_dir=tmp_path, dotenv=None).stream_secret == (
        long_enough
    )


def test_the_app_and_its_worker_agree_on_the_shortest_stream_secret(tmp_path: Path) -> None:
    from inference.config import WorkerConfigError, load_worker_config

    shortest = load_settings({"STREAM_SECRET": "s" * 32}, state_dir=tmp_path, dotenv=None).stream_secret
    assert load_worker_config({"STREAM_SECRET": shortest}).stream_secret == shortest
    with pytest.raises(ConfigError):
        load_settings({"STREAM_SECRET": "s" * 31}, state_dir=tmp_path, dotenv=None)
    with pytest.raises(WorkerConfigError):
        load_worker_config({"STREAM_SECRET": "s" * 31})


@pytest.mark.parametrize("mode_env", [{}, live_environment()], ids=["sandbox", "live"])
def test_csrf_secret_is_checked_and_used_when_set(tmp_path: Path, mode_env: dict[str, str]) -> None:
    with pytest.raises(ConfigError, match="CSRF_SECRET must be at least 32 bytes"):
        load_settings({**mode_env, "CSRF_SECRET": "abc"}, state_dir=tmp_path, dotenv=None)
    chosen = "c" * 40
    settings = load_settings({**mode_env, "CSRF_SECRET": chosen}, state_dir=tmp_path, dotenv=None)
    assert settings.csrf_secret == chosen


def test_python_m_app_refuses_a_short_sandbox_stream_secret_in_one_line(tmp_path: Path) -> None:
    result = run_app(tmp_path, STREAM_SECRET="short-secret-value")
    refusal = assert_one_clear_refusal(result)
    assert "STREAM_SECRET must be at least 32 bytes" in refusal
    assert "short-secret-value" not in result.stderr


def test_python_m_app_refuses_a_one_character_live_webhook_password(tmp_path: Path) -> None:
    result = run_app(tmp_path, **{**live_environment(), "CHARGEBEE_WEBHOOK_PASSWORD": "x"})
    refusal = assert_one_clear_refusal(result)
    assert "refusing to start: CHARGEBEE_WEBHOOK_PASSWORD must be at least 16 characters" in refusal


def test_python_m_app_refuses_a_bad_in_process_worker_setting_in_one_line(tmp_path: Path) -> None:
    # Read by the in-process worker's own loader (WorkerConfigError), after the app's settings were accepted.
    refusal = assert_one_clear_refusal(run_app(tmp_path, USAGE_REPORT_INTERVAL_SECONDS="0"))
    assert "USAGE_REPORT_INTERVAL_SECONDS" in refusal

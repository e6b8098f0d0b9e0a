"""The README's first command on a fresh machine: a portable lock, a light web-app environment.

These tests run uv itself, as a newcomer would: against the committed `pyproject.toml` and `uv.lock`, in
a temporary copy of the project with an empty uv cache and no uv configuration of this machine's.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.conftest import IN_CI, ROOT, clean_environment, stop_process, wait_until_healthy
from tests.live_server import free_port

UV = shutil.which("uv")
# What only the GPU worker and the test stack need: none of it may reach the web app's environment.
MODEL_STACK = ("torch", "diffusers", "transformers", "accelerate", "modal", "playwright", "triton")
WEB_APP_BUDGET_BYTES = 200 * 1024 * 1024
FIRST_COMMAND_BUDGET_SECONDS = 60.0

pytestmark = pytest.mark.skipif(UV is None and not IN_CI, reason="uv is not installed")


def _uv_env(cache: Path) -> dict[str, str]:
    """No uv setting of this machine's (config files, caches, pip's find-links) reaches the command."""
    env = clean_environment(UV_CACHE_DIR=str(cache), UV_NO_CONFIG="1", UV_PYTHON_DOWNLOADS="never")
    for name in list(env):
        if name.startswith(
            ("UV_PROJECT", "UV_FIND_LINKS", "UV_INDEX", "UV_EXTRA_INDEX", "PIP_", "VIRTUAL_ENV")
        ):
            env.pop(name)
    return env


def _uv(*args: str, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    assert UV is not None, "uv is not installed"
    done = subprocess.run(
        [UV, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert done.returncode == 0, f"uv {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _shared_cache() -> Path:
    """The developer's uv cache: these checks only read package metadata, so they may share it."""
    return Path(os.environ.get("UV_CACHE_DIR", Path.home() / ".cache" / "uv"))


def _exported_names(*args: str) -> set[str]:
    """The distributions uv would install from the lock, without installing them."""
    out = _uv(
        "export",
        "--locked",
        "--no-hashes",
        "--no-annotate",
        "--no-header",
        *args,
        cwd=ROOT,
        env=_uv_env(_shared_cache()),
    )
    names = set()
    for line in out.splitlines():
        line = line.strip()
        if line and not line.startswith(("#", "-e", ".")):
            names.add(line.split("==")[0].split(" ")[0].split(";")[0].lower())
    return names


def test_lock_names_no_path_on_any_machine() -> None:
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    local = []
    for package in lock["package"]:
        source = package.get("source", {})
        if "editable" in source or "virtual" in source:
            assert source.get("editable", source.get("virtual")) == ".", package["name"]
            continue
        registry = source.get("registry", "")
        if not registry.startswith("https://"):
            local.append(f"{package['name']}: {source}")
        for wheel in [*package.get("wheels", []), package.get("sdist", {})]:
            if wheel and "url" not in wheel:
                local.append(f"{package['name']}: {wheel}")
    assert local == [], "uv.lock names files that only one machine has"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "find-links" not in pyproject["tool"]["uv"], "pyproject points uv at a local folder"


# Linux on both architectures and Apple-silicon macOS (14+), CPython 3.11 to 3.13.
PLATFORMS = ("x86_64-manylinux_2_28", "aarch64-manylinux_2_28", "aarch64-apple-darwin")


@pytest.mark.parametrize("python", ["3.11", "3.12", "3.13"])
@pytest.mark.parametrize("platform", PLATFORMS)
def test_every_locked_pin_installs_on(platform: str, python: str, tmp_path: Path) -> None:
    """Each pin of the whole lock (web app, model stack, test stack) has a wheel for the platform."""
    pins = tmp_path / "pins.txt"
    pins.write_text(
        _uv(
            "export",
            "--locked",
            "--all-extras",
            "--group",
            "test",
            "--no-hashes",
            "--no-annotate",
            "--no-header",
            "--no-emit-project",
            cwd=ROOT,
            env=_uv_env(_shared_cache()),
        )
    )
    _uv(
        "pip",
        "compile",
        "--quiet",
        "--no-deps",
        "--no-build",
        str(pins),
        "--python-platform",
        platform,
        "--python-version",
        python,
        "-o",
        str(tmp_path / "resolved.txt"),
        cwd=tmp_path,
        env={**_uv_env(_shared_cache()), "MACOSX_DEPLOYMENT_TARGET": "14.0"},
    )
    assert "torch==" in (tmp_path / "resolved.txt").read_text()


def test_web_app_environment_has_no_model_stack() -> None:
    web_app = _exported_names()
    assert {"litestar", "uvicorn", "chargebee", "clerk-backend-api", "pillow", "numpy"} <= web_app
    assert web_app.isdisjoint(MODEL_STACK), sorted(web_app & set(MODEL_STACK))
    # The same export with the test group does bring the model stack: the split is the lock's, not
    # a quirk of the export.
    assert {"torch", "diffusers", "playwright"} <= _exported_names("--group", "test")
    assert {"torch", "diffusers"} <= _exported_names("--extra", "inference")


def _interpreter(version: str) -> str | None:
    """Python `version` as this machine has it (uv's search, then pyenv's folders)."""
    done = subprocess.run(
        [UV or "uv", "python", "find", "--system", version],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "UV_PYTHON_DOWNLOADS": "never"},
    )
    path = done.stdout.strip() if done.returncode == 0 else ""
    if not path:
        matches = sorted(glob.glob(str(Path.home() / f".pyenv/versions/{version}.*/bin/python{version}")))
        path = matches[-1] if matches else ""
    if not path and IN_CI:
        pytest.fail(f"Python {version} is not on this machine")
    return path or None


@dataclass
class FreshCheckout:
    root: Path
    env: dict[str, str]


@pytest.fixture(scope="module", params=["3.11", "3.12"])
def fresh_checkout(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> FreshCheckout:
    """The tracked project files copied to a new folder, with an empty uv cache of its own."""
    interpreter = _interpreter(request.param)
    if interpreter is None:
        pytest.skip(f"Python {request.param} is not on this machine")
    root = tmp_path_factory.mktemp(f"fresh-{request.param}")
    tracked = subprocess.run(
        [
            "git",
            "ls-files",
            "pyproject.toml",
            "uv.lock",
            "README.md",
            *("app", "billing", "inference", "sandbox"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    for name in tracked:
        target = root / "project" / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, target)
    env = _uv_env(root / "uv-cache")
    env["UV_PYTHON"] = interpreter
    return FreshCheckout(root / "project", env)


def _first_command(port: int, state_dir: Path) -> list[str]:
    """The README's first command, on a port and state folder of the test's."""
    return [
        UV or "uv",
        "run",
        "--locked",
        "python",
        "-m",
        "app",
        "--port",
        str(port),
        "--state-dir",
        str(state_dir),
    ]


def _tree_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def test_first_command_serves_the_product_from_an_empty_cache(
    fresh_checkout: FreshCheckout, capsys: pytest.CaptureFixture[str]
) -> None:
    project, env = fresh_checkout.root, fresh_checkout.env
    port = free_port()
    log_path = project.parent / "app.log"
    started = time.monotonic()
    with log_path.open("wb") as log_file:
        process = subprocess.Popen(
            _first_command(port, project.parent / "state"),
            cwd=project,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_until_healthy(process, f"http://127.0.0.1:{port}", log_path, "uv run python -m app")
        elapsed = time.monotonic() - started
        assert httpx.get(f"http://127.0.0.1:{port}/", timeout=10).status_code == 200
    finally:
        stop_process(process)
    size = _tree_bytes(project / ".venv")
    installed = {
        p.name.split("-")[0].lower()
        for p in (project / ".venv").glob("lib/python*/site-packages/*.dist-info")
    }
    with capsys.disabled():
        print(
            f"\n[fresh install, Python {env['UV_PYTHON']}] `uv run python -m app` answered /health after "
            f"{elapsed:.1f} s from an empty uv cache; its environment is {size / 2**20:.0f} MiB "
            f"({len(installed)} distributions)"
        )
    assert installed.isdisjoint(MODEL_STACK), sorted(installed & set(MODEL_STACK))
    assert size <= WEB_APP_BUDGET_BYTES, f"{size / 2**20:.0f} MiB"
    assert elapsed <= FIRST_COMMAND_BUDGET_SECONDS, f"{elapsed:.1f} s"


def test_flux2_without_the_model_stack_names_the_install_command(fresh_checkout: FreshCheckout) -> None:
    project, env = fresh_checkout.root, fresh_checkout.env
    done = subprocess.run(
        _first_command(free_port(), project.parent / "state-flux2"),
        cwd=project,
        env={**env, "INFERENCE_ENGINE": "flux2"},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 2, done.stdout + done.stderr
    assert "uv sync --extra inference" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr, done.stderr

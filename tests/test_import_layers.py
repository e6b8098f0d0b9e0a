"""The import contracts in pyproject.toml (`[tool.importlinter]`), checked by `lint-imports` itself: the
rooms import one way (bench > app > sandbox > billing > inference), the runtime imports neither the tooling
nor the tests, the web app has one owner of its wiring and route modules that do not import each other,
and no package's modules import each other in a circle.

The first test runs the checker on this tree. The others run it on a copy of the tree with one forbidden
import added, to show that each kind of contract notices what it is there for (the copies are only parsed,
never imported)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("app", "bench", "billing", "inference", "sandbox")


def lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` run in `root`, with the pyproject.toml there; nothing is cached."""
    script = Path(sys.executable).with_name("lint-imports")
    command = [str(script)] if script.is_file() else [shutil.which("lint-imports") or "lint-imports"]
    return subprocess.run(
        [*command, "--no-cache", "--no-logo"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_the_tree_keeps_every_import_contract() -> None:
    result = lint_imports(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 broken" in result.stdout, result.stdout


@pytest.fixture
def copy_of_tree(tmp_path: Path) -> Path:
    for package in PACKAGES:
        shutil.copytree(
            ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "results")
        )
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    return tmp_path


def with_import(root: Path, module: str, statement: str) -> None:
    path = root / (module.replace(".", "/") + ".py")
    path.write_text(path.read_text() + f"\n{statement}  # noqa\n")


@pytest.mark.parametrize(
    ("module", "statement", "broken"),
    [
        # The billing domain reaching up into the web app.
        ("billing.plans", "from app.settings import Settings", "billing is not allowed to import app"),
        # A sandbox emulator reaching into a route module.
        ("sandbox.files", "import app.routes.plans", "sandbox is not allowed to import app"),
        # The worker's runtime importing the tooling, and the web app importing the tests.
        ("inference.protocol", "import bench.loadgen", "inference is not allowed to import bench"),
        ("app.clerk", "import tests.conftest", "app is not allowed to import tests"),
        # An emulator built somewhere other than where the app mounts it.
        (
            "app.routes.session",
            "import sandbox.clerk_emulator",
            "app.routes is not allowed to import sandbox.clerk_emulator",
        ),
        # Wiring below the routes it registers; one route module using another.
        ("app.routes.pages", "import app.wiring", "app.routes is not allowed to import app.wiring"),
        (
            "app.routes.stream",
            "import app.routes.worker_requests",
            "app.routes.stream is not allowed to import",
        ),
        # A circle between two modules of one package.
        ("billing.ids", "import billing.accounts", "No cycles are allowed in billing"),
    ],
)
def test_a_forbidden_import_breaks_a_contract(
    copy_of_tree: Path, module: str, statement: str, broken: str
) -> None:
    assert lint_imports(copy_of_tree).returncode == 0, "the copy should start out clean"
    with_import(copy_of_tree, module, statement)
    result = lint_imports(copy_of_tree)
    assert result.returncode != 0, result.stdout
    assert broken in result.stdout, result.stdout

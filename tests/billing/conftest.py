from __future__ import annotations

from pathlib import Path

import pytest

from app.settings import Settings, load_settings
from billing.plans import PlanCatalogue


def sandbox_settings(state_dir: Path, **env: str) -> Settings:
    """Sandbox settings isolated from the developer's environment and `.env`."""
    return load_settings(environ=env, state_dir=state_dir, dotenv=None)


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> PlanCatalogue:
    return PlanCatalogue.from_settings(sandbox_settings(tmp_path_factory.mktemp("catalogue")))

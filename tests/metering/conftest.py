from __future__ import annotations

import pytest

from app.settings import load_settings
from billing.plans import PlanCatalogue


@pytest.fixture(scope="session")
def catalogue(tmp_path_factory: pytest.TempPathFactory) -> PlanCatalogue:
    """The real catalogue with the default 60-second Free plan."""
    settings = load_settings({}, state_dir=tmp_path_factory.mktemp("catalogue"), dotenv=None)
    return PlanCatalogue.from_settings(settings)

"""`create_app()`: the whole web app from one `Settings`; what that means is app/wiring.py's."""

from __future__ import annotations

from litestar import Litestar

from app.security import MAX_REQUEST_BODY_BYTES
from app.settings import Settings, load_settings
from app.wiring import Stylecast


def create_app(settings: Settings | None = None) -> Litestar:
    # The body limit is the one setting Litestar takes from its constructor alone (not from a plugin).
    return Litestar(
        plugins=[Stylecast(settings or load_settings())], request_max_body_size=MAX_REQUEST_BODY_BYTES
    )

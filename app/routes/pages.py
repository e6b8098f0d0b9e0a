"""The product's pages: landing and studio, plus the health probe."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.response import Template

from app.auth import SignedInUser, requires_user
from app.presets import DEFAULT_PRESET, STYLE_PRESETS
from app.settings import Settings
from inference.protocol import (
    DEFAULT_STEPS,
    MAX_ADAPTER_SCALE,
    MAX_PROMPT_CHARS,
    MAX_SEED,
    MAX_STEPS,
    MIN_ADAPTER_SCALE,
    OUTPUT_SIZE,
)

# What the studio's controls offer, from the worker's protocol: anything else it would refuse.
STUDIO_LIMITS = {
    "max_prompt_chars": MAX_PROMPT_CHARS,
    "max_seed": MAX_SEED,
    "output_size": OUTPUT_SIZE,
    # From the default (the fastest the studio offers) up to the most the worker takes.
    "steps": tuple(range(DEFAULT_STEPS, MAX_STEPS + 1)),
    "default_steps": DEFAULT_STEPS,
    "min_adapter_scale": MIN_ADAPTER_SCALE,
    "max_adapter_scale": MAX_ADAPTER_SCALE,
}


class PagesController(Controller):
    @get("/", name="landing")
    async def landing(self, maybe_user: NamedDependency[SignedInUser | None]) -> Template:
        return Template("landing.html", context={"user": maybe_user})

    @get("/studio", name="studio", guards=[requires_user])
    async def studio(
        self, user: NamedDependency[SignedInUser], settings: NamedDependency[Settings]
    ) -> Template:
        return Template(
            "studio.html",
            context={
                "user": user,
                "presets": STYLE_PRESETS,
                "default_preset": DEFAULT_PRESET,
                "worker_url": settings.worker_url,
                "limits": STUDIO_LIMITS,
            },
        )

    @get("/health", name="health", include_in_schema=False)
    async def health(self, settings: NamedDependency[Settings]) -> dict[str, str]:
        return {"status": "ok", "mode": settings.mode.value}

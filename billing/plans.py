"""The plan catalogue: the one place that says which plans exist and what each one grants.

Allowances are decided here and nowhere else. Display prices, ChargeBee item price ids and the Free
allowance come from the deployment (`CatalogueConfig`, which the web app builds from its settings), so a
deployment can rename its ChargeBee item prices or change the shown price without code changes, and tests
can shorten the free allowance.
"""

from __future__ import annotations

from enum import StrEnum

import msgspec

PRO_SECONDS_PER_PERIOD = 30 * 60
ULTRA_SECONDS_PER_PERIOD = 60 * 60


class PlanId(StrEnum):
    FREE = "free"
    PRO = "pro"
    ULTRA = "ultra"


class Plan(msgspec.Struct, frozen=True, kw_only=True):
    id: PlanId
    name: str
    # Streaming seconds the plan grants: per billing period for paid plans, once per account for Free.
    seconds: int
    lifetime: bool
    price_display: str
    # The ChargeBee item price a checkout for this plan subscribes to; None for Free (nothing to buy).
    item_price_id: str | None
    tagline: str

    @property
    def paid(self) -> bool:
        return self.item_price_id is not None

    @property
    def minutes(self) -> int:
        return self.seconds // 60


class CatalogueConfig(msgspec.Struct, frozen=True, kw_only=True):
    """What a deployment chooses about its plans."""

    # Streaming seconds of the Free plan, once per account.
    free_plan_seconds: int
    # The ChargeBee item prices a checkout for Pro and Ultra subscribes to.
    pro_item_price_id: str
    ultra_item_price_id: str
    # The prices the pricing page shows ("$12 / month"); what is charged is the item price's, in ChargeBee.
    pro_price_display: str
    ultra_price_display: str


class PlanCatalogue(msgspec.Struct, frozen=True):
    plans: tuple[Plan, ...]

    @classmethod
    def from_config(cls, config: CatalogueConfig) -> PlanCatalogue:
        return cls(
            plans=(
                Plan(
                    id=PlanId.FREE,
                    name="Free",
                    seconds=config.free_plan_seconds,
                    lifetime=True,
                    price_display="$0",
                    item_price_id=None,
                    tagline="Try it once, no card needed.",
                ),
                Plan(
                    id=PlanId.PRO,
                    name="Pro",
                    seconds=PRO_SECONDS_PER_PERIOD,
                    lifetime=False,
                    price_display=config.pro_price_display,
                    item_price_id=config.pro_item_price_id,
                    tagline="For regular streams and calls.",
                ),
                Plan(
                    id=PlanId.ULTRA,
                    name="Ultra",
                    seconds=ULTRA_SECONDS_PER_PERIOD,
                    lifetime=False,
                    price_display=config.ultra_price_display,
                    item_price_id=config.ultra_item_price_id,
                    tagline="Twice the time on the GPU.",
                ),
            )
        )

    def get(self, plan_id: PlanId | str) -> Plan:
        """The plan with this id; KeyError for anything else (callers validate user input with `parse`)."""
        for plan in self.plans:
            if plan.id == plan_id:
                return plan
        raise KeyError(plan_id)

    def parse(self, value: str | None) -> Plan | None:
        """A plan named by untrusted input (a form field), or None."""
        if not value:
            return None
        try:
            return self.get(PlanId(value.strip().lower()))
        except (ValueError, KeyError):
            return None

    def by_item_price(self, item_price_id: str | None) -> Plan | None:
        if not item_price_id:
            return None
        for plan in self.plans:
            if plan.item_price_id == item_price_id:
                return plan
        return None

    @property
    def free(self) -> Plan:
        return self.get(PlanId.FREE)

    @property
    def paid(self) -> tuple[Plan, ...]:
        return tuple(plan for plan in self.plans if plan.paid)

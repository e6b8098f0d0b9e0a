"""`GET /partials/usage-meter`: the studio's minutes left, polled every few seconds by htmx.

It reads the ledger store's cached view of the account (billing/ledger_store.py), so a poll costs Clerk
nothing while this process holds the account; and once the minutes are used up it tells htmx to stop.
"""

from __future__ import annotations

import logging

from litestar import Controller, get
from litestar.di import NamedDependency
from litestar.response import Template
from litestar.status_codes import HTTP_200_OK

from app.auth import SessionEnded, SignedInUser, requires_user
from app.views import account_view
from billing.accounts import AccountStoreError, UnknownUser
from billing.entitlement import entitlement
from billing.ledger_store import LedgerStore
from billing.metadata import MetadataError
from billing.plans import PlanCatalogue

log = logging.getLogger(__name__)

# htmx stops polling when a poll is answered with this status (and still swaps the content in).
HTMX_STOP_POLLING = 286


class UsageMeterController(Controller):
    @get("/partials/usage-meter", name="usage_meter", guards=[requires_user])
    async def usage_meter(
        self,
        user: NamedDependency[SignedInUser],
        ledger: NamedDependency[LedgerStore],
        catalogue: NamedDependency[PlanCatalogue],
    ) -> Template:
        try:
            account = await ledger.view(user.user_id)
        except UnknownUser:
            raise SessionEnded from None  # deleted in Clerk: sign the browser out
        except (AccountStoreError, MetadataError):
            log.warning("usage meter for %s: account unavailable", user.user_id, exc_info=True)
            # Keep polling: the next poll may find Clerk back.
            return Template("partials/usage_meter.html", context={"view": None})
        applies = entitlement(account.metadata.public, catalogue)
        return Template(
            "partials/usage_meter.html",
            context={
                "view": account_view(account, catalogue),
                "plan_name": applies.plan.name,
                "seconds_left": applies.remaining_seconds,
                "exhausted": applies.exhausted,
            },
            status_code=HTMX_STOP_POLLING if applies.exhausted else HTTP_200_OK,
        )

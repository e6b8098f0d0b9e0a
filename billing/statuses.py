"""ChargeBee's subscription statuses and what each one means here: one row per status, defined once.

Every question the code asks about a status is a column of `STATUSES` or derived from it: whether it grants
the plan's allowance (billing/entitlement.py), whether the subscription has ended (billing/webhooks.py,
the sandbox ChargeBee), whether it still bills or may bill again, so that a customer who has one changes
plans in the portal instead of buying a second subscription (billing/chargebee_client.py), and how the
account page shows it (app/views.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum
from types import MappingProxyType
from typing import Final, Literal

import msgspec


class SubscriptionStatus(StrEnum):
    """ChargeBee's subscription statuses, as they arrive in webhooks and API answers."""

    FUTURE = "future"
    IN_TRIAL = "in_trial"
    ACTIVE = "active"
    NON_RENEWING = "non_renewing"
    PAUSED = "paused"
    CANCELLED = "cancelled"
    TRANSFERRED = "transferred"


Tone = Literal["ok", "warn", "bad"]


class StatusMeaning(msgspec.Struct, frozen=True):
    # The subscription grants its plan's allowance. `non_renewing` is paid up to the end of the term;
    # `in_trial` is a deliberate trial. Paused and future subscriptions do not (yet).
    grants: bool
    # The subscription no longer exists for billing: it grants nothing and never bills again.
    ended: bool
    # What the account page calls it, and the colour it shows it in.
    label: str
    tone: Tone
    # What the end of the current term means, in the words the account page puts before its date; None
    # when there is nothing to announce.
    term_end: str | None
    # Unpaid invoices (dunning) turn the label into "Payment due" only while the subscription bills:
    # ChargeBee keeps granting until it gives up and cancels.
    dunning: bool

    @property
    def live(self) -> bool:
        """Still bills or may bill again (paused, future): a customer keeps at most one such subscription."""
        return not self.ended


_S = SubscriptionStatus
# fmt: off
STATUSES: Final[Mapping[SubscriptionStatus, StatusMeaning]] = MappingProxyType({
    #                              grants ended  label                    tone    term_end     dunning
    _S.FUTURE:       StatusMeaning(False, False, "Starts soon",           "warn", None,        False),
    _S.IN_TRIAL:     StatusMeaning(True,  False, "Trial",                 "ok",   "Renews on", False),
    _S.ACTIVE:       StatusMeaning(True,  False, "Active",                "ok",   "Renews on", True),
    _S.NON_RENEWING: StatusMeaning(True,  False, "Cancels at period end", "warn", "Ends on",   True),
    _S.PAUSED:       StatusMeaning(False, False, "Paused",                "warn", None,        False),
    _S.CANCELLED:    StatusMeaning(False, True,  "Cancelled",             "bad",  None,        False),
    _S.TRANSFERRED:  StatusMeaning(False, True,  "Transferred",           "bad",  None,        False),
})
# fmt: on

GRANTING_STATUSES: Final = frozenset(status for status, row in STATUSES.items() if row.grants)
ENDED_STATUSES: Final = frozenset(status for status, row in STATUSES.items() if row.ended)
# In ChargeBee's order, as a list filter (`status[in]`) takes them.
LIVE_STATUSES: Final = tuple(status for status in SubscriptionStatus if STATUSES[status].live)


def precedence(status: SubscriptionStatus | None) -> int:
    """Which of a customer's subscriptions the account follows, by status: one that grants before one
    that may bill again (paused, future) before one that ended, before one that was deleted (None)."""
    if status is None:
        return 0
    row = STATUSES[status]
    if row.grants:
        return 3
    return 2 if row.live else 1


__all__ = [
    "ENDED_STATUSES",
    "GRANTING_STATUSES",
    "LIVE_STATUSES",
    "STATUSES",
    "StatusMeaning",
    "SubscriptionStatus",
    "precedence",
]

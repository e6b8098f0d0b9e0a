"""The formats of the vendors' ids that reach an SDK's URL path, checked before they get there.

Neither SDK makes an id safe for a path: ChargeBee's quotes it but leaves `/` and `.` alone, Clerk's
pastes it in as is, and httpx then resolves dot segments. So `HostedPage.retrieve("../customers/x")`
would GET `/customers/x` with the app's full-access key, and `users.get(user_id="../users")` would list
every Clerk user. Every id that comes from a browser, an event or a report is checked here against the
vendor's id alphabet first, and refused (never "cleaned up") when it does not fit.

* Clerk user ids are `user_` and a base62 KSUID (27 characters today); up to 64 are accepted.
* ChargeBee ids (customers, subscriptions) are at most 50 characters. ChargeBee generates base62 ids
  and lets a site choose its own; letters, digits and `_ - . @ +` are accepted, `.` and `..` are not
  (they are dot segments, not names).
* ChargeBee hosted page ids are generated (`__test__` followed by base62 on test sites): letters, digits,
  `_` and `-`, at most 100 characters.
"""

from __future__ import annotations

import re

CLERK_USER_ID = re.compile(r"user_[A-Za-z0-9]{1,64}")
CHARGEBEE_ID = re.compile(r"(?!\.{1,2}\Z)[A-Za-z0-9_.@+\-]{1,50}")
HOSTED_PAGE_ID = re.compile(r"[A-Za-z0-9_\-]{1,100}")


class InvalidId(ValueError):
    """An id that is not in its vendor's format; it must not reach a URL path."""

    def __init__(self, kind: str, value: object) -> None:
        shown = repr(value) if not isinstance(value, str) or len(value) <= 60 else repr(value[:60] + "…")
        super().__init__(f"{shown} is not a {kind}")
        self.kind = kind


def is_clerk_user_id(value: object) -> bool:
    return isinstance(value, str) and CLERK_USER_ID.fullmatch(value) is not None


def is_chargebee_id(value: object) -> bool:
    return isinstance(value, str) and CHARGEBEE_ID.fullmatch(value) is not None


def is_hosted_page_id(value: object) -> bool:
    return isinstance(value, str) and HOSTED_PAGE_ID.fullmatch(value) is not None


def clerk_user_id(value: object) -> str:
    """`value` if it is a Clerk user id; InvalidId otherwise."""
    if not is_clerk_user_id(value):
        raise InvalidId("Clerk user id", value)
    assert isinstance(value, str)
    return value


def chargebee_id(value: object, kind: str = "ChargeBee id") -> str:
    """`value` if it is a ChargeBee customer or subscription id; InvalidId otherwise."""
    if not is_chargebee_id(value):
        raise InvalidId(kind, value)
    assert isinstance(value, str)
    return value


def hosted_page_id(value: object) -> str:
    """`value` if it is a ChargeBee hosted page id; InvalidId otherwise."""
    if not is_hosted_page_id(value):
        raise InvalidId("ChargeBee hosted page id", value)
    assert isinstance(value, str)
    return value

"""Stream claims: before a session gets `ready`, the worker asks the app to grant it the ticket's stream.

A worker remembers the tickets it has seen, but with several workers (Modal runs as many containers as
traffic needs) only the app sees every connection, so the app decides: it records the claim in the user's
ledger and refuses every later claim of the same stream, on whichever worker it arrives. The claim is
signed like a usage report (inference/signing.py, purpose "claim").
"""

from __future__ import annotations

import asyncio
import logging
import time
from enum import StrEnum
from typing import Final

import httpx

from inference.protocol import StreamClaim
from inference.signing import RETRY_STATUSES, Purpose, encode_signed
from inference.tickets import LEEWAY_SECONDS, Ticket

log = logging.getLogger(__name__)

# A claim stands between a connection and its first frame: a few quick attempts, then the client is told
# to try again (1013) rather than kept waiting.
ATTEMPTS: Final = 3
RETRY_DELAY_SECONDS: Final = 0.3


class ClaimOutcome(StrEnum):
    GRANTED = "granted"
    REFUSED = "refused"  # already claimed (on this or another worker), or not a stream the app issued
    UNAVAILABLE = "unavailable"  # the app could not be asked; nothing is known


class LocalClaims:
    """This worker's memory of tickets it has granted; the only check when no app is configured (one worker
    in development), and a fast first refusal otherwise."""

    def __init__(self) -> None:
        self._used: dict[str, int] = {}

    def claim(self, ticket: Ticket) -> bool:
        now = time.time()
        # Forget tickets that could no longer verify anyway, so the memory stays bounded.
        for jti in [jti for jti, expires in self._used.items() if expires + LEEWAY_SECONDS < now]:
            del self._used[jti]
        if ticket.ticket_id in self._used:
            return False
        self._used[ticket.ticket_id] = ticket.expires_at
        return True


class StreamClaimer:
    def __init__(self, *, url: str, secret: str, worker_id: str, client: httpx.AsyncClient) -> None:
        self.url = url
        self.secret = secret
        self.worker_id = worker_id
        self._client = client

    async def claim(self, ticket: Ticket) -> ClaimOutcome:
        for attempt in range(ATTEMPTS):
            if attempt:
                await asyncio.sleep(RETRY_DELAY_SECONDS * attempt)
            claim = StreamClaim(
                stream_id=ticket.stream_id,
                user_id=ticket.user_id,
                worker_id=self.worker_id,
                ticket_id=ticket.ticket_id,
                sent_at=time.time(),
            )
            body, headers = encode_signed(self.secret, Purpose.CLAIM, claim)
            try:
                response = await self._client.post(self.url, content=body, headers=headers)
            except httpx.HTTPError as exc:
                log.warning("claim of stream %s failed: %s", ticket.stream_id, exc)
                continue
            if response.is_success:
                return ClaimOutcome.GRANTED
            if response.status_code >= 500 or response.status_code in RETRY_STATUSES:
                log.warning("claim of stream %s: HTTP %d", ticket.stream_id, response.status_code)
                continue
            log.info(
                "claim of stream %s refused by the app: HTTP %d %s",
                ticket.stream_id,
                response.status_code,
                response.text[:200],
            )
            return ClaimOutcome.REFUSED
        return ClaimOutcome.UNAVAILABLE

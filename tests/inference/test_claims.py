"""One ticket, one stream, across workers: each worker claims the ticket's stream from the app before
`ready`, and the app (here the test's stand-in, verifying the real signature) grants each stream once."""

from __future__ import annotations

import pytest
from websockets.exceptions import ConnectionClosed

from inference.protocol import CloseCode, Ready
from tests.inference.helpers import (
    OutputFrame,
    StreamClient,
    new_ticket,
    running_worker,
    webcam_jpeg,
    worker_config,
)
from tests.inference.test_usage_reporter import Receiver, usage_receiver


def _refused(client: StreamClient, ticket: str) -> int | None:
    client.send_hello(ticket)
    with pytest.raises(ConnectionClosed):
        client.receive_until(lambda message: isinstance(message, Ready | OutputFrame), timeout=5)
    return client.close_code


def test_a_ticket_used_on_one_worker_is_refused_on_another() -> None:
    receiver = Receiver()
    receiver.up.set()
    with usage_receiver(receiver) as url:
        first = worker_config(usage_report_url=url, worker_id="worker-a")
        second = worker_config(usage_report_url=url, worker_id="worker-b")
        with running_worker(first) as a, running_worker(second) as b:
            ticket = new_ticket()
            with StreamClient.connect(a.ws_url) as on_a, StreamClient.connect(b.ws_url) as on_b:
                on_a.start(ticket)
                on_a.send_frame(1, webcam_jpeg(160, 120))
                on_a.frame(1)
                assert _refused(on_b, ticket) == CloseCode.BAD_TICKET
                on_b_frames = b.metric("stylecast_worker_frames_out_total")
            assert on_b_frames == 0
    assert [(claim.worker_id, claim.ticket_id != "") for claim in receiver.claims] == [("worker-a", True)]


def test_the_same_ticket_twice_on_one_worker_is_refused_without_asking_the_app_again() -> None:
    receiver = Receiver()
    receiver.up.set()
    with usage_receiver(receiver) as url, running_worker(worker_config(usage_report_url=url)) as running:
        ticket = new_ticket()
        with StreamClient.connect(running.ws_url) as first, StreamClient.connect(running.ws_url) as second:
            first.start(ticket)
            assert _refused(second, ticket) == CloseCode.BAD_TICKET
    assert len(receiver.claims) == 1


def test_a_claim_the_app_cannot_answer_asks_the_client_to_try_again() -> None:
    receiver = Receiver()  # down: answers 503
    with usage_receiver(receiver) as url, running_worker(worker_config(usage_report_url=url)) as running:
        with StreamClient.connect(running.ws_url) as client:
            assert _refused(client, new_ticket()) == CloseCode.TRY_AGAIN_LATER
        assert running.metric("stylecast_worker_frames_out_total") == 0

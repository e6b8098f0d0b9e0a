"""What the app's usage endpoint relies on: only the worker (holder of STREAM_SECRET) can produce a report
the app accepts, and a captured report cannot be altered or replayed much later."""

from __future__ import annotations

import msgspec
import pytest

from inference.protocol import UsageReport
from inference.usage_reporter import (
    SIGNATURE_HEADER,
    UsageReportError,
    encode_usage_report,
    signature_header,
    verify_usage_report,
)
from tests.inference.helpers import SECRET

NOW = 1_800_000_000.0
REPORT = UsageReport(stream_id="s1", user_id="u1", worker_id="w1", seconds=42, final=False, sent_at=NOW)


def test_a_signed_report_verifies() -> None:
    body, headers = encode_usage_report(SECRET, REPORT, now=NOW)
    assert headers["Content-Type"] == "application/json"
    assert verify_usage_report(SECRET, headers, body, now=NOW + 10) == REPORT


def test_header_names_are_case_insensitive() -> None:
    body, headers = encode_usage_report(SECRET, REPORT, now=NOW)
    lowered = {name.lower(): value for name, value in headers.items()}
    assert verify_usage_report(SECRET, lowered, body, now=NOW) == REPORT
    shouting = {name.upper(): value for name, value in headers.items()}
    assert verify_usage_report(SECRET, shouting, body, now=NOW) == REPORT


def test_an_altered_body_is_refused() -> None:
    body, headers = encode_usage_report(SECRET, REPORT, now=NOW)
    fewer = body.replace(b'"seconds":42', b'"seconds":1')
    with pytest.raises(UsageReportError, match="signature"):
        verify_usage_report(SECRET, headers, fewer, now=NOW)


def test_a_report_signed_with_another_secret_is_refused() -> None:
    body, headers = encode_usage_report("not-the-stream-secret-0123456789abcdef", REPORT, now=NOW)
    with pytest.raises(UsageReportError, match="signature"):
        verify_usage_report(SECRET, headers, body, now=NOW)


def test_a_stale_or_future_report_is_refused() -> None:
    body, headers = encode_usage_report(SECRET, REPORT, now=NOW)
    with pytest.raises(UsageReportError, match="window"):
        verify_usage_report(SECRET, headers, body, now=NOW + 301)
    with pytest.raises(UsageReportError, match="window"):
        verify_usage_report(SECRET, headers, body, now=NOW - 301)


def test_a_moved_timestamp_breaks_the_signature() -> None:
    body, headers = encode_usage_report(SECRET, REPORT, now=NOW)
    signature = headers[SIGNATURE_HEADER].split(",")[1]
    with pytest.raises(UsageReportError, match="signature"):
        verify_usage_report(
            SECRET, {SIGNATURE_HEADER: f"t={int(NOW) + 200},{signature}"}, body, now=NOW + 200
        )


@pytest.mark.parametrize("value", [None, "", "garbage", "t=abc,v1=00", "v1=00"])
def test_missing_or_malformed_signatures_are_refused(value: str | None) -> None:
    body, _ = encode_usage_report(SECRET, REPORT, now=NOW)
    headers = {} if value is None else {SIGNATURE_HEADER: value}
    with pytest.raises(UsageReportError):
        verify_usage_report(SECRET, headers, body, now=NOW)


def test_a_signed_body_of_the_wrong_shape_is_refused() -> None:
    wrong = msgspec.json.encode({"stream_id": "s1", "seconds": -3})  # as a buggy worker might send it
    headers = {SIGNATURE_HEADER: signature_header(SECRET, wrong, timestamp=int(NOW))}
    with pytest.raises(UsageReportError, match="malformed"):
        verify_usage_report(SECRET, headers, wrong, now=NOW)

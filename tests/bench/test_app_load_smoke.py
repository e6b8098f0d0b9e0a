"""The app load tool end to end on tiny numbers: it starts `python -m app`, drives every kind of request of
the stream load against it, counts Clerk's requests and writes its record; and its figures are measured
from when a request was due, not from when it was sent."""

from __future__ import annotations

import json
import math

import pytest

from bench import app_load
from bench.app_load import Sample, summarize


@pytest.mark.timeout(60)
def test_twenty_streams_for_five_seconds_drive_every_endpoint_and_write_the_record(tmp_path) -> None:
    record = app_load.main(
        [
            *("--streams", "20", "--spare-users", "10", "--seconds", "5", "--warmup", "1"),
            # Short streams and refreshes, so starts, ends and token refreshes all happen in 5 s.
            *(
                "--mean-stream-seconds",
                "8",
                "--refresh-seconds",
                "3",
                "--drain-seconds",
                "5",
                "--ramp-seconds",
                "1",
                "--poll-seconds",
                "2",
            ),
            *("--out", str(tmp_path)),
        ]
    )

    (path,) = tmp_path.glob("*-app-load-20-streams.json")
    assert record["path"] == str(path)
    saved = json.loads(path.read_text())
    endpoints = saved["endpoints"]
    assert set(endpoints) == set(app_load.ENDPOINTS)
    for name, row in endpoints.items():
        assert row["errors"] == 0, (name, row["error_kinds"], saved["app_log"])
        assert row["count"] > 0, name
        assert row["achieved_per_s"] == row["scheduled_per_s"], name
    # 20 tabs polling every 2 s for 5 s; a stream being replaced polls a little less.
    assert 30 <= endpoints["meter"]["count"] <= 60
    # 30 signed-in users refreshing every 3 s: one or two each in any 5 s.
    assert 30 <= endpoints["refresh"]["count"] <= 60
    assert endpoints["claim"]["count"] <= endpoints["ticket"]["count"]
    assert saved["config"]["users"] == 30
    assert saved["setup"]["complete"] is True
    assert saved["clerk"]["observable"] is True
    assert saved["clerk"]["backend_requests"] > 0
    assert saved["clerk"]["backend_429"] == 0
    assert saved["cpu"]["app_cores"] > 0
    assert saved["cpu"]["generator_cores"] > 0
    assert len(saved["table"]) == 2 + len(app_load.ENDPOINTS)


def test_a_request_sent_late_counts_its_wait_and_an_unanswered_one_counts_as_an_error() -> None:
    samples = [Sample(due=float(i), sent=float(i), done=i + 0.002, status=200, error=None) for i in range(98)]
    # Due at 98, sent 50 ms late (the generator or the pool was busy), answered 1 ms after sending.
    samples.append(Sample(due=98.0, sent=98.05, done=98.051, status=200, error=None))
    samples.append(Sample(due=99.0, sent=99.0, done=math.inf, status=-1, error="unanswered"))
    # Outside the window: never counted.
    samples.append(Sample(due=100.0, sent=100.0, done=130.0, status=200, error=None))

    row = summarize(samples, 0.0, 100.0)

    assert row["count"] == 100
    assert row["ok"] == 99
    assert row["errors"] == 1
    assert row["error_kinds"] == {"unanswered": 1}
    assert row["unanswered"] == 1
    assert row["p50_ms"] == pytest.approx(2.0)
    assert row["p99_ms"] == pytest.approx(51.0)  # the late one, from its due time
    assert row["max_ms"] is None  # infinite: the unanswered one
    assert row["send_lag_max_ms"] == pytest.approx(50.0)
    assert row["scheduled_per_s"] == 1.0
    assert row["achieved_per_s"] == 0.99

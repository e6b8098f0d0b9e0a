"""The bench names issue #18's per-frame targets from a run's render rows: the fastest labelled mode (built-in
and approximate; lever modes are not offered to users) against 40 FPS and exact against 15 FPS."""

from __future__ import annotations

from bench.gpu import Row, format_frame_targets


def _render(mode: str, ms: float, steps: int = 2, batch: int = 1) -> Row:
    return Row(f"mode:{mode}", "render", steps, batch, [ms, ms, ms])


def test_the_fastest_labelled_mode_and_exact_are_held_to_their_targets() -> None:
    rows = [
        _render("exact", 70.0),
        _render("turbo", 30.0),
        _render("flash", 24.0),
        _render("lever-tiny-decoder", 10.0),  # faster, but not a mode the studio offers
        _render("flash", 5.0, steps=4),  # other step counts and batches do not count
        _render("flash", 5.0, batch=4),
    ]
    assert format_frame_targets(rows) == [
        "target: fastest labelled mode flash 41.7 FPS, meets >= 40",
        "target: exact 14.3 FPS, misses >= 15",
    ]


def test_a_failed_case_is_not_taken_for_a_fast_one() -> None:
    failed = Row("mode:flash", "render", 2, 1, [], error="RuntimeError: out of memory")
    assert format_frame_targets([failed, _render("turbo", 33.0)]) == [
        "target: fastest labelled mode turbo 30.3 FPS, misses >= 40"
    ]

"""The batch report shows the plant's safe state on shed as checked at each engagement."""

from __future__ import annotations

from controller.records.report import _safe_state_section
from controller.records.steps import EventRecord


def _engaged(t: float, fallback: dict[str, dict[str, float | None]]) -> EventRecord:
    return EventRecord(
        "B1", "BR01", t, 0.0, "mode", "info", "engaged (bumpless)", {"fallback": fallback}
    )


def test_the_report_lists_the_checked_safe_state_and_flags_a_held_setpoint() -> None:
    events = [
        EventRecord("B1", "BR01", 0.0, 0.0, "mode", "info", "mode start -> remote", {}),
        _engaged(1.0, {"glucose_feed": {"plant": 0.0, "site": 0.0}}),
        _engaged(9.0, {"glucose_feed": {"plant": None, "site": None}}),
    ]
    html = "".join(_safe_state_section(events))
    assert "Safe state on shed" in html
    assert html.count("<tr") == 3  # header + one row per engagement and setpoint
    assert "held (none)" in html
    assert 'class="alarm"' not in html  # nothing declared, nothing contradicted
    mismatch = "".join(_safe_state_section([_engaged(2.0, {"x": {"plant": None, "site": 0.0}})]))
    assert 'class="alarm"' in mismatch
    assert _safe_state_section(events[:1]) == []

"""The batch report: `hmpc report` on a recorded closed-loop batch writes a self-contained
report.html that a real headless browser (Debian's Chromium, driven by playwright) renders
without errors or network requests, with every plot present; and CSV/Parquet exports that
hold the batch (the same from SQLite and PostgreSQL)."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pandas as pd
import pytest
from historian_testkit import SETUP_HINT, WALL_START

from controller.cli import main
from controller.records.audit import AuditTrail
from controller.records.historian import Historian
from controller.records.report import EXPORTED_TABLES
from controller.records.steps import EventRecord, StepRecord

Batch = tuple[list[StepRecord], list[EventRecord]]


def record_batch(url: str, batch: Batch) -> None:
    """Store the batch with the audit records a GMP batch has."""
    steps, events = batch
    clock = iter(WALL_START + 30.0 * k for k in range(10_000))
    with Historian(url) as hist:
        trail = AuditTrail(hist, clock=lambda: next(clock))
        trail.login("alice")
        trail.tuning_change(
            "configs/mpc_tcell.toml: horizon",
            48,
            36,
            user="alice",
            reason="CR-118",
            batch_id="B-0001",
            unit="R1",
        )
        trail.mode_change("R1", "local", "remote", user="alice", reason="start", batch_id="B-0001")
        for s in steps:
            hist.append_step(s)
            for sp in s.setpoints:
                trail.setpoint_write(
                    "R1",
                    sp.name,
                    None,
                    sp.value,
                    user="hmpc",
                    reason=f"MPC step {s.step}",
                    batch_id="B-0001",
                )
        for e in events:
            hist.append_event(e)
        trail.record("login", "session", user="bob", reason="other batch", batch_id="B-0002")


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory, batch_records: Batch) -> Path:
    folder = tmp_path_factory.mktemp("report")
    url = f"sqlite:///{folder / 'historian.sqlite'}"
    record_batch(url, batch_records)
    out = folder / "out"
    assert main(["report", "--batch", "B-0001", "--out", str(out), "--historian", url]) == 0
    return out


def test_report_and_exports_are_written(report_dir: Path, batch_records: Batch) -> None:
    steps, events = batch_records
    page = (report_dir / "report.html").read_text(encoding="utf-8")
    for name in EXPORTED_TABLES:
        csv = pd.read_csv(report_dir / f"{name}.csv")
        parquet = pd.read_parquet(report_dir / f"{name}.parquet")
        assert len(csv) == len(parquet), name
    assert len(pd.read_parquet(report_dir / "steps.parquet")) == len(steps)
    assert len(pd.read_csv(report_dir / "events.csv")) == len(events)
    audit = pd.read_parquet(report_dir / "audit.parquet")
    # the batch's records and the site-wide login during it, not the other batch's
    assert set(audit["batch_id"]) == {"B-0001", ""}
    assert (audit["action"] == "setpoint_write").sum() == 3 * len(steps)
    # self-contained: no external resources, no scripts
    assert not re.search(r"""(src|href)\s*=\s*["'](https?:|//|file:)""", page)
    assert "<script" not in page
    assert "Hash chain intact" in page
    # the estimator's model-mismatch diagnostic, stored per step and drawn
    assert all(s.diagnostics for s in steps)
    assert "Model mismatch" in page and "mismatch-R1" in page
    table = pd.read_parquet(report_dir / "steps.parquet")
    assert "diagnostic.nis.online.viable_cells" in table.columns
    assert "CR-118" in page  # the tuning change with its reason
    n_printer = sum(1 for e in events if e.kind == "printer")
    assert page.count("printer accepted job") >= 1 and n_printer == 3


def test_report_renders_in_a_headless_browser(report_dir: Path) -> None:
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.fail(f"Chromium is not installed; {SETUP_HINT}")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed; run `make setup` (dev dependencies)")
    problems: list[str] = []
    requests: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(
            executable_path=chromium,
            args=[
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
            ],
        )
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on(
                "console",
                lambda m: (
                    problems.append(f"console {m.type}: {m.text}")
                    if m.type in ("error", "warning")
                    else None
                ),
            )
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url}"))
            page.on("request", lambda r: requests.append(r.url))
            page.goto((report_dir / "report.html").as_uri(), wait_until="load")
            plots = page.eval_on_selector_all(
                "img.plot",
                "imgs => imgs.map(i => [i.id, i.complete, i.naturalWidth, i.naturalHeight])",
            )
            title = page.title()
            headings = page.eval_on_selector_all("h2", "hs => hs.map(h => h.textContent)")
            page.screenshot(path=str(report_dir / "screenshot.png"), full_page=True)
        finally:
            browser.close()
    assert problems == []
    # only the page itself: every image is embedded
    assert [u for u in requests if not u.startswith("data:")] == [
        (report_dir / "report.html").as_uri()
    ]
    assert title == "Batch B-0001"
    ids = {p[0] for p in plots}
    assert ids == {
        "trajectories-R1",
        "setpoints-R1",
        "solver-R1",
        "mismatch-R1",
        "events-R1",
        "printer-timeline",
    }
    for plot_id, complete, width, height in plots:
        assert complete and width > 300 and height > 100, plot_id  # decoded PNGs
    assert headings[:2] == ["Summary", "Unit R1"]
    assert {"Printer timeline", "Audit trail"} <= set(headings)


def test_unknown_batch_is_a_clear_error(
    report_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{report_dir.parent / 'historian.sqlite'}"
    code = main(["report", "--batch", "B-9", "--out", str(report_dir / "x"), "--historian", url])
    assert code == 2
    err = capsys.readouterr().err
    assert "batch 'B-9' has no records" in err and "known batches: 'B-0001'" in err
    assert not (report_dir / "x").exists()


def test_tampered_audit_trail_refuses_the_report_or_flags_it(
    tmp_path: Path, batch_records: Batch
) -> None:
    steps, events = batch_records
    url = f"sqlite:///{tmp_path / 'h.sqlite'}"
    record_batch(url, (steps[:3], events[:2]))
    import sqlite3

    with sqlite3.connect(tmp_path / "h.sqlite") as conn:
        conn.execute("UPDATE audit SET reason = 'approved' WHERE seq = 2")
    command = ["report", "--batch", "B-0001", "--historian", url]
    assert main([*command, "--out", str(tmp_path / "refused")]) == 1
    assert not (tmp_path / "refused" / "report.html").exists()
    assert main([*command, "--out", str(tmp_path / "out"), "--flagged"]) == 1
    page = (tmp_path / "out" / "report.html").read_text(encoding="utf-8")
    assert "VERIFICATION FAILED" in page
    assert "Hash chain TAMPERED" in page and "record #2: edited" in page
    assert "record #2: edited" in (tmp_path / "out" / "VERIFICATION_FAILED.txt").read_text()


def test_exports_are_the_same_from_sqlite_and_postgresql(
    tmp_path: Path, pg_url: str, batch_records: Batch
) -> None:
    lite = f"sqlite:///{tmp_path / 'h.sqlite'}"
    for url in (lite, pg_url):
        record_batch(url, batch_records)
    for name, url in (("lite", lite), ("pg", pg_url)):
        assert (
            main(["report", "--batch", "B-0001", "--out", str(tmp_path / name), "--historian", url])
            == 0
        )
    for table in EXPORTED_TABLES:
        a = (tmp_path / "lite" / f"{table}.csv").read_text(encoding="utf-8")
        b = (tmp_path / "pg" / f"{table}.csv").read_text(encoding="utf-8")
        assert a == b, table
        pd.testing.assert_frame_equal(
            pd.read_parquet(tmp_path / "lite" / f"{table}.parquet"),
            pd.read_parquet(tmp_path / "pg" / f"{table}.parquet"),
            obj=table,
        )

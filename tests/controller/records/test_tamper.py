"""Tamper evidence of the GMP records (issue 22, item 3): a recorded closed-loop batch in a
real SQLite file and a real PostgreSQL database is edited directly with SQL, as someone with
write access to the database could, in each of the ways the fault test tried (edited
setpoint, edited measurement, deleted step, swapped steps, forged step 999, cut tail,
deleted alarm) and by a full wipe. ``hmpc audit verify`` (with the external anchor) must
name each, and ``hmpc report`` must refuse the batch. The cut tail and the wipe are done
thoroughly (records, chain entries, audit records and both heads rewritten to a consistent
shorter chain), so only the anchor can detect them; that is checked too.

On the code before the record chain, ``hmpc audit verify`` passed all seven edits
(it covered only the audit table) and the report showed the forged step."""

# ruff: noqa: S608 (the tests tamper with the database through SQL on purpose)
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from historian_testkit import WALL_START

from controller.cli import main
from controller.records.anchor import Anchor
from controller.records.audit import AuditTrail
from controller.records.historian import Historian
from controller.records.steps import EventRecord, StepRecord

Batch = tuple[list[StepRecord], list[EventRecord]]
BATCH = "B-0001"

_STEP_COPY = (
    "unit, process_time_h, wall_time, mode, growth_factor, overhead_s, solver_success, "
    "solver_status, solver_iterations, solve_time_s, solver_cost, fallback_used, "
    "fallback_reason, solver, predictions, notes"
)


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'historian.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


def execute(url: str, *statements: str) -> None:
    """Tamper with the database directly, as someone with write access could."""
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url[len("sqlite:///") :]) as conn:
            for s in statements:
                conn.execute(s)
    else:
        import psycopg

        with psycopg.connect(url) as conn:
            for s in statements:
                conn.execute(s)


def query(url: str, sql: str) -> list[Any]:
    with Historian(url, create=False) as h:
        return h.query(sql)


def record(url: str, anchor: Path, batch: Batch) -> list[StepRecord]:
    """A batch as the runtime records it: steps, events (one alarm), audited mode change
    and setpoint writes, with the chain head anchored after every commit."""
    steps, events = batch
    steps = steps[:10]
    clock = iter(WALL_START + 30.0 * k for k in range(10_000))
    with Historian(url, anchor=Anchor(anchor)) as hist:
        trail = AuditTrail(hist, clock=lambda: next(clock))
        trail.mode_change("R1", "local", "remote", user="plant", reason="granted", batch_id=BATCH)
        for s in steps:
            hist.append_step(s)
            trail.record(
                "setpoint_write",
                "R1/setpoints",
                user="hmpc",
                reason=f"MPC step {s.step}",
                old=None,
                new={p.name: p.value for p in s.setpoints},
                batch_id=BATCH,
                unit="R1",
            )
        for e in events[:4]:
            hist.append_event(e)
        t = steps[5].process_time_h
        hist.append_event(
            EventRecord(BATCH, "R1", t, WALL_START + 3600 * t, "alarm", "alarm", "glucose high")
        )
        for e in events[4:6]:
            hist.append_event(e)
    return steps


def verify(url: str, anchor: Path | None, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    extra = ["--anchor", str(anchor)] if anchor is not None else []
    code = main(["audit", "verify", "--historian", url, *extra])
    return code, capsys.readouterr().out


def report(url: str, anchor: Path, out: Path, capsys: pytest.CaptureFixture[str]) -> int:
    command = ["report", "--batch", BATCH, "--historian", url, "--anchor", str(anchor)]
    code = main([*command, "--out", str(out)])
    capsys.readouterr()
    return code


def _step_id(url: str, step: int) -> int:
    return int(query(url, f"SELECT id FROM steps WHERE step = {step}")[0][0])


def _delete_steps(url: str, where: str) -> list[str]:
    ids = f"(SELECT id FROM steps WHERE {where})"
    return [
        f"DELETE FROM {table} WHERE step_id IN {ids}"
        for table in ("measurements", "setpoints", "estimates")
    ] + [f"DELETE FROM steps WHERE {where}"]


def edited_setpoint(url: str, steps: list[StepRecord]) -> tuple[list[str], str]:
    sid = _step_id(url, 3)
    return [
        f"UPDATE setpoints SET value = value + 0.5 WHERE step_id = {sid} AND idx = 0"
    ], "step 3 of batch 'B-0001' unit 'R1' differs"


def edited_measurement(url: str, steps: list[StepRecord]) -> tuple[list[str], str]:
    k = next(s.step for s in steps if s.measurements)
    sid = _step_id(url, k)
    return [
        f"UPDATE measurements SET value = 12.5 WHERE step_id = {sid} AND idx = 0"
    ], f"step {k} of batch 'B-0001' unit 'R1' differs"


def deleted_step(url: str, steps: list[StepRecord]) -> tuple[list[str], str]:
    return _delete_steps(
        url, "step = 4"
    ), "step 4 of batch 'B-0001' unit 'R1' is chained but missing"


def swapped_steps(url: str, steps: list[StepRecord]) -> tuple[list[str], str]:
    return [
        "UPDATE steps SET step = -1 WHERE step = 5",
        "UPDATE steps SET step = 5 WHERE step = 6",
        "UPDATE steps SET step = 6 WHERE step = -1",
    ], "step 6 of batch 'B-0001' unit 'R1' differs"


def forged_step(url: str, steps: list[StepRecord]) -> tuple[list[str], str]:
    return [
        f"INSERT INTO steps (batch_id, step, {_STEP_COPY}) SELECT batch_id, 999, "
        f"{_STEP_COPY} FROM steps WHERE step = 1"
    ], "step 999 of batch 'B-0001' unit 'R1' is not in the record chain"


def deleted_alarm(url: str, steps: list[StepRecord]) -> tuple[list[str], str]:
    return ["DELETE FROM events WHERE kind = 'alarm'"], "is chained but missing (deleted)"


def cut_tail(url: str, steps: list[StepRecord]) -> tuple[list[str], str]:
    """Everything recorded after step 7 removed, with its chain entries and audit records,
    and both heads set back: a consistent, shorter historian."""
    (cut,) = query(url, "SELECT seq FROM ledger WHERE kind = 'step' AND ref = '7'")[0]
    later = query(url, f"SELECT kind, ref FROM ledger WHERE seq > {cut}")
    (last_hash,) = query(url, f"SELECT hash FROM ledger WHERE seq = {cut}")[0]
    statements = []
    for kind, ref in later:
        if kind == "step":
            statements += _delete_steps(url, f"step = {int(ref)}")
        elif kind == "event":
            statements.append(f"DELETE FROM events WHERE id = {int(ref)}")
        elif kind == "audit":
            statements.append(f"DELETE FROM audit WHERE seq = {int(ref)}")
    (audit_seq, audit_hash) = query(
        url,
        "SELECT seq, hash FROM audit WHERE seq = (SELECT MAX(seq) FROM audit WHERE seq < "
        f"(SELECT MIN(CAST(ref AS INTEGER)) FROM ledger WHERE kind = 'audit' AND seq > {cut}))",
    )[0]
    statements += [
        f"DELETE FROM ledger WHERE seq > {cut}",
        f"UPDATE ledger_head SET seq = {cut}, hash = '{last_hash}'",
        f"UPDATE audit_head SET seq = {audit_seq}, hash = '{audit_hash}'",
    ]
    return statements, "its tail was cut"


def full_wipe(url: str, steps: list[StepRecord]) -> tuple[list[str], str]:
    tables = ("measurements", "setpoints", "estimates", "steps", "events", "audit", "ledger")
    return [f"DELETE FROM {t}" for t in tables] + [
        f"UPDATE ledger_head SET seq = 0, hash = '{'0' * 64}'",
        f"UPDATE audit_head SET seq = 0, hash = '{'0' * 64}'",
    ], "or it was wiped"


CASES = {
    "edited setpoint": edited_setpoint,
    "edited measurement": edited_measurement,
    "deleted step": deleted_step,
    "swapped steps": swapped_steps,
    "forged step 999": forged_step,
    "cut tail": cut_tail,
    "deleted alarm": deleted_alarm,
    "full wipe": full_wipe,
}


def test_an_untouched_batch_verifies_and_reports(
    url: str, tmp_path: Path, batch_records: Batch, capsys: pytest.CaptureFixture[str]
) -> None:
    anchor = tmp_path / "anchor.jsonl"
    record(url, anchor, batch_records)
    code, out = verify(url, anchor, capsys)
    assert code == 0, out
    assert "record chain intact" in out and "anchored head" in out
    assert report(url, anchor, tmp_path / "report", capsys) == 0
    page = (tmp_path / "report" / "report.html").read_text(encoding="utf-8")
    assert "Records verified" in page


@pytest.mark.parametrize("case", list(CASES))
def test_each_tampering_is_detected_and_the_report_refused(
    case: str,
    url: str,
    tmp_path: Path,
    batch_records: Batch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    anchor = tmp_path / "anchor.jsonl"
    steps = record(url, anchor, batch_records)
    assert verify(url, anchor, capsys)[0] == 0
    statements, expected = CASES[case](url, steps)
    execute(url, *statements)
    code, out = verify(url, anchor, capsys)
    assert code == 1, out
    assert expected in out, out
    code = report(url, anchor, tmp_path / "report", capsys)
    assert code != 0
    assert not (tmp_path / "report" / "report.html").exists()
    if case in ("cut tail", "full wipe"):
        # done thoroughly, only the external anchor reveals it
        code, out = verify(url, None, capsys)
        assert code == 0, out


def test_a_signed_anchor_edited_without_the_key_is_named(
    tmp_path: Path, batch_records: Batch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"sqlite:///{tmp_path / 'h.sqlite'}"
    key = tmp_path / "anchor.key"
    key.write_bytes(b"0123456789abcdef0123456789abcdef")
    anchor = tmp_path / "anchor.jsonl"
    steps, _ = batch_records
    with Historian(url, anchor=Anchor(anchor, key_file=key)) as hist:
        for s in steps[:3]:
            hist.append_step(s)
    assert main(["audit", "verify", "--historian", url, "--anchor", str(anchor),
                 "--anchor-key", str(key)]) == 0  # fmt: skip
    lines = anchor.read_text().splitlines()
    anchor.write_text("\n".join([*lines[:-1], lines[-1].replace('"seq":3', '"seq":2')]) + "\n")
    capsys.readouterr()
    code = main(
        ["audit", "verify", "--historian", url, "--anchor", str(anchor), "--anchor-key", str(key)]
    )
    assert code == 1
    assert "wrong or missing signature" in capsys.readouterr().out


def test_a_schema_1_historian_is_upgraded_by_its_writer_and_named_by_readers(
    tmp_path: Path, batch_records: Batch, capsys: pytest.CaptureFixture[str]
) -> None:
    import sqlite3

    db = tmp_path / "old.sqlite"
    url = f"sqlite:///{db}"
    steps, events = batch_records
    with Historian(url) as hist:
        for s in steps[:3]:
            hist.append_step(s)
        hist.append_event(events[0])
    with sqlite3.connect(db) as conn:  # what a version-1 historian looks like
        for t in ("ledger", "ledger_head", "write_intents"):
            conn.execute(f"DROP TABLE {t}")
        conn.execute("UPDATE hmpc_schema SET version = 1")
    code, out = verify(url, None, capsys)
    assert code == 1 and "schema 1 predates the record chain" in out
    with Historian(url) as hist:  # a writer upgrades it, chaining what is there
        assert hist.schema_version == 2
        hist.append_step(steps[3])
        kinds = [e.kind for e in hist.ledger()]
    assert kinds == ["upgrade", "step", "step", "step", "event", "step"]
    assert verify(url, None, capsys)[0] == 0

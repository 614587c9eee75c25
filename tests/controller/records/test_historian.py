"""The historian: records of a real closed loop stored and read back unchanged on SQLite and
on a real PostgreSQL server (the same records from both), durability across kill -9,
concurrent writers, and loud failures."""

from __future__ import annotations

import dataclasses
import math
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from historian_testkit import free_port, same_records

from controller.records.historian import Historian, canonical_json, record_json
from controller.records.steps import EventRecord, MeasurementRecord, SetpointRecord, StepRecord
from plant_models.errors import HistorianError

Batch = tuple[list[StepRecord], list[EventRecord]]


def awkward_step(batch_id: str = "B-odd", step: int = 0) -> StepRecord:
    """A step with the values a failing cycle produces: NaN, infinities, empty plan."""
    return StepRecord(
        batch_id=batch_id,
        unit="R2",
        step=step,
        process_time_h=float("nan"),
        wall_time=1_795_000_000.5,
        mode="disconnected",
        measurements=(
            MeasurementRecord(
                "glucose", float("nan"), "mM", 1.0, 1.5, "online", "bad", False, "non_finite"
            ),
            MeasurementRecord("lactate", float("inf"), "mM", 1.0, 1.5, "online", "good", False),
        ),
        estimate={"glucose": float("nan"), "lactate": 1e-300},  # SQLite keeps no -0.0
        estimate_std={"lactate": float("inf")},
        growth_factor=float("nan"),
        solver={"success": False, "status": "not solved", "cost": float("nan"), "slacks": {}},
        predictions={"time_h": (), "glucose": (float("nan"), 1.0)},
        setpoints=(SetpointRecord("perfusion_rate", float("nan"), 0.5, "1/d", "not written"),),
        notes=("stale data: nothing written", "ünïcode ✓"),
    )


def store(url: str, steps: list[StepRecord], events: list[EventRecord]) -> Historian:
    hist = Historian(url)
    for s in steps:
        hist.append_step(s)
    for e in events:
        hist.append_event(e)
    return hist


def test_closed_loop_batch_round_trips_on_sqlite(tmp_path: Path, batch_records: Batch) -> None:
    steps, events = batch_records
    assert len(steps) >= 20
    assert any(not m.accepted for s in steps for m in s.measurements)  # faults were recorded
    with store(f"sqlite:///{tmp_path / 'h.sqlite'}", steps, events) as hist:
        assert same_records(hist.steps("B-0001"), steps)
        assert same_records(hist.steps("B-0001", unit="R1"), steps)
        assert hist.steps("B-0001", unit="R9") == []
        assert same_records(hist.events("B-0001"), events)
        assert same_records(
            hist.events("B-0001", kind="printer"), [e for e in events if e.kind == "printer"]
        )
        last = hist.last_step("B-0001", "R1")
        assert last is not None and record_json(last) == record_json(steps[-1])
        assert hist.last_step("B-0001", "R2") is None
        assert hist.batches() == ["B-0001"]
        assert hist.units("B-0001") == ["R1"]


def test_sqlite_and_postgresql_give_the_same_records(
    tmp_path: Path, pg_url: str, batch_records: Batch
) -> None:
    steps, events = batch_records
    steps = [*steps, awkward_step()]
    events = [
        *events,
        EventRecord("B-odd", "R2", float("nan"), 1_795_000_001.0, "connection", "alarm", "lost"),
    ]
    with (
        store(f"sqlite:///{tmp_path / 'h.sqlite'}", steps, events) as lite,
        store(pg_url, steps, events) as pg,
    ):
        assert pg.dialect == "postgresql" and lite.dialect == "sqlite"
        assert lite.batches() == pg.batches() == ["B-0001", "B-odd"]
        for batch in ("B-0001", "B-odd"):
            from_lite, from_pg = lite.steps(batch), pg.steps(batch)
            assert same_records(from_lite, from_pg)
            assert same_records(from_pg, [s for s in steps if s.batch_id == batch])
            assert same_records(lite.events(batch), pg.events(batch))
            unit = from_pg[-1].unit
            last_lite, last_pg = lite.last_step(batch, unit), pg.last_step(batch, unit)
            assert last_lite is not None and last_pg is not None
            assert record_json(last_lite) == record_json(last_pg) == record_json(from_pg[-1])
            tables_lite, tables_pg = lite.to_dataframes(batch), pg.to_dataframes(batch)
            assert tables_lite.keys() == tables_pg.keys()
            for name in tables_lite:
                pd.testing.assert_frame_equal(tables_lite[name], tables_pg[name], obj=name)
        odd = pg.steps("B-odd")[0]
        assert math.isnan(odd.measurements[0].value) and odd.measurements[1].value == math.inf
        assert math.isnan(odd.solver["cost"]) and odd.notes[1] == "ünïcode ✓"


def test_tables_of_a_batch(tmp_path: Path, batch_records: Batch) -> None:
    steps, events = batch_records
    with store(tmp_path / "h.sqlite", steps, events) as hist:
        tables = hist.to_dataframes("B-0001")
    st = tables["steps"]
    assert list(st["step"]) == list(range(len(steps)))
    assert {
        "viable_cells",
        "viable_cells_std",
        "perfusion_rate",
        "perfusion_rate_requested",
    } <= set(st.columns)
    assert st["solve_time_s"].notna().all()
    n_meas = sum(len(s.measurements) for s in steps)
    assert len(tables["measurements"]) == n_meas
    assert (~tables["measurements"]["accepted"]).sum() == sum(
        1 for s in steps for m in s.measurements if not m.accepted
    )
    assert len(tables["setpoints"]) == 3 * len(steps)
    pred = tables["predictions"]
    first = pred[(pred["step"] == 0) & (pred["name"] == "viable_cells")]
    # NaN-aware: a step whose solve failed stores NaN predictions, and reads them back
    np.testing.assert_array_equal(first["value"], steps[0].predictions["viable_cells"])
    np.testing.assert_array_equal(first["std"], steps[0].predictions["viable_cells_std"])
    assert list(tables["events"]["kind"]) == [e.kind for e in events]


def test_unknown_batch_lists_the_known_ones(tmp_path: Path) -> None:
    with store(tmp_path / "h.sqlite", [awkward_step("B-1"), awkward_step("B-2")], []) as hist:
        with pytest.raises(ValueError, match=r"'B-3' has no records.*known batches: 'B-1', 'B-2'"):
            hist.to_dataframes("B-3")


def test_sqlite_is_in_wal_mode_with_full_synchronous_commits(tmp_path: Path) -> None:
    with Historian(f"sqlite:///{tmp_path / 'h.sqlite'}") as hist:
        with hist.transaction("reading settings", write=False) as cur:
            assert cur.execute("PRAGMA journal_mode").fetchone() == ("wal",)
            assert cur.execute("PRAGMA synchronous").fetchone() == (2,)  # FULL


def test_duplicate_step_fails_loudly_and_writes_nothing(tmp_path: Path, pg_url: str) -> None:
    for url in (f"sqlite:///{tmp_path / 'h.sqlite'}", pg_url):
        with Historian(url) as hist:
            hist.append_step(awkward_step())
            again = dataclasses.replace(awkward_step(), mode="remote")
            with pytest.raises(HistorianError, match="appending step 0 of batch 'B-odd'"):
                hist.append_step(again)
            stored = hist.steps("B-odd")
            assert len(stored) == 1 and stored[0].mode == "disconnected"
            assert len(stored[0].measurements) == 2  # no children of the refused step


def test_unstorable_values_fail_loudly_and_write_nothing(tmp_path: Path) -> None:
    with Historian(tmp_path / "h.sqlite") as hist:
        bad = dataclasses.replace(awkward_step(), solver={"model": object()})
        with pytest.raises(HistorianError, match="not storable"):
            hist.append_step(bad)
        with pytest.raises(HistorianError, match="not storable"):
            hist.append_event(EventRecord("B", "R1", 0.0, 0.0, "fault", "info", "x", {"f": print}))
        assert hist.batches() == []


def test_broken_database_fails_loudly(tmp_path: Path) -> None:
    path = tmp_path / "h.sqlite"
    with Historian(path) as hist:
        hist.append_step(awkward_step(step=0))
        import sqlite3

        with sqlite3.connect(path) as other:  # someone drops a table under the controller
            other.execute("DROP TABLE setpoints")
        with pytest.raises(HistorianError, match=r"appending step 1 .* failed: .*setpoints"):
            hist.append_step(awkward_step(step=1))
        with sqlite3.connect(path) as other:  # the step row was rolled back too
            assert other.execute("SELECT step FROM steps").fetchall() == [(0,)]


def test_unreachable_postgresql_fails_loudly() -> None:
    url = f"postgresql://hmpc:secret@127.0.0.1:{free_port()}/historian"
    with pytest.raises(HistorianError) as info:
        Historian(url)
    assert "secret" not in str(info.value)  # the password never appears in messages
    assert "hmpc:***@127.0.0.1" in str(info.value)


def test_missing_sqlite_database_is_not_created_for_readers(tmp_path: Path) -> None:
    with pytest.raises(HistorianError, match="no historian database"):
        Historian(f"sqlite:///{tmp_path / 'none.sqlite'}", create=False)
    with pytest.raises(HistorianError, match="does not exist"):
        Historian(tmp_path / "no-folder" / "h.sqlite")
    with pytest.raises(HistorianError, match="sqlite:///relative"):
        Historian("sqlite://h.sqlite")


def test_unit_tasks_share_one_historian_from_threads(tmp_path: Path, pg_url: str) -> None:
    for url in (f"sqlite:///{tmp_path / 'h.sqlite'}", pg_url):
        with Historian(url) as hist:

            def unit_task(unit: str, hist: Historian = hist) -> None:
                for k in range(15):
                    hist.append_step(dataclasses.replace(awkward_step("B-par", k), unit=unit))
                    hist.append_event(
                        EventRecord("B-par", unit, float(k), 0.0, "mode", "info", f"{unit} {k}")
                    )

            threads = [threading.Thread(target=unit_task, args=(f"R{i}",)) for i in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert hist.units("B-par") == ["R0", "R1", "R2", "R3"]
            for i in range(4):
                assert [s.step for s in hist.steps("B-par", f"R{i}")] == list(range(15))
                assert [e.message for e in hist.events("B-par", f"R{i}")] == [
                    f"R{i} {k}" for k in range(15)
                ]


WRITER = textwrap.dedent(
    """
    import dataclasses, sys
    sys.path[:0] = {tests!r}
    from test_historian import awkward_step
    from controller.records.historian import Historian
    hist = Historian({url!r})
    k = 0
    while True:
        hist.append_step(dataclasses.replace(awkward_step("B-kill", k), mode="remote"))
        print(k, flush=True)  # acknowledged: append_step returned
        k += 1
    """
)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_every_acknowledged_step_survives_kill_9(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    url = (
        f"sqlite:///{tmp_path / 'h.sqlite'}"
        if backend == "sqlite"
        else str(request.getfixturevalue("pg_url"))
    )
    here = Path(__file__).resolve()
    code = WRITER.format(tests=[str(here.parent), str(here.parents[1])], url=url)
    acknowledged = -1
    with subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, cwd=tmp_path
    ) as proc:
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                acknowledged = int(line)
                if acknowledged >= 40:
                    break
            os.kill(proc.pid, signal.SIGKILL)  # mid-write: the next append is under way
        finally:
            proc.kill()
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert acknowledged >= 40
    with Historian(url) as hist:
        stored = hist.steps("B-kill", "R2")
        steps = [s.step for s in stored]
        # nothing acknowledged is lost; at most the step in flight was also committed
        assert steps[: acknowledged + 1] == list(range(acknowledged + 1))
        assert len(steps) <= acknowledged + 2
        assert all(canonical_json(len(s.measurements)) == "2" for s in stored)
        last = hist.last_step("B-kill", "R2")
        assert last is not None and last.step == steps[-1]

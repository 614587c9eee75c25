"""The printer's job state machine over process time (no network)."""

from __future__ import annotations

import pytest

from sim.opcua.printer import JobOrder, JobState, PrinterSim, ReturnCode


def job(
    job_id: str = "J1", cells: float = 0.2, density: float = 10.0, start: float = 0.0
) -> JobOrder:
    return JobOrder(job_id, "P0007", "BR01-P0007", cells, density, start)


def test_store_and_start_runs_to_ended_with_results() -> None:
    printer = PrinterSim()
    assert printer.store(job(start=1.0), start=True, now_h=0.0) == (ReturnCode.OK, "")
    printer.advance(0.5)
    assert printer.jobs["J1"].state is JobState.ALLOWED_TO_START  # waits for its start
    printer.advance(1.0)
    assert printer.jobs["J1"].state is JobState.RUNNING
    assert printer.machine_state() == "Executing"
    duration = printer.duration_h(printer.jobs["J1"])  # 0.5 h setup + 20 mL / 10 mL/h
    assert duration == pytest.approx(2.5)
    printer.advance(1.0 + duration / 2)
    assert 0.4 < printer.jobs["J1"].progress < 0.6
    assert printer.monitoring()["ExtrusionPressure"] > 0
    printer.advance(1.0 + duration + 0.01)
    done = printer.jobs["J1"]
    assert done.state is JobState.ENDED and done.result is not None
    assert done.result.cells_printed == pytest.approx(0.2)
    assert done.result.outcome == "completed"
    assert printer.monitoring()["UVCrosslinkDose"] == pytest.approx(200.0)  # 2 h x 100
    assert printer.command("J1", "Clear", 5.0) is ReturnCode.OK
    assert "J1" not in printer.jobs


@pytest.mark.parametrize(
    ("bad", "why"),
    [
        (job(cells=0.0), "CellCount"),
        (job(cells=100.0), "CellCount"),
        (job(density=0.1), "BioinkCellDensity"),
        (job(cells=1.0, density=10.0), "cartridge"),  # 100 mL > 30 mL
        (job(start=-5.0), "past"),
        (JobOrder("", "P", "B", 0.2, 10.0, 0.0), "JobOrderId"),
    ],
)
def test_invalid_jobs_are_rejected(bad: JobOrder, why: str) -> None:
    printer = PrinterSim()
    code, message = printer.store(bad, start=True, now_h=0.0)
    assert code is ReturnCode.UNABLE_TO_ACCEPT
    assert why in message
    assert printer.jobs == {}


def test_duplicate_id_and_invalid_transitions() -> None:
    printer = PrinterSim()
    printer.store(job(), start=False, now_h=0.0)
    assert printer.store(job(), start=False, now_h=0.0)[0] is ReturnCode.UNABLE_TO_ACCEPT
    assert printer.command("J1", "Pause", 0.0) is ReturnCode.INVALID_STATE
    assert printer.command("nope", "Start", 0.0) is ReturnCode.UNKNOWN_JOB
    printer.advance(1.0)
    assert printer.jobs["J1"].state is JobState.NOT_ALLOWED_TO_START  # stored, not started
    assert printer.command("J1", "Start", 1.0) is ReturnCode.OK
    printer.advance(1.1)
    assert printer.command("J1", "Pause", 1.1) is ReturnCode.OK
    progress = printer.jobs["J1"].progress
    printer.advance(2.0)
    assert printer.jobs["J1"].progress == progress  # interrupted: no progress
    assert printer.command("J1", "Resume", 2.0) is ReturnCode.OK
    assert printer.command("J1", "Abort", 2.0) is ReturnCode.OK
    assert printer.jobs["J1"].state is JobState.ABORTED


def test_machine_fault_aborts_the_running_job_and_blocks_new_ones() -> None:
    printer = PrinterSim()
    printer.store(job("J1"), start=True, now_h=0.0)
    printer.store(job("J2"), start=True, now_h=0.0)
    printer.advance(0.1)
    printer.inject_fault("nozzle clogged", 0.2)
    assert printer.jobs["J1"].state is JobState.ABORTED
    result = printer.jobs["J1"].result
    assert result is not None and "nozzle clogged" in result.outcome
    assert printer.machine_state() == "OutOfService"
    printer.advance(1.0)
    assert printer.jobs["J2"].state is JobState.ALLOWED_TO_START
    printer.clear_fault()
    printer.advance(1.1)
    assert printer.jobs["J2"].state is JobState.RUNNING

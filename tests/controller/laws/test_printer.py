"""The print-job policy and its OPC UA side.

``PrintPolicy`` (controller/laws/printer.py) driven step by step without any server: forecasts,
harvest and the printer's answers in, printer calls and events out.

``PrinterCoordinator`` (controller/runtime/printing.py) against the real simulated printer
(asyncua server on 127.0.0.1, secure session, user apc; tests marked ``integration``):
scheduling, rescheduling, revoking, a rejected job, a printer fault, an unreachable printer
and a failing recorder. The printer's process clock is stepped by the test (no wall-clock
waits), so every state change is deterministic."""

from __future__ import annotations

import asyncio
import sys
import threading
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sim" / "opcua"))
from opcua_testkit import Pki, free_ports, session
from opcua_testkit import pki as pki  # the session-scoped PKI fixture

from controller.laws.printer import (
    JobSpec,
    PrinterCommand,
    PrintEvent,
    PrintPolicy,
    PrintPolicyConfig,
    load_printer_config,
)
from controller.numerics.forecast import HarvestForecast
from controller.records.steps import EventRecord
from controller.runtime.printing import PrinterCoordinator
from plant_models.errors import ConfigError, ModelError
from sim.opcua.clock import ProcessClock
from sim.opcua.printer import JobOrder, JobState
from sim.opcua.server import SimulatorConfig, Simulators

T = TypeVar("T")


class SteppedPrinter:
    """The simulators' printer server alone, on its own event loop in a thread, with a
    process clock that only moves when the test says so."""

    def __init__(self, pki: Pki) -> None:
        port, printer_port = free_ports(2)
        self.config = SimulatorConfig(
            port=port, printer_port=printer_port, units=1, pki=pki.folder, plant_step_h=1.0
        )
        self.hours = 0.0
        self.loop = asyncio.new_event_loop()
        self.sims: Simulators | None = None
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name="stepped-printer", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_until_complete(self._serve())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._ready.set()
        finally:
            self.loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        sims = Simulators(self.config)
        # process hours = fake monotonic seconds at speed 3600
        sims.clock = ProcessClock(3600.0, monotonic=lambda: self.hours)
        server = sims.printer_server
        if server is None:
            raise RuntimeError("no printer server")
        await server.start()
        self.sims = sims
        self._ready.set()
        try:
            await self._stop.wait()
        finally:
            await server.stop()

    def start(self) -> SteppedPrinter:
        self._thread.start()
        if not self._ready.wait(60) or self._error is not None:
            self.close()
            raise RuntimeError(f"printer did not start: {self._error!r}")
        return self

    def close(self) -> None:
        if self._stop is not None and self.loop.is_running():
            self.loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)

    def run(self, fn: Callable[[], Awaitable[T]]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(fn(), self.loop)  # type: ignore[arg-type]
        return future.result(30)

    @property
    def s(self) -> Simulators:
        if self.sims is None:
            raise RuntimeError("not started")
        return self.sims

    @property
    def endpoint(self) -> str:
        endpoint = self.s.printer_endpoint
        if endpoint is None:
            raise RuntimeError("no printer endpoint")
        return endpoint

    def now(self) -> float:
        return self.s.process_h()

    def advance_to(self, hours: float) -> None:
        """Move process time to ``hours`` (plant grid of 1 h) and publish."""

        async def go() -> None:
            self.hours = max(self.hours, hours)
            self.s.step()
            server = self.s.printer_server
            if server is not None:
                await server.publish()

        self.run(go)

    def jobs(self) -> dict[str, JobOrder]:
        async def read() -> dict[str, JobOrder]:
            return dict(self.s.printer.jobs)

        return self.run(read)


@pytest.fixture(scope="module")
def printer(pki: Pki) -> Iterator[SteppedPrinter]:
    thread = SteppedPrinter(pki).start()
    try:
        yield thread
    finally:
        thread.close()


class Recorder:
    """Records events; fails the first ``failures`` calls (a historian that is down)."""

    def __init__(self, failures: int = 0) -> None:
        self.events: list[EventRecord] = []
        self.failures = failures

    def append_event(self, event: EventRecord) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise OSError("historian unavailable")
        self.events.append(event)


def forecast(p: float, cells: float, harvest_h: float, now_h: float) -> HarvestForecast:
    """A forecast with the figures the coordinator reads (the forecaster's own tests cover
    how they are computed)."""
    times = np.array([now_h, harvest_h])
    band = np.array([cells * 0.5, cells])
    return HarvestForecast(
        time_h=now_h,
        dose_cells=15.0,
        harvest_time_h=harvest_h,
        level=0.9,
        members=64,
        dose_time_h=harvest_h - 10.0,
        dose_time_low_h=harvest_h - 20.0,
        dose_time_high_h=harvest_h + 5.0,
        probability_dose_by_harvest=p,
        harvest_cells=cells,
        harvest_cells_low=0.8 * cells,
        harvest_cells_high=1.2 * cells,
        times_h=times,
        cells_median=band,
        cells_low=0.8 * band,
        cells_high=1.2 * band,
        horizon_end_h=harvest_h,
        input_plan="hold",
        gp_variance_used=False,
    )


def coordinator(
    client: Any, recorder: Recorder, batch: str, config: PrintPolicyConfig | None = None
) -> PrinterCoordinator:
    return PrinterCoordinator(
        config or PrintPolicyConfig(),
        client,
        recorder,
        batch_id=batch,
        patient_id=f"P-{batch}",
        unit="BR01",
        wall_clock=lambda: 1.7e9,
    )


def actions(recorder: Recorder) -> list[str]:
    return [str(e.data.get("action")) for e in recorder.events]


# -- the policy alone: no server, no event loop -------------------------------------------------
def policy(batch: str = "B1", config: PrintPolicyConfig | None = None) -> PrintPolicy:
    return PrintPolicy(config or PrintPolicyConfig(), batch_id=batch, patient_id=f"P-{batch}")


def answer(p: PrintPolicy, result: int | str = 0) -> list[PrinterCommand]:
    """One round on the printer: the policy's calls, each answered ``result``."""
    calls = []
    command = p.next_command()
    while command is not None:
        calls.append(command)
        command = p.command_done(command, result)
    return calls


def kinds(events: list[PrintEvent]) -> list[tuple[str, str]]:
    return [(e.severity, str(e.data["action"])) for e in events]


def test_policy_stores_once_confident_updates_when_moved_and_releases_at_harvest() -> None:
    p = policy("B1")
    p.on_forecast(forecast(0.6, 20.0, 100.0, 50.0), 50.0)  # below schedule_probability
    assert p.next_command() is None and p.take_events() == []
    p.on_forecast(forecast(0.95, 20.0, 100.0, 51.0), 51.0)  # crosses it: store
    job = JobSpec("PRINT-B1-1", "P-B1", "B1", 0.4, 20.0, 102.0)  # 2 % of 20e9, harvest + 2 h
    assert p.next_command() == PrinterCommand("Store", job)
    assert answer(p) == [PrinterCommand("Store", job)]
    assert p.job == job and p.job_state == "NotAllowedToStart"
    [stored] = p.take_events()
    assert (stored.severity, stored.data["action"], stored.process_time_h) == ("info", "Store", 51)
    assert "scheduled" in stored.message and ">= 0.9" in stored.data["reason"]
    assert stored.data["forecast"]["probability_dose_by_harvest"] == pytest.approx(0.95)
    # confident again, moved within the tolerances (5 % of the cells, 1 h): stored once
    p.on_forecast(forecast(0.97, 21.0, 101.0, 52.0), 52.0)
    assert p.next_command() is None and p.take_events() == []
    # moved beyond the tolerance: updated, not started
    p.on_forecast(forecast(0.97, 26.0, 104.0, 53.0), 53.0)
    moved = JobSpec("PRINT-B1-1", "P-B1", "B1", 0.52, 20.0, 106.0)
    assert answer(p) == [PrinterCommand("Update", moved, previous=job)]
    assert p.job == moved and not p.job.start
    assert kinds(p.take_events()) == [("info", "Update")]
    # harvest: the real cells, start 2 h later, released (Update, then Start in one round)
    p.on_harvest(100.0, 24.0)
    assert kinds(p.take_events()) == [("info", "harvest")]
    released = JobSpec("PRINT-B1-1", "P-B1", "B1", 0.48, 20.0, 102.0, start=True)
    assert [c.method for c in answer(p)] == ["Update", "Start"]
    assert p.job == released and p.job_state == "AllowedToStart" and not p.finished
    assert kinds(p.take_events()) == [("info", "Update"), ("info", "Start")]
    # forecasts after the harvest change nothing
    p.on_forecast(forecast(0.1, 5.0, 100.0, 101.0), 101.0)
    assert p.next_command() is None
    # the printer runs and ends it
    p.on_job_state("Running", 0.1)
    p.on_job_state("Running", 0.5)  # no change: no event
    p.on_job_state("Ended", 1.0, outcome="completed", cells_printed=0.48, bioink_volume_ml=24.0)
    assert p.finished and p.next_command() is None
    events = p.take_events()
    assert [e.data["state"] for e in events] == ["Running", "Ended"]
    assert events[-1].severity == "info" and events[-1].data["cells_printed"] == 0.48


def test_policy_revokes_below_revoke_probability_and_stores_a_new_id() -> None:
    p = policy("B2")
    p.on_forecast(forecast(0.92, 20.0, 100.0, 50.0), 50.0)
    assert [c.method for c in answer(p)] == ["Store"]
    p.on_forecast(forecast(0.7, 20.0, 100.0, 51.0), 51.0)  # between the two: kept
    assert p.next_command() is None
    p.on_forecast(forecast(0.3, 12.0, 100.0, 52.0), 52.0)
    assert answer(p) == [
        PrinterCommand("Cancel", JobSpec("PRINT-B2-1", "P-B2", "B2", 0.4, 20.0, 102.0))
    ]
    assert p.job is None and p.job_state == ""
    p.on_forecast(forecast(0.93, 19.0, 100.0, 53.0), 53.0)
    [store] = answer(p)
    assert store.method == "Store" and store.job.job_id == "PRINT-B2-2"
    events = p.take_events()
    assert kinds(events) == [("info", "Store"), ("warning", "Cancel"), ("info", "Store")]
    assert "revoked" in events[1].message and "0.30 < 0.5" in events[1].data["reason"]


def test_policy_harvest_without_a_job_stores_and_starts_it() -> None:
    p = policy("B9")
    p.on_forecast(forecast(0.5, 20.0, 100.0, 90.0), 90.0)
    p.on_harvest(100.0, 10.0)
    job = JobSpec("PRINT-B9-1", "P-B9", "B9", 0.2, 20.0, 102.0, start=True)
    assert answer(p) == [PrinterCommand("StoreAndStart", job)]
    assert p.job_state == "AllowedToStart"
    with pytest.raises(ModelError, match="already harvested"):
        p.on_harvest(101.0, 10.0)


def test_policy_rejected_or_refused_calls_are_not_repeated() -> None:
    p = policy("B3")
    p.on_forecast(forecast(0.95, 20.0, 100.0, 50.0), 50.0)
    assert [c.method for c in answer(p, 4)] == ["Store"]  # unable to accept
    p.on_forecast(forecast(0.95, 20.0, 100.0, 51.0), 51.0)
    assert p.next_command() is None and p.job is None  # same parameters: not sent again
    [alarm] = p.take_events()
    assert alarm.severity == "alarm" and "rejected" in alarm.message
    assert alarm.data["return_code"] == 4 and "bioink_cell_density" in alarm.message
    # the forecast moves: new parameters are tried
    p.on_forecast(forecast(0.95, 30.0, 100.0, 52.0), 52.0)
    assert [c.method for c in answer(p)] == ["Store"]
    # a start the printer refuses is not retried; the job stays stored
    p.on_harvest(100.0, 30.0)
    assert [c.method for c in answer(p, "BadInvalidArgument")] == ["Start"]
    assert p.next_command() is None and p.job is not None and not p.job.start
    assert kinds(p.take_events())[-2:] == [("info", "harvest"), ("alarm", "Start")]


def test_policy_unknown_job_at_update_is_stored_again_next_round() -> None:
    p = policy("B4")
    p.on_forecast(forecast(0.95, 20.0, 100.0, 50.0), 50.0)
    answer(p)
    p.on_forecast(forecast(0.95, 30.0, 100.0, 51.0), 51.0)
    assert [c.method for c in answer(p, 1)] == ["Update"]  # unknown job: this round ends
    assert p.job is None
    assert [c.method for c in answer(p)] == ["Store"]  # the next round stores it again
    assert kinds(p.take_events()) == [("info", "Store"), ("alarm", "Update"), ("info", "Store")]


def test_policy_adopts_its_batch_job_and_refuses_another_patients() -> None:
    p = policy("B7")
    assert p.job_revision("PRINT-B7-3") == 3
    assert p.job_revision("PRINT-B70-3") is None and p.job_revision("OTHER-B7-3") is None
    p.on_forecast(forecast(0.95, 20.5, 100.0, 51.0), 51.0)  # decided before the first poll
    found: dict[str, Any] = {
        "job_id": "PRINT-B7-3",
        "patient_id": "P-B7",
        "batch_id": "B7",
        "cell_count": 0.4,
        "bioink_density": 20.0,
        "scheduled_start_h": 102.0,
        "state": "NotAllowedToStart",
    }
    p.adopt(3, **found)
    assert p.job == JobSpec("PRINT-B7-3", "P-B7", "B7", 0.4, 20.0, 102.0)
    assert p.next_command() is None  # within the tolerances: kept as the printer holds it
    p.on_forecast(forecast(0.2, 20.0, 100.0, 52.0), 52.0)
    assert [c.method for c in answer(p)] == ["Cancel"]
    p.on_forecast(forecast(0.95, 20.0, 100.0, 53.0), 53.0)
    assert [c.job.job_id for c in answer(p)] == ["PRINT-B7-4"]  # ids continue
    assert kinds(p.take_events()) == [("info", "adopt"), ("warning", "Cancel"), ("info", "Store")]

    other = PrintPolicy(PrintPolicyConfig(), batch_id="B7", patient_id="P-SOMEONE-ELSE")
    other.on_forecast(forecast(0.95, 20.0, 100.0, 51.0), 51.0)
    other.adopt(3, **found)
    assert other.job is None
    [alarm] = other.take_events()
    assert alarm.severity == "alarm" and alarm.data["action"] == "adopt_refused"
    assert [c.job.job_id for c in answer(other)] == ["PRINT-B7-4"]  # never the other's id


def test_policy_printer_states_raise_alarms() -> None:
    p = policy("B5")
    p.on_machine_state("NotExecuting", "")
    assert p.take_events() == []  # the first reading is no change
    p.on_machine_state("OutOfService", "nozzle clogged")
    p.on_forecast(forecast(0.99, 20.0, 60.0, 50.0), 50.0)
    answer(p)
    p.on_harvest(60.0, 20.0)
    answer(p)
    p.on_job_state("Running", 0.2)
    p.on_job_state(
        "Aborted", 0.4, outcome="aborted: nozzle clogged", cells_printed=0.1, bioink_volume_ml=5.0
    )
    assert p.finished
    events = p.take_events()
    alarms = [e for e in events if e.severity == "alarm"]
    assert [e.data["action"] for e in alarms] == ["machine_state", "job_state"]
    assert "nozzle clogged" in alarms[0].message and "ABORTED" in alarms[1].message
    # a job removed by hand before the harvest: an alarm, stored again
    q = policy("B6")
    q.on_forecast(forecast(0.95, 20.0, 100.0, 50.0), 50.0)
    answer(q)
    q.on_job_missing()
    assert q.job is None and [c.method for c in answer(q)] == ["Store"]
    assert kinds(q.take_events()) == [
        ("info", "Store"),
        ("alarm", "job_missing"),
        ("info", "Store"),
    ]


# -- scheduling, rescheduling, harvest, print --------------------------------------------------
@pytest.mark.integration
def test_schedule_reschedule_harvest_and_print(printer: SteppedPrinter, pki: Pki) -> None:
    t0 = printer.now()
    harvest = t0 + 20.0
    rec = Recorder()

    async def go() -> PrinterCoordinator:
        async with session(printer.endpoint, pki, "apc") as client:
            c = coordinator(client, rec, "B1")
            c.on_forecast(forecast(0.6, 20.0, harvest, t0), t0)  # not confident yet
            await c.poll()
            assert c.job is None and not actions(rec)
            c.on_forecast(forecast(0.95, 20.0, harvest, t0 + 1), t0 + 1)
            await c.poll()
            job = printer.jobs()["PRINT-B1-1"]
            assert job.state is JobState.NOT_ALLOWED_TO_START
            assert job.cell_count == pytest.approx(0.4)  # 2 % of 20e9
            assert job.bioink_density == pytest.approx(20.0)
            assert job.scheduled_start_h == pytest.approx(harvest + 2.0, abs=1e-6)
            assert job.patient_id == "P-B1" and job.batch_id == "B1"
            # within tolerance: nothing is sent
            c.on_forecast(forecast(0.95, 21.0, harvest, t0 + 2), t0 + 2)
            await c.poll()
            assert actions(rec) == ["Store"]
            # beyond tolerance: the job is updated on the printer
            c.on_forecast(forecast(0.97, 26.0, harvest + 4.0, t0 + 3), t0 + 3)
            await c.poll()
            job = printer.jobs()["PRINT-B1-1"]
            assert job.cell_count == pytest.approx(0.52)
            assert job.scheduled_start_h == pytest.approx(harvest + 6.0, abs=1e-6)
            assert job.state is JobState.NOT_ALLOWED_TO_START
            # harvest: real cell count, released to start 2 h later
            printer.advance_to(harvest)
            c.on_harvest(printer.now(), 24.0)
            await c.poll(printer.now())
            job = printer.jobs()["PRINT-B1-1"]
            assert job.state is JobState.ALLOWED_TO_START
            assert job.cell_count == pytest.approx(0.48)
            assert job.scheduled_start_h == pytest.approx(printer.now() + 2.0, abs=1e-6)
            printer.advance_to(printer.now() + 2.0)
            await c.poll(printer.now())
            assert c.job_state == "Running"
            printer.advance_to(printer.now() + 5.0)  # 0.5 h + 24 mL / 10 mL/h
            await c.poll(printer.now())
            return c

    c = asyncio.run(go())
    assert c.finished and c.job_state == "Ended"
    assert [a for a in actions(rec) if a != "machine_state"] == [
        "Store",
        "Update",
        "harvest",
        "Update",
        "Start",
        "job_state",
        "job_state",
    ]
    jobs = [e for e in rec.events if e.data.get("action") == "job_state"]
    assert [e.data["state"] for e in jobs] == ["Running", "Ended"]
    machine = [e.data["state"] for e in rec.events if e.data.get("action") == "machine_state"]
    assert machine == ["Executing", "NotExecuting"]
    ended = jobs[-1]
    assert ended.severity == "info" and ended.data["cells_printed"] == pytest.approx(0.48)
    assert all(e.kind == "printer" and e.batch_id == "B1" and e.unit == "BR01" for e in rec.events)
    assert rec.events[0].data["forecast"]["probability_dose_by_harvest"] == pytest.approx(0.95)
    times = [e.process_time_h for e in rec.events]
    assert times == sorted(times)
    assert c.pending_events == 0 and c.events == rec.events
    assert printer.jobs()["PRINT-B1-1"].result is not None


# -- revoking --------------------------------------------------------------------------------
@pytest.mark.integration
def test_revoke_when_confidence_is_lost_and_schedule_again(
    printer: SteppedPrinter, pki: Pki
) -> None:
    t0 = printer.now()
    harvest = t0 + 30.0
    rec = Recorder()

    async def go() -> None:
        async with session(printer.endpoint, pki, "apc") as client:
            c = coordinator(client, rec, "B2")
            c.on_forecast(forecast(0.92, 20.0, harvest, t0), t0)
            await c.poll()
            assert "PRINT-B2-1" in printer.jobs()
            c.on_forecast(forecast(0.7, 20.0, harvest, t0 + 1), t0 + 1)  # hysteresis: kept
            await c.poll()
            assert "PRINT-B2-1" in printer.jobs()
            c.on_forecast(forecast(0.3, 12.0, harvest, t0 + 2), t0 + 2)
            await c.poll()
            assert "PRINT-B2-1" not in printer.jobs() and c.job is None
            c.on_forecast(forecast(0.93, 19.0, harvest, t0 + 3), t0 + 3)
            await c.poll()
            assert "PRINT-B2-2" in printer.jobs()
            # clean up the shared printer: revoke the second job too
            c.on_forecast(forecast(0.1, 10.0, harvest, t0 + 4), t0 + 4)
            await c.poll()
            assert "PRINT-B2-2" not in printer.jobs()

    asyncio.run(go())
    assert actions(rec) == ["Store", "Cancel", "Store", "Cancel"]
    revoke = rec.events[1]
    assert revoke.severity == "warning" and "revoked" in revoke.message
    assert "0.30 < 0.5" in revoke.data["reason"]


# -- a restarted controller --------------------------------------------------------------------
@pytest.mark.integration
def test_restarted_coordinator_takes_over_its_batch_job(printer: SteppedPrinter, pki: Pki) -> None:
    t0 = printer.now()
    harvest = t0 + 30.0
    before, after = Recorder(), Recorder()

    async def go() -> PrinterCoordinator:
        async with session(printer.endpoint, pki, "apc") as client:
            first = coordinator(client, before, "B7")
            first.on_forecast(forecast(0.95, 20.0, harvest, t0), t0)
            await first.poll()
        # the controller process restarts: a new coordinator, a new session
        async with session(printer.endpoint, pki, "apc") as client:
            c = coordinator(client, after, "B7")
            c.on_forecast(forecast(0.95, 20.5, harvest, t0 + 1), t0 + 1)  # within tolerance
            await c.poll()
            assert actions(after) == ["adopt"]
            job = c.job
            assert job is not None and job.job_id == "PRINT-B7-1" and not job.start
            assert job.cell_count == pytest.approx(0.4)
            assert job.scheduled_start_h == pytest.approx(harvest + 2.0, abs=1e-3)
            assert c.job_state == "NotAllowedToStart"
            assert [j for j in printer.jobs() if "B7" in j] == ["PRINT-B7-1"]
            # the adopted job follows the forecast like one stored by this process
            c.on_forecast(forecast(0.97, 26.0, harvest + 4.0, t0 + 2), t0 + 2)
            await c.poll()
            assert printer.jobs()["PRINT-B7-1"].cell_count == pytest.approx(0.52)
            c.on_forecast(forecast(0.2, 10.0, harvest, t0 + 3), t0 + 3)
            await c.poll()
            assert "PRINT-B7-1" not in printer.jobs()
            c.on_forecast(forecast(0.95, 20.0, harvest, t0 + 4), t0 + 4)
            await c.poll()
            assert "PRINT-B7-2" in printer.jobs()  # ids continue after the adopted one
            c.on_forecast(forecast(0.1, 10.0, harvest, t0 + 5), t0 + 5)
            await c.poll()
            return c

    asyncio.run(go())
    assert actions(before) == ["Store"]
    assert actions(after) == ["adopt", "Update", "Cancel", "Store", "Cancel"]
    adopt = after.events[0]
    assert adopt.severity == "info" and adopt.data["state"] == "NotAllowedToStart"
    assert not [e for e in after.events if e.severity == "alarm"]


@pytest.mark.integration
def test_job_of_another_patient_is_never_taken_over(printer: SteppedPrinter, pki: Pki) -> None:
    t0 = printer.now()
    harvest = t0 + 30.0
    rec = Recorder()

    async def go() -> None:
        async with session(printer.endpoint, pki, "apc") as client:
            first = coordinator(client, Recorder(), "B8")
            first.on_forecast(forecast(0.95, 20.0, harvest, t0), t0)
            await first.poll()
            other = PrinterCoordinator(
                PrintPolicyConfig(), client, rec, batch_id="B8", patient_id="P-SOMEONE-ELSE"
            )
            other.on_forecast(forecast(0.95, 20.0, harvest, t0 + 1), t0 + 1)
            await other.poll()
            jobs = printer.jobs()
            assert jobs["PRINT-B8-1"].patient_id == "P-B8"  # untouched
            assert jobs["PRINT-B8-2"].patient_id == "P-SOMEONE-ELSE"
            for c in (first, other):
                c.on_forecast(forecast(0.1, 10.0, harvest, t0 + 2), t0 + 2)
                await c.poll()
            assert not [j for j in printer.jobs() if "B8" in j]

    asyncio.run(go())
    assert actions(rec) == ["adopt_refused", "Store", "Cancel"]
    assert rec.events[0].severity == "alarm" and "P-B8" in rec.events[0].message


# -- a rejected job -------------------------------------------------------------------------
@pytest.mark.integration
def test_rejected_job_raises_one_alarm_and_is_not_resent(printer: SteppedPrinter, pki: Pki) -> None:
    t0 = printer.now()
    # 0.4e9 cells at 1e6 cells/mL = 400 mL: the printer's cartridge holds 30 mL
    config = PrintPolicyConfig(bioink_cell_density=1.0, max_printed_cells=5.0)
    rec = Recorder()

    async def go() -> None:
        async with session(printer.endpoint, pki, "apc") as client:
            c = coordinator(client, rec, "B3", config)
            c.on_forecast(forecast(0.95, 20.0, t0 + 30.0, t0), t0)
            await c.poll()
            c.on_forecast(forecast(0.95, 20.0, t0 + 30.0, t0 + 1), t0 + 1)
            await c.poll()
            assert c.job is None

    asyncio.run(go())
    assert "PRINT-B3-1" not in printer.jobs()
    assert len(rec.events) == 1  # one alarm, not one per cycle
    alarm = rec.events[0]
    assert alarm.severity == "alarm" and "rejected" in alarm.message
    assert alarm.data["return_code"] == 4
    assert alarm.data["job"]["bioink_volume_ml"] == pytest.approx(400.0)


# -- a printer fault --------------------------------------------------------------------------
@pytest.mark.integration
def test_printer_fault_aborts_the_print_with_alarms_and_no_lost_record(
    printer: SteppedPrinter, pki: Pki
) -> None:
    t0 = printer.now()
    rec = Recorder(failures=2)  # the historian is down for the first two events

    async def go() -> PrinterCoordinator:
        async with session(printer.endpoint, pki, "apc") as client:
            c = coordinator(client, rec, "B4")
            c.on_forecast(forecast(0.99, 20.0, t0 + 5.0, t0), t0)
            await c.poll()
            assert c.pending_events == 1  # the first event is kept for later
            printer.advance_to(t0 + 5.0)
            c.on_harvest(printer.now(), 20.0)  # the recorder fails once more: both wait
            assert c.pending_events == 2
            await c.poll(printer.now())
            printer.advance_to(printer.now() + 2.0)
            await c.poll(printer.now())
            assert c.job_state == "Running"

            async def fault() -> None:
                printer.s.printer.inject_fault("nozzle clogged", printer.now())
                server = printer.s.printer_server
                if server is not None:
                    await server.publish()

            async def clear() -> None:
                printer.s.printer.clear_fault()
                server = printer.s.printer_server
                if server is not None:
                    await server.publish()

            try:
                printer.run(fault)
                await c.poll(printer.now())
            finally:
                printer.run(clear)  # the printer is shared by the module's tests
            return c

    c = asyncio.run(go())
    assert c.finished and c.job_state == "Aborted"
    assert c.pending_events == 0 and rec.events == c.events  # nothing lost, order kept
    assert actions(rec)[:3] == ["Store", "harvest", "Start"]  # same cells: no update
    alarms = [e for e in rec.events if e.severity == "alarm"]
    assert {e.data["action"] for e in alarms} == {"machine_state", "job_state"}
    aborted = next(e for e in alarms if e.data["action"] == "job_state")
    assert "ABORTED" in aborted.message and "nozzle clogged" in aborted.data["outcome"]
    machine = next(e for e in alarms if e.data["action"] == "machine_state")
    assert "nozzle clogged" in machine.message


# -- an unreachable printer ---------------------------------------------------------------------
@pytest.mark.integration
def test_unreachable_printer_gives_one_alarm_and_the_job_is_stored_later(
    printer: SteppedPrinter, pki: Pki
) -> None:
    t0 = printer.now()
    rec = Recorder()

    async def go() -> None:
        async with session(printer.endpoint, pki, "apc") as client:
            c = coordinator(client, rec, "B5")
            await c.poll(t0)  # connected: namespace and batch start known
        # the session is closed now: the printer cannot be reached
        c.on_forecast(forecast(0.95, 20.0, t0 + 30.0, t0), t0)
        await c.poll()
        await c.poll()
        assert c.job is None
        async with session(printer.endpoint, pki, "apc") as again:
            c.client = again
            await c.poll()
            assert c.job is not None
            c.on_forecast(forecast(0.1, 20.0, t0 + 30.0, t0 + 1), t0 + 1)
            await c.poll()  # revoke: leave the shared printer clean

    asyncio.run(go())
    assert actions(rec) == ["unreachable", "Store", "reconnected", "Cancel"]
    assert rec.events[0].severity == "alarm"


@pytest.mark.integration
def test_viewer_cannot_store_a_job(printer: SteppedPrinter, pki: Pki) -> None:
    t0 = printer.now()
    rec = Recorder()

    async def go() -> None:
        async with session(printer.endpoint, pki, "viewer") as client:
            c = coordinator(client, rec, "B6")
            c.on_forecast(forecast(0.95, 20.0, t0 + 30.0, t0), t0)
            await c.poll()

    asyncio.run(go())
    assert [e.data["return_code"] for e in rec.events] == [8]
    assert rec.events[0].severity == "alarm" and "apc or operator role" in rec.events[0].message


# -- configuration and bad input ----------------------------------------------------------------
def test_config_file_validation(tmp_path: Path) -> None:
    path = tmp_path / "printer.toml"
    path.write_text("[printer]\nschedule_probability = 0.8\nbioink_cell_density = 25\n")
    config = load_printer_config(path)
    assert config.schedule_probability == 0.8 and config.bioink_cell_density == 25.0
    path.write_text("[printer]\nbioink_density = 25\n")
    with pytest.raises(ConfigError, match=r"printer\.toml.*bioink_density.*bioink_cell_density"):
        load_printer_config(path)
    path.write_text("[printer]\nrevoke_probability = 0.95\n")
    with pytest.raises(ConfigError, match="revoke_probability.*flap"):
        load_printer_config(path)
    path.write_text("[printer]\nprinted_fraction = 1.5\n")
    with pytest.raises(ConfigError, match="printed_fraction"):
        load_printer_config(path)
    path.write_text('[printer]\njob_prefix = "a b"\n')
    with pytest.raises(ConfigError, match="job_prefix"):
        load_printer_config(path)
    path.write_text("[mpc]\nhorizon = 3\n")
    with pytest.raises(ConfigError, match=r"\[printer\]"):
        load_printer_config(path)


def test_bad_inputs_are_refused_before_anything_is_sent() -> None:
    rec = Recorder()
    c = PrinterCoordinator(PrintPolicyConfig(), None, rec, batch_id="B7", patient_id="P7")  # type: ignore[arg-type]
    with pytest.raises(ModelError, match="harvested cells"):
        c.on_harvest(10.0, float("nan"))
    with pytest.raises(ModelError, match="probability"):
        c.on_forecast(forecast(1.5, 20.0, 100.0, 0.0), 0.0)
    with pytest.raises(ModelError, match="process time"):
        c.on_forecast(forecast(0.5, 20.0, 100.0, 0.0), float("inf"))
    with pytest.raises(ConfigError, match="batch_id"):
        PrinterCoordinator(PrintPolicyConfig(), None, rec, batch_id=" ", patient_id="P")  # type: ignore[arg-type]
    assert rec.events == []


def test_printed_cells_are_capped_and_job_spec_volume() -> None:
    config = PrintPolicyConfig(printed_fraction=0.05, max_printed_cells=0.6)
    assert config.printed_cells(10.0) == pytest.approx(0.5)
    assert config.printed_cells(40.0) == pytest.approx(0.6)
    spec = JobSpec("J", "P", "B", 0.6, 20.0, 100.0)
    assert spec.parameters()["bioink_volume_ml"] == pytest.approx(30.0)


def test_simulated_printer_update_rules() -> None:
    """The ISA-95 Update added to the simulated printer for the coordinator."""
    from sim.opcua.printer import PrinterSim, ReturnCode

    sim = PrinterSim()
    sim.store(JobOrder("J", "P", "B", 0.2, 10.0, 5.0), start=False, now_h=0.0)
    code, _ = sim.update(JobOrder("J", "P", "B", 0.25, 10.0, 6.0), now_h=0.0)
    assert code is ReturnCode.OK
    assert (sim.jobs["J"].cell_count, sim.jobs["J"].scheduled_start_h) == (0.25, 6.0)
    assert sim.jobs["J"].state is JobState.NOT_ALLOWED_TO_START
    code, why = sim.update(JobOrder("J", "P", "B", 1.0, 10.0, 6.0), now_h=0.0)
    assert code is ReturnCode.UNABLE_TO_ACCEPT and "cartridge" in why
    assert sim.jobs["J"].cell_count == 0.25  # unchanged
    assert (
        sim.update(JobOrder("K", "P", "B", 0.2, 10.0, 6.0), now_h=0.0)[0] is ReturnCode.UNKNOWN_JOB
    )
    sim.command("J", "Start", 0.0)
    sim.advance(6.0)
    assert sim.jobs["J"].state is JobState.RUNNING
    assert (
        sim.update(JobOrder("J", "P", "B", 0.2, 10.0, 6.0), now_h=6.0)[0]
        is ReturnCode.INVALID_STATE
    )

"""Printer coordination in the controller runtime (``hmpc run``'s service) against the OPC UA
simulators on 127.0.0.1 (bioreactor and printer servers, Basic256Sha256 SignAndEncrypt,
user apc): a short batch of the estimator-fed MPC whose harvest forecast schedules the print
job, which is released at the harvest and completed, with every event in the historian; and
a printer outage during the batch that leaves the bioreactor's control writes untouched.

The batch is shortened through a process file (dose 1e9 viable cells, harvest at 48 h) and
the site's ``harvest_time_h``. The plant's clock is paced as in test_runtime_opcua.py: it
may pass hour k + 1 only once the controller has finished its cycle of hour k (the printer
work included), so the outcome does not depend on the machine's load.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from runtime_testkit import PASSWORDS, PlantThread, free_ports

from controller.laws.control import ControllerSpec, build_controller
from controller.records.historian import Historian
from controller.records.report import write_report
from controller.records.steps import EventRecord, StepRecord
from controller.runtime.plant_io import ensure_client_certificate
from controller.runtime.service import serve
from controller.runtime.site import SiteConfig, load_site
from plant_models.errors import ConfigError
from sim.bench_loop import grant_remote, write_sim_site
from sim.demo import printer_timeline
from sim.opcua.server import SimulatorConfig

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
SPEED = 36000.0  # 10 process h per wall second, paced below
FINAL = ("Ended", "Aborted")


class Tap:
    """The historian, with the step times kept in memory for the pacing."""

    def __init__(self, historian: Historian) -> None:
        self.historian = historian
        self.steps: list[StepRecord] = []
        self.events: list[EventRecord] = []

    def append_step(self, record: StepRecord) -> None:
        self.historian.append_step(record)
        self.steps.append(record)

    def append_event(self, record: EventRecord) -> None:
        self.historian.append_event(record)
        self.events.append(record)


def _process_file(folder: Path, *, dose: float, harvest: float) -> Path:
    text = (ROOT / "plant_models" / "data" / "tcell_process.toml").read_text()
    text, n1 = re.subn(r"dose_cells = \{ value = [0-9.]+", f"dose_cells = {{ value = {dose}", text)
    text, n2 = re.subn(
        r"harvest_time = \{ value = [0-9.]+", f"harvest_time = {{ value = {harvest}", text
    )
    assert n1 == n2 == 1
    path = folder / "process_short.toml"
    path.write_text(text)
    return path


def _site(tmp_path: Path, plant: PlantThread, pki: Path, harvest: float) -> SiteConfig:
    site = write_sim_site(
        tmp_path / "site.toml",
        endpoint=plant.endpoint,
        pki=pki,
        units=["BR01"],
        controller="mechanistic-mpc",
        mpc_config=CONFIGS / "mpc_tcell_hourly.toml",
        harvest_time_h=harvest,
        timing={
            "heartbeat_interval_s": 0.5,
            "solve_budget_s": 10.0,  # the paced clock waits anyway: no overrun under load
            "reconnect_interval_s": 0.25,
            "request_timeout_s": 2.0,
        },
    )
    printer = plant.s.printer_endpoint
    assert printer is not None
    with site.path.open("a") as fh:
        fh.write(
            f"""
[printer]
endpoint = "{printer}"
object = "nsu=urn:hmpc:sim;s=Printer"
patient_id = "nsu=urn:hmpc:sim;s={{unit}}.Bioreactor.ProgramManager.ActiveProgram.PatientId"
finish_within_h = 12.0

[printer.settings]
harvest_to_print_h = 0.5

[printer.forecast]
members = 32
"""
        )
    return load_site(site.path)


def _law(process: Path, harvest: float) -> Any:
    return build_controller(
        ControllerSpec(
            "mechanistic-mpc",
            model="tcell",
            mpc_config=CONFIGS / "mpc_tcell_hourly.toml",
            process=process,
            harvest_time=harvest,
        )
    )


async def _wait_for(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def _paced_batch(
    plant: PlantThread,
    site: SiteConfig,
    law: Any,
    tap: Tap,
    harvest: float,
    actions: dict[int, Callable[[], Any]] | None = None,
) -> Any:
    """Run ``serve`` to the harvest on the paced clock (``actions[k]`` runs on the plant's
    event loop before the plant may pass hour k), then let the clock run up to 6 h past
    the harvest while the controller follows the print job."""
    actions = actions or {}

    async def run() -> list[Any]:
        await ensure_client_certificate(site.security)
        stop = asyncio.Event()
        task = asyncio.create_task(serve(site, {"BR01": law}, tap, stop=stop))
        try:
            assert await grant_remote(site, "BR01", PASSWORDS["operator"]) == "Good"
            await _wait_for(lambda: any(s.mode == "remote" for s in tap.steps), 60, "engagement")
            gate = plant.gate
            start = gate()
            wall_per_hour = 3600.0 / SPEED
            loop = asyncio.get_running_loop()
            for k in range(1, round(harvest) + 1):
                if k in actions:
                    await loop.run_in_executor(None, plant.run, actions[k])
                gate.limit = start + (k + 0.5) * wall_per_hour
                gate.resume()
                await _wait_for(
                    lambda k=k: (
                        task.done()
                        or any(s.process_time_h >= k for s in tap.steps[-3:])
                        or any(e.kind == "batch_end" for e in tap.events)
                    ),
                    120,
                    f"the cycle at {k} h",
                )
            # the print runs: hour by hour (the printer advances once per plant tick)
            printer = plant.s.printer
            for k in range(round(harvest) + 1, round(harvest) + 7):
                # the printer's clock waits until the job is released (the printer's session
                # may still be reconnecting: its back-off is seconds, hours at this speed)
                await _wait_for(
                    lambda: (
                        task.done()
                        or any(j.state.value != "NotAllowedToStart" for j in printer.jobs.values())
                    ),
                    60,
                    "the job released",
                )
                gate.limit = start + (k + 0.5) * wall_per_hour
                await _wait_for(lambda k=k: printer.time_h >= k, 60, f"the printer at {k} h")
                jobs = list(printer.jobs.values())
                if task.done() or (jobs and all(j.state.value in FINAL for j in jobs)):
                    break
            return await asyncio.wait_for(task, 120)
        finally:
            stop.set()
            if not task.done():
                await task

    (summary,) = asyncio.run(run())
    return summary


def _printer_events(historian: Historian, batch: str) -> list[EventRecord]:
    return historian.events(batch, kind="printer")


def _start_plant(pki: Path, patient_seed: int) -> PlantThread:
    """A paused one-unit simulator with its printer on free loopback ports."""
    port, printer_port = free_ports(2)
    config = SimulatorConfig(
        port=port,
        printer_port=printer_port,
        units=1,
        speed=SPEED,
        patient_seed=patient_seed,
        pki=pki,
        heartbeat_timeout_s=5.0,
        plant_step_h=1.0,
    )
    return PlantThread(config, paused=True).start()


def test_forecast_schedules_the_job_released_at_harvest_and_printed(
    tmp_path: Path, pki: Path
) -> None:
    harvest = 48.0
    plant = _start_plant(pki, patient_seed=7)
    try:
        site = _site(tmp_path, plant, pki, harvest)
        law = _law(_process_file(tmp_path, dose=1.0, harvest=harvest), harvest)
        with Historian(f"sqlite:///{tmp_path / 'historian.sqlite'}") as historian:
            summary = _paced_batch(plant, site, law, Tap(historian), harvest)
            unit = plant.s.unit("BR01")
            jobs = dict(plant.s.printer.jobs)
            events = _printer_events(historian, summary.batch_id)
            report = write_report(historian, summary.batch_id, tmp_path / "report" / "BR01")
    finally:
        plant.close()
    timeline = printer_timeline(tmp_path / "historian.sqlite", tmp_path / "report")

    assert summary.ended == "harvest"
    assert summary.batch_id == unit.batch_id
    for e in events:
        print(f"{e.process_time_h:6.2f} h {e.severity:7s} {e.message}")
    actions = [(e.data.get("action"), e.data.get("return_code")) for e in events]
    assert ("forecast", None) in actions
    # scheduled from a confident forecast before the harvest
    stored = [e for e in events if e.data.get("action") == "Store"]
    assert stored and stored[0].data["return_code"] == 0
    assert stored[0].process_time_h < harvest
    assert stored[0].data["forecast"]["probability_dose_by_harvest"] >= 0.9
    # released at the harvest with the harvested cells
    harvest_events = [e for e in events if e.data.get("action") == "harvest"]
    assert len(harvest_events) == 1 and harvest_events[0].process_time_h >= harvest
    harvested = harvest_events[0].data["harvested_cells"]
    started = [e for e in events if e.data.get("action") == "Start"]
    assert len(started) == 1 and started[0].data["return_code"] == 0
    assert started[0].process_time_h >= harvest
    # completed on the printer, as the printer itself says
    ended = [e for e in events if e.data.get("state") == "Ended"]
    assert len(ended) == 1 and ended[0].data["outcome"] == "completed"
    assert not [e for e in events if e.severity == "alarm"]
    (job,) = jobs.values()
    assert job.state.value == "Ended" and job.result is not None
    assert job.patient_id == unit.plant.patient.patient_id  # read from the bioreactor
    assert job.batch_id == summary.batch_id
    assert job.cell_count == pytest.approx(0.02 * harvested)  # printed_fraction
    assert ended[0].data["cells_printed"] == pytest.approx(job.result.cells_printed)
    # the harvested cells are the bioreactor's (truth within the probe's and volume's error)
    truth = unit.plant.true_values()["total_viable_cells"]
    assert harvested == pytest.approx(truth, rel=0.25)
    # the report's printer timeline shows the story
    page = report.read_text()
    section = page[page.index("id='printer'") :]
    for needle in ("scheduled", "released", "ended (completed)"):
        assert needle in section, needle
    # and the demo's summary of it (hmpc-sim demo prints these lines)
    print("\n".join(timeline))
    text = "\n".join(timeline)
    for needle in ("harvest forecast", "scheduled", "harvest of", "released", "ended (completed)"):
        assert needle in text, needle
    assert f"printer timeline with {len(events)} of {len(events)} events" in text


def test_printer_outage_does_not_stop_the_control_writes(tmp_path: Path, pki: Path) -> None:
    """The printer server is down from 5-6 h to 12 h of a 24 h batch: the bioreactor gets its
    setpoint bundles every hour as before (all Good, in Remote), the outage is one alarm,
    the return an info, and the job is still released and printed at the harvest."""
    harvest = 24.0
    plant = _start_plant(pki, patient_seed=3)
    server = plant.s.printer_server
    assert server is not None

    async def down() -> None:
        await server.stop()

    async def up() -> None:
        plant.s.restarting = True  # no publishing while the address space is rebuilt
        try:
            await server.start()
        finally:
            plant.s.restarting = False

    try:
        site = _site(tmp_path, plant, pki, harvest)
        law = _law(_process_file(tmp_path, dose=1.0, harvest=harvest), harvest)
        with Historian(f"sqlite:///{tmp_path / 'historian.sqlite'}") as historian:
            tap = Tap(historian)
            summary = _paced_batch(plant, site, law, tap, harvest, {6: down, 12: up})
            events = _printer_events(historian, summary.batch_id)
            steps = historian.steps(summary.batch_id, "BR01")
        writes = list(plant.writes)
        jobs = dict(plant.s.printer.jobs)
    finally:
        plant.close()

    for e in events:
        print(f"{e.process_time_h:6.2f} h {e.severity:7s} {e.message}")
    assert summary.ended == "harvest"
    # control: every hourly cycle of the outage ran the MPC, in Remote, and each bundle the
    # plant received was accepted
    outage = [s for s in steps if 6.0 <= s.process_time_h < 12.0]
    assert len(outage) >= 6
    assert all(s.mode == "remote" and s.solver for s in outage)
    assert all(p.status in ("Good", "unchanged") for s in outage for p in s.setpoints)
    during = [w for w in writes if 6.0 <= w.process_h < 12.0]
    assert during, "no setpoint bundle reached the plant during the printer outage"
    assert all(w.mode == "REMOTE" and set(w.statuses) == {"Good"} for w in writes)
    # the printer side: one alarm for the outage, an info when back
    unreachable = [e for e in events if e.data.get("action") == "unreachable"]
    assert len(unreachable) == 1 and unreachable[0].severity == "alarm"
    # (the server stops once the cycle of 5 h is recorded; its printer poll may follow)
    assert 5.0 <= unreachable[0].process_time_h <= 6.0
    back = [e for e in events if e.data.get("action") == "reconnected"]
    assert back and back[0].process_time_h >= 12.0
    # and the hand-off still happened
    ended = [e for e in events if e.data.get("state") == "Ended"]
    assert len(ended) == 1 and ended[0].data["outcome"] == "completed"
    assert [j.state.value for j in jobs.values()] == ["Ended"]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ("[printer.settings]\nschedule_probabilty = 0.9", "Did you mean 'schedule_probability'"),
        ("[printer.settings]\nprinted_fraction = 1.5", "printed_fraction = 1.5 is outside"),
        ("[printer.forecast]\nmembers = 63", "members must be an even number"),
        ("finish_within = 2.0", "Did you mean 'finish_within_h'"),
        ('patient_id = "nsu=urn:x;s={unt}.PatientId"', "only {unit} is replaced"),
    ],
)
def test_printer_table_errors_name_the_file_and_key(
    tmp_path: Path, table: str, message: str
) -> None:
    site = write_sim_site(
        tmp_path / "site.toml",
        endpoint="opc.tcp://127.0.0.1:4840/hmpc/bioreactor",
        pki=tmp_path / "pki",
        units=["BR01"],
    )
    with site.path.open("a") as fh:
        fh.write(f'\n[printer]\nendpoint = "opc.tcp://127.0.0.1:4841/hmpc/printer"\n{table}\n')
    with pytest.raises(ConfigError) as info:
        load_site(site.path)
    assert str(site.path) in str(info.value) and "[printer]" in str(info.value)
    assert message in str(info.value)

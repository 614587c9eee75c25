"""The closed loop on a plant served over OPC UA (:class:`sim.opcua_plant.OpcUaPlant`): the
same ``run_closed_loop``, ``summarize`` and violation count as on the virtual bioreactor,
through the runtime's secure client, against the simulators on 127.0.0.1."""

from __future__ import annotations

import asyncio
import math
import threading
from pathlib import Path

import pytest
from runtime_testkit import PASSWORDS, PlantThread, free_ports, wait_until

from controller.laws.control import ControllerSpec, build_controller
from controller.numerics.limits import OutputLimiter
from plant_models.errors import PlantIOError
from sim.bench_loop import grant_remote, write_sim_site
from sim.closed_loop import Plant, run_closed_loop, summarize
from sim.opcua.server import SimulatorConfig
from sim.opcua_plant import OpcUaPlant
from sim.patients import VirtualPatient, load_cohort_spec
from sim.plant import VirtualBioreactor

pytestmark = pytest.mark.integration

INPUTS = ("perfusion_rate", "glucose_feed", "il2_addition")
SPEED = 36000.0  # process hours per wall hour: 10 h/s, paced below


def _limiter(plant: Plant) -> OutputLimiter:
    return OutputLimiter(
        bounds=plant.bounds,
        rate_limits=plant.plugin.rate_limits(plant.process),
        deadbands={k: 1e-3 * (high - low) for k, (low, high) in plant.bounds.items()},
    )


def _start(pki: Path) -> PlantThread:
    (port,) = free_ports(1)
    config = SimulatorConfig(
        port=port,
        printer_port=0,
        units=1,
        speed=SPEED,
        patient_seed=7,
        pki=pki,
        heartbeat_timeout_s=5.0,
        plant_step_h=1.0,
    )
    return PlantThread(config, paused=True).start()


def _pace(thread: PlantThread) -> tuple[object, float]:
    """Lock-step: the plant's gated clock may run to half an hour past each step's end."""
    gate = thread.gate
    start = gate()

    def pace(end_h: float) -> None:
        gate.limit = start + (end_h + 0.5) * 3600.0 / SPEED
        gate.resume()

    return pace, start


@pytest.mark.slow
def test_closed_loop_runs_on_the_opcua_plant_as_on_the_virtual_bioreactor(
    tmp_path: Path, pki: Path
) -> None:
    """Rule controller, patient seed 7, sensor seed 0, two days: the trajectory the loop
    records over OPC UA (truth read from the simulator, for scoring) equals the in-process
    loop's within 1 %, and summarize and the violation count work on it."""
    days = 2.0
    reference_plant = VirtualBioreactor.for_process(
        "tcell", VirtualPatient.draw(7, load_cohort_spec()[0]), seed=0
    )
    reference = run_closed_loop(
        reference_plant,
        build_controller(ControllerSpec("rule", model="tcell")),
        days=days,
        limiter=_limiter(reference_plant),
    )

    thread = _start(pki)
    try:
        site = write_sim_site(
            tmp_path / "site.toml", endpoint=thread.endpoint, pki=pki, units=["BR01"]
        )
        pace, _ = _pace(thread)
        plant = OpcUaPlant(
            site,
            "BR01",
            truth=lambda: thread.s.units[0].plant.true_values(),
            pace=pace,  # type: ignore[arg-type]
            timeout_s=120.0,
        )

        async def operator() -> str:
            return await grant_remote(site, "BR01", PASSWORDS["operator"], timeout_s=120.0)

        # the operator grants Remote once the plant sees the controller's heartbeat
        granted: list[str] = []
        worker = threading.Thread(target=lambda: granted.append(asyncio.run(operator())))
        worker.start()
        with plant.open():
            worker.join(130)
            assert granted == ["Good"]
            assert plant.plant_id  # the plant's BatchId
            df = run_closed_loop(
                plant,
                build_controller(ControllerSpec("rule", model="tcell")),
                days=days,
                limiter=_limiter(plant),
            )
            assert plant.refused_writes == 0
        # handed back to Local at close
        assert thread.s.units[0].apc.mode.name.lower() == "local"
    finally:
        thread.close()

    assert len(df) == len(reference) == round(days * 24) + 1
    for key in ("viable_cells", "glucose", "lactate", "volume", *INPUTS):
        for a, b in zip(df[key], reference[key], strict=True):
            assert a == pytest.approx(b, rel=0.01, abs=1e-9), key
    summary = summarize(df, plant)
    expected = summarize(reference, reference_plant)
    assert summary["fold_expansion"] == pytest.approx(expected["fold_expansion"], rel=0.01)
    assert summary["media_used"] == pytest.approx(expected["media_used"], rel=0.01)
    assert df["hard_violation"].sum() == 0
    assert math.isfinite(float(df["measured_glucose"].iloc[-1]))


@pytest.mark.slow
def test_step_refuses_to_write_when_the_operator_took_the_unit_back(
    tmp_path: Path, pki: Path
) -> None:
    thread = _start(pki)
    try:
        site = write_sim_site(
            tmp_path / "site.toml", endpoint=thread.endpoint, pki=pki, units=["BR01"]
        )
        pace, _ = _pace(thread)
        plant = OpcUaPlant(site, "BR01", pace=pace, timeout_s=60.0)  # type: ignore[arg-type]

        granted: list[str] = []
        worker = threading.Thread(
            target=lambda: granted.append(
                asyncio.run(grant_remote(site, "BR01", PASSWORDS["operator"], timeout_s=60.0))
            )
        )
        worker.start()
        with plant.open():
            worker.join(70)
            assert granted == ["Good"]
            low = {n: plant.bounds[n][0] for n in plant.input_names}
            plant.step(low, 1.0)
            assert plant.time_h == pytest.approx(1.0)
            # without truth the plant scores the latest measurements
            assert "glucose" in plant.true_values()
            status = asyncio.run(
                grant_remote(site, "BR01", PASSWORDS["operator"], timeout_s=30.0, mode=0)
            )
            assert status == "Good"
            wait_until(lambda: not plant.status().remote, 60, "Local at the client")
            writes = len(thread.writes)
            with pytest.raises(PlantIOError, match="not in Remote"):
                plant.step(low, 1.0)
            assert len(thread.writes) == writes  # nothing written
    finally:
        thread.close()


@pytest.mark.slow
def test_a_restarted_plant_ends_the_batch_instead_of_continuing_it(
    tmp_path: Path, pki: Path
) -> None:
    """The simulator restarts as another batch (new BatchId, clock back at 0) on the same
    endpoint; once the operator grants Remote again, the next step raises instead of
    continuing the record on the new culture (an outsider's finding). A closed plant cannot
    be reopened."""
    (port,) = free_ports(1)

    def config(seed: int) -> SimulatorConfig:
        return SimulatorConfig(
            port=port, printer_port=0, units=1, speed=SPEED, patient_seed=seed, pki=pki,
            heartbeat_timeout_s=5.0, plant_step_h=1.0,
        )  # fmt: skip

    threads = [PlantThread(config(7), paused=True).start()]

    def pace(end_h: float) -> None:
        thread = threads[-1]
        start = getattr(thread, "origin", None)
        if start is None:
            start = thread.origin = thread.gate()  # type: ignore[attr-defined]
        thread.gate.limit = start + (end_h + 0.5) * 3600.0 / SPEED
        thread.gate.resume()

    def grant(site: object) -> None:
        status = asyncio.run(grant_remote(site, "BR01", PASSWORDS["operator"], timeout_s=60.0))  # type: ignore[arg-type]
        assert status == "Good"

    try:
        site = write_sim_site(
            tmp_path / "site.toml", endpoint=threads[0].endpoint, pki=pki, units=["BR01"]
        )
        plant = OpcUaPlant(site, "BR01", pace=pace, timeout_s=60.0)
        worker = threading.Thread(target=grant, args=(site,))
        worker.start()
        with plant.open():
            worker.join(70)
            low = {n: plant.bounds[n][0] for n in plant.input_names}
            plant.step(low, 1.0)
            plant.step(low, 1.0)
            first = plant.plant_id
            threads[0].close()
            threads.append(PlantThread(config(8), paused=True).start())
            wait_until(lambda: plant.status().connected, 60, "the reconnect")
            grant(site)
            wait_until(lambda: plant.status().remote, 60, "Remote again")
            writes = len(threads[-1].writes)
            with pytest.raises(PlantIOError, match="restarted or was reset"):
                plant.step(low, 1.0)
            assert len(threads[-1].writes) == writes  # nothing written to the new batch
            assert plant.plant_id == first
        with pytest.raises(PlantIOError, match="closed"):
            plant.open()
    finally:
        for thread in threads:
            thread.close()

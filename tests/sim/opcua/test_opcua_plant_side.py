"""The simulators' plant side reproduces the in-process plant: same patient, same sensor
noise, same inputs -> same trajectory and measurements (the basis for comparing a batch over
OPC UA with the in-process closed loop)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from opcua_testkit import free_ports

from plant_models.errors import IntegrationError
from sim.opcua.apc import Mode, Role
from sim.opcua.security import write_user
from sim.opcua.server import SimulatorConfig, Simulators, serve_simulators
from sim.patients import VirtualPatient, load_cohort_spec
from sim.plant import VirtualBioreactor


def test_unit_matches_the_in_process_plant(tmp_path: Path) -> None:
    sims = Simulators(SimulatorConfig(patient_seed=7, units=2, plant_step_h=1.0, pki=tmp_path))
    unit = sims.units[1]  # unit i: patient seed 7 + i, sensor seed 0 + i
    reference = VirtualBioreactor.for_process(
        "tcell", VirtualPatient.draw(8, load_cohort_spec()[0]), seed=1
    )
    first = reference.initial_measurements()
    assert {(m.source, m.name): m.value for m in first} == {
        k: m.value for k, m in unit.latest.items()
    }
    apc = unit.apc
    apc.beat(1, 0.0)
    assert apc.request_mode(Mode.REMOTE, Role.OPERATOR, 0.0, "op").value == "Good"
    assert apc.mode is Mode.REMOTE
    rate = apc.config.limits["perfusion_rate"].rate_up
    inputs = {"perfusion_rate": 0.0, "glucose_feed": 0.0, "il2_addition": 0.0}
    for k in range(30):
        # a controller that respects the plant's rate limit
        inputs = {
            "perfusion_rate": min(inputs["perfusion_rate"] + 0.5 * rate, 1.0),
            "glucose_feed": 0.5 if k > 10 else 0.0,
            "il2_addition": 0.0,
        }
        statuses = apc.write_setpoints(list(inputs), list(inputs.values()), Role.APC, 0.0, "apc")
        assert all(s.value == "Good" for s in statuses)
        unit.advance(1.0)
        expected = reference.step(inputs, 1.0)
        for m in expected:
            assert unit.latest[(m.source, m.name)] == m
    truth, ref_truth = unit.plant.true_values(), reference.true_values()
    assert truth == pytest.approx(ref_truth, rel=1e-12)
    assert unit.totals["glucose_feed"] == pytest.approx(0.5 * 19)  # mL/h x h


@pytest.mark.integration
def test_a_failing_plant_is_reported_not_hidden(tmp_path: Path) -> None:
    write_user(tmp_path / "users.toml", "viewer", Role.VIEWER, "pw", iterations=1000)
    port, printer_port = free_ports(2)
    config = SimulatorConfig(
        port=port, printer_port=printer_port, pki=tmp_path, speed=3600.0, hand_built=True
    )

    def broken(dt_h: float) -> None:
        raise IntegrationError("plant integration failed (test)")

    async def go() -> BaseException:
        async with serve_simulators(config) as sims:
            sims.units[0].advance = broken  # type: ignore[method-assign]
            return await asyncio.wait_for(sims.wait_failed(), 10)

    error = asyncio.run(go())
    assert isinstance(error, IntegrationError)

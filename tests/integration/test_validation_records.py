"""Validation results reach the historian for every controller (issue 22, item 4): a real
``hmpc run`` against the OPC UA simulators on 127.0.0.1 with the glucose probe stuck from
2 h on (the simulator's ``stuck`` fault: the value freezes, the timestamps advance). Under
the rule controller (no estimator: the loop validates) and under the estimator-fed MPC
(the estimator validates), the stuck readings are stored as rejected with the reason, and
one ``sensor`` alarm says the probe is stuck.

Before, the estimator's rejection went to stderr only and the historian showed the
readings as accepted; the rule controller did not notice at all."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest
from runtime_testkit import PASSWORDS, PlantThread, free_ports

from controller.records.historian import Historian
from sim.bench_loop import PASSWORD_ENV, grant_remote, write_sim_site
from sim.opcua.faults import Fault
from sim.opcua.server import SimulatorConfig

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
STUCK_FROM_H = 2.0
HARVEST_H = 12.0


@pytest.mark.parametrize("controller", ["rule", "mechanistic-mpc"])
def test_a_stuck_probe_is_recorded_as_rejected_with_its_reason(
    controller: str, tmp_path: Path, pki: Path
) -> None:
    (port,) = free_ports(1)
    config = SimulatorConfig(
        port=port,
        printer_port=0,
        units=1,
        speed=3600.0,
        patient_seed=4,
        pki=pki,
        heartbeat_timeout_s=3.0,
        plant_step_h=0.25,
        hand_built=True,
        faults=(Fault("stuck", "BR01.glucose", STUCK_FROM_H, 0.0),),
    )
    plant = PlantThread(config).start()
    out = tmp_path / "out"
    proc: subprocess.Popen[bytes] | None = None
    try:
        extra = {"mpc_config": CONFIGS / "mpc_tcell_hourly.toml"} if controller != "rule" else {}
        site = write_sim_site(
            tmp_path / "site.toml",
            endpoint=plant.endpoint,
            pki=pki,
            units=["BR01"],
            controller=controller,
            harvest_time_h=HARVEST_H,
            timing={"heartbeat_interval_s": 0.25, "solve_budget_s": 0.8},
            **extra,
        )
        env = {**os.environ, PASSWORD_ENV: PASSWORDS["apc"]}
        env.pop("HMPC_TEST_CRASH_AFTER", None)
        command = [sys.executable, "-m", "controller.cli", "run", "--site", str(site.path)]
        with (tmp_path / "run.err").open("wb") as se:
            proc = subprocess.Popen(
                [*command, "--out", str(out)], stdout=subprocess.DEVNULL, stderr=se, env=env
            )
        granted = asyncio.run(grant_remote(site, "BR01", PASSWORDS["operator"], timeout_s=120))
        assert granted == "Good"
        assert proc.wait(180) == 0, (tmp_path / "run.err").read_text()[-3000:]
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        plant.close()

    with Historian(str(out / "historian.sqlite"), create=False) as h:
        (batch,) = [b for b in h.batches() if b]
        steps = h.steps(batch, "BR01")
        alarms = [e for e in h.events(batch, "BR01", kind="sensor") if e.severity == "alarm"]
    glucose = [
        m for s in steps for m in s.measurements if m.name == "glucose" and m.source == "online"
    ]
    late = [m for m in glucose if m.sample_time_h >= STUCK_FROM_H + 3.0]
    assert late, "no online glucose readings recorded after the fault"
    rejected = [m for m in late if not m.accepted]
    assert rejected, [(m.sample_time_h, m.value, m.accepted, m.reason) for m in late]
    assert all("stuck" in m.reason for m in rejected), {m.reason for m in rejected}
    if controller == "rule":
        assert all(not m.accepted for m in late)  # the loop's own validation
    else:
        assert all(m.reason.startswith("estimator: stuck") for m in rejected)
    assert len(alarms) == 1 and "glucose probe stuck" in alarms[0].message
    print(
        f"{controller}: {len(rejected)} of {len(late)} glucose readings after "
        f"{STUCK_FROM_H + 3:g} h rejected as stuck; alarm at {alarms[0].process_time_h:.2f} h"
    )

"""Safe state when the controller is gone, bumpless resume and recovery from beyond a hard
limit (issue 22 item 1), with a real ``hmpc run`` subprocess (estimator-fed MPC) against the
OPC UA simulators on 127.0.0.1 (Basic256Sha256 SignAndEncrypt, accelerated clock):

- after a kill -9 of the controller the plant's watchdog sheds it and the plant goes to
  the fallback setpoints it publishes (and the site file declares), not the last move;
- the restarted controller's first move is within the rate limits (and, for a setpoint
  with none, the engagement ramp) from the plant's current setpoints;
- started with the culture's glucose far beyond its hard limit (130 mM vs 40 mM), the MPC
  recovers (exact-penalty recovery mode: the feed off, glucose driven back) instead of
  ``Infeasible_Problem_Detected -> hold``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runtime_testkit import PASSWORDS, PlantThread, free_ports, wait_until

from controller.records.historian import Historian
from controller.runtime.loop import UNLIMITED_ENGAGE_PERIODS
from sim.bench_loop import PASSWORD_ENV, grant_remote, write_sim_site
from sim.opcua.server import SimulatorConfig

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


class Run:
    """``hmpc run`` (the worktree's code) on a site file for the simulators in ``plant``."""

    def __init__(self, tmp_path: Path, pki: Path, plant: PlantThread, harvest_h: float) -> None:
        self.tmp = tmp_path
        self.out = tmp_path / "out"
        self.db = self.out / "historian.sqlite"
        self.site = write_sim_site(
            tmp_path / "site.toml",
            endpoint=plant.endpoint,
            pki=pki,
            units=["BR01"],
            controller="mechanistic-mpc",
            mpc_config=CONFIGS / "mpc_tcell_hourly.toml",
            harvest_time_h=harvest_h,
            timing={"heartbeat_interval_s": 0.25, "solve_budget_s": 0.8},
        )
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self) -> subprocess.Popen[bytes]:
        n = len(self.procs) + 1
        command = [sys.executable, "-m", "controller.cli", "run"]
        command += ["--site", str(self.site.path), "--out", str(self.out)]
        with (
            (self.tmp / f"run{n}.out").open("wb") as so,
            (self.tmp / f"run{n}.err").open("wb") as se,
        ):
            proc = subprocess.Popen(
                command, stdout=so, stderr=se, env={**os.environ, PASSWORD_ENV: PASSWORDS["apc"]}
            )
        self.procs.append(proc)
        return proc

    def grant(self) -> str:
        return asyncio.run(grant_remote(self.site, "BR01", PASSWORDS["operator"], timeout_s=120))

    def err(self, n: int) -> str:
        return (self.tmp / f"run{n}.err").read_text()[-3000:]

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def _config(port: int, pki: Path, **changes: object) -> SimulatorConfig:
    return SimulatorConfig(
        port=port,
        printer_port=0,
        units=1,
        speed=3600.0,  # one process hour per second
        patient_seed=3,
        pki=pki,
        heartbeat_timeout_s=1.5,
        plant_step_h=0.25,
        hand_built=True,
        **changes,  # type: ignore[arg-type]
    )


def test_kill_9_sheds_to_the_fallback_setpoints_and_the_resumed_first_move_is_bumpless(
    tmp_path: Path, pki: Path
) -> None:
    (port,) = free_ports(1)
    plant = PlantThread(_config(port, pki)).start()
    unit = plant.s.unit("BR01")
    apc = unit.apc
    limits = apc.config.limits
    fallback = dict(apc.config.fallback)
    run = Run(tmp_path, pki, plant, harvest_h=30.0)
    try:
        assert fallback == dict.fromkeys(limits, 0.0)  # the simulator's default safe state
        first = run.start()
        assert run.grant() == "Good"

        def moved_off_the_safe_state() -> bool:
            remote = [w for w in plant.writes if w.mode == "REMOTE"]
            return len(remote) >= 3 and any(
                abs(apc.targets[n] - fallback[n]) > 10 * limits[n].deadband for n in limits
            )

        wait_until(moved_off_the_safe_state, 120, "moves away from the safe state")
        first.send_signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        last_move = dict(apc.targets)  # what the old plant side froze at the shed
        killed_at = time.monotonic()
        wait_until(lambda: apc.fallback, 30, "the watchdog's shed")
        shed_after_s = time.monotonic() - killed_at
        at_shed = dict(apc.targets)
        # the plant reaches the safe state (working setpoints, at its own rate limits)
        wait_until(
            lambda: all(abs(apc.working[n] - fallback[n]) < 1e-9 for n in limits),
            60,
            "the working setpoints reaching the fallback",
        )
        at_restart = dict(apc.targets)
        writes_before = len(plant.writes)

        second = run.start()
        assert run.grant() == "Good"
        wait_until(lambda: len(plant.writes) > writes_before, 120, "the first move after resume")
        resumed = plant.writes[writes_before]
        second.send_signal(signal.SIGTERM)
        assert second.wait(60) == 0, run.err(2)
    finally:
        run.close()
        plant.close()

    assert any(abs(last_move[n] - fallback[n]) > 0 for n in limits)  # the test can fail
    assert at_shed == pytest.approx(fallback), (at_shed, last_move)
    assert at_restart == pytest.approx(fallback)
    # bumpless: the first bundle of the restarted controller moves from the plant's current
    # setpoints (the safe state) within the rate limits, and a setpoint without one within
    # the engagement ramp (span / UNLIMITED_ENGAGE_PERIODS per period)
    period = run.site.timing.period_h
    first_move = {}
    for name, value in zip(resumed.names, resumed.values, strict=True):
        lim = limits[name]
        step = value - at_restart[name]
        span = lim.high - lim.low
        first_move[name] = step / span
        assert -lim.rate_down * period - 1e-9 <= step <= lim.rate_up * period + 1e-9, name
        assert abs(step) <= span / UNLIMITED_ENGAGE_PERIODS + 1e-9, name
    assert resumed.mode == "REMOTE" and set(resumed.statuses) == {"Good"}
    # the controller checked the plant's safe state at engagement and recorded it
    with Historian(str(run.db), create=False) as h:
        (batch,) = h.batches()
        engaged = [e for e in h.events(batch, "BR01") if e.message.startswith("engaged")]
    assert len(engaged) == 2
    for event in engaged:
        assert event.data["fallback"] == {n: {"plant": 0.0, "site": 0.0} for n in limits}
    print(
        f"shed {shed_after_s:.2f} s after the kill; last move {last_move} -> safe state "
        f"{at_shed}; first move after resume (fraction of range) {first_move}"
    )


def test_from_beyond_the_hard_glucose_limit_the_mpc_recovers_instead_of_holding(
    tmp_path: Path, pki: Path
) -> None:
    """The state the issue reached (glucose 130 mM after 31 h of a held 5 mL/h feed; hard
    limit 40 mM), given to the plant before the controller starts."""
    (port,) = free_ports(1)
    plant = PlantThread(_config(port, pki), paused=True).start()
    unit = plant.s.unit("BR01")
    names = unit.plant.model.state_names
    ig = names.index("glucose")

    async def overfed() -> None:
        unit.plant.state[ig] = 130.0
        unit.apc.targets["glucose_feed"] = unit.apc.working["glucose_feed"] = 5.0

    plant.run(overfed)
    plant.gate.resume()
    run = Run(tmp_path, pki, plant, harvest_h=16.0)
    try:
        proc = run.start()
        assert run.grant() == "Good"
        assert proc.wait(150) == 0, run.err(1)
    finally:
        run.close()
        plant.close()

    with Historian(str(run.db), create=False) as h:
        (batch,) = h.batches()
        steps = h.steps(batch, "BR01")
        events = h.events(batch, "BR01")
    remote = [s for s in steps if s.mode == "remote" and s.solver]
    assert remote, [s.notes for s in steps]
    statuses = [str(s.solver.get("status")) for s in remote]
    assert not any("Infeasible" in st for st in statuses), statuses
    assert any("recovery mode" in n for s in remote for n in s.notes)
    assert any(e.severity == "alarm" and "recovery mode" in e.message for e in events)
    # the feed goes off and stays off while glucose is beyond the limit; glucose falls
    feeds = [w.values[w.names.index("glucose_feed")] for w in plant.writes if w.mode == "REMOTE"]
    assert feeds and feeds[-1] == pytest.approx(0.0, abs=1e-6)
    truth = [p.truth["glucose"] for p in plant.steps["BR01"]]
    assert truth[-1] < 130.0 - 1.0
    print(f"glucose 130 -> {truth[-1]:.1f} mM; MPC statuses {sorted(set(statuses))}")

"""Crash-safe restart: a real ``hmpc run`` (estimator-fed MPC) against the OPC UA simulators
on 127.0.0.1 (Basic256Sha256 SignAndEncrypt, accelerated clock), killed with SIGKILL in the
middle of the batch and started again with the same command. It resumes from the
historian and finishes the batch: no record is lost, the step numbers continue, the
estimator continues from exactly the state stored before the kill, the first move after
the restart is within the rate limits of the setpoints the plant held (no bump), and the
plant never receives a setpoint outside its limits."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from runtime_testkit import PASSWORDS, PlantThread, free_ports, wait_until

from controller.records.audit import AuditTrail
from controller.records.historian import Historian, record_json
from controller.runtime.restart import StateStore, estimator_digest
from sim.bench_loop import PASSWORD_ENV, grant_remote, write_sim_site
from sim.opcua.server import SimulatorConfig

pytestmark = pytest.mark.integration

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
HARVEST_H = 30.0
KILL_AFTER_H = 10.0
RAMP_H = 4.0


def _records(db: Path) -> tuple[str, list[Any], list[Any], list[Any]]:
    """(batch, steps, events, state rows) of BR01 as stored now."""
    with Historian(str(db), create=False) as h:
        (batch,) = h.batches()
        return (
            batch,
            h.steps(batch, "BR01"),
            h.events(batch, "BR01"),
            StateStore(h).rows(batch, "BR01"),
        )


def test_kill_9_mid_batch_then_the_same_command_resumes_without_a_bump(
    tmp_path: Path, pki: Path
) -> None:
    (port,) = free_ports(1)
    config = SimulatorConfig(
        port=port,
        printer_port=0,
        units=1,
        speed=3600.0,  # one process hour per second
        patient_seed=3,
        pki=pki,
        heartbeat_timeout_s=1.5,
        plant_step_h=0.25,
        hand_built=True,
    )
    plant = PlantThread(config).start()
    unit = plant.s.unit("BR01")
    limits = unit.apc.config.limits
    out = tmp_path / "out"
    db = out / "historian.sqlite"
    runs: list[subprocess.Popen[bytes]] = []
    try:
        site = write_sim_site(
            tmp_path / "site.toml",
            endpoint=plant.endpoint,
            pki=pki,
            units=["BR01"],
            controller="mechanistic-mpc",
            mpc_config=CONFIGS / "mpc_tcell_hourly.toml",
            harvest_time_h=HARVEST_H,
            timing={
                "heartbeat_interval_s": 0.25,
                "solve_budget_s": 0.8,
                "engage_ramp_h": RAMP_H,
            },
        )
        command = [
            sys.executable,
            "-m",
            "controller.cli",
            "run",
            "--site",
            str(site.path),
            "--out",
            str(out),
        ]
        env = {**os.environ, PASSWORD_ENV: PASSWORDS["apc"]}

        def start(n: int) -> subprocess.Popen[bytes]:
            with (
                (tmp_path / f"run{n}.out").open("wb") as so,
                (tmp_path / f"run{n}.err").open("wb") as se,
            ):
                proc = subprocess.Popen(command, stdout=so, stderr=se, env=env)
            runs.append(proc)
            return proc

        def operator() -> str:
            return asyncio.run(grant_remote(site, "BR01", PASSWORDS["operator"], timeout_s=120))

        first = start(1)
        assert operator() == "Good"
        wait_until(
            lambda: (
                sum(w.mode == "REMOTE" for w in plant.writes) >= 3
                and unit.plant.time_h >= KILL_AFTER_H
            ),
            120,
            "moves of the first run",
        )
        _, steps_before, events_before, _ = _records(db)  # acknowledged before the kill
        first.send_signal(signal.SIGKILL)
        assert first.wait(30) == -signal.SIGKILL
        batch, steps_at_kill, events_at_kill, states_at_kill = _records(db)
        writes_before = [w for w in plant.writes]
        wait_until(lambda: unit.apc.fallback, 30, "the watchdog's shed")  # no heartbeat: Local
        held = dict(unit.apc.targets)

        second = start(2)  # the same command again
        assert operator() == "Good"
        assert second.wait(150) == 0, (tmp_path / "run2.err").read_text()[-3000:]
        writes = list(plant.writes)
    finally:
        for proc in runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        plant.close()

    summary = json.loads((out / "run_summary.json").read_text())
    assert summary["units"][0]["ended"] == "harvest"
    with Historian(str(db), create=False) as h:
        steps = h.steps(batch, "BR01")
        events = h.events(batch, "BR01")
        store = StateStore(h)
        rows = store.rows(batch, "BR01")
        audit = AuditTrail(h)
        restarts_audited = [r for r in audit.records(batch) if r.action == "restart"]
        verification = audit.verify()

        # no record written before the kill is missing or changed
        by_step = {s.step: s for s in steps}
        for s in steps_at_kill:
            assert record_json(by_step[s.step]) == record_json(s), s.step
        assert {s.step for s in steps_before} <= {s.step for s in steps_at_kill}
        assert [record_json(e) for e in events[: len(events_at_kill)]] == [
            record_json(e) for e in events_at_kill
        ]
        assert len(events_at_kill) >= len(events_before)
        assert [r.id for r in rows[: len(states_at_kill)]] == [r.id for r in states_at_kill]

        # step numbers continue: no duplicate, no gap; time jumps by the downtime only
        numbers = [s.step for s in steps]
        # (a kill between a write and its step record leaves that number to the write's
        # intent, reconciled at the restart: tests/integration/test_write_ahead.py)
        lost = {i.step for i in h.intents(batch, "BR01")} - set(numbers)
        assert sorted([*numbers, *lost]) == list(range(len(steps) + len(lost)))
        last = steps_at_kill[-1]
        resumed = by_step[last.step + 1]
        assert resumed.process_time_h > last.process_time_h
        times = [s.process_time_h for s in steps]  # (engaging cycles share a clock value)
        assert all(b >= a for a, b in itertools.pairwise(times))
        assert steps[-1].process_time_h >= HARVEST_H - 1.0

        # the restart is recorded: event and audit, chain intact
        (restart,) = [e for e in events if e.kind == "restart"]
        assert restart.severity == "warning"  # an unclean stop
        data = restart.data
        assert data["previous_run"].startswith("unclean")
        assert data["last_step"] == last.step and data["resumed_at_step"] == last.step + 1
        assert len(restarts_audited) == 1 and restarts_audited[0].unit == "BR01"
        assert verification.ok, verification

        # the estimator continues from exactly the newest state stored before the kill
        state = data["state"]
        assert state is not None and state["id"] == states_at_kill[-1].id and state["plan"]
        stored = store.load(state["id"])
        assert state["estimator_sha256"] == estimator_digest(stored.state["estimator"])
        # steps after that state where the law stepped: replayed from their records (the
        # kill fell between a step record and its state row)
        later = [s for s in steps_at_kill if s.step > state["step"]]
        stepped = [s for s in later if any(p.status != "not written" for p in s.setpoints)]
        assert data["replayed_steps"] == len(stepped)
        if not stepped:
            assert data["estimator_sha256"] == state["estimator_sha256"]
        if not any(n.startswith("step abandoned") for s in later for n in s.notes):
            # the estimate the law continues from is the original's, to the last bit
            reference = stepped[-1] if stepped else by_step[state["step"]]
            assert data["estimate"] == pytest.approx(dict(reference.estimate), rel=1e-12)
            assert data["estimate_time_h"] == reference.process_time_h

    # the plant side: only Good items, within the limits, only in Remote
    assert writes
    for w in writes:
        assert w.mode == "REMOTE", w
        assert set(w.statuses) == {"Good"}, w
        for name, value in zip(w.names, w.values, strict=True):
            assert limits[name].low <= value <= limits[name].high, (name, value)
    # no bump: the first bundle after the restart moves from what the plant held (its
    # fallback setpoints after the shed) within the rate limits and the engagement ramp
    assert writes_before and len(writes) > len(writes_before)
    last_before = dict(zip(writes_before[-1].names, writes_before[-1].values, strict=True))
    # the shed put the plant in its safe state (the batch-start values), not the last move
    assert held == pytest.approx(unit.apc.config.fallback)
    assert last_before
    resumed_write = writes[len(writes_before)]
    after = dict(zip(resumed_write.names, resumed_write.values, strict=True))
    period = site.timing.period_h
    for name, value in after.items():
        lim = limits[name]
        step = value - held[name]
        assert -lim.rate_down * period - 1e-9 <= step <= lim.rate_up * period + 1e-9, name
        assert abs(step) <= (lim.high - lim.low) * period / RAMP_H + 1e-9, name

    sizes = {k: [r.json_bytes for r in rows if r.kind == k] for k in ("full", "delta")}
    print(
        f"restart at step {last.step + 1} ({last.process_time_h:.0f} h -> "
        f"{resumed.process_time_h:.0f} h); {len(rows)} states: {len(sizes['full'])} full "
        f"(JSON {np.mean(sizes['full']) / 1e3:.1f} kB), {len(sizes['delta'])} delta "
        f"(JSON {np.mean(sizes['delta'] or [0]) / 1e3:.1f} kB); stored "
        f"{sum(r.size_bytes for r in rows) / 1e3:.0f} kB; capture p50 "
        f"{1e3 * float(np.median([r.capture_s for r in rows])):.1f} ms; replayed "
        f"{data['replayed_steps']}"
    )

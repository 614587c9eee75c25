"""Shared helpers of the historian, audit and report tests (a uniquely named module, so tests
can import it whatever other conftest.py files exist):

- a real PostgreSQL server: a throwaway cluster made with Debian's ``initdb`` and started with
  ``pg_ctl`` on a free loopback port in a temporary folder (once per test session, always
  stopped), with a fresh database per test;
- realistic records: a short real closed loop (virtual T-cell plant, mechanistic MPC with
  IPOPT, sensor faults from sim/faults.py) converted to StepRecords and EventRecords, the
  way the runtime loop records a batch.
"""

from __future__ import annotations

import contextlib
import glob
import math
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.records.historian import config_event
from controller.records.steps import EventRecord, MeasurementRecord, SetpointRecord, StepRecord

SETUP_HINT = "run `make setup` (tests/support/setup_test_services.sh installs it)"
WALL_START = 1_795_000_000.0  # controller clock at the start of the test batch, Unix s


# ---------------------------------------------------------------- PostgreSQL


def pg_binary(name: str) -> str:
    """Path of a PostgreSQL server program (Debian keeps them off PATH)."""
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), key=_version_key)
    if found:
        return found[-1]
    on_path = shutil.which(name)
    if on_path:
        return on_path
    pytest.fail(f"PostgreSQL's {name} is not installed; {SETUP_HINT}")


def _version_key(path: str) -> tuple[int, ...]:
    part = Path(path).parts[-3]
    return tuple(int(p) for p in part.split(".") if p.isdigit())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """A throwaway PostgreSQL cluster on 127.0.0.1 (trust authentication, user postgres).

    As root, the server runs as the ``postgres`` system user (PostgreSQL refuses root).
    """

    def __init__(self) -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="hmpc-pg-"))
        self.data = self.dir / "data"
        self.port = free_port()
        self._as_user: list[str] = []
        if os.geteuid() == 0:
            self._as_user = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        self.started = False

    def _run(self, *args: str) -> None:
        proc = subprocess.run(
            [*self._as_user, *args], capture_output=True, text=True, timeout=120, check=False
        )
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")

    def start(self) -> None:
        self._run(
            pg_binary("initdb"),
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "-A",
            "trust",
            "-E",
            "UTF8",
            "--no-sync",
        )
        self._run(
            pg_binary("pg_ctl"),
            "-D",
            str(self.data),
            "-l",
            str(self.dir / "server.log"),
            "-w",
            "-t",
            "60",
            "-o",
            f"-h 127.0.0.1 -p {self.port} -k {self.dir} -c fsync=off",
            "start",
        )
        self.started = True

    def stop(self) -> None:
        if self.started:
            with contextlib.suppress(Exception):
                self._run(
                    pg_binary("pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop"
                )
            self.started = False
        shutil.rmtree(self.dir, ignore_errors=True)

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its URL."""
        import psycopg

        name = f"t_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    server = PostgresServer()
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> str:
    """URL of a fresh database on the session's PostgreSQL server."""
    return postgres_server.create_database()


# ---------------------------------------------------------------- realistic records


#: Physical ranges of the recorded validation (canonical units).
RANGES = {"glucose": (0.0, 100.0), "lactate": (0.0, 200.0)}


def _validate(m: Any) -> tuple[bool, str]:
    """The runtime's validation decision, simplified: good quality, finite, in range."""
    if m.quality != "good":
        return False, "bad_quality"
    if not math.isfinite(m.value):
        return False, "non_finite"
    low, high = RANGES.get(m.name, (0.0, math.inf))
    if not low <= m.value <= high:
        return False, "out_of_range"
    return True, ""


def closed_loop_batch(
    batch_id: str = "B-0001",
    unit: str = "R1",
    *,
    days: float = 2.0,
    step_h: float = 2.0,
    controller: str = "hybrid-mpc",
    seed: int = 3,
) -> tuple[list[StepRecord], list[EventRecord]]:
    """Run a short real closed loop and record it as the runtime would.

    The virtual T-cell plant (nominal patient) is controlled by a real MPC (IPOPT); its
    online glucose probe delivers some NaN and out-of-range readings (sim/faults.py), which
    the recorded validation rejects. Events: the limits in force at the start (``config``),
    the mode, every fallback of the MPC, every rejected reading (``fault``), every step
    with a hard limit violated (``alarm``), and the printer's handshake at the end.
    """
    from sim.closed_loop import run_closed_loop
    from sim.faults import FaultInjector, FaultSpec
    from sim.mpc_controllers import load_plant_config, make_mpc_controller
    from sim.patients import VirtualPatient
    from sim.plant import VirtualBioreactor

    plant = VirtualBioreactor.for_process("tcell", VirtualPatient.nominal())
    # a small GP (40 points) keeps the hybrid MPC quick; its bands are what matters here
    extra: dict[str, Any] = {"gp_points": 40} if controller == "hybrid-mpc" else {}
    ctrl = make_mpc_controller(controller, plant, **extra)
    config = load_plant_config(plant, None)
    faults = FaultInjector(
        [
            FaultSpec("nan", 0.25, variables=("glucose",), sources=("online",), start_h=6.0),
            FaultSpec(
                "out_of_range", 0.15, variables=("lactate",), sources=("online",), start_h=6.0
            ),
        ],
        seed=seed,
    )
    delivered: list[list[Any]] = []

    def tap(time_h: float, ms: list[Any]) -> list[Any]:
        out = faults(time_h, ms)
        delivered.append(out)
        return out

    df = run_closed_loop(plant, ctrl, days=days, step_h=step_h, measurement_filter=tap)
    results = ctrl.results
    names = plant.model.input_names
    steps: list[StepRecord] = []
    events: list[EventRecord] = [
        config_event(
            batch_id,
            unit,
            process_time_h=0.0,
            wall_time=WALL_START,
            state_limits={
                "glucose": {
                    "low": plant.process.glucose_low_hard,
                    "low_soft": plant.process.glucose_low_soft,
                    "high": plant.process.glucose_high_hard,
                },
                "lactate": {
                    "high_soft": plant.process.lactate_high_soft,
                    "high": plant.process.lactate_high_hard,
                },
            },
            input_bounds={n: plant.bounds[n] for n in names},
            source=config.source,
        ),
        EventRecord(
            batch_id, unit, 0.0, WALL_START, "mode", "info", "mode remote (controller in charge)"
        ),
    ]
    for k, result in enumerate(results):
        row = df.iloc[k]
        t = float(row["time"])
        wall = WALL_START + 3600.0 * t + 0.25
        meas = []
        for m in delivered[k]:
            ok, why = _validate(m)
            meas.append(
                MeasurementRecord(
                    m.name,
                    m.value,
                    m.unit,
                    m.sample_time,
                    m.arrival_time,
                    m.source,
                    m.quality,
                    ok,
                    why,
                )
            )
            if not ok:
                events.append(
                    EventRecord(
                        batch_id,
                        unit,
                        t,
                        wall,
                        "fault",
                        "warning",
                        f"{m.name} reading rejected: {why}",
                        {"name": m.name, "reason": why},
                    )
                )
        states = result.state_names
        predictions: dict[str, tuple[float, ...]] = {
            "time_h": tuple(float(v) for v in result.predicted_times)
        }
        for i, s in enumerate(states):
            predictions[s] = tuple(float(v) for v in result.predicted_states[:, i])
            predictions[f"{s}_std"] = tuple(float(v) for v in result.predicted_state_std[:, i])
        x0 = (
            result.predicted_states[0]
            if len(result.predicted_states)
            else np.full(len(states), np.nan)
        )
        sd0 = (
            result.predicted_state_std[0]
            if len(result.predicted_state_std)
            else np.zeros(len(states))
        )
        written = {n: float(row[n]) for n in names}
        solver = {
            "success": bool(result.success),
            "status": result.status,
            "iterations": int(result.iterations),
            "solve_time_s": float(result.solve_time_s),
            "cost": float(result.cost),
            "fallback_used": result.fallback_used,
            "fallback_reason": result.fallback_reason,
            "slacks": {k2: float(v) for k2, v in result.slacks.items()},
        }
        steps.append(
            StepRecord(
                batch_id=batch_id,
                unit=unit,
                step=k,
                process_time_h=t,
                wall_time=wall,
                mode="remote",
                measurements=tuple(meas),
                estimate={s: float(x0[i]) for i, s in enumerate(states)},
                estimate_std={s: float(sd0[i]) for i, s in enumerate(states)},
                solver=solver,
                predictions=predictions,
                setpoints=tuple(
                    SetpointRecord(n, float(result.u[n]), written[n], _input_unit(plant, n), "Good")
                    for n in names
                ),
                overhead_s=0.01,
                notes=(),
                # the estimator's model-mismatch figures, as the runtime loop stores them
                diagnostics=ctrl.estimates[k].mismatch.values() if ctrl.estimates else {},
            )
        )
        if result.fallback_used:
            events.append(
                EventRecord(
                    batch_id,
                    unit,
                    t,
                    wall,
                    "fallback",
                    "warning",
                    f"MPC fallback {result.fallback_used}: {result.fallback_reason}",
                    {"status": result.status},
                )
            )
        if float(row["hard_violation"]) > 0:
            events.append(
                EventRecord(batch_id, unit, t, wall, "alarm", "alarm", "hard limit violated")
            )
    t_end = float(df["time"].iloc[-1])
    wall_end = WALL_START + 3600.0 * t_end
    for dt, msg in (
        (0.0, "harvest forecast sent to printer: job queued"),
        (0.5, "printer accepted job"),
        (1.0, "printer started"),
    ):
        events.append(
            EventRecord(
                batch_id,
                unit,
                t_end,
                wall_end + 60.0 * dt,
                "printer",
                "info",
                msg,
                {"job": f"{batch_id}-print"},
            )
        )
    return steps, events


def _input_unit(plant: Any, name: str) -> str:
    for spec in plant.model.inputs:
        if spec.name == name:
            return str(spec.unit)
    return ""


def same_records(a: Sequence[Any], b: Sequence[Any]) -> bool:
    """Records equal field by field, NaN equal to NaN (canonical JSON)."""
    from controller.records.historian import record_json

    return [record_json(r) for r in a] == [record_json(r) for r in b]


@pytest.fixture(scope="session")
def batch_records() -> tuple[list[StepRecord], list[EventRecord]]:
    """One recorded closed-loop batch (2 days, 2 h steps), shared by the session's tests."""
    return closed_loop_batch()

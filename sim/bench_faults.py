"""``hmpc-sim bench faults``: a fault campaign against the real controller process.

Each batch runs the plant simulators in this process (recorded plant side:
:mod:`sim.opcua.recording`) and ``hmpc run`` as a child process, with an operator granting
Remote, and injects at random process times (seeded): ``kill -9`` of the controller (then
the same command again), ``SIGSTOP`` longer than the watchdog (then ``SIGCONT``), an
in-process restart of the plant's OPC UA server, and sensor faults (stuck, NaN, stale,
bad). Afterwards the plant's own record is compared with the historian's, and the
historian is attacked (edits, deletions, a forged step, a cut tail, a wipe) to see whether
``hmpc audit verify`` notices. It prints, and with ``--json FILE`` writes:

- ``writes_without_record``: bundles the plant accepted that no step record holds;
- ``records_without_write``: accepted setpoints in the records the plant never received;
- ``setpoints_outside_limits``: requested setpoints outside the plant's limits;
- ``max_first_move_fraction``: largest first move after a resume, as a fraction of the
  setpoint's range (``allowed_first_move_fraction``: the plant's rate limit over one
  control period);
- ``max_seconds_to_safe_state``: wall seconds from a kill or stop to the plant in its safe
  state (shed, with its fallback setpoints applied where the plant declares them);
- ``hours_beyond_hard_limit``: process hours with the true state beyond a hard limit;
- ``tamper_detected`` / ``tamper_tried``.

Figures are measured, never asserted; the test runs one short batch.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from controller.runtime.loop import UNLIMITED_ENGAGE_PERIODS
from sim.bench_loop import PASSWORD_ENV, _free_port, grant_remote, prepare_pki, write_sim_site
from sim.opcua.faults import Fault
from sim.opcua.recording import PlantThread
from sim.opcua.server import SimulatorConfig

__all__ = ["FaultPlan", "add_bench_faults", "plan_batch", "run_campaign", "tamper_cases"]

PASSWORDS = {"apc": "apc-bench-secret", "operator": "op-bench-secret"}
WATCHDOG_S = 3.0


@dataclasses.dataclass(frozen=True)
class FaultPlan:
    """What happens to one batch, at process hours."""

    kill_h: tuple[float, ...]
    stop_h: tuple[float, ...]
    plant_restart_h: tuple[float, ...]
    sensor_faults: tuple[Fault, ...]


def plan_batch(rng: random.Random, hours: float) -> FaultPlan:
    """Random fault times in the middle of a batch of ``hours``: one kill -9, one stop, one
    plant restart, at least 3 h apart, and two sensor faults (``hours`` >= 16)."""
    slots = sorted(rng.sample(range(3, int(hours) - 3, 3), k=3))
    rng.shuffle(slots)
    kinds = rng.sample(["stuck", "nan", "stale", "bad"], k=2)
    sensors = rng.sample(["glucose", "lactate", "viable_cells"], k=2)
    faults = tuple(
        Fault(kind, f"BR01.{sensor}", float(rng.uniform(2, hours - 4)), float(rng.uniform(2, 6)))
        for kind, sensor in zip(kinds, sensors, strict=True)
    )
    return FaultPlan((float(slots[0]),), (float(slots[1]),), (float(slots[2]),), faults)


@dataclasses.dataclass
class BatchFigures:
    writes_without_record: int = 0
    records_without_write: int = 0
    setpoints_outside_limits: int = 0
    first_moves: list[float] = dataclasses.field(default_factory=list)
    allowed_first_move: float = 0.0
    seconds_to_safe_state: list[float] = dataclasses.field(default_factory=list)
    hours_beyond_hard_limit: float = 0.0
    tamper_detected: int = 0
    tamper_tried: int = 0
    notes: list[str] = dataclasses.field(default_factory=list)


# ------------------------------------------------------------------ one batch, real processes


class _Controller:
    """``hmpc run`` as a child process (its output in the batch folder)."""

    def __init__(self, site: Path, out: Path) -> None:
        self.site, self.out = site, out
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        if self.proc is not None:  # reap the previous (killed) process
            self.proc.wait()
        self.starts += 1
        log = (self.out / f"hmpc-run-{self.starts}.out").open("wb")
        command = [sys.executable, "-m", "controller.cli", "run", "--site", str(self.site)]
        self.proc = subprocess.Popen(  # noqa: S603 - our own module with our own arguments
            [*command, "--out", str(self.out)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env={**os.environ, PASSWORD_ENV: PASSWORDS["apc"]},
        )
        log.close()

    def signal(self, sig: int) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.terminate()
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _wait(predicate: Callable[[], bool], timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


class _Operator:
    """The operator at the SCADA: grants Remote whenever the unit is in Local (after a
    shed, a reconnect, a restarted controller), except while a fault is being watched.
    ``grants`` are the wall times (monotonic) of the grants after the first."""

    def __init__(self, site: Any, unit: Any) -> None:
        self.site, self.unit = site, unit
        self.grants: list[float] = []
        self.problems: list[str] = []
        self._active = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="operator", daemon=True)
        self._first = True

    def start(self) -> None:
        self._active.set()
        self._thread.start()

    def pause(self) -> None:
        self._active.clear()

    def resume(self) -> None:
        self._active.set()

    def stop(self) -> None:
        self._stop.set()
        self._active.set()
        self._thread.join(120)

    def _main(self) -> None:
        while not self._stop.is_set():
            self._active.wait()
            if self._stop.is_set():
                return
            if int(self.unit.apc.mode) == 0:  # Local
                try:
                    status = asyncio.run(
                        grant_remote(self.site, "BR01", PASSWORDS["operator"], timeout_s=30)
                    )
                except Exception as exc:  # the plant restarting, the controller starting
                    status = repr(exc)
                if status == "Good":
                    if not self._first:
                        self.grants.append(time.monotonic())
                    self._first = False
                elif len(self.problems) < 20:
                    self.problems.append(f"Remote not granted: {status}")
            self._stop.wait(0.5)


def _reached(unit: Any, hour: float) -> bool:
    return float(unit.plant.time_h) >= hour


def _safe(unit: Any) -> bool:
    """The plant's unit is in its safe state: shed (fallback flag) with its fallback
    setpoints applied where it declares them."""
    apc = unit.apc
    if not apc.fallback:
        return False
    declared = getattr(apc, "fallback_setpoints", None) or {}
    return all(
        abs(apc.working.get(name, math.nan) - value) <= 1e-9 for name, value in declared.items()
    )


def run_batch(
    index: int, seed: int, hours: float, speed: float, controller: str, work: Path
) -> tuple[BatchFigures, FaultPlan]:
    rng = random.Random(seed * 1000 + index)  # noqa: S311 - a reproducible plan, not a secret
    plan = plan_batch(rng, hours)
    figures = BatchFigures()
    folder = work / f"batch{index:02d}"
    pki = prepare_pki(folder / "pki", PASSWORDS)
    port = _free_port()
    faults = (
        *plan.sensor_faults,
        *(Fault("restart", "*", h, 2.0) for h in plan.plant_restart_h),
    )
    config = SimulatorConfig(
        port=port,
        printer_port=0,
        units=1,
        speed=speed,
        patient_seed=seed + index,
        pki=pki,
        heartbeat_timeout_s=WATCHDOG_S,
        hand_built=True,
        faults=faults,
    )
    plant = PlantThread(config).start()
    site = write_sim_site(
        folder / "site.toml",
        endpoint=plant.endpoint,
        pki=pki,
        units=["BR01"],
        controller=controller,
        harvest_time_h=hours,
        timing={"heartbeat_interval_s": 0.5, "reconnect_interval_s": 0.5},
    )
    out = folder / "out"
    out.mkdir(parents=True, exist_ok=True)
    ctl = _Controller(site.path, out)
    unit = plant.s.units[0]
    operator = _Operator(site, unit)

    def now_h() -> float:
        return float(unit.plant.time_h)

    try:
        ctl.start()
        operator.start()
        events = sorted([(h, "kill") for h in plan.kill_h] + [(h, "stop") for h in plan.stop_h])
        for at_h, what in events:
            reached: Callable[[], bool] = functools.partial(_reached, unit, at_h)
            if not _wait(reached, hours / speed * 3600 + 120):
                figures.notes.append(f"plant did not reach {at_h} h")
                break
            operator.pause()
            started = time.monotonic()
            ctl.signal(signal.SIGKILL if what == "kill" else signal.SIGSTOP)
            if _wait(lambda: _safe(unit), WATCHDOG_S + 30):
                figures.seconds_to_safe_state.append(time.monotonic() - started)
            else:
                figures.seconds_to_safe_state.append(math.inf)
                figures.notes.append(f"{what} at {at_h} h: no safe state within 30 s")
            if what == "kill":
                ctl.start()
            else:
                ctl.signal(signal.SIGCONT)
            operator.resume()
        if ctl.proc is not None:
            ctl.proc.wait(timeout=hours / speed * 3600 + 300)
    finally:
        operator.stop()
        ctl.stop()
        plant.close()
    figures.notes.extend(operator.problems)

    db = out / "historian.sqlite"
    _compare(plant, db, figures, operator.grants)
    _hard_limits(plant, unit, figures)
    _tamper(db, folder / "tamper", figures)
    return figures, plan


def _compare(plant: PlantThread, db: Path, figures: BatchFigures, resumes: Sequence[float]) -> None:
    """Plant-side bundles against the historian's setpoint records."""
    unit = plant.s.units[0]
    limits = unit.apc.config.limits
    accepted: Counter[tuple[str, float]] = Counter()
    for w in plant.writes:
        for name, value, status in zip(w.names, w.values, w.statuses, strict=True):
            lim = limits.get(name)
            if lim is not None and not (lim.low <= value <= lim.high):
                figures.setpoints_outside_limits += 1
            if status == "Good":
                accepted[(name, round(value, 9))] += 1
    recorded: Counter[tuple[str, float]] = Counter()
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
        for name, value in conn.execute(
            "SELECT name, value FROM setpoints WHERE status = 'Good'"
        ).fetchall():
            recorded[(str(name), round(float(value), 9))] += 1
    figures.writes_without_record = sum((accepted - recorded).values())
    figures.records_without_write = sum((recorded - accepted).values())
    # first move after each resume, against the working setpoint before it; allowed: the
    # plant's rate limit over one control period, or for a setpoint without one the
    # controller's engagement rule (range / UNLIMITED_ENGAGE_PERIODS per period)
    period_h = 1.0
    allowed = 0.0
    for lim in limits.values():
        span = lim.high - lim.low
        if span > 0:
            rate = max(lim.rate_up, lim.rate_down)
            fraction = rate * period_h / span if math.isfinite(rate) else math.nan
            if not math.isfinite(fraction):
                fraction = 1.0 / UNLIMITED_ENGAGE_PERIODS
            allowed = max(allowed, min(fraction, 1.0))
    figures.allowed_first_move = allowed
    steps = plant.steps.get(unit.name, [])
    for resumed in resumes:
        first = next((w for w in plant.writes if w.wall >= resumed and "Good" in w.statuses), None)
        if first is None:
            continue
        before = next(
            (s.inputs for s in reversed(steps) if s.end_h <= first.process_h + 1e-9), None
        )
        if before is None:
            continue
        worst = 0.0
        for name, value in zip(first.names, first.values, strict=True):
            lim = limits.get(name)
            if lim is None or lim.high <= lim.low or name not in before:
                continue
            worst = max(worst, abs(value - before[name]) / (lim.high - lim.low))
        figures.first_moves.append(worst)


def _hard_limits(plant: PlantThread, unit: Any, figures: BatchFigures) -> None:
    plugin, process = unit.plant.plugin, unit.plant.process
    hours = 0.0
    for s in plant.steps.get(unit.name, []):
        if plugin.violations(process, s.truth):
            hours += s.end_h - s.start_h
    figures.hours_beyond_hard_limit = hours


# ------------------------------------------------------------------ tampering


def _one(conn: sqlite3.Connection, sql: str) -> Any:
    row = conn.execute(sql).fetchone()
    return None if row is None else row[0]


def tamper_cases() -> dict[str, Callable[[sqlite3.Connection], None]]:
    """Edits an insider with write access to the historian's database might make."""

    def edited_setpoint(c: sqlite3.Connection) -> None:
        sid = _one(c, "SELECT step_id FROM setpoints WHERE status = 'Good' ORDER BY step_id")
        c.execute("UPDATE setpoints SET value = value + 0.5 WHERE step_id = ? AND idx = 0", (sid,))

    def edited_measurement(c: sqlite3.Connection) -> None:
        sid = _one(c, "SELECT step_id FROM measurements ORDER BY step_id")
        c.execute("UPDATE measurements SET value = value * 1.1 WHERE step_id = ?", (sid,))

    def deleted_step(c: sqlite3.Connection) -> None:
        sid = _one(c, "SELECT id FROM steps ORDER BY id LIMIT 1 OFFSET 3")
        for table in ("measurements", "setpoints", "estimates"):
            c.execute(f"DELETE FROM {table} WHERE step_id = ?", (sid,))  # noqa: S608
        c.execute("DELETE FROM steps WHERE id = ?", (sid,))

    def swapped_steps(c: sqlite3.Connection) -> None:
        a, b = (r[0] for r in c.execute("SELECT id FROM steps ORDER BY id LIMIT 2 OFFSET 2"))
        ta = _one(c, f"SELECT process_time_h FROM steps WHERE id = {a}")  # noqa: S608
        tb = _one(c, f"SELECT process_time_h FROM steps WHERE id = {b}")  # noqa: S608
        c.execute("UPDATE steps SET process_time_h = ? WHERE id = ?", (tb, a))
        c.execute("UPDATE steps SET process_time_h = ? WHERE id = ?", (ta, b))

    def forged_step(c: sqlite3.Connection) -> None:
        cols = [r[1] for r in c.execute("PRAGMA table_info(steps)") if r[1] != "id"]
        values = ["999" if col == "step" else col for col in cols]
        c.execute(
            f"INSERT INTO steps ({', '.join(cols)}) SELECT {', '.join(values)} FROM steps "  # noqa: S608
            "ORDER BY id DESC LIMIT 1"
        )

    def cut_tail(c: sqlite3.Connection) -> None:
        last = _one(c, "SELECT max(id) FROM steps")
        for sid in range(last - 2, last + 1):
            for table in ("measurements", "setpoints", "estimates"):
                c.execute(f"DELETE FROM {table} WHERE step_id = ?", (sid,))  # noqa: S608
            c.execute("DELETE FROM steps WHERE id = ?", (sid,))
        c.execute("DELETE FROM events WHERE id > (SELECT max(id) - 3 FROM events)")

    def deleted_alarm(c: sqlite3.Connection) -> None:
        eid = _one(c, "SELECT id FROM events WHERE severity = 'alarm' ORDER BY id")
        if eid is None:
            eid = _one(c, "SELECT id FROM events WHERE severity = 'warning' ORDER BY id")
        c.execute("DELETE FROM events WHERE id = ?", (eid,))

    def full_wipe(c: sqlite3.Connection) -> None:
        tables = [r[0] for r in c.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        for table in tables:
            if table != "hmpc_schema":
                c.execute(f"DELETE FROM {table}")  # noqa: S608

    return {
        "edited setpoint": edited_setpoint,
        "edited measurement": edited_measurement,
        "deleted step": deleted_step,
        "swapped steps": swapped_steps,
        "forged step 999": forged_step,
        "cut tail": cut_tail,
        "deleted alarm": deleted_alarm,
        "full wipe": full_wipe,
    }


def _verify(db: Path, anchor: Path) -> bool:
    """True when ``hmpc audit verify`` passes on ``db`` with the run's external anchor."""
    command = [sys.executable, "-m", "controller.cli", "audit", "verify", "--anchor", str(anchor)]
    proc = subprocess.run(  # noqa: S603 - our own module with our own arguments
        [*command, "--historian", f"sqlite:///{db}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    return proc.returncode == 0


def _tamper(db: Path, folder: Path, figures: BatchFigures) -> None:
    """Each edit on a copy of the historian; the anchor is the one ``hmpc run`` wrote
    beside it (outside the database, where the edits do not reach)."""
    folder.mkdir(parents=True, exist_ok=True)
    anchor = db.parent / "historian.anchor.jsonl"
    if not _verify(db, anchor):
        figures.notes.append("the untouched historian failed verification")
    for name, edit in tamper_cases().items():
        copy = folder / f"{name.replace(' ', '_')}.sqlite"
        shutil.copyfile(db, copy)
        with contextlib.closing(sqlite3.connect(copy)) as conn:
            try:
                edit(conn)
                conn.commit()
            except (sqlite3.Error, TypeError, ValueError) as exc:
                figures.notes.append(f"tamper {name!r} could not be applied: {exc}")
                continue
        figures.tamper_tried += 1
        if not _verify(copy, anchor):
            figures.tamper_detected += 1
        else:
            figures.notes.append(f"tamper {name!r} NOT detected")


# ------------------------------------------------------------------ campaign and command


def run_campaign(
    batches: int, seed: int, hours: float, speed: float, controller: str, work: Path
) -> dict[str, Any]:
    all_figures = []
    for i in range(batches):
        figures, plan = run_batch(i, seed, hours, speed, controller, work)
        all_figures.append(figures)
        print(
            f"batch {i}: kill {plan.kill_h} h, stop {plan.stop_h} h, plant restart "
            f"{plan.plant_restart_h} h, sensor faults "
            f"{[(f.kind, f.target, round(f.start_h, 1)) for f in plan.sensor_faults]}",
            flush=True,
        )
        for note in figures.notes:
            print(f"  note: {note}", flush=True)
    first = [m for f in all_figures for m in f.first_moves]
    safe = [s for f in all_figures for s in f.seconds_to_safe_state]
    return {
        "batches": batches,
        "writes_without_record": sum(f.writes_without_record for f in all_figures),
        "records_without_write": sum(f.records_without_write for f in all_figures),
        "setpoints_outside_limits": sum(f.setpoints_outside_limits for f in all_figures),
        "max_first_move_fraction": max(first) if first else None,
        "allowed_first_move_fraction": max((f.allowed_first_move for f in all_figures), default=0),
        "max_seconds_to_safe_state": max(safe) if safe else None,
        "watchdog_s": WATCHDOG_S,
        "hours_beyond_hard_limit": sum(f.hours_beyond_hard_limit for f in all_figures),
        "tamper_detected": sum(f.tamper_detected for f in all_figures),
        "tamper_tried": sum(f.tamper_tried for f in all_figures),
    }


def add_bench_faults(bench_sub: Any) -> None:
    p = bench_sub.add_parser(
        "faults",
        help="fault campaign: kill -9, SIGSTOP, plant restarts, sensor faults, tampering",
    )
    p.add_argument("--batches", type=int, default=3)
    p.add_argument("--seed", type=int, default=1, help="fault plans and patients (seeded)")
    p.add_argument("--hours", type=float, default=48.0, help="process hours per batch")
    p.add_argument("--speed", type=float, default=1800.0, help="process hours per wall hour")
    p.add_argument("--controller", default="rule", help="the site's controller kind")
    p.add_argument("--keep", type=Path, default=None, help="keep the batch folders here")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    p.set_defaults(func=cmd_bench_faults)


def cmd_bench_faults(args: argparse.Namespace) -> int:
    if args.batches < 1 or not (args.hours >= 16):
        raise ValueError("--batches must be >= 1 and --hours >= 16")
    work = args.keep or Path(tempfile.mkdtemp(prefix="hmpc-faults-"))
    try:
        result = run_campaign(
            args.batches, args.seed, args.hours, args.speed, args.controller, work
        )
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    for key, value in result.items():
        print(f"{key}: {value}")
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    return 0

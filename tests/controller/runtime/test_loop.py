"""The control loop's decisions, on a scripted plant (a PlantIO written for these tests,
without a network; the OPC UA implementation is tested against real servers in
tests/integration): freshness gate, Remote gate, bumpless engagement, output limits,
per-item statuses, an overrunning or failing control law, a failing recorder."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from controller.numerics.measurements import Measurement
from controller.records.steps import EventRecord, StepRecord
from controller.runtime.loop import LoopSettings, UnitLoop, build_limiter, run_control_loop
from controller.runtime.plant_io import InputState, PlantLimits, PlantStatus
from controller.runtime.site import SetpointTag, UnitConversion

INF = math.inf


class ScriptedPlant:
    """A plant whose clock advances ``dt_h`` per wait; ``script(plant, t)`` changes it."""

    unit = "BR01"
    setpoint_names = ("flow", "feed")

    def __init__(
        self,
        script: Callable[[ScriptedPlant, float], None] | None = None,
        *,
        dt_h: float = 0.5,
        wait_s: float = 0.002,
    ) -> None:
        self.script = script
        self.dt_h = dt_h
        self.wait_s = wait_s
        self.clock = 0.0
        self.connected = True
        self.generation = 1
        self.remote = True
        self.fallback = False
        self.alive = False
        self.targets = {"flow": 1.0, "feed": 0.0}
        self.writes: list[tuple[float, dict[str, float]]] = []
        self.refuse: dict[str, str] = {}
        self.sensor_value = 5.0
        self.sensor_quality = "good"
        self.sensor_frozen = False
        self.batch_id = "B1"
        self.batch_start: datetime | None = datetime(2026, 12, 1, tzinfo=UTC)
        self._sample = 0.0
        self._pending: list[Measurement] = []
        self._publish()

    def _publish(self) -> None:
        if not self.sensor_frozen:
            self._sample = self.clock
            self._pending.append(
                Measurement(
                    "glucose",
                    self.sensor_value,
                    "mM",
                    self.clock,
                    self.clock,
                    "online",
                    self.sensor_quality,
                )
            )

    # -- PlantIO ---------------------------------------------------------------------------
    def status(self) -> PlantStatus:
        return PlantStatus(
            self.connected,
            self.generation,
            self.connected and self.remote,
            self.fallback,
            self.clock,
            self.clock,
            3600.0,
            self.batch_id,
            self.batch_start,
        )

    def inputs(self) -> Mapping[str, InputState]:
        return {
            "glucose": InputState(
                "glucose",
                "glucose",
                "online",
                self.sensor_value,
                self._sample,
                self.sensor_quality,
                True,
                1.0,
            )
        }

    def take_measurements(self) -> list[Measurement]:
        out, self._pending = self._pending, []
        return out

    def limits(self) -> PlantLimits:
        return PlantLimits(
            low={"flow": 0.0, "feed": 0.0},
            high={"flow": 4.0, "feed": 5.0},
            rate_up={"flow": 0.5, "feed": INF},
            rate_down={"flow": 0.5, "feed": INF},
            deadband={"flow": 0.004, "feed": 0.0},
        )

    async def wait_change(self, timeout_s: float) -> None:
        await asyncio.sleep(self.wait_s)
        self.clock = round(self.clock + self.dt_h, 9)
        if self.script is not None:
            self.script(self, self.clock)
        if self.connected:
            self._publish()

    async def read_setpoints(self) -> dict[str, float]:
        return dict(self.targets)

    async def write_setpoints(self, values: Mapping[str, float]) -> dict[str, str]:
        self.writes.append((self.clock, dict(values)))
        out = {}
        for name, value in values.items():
            status = self.refuse.get(name, "Good" if self.remote else "BadInvalidState")
            if status == "Good":
                self.targets[name] = value
            out[name] = status
        return out

    async def hand_back(self) -> str:
        self.remote = False
        return "Good"

    def set_alive(self, alive: bool) -> None:
        self.alive = alive


class Law:
    """Proposes fixed values; counts calls and concurrent calls."""

    name = "test"

    def __init__(self, proposal: Mapping[str, float], delay_s: float = 0.0) -> None:
        self.proposal = dict(proposal)
        self.delay_s = delay_s
        self.calls: list[tuple[float, list[Measurement], dict[str, float]]] = []
        self.active = 0
        self.max_active = 0
        self.fail_at: float | None = None
        self._lock = threading.Lock()

    def step(
        self, time_h: float, measurements: Sequence[Measurement], previous: Mapping[str, float]
    ) -> dict[str, float]:
        with self._lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
        try:
            self.calls.append((time_h, list(measurements), dict(previous)))
            if self.fail_at is not None and time_h >= self.fail_at:
                raise RuntimeError("model blew up")
            if self.delay_s:
                time.sleep(self.delay_s)
            return dict(self.proposal)
        finally:
            with self._lock:
                self.active -= 1


class Recorder:
    def __init__(self, fail_first: int = 0) -> None:
        self.steps: list[StepRecord] = []
        self.events: list[EventRecord] = []
        self.fail_first = fail_first

    def _maybe_fail(self) -> None:
        if self.fail_first > 0:
            self.fail_first -= 1
            raise OSError("disk full")

    def append_step(self, record: StepRecord) -> None:
        self._maybe_fail()
        self.steps.append(record)

    def append_event(self, record: EventRecord) -> None:
        self._maybe_fail()
        self.events.append(record)


def run(
    plant: ScriptedPlant, law: Law, recorder: Recorder | None = None, **settings: Any
) -> tuple[Any, Recorder, UnitLoop]:
    rec = recorder if recorder is not None else Recorder()
    options = {"period_h": 1.0, "harvest_time_h": 10.0, "poll_s": 0.01, **settings}
    loop = UnitLoop(plant, law, rec, LoopSettings(**options))
    summary = asyncio.run(asyncio.wait_for(loop.run(asyncio.Event()), 60))
    return summary, rec, loop


def test_moves_within_limits_one_bundle_per_cycle_and_hand_back() -> None:
    plant = ScriptedPlant()
    summary, rec, _ = run(plant, Law({"flow": 9.0, "feed": 2.0}))
    assert summary.ended == "harvest" and summary.engagements == 1
    # bumpless from the read-back flow 1.0, ramped at 0.5 per h, capped at 4.0
    flows = [v["flow"] for _, v in plant.writes]
    assert flows == pytest.approx([1.5, 2.0, 2.5, 3.0, 3.5, 4.0])
    # feed has no rate limit anywhere: after engagement it still ramps (span / 4 periods per
    # cycle, UNLIMITED_ENGAGE_PERIODS), never jumping across its range in one step
    feeds = [v["feed"] for _, v in plant.writes]
    assert feeds == pytest.approx([1.25, 2.0, 2.0, 2.0, 2.0, 2.0])
    cycle_times = [s.process_time_h for s in rec.steps]
    assert cycle_times == [float(t) for t in range(10)]  # one cycle per period
    assert sum(1 for s in rec.steps if s.setpoints[0].status == "Good") == len(plant.writes)
    assert rec.steps[-1].setpoints[0].status == "unchanged"  # at the bound: nothing written
    assert plant.remote is False and plant.alive is False  # handed back; heartbeat stopped
    assert [e.kind for e in rec.events][-2:] == ["batch_end", "mode"]


def test_stale_or_bad_input_holds_without_computing() -> None:
    def script(p: ScriptedPlant, t: float) -> None:
        p.sensor_frozen = 2.0 <= t < 5.0  # stale from 3 h (age > 1 h)
        p.sensor_quality = "bad" if 6.0 <= t < 7.0 else "good"

    plant = ScriptedPlant(script)
    law = Law({"flow": 1.2, "feed": 0.0})
    _, rec, _ = run(plant, law)
    called = [t for t, _, _ in law.calls]
    assert not {3.0, 4.0, 6.0} & set(called)  # no move computed on stale or bad data
    assert {0.0, 1.0, 2.0, 5.0, 7.0}.issubset(called)
    held = {s.process_time_h: s for s in rec.steps if s.notes and "stale" in s.notes[0]}
    assert set(held) == {3.0, 4.0}
    assert all(p.status == "not written" for s in held.values() for p in s.setpoints)
    assert not any(t in (3.0, 4.0, 6.0) for t, _ in plant.writes)
    fallbacks = [e.message for e in rec.events if e.kind == "fallback"]
    assert any("stale" in m for m in fallbacks) and any("bad" in m for m in fallbacks)
    assert any("resuming" in m for m in fallbacks)
    # the bad sample is recorded with the decision, and not handed to the law
    bad = [m for s in rec.steps for m in s.measurements if m.quality == "bad"]
    assert bad and not any(m.accepted for m in bad)
    assert not any(m.quality == "bad" for _, ms, _ in law.calls for m in ms)


def test_local_mode_writes_nothing_and_reengages_from_the_readback() -> None:
    def script(p: ScriptedPlant, t: float) -> None:
        if t == 3.0:
            p.remote, p.fallback = False, True  # the plant sheds
            p.targets = {"flow": 0.7, "feed": 1.0}  # and holds what it applied
        if t == 6.5:
            p.remote, p.fallback = True, False  # the operator grants Remote mid-period

    plant = ScriptedPlant(script)
    law = Law({"flow": 3.0, "feed": 0.0})
    summary, rec, _ = run(plant, law)
    assert summary.engagements == 2
    assert not any(3.0 <= t < 6.5 for t, _ in plant.writes)
    shed = [s for s in rec.steps if s.mode == "shed"]
    assert [s.process_time_h for s in shed] == [3.0, 4.0, 5.0, 6.0]
    # engagement at once (6.5 h, not 7 h), moving from the held 0.7 by at most 0.5
    t, first = next((t, v) for t, v in plant.writes if t >= 6.5)
    assert t == 6.5 and first["flow"] == pytest.approx(1.2)
    assert law.calls[-1][2]["flow"] != 0.7 and any(c[2]["flow"] == 0.7 for c in law.calls)
    assert ("fallback", "alarm") in [(e.kind, e.severity) for e in rec.events]


def test_refused_item_is_recorded_and_not_assumed() -> None:
    plant = ScriptedPlant()
    plant.refuse = {"feed": "BadOutOfRange"}
    _, rec, loop = run(plant, Law({"flow": 1.0, "feed": 3.0}), harvest_time_h=3.0)
    statuses = {p.name: p.status for p in rec.steps[0].setpoints}
    assert statuses == {"flow": "Good", "feed": "BadOutOfRange"}
    # the plant kept its feed, so the next cycle proposes the move again from 0.0
    assert loop.summary.item_statuses["BadOutOfRange"] >= 2
    assert any(e.kind == "fault" and "BadOutOfRange" in e.message for e in rec.events)


def test_overrunning_step_is_abandoned_and_never_overlaps() -> None:
    plant = ScriptedPlant(wait_s=0.02)
    law = Law({"flow": 1.5, "feed": 0.0}, delay_s=0.3)
    summary, rec, _ = run(plant, law, solve_budget_s=0.05, harvest_time_h=20.0)
    assert summary.overruns >= 1
    assert law.max_active == 1  # a new step never starts while one runs
    assert plant.writes == []  # every step overran: the setpoints were held
    notes = [n for s in rec.steps for n in s.notes]
    assert any("abandoned" in n for n in notes) and any("still running" in n for n in notes)
    assert any(e.kind == "fallback" and "overran" in e.message for e in rec.events)


def test_failing_law_holds_and_raises_an_alarm() -> None:
    plant = ScriptedPlant()
    law = Law({"flow": 1.5, "feed": 0.0})
    law.fail_at = 4.0
    summary, rec, _ = run(plant, law, harvest_time_h=6.0)
    assert summary.ended == "harvest"
    assert [t for t, _ in plant.writes] == [0.0]  # 1.5 once; the failures write nothing
    assert any(e.kind == "fault" and e.severity == "alarm" for e in rec.events)


class FallbackPlant(ScriptedPlant):
    """Publishes its safe state on shed (``FallbackSetpoints``)."""

    def __init__(self, fallback: Mapping[str, float], **kw: Any) -> None:
        super().__init__(**kw)
        self.fallback_setpoints = dict(fallback)

    def limits(self) -> PlantLimits:
        base = super().limits()
        return PlantLimits(
            base.low, base.high, base.rate_up, base.rate_down, base.deadband,
            self.fallback_setpoints,
        )  # fmt: skip


SAFE = (
    SetpointTag("flow", "flow", UnitConversion("1/d", "1/d"), fallback=0.5),
    SetpointTag("feed", "feed", UnitConversion("mL/h", "mL/h"), fallback=0.0),
)


def run_site(
    plant: ScriptedPlant, law: Law, site: Sequence[SetpointTag], **settings: Any
) -> tuple[Any, Recorder]:
    rec = Recorder()
    options = {"period_h": 1.0, "harvest_time_h": 6.0, "poll_s": 0.01, **settings}
    loop = UnitLoop(plant, law, rec, LoopSettings(**options), site_setpoints=site)
    summary = asyncio.run(asyncio.wait_for(loop.run(asyncio.Event()), 60))
    return summary, rec


def test_engagement_checks_and_records_the_plants_safe_state() -> None:
    """The site file declares the fallback setpoints; a plant whose published fallback
    differs (or holds) is never engaged: one alarm, nothing written."""
    plant = FallbackPlant({"flow": 0.5, "feed": math.nan})  # feed held on shed
    summary, rec = run_site(plant, Law({"flow": 1.5, "feed": 1.0}), SAFE)
    assert plant.writes == [] and summary.engagements == 0
    alarms = [e for e in rec.events if e.severity == "alarm" and e.kind == "fallback"]
    assert len(alarms) == 1 and "feed: the site declares 0, the plant holds it" in alarms[0].message
    assert alarms[0].data["fallback"]["feed"] == {"plant": None, "site": 0.0}

    plant = FallbackPlant({"flow": 0.5, "feed": 0.0})
    summary, rec = run_site(plant, Law({"flow": 1.5, "feed": 1.0}), SAFE)
    assert plant.writes and summary.engagements == 1
    (engaged,) = [e for e in rec.events if e.message.startswith("engaged")]
    assert engaged.data["fallback"] == {
        "flow": {"plant": 0.5, "site": 0.5},
        "feed": {"plant": 0.0, "site": 0.0},
    }


def test_failing_law_moves_to_the_declared_fallback_setpoints_with_an_alarm() -> None:
    plant = FallbackPlant({"flow": 0.5, "feed": 0.0})
    plant.targets = {"flow": 2.0, "feed": 0.0}
    law = Law({"flow": 2.0, "feed": 4.0})
    law.fail_at = 4.0
    summary, rec = run_site(plant, law, SAFE, harvest_time_h=8.0)
    assert summary.ended == "harvest"
    after = [v for t, v in plant.writes if t >= 4.0]
    # rate-limited (flow 0.5 per h) from the last move towards the safe state, not held
    assert [v["flow"] for v in after] == pytest.approx([1.5, 1.0, 0.5])
    assert all(v["feed"] == 0.0 for v in after)
    alarms = [e for e in rec.events if e.kind == "fallback" and e.severity == "alarm"]
    assert len(alarms) == 1 and "fallback setpoints" in alarms[0].message


def test_recorder_failure_loses_no_record() -> None:
    plant = ScriptedPlant()
    failing = Recorder(fail_first=3)
    _, rec, loop = run(plant, Law({"flow": 1.0, "feed": 0.0}), failing, harvest_time_h=5.0)
    assert [s.step for s in rec.steps] == list(range(5))
    assert loop.summary.events == len(rec.events)


def test_disconnection_holds_and_records_the_cycles() -> None:
    def script(p: ScriptedPlant, t: float) -> None:
        p.connected = not (2.0 <= t < 4.0)
        if t == 4.0:
            p.generation += 1

    plant = ScriptedPlant(script)
    summary, rec, _ = run(plant, Law({"flow": 2.0, "feed": 0.0}), harvest_time_h=6.0)
    assert summary.reconnects == 1 and summary.engagements == 2
    gap = [s for s in rec.steps if s.mode == "disconnected"]
    assert gap and all(p.status == "not written" for s in gap for p in s.setpoints)
    assert not any(2.0 <= t < 4.0 for t, _ in plant.writes)


def test_build_limiter_takes_the_tighter_limits() -> None:
    plant = ScriptedPlant().limits()
    site = [
        SetpointTag("flow", "flow", UnitConversion("1/d", "1/d"), low=0.5, high=10.0, rate=0.2),
        SetpointTag("feed", "feed", UnitConversion("mL/h", "mL/h"), deadband=0.1),
    ]
    lim = build_limiter(("flow", "feed"), plant, site)
    assert lim.bounds == {"flow": (0.5, 4.0), "feed": (0.0, 5.0)}
    assert lim.rate_limits == {"flow": 0.2}
    assert lim.deadbands == {"flow": 0.004, "feed": 0.1}


def test_run_control_loop_reports_a_failed_unit() -> None:
    class Broken(ScriptedPlant):
        def take_measurements(self) -> list[Measurement]:
            raise KeyError("boom")

    ok, broken = ScriptedPlant(), Broken()
    loops = [
        UnitLoop(p, Law({"flow": 1.0, "feed": 0.0}), Recorder(), LoopSettings(harvest_time_h=3.0))
        for p in (ok, broken)
    ]
    summaries = asyncio.run(run_control_loop(loops))
    assert summaries[0].ended == "harvest"
    assert summaries[1].ended.startswith("failed") and broken.alive is False


# ------------------------------------------- a restarted or replaced plant (issue 22 §2)


def _restart_at(when: float, change: Callable[[ScriptedPlant], None]) -> Any:
    def script(plant: ScriptedPlant, t: float) -> None:
        if not getattr(plant, "restarted", False) and t >= when:
            plant.restarted = True  # type: ignore[attr-defined]
            change(plant)

    return script


def _back_to_zero(plant: ScriptedPlant) -> None:
    plant.clock = 0.0


def _new_batch_id(plant: ScriptedPlant) -> None:
    plant.batch_id = "B2"


def _new_batch_start(plant: ScriptedPlant) -> None:
    plant.batch_start = (plant.batch_start or datetime.now(UTC)) + timedelta(hours=1)


@pytest.mark.parametrize(
    ("change", "said"),
    [
        (_back_to_zero, "process time went back from 4.500 h to 0.000 h"),
        (_new_batch_id, "BatchId changed from 'B1' to 'B2'"),
        (_new_batch_start, "BatchStartTime changed"),
    ],
)
def test_a_restarted_plant_stops_the_writes_with_one_alarm(
    change: Callable[[ScriptedPlant], None], said: str
) -> None:
    plant = ScriptedPlant(_restart_at(5.0, change))
    law = Law({"flow": 2.0, "feed": 1.0})
    summary, rec, _ = run(plant, law)
    assert summary.ended == "discontinuity"
    alarms = [e for e in rec.events if e.kind == "discontinuity"]
    assert len(alarms) == 1 and alarms[0].severity == "alarm" and said in alarms[0].message
    assert alarms[0].batch_id == "B1"  # in the record of the plant it controlled
    # nothing was written to, and nothing learnt from, the new plant
    assert plant.writes and all(t < 5.0 for t, _ in plant.writes)
    assert all(t < 5.0 for t, _, _ in law.calls)
    assert all(s.process_time_h < 5.0 for s in rec.steps)
    assert plant.remote is False and plant.alive is False


class HistoryRecorder:
    """A recorder with a reader, that already holds batch ``B1`` up to 70 h (a controller
    that ran before the plant restarted under the same BatchId; the step at 75 h was
    recorded while disconnected, at an extrapolated time)."""

    def __init__(self) -> None:
        self.stored = [
            StepRecord("B1", "BR01", i, t, 0.0, mode)
            for i, (t, mode) in enumerate(
                [(69.0, "remote"), (70.0, "remote"), (75.0, "disconnected")]
            )
        ]
        self.events: list[EventRecord] = []

    def append_step(self, record: StepRecord) -> None:
        self.stored.append(record)

    def append_event(self, record: EventRecord) -> None:
        self.events.append(record)

    def steps(self, batch_id: str, unit: str) -> list[StepRecord]:
        return [s for s in self.stored if s.batch_id == batch_id and s.unit == unit]


def test_a_plant_restarted_while_no_controller_ran_gets_a_new_batch_record() -> None:
    plant = ScriptedPlant()
    plant.clock = 7.0
    plant._publish()
    rec = HistoryRecorder()
    loop = UnitLoop(
        plant, Law({"flow": 2.0, "feed": 1.0}), rec, LoopSettings(poll_s=0.01, harvest_time_h=12.0)
    )
    summary = asyncio.run(asyncio.wait_for(loop.run(asyncio.Event()), 60))
    assert summary.ended == "harvest" and summary.batch_id == "B1~2"
    alarms = [e for e in rec.events if e.kind == "discontinuity"]
    assert len(alarms) == 1 and alarms[0].batch_id == "B1"
    assert "before the last recorded step at 70.000 h" in alarms[0].message
    new = rec.stored[3:]
    assert new and {s.batch_id for s in new} == {"B1~2"} and new[0].step == 0
    assert plant.writes  # the new plant is controlled, from a fresh start

"""The control loop: one task per bioreactor, on the plant's process clock.

Each cycle (at multiples of the control period in process time, and at once when Remote is
granted)::

    measurements = io.take_measurements()          # arrived by subscription
    gate: connected, every required input fresh and good, unit in Remote
    u = await law.step(t, measurements, previous)  # worker thread, time budget
    u = limiter.apply(u, previous, period)         # absolute, rate, deadband
    statuses = await io.write_setpoints(u)          # one bundle, one status per item
    recorder.append_step(StepRecord(...))

Nothing is computed on stale or bad data and nothing is written unless the plant is in
Remote: the loop then holds (the plant keeps its setpoints) and says why in the step
record, an event and the log. Engagement is bumpless: on entering Remote (and after every
reconnect) the loop reads the plant's setpoints back and moves from there within the rate
limits (optionally an engagement ramp). A control-law step that overruns its budget is
abandoned (the setpoints are held); a new step never starts while one still runs.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import functools
import logging
import math
import os
import time
from collections.abc import Awaitable, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import numpy as np

from controller.numerics.limits import OutputLimiter
from controller.numerics.measurements import Measurement
from controller.numerics.validation import MeasurementValidator, ValidationSettings
from controller.records.audit import AuditTrail
from controller.records.historian import Historian, WriteIntent, config_event
from controller.records.steps import EventRecord, MeasurementRecord, SetpointRecord, StepRecord
from controller.runtime.plant_io import (
    START_TOLERANCE_S,
    BatchContinuity,
    PlantIO,
    PlantLimits,
    PlantStatus,
)
from controller.runtime.site import SetpointTag
from plant_models.errors import PlantIOError

__all__ = [
    "ControlLaw",
    "LoopSettings",
    "PrintingHook",
    "Recorder",
    "UnitLoop",
    "UnitSummary",
    "build_limiter",
    "run_control_loop",
]

log = logging.getLogger(__name__)

_EPS = 1e-6
#: After (re-)engagement a setpoint with no finite rate limit (neither the plant's nor the
#: site file's) moves at most span / this many periods per cycle while this many periods
#: pass (when no engagement ramp is configured): a resumed controller never jumps a
#: setpoint across its whole range in one step.
UNLIMITED_ENGAGE_PERIODS = 4

#: TEST ONLY: ``HMPC_TEST_CRASH_AFTER=intent`` (the write intent is stored, nothing written)
#: or ``=write`` (the plant accepted the bundle, nothing confirmed or recorded) makes the
#: process exit at once with status 9, as a kill -9 there would; the write-ahead tests
#: (tests/integration/test_write_ahead.py) use it. Never set it on a plant.
CRASH_ENV = "HMPC_TEST_CRASH_AFTER"


def _crash_point(point: str) -> None:
    if os.environ.get(CRASH_ENV) == point:
        log.critical("%s=%s: exiting now (test-only crash point)", CRASH_ENV, point)
        logging.shutdown()
        os._exit(9)


class Recorder(Protocol):
    """Where step and event records go (the historian; a list in tests)."""

    def append_step(self, record: StepRecord) -> None: ...

    def append_event(self, record: EventRecord) -> None: ...


class ControlLaw(Protocol):
    """The control law (``controller.laws.control.Controller``): measurements -> next inputs."""

    name: str

    def step(
        self, time_h: float, measurements: Sequence[Measurement], previous: Mapping[str, float]
    ) -> dict[str, float]: ...


class PrintingHook(Protocol):
    """Printer coordination of a unit (``controller.runtime.printing.UnitPrinting``)."""

    async def after_cycle(
        self, time_h: float, stepped: bool, setpoints: Mapping[str, float], budget_s: float
    ) -> None: ...

    async def finish(self, ended: str, stop: asyncio.Event) -> None: ...

    async def close(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class LoopSettings:
    """Settings of one unit's loop.

    Attributes:
        period_h: control period, process hours.
        solve_budget_s: wall seconds a step may take (None: half the period in wall seconds
            at the plant's clock speed).
        engage_ramp_h: after (re-)engagement every setpoint moves at most ``span * period /
            engage_ramp_h`` per cycle until this many process hours have passed (0: off).
        harvest_time_h: the loop ends at this culture age (None: runs until stopped).
        hand_back: return the unit to Local when the loop ends (harvest or shutdown).
        poll_s: longest wait between checks when nothing changes, wall seconds.
    """

    period_h: float = 1.0
    solve_budget_s: float | None = None
    engage_ramp_h: float = 0.0
    harvest_time_h: float | None = None
    hand_back: bool = True
    poll_s: float = 0.25


@dataclasses.dataclass
class UnitSummary:
    """What one unit's loop did."""

    unit: str
    batch_id: str = ""
    cycles: int = 0
    moves: int = 0
    bundles: int = 0
    item_statuses: dict[str, int] = dataclasses.field(default_factory=dict)
    holds: int = 0
    overruns: int = 0
    engagements: int = 0
    reconnects: int = 0
    events: int = 0
    last_time_h: float = math.nan
    setpoints: dict[str, float] = dataclasses.field(default_factory=dict)
    ended: str = ""


def build_limiter(
    names: Sequence[str], plant: PlantLimits, site: Sequence[SetpointTag] = ()
) -> OutputLimiter:
    """Output limits = the tighter of the plant's advertised limits and the site file's."""
    by_name = {s.variable: s for s in site}
    bounds: dict[str, tuple[float, float]] = {}
    rates: dict[str, float] = {}
    deadbands: dict[str, float] = {}
    for n in names:
        low, high = plant.low[n], plant.high[n]
        rate = min(plant.rate_up[n], plant.rate_down[n])
        dead = plant.deadband[n]
        tag = by_name.get(n)
        if tag is not None:
            low = max(low, tag.low) if tag.low is not None else low
            high = min(high, tag.high) if tag.high is not None else high
            rate = min(rate, tag.rate) if tag.rate is not None else rate
            dead = max(dead, tag.deadband) if tag.deadband is not None else dead
        if low > high:
            raise PlantIOError(
                f"setpoint {n}: the site's limits and the plant's [{plant.low[n]}, "
                f"{plant.high[n]}] do not overlap; fix the site file."
            )
        bounds[n] = (low, high)
        if math.isfinite(rate):
            rates[n] = rate
        if dead > 0:
            deadbands[n] = dead
    return OutputLimiter(bounds=bounds, rate_limits=rates, deadbands=deadbands)


def _mode_label(st: PlantStatus) -> str:
    if not st.connected:
        return "disconnected"
    if st.remote:
        return "remote"
    return "shed" if st.fallback else "local"


def _finite(values: Any) -> list[float]:
    return [float(v) for v in np.asarray(values, dtype=float).ravel()]


class UnitLoop:
    """The control task of one bioreactor (see the module docstring)."""

    def __init__(
        self,
        io: PlantIO,
        law: ControlLaw,
        recorder: Recorder,
        settings: LoopSettings,
        *,
        site_setpoints: Sequence[SetpointTag] = (),
        units: Mapping[str, str] | None = None,
        state_limits: Mapping[str, Mapping[str, float | None]] | None = None,
        printing: PrintingHook | None = None,
        checkpoint: Any = None,
    ) -> None:
        if not (settings.period_h > 0 and math.isfinite(settings.period_h)):
            raise ValueError(f"period_h must be positive, got {settings.period_h!r}")
        self.io = io
        self.law = law
        self.recorder = recorder
        self.settings = settings
        self.site_setpoints = tuple(site_setpoints)
        self.units = dict(units or {})
        self.state_limits = dict(state_limits or {})
        self.summary = UnitSummary(io.unit)
        self.overheads: list[float] = []
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=f"solve-{io.unit}"
        )
        self._running: asyncio.Future[dict[str, float]] | None = None
        self._buffer: list[Measurement] = []
        self._setpoints: dict[str, float] | None = None  # the plant's targets as we know them
        self._limiter: OutputLimiter | None = None
        self._engaged = False
        self._engaged_at = math.nan
        self._generation = -1
        self._mode = ""
        self._hold_reason = ""
        self._law_alarm = ""  # the control law's current fallback / recovery alarm
        self._step = 0
        self._next_t = math.nan
        self._last_clock = math.nan
        self._last_cycle: tuple[float, bool] = (math.nan, False)
        self._unsaved: list[StepRecord | EventRecord] = []
        #: write intents whose confirmation could not be stored yet (retried with records)
        self._unclosed: list[tuple[WriteIntent, dict[str, str]]] = []
        self._resume_due = False
        #: estimate-free validation (stuck, stale, duplicate, non-finite, bad quality) of
        #: the readings of a law without an estimator (the rule and recipe baselines): its
        #: decisions are recorded and rejected readings are not given to the law. A law
        #: with an estimator validates inside it; its decisions are recorded after its step.
        #: (measured concentrations, rates and cell counts are non-negative: a reading
        #: at 0, e.g. lactate before it is produced, is at the floor and never "stuck")
        self._ranges: dict[str, tuple[float, float]] = {}
        self._validator: MeasurementValidator | None = (
            None
            if getattr(law, "estimator", None) is not None
            else MeasurementValidator(ValidationSettings(physical_ranges=self._ranges), frozenset())
        )
        self._stuck: set[str] = set()
        #: the GMP audit trail (setpoint writes, mode changes) when the recorder is a
        #: historian; None for a test's memory recorder
        self.audit = AuditTrail(recorder) if isinstance(recorder, Historian) else None
        #: the plant's batch as last seen (BatchId, BatchStartTime, latest process time):
        #: a later status that contradicts it is a different plant (see _discontinuity)
        self._plant_batch = ""
        self._continuity = BatchContinuity()
        #: printer coordination (default: attached at start when the site has a [printer])
        self.printing = printing
        #: crash-safe restart (controller.runtime.restart.Checkpoint): state saved after
        #: each step, a batch the historian already holds resumed at start
        self.checkpoint = checkpoint

    # -- records ---------------------------------------------------------------------------
    def _save(self, record: StepRecord | EventRecord) -> None:
        """Append to the recorder; a record that cannot be stored now is kept and retried
        (never dropped)."""
        self._close_pending()
        self._unsaved.append(record)
        pending, self._unsaved = self._unsaved, []
        for i, rec in enumerate(pending):
            try:
                if isinstance(rec, StepRecord):
                    self.recorder.append_step(rec)
                else:
                    self.recorder.append_event(rec)
            except Exception as exc:  # the historian failing must not stop control
                log.critical(
                    "unit=%s recorder failed (%r); %d record(s) kept for retry",
                    self.io.unit,
                    exc,
                    len(pending) - i,
                )
                self._unsaved = pending[i:]
                return

    # -- write-ahead -----------------------------------------------------------------------
    def _open_intent(
        self, target: Mapping[str, float], previous: Mapping[str, float], t: float
    ) -> tuple[WriteIntent | None, str]:
        """Store the intent before the write: (intent, "") or (None, why not). A recorder
        without intents (a test's memory list) gives (None, "")."""
        opener = getattr(self.recorder, "open_intent", None)
        if opener is None:
            return None, ""
        try:
            intent = opener(
                self.summary.batch_id,
                self.io.unit,
                step=self._step,
                process_time_h=t,
                target=dict(target),
                previous=dict(previous),
                reason=f"{getattr(self.law, 'name', 'control law')} step {self._step} at {t:.4g} h",
            )
        except Exception as exc:  # the historian failing must not stop the loop
            log.critical("unit=%s write intent not stored (%r): nothing written", self.io.unit, exc)
            return None, f"write intent not stored ({exc}): nothing written"
        return intent, ""

    def _confirm(self, intent: WriteIntent, statuses: dict[str, str]) -> bool:
        """Close the intent as confirmed with the plant's statuses and its audit record in
        one transaction; False when it could not be stored (retried later)."""
        closer = getattr(self.recorder, "close_intent", None)
        if closer is None:
            return True
        audit = self.audit

        def audit_write(cur: Any) -> None:
            if audit is not None:
                audit.append(
                    cur,
                    "setpoint_write",
                    f"{self.io.unit}/setpoints",
                    user="hmpc",
                    reason=f"{intent.reason} (write intent {intent.id}); statuses {statuses}",
                    old=dict(intent.previous),
                    new=dict(intent.target),
                    batch_id=intent.batch_id,
                    unit=intent.unit,
                )

        try:
            closer(intent, "confirmed", {"statuses": statuses}, also=audit_write)
        except Exception as exc:  # retried with the next record; reconciled at a restart
            log.critical(
                "unit=%s write intent %d not confirmed (%r); kept for retry",
                self.io.unit,
                intent.id,
                exc,
            )
            return False
        return True

    def _close_pending(self) -> None:
        pending, self._unclosed = self._unclosed, []
        for i, (intent, statuses) in enumerate(pending):
            if not self._confirm(intent, statuses):
                self._unclosed = pending[i:]
                return

    def _audit(self, action: str, target: str, **fields: Any) -> None:
        """An audit record (mode changes); a failure is logged and control goes on."""
        if self.audit is None:
            return
        try:
            self.audit.record(
                action, target, batch_id=self.summary.batch_id, unit=self.io.unit, **fields
            )
        except Exception as exc:  # the audit trail failing must not stop control
            log.critical(
                "unit=%s audit record (%s %s) not written: %r", self.io.unit, action, target, exc
            )

    def record_event(self, record: EventRecord) -> None:
        """Store an event of a collaborator (the printer coordination), never dropped."""
        self.summary.events += 1
        self._save(record)

    def _event(self, kind: str, severity: str, message: str, time_h: float, **data: Any) -> None:
        level = {"info": logging.INFO, "warning": logging.WARNING}.get(severity, logging.ERROR)
        log.log(
            level,
            "event unit=%s batch=%s t=%.3fh kind=%s severity=%s: %s %s",
            self.io.unit,
            self.summary.batch_id,
            time_h,
            kind,
            severity,
            message,
            data or "",
        )
        self.summary.events += 1
        self._save(
            EventRecord(
                batch_id=self.summary.batch_id,
                unit=self.io.unit,
                process_time_h=time_h,
                wall_time=time.time(),
                kind=kind,
                severity=severity,
                message=message,
                data=data,
            )
        )

    # -- main ------------------------------------------------------------------------------
    async def run(self, stop: asyncio.Event) -> UnitSummary:
        """Run until the harvest time or ``stop``; always stops the heartbeat."""
        io = self.io
        start = getattr(self.law, "start", None)
        if callable(start):
            # culture age 0 is the inoculation, where the law's prior (the process
            # specification) holds, even when the controller joins the batch later
            start(0.0)
        if self.printing is None:
            from controller.runtime.printing import attach_printing

            self.printing = attach_printing(self)
        io.set_alive(True)
        try:
            while not stop.is_set():
                st = io.status()
                jump = self._discontinuity(st) if st.connected else ""
                if jump:
                    await self._stop_at_discontinuity(jump, st)
                    break
                if st.connected and st.batch_id != self._plant_batch:
                    self._plant_batch = st.batch_id
                    self.summary.batch_id = self._record_id(st)
                    self._resume_numbering()
                    self._resume_due = self.checkpoint is not None
                if self._resume_due and st.connected and math.isfinite(st.clock_h):
                    # (not before the plant's clock is known: the restart records carry
                    # the culture age, never NULL)
                    self._resume_due = False
                    # unconfirmed writes of an earlier run: settled by reading back
                    await self.checkpoint.reconcile(self, st.clock_h)
                    await self.checkpoint.resume(self, st.clock_h)
                self._track(st)
                harvest = self.settings.harvest_time_h
                if harvest is not None and st.connected and st.clock_h >= harvest - _EPS:
                    self.summary.ended = "harvest"
                    self._event(
                        "batch_end", "info", f"harvest time {harvest:g} h reached", st.clock_h
                    )
                    break
                if self._due(st):
                    await self._cycle(st)
                    continue
                await io.wait_change(self.settings.poll_s)
            if not self.summary.ended:
                self.summary.ended = "stopped"
                self._event("shutdown", "info", "controller stopping", io.status().clock_h)
            if self.settings.hand_back and io.status().remote:
                result = await io.hand_back()
                self._event("mode", "info", f"handed back to Local ({result})", io.status().clock_h)
                self._audit(
                    "mode_change",
                    f"{io.unit}/mode",
                    user="hmpc",
                    reason=f"controller hand-back at the end of the run ({self.summary.ended}): "
                    f"{result}",
                    old="remote",
                    new="local",
                )
            if self.printing is not None:  # at a harvest: release the print job, follow it
                await self._printing("finish", self.printing.finish(self.summary.ended, stop))
        finally:
            if self.printing is not None:
                await self._printing("close", self.printing.close())
            io.set_alive(False)
            self._executor.shutdown(wait=False, cancel_futures=True)
            if self._unsaved:
                log.critical(
                    "unit=%s %d record(s) could not be stored", io.unit, len(self._unsaved)
                )
        return self.summary

    # -- a restarted or replaced plant -----------------------------------------------------
    def _discontinuity(self, st: PlantStatus) -> str:
        """Why ``st`` cannot be the plant of the batch this loop controls ("" when it can):
        :class:`~controller.runtime.plant_io.BatchContinuity`."""
        return self._continuity.check(st)

    async def _stop_at_discontinuity(self, why: str, st: PlantStatus) -> None:
        """A different plant: write nothing more, hand the unit back to Local, raise one
        alarm in the batch record the loop was writing, and end this unit's loop (the
        control law's state belongs to the old plant and is never fed the new one's data;
        a restarted ``hmpc run`` starts a new batch record, see :meth:`_record_id`)."""
        self._engaged = False
        self._limiter = None
        handed = "not in Remote"
        if st.remote:
            try:
                handed = f"handed back to Local ({await self.io.hand_back()})"
            except PlantIOError as exc:
                handed = f"hand-back failed ({exc}); the plant's watchdog sheds it"
        mark = self._continuity.mark
        last_t = mark[2] if mark is not None else math.nan
        self.summary.ended = "discontinuity"
        self._event(
            "discontinuity",
            "alarm",
            f"plant discontinuity on {self.io.unit}: {why} (plant restarted or replaced). "
            f"The controller stopped writing ({handed}); its estimate belongs to the old "
            f"plant. Restart hmpc run for this unit to control the new plant under a new "
            f"batch record.",
            last_t,
            plant_batch_id=st.batch_id,
            plant_batch_start=st.batch_start.isoformat() if st.batch_start else None,
            plant_time_h=st.clock_h,
        )

    def _record_id(self, st: PlantStatus) -> str:
        """The batch record to write for the plant's batch: its BatchId, unless the
        historian already holds that batch for another lifetime of the plant (restarted
        under the same BatchId while no controller ran: another BatchStartTime, or steps
        later than the plant's process time now); then the first record ``BatchId~2``
        (``~3``, ...) that is this plant's or new, announced by an alarm in the last one
        that is not, so no record holds two plant lifetimes and no estimate is carried
        across. Records the plant's BatchStartTime (a ``plant`` event) for the next start."""
        batch = st.batch_id
        record, n, previous, why = batch, 1, "", ""
        while (other := self._other_plant(record, st)) is not None:
            if not other:
                break
            previous, why = record, other
            n += 1
            record = f"{batch}~{n}"
        if previous:
            self.summary.batch_id = previous  # the alarm closes the old record
            self._event(
                "discontinuity",
                "alarm",
                f"plant discontinuity on {self.io.unit}: {why} (plant restarted under the "
                f"same BatchId). Not resumed: this batch record ends here; the plant is "
                f"recorded as {record!r}.",
                st.clock_h,
                plant_batch_id=batch,
                plant_time_h=st.clock_h,
                new_record=record,
            )
            log.critical("unit=%s batch %s: %s; recorded as %s", self.io.unit, batch, why, record)
        self.summary.batch_id = record
        self._event(
            "plant",
            "info",
            f"plant batch {batch!r} (BatchStartTime "
            f"{st.batch_start.isoformat() if st.batch_start else 'unknown'}) recorded as "
            f"{record!r}",
            st.clock_h,
            plant_batch_id=batch,
            plant_batch_start=st.batch_start.isoformat() if st.batch_start else None,
        )
        return record

    def _other_plant(self, record: str, st: PlantStatus) -> str | None:
        """Whether the stored batch ``record`` is of another plant lifetime than ``st``:
        None when the recorder holds no such record (or cannot tell), "" when it is this
        plant's, else why not."""
        steps = getattr(self.recorder, "steps", None)
        events = getattr(self.recorder, "events", None)
        try:
            rows = steps(record, self.io.unit) if callable(steps) else []
            plants = events(record, self.io.unit, kind="plant") if callable(events) else []
        except Exception as exc:  # a reader failure: the record is treated as this plant's
            log.warning("unit=%s cannot read batch %s back: %r", self.io.unit, record, exc)
            return ""
        if not rows and not plants:
            return None
        starts = [e.data.get("plant_batch_start") for e in plants]
        known = next((s for s in reversed(starts) if s), None)
        if known and st.batch_start is not None:
            recorded = datetime.fromisoformat(known)
            if abs((st.batch_start - recorded).total_seconds()) > START_TOLERANCE_S:
                return (
                    f"the plant's BatchStartTime {st.batch_start.isoformat()} is not the "
                    f"recorded {recorded.isoformat()} of batch record {record!r}"
                )
        # steps recorded while disconnected carry an extrapolated time: left out
        times = [
            r.process_time_h
            for r in rows
            if r.mode != "disconnected" and math.isfinite(r.process_time_h)
        ]
        if times and math.isfinite(st.clock_h) and max(times) > st.clock_h + _EPS:
            return (
                f"the plant's process time {st.clock_h:.3f} h is before the last recorded "
                f"step at {max(times):.3f} h of batch record {record!r}"
            )
        return ""

    def _resume_numbering(self) -> None:
        """Continue the step numbers of a batch the historian already holds (a restarted
        controller), so no record collides with an earlier one."""
        last_step = getattr(self.recorder, "last_step", None)
        if last_step is None:
            return
        try:
            last = last_step(self.summary.batch_id, self.io.unit)
        except Exception as exc:  # a reader failure only affects numbering
            log.warning("unit=%s cannot read the last step back: %r", self.io.unit, exc)
            return
        last_intent = getattr(self.recorder, "last_intent_step", None)
        intent_step: int | None = None
        if last_intent is not None:
            try:
                intent_step = last_intent(self.summary.batch_id, self.io.unit)
            except Exception as exc:  # a reader failure only affects numbering
                log.warning("unit=%s cannot read the last write intent: %r", self.io.unit, exc)
        if intent_step is not None and intent_step >= self._step:
            # a write whose step record was lost keeps its number (its intent holds it)
            self._step = intent_step + 1
        if last is not None and last.step >= self._step:
            self._step = last.step + 1
            log.info(
                "unit=%s continuing batch %s at step %d",
                self.io.unit,
                self.summary.batch_id,
                self._step,
            )

    def _due(self, st: PlantStatus) -> bool:
        """A cycle is due at the next multiple of the period, and at once on entering
        Remote (bumpless engagement does not wait a whole period)."""
        period = self.settings.period_h
        if st.connected and math.isfinite(st.clock_h):
            self._last_clock = st.clock_h
            if not math.isfinite(self._next_t):
                self._next_t = math.ceil(st.clock_h / period - _EPS) * period
            if st.clock_h >= self._next_t - _EPS:
                return True
            # entering Remote: engage now (once per clock value, so a failed attempt is not
            # retried in a busy loop)
            return st.remote and not self._engaged and self._last_cycle != (st.clock_h, True)
        # disconnected: record the cycles that pass (by the extrapolated clock), write nothing
        return (
            math.isfinite(st.now_h)
            and math.isfinite(self._next_t)
            and (st.now_h >= self._next_t - _EPS)
        )

    def _track(self, st: PlantStatus) -> None:
        """Events for connection and mode changes; any change disengages."""
        if st.connected and st.generation != self._generation:
            if self._generation >= 0:
                self.summary.reconnects += 1
                self._event(
                    "connection", "info", "reconnected", st.clock_h, generation=st.generation
                )
            self._generation = st.generation
            self._engaged = False
            self._limiter = None
        mode = _mode_label(st)
        if mode == self._mode:
            return
        previous, self._mode = self._mode, mode
        t = st.clock_h if math.isfinite(st.clock_h) else st.now_h
        if st.connected or previous:
            self._audit(
                "mode_change",
                f"{self.io.unit}/mode",
                user="plant",
                reason=f"mode seen on the plant at {t:.4g} h"
                + (" (shed by the plant's watchdog)" if mode == "shed" else ""),
                old=previous or None,
                new=mode,
            )
        if self._engaged:
            self._engaged = False
        if mode == "disconnected":
            if previous:
                self._event("connection", "warning", "connection to the plant lost; holding", t)
        elif mode == "shed":
            self._event(
                "fallback",
                "alarm",
                "the plant shed the controller (watchdog): Local, in its fallback state; "
                "waiting for the operator to grant Remote",
                t,
            )
        else:
            self._event("mode", "info", f"mode {previous or 'start'} -> {mode}", t)

    async def _cycle(self, st: PlantStatus) -> None:
        started = time.perf_counter()
        period = self.settings.period_h
        io = self.io
        skipped = 0
        if st.connected and math.isfinite(st.clock_h):
            t = st.clock_h
            if t >= self._next_t - _EPS:
                skipped = math.floor((t - self._next_t) / period + _EPS)
            self._next_t = (math.floor(t / period + _EPS) + 1) * period
            self._last_cycle = (t, st.remote)
        else:
            t = self._next_t
            self._next_t += period
        notes: list[str] = []
        if skipped:
            notes.append(f"{skipped} cycle(s) skipped (controller behind the plant clock)")
        arrived = io.take_measurements()
        records = self._screen(arrived, t)
        mode = _mode_label(st)
        solver: dict[str, Any] = {}
        estimate: dict[str, float] = {}
        estimate_std: dict[str, float] = {}
        diagnostics: dict[str, float] = {}
        growth = 1.0
        predictions: dict[str, tuple[float, ...]] = {}
        setpoints: tuple[SetpointRecord, ...] = ()
        solve_s = 0.0

        stepped = False
        problems = self._gate(st)
        if problems:
            self._hold("; ".join(problems), t)
            notes.extend(problems)
        elif not st.remote:
            notes.append(f"not in Remote ({mode}): nothing written")
        else:
            ok = await self._engage(st, t, notes)
            if ok and self._running is not None:
                notes.append("the previous step is still running: setpoints held")
                self.summary.holds += 1
            elif ok and self._setpoints is not None and self._limiter is not None:
                previous = dict(self._setpoints)
                proposed, solve_s, failure = await self._solve(t, previous)
                safe = self._site_fallback()
                if failure and not failure.startswith("step abandoned") and safe:
                    # the control law failed: the declared fallback law (the site's safe
                    # setpoints, rate-limited), never a silent hold
                    self._law_fallback(f"{failure}: moving to the site's fallback setpoints", t)
                    notes.append(f"{failure}: fallback setpoints")
                    setpoints = await self._move(safe, previous, t, notes)
                    stepped = True
                elif failure:
                    notes.append(failure)
                    self._hold(failure, t)
                else:
                    if self._hold_reason:
                        self._event("fallback", "info", "resuming moves", t)
                        self._hold_reason = ""
                    solver, estimate, estimate_std, growth, predictions = self._law_details()
                    diagnostics = self._mismatch(t)
                    proposed = self._check_law_result(proposed, t, notes)
                    records = self._estimator_decisions(records, t)
                    setpoints = await self._move(proposed, previous, t, notes)
                    stepped = True
        if not setpoints:
            setpoints = self._held_records()
        self._step += 1
        self.summary.cycles += 1
        self.summary.last_time_h = t
        overhead = max(0.0, time.perf_counter() - started - solve_s)
        if mode == "remote" and solve_s > 0:
            self.overheads.append(overhead)
        self._save(
            StepRecord(
                batch_id=self.summary.batch_id,
                unit=io.unit,
                step=self._step - 1,
                process_time_h=t,
                wall_time=time.time(),
                mode=mode,
                measurements=records,
                estimate=estimate,
                estimate_std=estimate_std,
                growth_factor=growth,
                solver=solver,
                predictions=predictions,
                setpoints=setpoints,
                overhead_s=overhead,
                notes=tuple(notes),
                diagnostics=diagnostics,
            )
        )
        if self.checkpoint is not None and solve_s > 0 and self._running is None:
            # the law's state after this step (not after an abandoned one: it still runs)
            await self.checkpoint.save(self, self._step - 1, t)
        if self.printing is not None:  # forecast and print job, after the setpoints
            work = self.printing.after_cycle(
                t, stepped, dict(self._setpoints or {}), self._budget_s(st)
            )
            await self._printing("cycle", work)

    async def _printing(self, what: str, work: Awaitable[None]) -> None:
        """Await the printer coordination; a failure is logged and never reaches control."""
        try:
            await work
        except Exception:  # the printer must not disturb the bioreactor
            log.critical(
                "unit=%s printer coordination (%s) failed", self.io.unit, what, exc_info=True
            )

    # -- the gate --------------------------------------------------------------------------
    def _gate(self, st: PlantStatus) -> list[str]:
        if not st.connected:
            return ["not connected: nothing written"]
        problems = []
        inputs = self.io.inputs()
        now = st.clock_h  # the plant's own time: a paused plant does not age its data
        seen = {i.key for i in inputs.values()}
        for state in inputs.values():
            if not state.required:
                continue
            if state.quality != "good" or not math.isfinite(state.value):
                problems.append(f"input {state.key} is {state.quality} ({state.value!r})")
            elif state.max_age_h is not None and now - state.sample_time_h > state.max_age_h + _EPS:
                problems.append(
                    f"input {state.key} is stale ({now - state.sample_time_h:.2f} h > "
                    f"{state.max_age_h:g} h)"
                )
        for key in self._required_keys():
            if key not in seen:
                problems.append(f"input {key}: no value received yet")
        return problems

    def _required_keys(self) -> list[str]:
        config = getattr(self.io, "config", None)
        if config is None:
            return []
        return [t.key for t in config.inputs if t.required]

    def _hold(self, reason: str, t: float) -> None:
        self.summary.holds += 1
        if reason != self._hold_reason:
            self._hold_reason = reason
            self._event("fallback", "warning", f"holding the setpoints: {reason}", t)

    def _held_records(self) -> tuple[SetpointRecord, ...]:
        values = self._setpoints or {}
        return tuple(
            SetpointRecord(
                n,
                values.get(n, math.nan),
                values.get(n, math.nan),
                self.units.get(n, ""),
                "not written",
            )
            for n in self.io.setpoint_names
        )

    def _screen(self, arrived: Sequence[Measurement], t: float) -> tuple[MeasurementRecord, ...]:
        """Records of the readings that arrived, with the loop's validation decision (laws
        without an estimator); the accepted ones are buffered for the law."""
        validator = self._validator
        out = []
        for m in arrived:
            rec = self._measurement_record(m)
            if validator is not None and rec.accepted:
                if m.name not in validator.known_variables:
                    validator.known_variables = validator.known_variables | {m.name}
                    self._ranges[m.name] = (0.0, math.inf)
                ok, reason, detail = validator.check(m, t, -math.inf)
                if not ok:
                    rec = dataclasses.replace(rec, accepted=False, reason=f"{reason}: {detail}")
                if m.source == "online":
                    self._stuck_transition(m.name, reason, detail, t)
            if rec.accepted:
                self._buffer.append(m)
            out.append(rec)
        return tuple(out)

    def _estimator_decisions(
        self, records: tuple[MeasurementRecord, ...], t: float
    ) -> tuple[MeasurementRecord, ...]:
        """Mark the readings the law's estimator rejected in this cycle's records (reason
        ``estimator: <reason>: <detail>``), so the historian shows why."""
        est = getattr(self.law, "last_estimate", None)
        rejected = getattr(est, "rejected", ()) or ()
        decided = [*rejected, *(getattr(est, "accepted", ()) or ())]
        # in sample order: within one step, readings accepted before a probe froze come
        # with the first ones rejected as stuck
        for d in sorted(decided, key=lambda d: float(d.measurement.sample_time)):
            if d.measurement.source == "online":
                self._stuck_transition(d.measurement.name, d.reason, d.detail, t)
        if not rejected:
            return records
        by_key = {
            (d.measurement.name, d.measurement.source, float(d.measurement.sample_time)): d
            for d in rejected
        }
        out = []
        for rec in records:
            d = by_key.get((rec.name, rec.source, float(rec.sample_time_h)))
            if d is not None and rec.accepted:
                rec = dataclasses.replace(
                    rec, accepted=False, reason=f"estimator: {d.reason}: {d.detail}"
                )
            out.append(rec)
        return tuple(out)

    def _stuck_transition(self, name: str, reason: str, detail: str, t: float) -> None:
        """An alarm when a probe is first found stuck, an event when it reads again."""
        if reason == "stuck" and name not in self._stuck:
            self._stuck.add(name)
            self._event(
                "sensor",
                "alarm",
                f"{name} probe stuck ({detail}): its readings are rejected",
                t,
                variable=name,
            )
        elif reason == "accepted" and name in self._stuck:
            self._stuck.discard(name)
            self._event("sensor", "info", f"{name} probe reads again", t, variable=name)

    @staticmethod
    def _measurement_record(m: Measurement) -> MeasurementRecord:
        reason = ""
        if not math.isfinite(m.value):
            reason = "not finite"
        elif m.quality == "bad":
            reason = "bad quality"
        return MeasurementRecord(
            name=m.name,
            value=m.value,
            unit=m.unit,
            sample_time_h=m.sample_time,
            arrival_time_h=m.arrival_time,
            source=m.source,
            quality=m.quality,
            accepted=not reason,
            reason=reason,
        )

    # -- engagement ------------------------------------------------------------------------
    async def _engage(self, st: PlantStatus, t: float, notes: list[str]) -> bool:
        if self._engaged and self._limiter is not None and self._setpoints is not None:
            return True
        io = self.io
        try:
            readback = await io.read_setpoints()
            limits = io.limits()
            if limits is None:
                raise PlantIOError("the plant's setpoint limits are not known yet")
            self._limiter = build_limiter(io.setpoint_names, limits, self.site_setpoints)
        except PlantIOError as exc:
            notes.append(f"cannot engage: {exc}")
            self._hold(f"cannot engage: {exc}", t)
            return False
        mismatch = self._fallback_mismatch(limits)
        if mismatch:
            reason = f"cannot engage: the plant's safe state differs from the site file: {mismatch}"
            notes.append(reason)
            self.summary.holds += 1
            if reason != self._hold_reason:
                self._hold_reason = reason
                self._event("fallback", "alarm", reason, t, fallback=self._fallback_record(limits))
            self._limiter = None
            return False
        self._setpoints = dict(readback)
        self._engaged = True
        self._engaged_at = t
        self.summary.engagements += 1
        self.summary.events += 1
        self._save(
            config_event(
                self.summary.batch_id,
                io.unit,
                process_time_h=t,
                wall_time=time.time(),
                state_limits=self.state_limits,
                input_bounds=self._limiter.bounds,
                source="plant limits and site file",
            )
        )
        self._event(
            "mode",
            "info",
            "engaged (bumpless): starting from the plant's setpoints",
            t,
            setpoints=dict(readback),
            fallback=self._fallback_record(limits),
        )
        return True

    def _site_fallback(self) -> dict[str, float]:
        """The safe setpoints the site file declares (canonical units)."""
        return {s.variable: s.fallback for s in self.site_setpoints if s.fallback is not None}

    def _fallback_mismatch(self, limits: PlantLimits) -> str:
        """Why the plant's published fallback does not match the site file's ("" if it does)."""
        problems = []
        for name, declared in self._site_fallback().items():
            if name not in self.io.setpoint_names:
                continue
            plant = limits.fallback.get(name, math.nan)
            low, high = limits.low.get(name, 0.0), limits.high.get(name, 1.0)
            tol = max(limits.deadband.get(name, 0.0), 1e-6 * max(high - low, 1.0))
            if not math.isfinite(plant):
                what = "holds it" if name in limits.fallback else "publishes none"
                problems.append(f"{name}: the site declares {declared:g}, the plant {what}")
            elif abs(plant - declared) > tol:
                problems.append(f"{name}: the site declares {declared:g}, the plant {plant:g}")
        return "; ".join(problems)

    def _fallback_record(self, limits: PlantLimits) -> dict[str, Any]:
        """The safe state on shed as the plant publishes it and the site declares it (for the
        historian's events: None = held / not published)."""
        return {
            name: {
                "plant": (
                    float(limits.fallback[name])
                    if math.isfinite(limits.fallback.get(name, math.nan))
                    else None
                ),
                "site": self._site_fallback().get(name),
            }
            for name in self.io.setpoint_names
        }

    # -- the step --------------------------------------------------------------------------
    def _budget_s(self, st: PlantStatus) -> float:
        if self.settings.solve_budget_s is not None:
            return self.settings.solve_budget_s
        speed = st.speed if st.speed > 0 else 1.0
        return 0.5 * self.settings.period_h * 3600.0 / speed

    async def _solve(
        self, t: float, previous: dict[str, float]
    ) -> tuple[dict[str, float], float, str]:
        """Run the law's step in the unit's worker thread within the budget.

        Returns (proposal, wall seconds, failure reason or ``""``)."""
        measurements = [m for m in self._buffer if math.isfinite(m.value) and m.quality != "bad"]
        self._buffer = []
        loop = asyncio.get_running_loop()
        call = functools.partial(self.law.step, t, measurements, dict(previous))
        future = loop.run_in_executor(self._executor, call)
        self._running = future
        started = time.perf_counter()
        budget = self._budget_s(self.io.status())
        done, _ = await asyncio.wait({future}, timeout=budget)
        elapsed = time.perf_counter() - started
        if not done:
            self.summary.overruns += 1
            future.add_done_callback(self._late_result)
            self._event(
                "fallback",
                "warning",
                f"the control law overran its budget ({budget:.3g} s): step abandoned, "
                f"setpoints held",
                t,
                budget_s=budget,
            )
            return {}, elapsed, f"step abandoned after {budget:.3g} s"
        self._running = None
        exc = future.exception()
        if exc is not None:
            log.error("unit=%s control law failed", self.io.unit, exc_info=exc)
            self._event("fault", "alarm", f"the control law failed: {exc!r}", t)
            return {}, elapsed, f"control law failed: {exc!r}"
        proposal = future.result()
        if not isinstance(proposal, Mapping):
            self._event("fault", "alarm", "the control law returned no setpoints", t)
            return {}, elapsed, "control law returned no setpoints"
        return {str(k): float(v) for k, v in proposal.items()}, elapsed, ""

    def _law_fallback(self, reason: str, t: float, **data: Any) -> None:
        """One alarm per episode of a control law that did not produce its own move."""
        if reason != self._law_alarm:
            self._law_alarm = reason
            self._event("fallback", "alarm", reason, t, **data)

    def _check_law_result(
        self, proposed: dict[str, float], t: float, notes: list[str]
    ) -> dict[str, float]:
        """Alarms for an MPC that fell back or runs in recovery mode (one per episode, an
        info event when normal moves resume); a fallback that would hold the setpoints is
        replaced by the site's fallback setpoints where declared."""
        result = getattr(self.law, "last_result", None)
        if result is not None and math.isclose(float(result.time_h), t, abs_tol=_EPS):
            if not result.success:
                used = str(result.fallback_used)
                safe = self._site_fallback()
                if used == "hold" and safe:
                    proposed = {**proposed, **safe}
                    used = "site fallback setpoints"
                notes.append(f"MPC failed ({result.fallback_reason}): {used} move")
                self._law_fallback(
                    f"the MPC failed ({result.fallback_reason}): applying the {used} move",
                    t,
                    status=str(result.status),
                )
                return proposed
            if getattr(result, "recovery", False):
                violations = {
                    k: float(v) for k, v in dict(result.slacks).items() if k.endswith("_recovery")
                }
                notes.append("MPC recovery mode: a hard state limit is violated")
                self._law_fallback(
                    "MPC recovery mode: the estimated state is beyond a hard limit; the move "
                    "drives it back",
                    t,
                    violations=violations,
                )
                return proposed
        if self._law_alarm:
            self._event("fallback", "info", "the control law is back to normal moves", t)
            self._law_alarm = ""
        return proposed

    def _late_result(self, future: asyncio.Future[dict[str, float]]) -> None:
        if self._running is future:
            self._running = None
        if not future.cancelled() and future.exception() is not None:
            log.warning("unit=%s abandoned step failed later: %r", self.io.unit, future.exception())
        else:
            log.info("unit=%s abandoned step finished late; result discarded", self.io.unit)

    def _law_details(
        self,
    ) -> tuple[
        dict[str, Any], dict[str, float], dict[str, float], float, dict[str, tuple[float, ...]]
    ]:
        solver: dict[str, Any] = {}
        predictions: dict[str, tuple[float, ...]] = {}
        result = getattr(self.law, "last_result", None)
        if result is not None:
            solver = {
                "success": bool(result.success),
                "status": str(result.status),
                "iterations": int(result.iterations),
                "solve_time_s": float(result.solve_time_s),
                "cost": float(result.cost),
                "fallback_used": str(result.fallback_used),
                "fallback_reason": str(result.fallback_reason),
                "slacks": {str(k): float(v) for k, v in dict(result.slacks).items()},
            }
            with contextlib.suppress(AttributeError, ValueError, IndexError, TypeError):
                predictions["time_h"] = tuple(_finite(result.predicted_times))
                states = np.asarray(result.predicted_states, dtype=float)
                stds = np.asarray(result.predicted_state_std, dtype=float)
                for i, name in enumerate(result.state_names):
                    predictions[name] = tuple(_finite(states[:, i]))
                    predictions[f"{name}_std"] = tuple(_finite(stds[:, i]))
        estimate: dict[str, float] = {}
        estimate_std: dict[str, float] = {}
        growth = 1.0
        est = getattr(self.law, "last_estimate", None)
        if est is not None:
            estimate = {str(k): float(v) for k, v in dict(est.state).items()}
            estimate_std = {str(k): float(v) for k, v in dict(est.std).items()}
            growth = float(est.growth_factor)
        return solver, estimate, estimate_std, growth, predictions

    def _mismatch(self, t: float) -> dict[str, float]:
        """The estimator's model-mismatch figures for the step record; an alarm that
        started at this step also becomes an ``alarm`` event (once per episode)."""
        report = getattr(getattr(self.law, "last_estimate", None), "mismatch", None)
        if report is None:
            return {}
        for key in report.started:
            self._event("model_mismatch", "warning", report.messages.get(key, key), t, alarm=key)
        return {str(k): float(v) for k, v in report.values().items()}

    # -- the move --------------------------------------------------------------------------
    async def _move(
        self,
        proposed: Mapping[str, float],
        previous: dict[str, float],
        t: float,
        notes: list[str],
    ) -> tuple[SetpointRecord, ...]:
        limiter = self._limiter
        if limiter is None:  # engaged implies a limiter; kept for the type checker
            return self._held_records()
        period = self.settings.period_h
        request = dict(proposed)
        ramp = self.settings.engage_ramp_h
        ramped = set(limiter.bounds) if ramp > 0 else set(limiter.bounds) - set(limiter.rate_limits)
        if ramp <= 0:  # no ramp configured: only setpoints without any rate limit ramp
            ramp = UNLIMITED_ENGAGE_PERIODS * period
        if ramped and t - self._engaged_at < ramp - _EPS:
            for n, (low, high) in limiter.bounds.items():
                if n in ramped and n in request and math.isfinite(request[n]):
                    step = (high - low) * period / ramp
                    request[n] = min(max(request[n], previous[n] - step), previous[n] + step)
            notes.append("engagement ramp")
        limited = limiter.apply(request, previous, period)
        changed = {n: v for n, v in limited.items() if v != previous.get(n)}
        names = self.io.setpoint_names
        if not changed:
            return tuple(
                SetpointRecord(
                    n,
                    float(proposed.get(n, previous[n])),
                    limited[n],
                    self.units.get(n, ""),
                    "unchanged",
                )
                for n in names
            )
        intent, refused = self._open_intent(limited, previous, t)
        if refused:  # no durable intent: no write (every write has a record)
            notes.append(refused)
            self._hold(refused, t)
            return self._held_records()
        _crash_point("intent")
        self.summary.moves += 1
        self.summary.bundles += 1
        statuses = await self.io.write_setpoints(limited)
        _crash_point("write")
        if intent is not None and not self._confirm(intent, dict(statuses)):
            self._unclosed.append((intent, dict(statuses)))
        log.info(
            "write unit=%s batch=%s t=%.3fh values=%s statuses=%s",
            self.io.unit,
            self.summary.batch_id,
            t,
            {n: round(v, 6) for n, v in limited.items()},
            statuses,
        )
        bad = {n: s for n, s in statuses.items() if s != "Good"}
        for n, s in statuses.items():
            self.summary.item_statuses[s] = self.summary.item_statuses.get(s, 0) + 1
            if s == "Good" and self._setpoints is not None:
                self._setpoints[n] = limited[n]
        self.summary.setpoints = dict(self._setpoints or {})
        if bad:
            self._event(
                "fault",
                "warning",
                f"setpoint items refused by the plant: {bad}",
                t,
                statuses=statuses,
                values=limited,
            )
            if any(s in ("BadInvalidState", "BadCommunicationError") for s in bad.values()):
                self._engaged = False  # re-read the plant's setpoints before the next move
        return tuple(
            SetpointRecord(
                n,
                float(proposed.get(n, previous[n])),
                limited[n],
                self.units.get(n, ""),
                statuses.get(n, "not written"),
            )
            for n in names
        )


async def run_control_loop(
    loops: Sequence[UnitLoop], stop: asyncio.Event | None = None
) -> list[UnitSummary]:
    """Run every unit's loop concurrently until each ends (harvest) or ``stop`` is set.

    A unit whose loop fails is reported (its heartbeat stops, so the plant sheds it) and
    the others keep running."""
    stop_event = stop if stop is not None else asyncio.Event()
    results = await asyncio.gather(*(lp.run(stop_event) for lp in loops), return_exceptions=True)
    out: list[UnitSummary] = []
    for lp, res in zip(loops, results, strict=True):
        if isinstance(res, BaseException):
            if isinstance(res, asyncio.CancelledError | KeyboardInterrupt | SystemExit):
                raise res
            log.critical("unit=%s control task failed: %r", lp.io.unit, res, exc_info=res)
            lp.summary.ended = f"failed: {res!r}"
            out.append(lp.summary)
        else:
            out.append(res)
    return out

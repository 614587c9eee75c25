"""Printer coordination in ``hmpc run``: the harvest forecast of each MPC unit drives the
print job on the site's co-located printer (``[printer]`` of the site file).

Per unit whose control law estimates the state (``EstimatingMPC``: ``last_estimate``,
``last_result``, ``estimator``), :class:`UnitPrinting` is attached to its loop:

- every cycle, after the setpoints are written, :meth:`UnitPrinting.after_cycle`:
  forecast from the cycle's estimate with the MPC's predicted inputs
  (:meth:`~controller.numerics.forecast.InputPlan.from_mpc`; the applied setpoints held when the
  solve failed) in a worker thread (``asyncio.to_thread``: numerics never run on the event
  loop), ``coordinator.on_forecast(...)``, ``await coordinator.poll(t)``. The work gets the
  cycle's time budget; work that outlasts it goes on in the background and the next
  cycles skip theirs until it ends, so the printer never delays the bioreactor;
- at the harvest, :meth:`UnitPrinting.finish`: ``on_harvest(t, harvested cells)`` (the
  last online viable-cell density times the estimated volume) and polling until the job
  has ended or aborted, at most ``finish_within_h`` process hours (an alarm otherwise).

The printer session is :class:`PrinterLink`: the plant I/O's supervised OPC UA connection
(:class:`~controller.runtime.plant_io.OpcUaConnection`: the site's security policy, mode,
certificate, trust folder and user; loss detection and reconnection with back-off) on the
printer's endpoint, without units or subscriptions. While it is down the coordinator's
calls fail at once (no waiting on the network) and the coordinator records one
``unreachable`` alarm per outage. Every event (the coordinator's and this module's: the
daily forecast, forecast failures, a print that does not finish) is an
:class:`~controller.records.steps.EventRecord` of kind ``printer`` handed to the loop's recorder
(the historian), which keeps and retries what it cannot store. Nothing here raises into the
control loop: a fault is logged and recorded, and control goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Protocol, cast

from asyncua import Client, ua

from controller.laws.printer import (
    FINAL_STATES,
    JobSpec,
    PrinterCommand,
    PrintEvent,
    PrintPolicy,
    PrintPolicyConfig,
)
from controller.numerics.forecast import (
    ForecastConfig,
    HarvestForecast,
    HarvestForecaster,
    InputPlan,
)
from controller.records.steps import EventRecord
from controller.runtime.plant_io import OpcUaConnection
from controller.runtime.site import (
    SiteConfig,
    parse_node_ref,
    printer_forecast_overrides,
    printer_policy_config,
)
from plant_models.errors import ConfigError, ModelError, PlantIOError

__all__ = [
    "EventRecorder",
    "PrinterCoordinator",
    "PrinterLink",
    "UnitPrinting",
    "attach_printing",
]

log = logging.getLogger(__name__)

#: Process hours between two ``forecast`` events in the historian (each cycle forecasts).
FORECAST_EVENT_EVERY_H = 24.0


# -- the print job on the printer ----------------------------------------------------------------
class EventRecorder(Protocol):
    """Where the coordinator's events go (the historian)."""

    def append_event(self, event: EventRecord) -> None: ...


class PrinterCoordinator:
    """Carries out a batch's :class:`~controller.laws.printer.PrintPolicy` on the printer over
    OPC UA (docs/printer.md): the policy decides, this makes the printer calls, reads the
    job's and the machine's states back into the policy and records the events.

    Args:
        config: policy settings (``namespace_uri``: where the job nodes and methods are).
        client: a connected asyncua client session on the printer (role ``apc`` or
            ``operator``); the caller owns it (connects, reconnects, closes).
        recorder: receives every event (``append_event``).
        batch_id, patient_id, unit: whose batch (written into the job and the events).
        batch_start: UTC time of culture age 0 (default: read the printer's
            ``Clock.BatchStartTime``, as the simulator publishes it).
        wall_clock: Unix seconds for the events' ``wall_time``.

    Per control cycle: :meth:`on_forecast` (decides), then ``await`` :meth:`poll` (acts on
    the printer and follows it); at the harvest :meth:`on_harvest`. After the harvest,
    :meth:`poll` until :attr:`finished`.

    Each poll: on the first, the namespace, the batch start and the job an earlier process
    stored for this batch (adopted); then the policy's calls (``Store``, ``Update``, ...);
    then the machine's and the job's states. Network failures raise no exception: an
    ``unreachable`` alarm once per outage, and the same calls at the next poll. Every event
    becomes an :class:`~controller.records.steps.EventRecord` of kind ``printer`` given to the
    recorder; an event the recorder fails to take is kept and offered again at the next
    call (no record is lost).
    """

    def __init__(
        self,
        config: PrintPolicyConfig,
        client: Client,
        recorder: EventRecorder,
        *,
        batch_id: str,
        patient_id: str,
        unit: str = "",
        batch_start: datetime | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.policy = PrintPolicy(config, batch_id=batch_id, patient_id=patient_id)
        self.config = config
        self.client = client
        self.recorder = recorder
        self.batch_id = batch_id
        self.patient_id = patient_id
        self.unit = unit
        self.batch_start = batch_start
        self.wall_clock = wall_clock
        self._ns: int | None = None
        self._unreachable = False
        self._adoption_checked = False
        self._outbox: list[EventRecord] = []
        #: Every event emitted, oldest first (also those the recorder has taken).
        self.events: list[EventRecord] = []

    # -- what the runtime calls --------------------------------------------------------
    @property
    def job(self) -> JobSpec | None:
        """The job as the printer holds it (None: no job stored)."""
        return self.policy.job

    @property
    def job_state(self) -> str:
        return self.policy.job_state

    @property
    def finished(self) -> bool:
        """The harvest happened and the printer's job has ended or aborted."""
        return self.policy.finished

    @property
    def process_time_h(self) -> float:
        return self.policy.process_time_h

    def on_forecast(self, forecast: HarvestForecast, process_time_h: float) -> None:
        """Decide on the job from this cycle's forecast (acted on at the next :meth:`poll`)."""
        self.policy.on_forecast(forecast, process_time_h)
        self._collect()

    def on_harvest(self, process_time_h: float, harvested_cells: float) -> None:
        """The cells were harvested: the job gets the real cell count and may start
        ``harvest_to_print_h`` later (acted on at the next :meth:`poll`)."""
        self.policy.on_harvest(process_time_h, harvested_cells)
        self._flush()

    async def poll(self, process_time_h: float | None = None) -> None:
        """Bring the printer in line with the desired job and follow its state. Network
        failures raise no exception: an alarm is recorded once per outage and the same
        actions are retried at the next poll."""
        if process_time_h is not None:
            self.policy.set_time(process_time_h)
        try:
            await self._connect()
            await self._reconcile()
            await self._follow()
            if self._unreachable:
                self._unreachable = False
                self._emit("info", "printer reachable again", {"action": "reconnected"})
        except (ua.UaError, OSError, TimeoutError) as exc:
            if not self._unreachable:
                self._unreachable = True
                self._emit(
                    "alarm",
                    f"printer unreachable ({type(exc).__name__}: {exc}); the job is kept and "
                    "retried at every cycle: check the printer's connection",
                    {"action": "unreachable", "error": repr(exc)},
                )
        finally:
            self._flush()

    # -- OPC UA ------------------------------------------------------------------------
    def _node(self, path: str) -> Any:
        return self.client.get_node(ua.NodeId(ua.String(path), ua.Int16(self._ns or 0)))

    async def _connect(self) -> None:
        if self._ns is None:
            self._ns = int(await self.client.get_namespace_index(self.config.namespace_uri))
        if self.batch_start is None:
            value = await self._node("Clock.BatchStartTime").read_value()
            if not isinstance(value, datetime):
                raise ConfigError(
                    "printer coordinator: the printer publishes no Clock.BatchStartTime; "
                    "pass batch_start."
                )
            self.batch_start = value if value.tzinfo else value.replace(tzinfo=UTC)
        if not self._adoption_checked:
            await self._adopt()
            self._adoption_checked = True

    async def _adopt(self) -> None:
        """Hand the newest job an earlier process stored for this batch to the policy."""
        found: list[tuple[int, str]] = []
        for child in await self._node("Printer.JobManagement.JobOrderList").get_children():
            ident = child.nodeid.Identifier
            if not isinstance(ident, str):
                continue
            try:
                job_id = str(await self._node(f"{ident}.JobOrderId").read_value())
            except ua.UaStatusCodeError as exc:
                if exc.code != ua.StatusCodes.BadNodeIdUnknown:
                    raise
                continue  # not a job order
            revision = self.policy.job_revision(job_id)
            if revision is not None:
                found.append((revision, ident))
        if not found:
            return
        revision, ident = max(found)
        values = {
            key: await self._node(f"{ident}.{key}").read_value()
            for key in (
                "JobOrderId",
                "PatientId",
                "BatchId",
                "CellCount",
                "BioinkCellDensity",
                "ScheduledStart",
                "State",
            )
        }
        when = values["ScheduledStart"]
        start_h = None
        if isinstance(when, datetime) and self.batch_start is not None:
            when = when if when.tzinfo else when.replace(tzinfo=UTC)
            start_h = (when - self.batch_start).total_seconds() / 3600.0
        self.policy.adopt(
            revision,
            job_id=str(values["JobOrderId"]),
            patient_id=str(values["PatientId"]),
            batch_id=str(values["BatchId"]),
            cell_count=float(values["CellCount"]),
            bioink_density=float(values["BioinkCellDensity"]),
            scheduled_start_h=start_h,
            state=str(values["State"]),
        )

    async def _call(self, method: str, *args: ua.Variant) -> int:
        control = self._node("Printer.JobManagement.JobOrderControl")
        result = await control.call_method(
            self._node(f"Printer.JobManagement.JobOrderControl.{method}"), *args
        )
        return int(result)

    def _job_args(self, job: JobSpec) -> list[ua.Variant]:
        if self.batch_start is None:  # _connect sets it first
            raise ConfigError("printer coordinator: batch start unknown.")
        when = self.batch_start + timedelta(hours=job.scheduled_start_h)
        return [
            ua.Variant(job.job_id, ua.VariantType.String),
            ua.Variant(job.patient_id, ua.VariantType.String),
            ua.Variant(job.batch_id, ua.VariantType.String),
            ua.Variant(float(job.cell_count), ua.VariantType.Double),
            ua.Variant(float(job.bioink_density), ua.VariantType.Double),
            ua.Variant(when, ua.VariantType.DateTime),
        ]

    async def _execute(self, command: PrinterCommand) -> int | str:
        """Make a job call; the return code, or the refusing status code's name."""
        job = command.job
        try:
            if command.method in ("Store", "StoreAndStart", "Update"):
                return await self._call(command.method, *self._job_args(job))
            return await self._call(command.method, ua.Variant(job.job_id, ua.VariantType.String))
        except ua.UaStatusCodeError as exc:
            if exc.code in (ua.StatusCodes.BadInvalidArgument, ua.StatusCodes.BadTypeMismatch):
                return ua.StatusCode(exc.code).name
            raise

    async def _reconcile(self) -> None:
        """The policy's calls of this round, each answer handed back to it."""
        command = self.policy.next_command()
        while command is not None:
            command = self.policy.command_done(command, await self._execute(command))

    async def _follow(self) -> None:
        """Read the machine's state and the stored job's into the policy."""
        machine = await self._node("Printer.MachineryItemState.CurrentState").read_value()
        machine_text = str(getattr(machine, "Text", machine) or "")
        fault = str(await self._node("Printer.Fault").read_value() or "")
        self.policy.on_machine_state(machine_text, fault)
        job = self.policy.job
        if job is None:
            return
        base = f"Printer.JobManagement.JobOrderList.{re.sub(r'[^A-Za-z0-9_-]', '_', job.job_id)}"
        try:
            state = str(await self._node(f"{base}.State").read_value())
            progress = float(await self._node(f"{base}.Progress").read_value())
        except ua.UaStatusCodeError as exc:
            if exc.code != ua.StatusCodes.BadNodeIdUnknown:
                raise
            self.policy.on_job_missing()
            return
        if state == self.policy.job_state:
            return
        if state not in FINAL_STATES:
            self.policy.on_job_state(state, progress)
            return
        self.policy.on_job_state(
            state,
            progress,
            outcome=str(await self._node(f"{base}.ResultOutcome").read_value()),
            cells_printed=float(await self._node(f"{base}.ResultCellsPrinted").read_value()),
            bioink_volume_ml=float(await self._node(f"{base}.ResultBioinkVolume").read_value()),
        )

    # -- records -----------------------------------------------------------------------
    def _emit(self, severity: str, message: str, data: Mapping[str, Any]) -> None:
        """An event of this side (the policy's come first: they happened before)."""
        self._collect()
        self._record(PrintEvent(severity, message, dict(data), self.policy.process_time_h))

    def _collect(self) -> None:
        for event in self.policy.take_events():
            self._record(event)

    def _record(self, event: PrintEvent) -> None:
        record = EventRecord(
            batch_id=self.batch_id,
            unit=self.unit,
            process_time_h=event.process_time_h,
            wall_time=float(self.wall_clock()),
            kind="printer",
            severity=event.severity,
            message=event.message,
            data=dict(event.data),
        )
        level = {"info": logging.INFO, "warning": logging.WARNING}.get(
            event.severity, logging.ERROR
        )
        log.log(level, "%s: %s", self.batch_id, event.message)
        self.events.append(record)
        self._outbox.append(record)

    def _flush(self) -> None:
        """Hand the pending events to the recorder, oldest first; keep what it refuses."""
        self._collect()
        while self._outbox:
            try:
                self.recorder.append_event(self._outbox[0])
            except Exception as exc:  # any recorder failure: keep the event, try again later
                log.error(
                    "%s: %d printer event(s) not recorded yet (%r); retried at the next call",
                    self.batch_id,
                    len(self._outbox),
                    exc,
                )
                return
            self._outbox.pop(0)

    @property
    def pending_events(self) -> int:
        """Events not yet taken by the recorder."""
        return len(self._outbox)


# -- the printer session -------------------------------------------------------------------------
class PrinterLink(OpcUaConnection):
    """The supervised, secure client session to the printer.

    The plant I/O's :class:`OpcUaConnection` on the ``[printer]`` endpoint: the same
    security settings, trust folder and user, and the same supervision (a lost session is
    dropped and a new one connects with back-off; namespaces are resolved again). It has
    no units, reads nothing at connect and subscribes to nothing: the coordinator polls.
    ``async with PrinterLink(site):`` starts the supervisor and always disconnects.
    """

    def __init__(self, site: SiteConfig) -> None:
        if site.printer is None:
            raise ConfigError(f"{site.path}: the site file has no [printer] table.")
        endpoints = MappingProxyType({"printer": site.printer.endpoint})
        super().__init__(dataclasses.replace(site, endpoints=endpoints), "printer")

    async def _read_static(self) -> None:
        """Nothing to read at connect (the coordinator reads the job nodes itself)."""

    async def _subscribe(self) -> None:
        """No subscription: the coordinator polls the job and machine states."""

    def session(self) -> Client:
        """The connected session now (raises PlantIOError, a ConnectionError, when down)."""
        if not self.connected:
            raise PlantIOError(
                f"{self.endpoint}: printer not connected ({self.last_error or 'connecting'})"
            )
        return self._client()


class _SessionProxy:
    """The client the coordinator holds: each call goes to the link's current session (a
    reconnect brings a new one), and fails at once while the link is down (the coordinator
    records that as the printer being unreachable)."""

    def __init__(self, link: PrinterLink) -> None:
        self.link = link

    async def get_namespace_index(self, uri: str) -> int:
        return int(await self.link.session().get_namespace_index(uri))

    def get_node(self, nodeid: Any) -> Any:
        return self.link.session().get_node(nodeid)


class _Recorder:
    """The coordinator's recorder: the loop's (which keeps and retries what fails)."""

    def __init__(self, record: Any) -> None:
        self.record = record

    def append_event(self, event: EventRecord) -> None:
        self.record(event)


# -- per unit ------------------------------------------------------------------------------------
def attach_printing(loop: Any) -> UnitPrinting | None:
    """The printer coordination of a unit's loop, or None: the plant I/O is not OPC UA with
    a site file, the site has no ``[printer]``, or the control law has no state estimate
    (recipe and rule controllers: no forecast, no print job)."""
    site = getattr(getattr(loop.io, "connection", None), "site", None)
    if not isinstance(site, SiteConfig) or site.printer is None:
        return None
    law = loop.law
    if getattr(law, "estimator", None) is None or not hasattr(law, "last_estimate"):
        log.info(
            "unit=%s: %s has no state estimate: no harvest forecast and no print job",
            loop.io.unit,
            getattr(law, "name", type(law).__name__),
        )
        return None
    try:
        return UnitPrinting(loop, site)
    except Exception:  # the printer must never keep the bioreactor from being controlled
        log.critical(
            "unit=%s printer coordination not started; the unit runs without it",
            loop.io.unit,
            exc_info=True,
        )
        return None


class UnitPrinting:
    """Harvest forecast and print job of one unit (see the module docstring).

    Args:
        loop: the unit's :class:`~controller.runtime.loop.UnitLoop` (its ``io``, ``law``,
            ``settings``, ``summary`` and ``record_event``).
        site: the site file (its ``[printer]`` table and security).
    """

    def __init__(self, loop: Any, site: SiteConfig) -> None:
        if site.printer is None:
            raise ConfigError(f"{site.path}: the site file has no [printer] table.")
        self.loop = loop
        self.site = site
        self.printer = site.printer
        self.where = f"{site.path} [printer]"
        self.config = printer_policy_config(self.printer, self.where)
        self.overrides = printer_forecast_overrides(self.printer, self.where)
        self.harvest_time_h: float | None = loop.settings.harvest_time_h
        self.link = PrinterLink(site)
        self.coordinator: PrinterCoordinator | None = None
        self.forecaster: HarvestForecaster | None = None
        self.last_forecast: HarvestForecast | None = None
        self.forecasts = 0
        self._forecast_s = 0.0
        self.skipped = 0
        self._task: asyncio.Task[None] | None = None
        self._opened = False
        self._opened_at = math.nan
        self._generation = 0
        self._problems: dict[str, str] = {}
        self._next_report_h = -math.inf
        self._supervisor_reported = False

    @property
    def unit(self) -> str:
        return str(self.loop.io.unit)

    # -- records ---------------------------------------------------------------------------
    def _event(self, severity: str, message: str, time_h: float, **data: Any) -> None:
        level = {"info": logging.INFO, "warning": logging.WARNING}.get(severity, logging.ERROR)
        log.log(level, "unit=%s printer: %s", self.unit, message)
        self.loop.record_event(
            EventRecord(
                batch_id=self.loop.summary.batch_id,
                unit=self.unit,
                process_time_h=time_h,
                wall_time=time.time(),
                kind="printer",
                severity=severity,
                message=message,
                data=data,
            )
        )

    def _problem(self, key: str, message: str, time_h: float, severity: str = "warning") -> None:
        """Record a problem once while it lasts (``_cleared`` reports its end)."""
        if self._problems.get(key) == message:
            log.debug("unit=%s printer: %s (again)", self.unit, message)
            return
        self._problems[key] = message
        self._event(severity, message, time_h, action=f"{key}_failed")

    def _cleared(self, key: str, message: str, time_h: float) -> None:
        if self._problems.pop(key, None) is not None:
            self._event("info", message, time_h, action=f"{key}_recovered")

    # -- per cycle -------------------------------------------------------------------------
    async def after_cycle(
        self, time_h: float, stepped: bool, setpoints: Mapping[str, float], budget_s: float
    ) -> None:
        """The cycle's printer work (forecast if the law stepped, then poll), awaited for at
        most ``budget_s`` wall seconds; beyond that it continues in the background and the
        following cycles skip theirs until it ends."""
        if self._task is not None and not self._task.done():
            self.skipped += 1
            log.debug("unit=%s printer work of an earlier cycle still runs: skipped", self.unit)
            return
        snapshot = None
        if stepped:
            estimate = getattr(self.loop.law, "last_estimate", None)
            if estimate is not None:
                snapshot = (estimate, getattr(self.loop.law, "last_result", None), dict(setpoints))
        self._task = asyncio.create_task(
            self._work(time_h, snapshot), name=f"printer-{self.unit}-{time_h:g}"
        )
        self._task.add_done_callback(self._work_done)
        await asyncio.wait({self._task}, timeout=max(budget_s, 0.01))

    def _work_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("unit=%s printer work failed", self.unit, exc_info=task.exception())

    async def _work(
        self, time_h: float, snapshot: tuple[Any, Any, dict[str, float]] | None
    ) -> None:
        try:
            coordinator = await self._coordinator(time_h)
            if coordinator is None:
                return
            if snapshot is not None:
                forecast = await self._forecast(time_h, *snapshot)
                if forecast is not None:
                    try:
                        coordinator.on_forecast(forecast, time_h)
                    except ModelError as exc:
                        self._problem("forecast", f"forecast not usable: {exc}", time_h)
            await self._poll(time_h)
            self._cleared("coordination", "printer coordination working again", time_h)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never into the control loop: record and go on
            log.exception("unit=%s printer coordination failed", self.unit)
            self._problem(
                "coordination",
                f"printer coordination failed ({type(exc).__name__}: {exc}); control goes on, "
                "the job is retried at the next cycle",
                time_h,
                "alarm",
            )

    async def _coordinator(self, time_h: float) -> PrinterCoordinator | None:
        """The coordinator, created once the batch is known (the link started with it)."""
        if not self._opened:
            self._opened = True
            self._opened_at = time.monotonic()
            await self.link.__aenter__()
        supervisor = self.link.supervisor
        if supervisor is not None and supervisor.done() and not self._supervisor_reported:
            self._supervisor_reported = True
            error = None if supervisor.cancelled() else supervisor.exception()
            self._event(
                "alarm",
                f"printer connection stopped for good ({error!r}); no print job is handled: "
                f"fix {self.where} and restart the controller",
                time_h,
                action="link_failed",
            )
        if self.coordinator is not None:
            return self.coordinator
        batch = str(self.loop.summary.batch_id or "")
        if not batch:
            return None
        clock = getattr(getattr(self.loop.io, "connection", None), "clock", None)
        self.coordinator = PrinterCoordinator(
            self.config,
            cast(Any, _SessionProxy(self.link)),
            _Recorder(self.loop.record_event),
            batch_id=batch,
            patient_id=await self._patient_id(batch, time_h),
            unit=self.unit,
            batch_start=getattr(clock, "batch_start", None),
        )
        return self.coordinator

    async def _patient_id(self, batch: str, time_h: float) -> str:
        template = self.printer.patient_id
        if template is None:
            return batch
        try:
            ref = parse_node_ref(template, f"{self.where} patient_id", unit=self.unit)
            value = await asyncio.wait_for(
                self.loop.io.connection.read(ref), self.site.timing.request_timeout_s
            )
        except (PlantIOError, ConfigError, OSError, TimeoutError) as exc:
            value, problem = None, f"{exc}"
        else:
            problem = f"{value!r} is not a patient id"
        if isinstance(value, str) and value.strip():
            return value.strip()
        self._event(
            "warning",
            f"patient id not read from the bioreactor ({problem}); the print job carries the "
            f"batch id {batch} as patient id",
            time_h,
            action="patient_id",
        )
        return batch

    # -- the forecast ----------------------------------------------------------------------
    def _build_forecaster(self) -> HarvestForecaster:
        estimator = self.loop.law.estimator
        config = dataclasses.replace(
            ForecastConfig.from_estimator(estimator.config), **self.overrides
        )
        return HarvestForecaster(
            estimator.model, config, factor_names=tuple(estimator.factor_names)
        )

    async def _forecast(
        self, time_h: float, estimate: Any, result: Any, setpoints: dict[str, float]
    ) -> HarvestForecast | None:
        try:
            if self.forecaster is None:
                self.forecaster = await asyncio.to_thread(self._build_forecaster)
            try:
                plan = InputPlan.from_mpc(result) if result is not None else None
            except ModelError:
                plan = None  # a failed solve has no plan: hold what was applied
            if plan is None:
                plan = InputPlan.hold(setpoints, time_h)
            forecast = await asyncio.to_thread(
                self.forecaster.forecast, estimate, plan=plan, harvest_time_h=self.harvest_time_h
            )
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # ModelError, ConfigError, numerical failures
            self._problem(
                "forecast",
                f"harvest forecast failed ({type(exc).__name__}: {exc}); the job is kept as "
                "it is and still released at the harvest",
                time_h,
            )
            return None
        self.forecasts += 1
        self._forecast_s += forecast.elapsed_s
        self.last_forecast = forecast
        self._cleared("forecast", "harvest forecast available again", time_h)
        if time_h >= self._next_report_h:
            self._next_report_h = time_h + FORECAST_EVENT_EVERY_H
            self._event(
                "info",
                describe(forecast),
                time_h,
                action="forecast",
                forecast=forecast.summary(),
                elapsed_s=forecast.elapsed_s,
            )
        return forecast

    # -- the printer -----------------------------------------------------------------------
    async def _poll(self, time_h: float) -> None:
        coordinator = self.coordinator
        if coordinator is None:
            return
        link = self.link
        if link.generation == 0 and not link.connected:
            # the first connection is still being made: no unreachable alarm before it had
            # a fair chance (three request time-outs)
            grace = 3.0 * self.site.timing.request_timeout_s
            if time.monotonic() - self._opened_at < grace:
                return
        if link.generation != self._generation:
            self._generation = link.generation
            # a new session may number the namespaces differently: resolve again
            coordinator._ns = None
        connected = link.connected
        before = len(coordinator.events)
        await coordinator.poll(time_h)
        failed = any(e.data.get("action") == "unreachable" for e in coordinator.events[before:])
        if connected and failed:
            link.lost("a printer request failed")  # the supervisor reconnects

    async def finish(self, ended: str, stop: asyncio.Event) -> None:
        """At the end of the unit's loop: at a harvest, release the job with the harvested
        cells and follow it until it ends (bounded); otherwise leave the printer as it is."""
        try:
            await self._settle()
            st = self.loop.io.status()
            t = _process_time(st)
            coordinator = self.coordinator
            if ended != "harvest":
                if coordinator is not None and coordinator.job is not None:
                    self._event(
                        "warning",
                        f"controller {ended} before the harvest: job {coordinator.job.job_id} "
                        f"stays on the printer as {coordinator.job_state or 'stored'}",
                        t,
                        action="left",
                    )
                return
            coordinator = coordinator or await self._coordinator(t)
            if coordinator is None:
                return
            cells, source = self._harvested_cells()
            if cells is None:
                self._event(
                    "alarm",
                    f"no viable-cell figure at the harvest ({source}): the print job is not "
                    "released; release it on the printer with the counted cells",
                    t,
                    action="harvest_failed",
                )
                return
            coordinator.on_harvest(t, cells)
            await self._follow(coordinator, t, stop, source)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # never into the control loop
            log.exception("unit=%s printer hand-off failed", self.unit)
            self._event(
                "alarm",
                f"printer hand-off at the end of the batch failed ({type(exc).__name__}: "
                f"{exc}): check the job on the printer",
                _process_time(self.loop.io.status()),
                action="harvest_failed",
            )
        finally:
            await self.close()

    async def _settle(self) -> None:
        """Let the last cycle's printer work end (it may be in a network call)."""
        task = self._task
        if task is not None and not task.done():
            await asyncio.wait({task}, timeout=2.0 * self.site.timing.request_timeout_s)
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _harvested_cells(self) -> tuple[float | None, str]:
        """Total viable cells at the harvest, 1e9 cells: the last online viable-cell density
        (1e6 cells/mL = 1e9 cells/L) times the estimated volume (L); the estimate's own
        viable cells when no good reading is there."""
        estimate = getattr(self.loop.law, "last_estimate", None)
        if estimate is None:
            return None, "the law made no estimate"
        volume = float(estimate.state.get("volume", math.nan))
        readings = [
            s
            for s in self.loop.io.inputs().values()
            if s.variable == "viable_cells" and s.source == "online" and s.quality == "good"
        ]
        if readings and math.isfinite(volume) and volume > 0:
            latest = max(readings, key=lambda s: s.sample_time_h)
            if math.isfinite(latest.value) and latest.value > 0:
                return latest.value * volume, (
                    f"viable-cell density {latest.value:.3g}e6/mL at {latest.sample_time_h:.1f} h "
                    f"x estimated volume {volume:.3g} L"
                )
        cells = float(estimate.state.get("viable_cells", math.nan)) * volume
        if math.isfinite(cells) and cells > 0:
            return cells, f"estimate at {estimate.time_h:.1f} h"
        return None, "no finite viable cells and volume"

    async def _follow(
        self, coordinator: PrinterCoordinator, harvest_h: float, stop: asyncio.Event, source: str
    ) -> None:
        """Poll until the job ended or aborted, ``finish_within_h`` process hours at most
        (and as many wall seconds as that takes at the clock's speed, plus a minute)."""
        within = self.printer.finish_within_h
        st = self.loop.io.status()
        speed = st.speed if st.speed > 0 else 1.0
        wall_end = time.monotonic() + within * 3600.0 / speed + 60.0
        interval = min(max(0.25 * self.loop.settings.period_h * 3600.0 / speed, 0.2), 10.0)
        log.info(
            "unit=%s harvest at %.2f h (%s): following the print job for up to %g h",
            self.unit,
            harvest_h,
            source,
            within,
        )
        t = harvest_h
        while True:
            t = max(t, _process_time(self.loop.io.status()))
            await self._poll(t)
            if coordinator.finished:
                return
            if stop.is_set():
                self._event(
                    "warning",
                    "controller stopping while the print job is "
                    f"{coordinator.job_state or 'not stored'}: follow it on the printer",
                    t,
                    action="left",
                )
                return
            if t > harvest_h + within or time.monotonic() > wall_end:
                job = coordinator.job
                self._event(
                    "alarm",
                    f"print job {job.job_id if job else '(none)'} not finished {within:g} h after "
                    f"the harvest (state {coordinator.job_state or 'unknown'}): follow it on the "
                    "printer",
                    t,
                    action="timeout",
                )
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), interval)

    async def close(self) -> None:
        """Stop the printer work and disconnect (idempotent)."""
        if self._opened:
            log.info(
                "unit=%s printer: %d forecasts (%.3g s each on average), %d cycles skipped "
                "(earlier printer work still running), job %s",
                self.unit,
                self.forecasts,
                self._forecast_s / max(self.forecasts, 1),
                self.skipped,
                self.job_state or "none",
            )
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._opened:
            self._opened = False
            await self.link.close()

    @property
    def job_state(self) -> str:
        return self.coordinator.job_state if self.coordinator is not None else ""

    @property
    def finished(self) -> bool:
        return self.coordinator is not None and self.coordinator.job_state in FINAL_STATES


def _process_time(st: Any) -> float:
    """Process time now: the plant's clock, extrapolated while it is not published."""
    if st.connected and math.isfinite(st.clock_h):
        return float(st.clock_h)
    return float(st.now_h) if math.isfinite(st.now_h) else math.nan


def describe(forecast: HarvestForecast) -> str:
    """One line for the timeline: when the dose is reached and what a harvest yields."""
    pct = round(100 * forecast.level)
    if math.isfinite(forecast.dose_time_h):
        high = (
            f"{forecast.dose_time_high_h:.0f} h"
            if math.isfinite(forecast.dose_time_high_h)
            else "beyond the horizon"
        )
        dose = (
            f"dose {forecast.dose_cells:.3g}e9 cells at {forecast.dose_time_h:.0f} h "
            f"({pct} % interval {forecast.dose_time_low_h:.0f} h - {high})"
        )
    else:
        dose = f"dose {forecast.dose_cells:.3g}e9 cells not reached within the horizon (median)"
    return (
        f"harvest forecast: {dose}; P(dose by the {forecast.harvest_time_h:g} h harvest) "
        f"{forecast.probability_dose_by_harvest:.2f}; {forecast.harvest_cells:.3g}e9 viable "
        f"cells at the harvest ({forecast.harvest_cells_low:.3g}-"
        f"{forecast.harvest_cells_high:.3g})"
    )

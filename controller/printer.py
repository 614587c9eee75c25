"""Printer coordination: the harvest forecast becomes a print job on the co-located
bioprinter over OPC UA (job management of OPC 40001-3 / ISA-95 job control, as the printer
of docs/opcua.md exposes it), and the job follows the batch until the print has ended.

The coordinator keeps a *desired* job (from the forecasts and the harvest) and reconciles
the printer with it in :meth:`PrinterCoordinator.poll`:

- forecast confident (``P(dose by the scheduled harvest) >= schedule_probability``):
  ``Store`` a job (NotAllowedToStart) with the scheduled start (harvest +
  ``harvest_to_print_h``), the expected printed cells (``printed_fraction`` of the
  forecast harvest yield, at most ``max_printed_cells``) and the bioink cell density;
- forecast moved (printed cells by more than ``cell_tolerance``, relative, or the start by
  more than ``start_tolerance_h``): ``Update`` the job; confidence lost
  (``P < revoke_probability``): ``Cancel`` it (revoked);
- harvest (:meth:`on_harvest` with the harvested cells): ``Update`` to the real cell count
  and ``Start`` (AllowedToStart: the printer runs it from its scheduled start);
- every poll reads the job's state and the machine's; Aborted, a rejected job, a
  refused call and a machine fault raise an alarm; Ended reports the cells printed;
- first poll of a coordinator (a restarted controller): the printer's job list is read and
  the newest job this batch stored (id ``<job_prefix>-<batch>-<n>``) is *adopted* with its
  parameters and state: it is kept (not stored twice) until a forecast or the harvest
  moves it, and new job ids continue after ``n``. A job of this batch id for another
  patient is never adopted (alarm).

Every action, decision and state change becomes an :class:`~controller.records.EventRecord`
of kind ``printer`` given to the recorder; an event the recorder fails to take is kept and
offered again at the next call (no record is lost). A rejected job is not sent again with
the same parameters; an unreachable printer is retried at every poll.

Numbers: cells in 1e9 cells, bioink cell density in 1e6 cells/mL, times as culture age in
hours (the printer receives ``ScheduledStart = batch start + culture age``).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Protocol

from asyncua import Client, ua

from controller.forecast import HarvestForecast
from controller.records import EventRecord
from plant_models.config import check_keys, load_toml
from plant_models.errors import ConfigError, ModelError

__all__ = [
    "RETURN_CODES",
    "EventRecorder",
    "JobSpec",
    "PrinterConfig",
    "PrinterCoordinator",
    "load_printer_config",
]

log = logging.getLogger(__name__)

#: ISA-95 job-control return values of the printer's job methods.
RETURN_CODES = {
    0: "ok",
    1: "unknown job order id",
    2: "invalid job order state for this method",
    4: "unable to accept the job order (invalid parameters or duplicate id)",
    8: "caller not allowed (check the user's role: apc or operator)",
}
#: Job states after which nothing more happens to a job.
FINAL_STATES = ("Ended", "Aborted")
#: Job states in which the job is not yet executed (it may be updated or cancelled).
PREPARED_STATES = ("NotAllowedToStart", "AllowedToStart")


class EventRecorder(Protocol):
    """Where the coordinator's events go (the historian)."""

    def append_event(self, event: EventRecord) -> None: ...


@dataclasses.dataclass(frozen=True)
class PrinterConfig:
    """Printer coordination settings (``[printer]`` table of a TOML file).

    Attributes:
        schedule_probability: store a job once the forecast gives at least this
            probability of the dose by the scheduled harvest.
        revoke_probability: cancel a stored job when the probability falls below this
            (below ``schedule_probability``: hysteresis, no flapping).
        cell_tolerance: update the job when the expected printed cells move by more than
            this fraction.
        start_tolerance_h: update the job when its start moves by more than this, h.
        bioink_cell_density: cells per mL of bioink, 1e6 cells/mL.
        printed_fraction: fraction of the harvested viable cells that goes to the printer.
        max_printed_cells: at most this many cells per job, 1e9 cells (the cartridge).
        harvest_to_print_h: from harvest to the start of the print (wash, formulation), h.
        job_prefix: job ids are ``<prefix>-<batch id>-<n>``.
        namespace_uri: namespace of the printer's job nodes and methods.
    """

    schedule_probability: float = 0.9
    revoke_probability: float = 0.5
    cell_tolerance: float = 0.15
    start_tolerance_h: float = 2.0
    bioink_cell_density: float = 20.0
    printed_fraction: float = 0.02
    max_printed_cells: float = 0.6
    harvest_to_print_h: float = 2.0
    job_prefix: str = "PRINT"
    namespace_uri: str = "urn:hmpc:sim"

    def __post_init__(self) -> None:
        ranges: dict[str, tuple[float, float, bool]] = {
            # name: (low, high, low exclusive)
            "schedule_probability": (0.0, 1.0, True),
            "revoke_probability": (0.0, 1.0, False),
            "cell_tolerance": (0.0, 10.0, True),
            "start_tolerance_h": (0.0, 240.0, True),
            "bioink_cell_density": (0.0, 1000.0, True),
            "printed_fraction": (0.0, 1.0, True),
            "max_printed_cells": (0.0, 1e4, True),
            "harvest_to_print_h": (0.0, 240.0, False),
        }
        for name, (low, high, open_low) in ranges.items():
            value = getattr(self, name)
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            ok = ok and math.isfinite(value) and (value > low if open_low else value >= low)
            if not (ok and value <= high):
                bracket = "(" if open_low else "["
                raise ConfigError(
                    f"printer config: {name} = {value!r} is outside {bracket}{low:g}, {high:g}]."
                )
        if self.revoke_probability >= self.schedule_probability:
            raise ConfigError(
                f"printer config: revoke_probability ({self.revoke_probability}) must be below "
                f"schedule_probability ({self.schedule_probability}), or jobs would flap."
            )
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,32}", self.job_prefix):
            raise ConfigError(
                f"printer config: job_prefix {self.job_prefix!r} must be 1-32 letters, digits, "
                "'-' or '_'."
            )
        if not self.namespace_uri.strip():
            raise ConfigError("printer config: namespace_uri must not be empty.")

    def printed_cells(self, harvest_cells: float) -> float:
        """Cells sent to the printer for a harvest of ``harvest_cells``, 1e9 cells."""
        return min(self.printed_fraction * harvest_cells, self.max_printed_cells)


_FIELDS = {f.name: f for f in dataclasses.fields(PrinterConfig)}


def typed_settings(section: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The values of a printer settings table with their types checked: ``job_prefix`` and
    ``namespace_uri`` strings, every other key a number (as float).

    Raises:
        ConfigError: a value of the wrong type (the message names ``where`` and the key).
    """
    values: dict[str, Any] = {}
    for key, value in section.items():
        at = f"{where} {key}"
        if key in ("job_prefix", "namespace_uri"):
            if not isinstance(value, str):
                raise ConfigError(f"{at}: expected a string, got {value!r}.")
        elif isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{at}: expected a number, got {value!r}.")
        else:
            value = float(value)
        values[key] = value
    return values


def load_printer_config(path: str | Path) -> PrinterConfig:
    """Load the ``[printer]`` table of a TOML file (other tables are left to their owners).

    Raises:
        ConfigError: unknown key (with a suggestion), wrong type, value out of range; the
        message names the file and the key.
    """
    where = str(path)
    data = load_toml(path)
    section = data.get("printer")
    if not isinstance(section, Mapping):
        raise ConfigError(f"{where}: a [printer] table is needed.")
    check_keys(section, sorted(_FIELDS), f"{where} [printer]")
    values = typed_settings(section, f"{where} [printer]")
    try:
        return PrinterConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where} [printer]: {exc}") from None


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A print job as the coordinator wants it on the printer.

    Attributes:
        job_id: unique job order id.
        patient_id, batch_id: whose cells.
        cell_count: cells to print, 1e9 cells.
        bioink_density: 1e6 cells/mL.
        scheduled_start_h: culture age at which the printer may start, h.
        start: allowed to start (after the harvest) rather than only stored.
    """

    job_id: str
    patient_id: str
    batch_id: str
    cell_count: float
    bioink_density: float
    scheduled_start_h: float
    start: bool = False

    def parameters(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "patient_id": self.patient_id,
            "batch_id": self.batch_id,
            "cell_count": self.cell_count,
            "bioink_cell_density": self.bioink_density,
            "scheduled_start_h": self.scheduled_start_h,
            "bioink_volume_ml": 1e3 * self.cell_count / self.bioink_density,
        }

    def same_parameters(self, other: JobSpec) -> bool:
        return (
            self.job_id == other.job_id
            and self.patient_id == other.patient_id
            and self.batch_id == other.batch_id
            and self.cell_count == other.cell_count
            and self.bioink_density == other.bioink_density
            and self.scheduled_start_h == other.scheduled_start_h
        )


class PrinterCoordinator:
    """Keeps the printer's job in step with one batch.

    Args:
        config: coordination settings.
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
    """

    def __init__(
        self,
        config: PrinterConfig,
        client: Client,
        recorder: EventRecorder,
        *,
        batch_id: str,
        patient_id: str,
        unit: str = "",
        batch_start: datetime | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        if not batch_id.strip() or not patient_id.strip():
            raise ConfigError("printer coordinator: batch_id and patient_id must not be empty.")
        self.config = config
        self.client = client
        self.recorder = recorder
        self.batch_id = batch_id
        self.patient_id = patient_id
        self.unit = unit
        self.batch_start = batch_start
        self.wall_clock = wall_clock
        self.process_time_h = math.nan
        self._ns: int | None = None
        self._desired: JobSpec | None = None
        self._stored: JobSpec | None = None
        self._rejected: JobSpec | None = None
        self._why: dict[str, Any] = {}
        self._revision = 0
        self._harvested = False
        self.job_state = ""
        self.machine_state = ""
        self.fault = ""
        self._unreachable = False
        self._adoption_checked = False
        self._outbox: list[EventRecord] = []
        #: Every event emitted, oldest first (also those the recorder has taken).
        self.events: list[EventRecord] = []

    # -- what the runtime calls --------------------------------------------------------
    @property
    def job(self) -> JobSpec | None:
        """The job as the printer holds it (None: no job stored)."""
        return self._stored

    @property
    def finished(self) -> bool:
        """The harvest happened and the printer's job has ended or aborted."""
        return self._harvested and self.job_state in FINAL_STATES

    def on_forecast(self, forecast: HarvestForecast, process_time_h: float) -> None:
        """Decide on the job from this cycle's forecast (acted on at the next :meth:`poll`)."""
        self._set_time(process_time_h)
        if self._harvested or self.job_state in FINAL_STATES:
            return
        p = float(forecast.probability_dose_by_harvest)
        if not (math.isfinite(p) and 0.0 <= p <= 1.0):
            raise ModelError(f"printer coordinator: forecast probability {p!r} is not in [0, 1].")
        cells = self.config.printed_cells(float(forecast.harvest_cells))
        start = float(forecast.harvest_time_h) + self.config.harvest_to_print_h
        why = {"forecast": forecast.summary()}
        desired = self._desired
        if desired is None:
            if p >= self.config.schedule_probability:
                self._revision += 1
                self._desired = JobSpec(
                    job_id=f"{self.config.job_prefix}-{self.batch_id}-{self._revision}",
                    patient_id=self.patient_id,
                    batch_id=self.batch_id,
                    cell_count=cells,
                    bioink_density=self.config.bioink_cell_density,
                    scheduled_start_h=start,
                )
                self._why = {
                    **why,
                    "reason": f"P(dose by harvest) {p:.2f} >= {self.config.schedule_probability}",
                }
            return
        if p < self.config.revoke_probability:
            self._desired = None
            self._why = {
                **why,
                "reason": f"P(dose by harvest) {p:.2f} < {self.config.revoke_probability}",
            }
            return
        if self._moved(desired, cells, start):
            self._desired = dataclasses.replace(desired, cell_count=cells, scheduled_start_h=start)
            self._why = {
                **why,
                "reason": "forecast moved beyond tolerance "
                f"(printed cells {desired.cell_count:.3g} -> {cells:.3g} 1e9, start "
                f"{desired.scheduled_start_h:.1f} -> {start:.1f} h)",
            }

    def _moved(self, job: JobSpec, cells: float, start_h: float) -> bool:
        """Printed cells or the start differ from ``job``'s beyond the tolerances."""
        return (
            abs(cells - job.cell_count) > self.config.cell_tolerance * job.cell_count
            or abs(start_h - job.scheduled_start_h) > self.config.start_tolerance_h
        )

    def on_harvest(self, process_time_h: float, harvested_cells: float) -> None:
        """The cells were harvested: the job gets the real cell count and may start
        ``harvest_to_print_h`` later (acted on at the next :meth:`poll`)."""
        self._set_time(process_time_h)
        if not (math.isfinite(harvested_cells) and harvested_cells > 0):
            raise ModelError(
                f"printer coordinator: harvested cells {harvested_cells!r} must be positive "
                "(1e9 cells); pass the measured total viable cells of the harvest."
            )
        if self._harvested:
            raise ModelError("printer coordinator: the batch was already harvested.")
        self._harvested = True
        cells = self.config.printed_cells(harvested_cells)
        start = process_time_h + self.config.harvest_to_print_h
        desired = self._desired
        if desired is None:
            self._revision += 1
            desired = JobSpec(
                job_id=f"{self.config.job_prefix}-{self.batch_id}-{self._revision}",
                patient_id=self.patient_id,
                batch_id=self.batch_id,
                cell_count=cells,
                bioink_density=self.config.bioink_cell_density,
                scheduled_start_h=start,
            )
        self._desired = dataclasses.replace(
            desired, cell_count=cells, scheduled_start_h=start, start=True
        )
        self._why = {"reason": "harvest", "harvested_cells": harvested_cells}
        self._emit(
            "info",
            f"harvest of {harvested_cells:.3g}e9 viable cells: print job to start at "
            f"{start:.1f} h with {cells:.3g}e9 cells",
            {
                "action": "harvest",
                "harvested_cells": harvested_cells,
                "job": self._desired.parameters(),
            },
        )
        self._flush()

    async def poll(self, process_time_h: float | None = None) -> None:
        """Bring the printer in line with the desired job and follow its state. Network
        failures raise no exception: an alarm is recorded once per outage and the same
        actions are retried at the next poll."""
        if process_time_h is not None:
            self._set_time(process_time_h)
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
        """Take over the newest job an earlier process stored for this batch."""
        pattern = re.compile(
            rf"{re.escape(self.config.job_prefix)}-{re.escape(self.batch_id)}-(\d+)"
        )
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
            match = pattern.fullmatch(job_id)
            if match is not None:
                found.append((int(match.group(1)), ident))
        if not found:
            return
        revision, ident = max(found)
        desired = self._desired  # decided before this first poll (ids numbered from 1)
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
        job_id, state = str(values["JobOrderId"]), str(values["State"])
        if str(values["PatientId"]) != self.patient_id or str(values["BatchId"]) != self.batch_id:
            self._revision = revision
            if desired is not None:  # a new id after the printer's newest
                self._revision += 1
                self._desired = dataclasses.replace(
                    desired, job_id=f"{self.config.job_prefix}-{self.batch_id}-{self._revision}"
                )
            self._emit(
                "alarm",
                f"printer holds job {job_id} for patient {values['PatientId']!r}, batch "
                f"{values['BatchId']!r}, not {self.patient_id!r} / {self.batch_id!r}: it is not "
                "taken over (new jobs get new ids); check the job on the printer",
                {"action": "adopt_refused", "job_id": job_id, "state": state},
            )
            return
        when = values["ScheduledStart"]
        if not isinstance(when, datetime) or self.batch_start is None:
            raise ConfigError(f"printer coordinator: job {job_id} has no ScheduledStart time.")
        when = when if when.tzinfo else when.replace(tzinfo=UTC)
        job = JobSpec(
            job_id=job_id,
            patient_id=self.patient_id,
            batch_id=self.batch_id,
            cell_count=float(values["CellCount"]),
            bioink_density=float(values["BioinkCellDensity"]),
            scheduled_start_h=(when - self.batch_start).total_seconds() / 3600.0,
            start=state != "NotAllowedToStart",
        )
        self._stored = job
        self.job_state = state
        # A decision taken before this first poll applies to the adopted job (within the
        # tolerances the job is kept as the printer holds it).
        if desired is None or (
            desired.start == job.start
            and not self._moved(job, desired.cell_count, desired.scheduled_start_h)
        ):
            self._desired = job
        else:
            self._desired = dataclasses.replace(desired, job_id=job_id)
        self._revision = revision
        self._emit(
            "info",
            f"print job {job_id} taken over from an earlier controller process ({state}: "
            f"{job.cell_count:.3g}e9 cells from {job.scheduled_start_h:.1f} h)",
            {"action": "adopt", "job": job.parameters(), "state": state},
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

    async def _job_call(self, method: str, job: JobSpec) -> int | str:
        """Call a job method; the return code, or the refusing status code's name."""
        try:
            if method in ("Store", "StoreAndStart", "Update"):
                return await self._call(method, *self._job_args(job))
            return await self._call(method, ua.Variant(job.job_id, ua.VariantType.String))
        except ua.UaStatusCodeError as exc:
            if exc.code in (ua.StatusCodes.BadInvalidArgument, ua.StatusCodes.BadTypeMismatch):
                return ua.StatusCode(exc.code).name
            raise

    # -- reconciliation ----------------------------------------------------------------
    async def _reconcile(self) -> None:
        desired, stored = self._desired, self._stored
        if stored is not None and self.job_state in FINAL_STATES:
            return
        if desired is None:
            if stored is not None:
                await self._revoke(stored)
            return
        if stored is None:
            if self._rejected is not None and desired.same_parameters(self._rejected):
                return
            await self._store(desired)
            return
        if not desired.same_parameters(stored):
            if self._rejected is not None and desired.same_parameters(self._rejected):
                return
            if not await self._update(stored, desired):
                return
            stored = self._stored
        if desired.start and stored is not None and not stored.start:
            await self._start(stored)

    async def _store(self, job: JobSpec) -> None:
        method = "StoreAndStart" if job.start else "Store"
        code = await self._job_call(method, job)
        data = {"action": method, "job": job.parameters(), "return_code": code, **self._why}
        if code == 0:
            self._stored = job
            self._rejected = None
            self.job_state = "AllowedToStart" if job.start else "NotAllowedToStart"
            self._emit(
                "info",
                f"print job {job.job_id} {'stored and started' if job.start else 'scheduled'}: "
                f"{job.cell_count:.3g}e9 cells at {job.bioink_density:g}e6 cells/mL from "
                f"{job.scheduled_start_h:.1f} h",
                data,
            )
            return
        self._rejected = job
        if code == 4:
            advice = (
                "check bioink_cell_density, printed_fraction and max_printed_cells against "
                "the printer's limits (cartridge volume, cell count)"
            )
        elif code == 8:
            advice = "give the controller's printer user the apc or operator role"
        else:
            advice = "check the job on the printer"
        self._emit(
            "alarm",
            f"printer rejected job {job.job_id} ({_meaning(code)}); nothing is scheduled: {advice}",
            data,
        )

    async def _update(self, stored: JobSpec, job: JobSpec) -> bool:
        code = await self._job_call("Update", job)
        data = {
            "action": "Update",
            "job": job.parameters(),
            "previous": stored.parameters(),
            "return_code": code,
            **self._why,
        }
        if code == 0:
            self._stored = dataclasses.replace(job, start=stored.start)
            self._rejected = None
            self._emit(
                "info",
                f"print job {job.job_id} rescheduled: {job.cell_count:.3g}e9 cells from "
                f"{job.scheduled_start_h:.1f} h (was {stored.cell_count:.3g}e9 from "
                f"{stored.scheduled_start_h:.1f} h)",
                data,
            )
            return True
        if code == 1:
            self._stored = None
            self.job_state = ""
            self._emit(
                "alarm",
                f"printer no longer knows job {job.job_id}; it will be stored again",
                data,
            )
            return False
        self._rejected = job
        self._emit(
            "alarm",
            f"printer refused to update job {job.job_id} ({_meaning(code)}); it keeps "
            f"{stored.cell_count:.3g}e9 cells from {stored.scheduled_start_h:.1f} h and is "
            "not started: check the job on the printer",
            data,
        )
        return False

    async def _start(self, job: JobSpec) -> None:
        code = await self._job_call("Start", job)
        data = {"action": "Start", "job": job.parameters(), "return_code": code, **self._why}
        if code == 0:
            self._stored = dataclasses.replace(job, start=True)
            self.job_state = "AllowedToStart"
            self._emit(
                "info",
                f"print job {job.job_id} released: the printer starts it at "
                f"{job.scheduled_start_h:.1f} h",
                data,
            )
            return
        self._rejected = dataclasses.replace(job, start=True)
        self._desired = self._stored  # do not retry a start the printer refused
        self._emit(
            "alarm",
            f"printer refused to start job {job.job_id} ({_meaning(code)}): start it by hand "
            "or abort it",
            data,
        )

    async def _revoke(self, job: JobSpec) -> None:
        code = await self._job_call("Cancel", job)
        data = {"action": "Cancel", "job": job.parameters(), "return_code": code, **self._why}
        if code in (0, 1):
            self._stored = None
            self._rejected = None
            self.job_state = ""
            self._emit(
                "warning",
                f"print job {job.job_id} revoked: {self._why.get('reason', 'forecast')}",
                data,
            )
            return
        self._desired = job  # the printer keeps it: follow it instead of retrying
        self._emit(
            "alarm",
            f"printer refused to revoke job {job.job_id} ({_meaning(code)}; job "
            f"{self.job_state or 'state unknown'}): stop it on the printer if needed",
            data,
        )

    # -- following the printer ---------------------------------------------------------
    async def _follow(self) -> None:
        machine = await self._node("Printer.MachineryItemState.CurrentState").read_value()
        machine_text = str(getattr(machine, "Text", machine) or "")
        fault = str(await self._node("Printer.Fault").read_value() or "")
        if machine_text != self.machine_state or fault != self.fault:
            previous = self.machine_state
            self.machine_state, self.fault = machine_text, fault
            if machine_text == "OutOfService" or fault:
                self._emit(
                    "alarm",
                    f"printer out of service: {fault or 'no reason given'}; clear the fault "
                    "on the printer before the harvest",
                    {"action": "machine_state", "state": machine_text, "fault": fault},
                )
            elif previous:
                self._emit(
                    "info",
                    f"printer {previous} -> {machine_text}",
                    {"action": "machine_state", "state": machine_text, "previous": previous},
                )
        job = self._stored
        if job is None:
            return
        base = f"Printer.JobManagement.JobOrderList.{re.sub(r'[^A-Za-z0-9_-]', '_', job.job_id)}"
        try:
            state = str(await self._node(f"{base}.State").read_value())
            progress = float(await self._node(f"{base}.Progress").read_value())
        except ua.UaStatusCodeError as exc:
            if exc.code != ua.StatusCodes.BadNodeIdUnknown:
                raise
            self._stored = None
            self.job_state = ""
            self._emit(
                "alarm",
                f"job {job.job_id} is no longer on the printer (removed by hand?); "
                + ("it is stored again" if self._desired is not None else "none is needed now"),
                {"action": "job_missing", "job": job.parameters()},
            )
            return
        if state == self.job_state:
            return
        previous, self.job_state = self.job_state, state
        data: dict[str, Any] = {
            "action": "job_state",
            "job_id": job.job_id,
            "state": state,
            "previous": previous,
            "progress": progress,
        }
        if state in FINAL_STATES:
            data["outcome"] = str(await self._node(f"{base}.ResultOutcome").read_value())
            data["cells_printed"] = float(
                await self._node(f"{base}.ResultCellsPrinted").read_value()
            )
            data["bioink_volume_ml"] = float(
                await self._node(f"{base}.ResultBioinkVolume").read_value()
            )
        if state == "Aborted":
            self._emit(
                "alarm",
                f"print job {job.job_id} ABORTED ({data['outcome']}) after "
                f"{data['cells_printed']:.3g}e9 of {job.cell_count:.3g}e9 cells: the remaining "
                "cells need a deviation decision (re-print or cryopreserve)",
                data,
            )
        elif state == "Ended":
            completed = data["outcome"] == "completed"
            self._emit(
                "info" if completed else "warning",
                f"print job {job.job_id} ended ({data['outcome']}): "
                f"{data['cells_printed']:.3g}e9 cells printed in {data['bioink_volume_ml']:.1f} mL",
                data,
            )
        else:
            self._emit("info", f"print job {job.job_id}: {previous or 'stored'} -> {state}", data)

    # -- records -----------------------------------------------------------------------
    def _set_time(self, process_time_h: float) -> None:
        if not math.isfinite(process_time_h):
            raise ModelError(
                f"printer coordinator: process time {process_time_h!r} h is not finite."
            )
        self.process_time_h = float(process_time_h)

    def _emit(self, severity: str, message: str, data: Mapping[str, Any]) -> None:
        event = EventRecord(
            batch_id=self.batch_id,
            unit=self.unit,
            process_time_h=self.process_time_h,
            wall_time=float(self.wall_clock()),
            kind="printer",
            severity=severity,
            message=message,
            data=dict(data),
        )
        level = {"info": logging.INFO, "warning": logging.WARNING}.get(severity, logging.ERROR)
        log.log(level, "%s: %s", self.batch_id, message)
        self.events.append(event)
        self._outbox.append(event)

    def _flush(self) -> None:
        """Hand the pending events to the recorder, oldest first; keep what it refuses."""
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


def _meaning(code: int | str) -> str:
    if isinstance(code, str):
        return f"status {code}"
    return f"return value {code}: {RETURN_CODES.get(code, 'unknown')}"

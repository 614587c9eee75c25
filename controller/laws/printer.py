"""Print-job policy: the harvest forecast becomes a print job on the co-located bioprinter
(job management of OPC 40001-3 / ISA-95 job control, as the printer of docs/opcua.md
exposes it), and the job follows the batch until the print has ended.

:class:`PrintPolicy` is pure and synchronous (no I/O, no asyncio, no OPC UA): forecasts,
the harvest, the process time, the results of the printer calls and the states read from
the printer go in; the printer call to make (:meth:`PrintPolicy.next_command`) and the
events (:meth:`PrintPolicy.take_events`) come out. The OPC UA side,
:class:`controller.runtime.printing.PrinterCoordinator`, makes the calls, reads the
printer and records the events.

The policy keeps a *desired* job (from the forecasts and the harvest) and the job as the
printer holds it, and brings the printer in line with the desired job:

- forecast confident (``P(dose by the scheduled harvest) >= schedule_probability``):
  ``Store`` a job (NotAllowedToStart) with the scheduled start (harvest +
  ``harvest_to_print_h``), the expected printed cells (``printed_fraction`` of the
  forecast harvest yield, at most ``max_printed_cells``) and the bioink cell density;
- forecast moved (printed cells by more than ``cell_tolerance``, relative, or the start by
  more than ``start_tolerance_h``): ``Update`` the job; confidence lost
  (``P < revoke_probability``): ``Cancel`` it (revoked);
- harvest (:meth:`PrintPolicy.on_harvest` with the harvested cells): ``Update`` to the real
  cell count and ``Start`` (AllowedToStart: the printer runs it from its scheduled start);
- the job's and the machine's states (read by the OPC UA side at every poll): Aborted, a
  rejected job, a refused call and a machine fault raise an alarm; Ended reports the cells
  printed;
- a restarted controller: the newest job this batch stored (id ``<job_prefix>-<batch>-<n>``)
  is *adopted* with its parameters and state (:meth:`PrintPolicy.adopt`): it is kept (not
  stored twice) until a forecast or the harvest moves it, and new job ids continue after
  ``n``. A job of this batch id for another patient is never adopted (alarm).

A rejected job is not sent again with the same parameters.

Numbers: cells in 1e9 cells, bioink cell density in 1e6 cells/mL, times as culture age in
hours (the printer receives ``ScheduledStart = batch start + culture age``).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from plant_models.config import load_fields, load_toml, setting
from plant_models.errors import ConfigError, ModelError

if TYPE_CHECKING:
    from controller.numerics.forecast import HarvestForecast

__all__ = [
    "FINAL_STATES",
    "PREPARED_STATES",
    "RETURN_CODES",
    "JobSpec",
    "PrintEvent",
    "PrintPolicy",
    "PrintPolicyConfig",
    "PrinterCommand",
    "load_printer_config",
]

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
#: Printer job methods the policy asks for.
METHODS = ("Store", "StoreAndStart", "Update", "Start", "Cancel")


@dataclasses.dataclass(frozen=True)
class PrintPolicyConfig:
    """Print-job policy settings (``[printer]`` table of a TOML file, ``[printer.settings]``
    of a site file).

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
        namespace_uri: namespace of the printer's job nodes and methods (used by the OPC UA
            side only).
    """

    schedule_probability: float = setting(0.9, low=0.0, high=1.0, low_open=True)
    revoke_probability: float = setting(0.5, low=0.0, high=1.0)
    cell_tolerance: float = setting(0.15, low=0.0, high=10.0, low_open=True)
    start_tolerance_h: float = setting(2.0, low=0.0, high=240.0, low_open=True, unit="h")
    bioink_cell_density: float = setting(
        20.0, low=0.0, high=1000.0, low_open=True, unit="1e6 cells/mL"
    )
    printed_fraction: float = setting(0.02, low=0.0, high=1.0, low_open=True)
    max_printed_cells: float = setting(0.6, low=0.0, high=1e4, low_open=True, unit="1e9 cells")
    harvest_to_print_h: float = setting(2.0, low=0.0, high=240.0, unit="h")
    job_prefix: str = setting("PRINT", description="job ids are <prefix>-<batch id>-<n>")
    namespace_uri: str = setting("urn:hmpc:sim", description="namespace of the job nodes")

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

    @classmethod
    def from_table(
        cls, table: Mapping[str, Any], where: str, *, namespace_uri: str | None = None
    ) -> PrintPolicyConfig:
        """The settings of a TOML table (``where`` names it in the messages);
        ``namespace_uri``: the default when the table has none.

        Raises:
            ConfigError: unknown key (with close matches), wrong type, value out of range.
        """
        values = load_fields(cls, table, where)
        if "namespace_uri" not in values and namespace_uri:
            values["namespace_uri"] = namespace_uri
        try:
            return cls(**values)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None


def load_printer_config(path: str | Path) -> PrintPolicyConfig:
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
    return PrintPolicyConfig.from_table(section, f"{where} [printer]")


@dataclasses.dataclass(frozen=True)
class JobSpec:
    """A print job as the policy wants it on the printer.

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


@dataclasses.dataclass(frozen=True)
class PrinterCommand:
    """A printer call the policy asks for.

    Attributes:
        method: ``Store``, ``StoreAndStart``, ``Update`` (the job's parameters), ``Start`` or
            ``Cancel`` (the job's id).
        job: the job the call is about.
        previous: for ``Update``, the job as the printer holds it.
    """

    method: str
    job: JobSpec
    previous: JobSpec | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"printer command: unknown method {self.method!r}")


@dataclasses.dataclass(frozen=True)
class PrintEvent:
    """Something the policy decided or saw (the runtime records it as an
    :class:`~controller.records.steps.EventRecord` of kind ``printer``).

    Attributes:
        severity: ``info``, ``warning`` or ``alarm``.
        message: one line for the operator.
        data: the details (``action`` names what happened).
        process_time_h: culture age at which it happened, h.
    """

    severity: str
    message: str
    data: Mapping[str, Any]
    process_time_h: float


class PrintPolicy:
    """The print job of one batch: decisions from forecasts and the harvest, the printer
    calls that carry them out, and the bookkeeping of the printer's answers and states.

    Args:
        config: policy settings.
        batch_id, patient_id: whose batch (written into the job and its id).

    Per control cycle: :meth:`on_forecast` (decides); then, on the printer side, the calls
    of :meth:`next_command` each followed by :meth:`command_done` with the printer's
    answer (which names the next call of the same round, or None), and the states read
    (:meth:`on_machine_state`, :meth:`on_job_state`, :meth:`on_job_missing`). At the
    harvest :meth:`on_harvest`. The events come out of :meth:`take_events`, oldest first.
    """

    def __init__(self, config: PrintPolicyConfig, *, batch_id: str, patient_id: str) -> None:
        if not batch_id.strip() or not patient_id.strip():
            raise ConfigError("printer coordinator: batch_id and patient_id must not be empty.")
        self.config = config
        self.batch_id = batch_id
        self.patient_id = patient_id
        self.process_time_h = math.nan
        self._desired: JobSpec | None = None
        self._stored: JobSpec | None = None
        self._rejected: JobSpec | None = None
        self._why: dict[str, Any] = {}
        self._revision = 0
        self._harvested = False
        #: State of the stored job as last known ("" when there is none).
        self.job_state = ""
        #: The printer's machine state and fault text as last read.
        self.machine_state = ""
        self.fault = ""
        self._events: list[PrintEvent] = []

    # -- state ---------------------------------------------------------------------------
    @property
    def job(self) -> JobSpec | None:
        """The job as the printer holds it (None: no job stored)."""
        return self._stored

    @property
    def desired(self) -> JobSpec | None:
        """The job the printer should hold (None: none)."""
        return self._desired

    @property
    def harvested(self) -> bool:
        return self._harvested

    @property
    def finished(self) -> bool:
        """The harvest happened and the printer's job has ended or aborted."""
        return self._harvested and self.job_state in FINAL_STATES

    def take_events(self) -> list[PrintEvent]:
        """The events since the last call, oldest first."""
        events, self._events = self._events, []
        return events

    def set_time(self, process_time_h: float) -> None:
        """The process time (culture age, h) of what follows."""
        if not math.isfinite(process_time_h):
            raise ModelError(
                f"printer coordinator: process time {process_time_h!r} h is not finite."
            )
        self.process_time_h = float(process_time_h)

    # -- decisions -----------------------------------------------------------------------
    def on_forecast(self, forecast: HarvestForecast, process_time_h: float) -> None:
        """Decide on the job from this cycle's forecast (see :meth:`next_command`)."""
        self.set_time(process_time_h)
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
                    job_id=self._job_id(self._revision),
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

    def _job_id(self, revision: int) -> str:
        return f"{self.config.job_prefix}-{self.batch_id}-{revision}"

    def _moved(self, job: JobSpec, cells: float, start_h: float) -> bool:
        """Printed cells or the start differ from ``job``'s beyond the tolerances."""
        return (
            abs(cells - job.cell_count) > self.config.cell_tolerance * job.cell_count
            or abs(start_h - job.scheduled_start_h) > self.config.start_tolerance_h
        )

    def on_harvest(self, process_time_h: float, harvested_cells: float) -> None:
        """The cells were harvested: the job gets the real cell count and may start
        ``harvest_to_print_h`` later (see :meth:`next_command`)."""
        self.set_time(process_time_h)
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
                job_id=self._job_id(self._revision),
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

    # -- commands ------------------------------------------------------------------------
    def next_command(self) -> PrinterCommand | None:
        """The printer call that brings the printer in line with the desired job, or None
        (in line, the job is over, or the printer rejected these parameters already)."""
        desired, stored = self._desired, self._stored
        if stored is not None and self.job_state in FINAL_STATES:
            return None
        if desired is None:
            return PrinterCommand("Cancel", stored) if stored is not None else None
        if stored is None:
            if self._rejected is not None and desired.same_parameters(self._rejected):
                return None
            return PrinterCommand("StoreAndStart" if desired.start else "Store", desired)
        if not desired.same_parameters(stored):
            if self._rejected is not None and desired.same_parameters(self._rejected):
                return None
            return PrinterCommand("Update", desired, previous=stored)
        if desired.start and not stored.start:
            return PrinterCommand("Start", stored)
        return None

    def command_done(self, command: PrinterCommand, result: int | str) -> PrinterCommand | None:
        """The printer's answer to ``command`` (its return value, or the name of the status
        code it refused the call with). Returns the call to make next in the same round: a
        ``Start`` after a successful ``Update`` of a harvested job, else None (anything else
        waits for the next round)."""
        if command.method in ("Store", "StoreAndStart"):
            self._store_done(command, result)
        elif command.method == "Update":
            if self._update_done(command, result):
                return self.next_command()
        elif command.method == "Start":
            self._start_done(command, result)
        else:
            self._cancel_done(command, result)
        return None

    def _store_done(self, command: PrinterCommand, code: int | str) -> None:
        job, method = command.job, command.method
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

    def _update_done(self, command: PrinterCommand, code: int | str) -> bool:
        job, stored = command.job, command.previous
        if stored is None:
            raise ModelError(f"printer policy: Update of {job.job_id} without the previous job.")
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

    def _start_done(self, command: PrinterCommand, code: int | str) -> None:
        job = command.job
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

    def _cancel_done(self, command: PrinterCommand, code: int | str) -> None:
        job = command.job
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

    # -- a restarted controller ----------------------------------------------------------
    def job_revision(self, job_id: str) -> int | None:
        """``n`` of a job id ``<job_prefix>-<batch>-<n>`` of this batch; None for any other."""
        pattern = rf"{re.escape(self.config.job_prefix)}-{re.escape(self.batch_id)}-(\d+)"
        match = re.fullmatch(pattern, job_id)
        return int(match.group(1)) if match is not None else None

    def adopt(
        self,
        revision: int,
        *,
        job_id: str,
        patient_id: str,
        batch_id: str,
        cell_count: float,
        bioink_density: float,
        scheduled_start_h: float | None,
        state: str,
    ) -> None:
        """Take over the newest job of this batch an earlier process stored (``revision``:
        its :meth:`job_revision`), as the printer holds it; a job with other patient or
        batch ids is refused (alarm) and new jobs get ids after it.

        Raises:
            ConfigError: the job has no scheduled start (``scheduled_start_h`` None).
        """
        desired = self._desired  # decided before this first poll (ids numbered from 1)
        if patient_id != self.patient_id or batch_id != self.batch_id:
            self._revision = revision
            if desired is not None:  # a new id after the printer's newest
                self._revision += 1
                self._desired = dataclasses.replace(desired, job_id=self._job_id(self._revision))
            self._emit(
                "alarm",
                f"printer holds job {job_id} for patient {patient_id!r}, batch "
                f"{batch_id!r}, not {self.patient_id!r} / {self.batch_id!r}: it is not "
                "taken over (new jobs get new ids); check the job on the printer",
                {"action": "adopt_refused", "job_id": job_id, "state": state},
            )
            return
        if scheduled_start_h is None:
            raise ConfigError(f"printer coordinator: job {job_id} has no ScheduledStart time.")
        job = JobSpec(
            job_id=job_id,
            patient_id=self.patient_id,
            batch_id=self.batch_id,
            cell_count=cell_count,
            bioink_density=bioink_density,
            scheduled_start_h=scheduled_start_h,
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

    # -- what the printer reports --------------------------------------------------------
    def on_machine_state(self, state: str, fault: str) -> None:
        """The printer's machine state and fault text as read now."""
        if state == self.machine_state and fault == self.fault:
            return
        previous = self.machine_state
        self.machine_state, self.fault = state, fault
        if state == "OutOfService" or fault:
            self._emit(
                "alarm",
                f"printer out of service: {fault or 'no reason given'}; clear the fault "
                "on the printer before the harvest",
                {"action": "machine_state", "state": state, "fault": fault},
            )
        elif previous:
            self._emit(
                "info",
                f"printer {previous} -> {state}",
                {"action": "machine_state", "state": state, "previous": previous},
            )

    def on_job_missing(self) -> None:
        """The stored job is not on the printer (any more)."""
        job = self._stored
        if job is None:
            return
        self._stored = None
        self.job_state = ""
        self._emit(
            "alarm",
            f"job {job.job_id} is no longer on the printer (removed by hand?); "
            + ("it is stored again" if self._desired is not None else "none is needed now"),
            {"action": "job_missing", "job": job.parameters()},
        )

    def on_job_state(
        self,
        state: str,
        progress: float,
        *,
        outcome: str | None = None,
        cells_printed: float | None = None,
        bioink_volume_ml: float | None = None,
    ) -> None:
        """The stored job's state and progress as read now; for Ended and Aborted also its
        result (``outcome``, ``cells_printed`` 1e9 cells, ``bioink_volume_ml``)."""
        job = self._stored
        if job is None or state == self.job_state:
            return
        data: dict[str, Any] = {
            "action": "job_state",
            "job_id": job.job_id,
            "state": state,
            "previous": self.job_state,
            "progress": progress,
        }
        if state in FINAL_STATES:
            if outcome is None or cells_printed is None or bioink_volume_ml is None:
                raise ModelError(f"printer policy: job {job.job_id} {state} without its result.")
            data["outcome"] = outcome
            data["cells_printed"] = cells_printed
            data["bioink_volume_ml"] = bioink_volume_ml
        previous, self.job_state = self.job_state, state
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

    def _emit(self, severity: str, message: str, data: Mapping[str, Any]) -> None:
        self._events.append(PrintEvent(severity, message, dict(data), self.process_time_h))


def _meaning(code: int | str) -> str:
    if isinstance(code, str):
        return f"status {code}"
    return f"return value {code}: {RETURN_CODES.get(code, 'unknown')}"

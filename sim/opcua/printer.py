"""The simulated bioprinter (material extrusion of a cell-laden bioink): job orders with the
ISA-95 job states of OPC 40001-3 / 10031-4, run over process time.

Pure and synchronous; :mod:`sim.opcua.server` exposes it as the OPC 40540 subset.

Job states: NotAllowedToStart (stored), AllowedToStart (started, waiting for its scheduled
start and a free machine), Running, Interrupted (paused), Ended, Aborted. Update (ISA-95)
changes the parameters of a job that is not yet running.
Return codes of the job methods (ISA-95 job control, a subset): 0 success; 1 unknown job
order id; 2 invalid job order status for this method; 4 unable to accept the job order
(invalid parameters or duplicate id); 8 invalid request (caller not allowed).
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math

__all__ = ["JobOrder", "JobResult", "JobState", "PrinterSim", "PrinterSpec", "ReturnCode"]

log = logging.getLogger(__name__)


class JobState(enum.StrEnum):
    NOT_ALLOWED_TO_START = "NotAllowedToStart"
    ALLOWED_TO_START = "AllowedToStart"
    RUNNING = "Running"
    INTERRUPTED = "Interrupted"
    ENDED = "Ended"
    ABORTED = "Aborted"


class ReturnCode(enum.IntEnum):
    OK = 0
    UNKNOWN_JOB = 1
    INVALID_STATE = 2
    UNABLE_TO_ACCEPT = 4
    INVALID_REQUEST = 8


@dataclasses.dataclass(frozen=True)
class PrinterSpec:
    """Capabilities of the printer (validation limits) and its process timing."""

    cartridge_volume_ml: float = 30.0
    min_cell_count: float = 0.01  # 1e9 cells
    max_cell_count: float = 50.0  # 1e9 cells
    min_bioink_density: float = 1.0  # 1e6 cells/mL
    max_bioink_density: float = 50.0  # 1e6 cells/mL
    print_rate_ml_per_h: float = 10.0  # extruded bioink volume per process hour
    setup_h: float = 0.5  # warm-up before extrusion
    nozzle_temperature: float = 22.0  # degC while printing
    bed_temperature: float = 10.0  # degC while printing
    extrusion_pressure: float = 80.0  # kPa while extruding
    uv_dose_rate: float = 100.0  # mJ/cm2 per process hour while extruding


@dataclasses.dataclass(frozen=True)
class JobResult:
    cells_printed: float  # 1e9 cells
    bioink_volume_ml: float
    end_time_h: float
    outcome: str  # "completed", "stopped", "aborted: <reason>"


@dataclasses.dataclass
class JobOrder:
    job_id: str
    patient_id: str
    batch_id: str
    cell_count: float  # 1e9 cells
    bioink_density: float  # 1e6 cells/mL
    scheduled_start_h: float  # process time
    state: JobState = JobState.NOT_ALLOWED_TO_START
    progress: float = 0.0  # 0..1 of the total duration (setup + extrusion)
    started_h: float | None = None
    result: JobResult | None = None

    @property
    def bioink_volume_ml(self) -> float:
        # 1e9 cells / (1e6 cells/mL) = 1e3 mL
        return 1e3 * self.cell_count / self.bioink_density


class PrinterSim:
    """Job list and machine state of one printer. One job runs at a time."""

    def __init__(self, spec: PrinterSpec | None = None) -> None:
        self.spec = spec if spec is not None else PrinterSpec()
        self.jobs: dict[str, JobOrder] = {}
        self.fault: str = ""
        self.time_h = 0.0
        self.uv_dose = 0.0

    # -- validation ---------------------------------------------------------------------
    def validate(self, job: JobOrder, now_h: float, *, replacing: bool = False) -> list[str]:
        s = self.spec
        problems = []
        if not job.job_id.strip():
            problems.append("JobOrderId is empty")
        elif job.job_id in self.jobs and not replacing:
            problems.append(f"JobOrderId {job.job_id!r} already exists")
        if not job.patient_id.strip() or not job.batch_id.strip():
            problems.append("PatientId and BatchId are required")
        if not (math.isfinite(job.cell_count) and s.min_cell_count <= job.cell_count):
            problems.append(f"CellCount must be >= {s.min_cell_count} (1e9 cells)")
        elif job.cell_count > s.max_cell_count:
            problems.append(f"CellCount must be <= {s.max_cell_count} (1e9 cells)")
        dens = job.bioink_density
        if not (math.isfinite(dens) and s.min_bioink_density <= dens <= s.max_bioink_density):
            problems.append(
                f"BioinkCellDensity must be in [{s.min_bioink_density}, "
                f"{s.max_bioink_density}] (1e6 cells/mL)"
            )
        elif math.isfinite(job.cell_count) and job.bioink_volume_ml > s.cartridge_volume_ml:
            problems.append(
                f"bioink volume {job.bioink_volume_ml:.1f} mL exceeds the cartridge "
                f"({s.cartridge_volume_ml} mL)"
            )
        if not math.isfinite(job.scheduled_start_h) or job.scheduled_start_h < now_h - 1.0:
            problems.append("ScheduledStart lies in the past")
        return problems

    # -- job control ----------------------------------------------------------------------
    def store(self, job: JobOrder, *, start: bool, now_h: float) -> tuple[ReturnCode, str]:
        problems = self.validate(job, now_h)
        if problems:
            log.warning("printer: job %r rejected: %s", job.job_id, "; ".join(problems))
            return ReturnCode.UNABLE_TO_ACCEPT, "; ".join(problems)
        job.state = JobState.ALLOWED_TO_START if start else JobState.NOT_ALLOWED_TO_START
        self.jobs[job.job_id] = job
        log.info("printer: job %s stored (%s)", job.job_id, job.state.value)
        return ReturnCode.OK, ""

    def update(self, job: JobOrder, now_h: float) -> tuple[ReturnCode, str]:
        """ISA-95 Update: new parameters for a stored job that is not yet running (its
        state is kept)."""
        current = self.jobs.get(job.job_id)
        if current is None:
            return ReturnCode.UNKNOWN_JOB, f"no job {job.job_id!r}"
        if current.state not in (JobState.NOT_ALLOWED_TO_START, JobState.ALLOWED_TO_START):
            return ReturnCode.INVALID_STATE, f"job {job.job_id!r} is {current.state.value}"
        problems = self.validate(job, now_h, replacing=True)
        if problems:
            log.warning("printer: update of %r rejected: %s", job.job_id, "; ".join(problems))
            return ReturnCode.UNABLE_TO_ACCEPT, "; ".join(problems)
        current.patient_id, current.batch_id = job.patient_id, job.batch_id
        current.cell_count, current.bioink_density = job.cell_count, job.bioink_density
        current.scheduled_start_h = job.scheduled_start_h
        log.info("printer: job %s updated", job.job_id)
        return ReturnCode.OK, ""

    def command(self, job_id: str, method: str, now_h: float) -> ReturnCode:
        """Start, Stop, Pause, Resume, Abort, Cancel or Clear one job."""
        job = self.jobs.get(job_id)
        if job is None:
            return ReturnCode.UNKNOWN_JOB
        allowed: dict[str, tuple[JobState, ...]] = {
            "Start": (JobState.NOT_ALLOWED_TO_START,),
            "Stop": (JobState.RUNNING, JobState.INTERRUPTED),
            "Pause": (JobState.RUNNING,),
            "Resume": (JobState.INTERRUPTED,),
            "Abort": (
                JobState.NOT_ALLOWED_TO_START,
                JobState.ALLOWED_TO_START,
                JobState.RUNNING,
                JobState.INTERRUPTED,
            ),
            "Cancel": (JobState.NOT_ALLOWED_TO_START, JobState.ALLOWED_TO_START),
            "Clear": (JobState.ENDED, JobState.ABORTED),
        }
        if method not in allowed:
            return ReturnCode.INVALID_REQUEST
        if job.state not in allowed[method]:
            return ReturnCode.INVALID_STATE
        if method == "Start":
            job.state = JobState.ALLOWED_TO_START
        elif method == "Stop":
            self._finish(job, now_h, JobState.ENDED, "stopped")
        elif method == "Pause":
            job.state = JobState.INTERRUPTED
        elif method == "Resume":
            job.state = JobState.RUNNING
        elif method == "Abort":
            self._finish(job, now_h, JobState.ABORTED, "aborted: by request")
        elif method in ("Cancel", "Clear"):
            del self.jobs[job_id]
        log.info("printer: %s %s -> %s", method, job_id, job.state.value)
        return ReturnCode.OK

    def inject_fault(self, reason: str, now_h: float) -> None:
        """Machine fault: the running job is aborted; no job starts until cleared."""
        self.fault = reason or "printer fault"
        for job in self.jobs.values():
            if job.state in (JobState.RUNNING, JobState.INTERRUPTED):
                self._finish(job, now_h, JobState.ABORTED, f"aborted: {self.fault}")
        log.warning("printer: fault %r", self.fault)

    def clear_fault(self) -> None:
        self.fault = ""

    # -- time -----------------------------------------------------------------------------
    def running(self) -> JobOrder | None:
        for job in self.jobs.values():
            if job.state in (JobState.RUNNING, JobState.INTERRUPTED):
                return job
        return None

    def duration_h(self, job: JobOrder) -> float:
        return self.spec.setup_h + job.bioink_volume_ml / self.spec.print_rate_ml_per_h

    def advance(self, now_h: float) -> None:
        """Advance the machine to process time ``now_h``."""
        dt = max(now_h - self.time_h, 0.0)
        self.time_h = now_h
        job = self.running()
        if job is None and not self.fault:
            ready = [
                j
                for j in self.jobs.values()
                if j.state is JobState.ALLOWED_TO_START and j.scheduled_start_h <= now_h
            ]
            if ready:
                job = min(ready, key=lambda j: j.scheduled_start_h)
                job.state = JobState.RUNNING
                job.started_h = now_h
                dt = 0.0
                log.info("printer: job %s running", job.job_id)
        if job is None or job.state is not JobState.RUNNING:
            return
        total = self.duration_h(job)
        before = job.progress * total
        job.progress = min(1.0, job.progress + dt / total)
        extruding = max(0.0, job.progress * total - max(before, self.spec.setup_h))
        self.uv_dose += self.spec.uv_dose_rate * extruding
        if job.progress >= 1.0:
            self._finish(job, now_h, JobState.ENDED, "completed")

    def _finish(self, job: JobOrder, now_h: float, state: JobState, outcome: str) -> None:
        total = self.duration_h(job)
        extruded = (
            max(0.0, job.progress * total - self.spec.setup_h) * self.spec.print_rate_ml_per_h
        )
        volume = min(extruded, job.bioink_volume_ml)
        job.state = state
        job.result = JobResult(
            cells_printed=volume * job.bioink_density / 1e3,
            bioink_volume_ml=volume,
            end_time_h=now_h,
            outcome=outcome,
        )
        log.info("printer: job %s %s (%s)", job.job_id, state.value, outcome)

    def monitoring(self) -> dict[str, float]:
        """Monitoring values: temperatures (degC), extrusion pressure (kPa), UV dose."""
        job = self.running()
        active = job is not None and job.state is JobState.RUNNING
        extruding = (
            active and job is not None and job.progress * self.duration_h(job) > (self.spec.setup_h)
        )
        return {
            "NozzleTemperature": self.spec.nozzle_temperature if active else 20.0,
            "CartridgeTemperature": self.spec.nozzle_temperature if active else 20.0,
            "BedTemperature": self.spec.bed_temperature if active else 20.0,
            "ExtrusionPressure": self.spec.extrusion_pressure if extruding else 0.0,
            "UVCrosslinkDose": self.uv_dose,
        }

    def machine_state(self) -> str:
        """MachineryItemState: OutOfService (fault), Executing, NotExecuting."""
        if self.fault:
            return "OutOfService"
        job = self.running()
        return "Executing" if job is not None and job.state is JobState.RUNNING else "NotExecuting"

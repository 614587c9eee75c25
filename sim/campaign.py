"""Evaluation campaigns: every virtual patient of a seeded cohort under every controller,
run in parallel on Ray, resumable, summarised against the oracle (domain.md metrics).

Pipeline (``run_campaign``):

1. ``DIR/campaign.json`` (the manifest) records the arguments that determine the results;
   a re-run into the same ``DIR`` resumes only with the same arguments.
2. When ``hybrid-mpc`` is among the controllers, its growth-rate residual is trained first
   on a separate *historical* cohort (a different cohort seed, so no patient is shared
   with the held-out cohort): the rule controller runs each historical patient, the batch
   records go to ``DIR/historical/<patient>/``, and the residual is fitted by the same code
   as ``hmpc fit`` (:func:`controller.training.fitting.fit_residual`) into ``DIR/residual.npz``.
3. Each (controller, patient) run is a Ray task (:func:`run_one`). It gets the MPC tuning and
   the residual as bytes through the Ray object store and sends its files back, compressed
   (:class:`RunOutput`): the driver alone writes ``DIR/runs/<controller>/<patient>/``
   (``trajectory.csv``, ``assays.csv``, then ``summary.json`` last, each atomically), so
   the nodes of a cluster need no file system shared with it (docs/campaigns.md). A run
   whose ``summary.json`` exists is complete and is skipped on a re-run. A failed run is
   retried once, then listed with its traceback in ``DIR/failures.csv``.
4. The per-run summaries are aggregated into ``DIR/patients/<controller>.csv`` (one row per
   patient), ``DIR/summary.csv`` and ``DIR/summary.md`` (one row per controller), and
   ``DIR/distributions.png``. Wall times go to ``DIR/timing.csv`` only, so the summary of a
   seed is the same table every time.

Primary objective (the MPC's "dose by date"): per patient, the dose score
``min(1, total viable cells at the scheduled harvest / dose)``; per controller, its mean
over the cohort; ``primary_ratio_to_oracle`` divides it by the oracle's on the same patients.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import difflib
import hashlib
import json
import logging
import math
import os
import re
import sys
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from controller.config_files import config_file
from plant_models.errors import ConfigError, HmpcError
from plant_models.process import DEFAULT_PROCESS, get_process
from plant_models.processes.tcell import TCellTruthParameters
from plant_models.tcell import load_tcell_process
from sim.baselines import Controller, make_baseline
from sim.closed_loop import run_closed_loop, summarize
from sim.patients import DATA as COHORT_DATA
from sim.patients import PatientCohort, VirtualPatient, load_cohort_spec
from sim.plant import VirtualBioreactor
from sim.report import record_toml

__all__ = [
    "CONTROLLERS",
    "CampaignResult",
    "CampaignSpec",
    "RunFailure",
    "RunOutput",
    "add_campaign_command",
    "check_targets",
    "paired_comparisons",
    "run_campaign",
    "summarize_campaign",
]

log = logging.getLogger(__name__)

#: Controllers a campaign can run, in the order of the tables.
CONTROLLERS = ("recipe", "rule", "mechanistic-mpc", "hybrid-mpc", "oracle")
BASELINES = ("recipe", "rule")
#: The historical cohort's seed is the campaign seed plus this offset (disjoint patients).
HISTORICAL_SEED_OFFSET = 7_000_003
#: Patient ``i`` of cohort seed ``s`` is drawn from seed ``s * COHORT_STRIDE + i``
#: (:class:`sim.patients.PatientCohort`); cohorts of different seeds are disjoint below it.
COHORT_STRIDE = 100003
#: The campaigns' default MPC tuning (a file of ``configs/``).
CAMPAIGN_MPC_CONFIG = "mpc_tcell_hourly.toml"

#: How the hybrid MPC gets its residual (recorded in the manifest: a campaign never mixes two).
HYBRID_RESIDUAL_SOURCE = "historical cohort, hmpc fit defaults, residual=residual.npz"
#: ... with ``--hybrid-adapt``: the residual trained against adapted models, and the MPC
#: fits the running batch's patient parameters (docs/hybrid.md, docs/mpc.md).
HYBRID_ADAPT_RESIDUAL_SOURCE = "historical cohort, hmpc fit --adapt auto, residual=residual.npz"
HYBRID_PATIENT_PARAMETERS = ("mu_max", "exhaustion_threshold", "lag_time")
MANIFEST = "campaign.json"
MANIFEST_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class CampaignSpec:
    """Everything that determines a campaign's results (what the manifest records).

    Attributes:
        patients: held-out cohort size.
        controllers: controller names, in the canonical order of :data:`CONTROLLERS`.
        seed: cohort seed of the held-out patients.
        days: batch length, d (default: the process's scheduled harvest).
        historical_patients: size of the historical cohort the hybrid residual learns from.
        step_h: control period, h.
        mpc_config: MPC tuning file (None: ``configs/mpc_tcell_hourly.toml``).
        cohort: virtual-patient distribution file (None: the packaged default).
        truth: truth-plant kinetics file (None: the packaged
            ``plant_models/data/tcell_truth.toml``), e.g. a plant with stronger mismatch
            for a sensitivity study.
        hybrid_adapt: the hybrid MPC fits the running batch's patient parameters, with a
            residual trained against adapted models (``hmpc fit --adapt auto``).
    """

    patients: int
    controllers: tuple[str, ...]
    seed: int
    days: float
    historical_patients: int = 12
    step_h: float = 1.0
    mpc_config: str | None = None
    cohort: str | None = None
    hybrid_adapt: bool = False
    truth: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.patients < COHORT_STRIDE:
            raise ConfigError(f"--patients must lie in 1..{COHORT_STRIDE - 1}, got {self.patients}")
        if not 2 <= self.historical_patients < COHORT_STRIDE:
            raise ConfigError(
                f"--historical must lie in 2..{COHORT_STRIDE - 1} (hmpc fit needs a training "
                f"and a held-out batch), got {self.historical_patients}"
            )
        if self.seed < 0:
            raise ConfigError(f"--seed must be >= 0, got {self.seed}")
        if not (math.isfinite(self.days) and self.days > 0):
            raise ConfigError(f"--days must be positive, got {self.days}")
        if not (math.isfinite(self.step_h) and self.step_h > 0):
            raise ConfigError(f"step_h must be positive, got {self.step_h}")
        if not self.controllers:
            raise ConfigError(
                "--controllers is empty; name at least one of " + ", ".join(CONTROLLERS)
            )

    @property
    def historical_seed(self) -> int:
        return self.seed + HISTORICAL_SEED_OFFSET

    def cohort_spec_path(self) -> Path:
        return Path(self.cohort) if self.cohort else Path(str(COHORT_DATA / "cohort.toml"))

    def mpc_config_path(self) -> Path:
        if self.mpc_config:
            return Path(self.mpc_config)
        # Campaigns run the hourly tuning (hourly steps, 48 h horizon): on 2 cores an 8-day
        # hybrid batch takes 5-10 s with it against 60-150 s with the 4 h / whole-batch
        # tuning, so 50 patients x 5 controllers fit in well under an hour.
        return config_file(CAMPAIGN_MPC_CONFIG)

    def manifest(self) -> dict[str, Any]:
        """The manifest: the arguments plus digests of the files they name."""
        uses_mpc = any(c not in BASELINES for c in self.controllers)
        return {
            "format": MANIFEST_FORMAT,
            "model": DEFAULT_PROCESS,
            "patients": self.patients,
            "controllers": list(self.controllers),
            "seed": self.seed,
            "days": self.days,
            "step_h": self.step_h,
            "historical_patients": self.historical_patients
            if "hybrid-mpc" in self.controllers
            else None,
            "historical_seed": self.historical_seed if "hybrid-mpc" in self.controllers else None,
            "hybrid_residual": (
                (HYBRID_ADAPT_RESIDUAL_SOURCE if self.hybrid_adapt else HYBRID_RESIDUAL_SOURCE)
                if "hybrid-mpc" in self.controllers
                else None
            ),
            # absent (None) in manifests written before the option existed
            "hybrid_patient_parameters": (
                list(HYBRID_PATIENT_PARAMETERS)
                if self.hybrid_adapt and "hybrid-mpc" in self.controllers
                else None
            ),
            "cohort_sha256": _sha256(self.cohort_spec_path()),
            # absent (None) with the packaged truth plant, as in manifests written before
            # the option existed
            "truth_sha256": _sha256(Path(self.truth)) if self.truth else None,
            "mpc_config_sha256": _sha256(self.mpc_config_path()) if uses_mpc else None,
        }


def parse_controllers(text: str) -> tuple[str, ...]:
    """``"rule,recipe"`` -> ``("recipe", "rule")`` (canonical order); unknown names and
    duplicates are refused with the allowed names."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in CONTROLLERS:
            close = difflib.get_close_matches(n, CONTROLLERS, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"--controllers: unknown controller {n!r}; choose from {', '.join(CONTROLLERS)}."
                + hint
            )
    if len(set(names)) != len(names):
        raise ConfigError(f"--controllers names a controller twice: {text!r}")
    return tuple(c for c in CONTROLLERS if c in names)


@dataclasses.dataclass(frozen=True)
class CampaignResult:
    """What a campaign call did.

    Attributes:
        out: the campaign folder.
        runs: per-run table (one row per controller x patient).
        summary: per-controller table (``summary.csv``).
        executed: runs computed by this call (the others were already complete).
        skipped: runs found complete and not recomputed.
        wall_time_s: wall time of this call (training, runs and summary).
    """

    out: Path
    runs: pd.DataFrame
    summary: pd.DataFrame
    executed: int
    skipped: int
    wall_time_s: float


# ------------------------------------------------------------------------ files


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc}); check the path.") from None


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so a reader sees either the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_run(folder: Path, output: RunOutput) -> None:
    """The driver writes a run's files into ``folder``, each atomically, in the order they
    came (``summary.json``, the completion marker, last)."""
    for name, text in output.texts():
        _atomic_write(folder / name, text)


def check_manifest(out: Path, spec: CampaignSpec) -> None:
    """Create ``out/campaign.json``, or check that the one there has the same arguments.

    Raises:
        ConfigError: the folder holds a campaign with other arguments.
    """
    wanted = spec.manifest()
    path = out / MANIFEST
    if path.exists():
        try:
            found = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise ConfigError(
                f"{path}: unreadable campaign manifest ({exc}); remove the folder or choose "
                "another --out."
            ) from None
        diffs = [
            f"{k}={found.get(k)!r} there, {wanted.get(k)!r} now"
            for k in sorted(set(found) | set(wanted))
            if found.get(k) != wanted.get(k)
        ]
        if diffs:
            raise ConfigError(
                f"{out} holds a campaign with other arguments ({'; '.join(diffs)}). Re-run with "
                "the same arguments to resume it, or choose a new --out."
            )
        return
    out.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps(wanted, indent=2) + "\n")


# ------------------------------------------------------------------------ one run


def _controller(
    name: str,
    plant: VirtualBioreactor,
    residual_path: Path | None,
    mpc_config: Path,
    patient_parameters: Sequence[str] = (),
) -> Controller:
    """The controller of a run. ``residual_path``: the hybrid MPC's residual file (trained
    on the historical cohort); ``patient_parameters``: fitted by the hybrid MPC."""
    if name in BASELINES:
        return make_baseline(name, DEFAULT_PROCESS)
    from sim.mpc_controllers import make_mpc_controller

    if name == "hybrid-mpc":
        if residual_path is None:
            raise HmpcError("hybrid-mpc needs the historical residual; train it first")
        return make_mpc_controller(
            name,
            plant,
            mpc_config,
            residual=residual_path,
            patient_parameters=patient_parameters,
        )
    return make_mpc_controller(name, plant, mpc_config)


def _at_harvest(df: pd.DataFrame, harvest_h: float) -> pd.Series:
    """The trajectory row at the scheduled harvest (the last row if the batch is shorter)."""
    sel = df[df["time"] <= harvest_h + 1e-9]
    return sel.iloc[-1] if len(sel) else df.iloc[0]


#: zlib level of the files a run sends back (CSV and JSON text compress 4-6x at level 6).
RESULT_COMPRESSION = 6


@dataclasses.dataclass(frozen=True)
class RunOutput:
    """What one run sends back to the driver through Ray: its files, zlib-compressed, in
    the order the driver writes them (the completion marker ``summary.json`` last).

    Attributes:
        files: (file name, zlib-compressed UTF-8 text) pairs.
        node_id: the Ray node that ran it (recorded in ``timing.csv``).
    """

    files: tuple[tuple[str, bytes], ...]
    node_id: str = ""

    @property
    def compressed_bytes(self) -> int:
        return sum(len(data) for _, data in self.files)

    def texts(self) -> list[tuple[str, str]]:
        """The files as (name, text)."""
        return [(name, zlib.decompress(data).decode("utf-8")) for name, data in self.files]


def _record_texts(df: pd.DataFrame, plant: Any) -> list[tuple[str, str]]:
    """``record.toml``, ``assays.csv`` and ``trajectory.csv`` (headers ``name [unit]``,
    the batch-record format ``hmpc fit`` reads) as text."""
    units: dict[str, str] = df.attrs.get("units", {})
    header = [f"{c} [{units[c]}]" if c in units else c for c in df.columns]
    files = [("record.toml", record_toml(plant.plugin, plant.process))]
    assays = df.attrs.get("assays")
    if isinstance(assays, pd.DataFrame):
        files.append(("assays.csv", assays.to_csv(index=False, float_format="%.6g")))
    files.append(("trajectory.csv", df.to_csv(index=False, header=header, float_format="%.6g")))
    return files


def _node_id() -> str:
    """The Ray node this runs on ("" outside Ray)."""
    try:
        import ray
    except ImportError:
        return ""
    return str(ray.get_runtime_context().get_node_id()) if ray.is_initialized() else ""


def run_one(
    controller: str,
    patient: VirtualPatient,
    index: int,
    sensor_seed: int,
    days: float,
    step_h: float,
    mpc_config: bytes,
    residual: bytes | None,
    record_only: bool = False,
    patient_parameters: Sequence[str] = (),
    truth: TCellTruthParameters | None = None,
) -> RunOutput:
    """One batch of one patient under one controller (the body of a Ray task).

    It takes no path and writes nothing the driver reads: the MPC tuning (``mpc_config``)
    and the hybrid MPC's residual (``residual``, an ``.npz``) come as the files' bytes
    (through the Ray object store) and are unpacked into a temporary folder of the node
    running it, removed afterwards. Returns ``trajectory.csv``, ``assays.csv`` and, unless
    ``record_only``, ``summary.json`` (the flat summary row and the timing), compressed;
    the driver writes them.
    """
    t0 = time.perf_counter()
    plant = VirtualBioreactor.for_process(DEFAULT_PROCESS, patient, seed=sensor_seed, truth=truth)
    with tempfile.TemporaryDirectory(prefix="hmpc-run-") as tmp:
        config_path = Path(tmp) / "mpc.toml"
        config_path.write_bytes(mpc_config)
        residual_path = None
        if residual is not None:
            residual_path = Path(tmp) / "residual.npz"
            residual_path.write_bytes(residual)
        ctl = _controller(controller, plant, residual_path, config_path, patient_parameters)
        df = run_closed_loop(plant, ctl, days=days, step_h=step_h)
    wall = time.perf_counter() - t0
    files = _record_texts(df, plant)
    node = _node_id()
    if not record_only:
        row, timing = _summary_row(controller, patient, index, df, plant, ctl)
        timing = {"wall_time_s": wall, **timing, "node": node}
        files.append(("summary.json", json.dumps({"row": row, "timing": timing}, indent=2) + "\n"))
    return RunOutput(
        tuple(
            (name, zlib.compress(text.encode("utf-8"), RESULT_COMPRESSION)) for name, text in files
        ),
        node,
    )


def _summary_row(
    controller: str,
    patient: VirtualPatient,
    index: int,
    df: pd.DataFrame,
    plant: VirtualBioreactor,
    ctl: Controller,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The run's flat summary row (``patients/<controller>.csv``) and its solver timing."""
    s = summarize(df, plant)
    proc: Any = plant.process
    harvest = _at_harvest(df, float(proc.harvest_time))
    cells_at_harvest = float(harvest["total_viable_cells"])
    time_to_dose = s.get("time_to_dose_h")
    row: dict[str, Any] = {
        "controller": controller,
        "patient": patient.patient_id,
        "index": index,
        "growth_factor": patient.growth_factor,
        "lag_time_h": patient.lag_time,
        "exhaustion_factor": patient.exhaustion_factor,
        "initial_viability": patient.initial_viability,
        "non_expander": patient.non_expander,
        "dose_cells": float(proc.dose_cells),
        "harvest_time_h": float(proc.harvest_time),
        "cells_at_harvest": cells_at_harvest,
        "viability_at_harvest": float(harvest["viability"]),
        "primary_objective": min(1.0, cells_at_harvest / float(proc.dose_cells)),
        "dose_reached_by_harvest": bool(s["dose_reached_by_harvest"]),
        "days_to_dose": None if time_to_dose is None else float(time_to_dose) / 24.0,
        "final_viable_cells": float(s["final_viable_cells"]),
        "final_viability": float(s["final_viability"]),
        "fold_expansion": float(s["fold_expansion"]),
        "peak_lactate": float(s["peak_lactate"]),
        "min_glucose": float(s["min_glucose"]),
        "lactate_time_in_spec": float(s["lactate_time_in_spec"]),
        "glucose_time_in_spec": float(s["glucose_time_in_spec"]),
        "media_used": float(s["media_used"]),
        "hard_constraint_violations": int(s["hard_constraint_violations"]),
        "plant_clamped_inputs": int(s["plant_clamped_inputs"]),
    }
    timing: dict[str, Any] = {}
    if controller not in BASELINES:
        from controller.laws.control import EstimatingMPC
        from sim.mpc_controllers import MPCController, mpc_statistics

        if isinstance(ctl, (MPCController, EstimatingMPC)):
            stats = mpc_statistics(ctl)
            row["mpc_steps"] = int(stats["mpc_steps"])
            row["mpc_failures"] = int(stats["mpc_failures"])
            timing.update(
                solve_time_median_s=stats["solve_time_median_s"],
                solve_time_max_s=stats["solve_time_max_s"],
            )
    return row, timing


def _read_run(folder: Path) -> dict[str, Any] | None:
    """The stored result of a completed run, or None."""
    path = folder / "summary.json"
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        log.warning("%s is unreadable; the run is done again", path)
        return None
    if not isinstance(data, dict) or "row" not in data:
        return None
    return data


# ------------------------------------------------------------------------ Ray


@dataclasses.dataclass(frozen=True)
class RunFailure:
    """A run that failed on every attempt.

    Attributes:
        label: ``<controller>/<patient>`` or ``historical/<patient>``.
        attempts: how often it ran (:data:`RUN_ATTEMPTS`).
        error: the last attempt's exception, one line.
        traceback: the last attempt's traceback (from the node that ran it).
    """

    label: str
    attempts: int
    error: str
    traceback: str


#: A run is tried this often (a failed run is retried once) before it counts as failed.
RUN_ATTEMPTS = 2
FAILURES = "failures.csv"


class RunError(HmpcError):
    """A run raised on its node: the error's one-line form and its traceback there, as
    text (any exception reaches the driver this way, also one Ray cannot unpickle)."""

    def __init__(self, error: str, trace: str) -> None:
        super().__init__(error, trace)
        self.error = error
        self.trace = trace

    def __str__(self) -> str:
        return self.error


def _guarded(function: Callable[..., Any], **kwargs: Any) -> Any:
    """``function(**kwargs)``, its exceptions turned into :class:`RunError` (the body of
    every campaign task)."""
    try:
        return function(**kwargs)
    except Exception as exc:
        lines = str(exc).strip().splitlines()
        error = f"{type(exc).__name__}: {lines[0] if lines else ''}"
        raise RunError(error, f"on {_node_label()}:\n{traceback.format_exc()}") from None


def _node_label() -> str:
    import socket

    node = _node_id()
    where = f"host {socket.gethostname()}, pid {os.getpid()}"
    return where + (f", Ray node {node}" if node else "")


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _describe(exc: BaseException) -> tuple[str, str]:
    """(one-line error, traceback) of a failed Ray task."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, RunError):
        return cause.error, cause.trace
    shown = cause if isinstance(cause, BaseException) else exc
    first = str(shown).strip().splitlines()
    line = f"{type(shown).__name__}: {first[0] if first else ''}"
    # a task that raised: Ray's text names the task, its worker's pid and node, and the
    # frames of the task's traceback on that node (colour codes removed)
    return line, _ANSI.sub("", str(exc)).strip()


class _Pool:
    """Runs jobs (by default :func:`run_one` calls) as Ray tasks on a local Ray started
    here or on a cluster. Each job's result comes back through Ray to this (driver)
    process; a failed job is retried once."""

    def __init__(
        self, workers: int | None, address: str | None, runtime_env: dict[str, Any] | None = None
    ) -> None:
        try:
            import ray
        except ImportError as exc:
            raise HmpcError(
                f"campaigns run on Ray, which is not installed ({exc}); `pip install ray`."
            ) from None
        self.ray = ray
        self.started = False
        if not ray.is_initialized():
            if address:
                ray.init(address=address, log_to_driver=False, runtime_env=runtime_env)
            else:
                ray.init(
                    num_cpus=workers or os.cpu_count() or 1,
                    include_dashboard=False,
                    log_to_driver=False,
                    runtime_env=runtime_env,
                )
            self.started = True
        self.workers = workers
        self.remote = ray.remote(num_cpus=1, max_retries=0)(_guarded)

    @property
    def in_flight(self) -> int:
        """Runs to keep in flight: the cluster's CPUs now (nodes may join or leave while
        a campaign runs), at most ``workers``."""
        cpus = int(self.ray.cluster_resources().get("CPU", 0))
        return max(1, min(self.workers, cpus) if self.workers else cpus)

    def put(self, value: Any) -> Any:
        """``value`` in the Ray object store (sent to each node once, not with every task)."""
        return self.ray.put(value)

    def run(
        self,
        jobs: Sequence[tuple[str, dict[str, Any]]],
        *,
        desc: str,
        total: int,
        done: int,
        on_result: Callable[[str, Any], None],
        function: Callable[..., Any] = run_one,
    ) -> list[RunFailure]:
        """Run ``(label, kwargs of function)`` jobs, at most ``in_flight`` at a time, and
        hand each result to ``on_result(label, result)`` here, in the driver, as it
        arrives. A job that raises (or whose worker dies) is retried once; one that fails
        :data:`RUN_ATTEMPTS` times is returned as a :class:`RunFailure`. A progress bar on
        stderr shows the runs done of ``total`` (``done`` of them before this call), the
        ETA, and the retried and failed runs."""
        from tqdm import tqdm

        ray = self.ray
        remote = self.remote
        queue = [(label, kwargs, 1) for label, kwargs in jobs]
        pending: dict[Any, tuple[str, dict[str, Any], int]] = {}
        failures: list[RunFailure] = []
        retried = 0
        with tqdm(total=total, initial=done, desc=desc, unit="run", file=sys.stderr) as bar:
            bar.set_postfix(failed=0, retried=0)
            try:
                while queue or pending:
                    capacity = self.in_flight
                    while queue and len(pending) < capacity:
                        label, kwargs, attempt = queue.pop(0)
                        pending[remote.remote(function, **kwargs)] = (label, kwargs, attempt)
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    for ref in ready:
                        label, kwargs, attempt = pending.pop(ref)
                        try:
                            result = ray.get(ref)
                        except ray.exceptions.RayError as exc:
                            error, trace = _describe(exc)
                            if attempt < RUN_ATTEMPTS:
                                log.warning("run %s failed (%s); retrying it", label, error)
                                retried += 1
                                queue.insert(0, (label, kwargs, attempt + 1))
                            else:
                                log.error("run %s failed %d times: %s", label, attempt, error)
                                failures.append(RunFailure(label, attempt, error, trace))
                                bar.update(1)
                            bar.set_postfix(failed=len(failures), retried=retried)
                            continue
                        on_result(label, result)
                        bar.update(1)
            finally:
                for ref in pending:
                    with contextlib.suppress(Exception):
                        ray.cancel(ref, force=True)
        return failures

    def close(self) -> None:
        if self.started:
            self.ray.shutdown()


def write_failures(out: Path, failures: Sequence[RunFailure]) -> Path | None:
    """``out/failures.csv`` (run, attempts, error, traceback) of this call's failed runs;
    an older one is removed when none failed. Returns its path, or None."""
    path = out / FAILURES
    if not failures:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return None
    table = pd.DataFrame([dataclasses.asdict(f) for f in failures])
    _atomic_write(path, table.rename(columns={"label": "run"}).to_csv(index=False))
    return path


# ------------------------------------------------------------------------ residual


def train_historical_residual(
    spec: CampaignSpec, out: Path, pool: _Pool, truth: TCellTruthParameters | None = None
) -> Path:
    """The hybrid MPC's residual, trained on the historical cohort (rule controller) run on
    the campaign's truth plant (``truth``: its kinetics, loaded from ``spec.truth``; None:
    the packaged one), by the code of ``hmpc fit``. Resumable: completed records and the
    residual are kept."""
    residual = out / "residual.npz"
    if residual.exists():
        from plant_models.gp import GPResidual

        try:
            gp = GPResidual.load(residual)
        except ConfigError as exc:
            raise ConfigError(
                f"{residual} was fitted by another version of hmpc and cannot be used ({exc}); "
                "its hybrid-mpc runs would not be comparable: start the campaign again with a "
                "new --out."
            ) from None
        # a residual copied in from another campaign must be the kind this one fits: with
        # --hybrid-adapt, against adapted models and without a batch effect; else with one
        if gp.has_batch_effect == spec.hybrid_adapt:
            fitted, wanted = (
                ("with a batch effect (hmpc fit --adapt none)", "--adapt auto")
                if spec.hybrid_adapt
                else ("without a batch effect (hmpc fit --adapt auto)", "--adapt none")
            )
            raise ConfigError(
                f"{residual} was fitted {fitted}, but this campaign's hybrid MPC needs one "
                f"from hmpc fit {wanted} (campaign.json: hybrid_residual); remove it and "
                f"{out / 'historical' / 'fit'} to have it fitted again, or use another --out."
            )
        return residual
    hist_dir = out / "historical"
    cohort = PatientCohort(
        spec.historical_patients, spec.historical_seed, load_cohort_spec(spec.cohort)[0]
    )
    jobs = []
    done = 0
    for i, patient in enumerate(cohort):
        folder = hist_dir / patient.patient_id
        if (folder / "trajectory.csv").exists():
            done += 1
            continue
        jobs.append(
            (
                f"historical/{patient.patient_id}",
                {
                    "controller": "rule",
                    "patient": patient,
                    "index": i,
                    "sensor_seed": spec.historical_seed * COHORT_STRIDE + i,
                    "days": spec.days,
                    "step_h": spec.step_h,
                    "mpc_config": b"",  # the rule controller has no tuning file
                    "residual": None,
                    "record_only": True,
                    "truth": truth,
                },
            )
        )
    failures = pool.run(
        jobs,
        desc="historical cohort",
        total=len(cohort),
        done=done,
        on_result=lambda label, output: write_run(out / label, output),
    )
    if failures:
        path = write_failures(out, failures)
        raise HmpcError(
            f"{len(failures)} historical batch(es) failed twice (first: {failures[0].label}: "
            f"{failures[0].error}; tracebacks in {path}); re-run the same command to retry them."
        )
    from controller.training.fitting import FitSpec, fit_residual

    fit = fit_residual(
        FitSpec(
            data=str(hist_dir / "*" / "trajectory.csv"),
            model=DEFAULT_PROCESS,
            seed=spec.seed,
            # the hybrid MPC learns the running batch through the residual's batch effect
            # (controller/laws/control.py), or, with --hybrid-adapt, fits the patient parameters
            # with a residual trained against adapted models (docs/hybrid.md)
            adapt="auto" if spec.hybrid_adapt else "none",
        )
    )
    summary = fit.save(residual, hist_dir / "fit")
    log.info(
        "fitted the historical residual (batch effect %s) on %d points from %d batches: "
        "24 h-ahead RMSE on %d held-out batches mechanistic %.3f, hybrid %.3f 1e6 cells/mL",
        fit.batch_effect,
        fit.training_points,
        len(fit.training_batches),
        len(fit.held_out_batches),
        summary["rmse_mechanistic"],
        summary["rmse_hybrid"],
    )
    return residual


# ------------------------------------------------------------------------ campaign


def run_campaign(
    spec: CampaignSpec,
    out: Path,
    *,
    workers: int | None = None,
    address: str | None = None,
    runtime_env: dict[str, Any] | None = None,
) -> CampaignResult:
    """Run (or resume) a campaign into ``out`` and write its tables and plots.

    Args:
        spec: what to run.
        out: campaign folder (created; a folder with another manifest is refused).
        workers: Ray CPUs of the local instance (default: all cores), and the most runs in
            flight at once on a cluster.
        address: an existing Ray cluster (``host:port`` of the head's GCS, ``ray://host:port``
            or ``auto``); default local. The nodes need the package installed (or shipped
            with ``runtime_env``), nothing else: the runs get the tuning and residual
            through Ray and send their files back to this process, which alone writes
            ``out``.
        runtime_env: Ray runtime environment of the campaign's tasks (e.g.
            ``{"py_modules": ["dist/hmpc-....whl"]}``), used when this call starts or
            connects to Ray.
    Raises:
        ConfigError: a manifest with other arguments. HmpcError: runs failed (re-run to
            retry them; the completed ones are kept).
    """
    t0 = time.perf_counter()
    # loaded once, here: a bad file is refused before any run, and the tasks get the values
    truth = (
        get_process(DEFAULT_PROCESS).load_truth_parameters(spec.truth)[0] if spec.truth else None
    )
    uses_mpc = any(c not in BASELINES for c in spec.controllers)
    mpc_config = b""
    if uses_mpc:
        from controller.numerics.mpc_config import load_mpc_config

        # refused here, naming the file, rather than on every node under a temporary name
        load_mpc_config(spec.mpc_config_path())
        mpc_config = spec.mpc_config_path().read_bytes()
    check_manifest(out, spec)
    cohort = PatientCohort(spec.patients, spec.seed, load_cohort_spec(spec.cohort)[0])
    # patient-major: an interrupted campaign has whole patients across the controllers
    keys = [(c, i, p) for i, p in enumerate(cohort) for c in spec.controllers]
    todo = [(c, i, p) for c, i, p in keys if _read_run(out / "runs" / c / p.patient_id) is None]
    skipped = len(keys) - len(todo)
    if skipped:
        log.info("resuming %s: %d of %d runs already complete", out, skipped, len(keys))
    failures: list[RunFailure] = []
    if todo:
        pool = _Pool(workers, address, runtime_env)
        try:
            residual: Path | None = None
            if any(c == "hybrid-mpc" for c, _, _ in todo):
                residual = train_historical_residual(spec, out, pool, truth)
            # the files go to the object store once; each task gets them from there
            config_ref = pool.put(mpc_config)
            residual_ref = pool.put(residual.read_bytes()) if residual else None
            jobs = [
                (
                    f"{c}/{p.patient_id}",
                    {
                        "controller": c,
                        "patient": p,
                        "index": i,
                        "sensor_seed": spec.seed * COHORT_STRIDE + i,
                        "days": spec.days,
                        "step_h": spec.step_h,
                        "mpc_config": config_ref,
                        "residual": residual_ref if c == "hybrid-mpc" else None,
                        "patient_parameters": (
                            HYBRID_PATIENT_PARAMETERS
                            if spec.hybrid_adapt and c == "hybrid-mpc"
                            else ()
                        ),
                        "truth": truth,
                    },
                )
                for c, i, p in todo
            ]
            failures = pool.run(
                jobs,
                desc="campaign",
                total=len(keys),
                done=skipped,
                on_result=lambda label, output: write_run(out / "runs" / label, output),
            )
        finally:
            pool.close()
    failures_path = write_failures(out, failures)
    if failures:
        raise HmpcError(
            f"{len(failures)} of {len(keys)} runs failed twice (first: {failures[0].label}: "
            f"{failures[0].error}); their tracebacks are in {failures_path}, the other runs "
            f"are saved in {out}/runs. Re-run the same command to retry the failed runs."
        )
    rows, timing = [], []
    for c, _, p in keys:
        data = _read_run(out / "runs" / c / p.patient_id)
        if data is None:
            raise HmpcError(f"run {c}/{p.patient_id} has no result; re-run the same command.")
        rows.append(data["row"])
        timing.append({"controller": c, "patient": p.patient_id, **data.get("timing", {})})
    runs = pd.DataFrame(rows)
    summary = summarize_campaign(runs)
    write_outputs(out, spec, runs, summary, pd.DataFrame(timing))
    return CampaignResult(out, runs, summary, len(todo), skipped, time.perf_counter() - t0)


# ------------------------------------------------------------------------ summary

#: summary.csv columns: (name, description) in table order.
SUMMARY_COLUMNS = (
    ("controller", "controller"),
    ("patients", "patients"),
    ("primary_objective", "mean dose score min(1, cells at harvest / dose)"),
    ("primary_ratio_to_oracle", "primary objective / the oracle's"),
    ("dose_attainment", "fraction reaching the dose by the scheduled harvest"),
    ("days_to_dose_median", "median days to dose (patients reaching it)"),
    ("cells_at_harvest_mean", "mean total viable cells at harvest, 1e9"),
    ("cells_at_harvest_cv", "CV of total viable cells at harvest across patients"),
    ("viability_at_harvest_mean", "mean viability at harvest"),
    ("lactate_time_in_spec", "mean fraction of time with lactate <= soft limit"),
    ("glucose_time_in_spec", "mean fraction of time with glucose >= soft limit"),
    ("media_used_mean", "mean media and feed used, L"),
    ("hard_violation_steps", "steps with a hard limit violated (all patients)"),
    ("patients_with_hard_violations", "patients with any hard-limit violation"),
    ("mpc_failures", "MPC steps that fell back (all patients)"),
)


def summarize_campaign(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per controller (in :data:`CONTROLLERS` order) with the domain.md metrics."""
    rows = []
    order = [c for c in CONTROLLERS if c in set(runs["controller"])]
    for c in order:
        r = runs[runs["controller"] == c]
        cells = r["cells_at_harvest"].astype(float)
        reached = r["days_to_dose"].dropna().astype(float)
        failures = r["mpc_failures"].dropna() if "mpc_failures" in r else pd.Series([], dtype=float)
        rows.append(
            {
                "controller": c,
                "patients": len(r),
                "primary_objective": float(r["primary_objective"].mean()),
                "primary_ratio_to_oracle": math.nan,
                "dose_attainment": float(r["dose_reached_by_harvest"].astype(bool).mean()),
                "days_to_dose_median": float(reached.median()) if len(reached) else math.nan,
                "cells_at_harvest_mean": float(cells.mean()),
                "cells_at_harvest_cv": float(cells.std(ddof=1) / cells.mean())
                if len(cells) > 1 and cells.mean() > 0
                else math.nan,
                "viability_at_harvest_mean": float(r["viability_at_harvest"].mean()),
                "lactate_time_in_spec": float(r["lactate_time_in_spec"].mean()),
                "glucose_time_in_spec": float(r["glucose_time_in_spec"].mean()),
                "media_used_mean": float(r["media_used"].mean()),
                "hard_violation_steps": int(r["hard_constraint_violations"].sum()),
                "patients_with_hard_violations": int((r["hard_constraint_violations"] > 0).sum()),
                "mpc_failures": int(failures.sum()) if len(failures) else math.nan,
            }
        )
    table = pd.DataFrame(rows, columns=[k for k, _ in SUMMARY_COLUMNS])
    if "oracle" in order:
        oracle = float(table.loc[table["controller"] == "oracle", "primary_objective"].iloc[0])
        if oracle > 0:
            table["primary_ratio_to_oracle"] = table["primary_objective"] / oracle
    return table


def check_targets(
    summary: pd.DataFrame, comparisons: pd.DataFrame | None = None
) -> list[tuple[str, bool | None, str]]:
    """The issue's targets for the hybrid MPC: (target, met or None if not assessable, detail).

    With ``comparisons`` (:func:`paired_comparisons`) the detail of each "beats" target also
    says whether the cohort tells the two controllers apart (sign test, bootstrap interval)."""
    by = {row["controller"]: row for _, row in summary.iterrows()}
    paired = (
        {row["controller"]: row for _, row in comparisons.iterrows()}
        if comparisons is not None
        else {}
    )
    hyb = by.get("hybrid-mpc")
    out: list[tuple[str, bool | None, str]] = []

    def val(c: str, k: str) -> float:
        return float(by[c][k]) if c in by else math.nan

    name = "hybrid MPC >= 95 % of the oracle on the primary objective"
    ratio = val("hybrid-mpc", "primary_ratio_to_oracle")
    out.append((name, None if math.isnan(ratio) else bool(ratio >= 0.95), f"ratio {ratio:.3f}"))
    for metric, label, better in (
        ("dose_attainment", "dose attainment", "higher"),
        ("cells_at_harvest_cv", "CV of cells at harvest", "lower"),
    ):
        for other in ("mechanistic-mpc", "recipe"):
            h, o = val("hybrid-mpc", metric), val(other, metric)
            met: bool | None
            if math.isnan(h) or math.isnan(o):
                met = None
            else:
                met = bool(h > o) if better == "higher" else bool(h < o)
            detail = f"{h:.3f} vs {o:.3f}"
            if other in paired:
                detail += "; " + _paired_detail(paired[other], metric)
            out.append((f"hybrid MPC beats {other} on {label} ({better})", met, detail))
    viol = int(hyb["hard_violation_steps"]) if hyb is not None else -1
    out.append(
        (
            "hybrid MPC: zero hard-constraint violations",
            None if hyb is None else viol == 0,
            f"{viol} violating steps" if hyb is not None else "not run",
        )
    )
    return out


#: comparisons.csv columns: (name, description) in table order.
COMPARISON_COLUMNS = (
    ("controller", "the controller the hybrid MPC is compared with, patient by patient"),
    ("patients", "patients run under both"),
    ("dose_only_hybrid", "patients reaching the dose under the hybrid MPC only"),
    ("dose_only_other", "patients reaching the dose under the other controller only"),
    (
        "dose_sign_test_p",
        "exact two-sided sign test (McNemar) on those discordant patients: how often a "
        "split at least this uneven comes from two equally good controllers",
    ),
    (
        "cv_difference",
        "CV of cells at harvest, hybrid minus other, in points (negative: hybrid lower)",
    ),
    ("cv_difference_low", "95 % paired-bootstrap interval of the CV difference, low end"),
    ("cv_difference_high", "95 % paired-bootstrap interval of the CV difference, high end"),
    ("primary_difference", "mean dose score, hybrid minus other"),
    ("primary_difference_low", "95 % paired-bootstrap interval of that difference, low end"),
    ("primary_difference_high", "95 % paired-bootstrap interval of that difference, high end"),
    (
        "days_to_dose_difference",
        "mean days to dose, hybrid minus other, over the patients reaching it under both "
        "(negative: hybrid sooner)",
    ),
    ("days_to_dose_difference_low", "95 % paired-bootstrap interval, low end"),
    ("days_to_dose_difference_high", "95 % paired-bootstrap interval, high end"),
    ("media_difference", "mean media used, hybrid minus other, L (negative: hybrid less)"),
    ("media_difference_low", "95 % paired-bootstrap interval, low end"),
    ("media_difference_high", "95 % paired-bootstrap interval, high end"),
)

#: Paired-bootstrap resamples of :func:`paired_comparisons` and their fixed seed (the same
#: runs give the same table).
BOOTSTRAP_RESAMPLES = 4000
BOOTSTRAP_SEED = 20261123


def _cv(cells: np.ndarray) -> np.ndarray:
    """CV along the last axis (ddof 1); NaN where the mean is not positive."""
    mean = cells.mean(axis=-1)
    std = cells.std(axis=-1, ddof=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(mean > 0, std / mean, np.nan)


def paired_comparisons(runs: pd.DataFrame) -> pd.DataFrame:
    """The hybrid MPC against every other controller on the same patients.

    The targets compare cohort figures (one or two patients apart on 50); this says whether
    such a difference is more than the luck of the cohort: for dose attainment, the exact
    sign test on the patients where exactly one of the two reaches the dose; for the CV of
    cells at harvest, the mean dose score, the mean media used and the mean days to dose
    (over the patients reaching it under both), a 95 % percentile interval from resampling
    the patients (both controllers on the same resample, :data:`BOOTSTRAP_RESAMPLES`, fixed
    seed). An interval that contains 0 means the cohort cannot tell the two apart.
    Empty when the hybrid MPC did not run."""
    from scipy.stats import binomtest

    reference = "hybrid-mpc"
    cols = [k for k, _ in COMPARISON_COLUMNS]
    if reference not in set(runs["controller"]):
        return pd.DataFrame(columns=cols)
    by = {
        c: runs[runs["controller"] == c].set_index("patient")
        for c in CONTROLLERS
        if c in set(runs["controller"])
    }
    ref = by[reference]
    rows = []
    for c, other in by.items():
        if c == reference:
            continue
        patients = sorted(set(ref.index) & set(other.index))
        n = len(patients)
        a, b = ref.loc[patients], other.loc[patients]
        reach_a = a["dose_reached_by_harvest"].astype(bool).to_numpy()
        reach_b = b["dose_reached_by_harvest"].astype(bool).to_numpy()
        only_a, only_b = int((reach_a & ~reach_b).sum()), int((reach_b & ~reach_a).sum())
        p = binomtest(only_a, only_a + only_b, 0.5).pvalue if only_a + only_b else 1.0
        row: dict[str, Any] = {
            "controller": c,
            "patients": n,
            "dose_only_hybrid": only_a,
            "dose_only_other": only_b,
            "dose_sign_test_p": float(p),
        }
        if n > 1:
            rng = np.random.default_rng(BOOTSTRAP_SEED)
            idx = rng.integers(0, n, size=(BOOTSTRAP_RESAMPLES, n))
            cells = _paired(a, b, "cells_at_harvest")
            cv = _cv(cells)
            cv_boot = _cv(cells[:, idx])  # (2, resamples)
            d_cv = cv_boot[0] - cv_boot[1]
            row |= {
                "cv_difference": float(cv[0] - cv[1]),
                "cv_difference_low": float(np.nanpercentile(d_cv, 2.5)),
                "cv_difference_high": float(np.nanpercentile(d_cv, 97.5)),
            }
            row |= _mean_difference("primary_difference", _paired(a, b, "primary_objective"), idx)
            row |= _mean_difference("media_difference", _paired(a, b, "media_used"), idx)
            days = _paired(a, b, "days_to_dose")
            both = ~np.isnan(days).any(axis=0)
            if both.sum() > 1:
                # drawn after the other resamples, so adding it left their intervals as they were
                m = int(both.sum())
                idx_both = rng.integers(0, m, size=(BOOTSTRAP_RESAMPLES, m))
                row |= _mean_difference("days_to_dose_difference", days[:, both], idx_both)
        rows.append(row)
    return pd.DataFrame(rows, columns=cols)


def _paired(a: pd.DataFrame, b: pd.DataFrame, column: str) -> np.ndarray:
    """``column`` of two controllers' runs on the same patients, as a (2, patients) array."""
    return np.stack([a[column].to_numpy(float), b[column].to_numpy(float)])


def _mean_difference(name: str, values: np.ndarray, idx: np.ndarray) -> dict[str, float]:
    """``values`` (2, patients): the mean of row 0 minus row 1, and its 95 % percentile
    interval over the resamples ``idx`` (resamples, patients) of the columns."""
    boot = values[0, idx].mean(axis=1) - values[1, idx].mean(axis=1)
    return {
        name: float(values[0].mean() - values[1].mean()),
        f"{name}_low": float(np.percentile(boot, 2.5)),
        f"{name}_high": float(np.percentile(boot, 97.5)),
    }


def _paired_detail(row: pd.Series, metric: str) -> str:
    """How far the cohort separates the two controllers on ``metric`` (a target's detail)."""
    if metric == "dose_attainment":
        p = float(row["dose_sign_test_p"])
        return (
            f"patients reaching the dose under one of the two only: hybrid "
            f"{int(row['dose_only_hybrid'])}, other {int(row['dose_only_other'])}; "
            f"sign test p = {p:.2f}"
            + (" (a difference)" if p < 0.05 else " (not distinguishable from a tie)")
        )
    low, high = float(row["cv_difference_low"]), float(row["cv_difference_high"])
    if math.isnan(low) or math.isnan(high):
        return "too few patients for an interval"
    apart = high < 0 or low > 0
    return (
        f"difference {100 * float(row['cv_difference']):+.1f} points, 95 % interval "
        f"[{100 * low:+.1f}, {100 * high:+.1f}]"
        + (" (a difference)" if apart else " (not distinguishable from a tie)")
    )


_COUNT_COLUMNS = (
    "patients",
    "hard_violation_steps",
    "patients_with_hard_violations",
    "mpc_failures",
    "dose_only_hybrid",
    "dose_only_other",
)


_PERCENT_COLUMNS = (
    "dose_attainment",
    "lactate_time_in_spec",
    "glucose_time_in_spec",
    "viability_at_harvest_mean",
    "cells_at_harvest_cv",
    "cv_difference",
    "cv_difference_low",
    "cv_difference_high",
)


def _fmt(value: Any, key: str) -> str:
    """A table cell: counts as integers, fractions as percentages, '-' for missing."""
    if isinstance(value, (bool, np.bool_)):
        return "yes" if value else "no"
    if value is None or (isinstance(value, (float, np.floating)) and math.isnan(value)):
        return "-"
    if not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    number = float(value)
    if key in _PERCENT_COLUMNS:
        return f"{100 * number:.1f} %"
    if key in _COUNT_COLUMNS:
        return str(round(number))
    if key.endswith("_p"):
        return f"{number:.2g}"
    if key.startswith("primary_"):
        return f"{number:.4f}"
    return f"{number:.3f}" if abs(number) < 10 else f"{number:.2f}"


def _markdown_table(frame: pd.DataFrame, columns: Sequence[tuple[str, str]]) -> list[str]:
    """A markdown table of ``frame`` (cells by :func:`_fmt`) and the list of its columns'
    meanings (``columns``: (name, description), the first one the row label)."""
    keys = [k for k, _ in columns]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += [
        "| " + " | ".join(_fmt(row[k], k) for k in keys) + " |" for _, row in frame.iterrows()
    ]
    return [*lines, "", "Columns:", "", *(f"- `{k}`: {d}" for k, d in columns[1:])]


def summary_markdown(
    spec: CampaignSpec, summary: pd.DataFrame, comparisons: pd.DataFrame | None = None
) -> str:
    """``summary.md``: the command, the table, the metric definitions, the hybrid MPC against
    each controller patient by patient (``comparisons``), and the targets."""
    cmd = (
        f"hmpc-sim campaign --patients {spec.patients} --controllers "
        f"{','.join(spec.controllers)} --seed {spec.seed} --days {spec.days:g}"
        + (f" --historical {spec.historical_patients}" if "hybrid-mpc" in spec.controllers else "")
        + (f" --mpc-config {spec.mpc_config}" if spec.mpc_config else "")
        + (f" --cohort {spec.cohort}" if spec.cohort else "")
        + (f" --truth {spec.truth}" if spec.truth else "")
        + (" --hybrid-adapt" if spec.hybrid_adapt else "")
        + " --out DIR"
    )
    lines = [
        f"# Campaign: {spec.patients} patient{'s' if spec.patients != 1 else ''} "
        f"(cohort seed {spec.seed}), {spec.days:g} days",
        "",
        "```",
        cmd,
        "```",
        "",
        *_markdown_table(summary, SUMMARY_COLUMNS),
    ]
    if comparisons is not None and len(comparisons):
        lines += [
            "",
            "Hybrid MPC against each controller, patient by patient (`comparisons.csv`):",
            "",
            *_markdown_table(comparisons, COMPARISON_COLUMNS),
        ]
    if "hybrid-mpc" in spec.controllers:
        source = HYBRID_ADAPT_RESIDUAL_SOURCE if spec.hybrid_adapt else HYBRID_RESIDUAL_SOURCE
        lines += [
            "",
            f"Hybrid MPC residual: {source}; historical cohort of "
            f"{spec.historical_patients} patients (seed {spec.historical_seed}) in "
            "`historical/`, fitted by `hmpc fit` into `residual.npz`.",
            "",
            "Targets:",
            "",
        ]
        for name, met, detail in check_targets(summary, comparisons):
            mark = "not assessable" if met is None else ("met" if met else "NOT met")
            lines.append(f"- {name}: {mark} ({detail})")
    return "\n".join(lines) + "\n"


def plot_distributions(runs: pd.DataFrame, path: Path) -> None:
    """Box plots (with the patients as points) of the per-patient metrics per controller."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    order = [c for c in CONTROLLERS if c in set(runs["controller"])]
    panels = (
        ("primary_objective", "dose score min(1, cells/dose)"),
        ("cells_at_harvest", "total viable cells at harvest [1e9]"),
        ("days_to_dose", "days to dose"),
        ("viability_at_harvest", "viability at harvest"),
        ("media_used", "media used [L]"),
        ("lactate_time_in_spec", "lactate time in spec"),
    )
    fig, axes = plt.subplots(2, 3, figsize=(15, 8), constrained_layout=True)
    n = runs["patient"].nunique()
    fig.suptitle(f"Campaign: {n} patient{'s' if n != 1 else ''} per controller")
    rng = np.random.default_rng(0)
    for ax, (key, label) in zip(axes.ravel(), panels, strict=True):
        data = [runs.loc[runs["controller"] == c, key].dropna().astype(float) for c in order]
        ax.boxplot(
            [d.to_numpy() if len(d) else np.array([np.nan]) for d in data],
            tick_labels=order,
            showfliers=False,
        )
        for j, d in enumerate(data, start=1):
            ax.plot(j + rng.uniform(-0.15, 0.15, len(d)), d, "o", ms=3, alpha=0.5)
        if key == "cells_at_harvest" and len(runs):
            ax.axhline(float(runs["dose_cells"].iloc[0]), ls="--", c="g", label="dose")
            ax.legend(fontsize=8)
        ax.set_title(label)
        ax.tick_params(axis="x", labelrotation=20)
        ax.grid(alpha=0.3)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_outputs(
    out: Path, spec: CampaignSpec, runs: pd.DataFrame, summary: pd.DataFrame, timing: pd.DataFrame
) -> None:
    """Per-patient CSVs, summary.csv/.md, comparisons.csv (with the hybrid MPC),
    distributions.png, timing.csv."""
    for c in summary["controller"]:
        _atomic_write(
            out / "patients" / f"{c}.csv",
            runs[runs["controller"] == c].to_csv(index=False, float_format="%.6g"),
        )
    _atomic_write(out / "summary.csv", summary.to_csv(index=False, float_format="%.6g"))
    comparisons = paired_comparisons(runs)
    if len(comparisons):
        _atomic_write(out / "comparisons.csv", comparisons.to_csv(index=False, float_format="%.6g"))
    _atomic_write(out / "summary.md", summary_markdown(spec, summary, comparisons))
    _atomic_write(out / "timing.csv", timing.to_csv(index=False, float_format="%.4g"))
    plot_distributions(runs, out / "distributions.png")


# ------------------------------------------------------------------------ CLI


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} must be at least 1")
    return value


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not JSON ({exc})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"{text!r} is not a JSON object {{...}}")
    return value


def add_campaign_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``hmpc-sim campaign``."""
    p = sub.add_parser(
        "campaign",
        help="every patient of a seeded cohort under every controller, on Ray (resumable)",
    )
    p.add_argument("--patients", type=_positive_int, default=10, help="held-out patients")
    p.add_argument(
        "--controllers",
        default=",".join(CONTROLLERS),
        help=f"comma-separated, from {','.join(CONTROLLERS)} (default: all)",
    )
    p.add_argument("--seed", type=int, default=1, help="cohort seed of the held-out patients")
    p.add_argument("--out", type=Path, required=True, help="campaign folder (resumable)")
    p.add_argument(
        "--workers", type=_positive_int, default=None, help="Ray workers (default: all cores)"
    )
    p.add_argument(
        "--address",
        default=None,
        help="existing Ray cluster: HEAD:6379, ray://HEAD:10001 or auto (default: a local Ray "
        "started and stopped here); the nodes need only the package (docs/campaigns.md)",
    )
    p.add_argument(
        "--runtime-env",
        type=_json_object,
        default=None,
        metavar="JSON",
        help='Ray runtime environment of the runs, e.g. \'{"py_modules": ["dist/hmpc.whl"]}\' '
        "to ship the package to nodes that lack it (docs/campaigns.md)",
    )
    p.add_argument(
        "--days",
        type=_positive_float,
        default=None,
        help="batch length in days (default: the scheduled harvest)",
    )
    p.add_argument(
        "--historical",
        type=_positive_int,
        default=12,
        help="historical patients the hybrid MPC's residual is trained on",
    )
    p.add_argument(
        "--mpc-config",
        type=Path,
        default=None,
        help="MPC tuning file (TOML; default configs/mpc_tcell_hourly.toml)",
    )
    p.add_argument("--cohort", type=Path, default=None, help="patient distribution (TOML)")
    p.add_argument(
        "--truth",
        type=Path,
        default=None,
        help="truth-plant kinetics (TOML; default: the packaged "
        "plant_models/data/tcell_truth.toml)",
    )
    p.add_argument(
        "--hybrid-adapt",
        action="store_true",
        help="the hybrid MPC fits the running batch's patient parameters (growth rate, "
        "exhaustion threshold, lag), residual from hmpc fit --adapt auto",
    )
    p.set_defaults(func=cmd_campaign)


def cmd_campaign(args: argparse.Namespace) -> int:
    days = args.days
    if days is None:
        days = float(load_tcell_process()[0].harvest_time) / 24.0
    spec = CampaignSpec(
        patients=args.patients,
        controllers=parse_controllers(args.controllers),
        seed=args.seed,
        days=float(days),
        historical_patients=args.historical,
        mpc_config=str(args.mpc_config) if args.mpc_config else None,
        cohort=str(args.cohort) if args.cohort else None,
        hybrid_adapt=bool(args.hybrid_adapt),
        truth=str(args.truth) if args.truth else None,
    )
    try:
        result = run_campaign(
            spec,
            args.out,
            workers=args.workers,
            address=args.address,
            runtime_env=args.runtime_env,
        )
    except KeyboardInterrupt:
        print(
            f"interrupted; completed runs are kept in {args.out}/runs: re-run the same command "
            "to resume",
            file=sys.stderr,
        )
        return 130
    print(
        f"campaign {args.out}: {len(result.runs)} runs ({result.executed} run now, "
        f"{result.skipped} already complete) in {result.wall_time_s:.1f} s"
    )
    show = ["controller", "primary_ratio_to_oracle", "dose_attainment", "cells_at_harvest_cv"]
    print(result.summary[show].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    print(
        f"wrote {args.out}/summary.csv, summary.md, distributions.png, "
        "patients/<controller>.csv, runs/<controller>/<patient>/"
    )
    return 0

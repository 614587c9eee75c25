"""``hmpc-sim bench estimation``: how well the estimator tracks viable cells on a cohort.

Each virtual patient's batch runs once under the fixed-recipe baseline (the recipe has no
feedback, so the plant trajectory does not depend on the estimator); the recorded
measurement stream is then replayed through a fresh :class:`controller.numerics.estimator.Estimator`
per scenario. The estimator sees measurements only, never the truth; the truth is used to
score it. Scenarios:

- ``online_only``: online probes only (estimator without the probe-gain state, which
  nothing could observe); ``online_only_default_config``: the same data, default config;
- ``with_assays``: online probes and the daily assays, delivered hours late (default
  config: the probe gain is estimated);
- ``with_assays_gain_checked``: with the calibration check (:data:`GAIN_CHECK`): the
  probe is taken as calibrated until its assays disagree with it;
- ``with_assays_no_probe_gain``: without the probe-gain state;
- ``online_only_growth_noise``, ``with_assays_growth_noise``: the model error put on the
  growth rate instead of the viable cells (:func:`growth_noise_config`), a tuning proposal;
- ``assays_on_time``: the same assays delivered at their sample time (an ideal lab); equal
  to ``with_assays`` up to the few hours after each sample, by re-processing;
- ``assays_naive_at_arrival``: the assays used as if sampled when they arrive (what a
  filter without re-processing does), to show what the re-processing is worth;
- ``fault_<kind>``: ``with_assays`` with one fault kind of :mod:`sim.faults` injected;
  ``fault_drift_gain_checked``, ``fault_all_gain_checked``: with the calibration check;
  ``fault_drift_no_probe_gain``: a drifting probe and no probe-gain state;
  ``fault_drift_online_only``: a drifting probe and no assays;
- ``fault_all``: every fault kind at once;
- ``online_only_miscalibrated``, ``with_assays_miscalibrated``,
  ``with_assays_gain_checked_miscalibrated``: the same patients with a second recorded
  stream whose online viable-cell probe is off by a constant per-batch calibration factor
  (``ln(gain)`` normal with sd ``probe_calibration_sd``, 10 % by default: the probe's
  cells-per-signal factor is fitted on other batches and depends on cell size [check]).

Score: root-mean-square error of the present estimate of viable cells over every step of
every patient (1e6 cells/mL), plus viability and IL-2 (which only the assays measure).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from controller.numerics.estimator import Estimator, EstimatorConfig
from controller.numerics.measurements import Measurement
from plant_models.errors import ConfigError
from plant_models.process import DEFAULT_PROCESS, get_process
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process
from sim.baselines import make_baseline
from sim.closed_loop import default_limiter
from sim.faults import FAULT_KINDS, FaultInjector, default_fault
from sim.patients import PatientCohort, VirtualPatient
from sim.plant import VirtualBioreactor
from sim.sensors import SensorSpec, default_sensor_spec

__all__ = [
    "GAIN_CHECK",
    "RecordedStep",
    "add_bench_estimation",
    "growth_noise_config",
    "initial_estimate",
    "record_batch",
    "register",
    "run_estimation_benchmark",
    "run_estimator",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


@dataclasses.dataclass(frozen=True)
class RecordedStep:
    """One control step of a recorded batch.

    Attributes:
        time_h: culture age at the end of the step, h.
        inputs: inputs applied over the step that ends here.
        measurements: what arrived during the step (online readings and assays).
        truth: true states and derived values at ``time_h``.
    """

    time_h: float
    inputs: Mapping[str, float]
    measurements: tuple[Measurement, ...]
    truth: Mapping[str, float]


def record_batch(
    patient: VirtualPatient,
    *,
    seed: int,
    days: float = 8.0,
    step_h: float = 1.0,
    sensors: SensorSpec | None = None,
) -> list[RecordedStep]:
    """Run one T-cell batch under the recipe baseline and record the measurement stream
    (``sensors``: the plant's sensor specification; default: exactly calibrated probes)."""
    plant = VirtualBioreactor.for_process(DEFAULT_PROCESS, patient, seed=seed, sensors=sensors)
    controller = make_baseline("recipe", DEFAULT_PROCESS)
    limiter = default_limiter(plant)
    inputs = {n: plant.bounds[n][0] for n in plant.model.input_names}
    measurements = plant.initial_measurements()
    steps = [RecordedStep(0.0, dict(inputs), tuple(measurements), plant.true_values())]
    for _ in range(round(days * 24.0 / step_h)):
        proposed = controller.step(plant.time_h, measurements, inputs)
        inputs = limiter.apply(proposed, inputs, step_h)
        measurements = plant.step(inputs, step_h)
        steps.append(
            RecordedStep(plant.time_h, dict(inputs), tuple(measurements), plant.true_values())
        )
    return steps


def initial_estimate(model: TCellExpansionModel) -> tuple[dict[str, float], FloatArray]:
    """Prior at inoculation: the process specification, with the spread of the cohort.

    Seeding density is counted (10 %), viability is unknown within 70-98 % (dead cells
    +/- 0.1e6/mL); media composition is known.
    """
    x0 = model.initial_state()
    sd = {
        "viable_cells": 0.1 * x0["viable_cells"],
        "dead_cells": 0.1,
        "glucose": 1.0,
        "lactate": 0.3,
        "il2": 10.0,
        "inhibitor": 1.0,
        "volume": 0.01,
    }
    return x0, np.array([sd[n] ** 2 for n in model.state_names], dtype=float)


def run_estimator(
    model: TCellExpansionModel,
    steps: Sequence[RecordedStep],
    *,
    use_assays: bool = True,
    injector: FaultInjector | None = None,
    assay_timing: str = "late",
    config: EstimatorConfig | None = None,
) -> dict[str, Any]:
    """Replay a recorded batch through a new estimator; errors and decisions per step.

    Args:
        assay_timing: ``late`` (as delivered), ``on_time`` (delivered at the sample time)
            or ``naive`` (sample time replaced by the arrival time).

    Returns:
        ``errors`` (dict of arrays: estimate minus truth per step for viable_cells,
        viability, il2), ``growth_factor`` (array per step), ``rejected`` (reason ->
        count) and ``gain_estimated_from_h`` (the first step at which a probe gain was
        estimated, i.e. the calibration check fired or the gain was on from the start;
        None if never).
    """
    est = Estimator(model, config)
    x0, p0 = initial_estimate(model)
    est.initialize(x0, p0, time_h=steps[0].time_h)
    deliveries: list[list[Measurement]] = [list(s.measurements) for s in steps]
    if assay_timing == "on_time":
        times = [s.time_h for s in steps]
        moved: list[list[Measurement]] = [[m for m in d if m.source != "assay"] for d in deliveries]
        for d in deliveries:
            for m in d:
                if m.source == "assay":
                    k = int(np.searchsorted(times, m.sample_time - 1e-9))
                    moved[min(k, len(steps) - 1)].append(m)
        deliveries = moved
    elif assay_timing == "naive":
        deliveries = [
            [
                dataclasses.replace(m, sample_time=m.arrival_time) if m.source == "assay" else m
                for m in d
            ]
            for d in deliveries
        ]
    elif assay_timing != "late":
        raise ValueError(f"assay_timing {assay_timing!r}; expected late, on_time or naive")
    names = ("viable_cells", "viability", "il2")
    errors: dict[str, list[float]] = {n: [] for n in names}
    growth: list[float] = []
    rejected: dict[str, int] = {}
    alarm: float | None = None
    for step, delivered in zip(steps, deliveries, strict=True):
        batch = [m for m in delivered if use_assays or m.source == "online"]
        if injector is not None:
            batch = injector(step.time_h, batch)
        result = est.update(step.time_h, step.inputs, batch)
        for decision in result.rejected:
            rejected[decision.reason] = rejected.get(decision.reason, 0) + 1
        for n in names:
            errors[n].append(result.outputs[n] - step.truth[n])
        growth.append(result.growth_factor)
        if alarm is None and any(result.gains_estimated.values()):
            alarm = step.time_h
    return {
        "errors": {n: np.array(v) for n, v in errors.items()},
        "growth_factor": np.array(growth),
        "rejected": rejected,
        "gain_estimated_from_h": alarm,
    }


def _rmse(chunks: Sequence[FloatArray]) -> float:
    values = np.concatenate(list(chunks))
    return float(math.sqrt(float(np.mean(values**2))))


#: The calibration check as benchmarked (``gain_check_threshold``, ``gain_check_slack``).
GAIN_CHECK = {"gain_check_threshold": 2.5, "gain_check_slack": 1.0}


def growth_noise_config(config: EstimatorConfig) -> EstimatorConfig:
    """``config`` with the model error on the growth rate rather than on the viable cells:
    viable-cell process noise (0.002, 0.002) instead of (0.002, 0.01) per sqrt(h), and a
    growth-factor random walk of 0.03 instead of 0.01 per sqrt(h). The truth plant differs
    from the model in its growth rate (lag, exhaustion, the patient's mu_max), which a
    random walk on the cell number describes poorly. Not the default (see
    docs/estimation.md)."""
    noise = dict(config.process_noise)
    noise["viable_cells"] = (0.002, 0.002)
    return dataclasses.replace(config, process_noise=noise, factor_random_walk=0.03)


@dataclasses.dataclass(frozen=True)
class _Scenario:
    name: str
    use_assays: bool = True
    faults: tuple[str, ...] = ()
    timing: str = "late"
    # default, gain_checked, no_probe_gain, growth_noise (on no_probe_gain without assays)
    config: str = "default"
    # the recorded stream: exactly calibrated probe, or a per-batch calibration error
    miscalibrated: bool = False


def _scenarios(fault_kinds: Sequence[str]) -> list[_Scenario]:
    out = [
        # a site without assays cannot observe a probe gain: it runs without that state
        _Scenario("online_only", use_assays=False, config="no_probe_gain"),
        _Scenario("online_only_default_config", use_assays=False),
        _Scenario("with_assays"),
        _Scenario("with_assays_gain_checked", config="gain_checked"),
        _Scenario("with_assays_no_probe_gain", config="no_probe_gain"),
        _Scenario("online_only_growth_noise", use_assays=False, config="growth_noise_no_gain"),
        _Scenario("with_assays_growth_noise", config="growth_noise"),
        _Scenario("assays_on_time", timing="on_time"),
        _Scenario("assays_naive_at_arrival", timing="naive"),
    ]
    out += [_Scenario(f"fault_{k}", faults=(k,)) for k in fault_kinds]
    if "drift" in fault_kinds:
        out.append(_Scenario("fault_drift_gain_checked", faults=("drift",), config="gain_checked"))
        out.append(
            _Scenario("fault_drift_no_probe_gain", faults=("drift",), config="no_probe_gain")
        )
        out.append(
            _Scenario(
                "fault_drift_online_only",
                use_assays=False,
                faults=("drift",),
                config="no_probe_gain",
            )
        )
    out.append(_Scenario("fault_all", faults=tuple(fault_kinds)))
    out += [
        _Scenario(
            "online_only_miscalibrated",
            use_assays=False,
            config="no_probe_gain",
            miscalibrated=True,
        ),
        _Scenario("with_assays_miscalibrated", miscalibrated=True),
        _Scenario(
            "with_assays_gain_checked_miscalibrated", config="gain_checked", miscalibrated=True
        ),
    ]
    out.append(
        _Scenario("fault_all_gain_checked", faults=tuple(fault_kinds), config="gain_checked")
    )
    return out


def run_estimation_benchmark(
    patients: int = 20,
    *,
    seed: int = 0,
    days: float = 8.0,
    step_h: float = 1.0,
    fault_kinds: Sequence[str] = FAULT_KINDS,
    config: EstimatorConfig | None = None,
    probe_calibration_sd: float = 0.10,
) -> dict[str, Any]:
    """The estimation figures on a seeded cohort (see the module docstring); ``config``
    replaces the default estimator configuration (variants are derived from it);
    ``probe_calibration_sd``: sd of ln(gain) of the viable-cell probe in the
    ``*_miscalibrated`` scenarios."""
    t0 = time.perf_counter()
    miscalibrated_sensors = dataclasses.replace(
        default_sensor_spec(DEFAULT_PROCESS),
        online_calibration_sd={"viable_cells": probe_calibration_sd},
    )
    model = TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])
    default = config if config is not None else EstimatorConfig.for_model(model)
    no_gain = dataclasses.replace(default, online_gains=())
    configs = {
        "default": default,
        "gain_checked": dataclasses.replace(
            default,
            gain_check_threshold=GAIN_CHECK["gain_check_threshold"],
            gain_check_slack=GAIN_CHECK["gain_check_slack"],
        ),
        "no_probe_gain": no_gain,
        "growth_noise": growth_noise_config(default),
        "growth_noise_no_gain": growth_noise_config(no_gain),
    }
    cohort = PatientCohort(patients, seed)
    scenarios = _scenarios(fault_kinds)
    errors: dict[str, dict[str, list[FloatArray]]] = {s.name: {} for s in scenarios}
    rejected: dict[str, dict[str, int]] = {s.name: {} for s in scenarios}
    raw: list[FloatArray] = []
    growth_error: list[float] = []
    growth_prior_error: list[float] = []
    alarms: dict[str, list[float]] = {s.name: [] for s in scenarios}
    per_patient: dict[str, list[float]] = {
        "online_only": [],
        "with_assays": [],
        "with_assays_gain_checked": [],
        "with_assays_no_probe_gain": [],
        "online_only_miscalibrated": [],
        "with_assays_miscalibrated": [],
    }
    for i, patient in enumerate(cohort):
        streams = {
            False: record_batch(patient, seed=seed * 100003 + i, days=days, step_h=step_h),
            True: record_batch(
                patient,
                seed=seed * 100003 + i,
                days=days,
                step_h=step_h,
                sensors=miscalibrated_sensors,
            ),
        }
        raw.append(_raw_online_error(streams[False]))
        for sc in scenarios:
            steps = streams[sc.miscalibrated]
            injector = None
            if sc.faults:
                specs = [default_fault(k) for k in sc.faults]
                injector = FaultInjector(specs, seed=seed * 1009 + i)
            out = run_estimator(
                model,
                steps,
                use_assays=sc.use_assays,
                injector=injector,
                assay_timing=sc.timing,
                config=configs[sc.config],
            )
            for n, e in out["errors"].items():
                errors[sc.name].setdefault(n, []).append(e)
            for reason, count in out["rejected"].items():
                rejected[sc.name][reason] = rejected[sc.name].get(reason, 0) + count
            if out["gain_estimated_from_h"] is not None:
                alarms[sc.name].append(out["gain_estimated_from_h"])
            if sc.name in per_patient:
                per_patient[sc.name].append(_rmse([out["errors"]["viable_cells"]]))
            if sc.name == "with_assays":
                # the truth plant's factor on the nominal model's mu_max
                true_factor = patient.growth_factor * _truth_mu_max_ratio(model)
                growth_error.append(float(out["growth_factor"][-1] / true_factor - 1.0))
                growth_prior_error.append(1.0 / true_factor - 1.0)
    figures: dict[str, Any] = {}
    for sc in scenarios:
        for n in ("viable_cells", "viability", "il2"):
            figures[f"rmse_{n}_{sc.name}"] = _rmse(errors[sc.name][n])
    online = figures["rmse_viable_cells_online_only"]
    assays = figures["rmse_viable_cells_with_assays"]
    figures["rmse_viable_cells_raw_online"] = _rmse(raw)
    figures["rmse_reduction_from_assays"] = _reduction(assays, online)
    figures["rmse_reduction_from_assays_same_config"] = _reduction(
        figures["rmse_viable_cells_with_assays_no_probe_gain"], online
    )
    figures["rmse_reduction_from_assays_default_config"] = _reduction(
        assays, figures["rmse_viable_cells_online_only_default_config"]
    )
    figures["rmse_reduction_from_assays_gain_checked"] = _reduction(
        figures["rmse_viable_cells_with_assays_gain_checked"], online
    )
    figures["rmse_reduction_from_assays_growth_noise"] = _reduction(
        figures["rmse_viable_cells_with_assays_growth_noise"],
        figures["rmse_viable_cells_online_only_growth_noise"],
    )
    figures["rmse_reduction_from_assays_viability"] = _reduction(
        figures["rmse_viability_with_assays"], figures["rmse_viability_online_only"]
    )
    figures["patients_improved_by_assays"] = {
        name: int(
            sum(a < o for a, o in zip(per_patient[name], per_patient["online_only"], strict=True))
        )
        for name in ("with_assays", "with_assays_gain_checked", "with_assays_no_probe_gain")
    }
    figures["rmse_reduction_from_assays_miscalibrated_probe"] = _reduction(
        figures["rmse_viable_cells_with_assays_miscalibrated"],
        figures["rmse_viable_cells_online_only_miscalibrated"],
    )
    figures["patients_improved_by_assays_miscalibrated_probe"] = int(
        sum(
            a < o
            for a, o in zip(
                per_patient["with_assays_miscalibrated"],
                per_patient["online_only_miscalibrated"],
                strict=True,
            )
        )
    )
    if "drift" in fault_kinds:
        figures["rmse_reduction_from_assays_under_probe_drift"] = _reduction(
            figures["rmse_viable_cells_fault_drift"],
            figures["rmse_viable_cells_fault_drift_online_only"],
        )
    # the calibration check: patients in which it fired, and when (h)
    figures["gain_check_fired"] = {
        name: {
            "patients": len(times),
            "mean_time_h": float(np.mean(times)) if times else None,
        }
        for name, times in alarms.items()
        if _sc_config(scenarios, name) == "gain_checked"
    }
    figures["growth_factor_final_abs_relative_error_mean"] = float(np.mean(np.abs(growth_error)))
    figures["growth_factor_prior_abs_relative_error_mean"] = float(
        np.mean(np.abs(growth_prior_error))
    )
    figures["rejected"] = rejected
    figures["units"] = {"viable_cells": "1e6 cells/mL", "viability": "1", "il2": "IU/mL"}
    figures["notes"] = {
        "online_only": "estimator without the probe-gain state (unobservable without assays)",
        "online_only_default_config": "default configuration (with probe gain), no assays",
        "with_assays": "default configuration, assays delivered hours after sampling",
        "with_assays_gain_checked": f"calibration check {GAIN_CHECK}",
        "rmse_reduction_from_assays": "1 - with_assays / online_only (viable cells)",
        "rmse_reduction_from_assays_same_config": "1 - with_assays_no_probe_gain / online_only",
        "rmse_reduction_from_assays_default_config": (
            "1 - with_assays / online_only_default_config"
        ),
        "rmse_reduction_from_assays_gain_checked": "1 - with_assays_gain_checked / online_only",
        "rmse_reduction_from_assays_growth_noise": (
            "1 - with_assays_growth_noise / online_only_growth_noise"
        ),
        "patients_improved_by_assays": (
            "per scenario: patients whose viable-cell RMSE is below online_only's"
        ),
        "rmse_reduction_from_assays_miscalibrated_probe": (
            "1 - with_assays_miscalibrated / online_only_miscalibrated (probe off by a "
            "constant per-batch factor, ln-sd probe_calibration_sd)"
        ),
        "rmse_reduction_from_assays_under_probe_drift": (
            "1 - fault_drift / fault_drift_online_only (probe gain drifting +4 %/day)"
        ),
        "gain_check_fired": (
            "per scenario: patients in which the calibration check fired, mean time (h)"
        ),
        "rmse": "present estimate vs truth, every step of every patient, pooled",
    }
    figures["setup"] = {
        "patients": patients,
        "cohort_seed": seed,
        "days": days,
        "step_h": step_h,
        "controller": "recipe",
        "model": "tcell (nominal parameters; the truth plant is mismatched)",
        "fault_kinds": list(fault_kinds),
        "probe_calibration_sd": probe_calibration_sd,
        "wall_time_s": round(time.perf_counter() - t0, 2),
    }
    return figures


def _sc_config(scenarios: Sequence[_Scenario], name: str) -> str:
    return next(s.config for s in scenarios if s.name == name)


def _reduction(new: float, old: float) -> float:
    return 1.0 - new / old if old > 0 else 0.0


def _truth_mu_max_ratio(model: TCellExpansionModel) -> float:
    return get_process(DEFAULT_PROCESS).load_truth_parameters()[0].mu_max / model.parameters.mu_max


def _raw_online_error(steps: Sequence[RecordedStep]) -> FloatArray:
    """Latest online viable-cell reading minus truth per step (no estimator)."""
    out = []
    last = math.nan
    for s in steps:
        for m in s.measurements:
            if m.source == "online" and m.name == "viable_cells":
                last = m.value
        out.append(last - s.truth["viable_cells"])
    return np.array(out)


# -- command line ---------------------------------------------------------------------
def add_bench_estimation(bench_subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``estimation`` to the sub-parsers of the ``bench`` command."""
    p = bench_subparsers.add_parser(
        "estimation", help="estimator accuracy with late assays and sensor faults"
    )
    p.add_argument("--patients", type=int, default=20, help="virtual patients (default 20)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed")
    p.add_argument("--days", type=float, default=8.0, help="batch length, days")
    p.add_argument("--step-hours", type=float, default=1.0, help="sample period, h")
    p.add_argument(
        "--probe-calibration-sd",
        type=float,
        default=0.10,
        help="sd of ln(gain) of the viable-cell probe in the *_miscalibrated scenarios",
    )
    p.add_argument("--json", type=Path, required=True, help="write the figures here")
    p.set_defaults(func=cmd_bench_estimation)


def register(subparsers: argparse._SubParsersAction[Any]) -> None:
    """``sim.cli.EXTRA_COMMANDS`` hook: add ``bench`` (unless another module has) and
    ``bench estimation``."""
    bench = subparsers.choices.get("bench")
    if bench is None:
        bench = subparsers.add_parser("bench", help="benchmarks")
    bench_sub = next((a for a in bench._actions if isinstance(a, argparse._SubParsersAction)), None)
    if bench_sub is None:
        bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    add_bench_estimation(bench_sub)


def cmd_bench_estimation(args: argparse.Namespace) -> int:
    """Run the benchmark, write the JSON and print the figures."""
    if args.patients < 1:
        raise ConfigError(f"--patients must be at least 1, got {args.patients}")
    if not (args.days > 0 and args.step_hours > 0):
        raise ConfigError("--days and --step-hours must be positive")
    if not (math.isfinite(args.probe_calibration_sd) and args.probe_calibration_sd >= 0):
        raise ConfigError(
            f"--probe-calibration-sd must be a number >= 0, got {args.probe_calibration_sd}"
        )
    # every injected fault is rejected with a warning; thousands of them would bury the
    # figures, so they are shown only with --verbose
    quiet = [
        logging.getLogger(n)
        for n in ("controller.numerics.validation", "controller.numerics.estimator")
    ]
    levels = [q.level for q in quiet]
    if not getattr(args, "verbose", False):
        for q in quiet:
            q.setLevel(logging.ERROR)
    try:
        figures = run_estimation_benchmark(
            args.patients,
            seed=args.seed,
            days=args.days,
            step_h=args.step_hours,
            probe_calibration_sd=args.probe_calibration_sd,
        )
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    print(f"estimation benchmark, {args.patients} patients, recipe controller")
    print("RMSE of viable cells (1e6 cells/mL):")
    for key in sorted(k for k in figures if k.startswith("rmse_viable_cells_")):
        print(f"  {key.removeprefix('rmse_viable_cells_'):<26} {figures[key]:.4f}")
    better = figures["patients_improved_by_assays"]
    print(
        f"RMSE reduction from assays: {figures['rmse_reduction_from_assays']:.1%} (default "
        f"config, {better['with_assays']}/{args.patients} patients better), "
        f"{figures['rmse_reduction_from_assays_gain_checked']:.1%} with the calibration check "
        f"({better['with_assays_gain_checked']}/{args.patients}), "
        f"{figures['rmse_reduction_from_assays_same_config']:.1%} without the probe-gain state "
        f"({better['with_assays_no_probe_gain']}/{args.patients})"
    )
    print(
        "RMSE reduction from assays when the probe is off by a per-batch calibration "
        f"factor: {figures['rmse_reduction_from_assays_miscalibrated_probe']:.1%} "
        f"({figures['patients_improved_by_assays_miscalibrated_probe']}/{args.patients} "
        "patients better)"
    )
    if "rmse_reduction_from_assays_under_probe_drift" in figures:
        drift = figures["rmse_reduction_from_assays_under_probe_drift"]
        print(f"RMSE reduction from assays when the probe drifts: {drift:.1%}")
    print(
        f"viability RMSE: online only {figures['rmse_viability_online_only']:.4f}, "
        f"with assays {figures['rmse_viability_with_assays']:.4f}; IL-2 RMSE: online only "
        f"{figures['rmse_il2_online_only']:.2f}, with assays {figures['rmse_il2_with_assays']:.2f}"
    )
    print(f"wrote {args.json} ({figures['setup']['wall_time_s']} s)")
    return 0

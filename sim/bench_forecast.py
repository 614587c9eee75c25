"""``hmpc-sim bench forecast``: does the 90 % harvest-forecast interval made 48 h ahead
contain the time the patient's dose is actually reached?

Each virtual patient's batch runs once in closed loop (:func:`sim.closed_loop.run_closed_loop`,
the rule baseline by default) for long enough to reach the dose; the measurements the
plant's sensors delivered are recorded on the way. The estimator
(:class:`controller.numerics.estimator.Estimator`, default tuning) is run on those
measurements only;
at the last control step at least ``--lead-hours`` (48) before the true dose-reached time
the :class:`controller.numerics.forecast.HarvestForecaster` forecasts from the estimate, with the
inputs of that step held (or, for an MPC controller, its predicted inputs). The truth is
used only to score: coverage = fraction of patients whose true dose-reached time lies in
the forecast interval, plus interval widths, errors of the median and of the harvest-yield
interval at the scheduled harvest.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

from controller.numerics.estimator import Estimator, EstimatorConfig
from controller.numerics.forecast import ForecastConfig, HarvestForecaster, InputPlan, InputPolicy
from controller.numerics.measurements import Measurement
from plant_models.errors import ConfigError
from plant_models.process import DEFAULT_PROCESS
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process
from sim.baselines import RecipeController, RuleController, make_baseline
from sim.bench_estimation import initial_estimate
from sim.closed_loop import run_closed_loop
from sim.patients import PatientCohort, VirtualPatient
from sim.plant import VirtualBioreactor

__all__ = ["PatientForecast", "add_bench_forecast", "forecast_patient", "run_forecast_benchmark"]

log = logging.getLogger(__name__)

CONTROLLERS = ("rule", "recipe", "mechanistic-mpc")
PLANS = ("controller", "hold")


@dataclasses.dataclass(frozen=True)
class PatientForecast:
    """The forecast of one patient and the truth it is scored against."""

    patient_id: str
    growth_factor: float
    actual_dose_time_h: float | None
    forecast_time_h: float | None
    dose_time_h: float | None
    dose_time_low_h: float | None
    dose_time_high_h: float | None
    covered: bool | None
    probability_dose_by_harvest: float | None
    dose_by_harvest: bool
    harvest_cells_true: float
    harvest_cells: float | None
    harvest_cells_low: float | None
    harvest_cells_high: float | None
    harvest_covered: bool | None
    forecast_s: float | None
    note: str = ""


def rule_policy(
    rule: RuleController, model: TCellExpansionModel, bounds: dict[str, tuple[float, float]]
) -> InputPolicy:
    """The T-cell rule baseline's law on every forecast member (its state read as if
    measured), clipped to the process bounds: the inputs the rule would apply."""
    names = model.state_names
    iv, ig, il, i2 = (names.index(n) for n in ("viable_cells", "glucose", "lactate", "il2"))
    low = np.array([bounds[n][0] for n in model.input_names])
    high = np.array([bounds[n][1] for n in model.input_names])
    order = [model.input_names.index(n) for n in ("perfusion_rate", "glucose_feed", "il2_addition")]

    rule_settings = rule.settings  # the T-cell rule's (plant_models.processes.tcell.TCellRule)

    def policy(time_h: float, states: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        rule = rule_settings
        perfusion = np.maximum(rule.minimum_perfusion, rule.cell_specific_perfusion * states[:, iv])
        lactate = states[:, il]
        perfusion = perfusion + np.where(
            lactate > rule.lactate_target, rule.lactate_gain * (lactate - rule.lactate_target), 0.0
        )
        feed = np.maximum(0.0, rule.glucose_gain * (rule.glucose_target - states[:, ig]))
        il2 = np.where(states[:, i2] < rule.il2_target, rule.il2_dose, 0.0)
        u = np.empty((states.shape[0], len(order)))
        u[:, order[0]], u[:, order[1]], u[:, order[2]] = perfusion, feed, il2
        return np.clip(u, low, high)

    return policy


def recipe_plan(recipe: RecipeController, model: TCellExpansionModel) -> InputPlan:
    """The fixed recipe as an input plan (it is known in advance)."""
    starts = sorted({float(t) for rows in recipe.schedules.values() for t, _ in rows})
    values = [
        [
            next(v for t, v in reversed(list(recipe.schedules[n])) if t <= start)
            for n in model.input_names
        ]
        for start in starts
    ]
    return InputPlan(model.input_names, np.array(starts), np.array(values, dtype=float))


def _true_dose_time(df: pd.DataFrame, dose: float) -> float | None:
    """First time the true total viable cells reach the dose (linear in log cells)."""
    t = df["time"].to_numpy(dtype=float)
    c = df["total_viable_cells"].to_numpy(dtype=float)
    hits = np.flatnonzero(c >= dose)
    if hits.size == 0:
        return None
    k = int(hits[0])
    if k == 0:
        return float(t[0])
    frac = (math.log(dose) - math.log(c[k - 1])) / (math.log(c[k]) - math.log(c[k - 1]))
    return float(t[k - 1] + frac * (t[k] - t[k - 1]))


def forecast_patient(
    patient: VirtualPatient,
    *,
    model: TCellExpansionModel,
    forecaster: HarvestForecaster,
    estimator_config: EstimatorConfig,
    controller_name: str = "rule",
    sensor_seed: int = 0,
    days: float = 12.0,
    lead_h: float = 48.0,
    input_plan: str = "controller",
) -> PatientForecast:
    """Run one batch, the estimator on its measurements and the forecast ``lead_h`` ahead."""
    plant = VirtualBioreactor.for_process(DEFAULT_PROCESS, patient, seed=sensor_seed)
    process = plant.process
    dose, harvest = float(process.dose_cells), float(process.harvest_time)
    delivered: list[tuple[float, list[Measurement]]] = []

    def record(time_h: float, ms: list[Any]) -> list[Any]:
        delivered.append((time_h, list(ms)))
        return ms

    controller: Any
    if controller_name == "mechanistic-mpc":
        from sim.mpc_controllers import make_mpc_controller

        controller = make_mpc_controller("mechanistic-mpc", plant)
    else:
        controller = make_baseline(controller_name, DEFAULT_PROCESS)
    df = run_closed_loop(plant, controller, days=days, measurement_filter=record)
    actual = _true_dose_time(df, dose)
    truth_harvest = float(np.interp(harvest, df["time"], df["total_viable_cells"]))
    base: dict[str, Any] = {
        "patient_id": patient.patient_id,
        "growth_factor": patient.growth_factor,
        "actual_dose_time_h": actual,
        "dose_by_harvest": actual is not None and actual <= harvest,
        "harvest_cells_true": truth_harvest,
    }
    empty: dict[str, Any] = {
        "forecast_time_h": None,
        "dose_time_h": None,
        "dose_time_low_h": None,
        "dose_time_high_h": None,
        "covered": None,
        "probability_dose_by_harvest": None,
        "harvest_cells": None,
        "harvest_cells_low": None,
        "harvest_cells_high": None,
        "harvest_covered": None,
        "forecast_s": None,
    }
    if actual is None:
        return PatientForecast(**base, **empty, note=f"dose not reached in {days:g} days")
    target = actual - lead_h
    times = df["time"].to_numpy(dtype=float)
    if target < times[0]:
        return PatientForecast(**base, **empty, note=f"dose reached before {lead_h:g} h")
    names = model.input_names
    est = Estimator(model, estimator_config)
    x0, p0 = initial_estimate(model)
    est.initialize(x0, p0, time_h=float(times[0]))
    result = None
    k_f = int(np.flatnonzero(times <= target + 1e-9)[-1])
    for k, (t_k, ms) in enumerate(delivered[: k_f + 1]):
        applied = {n: float(df[n].iloc[max(k - 1, 0)]) for n in names}
        result = est.update(t_k, applied, ms)
    if result is None:  # k_f >= 0 always delivers at least the first step
        raise RuntimeError("no estimate")
    current = {n: float(df[n].iloc[k_f]) for n in names}
    plan: InputPlan | InputPolicy | None = None
    if input_plan == "hold":
        plan = None
    elif controller_name == "mechanistic-mpc":
        try:
            plan = InputPlan.from_mpc(controller.results[k_f])
        except ValueError:
            plan = None  # a failed solve: hold the applied inputs
    elif isinstance(controller, RuleController):
        plan = rule_policy(controller, model, plant.bounds)
    elif isinstance(controller, RecipeController):
        plan = recipe_plan(controller, model)
    fc = forecaster.forecast(
        result, inputs=current, plan=plan, dose_cells=dose, harvest_time_h=harvest
    )

    def num(v: float) -> float | None:
        return float(v) if math.isfinite(v) else None

    covered = fc.dose_time_low_h <= actual <= fc.dose_time_high_h
    return PatientForecast(
        **base,
        forecast_time_h=float(times[k_f]),
        dose_time_h=num(fc.dose_time_h),
        dose_time_low_h=num(fc.dose_time_low_h),
        dose_time_high_h=num(fc.dose_time_high_h),
        covered=bool(covered),
        probability_dose_by_harvest=fc.probability_dose_by_harvest,
        harvest_cells=fc.harvest_cells,
        harvest_cells_low=fc.harvest_cells_low,
        harvest_cells_high=fc.harvest_cells_high,
        harvest_covered=bool(fc.harvest_cells_low <= truth_harvest <= fc.harvest_cells_high)
        if fc.time_h <= harvest
        else None,
        forecast_s=fc.elapsed_s,
    )


def run_forecast_benchmark(
    patients: int = 20,
    *,
    seed: int = 0,
    controller: str = "rule",
    days: float = 12.0,
    lead_h: float = 48.0,
    config: ForecastConfig | None = None,
    input_plan: str = "controller",
) -> dict[str, Any]:
    """Forecast coverage figures on a seeded cohort (see the module docstring).

    Args:
        input_plan: ``controller`` (the controller's own future inputs: the rule's law on
            every member, the recipe schedule, the MPC's predicted inputs) or ``hold``
            (the present inputs held).
    """
    if controller not in CONTROLLERS:
        raise ConfigError(f"--controller {controller!r}; expected one of {', '.join(CONTROLLERS)}")
    if input_plan not in PLANS:
        raise ConfigError(f"--input-plan {input_plan!r}; expected one of {', '.join(PLANS)}")
    t0 = time.perf_counter()
    model = TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])
    est_config = EstimatorConfig.for_model(model)
    fc_config = config if config is not None else ForecastConfig.from_estimator(est_config)
    forecaster = HarvestForecaster(model, fc_config)
    rows = []
    for i, patient in enumerate(PatientCohort(patients, seed)):
        row = forecast_patient(
            patient,
            model=model,
            forecaster=forecaster,
            estimator_config=est_config,
            controller_name=controller,
            sensor_seed=seed * 100003 + i,
            days=days,
            lead_h=lead_h,
            input_plan=input_plan,
        )
        log.info("%s", row)
        rows.append(row)
    scored = [r for r in rows if r.covered is not None]
    widths = [
        r.dose_time_high_h - r.dose_time_low_h
        for r in scored
        if r.dose_time_high_h is not None and r.dose_time_low_h is not None
    ]
    errors = [
        r.dose_time_h - r.actual_dose_time_h
        for r in scored
        if r.dose_time_h is not None and r.actual_dose_time_h is not None
    ]
    harvest_scored = [r for r in scored if r.harvest_covered is not None]
    times_fc = [r.forecast_s for r in scored if r.forecast_s is not None]
    figures: dict[str, Any] = {
        "coverage": float(np.mean([r.covered for r in scored])) if scored else None,
        "target_coverage": 0.85,
        "level": fc_config.level,
        "patients": patients,
        "patients_scored": len(scored),
        "patients_not_scored": {r.patient_id: r.note for r in rows if r.covered is None},
        "interval_width_h_median": float(np.median(widths)) if widths else None,
        "interval_width_h_mean": float(np.mean(widths)) if widths else None,
        "interval_width_h_max": float(np.max(widths)) if widths else None,
        "unbounded_intervals": len(scored) - len(widths),
        "median_error_h_mean": float(np.mean(errors)) if errors else None,
        "median_abs_error_h_mean": float(np.mean(np.abs(errors))) if errors else None,
        "harvest_cells_coverage": float(np.mean([r.harvest_covered for r in harvest_scored]))
        if harvest_scored
        else None,
        "forecast_time_s_median": float(np.median(times_fc)) if times_fc else None,
        "forecast_time_s_max": float(np.max(times_fc)) if times_fc else None,
        "per_patient": [dataclasses.asdict(r) for r in rows],
        "units": {"time": "h", "cells": "1e9 cells"},
        "setup": {
            "cohort_seed": seed,
            "controller": controller,
            "days": days,
            "lead_h": lead_h,
            "members": fc_config.members,
            "factor_random_walk": fc_config.factor_random_walk,
            "process_noise": {k: list(v) for k, v in fc_config.process_noise.items()},
            "model": "tcell (nominal parameters; the truth plant is mismatched)",
            "estimator": "default EstimatorConfig.for_model, measurements only",
            "input_plan": "present inputs held"
            if input_plan == "hold"
            else {
                "rule": "the rule's law on every member",
                "recipe": "the recipe schedule",
                "mechanistic-mpc": "the MPC's predicted inputs",
            }[controller],
            "wall_time_s": round(time.perf_counter() - t0, 2),
        },
    }
    return figures


# -- command line ---------------------------------------------------------------------
def add_bench_forecast(bench_subparsers: argparse._SubParsersAction[Any]) -> None:
    """Add ``forecast`` to the sub-parsers of the ``bench`` command."""
    p = bench_subparsers.add_parser(
        "forecast", help="coverage of the harvest forecast interval made 48 h ahead"
    )
    p.add_argument("--patients", type=int, default=20, help="virtual patients (default 20)")
    p.add_argument("--seed", type=int, default=0, help="cohort seed")
    p.add_argument(
        "--controller", choices=CONTROLLERS, default="rule", help="closed-loop controller"
    )
    p.add_argument("--days", type=float, default=12.0, help="longest batch, days")
    p.add_argument("--lead-hours", type=float, default=48.0, help="forecast lead time, h")
    p.add_argument("--members", type=int, default=64, help="ensemble size (even)")
    p.add_argument(
        "--input-plan",
        choices=PLANS,
        default="controller",
        help="future inputs of the forecast: the controller's own (default) or the present held",
    )
    p.add_argument("--json", type=Path, required=True, help="write the figures here")
    p.set_defaults(func=cmd_bench_forecast)


def cmd_bench_forecast(args: argparse.Namespace) -> int:
    """Run the benchmark, write the JSON and print the figures."""
    if args.patients < 1:
        raise ConfigError(f"--patients must be at least 1, got {args.patients}")
    if not (args.days > 0 and args.lead_hours > 0):
        raise ConfigError("--days and --lead-hours must be positive")
    model = TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])
    config = ForecastConfig.from_estimator(EstimatorConfig.for_model(model), members=args.members)
    quiet = [
        logging.getLogger(n)
        for n in ("controller.numerics.validation", "controller.numerics.estimator")
    ]
    levels = [q.level for q in quiet]
    if not getattr(args, "verbose", False):
        for q in quiet:
            q.setLevel(logging.ERROR)
    try:
        figures = run_forecast_benchmark(
            args.patients,
            seed=args.seed,
            controller=args.controller,
            days=args.days,
            lead_h=args.lead_hours,
            config=config,
            input_plan=args.input_plan,
        )
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2, sort_keys=True) + "\n")
    _print(figures)
    print(f"wrote {args.json} ({figures['setup']['wall_time_s']} s)")
    return 0


def _print(figures: dict[str, Any]) -> None:
    s = figures["setup"]
    print(
        f"harvest forecast, {figures['patients']} patients, controller {s['controller']}, "
        f"{s['lead_h']:g} h ahead, {s['members']} members, future inputs: {s['input_plan']}"
    )
    print(" patient   actual   forecast [interval]          P(by harvest)  covered")
    for r in figures["per_patient"]:
        if r["covered"] is None:
            print(f" {r['patient_id']:<9} {r['note']}")
            continue
        print(
            f" {r['patient_id']:<9} {_h(r['actual_dose_time_h'])}   {_h(r['dose_time_h'])} "
            f"[{_h(r['dose_time_low_h'])}, {_h(r['dose_time_high_h'])}]      "
            f"{r['probability_dose_by_harvest']:.2f}        {'yes' if r['covered'] else 'NO'}"
        )
    cov = figures["coverage"]
    print(
        f"coverage of the {figures['level']:.0%} interval: "
        f"{'n/a' if cov is None else f'{cov:.0%}'} of {figures['patients_scored']} patients "
        f"(target >= {figures['target_coverage']:.0%})"
    )
    if figures["interval_width_h_median"] is not None:
        print(
            f"interval width: median {figures['interval_width_h_median']:.1f} h, max "
            f"{figures['interval_width_h_max']:.1f} h; error of the median: mean "
            f"{figures['median_error_h_mean']:+.1f} h, mean absolute "
            f"{figures['median_abs_error_h_mean']:.1f} h"
        )
    if figures["harvest_cells_coverage"] is not None:
        print(f"harvest-yield interval coverage: {figures['harvest_cells_coverage']:.0%}")
    if figures["forecast_time_s_median"] is not None:
        print(
            f"forecast time: median {figures['forecast_time_s_median'] * 1e3:.0f} ms, "
            f"max {figures['forecast_time_s_max'] * 1e3:.0f} ms"
        )


def _h(value: float | None) -> str:
    """A time for the table (``inf`` when not reached within the horizon)."""
    return f"{value:6.1f}" if value is not None else "   inf"

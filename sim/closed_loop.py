"""The closed loop: ``u = controller.step(y)``; limits; ``y = plant.step(u)``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import pandas as pd

from controller.limits import OutputLimiter
from sim.baselines import Controller
from sim.plant import VirtualBioreactor
from sim.sensors import Measurement

__all__ = ["UNITS", "default_limiter", "run_closed_loop", "summarize"]

log = logging.getLogger(__name__)

#: Units of the trajectory columns (written as a sidecar next to trajectory.csv).
UNITS: dict[str, str] = {
    "time": "h",
    "viability": "1",
    "total_viable_cells": "1e9 cells",
    "media_used": "L",
    "hard_violation": "1",
}


def default_limiter(plant: VirtualBioreactor) -> OutputLimiter:
    """Bounds and rate limits of the plant's process specification."""
    proc: Any = plant.process
    rates = {}
    if plant.kind == "tcell":
        rates = {"perfusion_rate": proc.perfusion_rate_limit}
    elif plant.kind == "cho":
        rates = {"feed_rate": proc.feed_rate_limit}
    return OutputLimiter(bounds=plant.bounds, rate_limits=rates)


def hard_violations(plant: VirtualBioreactor, values: Mapping[str, float]) -> list[str]:
    """Names of the hard process limits the true state violates now."""
    p: Any = plant.process
    out = []
    if values["glucose"] < p.glucose_low_hard:
        out.append("glucose_low")
    if values["lactate"] > p.lactate_high_hard:
        out.append("lactate_high")
    if values["volume"] > p.volume_max:
        out.append("volume_high")
    if plant.kind == "tcell" and values["glucose"] > p.glucose_high_hard:
        out.append("glucose_high")
    if plant.kind == "cho" and values["ammonia"] > p.ammonia_high_hard:
        out.append("ammonia_high")
    return out


def run_closed_loop(
    plant: VirtualBioreactor,
    controller: Controller,
    *,
    days: float,
    step_h: float = 1.0,
    limiter: OutputLimiter | None = None,
    measurement_filter: Callable[[float, list[Measurement]], list[Measurement]] | None = None,
) -> pd.DataFrame:
    """Run one batch; a row per step with the true state, the latest online measurements,
    the inputs applied over the following step, and cumulative media.
    ``measurement_filter`` (e.g. a fault injector) transforms what the sensors deliver
    before the controller sees it.

    The assays that arrived are kept in ``df.attrs["assays"]`` (a DataFrame) and the
    column units in ``df.attrs["units"]``.
    """
    if not (days > 0 and step_h > 0 and math.isfinite(days) and math.isfinite(step_h)):
        raise ValueError(f"days and step_h must be positive, got {days!r}, {step_h!r}")
    lim = limiter if limiter is not None else default_limiter(plant)
    n_steps = round(days * 24.0 / step_h)
    names = plant.model.input_names
    inputs = {n: plant.bounds[n][0] for n in names}

    def deliver(ms: list[Measurement]) -> list[Measurement]:
        return measurement_filter(plant.time_h, ms) if measurement_filter else ms

    measurements: list[Measurement] = deliver(plant.initial_measurements())
    assays: list[Measurement] = []
    online: dict[str, float] = {}
    media = 0.0
    rows: list[dict[str, float]] = []
    for k in range(n_steps + 1):
        t = plant.time_h
        for m in measurements:
            if m.source == "assay":
                assays.append(m)
            elif m.quality == "good" and math.isfinite(m.value):
                online[m.name] = m.value
        if k < n_steps:
            proposed = controller.step(t, measurements, inputs)
            inputs = lim.apply(proposed, inputs, step_h)
        truth = plant.true_values()
        violations = hard_violations(plant, truth)
        row: dict[str, float] = {"time": t, **truth}
        row.update({f"measured_{n}": v for n, v in online.items()})
        row.update(plant.true_rates(inputs))
        row.update(inputs)
        row["media_used"] = media
        row["hard_violation"] = float(bool(violations))
        rows.append(row)
        if k == n_steps:
            break
        media += _media_litres(plant, inputs, step_h)
        measurements = deliver(plant.step(inputs, step_h))
    df = pd.DataFrame(rows)
    df.attrs["units"] = _units(plant)
    df.attrs["assays"] = pd.DataFrame(
        [
            {
                "name": m.name,
                "value": m.value,
                "unit": m.unit,
                "sample_time": m.sample_time,
                "arrival_time": m.arrival_time,
            }
            for m in assays
        ],
        columns=["name", "value", "unit", "sample_time", "arrival_time"],
    )
    return df


def _media_litres(plant: VirtualBioreactor, inputs: Mapping[str, float], step_h: float) -> float:
    """Fresh media and feed used over one step, L."""
    volume = plant.true_values()["volume"]
    if plant.kind == "tcell":
        return (inputs["perfusion_rate"] / 24.0 * volume + inputs["glucose_feed"] / 1000.0) * step_h
    return inputs["feed_rate"] * step_h


def _units(plant: VirtualBioreactor) -> dict[str, str]:
    units = dict(UNITS)
    for spec in plant.model.states + plant.model.inputs + plant.model.rate_specs:
        units[spec.name] = spec.unit
        units[f"measured_{spec.name}"] = spec.unit
    return units


def summarize(df: pd.DataFrame, plant: VirtualBioreactor) -> dict[str, Any]:
    """Batch metrics (domain.md): expansion, final cells, viability, lactate, media,
    hard-constraint violations (steps with any hard limit violated), time to dose."""
    first, last = df.iloc[0], df.iloc[-1]
    proc: Any = plant.process
    summary: dict[str, Any] = {
        "patient": plant.patient.patient_id,
        "model": plant.kind,
        "fold_expansion": float(last["total_viable_cells"] / first["total_viable_cells"]),
        "final_viable_cells": float(last["total_viable_cells"]),
        "final_viable_cells_unit": "1e9 cells",
        "final_viability": float(last["viability"]),
        "peak_lactate": float(df["lactate"].max()),
        "min_glucose": float(df["glucose"].min()),
        "media_used": float(last["media_used"]),
        "media_used_unit": "L",
        "hard_constraint_violations": int(df["hard_violation"].sum()),
        "plant_clamped_inputs": int(plant.clamped_inputs),
        "duration_h": float(last["time"]),
    }
    summary["limits"] = {
        k: float(getattr(proc, k))
        for k in (
            "glucose_low_hard",
            "glucose_low_soft",
            "lactate_high_soft",
            "lactate_high_hard",
            "ammonia_high_hard",
        )
        if hasattr(proc, k)
    }
    if plant.kind == "tcell":
        reached = df.loc[df["total_viable_cells"] >= proc.dose_cells, "time"]
        summary["dose_cells"] = float(proc.dose_cells)
        summary["time_to_dose_h"] = float(reached.iloc[0]) if len(reached) else None
        summary["dose_reached_by_harvest"] = bool(
            len(reached) and float(reached.iloc[0]) <= proc.harvest_time
        )
        summary["lactate_time_in_spec"] = float((df["lactate"] <= proc.lactate_high_soft).mean())
        summary["glucose_time_in_spec"] = float((df["glucose"] >= proc.glucose_low_soft).mean())
    return summary

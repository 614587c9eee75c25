"""The closed loop: ``u = controller.step(y)``; limits; ``y = plant.step(u)``."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import pandas as pd

from controller.numerics.limits import OutputLimiter
from plant_models.process import ProcessPlugin
from sim.baselines import Controller
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


class Plant(Protocol):
    """What the closed loop needs of a plant: the virtual bioreactor
    (:class:`sim.plant.VirtualBioreactor`), an FMU (:class:`sim.fmu.FMUPlant`), or any
    other. It applies inputs for a step and delivers the measurements that arrived; the
    true state, where the plant knows it, is for scoring only (never for the controller).

    Attributes:
        plugin: the process plug-in (variables, limits, media).
        process: the process specification (limits, harvest time, dose).
        time_h: culture age, h.
        bounds: input -> (low, high) in canonical units.
        input_names: the inputs in the model's order.
        plant_id: the patient or batch the plant stands for.
        clamped_inputs: inputs the plant clamped to its bounds so far.
    """

    plugin: ProcessPlugin
    process: Any
    time_h: float
    bounds: dict[str, tuple[float, float]]
    clamped_inputs: int

    @property
    def input_names(self) -> tuple[str, ...]: ...

    @property
    def plant_id(self) -> str: ...

    def initial_measurements(self) -> list[Measurement]: ...

    def step(self, inputs: Mapping[str, float], dt_h: float) -> list[Measurement]: ...

    def true_values(self) -> dict[str, float]:
        """The true state with viability and total viable cells (for scoring)."""
        ...

    def true_rates(self, inputs: Mapping[str, float]) -> dict[str, float]:
        """The true kinetic rates now, where the plant knows them (else empty)."""
        ...

    def variable_units(self) -> dict[str, str]:
        """Canonical unit of every state, input and rate the plant reports."""
        ...


def default_limiter(plant: Plant) -> OutputLimiter:
    """Bounds and rate limits of the plant's process specification."""
    return OutputLimiter(bounds=plant.bounds, rate_limits=plant.plugin.rate_limits(plant.process))


def hard_violations(plant: Plant, values: Mapping[str, float]) -> list[str]:
    """Names of the hard process limits the true state violates now."""
    return plant.plugin.violations(plant.process, values)


def run_closed_loop(
    plant: Plant,
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
    names = plant.input_names
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
    df.attrs["inputs"] = tuple(names)
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


def _media_litres(plant: Plant, inputs: Mapping[str, float], step_h: float) -> float:
    """Fresh media and feed used over one step, L."""
    return plant.plugin.media_litres(inputs, plant.true_values(), step_h)


def _units(plant: Plant) -> dict[str, str]:
    units = dict(UNITS)
    for name, unit in plant.variable_units().items():
        units[name] = unit
        units[f"measured_{name}"] = unit
    return units


def summarize(df: pd.DataFrame, plant: Plant) -> dict[str, Any]:
    """Batch metrics (domain.md): expansion, final cells, viability, lactate, media,
    hard-constraint violations (steps with any hard limit violated), time to dose."""
    first, last = df.iloc[0], df.iloc[-1]
    proc: Any = plant.process
    summary: dict[str, Any] = {
        "patient": plant.plant_id,
        "model": plant.plugin.name,
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
    plugin = plant.plugin
    summary["limits"] = plugin.limit_values(proc)
    dose = plugin.dose_cells(proc)
    if dose is not None:
        reached = df.loc[df["total_viable_cells"] >= dose, "time"]
        summary["dose_cells"] = dose
        summary["time_to_dose_h"] = float(reached.iloc[0]) if len(reached) else None
        summary["dose_reached_by_harvest"] = bool(
            len(reached) and float(reached.iloc[0]) <= proc.harvest_time
        )
        # time within each soft limit
        for variable, side, limit in plugin.soft_limit_values(proc):
            inside = df[variable] <= limit if side == "high" else df[variable] >= limit
            summary[f"{variable}_time_in_spec"] = float(inside.mean())
    return summary

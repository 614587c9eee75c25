"""Training data for the residuals, from batch records.

A batch record is a CSV with one row per control step (the format ``hmpc-sim simulate``
writes, column headers ``name [unit]``; the units are checked and converted to the model's
canonical ones, :mod:`controller.training.record_units`) and optionally an ``assays.csv``
and a ``record.toml`` (the process values it ran with) beside it, or a vendor export read
through a mapping file (docs/records.md). Only
what a real plant records is used: online measurements (``measured_viable_cells``,
``measured_glucose``, ``measured_lactate``), the applied inputs, the volume, and the daily
assays (IL-2, viability); never the simulator's true states.

How the specific growth rate is estimated from noisy, sparse data (docs/gp.md):
1. ``ln(viable cells)`` is fitted by a straight line over a centred window (default 24 h,
   about 25 online points); its slope is the net growth rate ``g`` with a standard error
   of about ``noise / sqrt(sum (t - t_mean)^2)`` (0.0014 1/h for 5 % noise, hourly).
2. The specific growth rate is ``mu_obs = g + kd_model + d_feed``: the mechanistic death
   rate and the dilution by the feed volume are added back (perfusion retains the cells).
3. The residual target is ``mu_obs - mu_model`` (additive, column ``residual``) or
   ``mu_obs / mu_model - 1`` (multiplicative, column ``relative_residual``; only where
   ``mu_model`` exceeds ``min_model_rate``, NaN elsewhere) at the reconstructed state.
Unmeasured states are reconstructed: inhibitor = trapezoidal integral of the measured
viable cells, IL-2 and viability linearly interpolated between assays (held at the ends).
"""

from __future__ import annotations

import glob
import logging
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from controller.training.record_units import (
    ProcessValue,
    RecordMapping,
    canonical_record_units,
    column_factor,
    load_record_mapping,
    process_values,
    read_export,
)
from plant_models.base import MechanisticModel
from plant_models.config import check_keys, load_toml
from plant_models.errors import ConfigError, ModelError

__all__ = [
    "BatchRecord",
    "LogNoiseModel",
    "causal_log_cells",
    "estimate_log_noise",
    "forecast_windows",
    "growth_rate_observations",
    "load_batch_records",
    "read_batch_record",
    "reconstruct_states",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: The true viable-cell density column of simulated records (``hmpc-sim`` writes the plant's
#: state next to its measurements); real site records do not have it. When present, the
#: validation also scores the predictions against it (no probe noise on the compared value).
TRUE_CELLS = "viable_cells"
TRUE_CELLS_KEY = "true_viable_cells"

REQUIRED = ("time", "measured_viable_cells", "measured_glucose", "measured_lactate", "volume")
_HEADER = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(\[.*\])?\s*$")


class BatchRecord:
    """One batch: its step table and assays (columns name, value, sample_time), in the
    model's canonical units.

    Attributes:
        name: the batch's name (the record's folder for ``trajectory.csv``, else its stem).
        steps: ``time`` (h), ``measured_<state>``, ``volume``, the inputs (and
            ``true_viable_cells`` for simulated records).
        assays: ``name``, ``value``, ``sample_time`` (and ``unit``, canonical).
        process: process values the record declares (``record.toml`` beside it, or the
            mapping file's ``[process]``): name -> :class:`ProcessValue`.
        path: the file it was read from (None when built in memory).
    """

    def __init__(
        self,
        name: str,
        steps: pd.DataFrame,
        assays: pd.DataFrame,
        *,
        process: Mapping[str, ProcessValue] | None = None,
        path: Path | None = None,
    ) -> None:
        self.name = name
        self.steps = steps
        self.assays = assays
        self.process: dict[str, ProcessValue] = dict(process or {})
        self.path = path


def _declared_process(p: Path) -> dict[str, ProcessValue]:
    """The ``[process]`` table of the record's ``record.toml`` (``trajectory.csv``) or
    ``<stem>.toml`` (other names) beside it; empty when there is none."""
    meta = p.with_name("record.toml") if p.name == "trajectory.csv" else p.with_suffix(".toml")
    if not meta.exists():
        return {}
    data = load_toml(meta)
    check_keys(data, ["process", "meta"], str(meta))
    return process_values(data.get("process", {}), f"{meta} [process]")


def _canonical_columns(raw: pd.DataFrame, p: Path, model: MechanisticModel[object]) -> pd.DataFrame:
    """Strip the ``name [unit]`` headers to names, checking each stated unit against the
    canonical unit of its variable (``measured_X`` is X's) and converting the column; a
    column whose unit cannot be converted is refused, naming it. Columns that are no model
    variable keep their values; a header without a unit is taken as canonical."""
    units = canonical_record_units(model)
    names, factors = [], []
    for col in raw.columns:
        m = _HEADER.match(str(col))
        name = m.group(1) if m else str(col)
        unit = m.group(2)[1:-1].strip() if m and m.group(2) else None
        variable = name.removeprefix("measured_")
        factor = 1.0
        if unit is not None and variable in units:
            factor = column_factor(variable, unit, units[variable], f"{p}: column {str(col)!r}")
        names.append(name)
        factors.append(factor)
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"{p}: column(s) {dup} appear more than once.")
    raw.columns = names
    for name, factor in zip(names, factors, strict=True):
        if factor != 1.0:
            raw[name] = pd.to_numeric(raw[name], errors="coerce") * factor
    return raw


def _canonical_assays(
    assays: pd.DataFrame, where: Path, model: MechanisticModel[object]
) -> pd.DataFrame:
    """Check (and convert) the ``unit`` of every assay row whose name is a model variable;
    a unit that cannot be converted is refused, naming the file, the assay and the unit."""
    if "unit" not in assays.columns or len(assays) == 0:
        return assays
    units = canonical_record_units(model)
    out = assays.copy()
    values = out["value"].astype(float).to_numpy().copy()
    unit_col = out["unit"].astype(str).to_numpy().copy()
    for i, (name, unit) in enumerate(zip(out["name"].astype(str), unit_col, strict=True)):
        if name not in units or unit in ("", "nan"):
            continue
        values[i] *= column_factor(name, unit, units[name], f"{where}: assay {name!r}")
        unit_col[i] = units[name]
    out["value"] = values
    out["unit"] = unit_col
    return out


def read_batch_record(
    path: str | Path,
    model: MechanisticModel[object],
    *,
    mapping: str | Path | RecordMapping | None = None,
) -> BatchRecord:
    """Read one batch record, in the model's canonical units.

    Without ``mapping``: hmpc's own layout, a CSV whose headers are ``name [unit]`` (what
    ``hmpc-sim`` writes), with ``assays.csv`` (name, value, unit, sample_time) and
    ``record.toml`` (``[process]``) beside it when present. Every stated unit is checked
    against its variable's canonical unit and converted, or refused naming the column.
    With ``mapping`` (a mapping file or a loaded :class:`RecordMapping`): a vendor export
    (CSV, Excel, Parquet) read through it (:func:`read_export`).

    Raises:
        ConfigError: unreadable file, missing columns, a unit that cannot be converted
            (naming the file and the column), too few rows, time not increasing.
    """
    p = Path(path)
    if mapping is not None:
        rmap = (
            mapping if isinstance(mapping, RecordMapping) else load_record_mapping(mapping, model)
        )
        raw, assays = read_export(p, rmap, model)
        process = dict(rmap.process)
    else:
        try:
            raw = pd.read_csv(p)
        except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{p}: cannot be read as CSV ({exc}).") from None
        raw = _canonical_columns(raw, p, model)
        assay_path = p.with_name("assays.csv")
        if assay_path.exists():
            assays = pd.read_csv(assay_path)
            if not {"name", "value", "sample_time"} <= set(assays.columns):
                raise ConfigError(f"{assay_path}: needs columns name, value, sample_time.")
            assays = _canonical_assays(assays, assay_path, model)
        else:
            assays = pd.DataFrame(columns=["name", "value", "sample_time"])
        process = _declared_process(p)
    needed = list(REQUIRED) + list(model.input_names)
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        raise ConfigError(f"{p}: batch record lacks column(s) {missing}; required: {needed}.")
    if len(raw) < 3:
        raise ConfigError(f"{p}: batch record has {len(raw)} rows; at least 3 are needed.")
    steps = _finite_columns(raw, needed, p)
    if TRUE_CELLS in raw.columns:  # simulator records carry the true state as well
        steps[TRUE_CELLS_KEY] = pd.to_numeric(raw[TRUE_CELLS], errors="coerce").astype(float)
    if not np.all(np.diff(steps["time"].to_numpy()) > 0):
        raise ConfigError(f"{p}: time must increase strictly from row to row.")
    name = p.parent.name if p.name == "trajectory.csv" else p.stem
    return BatchRecord(name, steps, assays, process=process, path=p)


def _finite_columns(raw: pd.DataFrame, names: Sequence[str], p: Path) -> pd.DataFrame:
    """The columns ``names`` as floats; a cell that is not a finite number (text, an empty
    cell, nan, inf) is refused, naming the file, the column and the row: a record with a
    missing reading is cleaned by the site (drop the row), never guessed here."""
    out = pd.DataFrame(index=raw.index)
    for name in names:
        values = pd.to_numeric(raw[name], errors="coerce").astype(float)
        bad = ~np.isfinite(values.to_numpy())
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ConfigError(
                f"{p}: column {name!r} row {row + 2} (line in the file) holds "
                f"{raw[name].iloc[row]!r}, not a finite number ({int(bad.sum())} such cell(s)); "
                "drop or fix the row."
            )
        out[name] = values
    return out


def load_batch_records(
    pattern: str,
    model: MechanisticModel[object],
    *,
    mapping: str | Path | RecordMapping | None = None,
) -> list[BatchRecord]:
    """All batch records matching a glob pattern (``DIR/*.csv``, ``runs/*/trajectory.csv``,
    ``exports/*.parquet`` with a ``mapping``), in canonical units (:func:`read_batch_record`).
    ``assays.csv`` files are companions, not records, and are skipped."""
    paths = sorted(p for p in glob.glob(pattern) if Path(p).name != "assays.csv")
    if not paths:
        raise ConfigError(f"no batch records match {pattern!r}.")
    rmap = (
        load_record_mapping(mapping, model)
        if mapping is not None and not isinstance(mapping, RecordMapping)
        else mapping
    )
    return [read_batch_record(p, model, mapping=rmap) for p in paths]


def forecast_windows(
    t: FloatArray, horizon_h: float, every_h: float, first_h: float = 24.0
) -> Iterator[tuple[int, int]]:
    """Start and end row ``(i, end)`` of each ``horizon_h``-ahead prediction of a record with
    times ``t``: from day 1 (``first_h`` after the first row), one start every ``every_h``
    hours, while a row lies exactly ``horizon_h`` after the start (the validations of
    ``hmpc fit`` and ``hmpc calibrate`` use the same windows)."""
    next_start = t[0] + first_h
    for i in range(len(t)):
        if t[i] < next_start - 1e-9:
            continue
        end = int(np.searchsorted(t, t[i] + horizon_h - 1e-9))
        if end >= len(t) or abs(t[end] - t[i] - horizon_h) > 1e-6:
            return
        next_start = t[i] + every_h
        yield i, end


def _assay_series(record: BatchRecord, name: str, times: FloatArray, default: float) -> FloatArray:
    sel = record.assays[record.assays["name"] == name]
    if len(sel) == 0:
        return np.full(times.shape, default)
    means = sel.groupby("sample_time")["value"].mean().sort_index()  # duplicates averaged
    return np.interp(times, means.index.to_numpy(float), means.to_numpy(float))


def reconstruct_states(record: BatchRecord, model: MechanisticModel[object]) -> FloatArray:
    """Model states per step from measurements only. Shape (n_steps, nx)."""
    s = record.steps
    t = s["time"].to_numpy(float)
    viable = np.maximum(s["measured_viable_cells"].to_numpy(float), 1e-6)
    integral = np.concatenate([[0.0], np.cumsum(np.diff(t) * 0.5 * (viable[1:] + viable[:-1]))])
    values: dict[str, FloatArray] = {
        "viable_cells": viable,
        "glucose": s["measured_glucose"].to_numpy(float),
        "lactate": s["measured_lactate"].to_numpy(float),
        "inhibitor": integral,
        "volume": s["volume"].to_numpy(float),
    }
    process = getattr(model, "process", None)
    if "il2" in model.state_names:
        values["il2"] = _assay_series(record, "il2", t, float(getattr(process, "media_il2", 0.0)))
    viability = np.clip(_assay_series(record, "viability", t, 0.9), 0.05, 1.0)
    if "dead_cells" in model.state_names:
        values["dead_cells"] = viable * (1.0 - viability) / viability
    if "total_cells" in model.state_names:
        values["total_cells"] = viable / viability
    for name in model.state_names:
        if name not in values:
            assay = _assay_series(record, name, t, 0.0)
            values[name] = assay
    return np.column_stack([values[n] for n in model.state_names])


def growth_rate_observations(
    records: Sequence[BatchRecord],
    model: MechanisticModel[object],
    feature_names: Sequence[str],
    *,
    window_h: float = 24.0,
    every_h: float = 6.0,
    min_cells: float = 0.05,
    min_model_rate: float = 0.003,
) -> pd.DataFrame:
    """Observed specific growth rates and the mechanistic model's, with features.

    Returns a DataFrame with columns ``batch``, ``time`` (window centre, h), the features,
    ``growth_rate_observed``, ``growth_rate_model``, ``residual`` (observed minus model,
    1/h), ``relative_residual`` (observed / model - 1, NaN where the model's rate is below
    ``min_model_rate`` 1/h, where the ratio is noise) and ``available`` (the time the
    window closes, ``time + window_h / 2``: a running batch may use the row from then on),
    one row every ``every_h`` hours where a full window is available. ``growth_rate_se`` is
    the standard error of the window's slope (1/h, from the scatter of ln X about the line).
    """
    if window_h <= 0 or every_h <= 0:
        raise ModelError("window_h and every_h must be positive")
    rows = []
    for rec in records:
        x = reconstruct_states(rec, model)
        u = rec.steps[list(model.input_names)].to_numpy(float)
        t = rec.steps["time"].to_numpy(float)
        logx = np.log(np.maximum(rec.steps["measured_viable_cells"].to_numpy(float), 1e-6))
        half = window_h / 2.0
        next_time = t[0] + half
        for i, ti in enumerate(t):
            if ti < next_time - 1e-9 or ti + half > t[-1] + 1e-9:
                continue
            next_time = ti + every_h
            sel = (t >= ti - half) & (t <= ti + half)
            if sel.sum() < 5 or x[i, model.state_names.index("viable_cells")] < min_cells:
                continue
            coef = np.polyfit(t[sel], logx[sel], 1)
            slope = float(coef[0])
            fitted = np.polyval(coef, t[sel])
            spread = float(np.sum((t[sel] - t[sel].mean()) ** 2))
            slope_se = math.sqrt(
                float(np.sum((logx[sel] - fitted) ** 2)) / (int(sel.sum()) - 2) / spread
            )
            # use the window's mean inputs and the state at the centre
            uc = u[sel].mean(axis=0)
            r = model.rates_numpy(ti, x[i], uc)
            dilution = _feed_dilution(model, x[i], uc)
            observed = slope + r["death_rate"] + dilution
            feats = dict(zip(model.state_names, x[i], strict=True))
            feats.update(zip(model.input_names, uc, strict=True))
            feats["culture_age"] = ti
            row = {"batch": rec.name, "time": ti}
            try:
                row.update({f: float(feats[f]) for f in feature_names})
            except KeyError as exc:
                raise ConfigError(
                    f"unknown feature {exc.args[0]!r}; features are {sorted(feats)}."
                ) from None
            mu_model = r["growth_rate"]
            row.update(
                {
                    "growth_rate_observed": observed,
                    "growth_rate_model": mu_model,
                    "residual": observed - mu_model,
                    "relative_residual": (
                        observed / mu_model - 1.0 if mu_model > min_model_rate else np.nan
                    ),
                    "available": ti + half,
                    "growth_rate_se": slope_se,
                }
            )
            rows.append(row)
    if not rows:
        raise ConfigError(
            "the batch records hold no usable window for rate estimation "
            f"(window {window_h} h); are they long enough?"
        )
    return pd.DataFrame(rows)


def _feed_dilution(model: MechanisticModel[object], x: FloatArray, u: FloatArray) -> float:
    """Dilution rate of the viable cells by added volume (1/h), from the volume balance."""
    vol_index = model.state_names.index("volume")
    dx = model.rhs(0.0, x, u)
    return float(dx[vol_index] / max(x[vol_index], 1e-9))


class LogNoiseModel:
    """Measurement noise of ``ln(viable cells)`` as a function of the level ``X``:
    ``var(X) = c0 + c1 / X + c2 / X^2`` (a relative part, a cross term and an absolute part
    of the probe noise), coefficients >= 0.

    Estimated from batch records by :func:`estimate_log_noise`; used to put the measurement
    noise of the compared point (and of the start of a prediction) into the predictive band.
    """

    def __init__(self, coefficients: Sequence[float]) -> None:
        c = np.asarray(coefficients, dtype=float)
        if c.shape != (3,) or not np.all(np.isfinite(c)) or np.any(c < 0):
            raise ModelError(f"noise coefficients must be 3 finite numbers >= 0, got {c}")
        self.coefficients = c

    def variance(self, cells: npt.ArrayLike) -> FloatArray:
        """Variance of ln(measured viable cells) at levels ``cells`` (1e6 cells/mL)."""
        x = np.maximum(np.asarray(cells, dtype=float), 1e-6)
        c0, c1, c2 = self.coefficients
        return np.asarray(c0 + c1 / x + c2 / x**2, dtype=np.float64)

    def __repr__(self) -> str:
        c0, c1, c2 = self.coefficients
        return f"LogNoiseModel(var = {c0:.3g} + {c1:.3g}/X + {c2:.3g}/X^2)"


def estimate_log_noise(records: Sequence[BatchRecord]) -> LogNoiseModel:
    """Fit :class:`LogNoiseModel` to the online viable-cell measurements of the records.

    Model-free: for equally spaced samples the second difference of ``l = ln X``,
    ``l[k+1] - 2 l[k] + l[k-1]``, is noise (variance about 6 var(l)) plus the culture's
    curvature, which is negligible at hourly sampling. Its square / 6 is regressed on
    ``[1, 1/X, 1/X^2]`` by non-negative least squares.
    """
    import scipy.optimize

    rows, targets = [], []
    for rec in records:
        t = rec.steps["time"].to_numpy(float)
        x = np.maximum(rec.steps["measured_viable_cells"].to_numpy(float), 1e-6)
        logx = np.log(x)
        dt = np.diff(t)
        equal = np.isclose(dt[1:], dt[:-1], rtol=1e-6)
        second = logx[2:] - 2.0 * logx[1:-1] + logx[:-2]
        level = x[1:-1][equal]
        rows.append(np.column_stack([np.ones(level.size), 1.0 / level, 1.0 / level**2]))
        targets.append(second[equal] ** 2 / 6.0)
    if not rows or sum(len(r) for r in targets) < 10:
        raise ConfigError("too few equally spaced viable-cell samples to estimate their noise")
    design, target = np.vstack(rows), np.concatenate(targets)
    coef, _ = scipy.optimize.nnls(design, target)
    return LogNoiseModel(coef)


def causal_log_cells(record: BatchRecord, index: int, smoothing_h: float) -> tuple[float, float]:
    """Causal estimate of ln(viable cells) at step ``index`` from the measurements of the last
    ``smoothing_h`` hours (a straight-line fit of ln X evaluated at the step; the raw
    measurement when ``smoothing_h`` is 0 or fewer than 3 points are available).

    Returns:
        ``(ln X, leverage)``: the estimate and the factor by which it scales the variance of
        one measurement (1 for the raw value; ``1/n + (t - t_mean)^2 / S_tt`` for the fit).
    """
    t = record.steps["time"].to_numpy(float)
    logx = np.log(np.maximum(record.steps["measured_viable_cells"].to_numpy(float), 1e-6))
    sel = (t >= t[index] - smoothing_h - 1e-9) & (t <= t[index] + 1e-9)
    if smoothing_h <= 0 or sel.sum() < 3:
        return float(logx[index]), 1.0
    tt, ll = t[sel], logx[sel]
    slope, intercept = np.polyfit(tt, ll, 1)
    centred = tt - tt.mean()
    leverage = 1.0 / tt.size + (t[index] - tt.mean()) ** 2 / float(np.sum(centred**2))
    return float(intercept + slope * t[index]), float(leverage)

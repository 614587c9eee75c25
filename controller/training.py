"""Training data for the residuals, from batch records.

A batch record is a CSV with one row per control step (the format ``hmpc-sim simulate``
writes, column headers ``name [unit]``) and optionally an ``assays.csv`` beside it. Only
what a real plant records is used: online measurements (``measured_viable_cells``,
``measured_glucose``, ``measured_lactate``), the applied inputs, the volume, and the daily
assays (IL-2, viability); never the simulator's true states.

How the specific growth rate is estimated from noisy, sparse data (docs/gp.md):
1. ``ln(viable cells)`` is fitted by a straight line over a centred window (default 24 h,
   about 25 online points); its slope is the net growth rate ``g`` with a standard error
   of about ``noise / sqrt(sum (t - t_mean)^2)`` (0.0014 1/h for 5 % noise, hourly).
2. The specific growth rate is ``mu_obs = g + kd_model + d_feed``: the mechanistic death
   rate and the dilution by the feed volume are added back (perfusion retains the cells).
3. The residual target is ``mu_obs - mu_model`` (additive) at the reconstructed state.
Unmeasured states are reconstructed: inhibitor = trapezoidal integral of the measured
viable cells, IL-2 and viability linearly interpolated between assays (held at the ends).
"""

from __future__ import annotations

import glob
import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pandas as pd

from plant_models.base import MechanisticModel
from plant_models.errors import ConfigError, ModelError

__all__ = [
    "BatchRecord",
    "growth_rate_observations",
    "load_batch_records",
    "read_batch_record",
    "reconstruct_states",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

REQUIRED = ("time", "measured_viable_cells", "measured_glucose", "measured_lactate", "volume")
_HEADER = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(\[.*\])?\s*$")


class BatchRecord:
    """One batch: its step table and assays (columns name, value, sample_time)."""

    def __init__(self, name: str, steps: pd.DataFrame, assays: pd.DataFrame) -> None:
        self.name = name
        self.steps = steps
        self.assays = assays


def read_batch_record(path: str | Path, model: MechanisticModel[object]) -> BatchRecord:
    """Read a batch-record CSV (and ``assays.csv`` beside it, when present)."""
    p = Path(path)
    try:
        raw = pd.read_csv(p)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{p}: cannot be read as CSV ({exc}).") from None
    names = []
    for col in raw.columns:
        m = _HEADER.match(str(col))
        names.append(m.group(1) if m else str(col))
    raw.columns = names
    needed = list(REQUIRED) + list(model.input_names)
    missing = [c for c in needed if c not in raw.columns]
    if missing:
        raise ConfigError(f"{p}: batch record lacks column(s) {missing}; required: {needed}.")
    if len(raw) < 3:
        raise ConfigError(f"{p}: batch record has {len(raw)} rows; at least 3 are needed.")
    steps = raw[needed].astype(float)
    if not np.all(np.diff(steps["time"].to_numpy()) > 0):
        raise ConfigError(f"{p}: time must increase strictly from row to row.")
    assay_path = p.with_name("assays.csv")
    if assay_path.exists():
        assays = pd.read_csv(assay_path)
        if not {"name", "value", "sample_time"} <= set(assays.columns):
            raise ConfigError(f"{assay_path}: needs columns name, value, sample_time.")
    else:
        assays = pd.DataFrame(columns=["name", "value", "sample_time"])
    return BatchRecord(p.parent.name if p.name == "trajectory.csv" else p.stem, steps, assays)


def load_batch_records(pattern: str, model: MechanisticModel[object]) -> list[BatchRecord]:
    """All batch records matching a glob pattern (``DIR/*.csv``, ``runs/*/trajectory.csv``).
    ``assays.csv`` files are companions, not records, and are skipped."""
    paths = sorted(p for p in glob.glob(pattern) if Path(p).name != "assays.csv")
    if not paths:
        raise ConfigError(f"no batch records match {pattern!r}.")
    return [read_batch_record(p, model) for p in paths]


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
) -> pd.DataFrame:
    """Observed specific growth rates and the mechanistic model's, with features.

    Returns a DataFrame with columns ``batch``, ``time``, the features, ``growth_rate_observed``,
    ``growth_rate_model`` and ``residual`` (observed minus model), one row every ``every_h``
    hours where a full window is available.
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
            slope = float(np.polyfit(t[sel], logx[sel], 1)[0])
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
            row.update(
                {
                    "growth_rate_observed": observed,
                    "growth_rate_model": r["growth_rate"],
                    "residual": observed - r["growth_rate"],
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

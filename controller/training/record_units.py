"""Units of batch records: the canonical unit of every record column, the check and
conversion of the units a record states, and vendor exports read through a mapping file.

Every value comes in through :mod:`controller.numerics.units` (the conversion table the
site file uses): a unit that is not the canonical one is converted when the pair is known
and refused otherwise, with an error naming the file and the column. Nothing is guessed.

A **mapping file** (TOML; docs/records.md) turns a vendor export (CSV, Excel ``.xlsx``
with the ``excel`` extra, Parquet) into the columns of a batch record::

    [meta]
    title = "Ambr 250 export, site A"
    sheet = "Data"                      # Excel only (default: the first sheet)

    [time]
    column = "Process Time (min)"
    unit = "min"                        # h, min, s, d; or "datetime" for timestamps
    origin = 0.0                        # number in `unit`, "first" (first row is 0 h) or,
                                        # for timestamps, an ISO time ("first" by default)

    [columns."VCD (cells/mL)"]
    variable = "viable_cells"
    unit = "cells/mL"
    source = "online"                   # online: the probe; assay: an offline sample

    [columns."Glc offline"]
    variable = "glucose"
    unit = "g/L"
    source = "assay"

    [columns."Working Volume"]
    variable = "volume"
    unit = "mL"

    [columns."Feed pump"]
    variable = "feed_rate"
    unit = "mL/h"

    [constants]                         # inputs the export does not record
    glucose_feed = { value = 0.0, unit = "mL/h" }

    [process]                           # what the batches ran with (checked by hmpc fit)
    initial_volume = { value = 0.35, unit = "L" }
    feed_glucose = { value = 15.0, unit = "mM" }

Variables are the model's states (with ``source`` online or assay), its inputs and
``volume`` (recorded values; no source), and ``viability`` (assay).
"""

from __future__ import annotations

import dataclasses
import importlib.util
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.numerics.units import conversion_for
from plant_models.base import MechanisticModel
from plant_models.config import check_keys, load_toml, suggest
from plant_models.errors import ConfigError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "ColumnMap",
    "ProcessValue",
    "RecordMapping",
    "canonical_record_units",
    "column_factor",
    "load_record_mapping",
    "process_values",
    "read_export",
]

TIME_UNITS = ("h", "min", "s", "d")
SOURCES = ("online", "assay")
FORMATS = {
    ".csv": "csv",
    ".txt": "csv",
    ".xlsx": "excel",
    ".xlsm": "excel",
    ".parquet": "parquet",
    ".pq": "parquet",
}


@dataclasses.dataclass(frozen=True)
class ProcessValue:
    """A process value a record declares (``[process]`` of a mapping or ``record.toml``).

    Attributes:
        value: as written.
        unit: as written (converted when compared with the process file).
        where: file and key, for messages.
    """

    value: float
    unit: str
    where: str


@dataclasses.dataclass(frozen=True)
class ColumnMap:
    """One column of a vendor export.

    Attributes:
        column: the column's header in the export.
        variable: model variable (state, input, ``volume``, ``viability``).
        unit: the column's unit (converted to the variable's canonical unit).
        source: ``online`` or ``assay`` for measured states; ``""`` for recorded values
            (inputs, volume).
    """

    column: str
    variable: str
    unit: str
    source: str


@dataclasses.dataclass(frozen=True)
class RecordMapping:
    """A mapping file, loaded and checked against a model (:func:`load_record_mapping`).

    Attributes:
        path: the mapping file.
        time_column, time_unit, time_origin: the time base (``time_unit`` ``datetime`` for
            timestamps; ``time_origin`` a number in ``time_unit``, ``"first"`` or an ISO time).
        columns: the mapped columns.
        constants: input -> (value, unit) for inputs the export does not record.
        process: declared process values.
        sheet: Excel sheet (None: the first).
        title: free text.
    """

    path: Path
    time_column: str
    time_unit: str
    time_origin: float | str
    columns: tuple[ColumnMap, ...]
    constants: Mapping[str, tuple[float, str]]
    process: Mapping[str, ProcessValue]
    sheet: str | None = None
    title: str = ""


def canonical_record_units(model: MechanisticModel[Any]) -> dict[str, str]:
    """Canonical unit of every variable a record may carry: states, inputs, rates,
    ``viability`` (1) and ``time`` (h)."""
    units = {v.name: v.unit for v in (*model.states, *model.inputs, *model.rate_specs)}
    units["viability"] = "1"
    units["time"] = "h"
    return units


def column_factor(variable: str, unit: str, canonical: str, where: str) -> float:
    """The factor ``canonical value = factor * value`` for a column of ``variable`` in
    ``unit``.

    Raises:
        ConfigError: no known conversion; the message starts with ``where`` (file and
            column) and names both units.
    """
    if unit == canonical:
        return 1.0
    try:
        return conversion_for(variable, unit, canonical, where).scale
    except ConfigError:
        raise ConfigError(
            f"{where}: unit {unit!r} cannot be converted to {variable}'s canonical unit "
            f"{canonical!r} (known conversions: controller/numerics/units.py); convert the "
            "column or correct its unit."
        ) from None


def process_values(table: Any, where: str) -> dict[str, ProcessValue]:
    """``name = { value = ..., unit = "..." }`` entries of a ``[process]`` table."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: must be a table of name = {{ value = ..., unit = ... }}.")
    out = {}
    for name, entry in table.items():
        w = f"{where} {name}"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{w}: expected {{ value = ..., unit = ... }}.")
        check_keys(entry, ["value", "unit", "source"], w, required=["value", "unit"])
        value = entry["value"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{w}: value must be a number, got {value!r}.")
        if not isinstance(entry["unit"], str):
            raise ConfigError(f"{w}: unit must be a string.")
        out[str(name)] = ProcessValue(float(value), entry["unit"], w)
    return out


def load_record_mapping(path: str | Path, model: MechanisticModel[Any]) -> RecordMapping:
    """Read and check a mapping file against ``model``: every variable known, every unit
    convertible to its canonical unit, every input of the model recorded or constant.

    Raises:
        ConfigError: naming the file and the table or column.
    """
    p = Path(path)
    data = load_toml(p)
    src = str(p)
    check_keys(
        data, ["meta", "time", "columns", "constants", "process"], src, required=["time", "columns"]
    )
    meta = data.get("meta", {})
    check_keys(meta, ["title", "sheet", "description"], f"{src} [meta]")
    units = canonical_record_units(model)
    time = data["time"]
    if not isinstance(time, Mapping):
        raise ConfigError(f"{src} [time]: must be a table with column, unit (and origin).")
    check_keys(time, ["column", "unit", "origin"], f"{src} [time]", required=["column", "unit"])
    t_unit = time["unit"]
    if t_unit not in (*TIME_UNITS, "datetime"):
        raise ConfigError(
            f"{src} [time] unit: {t_unit!r} is not a time unit; use one of "
            f"{[*TIME_UNITS, 'datetime']}."
        )
    origin = time.get("origin", "first" if t_unit == "datetime" else 0.0)
    if isinstance(origin, bool) or not isinstance(origin, int | float | str):
        raise ConfigError(f"{src} [time] origin: a number, 'first' or an ISO time.")
    if t_unit != "datetime" and isinstance(origin, str) and origin != "first":
        raise ConfigError(
            f"{src} [time] origin: {origin!r}; elapsed times take a number in {t_unit} or 'first'."
        )
    states = set(model.state_names)
    inputs = set(model.input_names)
    columns = []
    raw_cols = data["columns"]
    if not isinstance(raw_cols, Mapping) or not raw_cols:
        raise ConfigError(f"{src} [columns]: map at least one column.")
    seen: dict[tuple[str, str], str] = {}
    for column, entry in raw_cols.items():
        w = f"{src} [columns.{column!r}]"
        if not isinstance(entry, Mapping):
            raise ConfigError(f"{w}: expected a table with variable, unit (and source).")
        check_keys(entry, ["variable", "unit", "source"], w, required=["variable", "unit"])
        variable, unit = entry["variable"], entry["unit"]
        known = sorted(states | inputs | {"viability"})
        if variable not in known:
            raise ConfigError(
                f"{w}: variable {variable!r} is not one of the model's "
                f"({', '.join(known)}).{suggest(str(variable), known)}"
            )
        recorded = variable in inputs or variable == "volume"
        source = entry.get("source", "" if recorded else None)
        if recorded and source not in ("", None):
            raise ConfigError(f"{w}: {variable} is a recorded value; give it no source.")
        if not recorded and source not in SOURCES:
            raise ConfigError(
                f"{w}: source must be one of {list(SOURCES)} for the measured {variable}, "
                f"got {source!r}."
            )
        if variable == "viability" and source != "assay":
            raise ConfigError(f"{w}: viability is an assay (source = 'assay').")
        column_factor(variable, unit, units[variable], w)  # refuses an unknown unit now
        key = (variable, source or "")
        if key in seen:
            raise ConfigError(f"{w}: {variable} ({source or 'recorded'}) is mapped twice.")
        seen[key] = column
        columns.append(ColumnMap(str(column), variable, unit, source or ""))
    constants: dict[str, tuple[float, str]] = {}
    for name, entry in data.get("constants", {}).items():
        w = f"{src} [constants] {name}"
        if name not in inputs:
            raise ConfigError(f"{w}: not an input of the model ({sorted(inputs)}).")
        value = process_values({name: entry}, f"{src} [constants]")[name]
        constants[name] = (value.value, value.unit)
        column_factor(name, value.unit, units[name], w)
    mapped = {c.variable for c in columns if not c.source}
    missing = [n for n in model.input_names if n not in mapped and n not in constants] + (
        [] if "volume" in mapped else ["volume"]
    )
    if missing:
        raise ConfigError(
            f"{src}: no column or constant for {missing}; a batch record needs the volume and "
            "every input (map a column, or give [constants] for an input held constant)."
        )
    online = {c.variable for c in columns if c.source == "online"}
    need = [n for n in ("viable_cells", "glucose", "lactate") if n not in online]
    if need:
        raise ConfigError(
            f"{src}: no online column for {need}; the training reads the online viable cells, "
            "glucose and lactate (source = 'online')."
        )
    return RecordMapping(
        path=p,
        time_column=str(time["column"]),
        time_unit=t_unit,
        time_origin=origin if isinstance(origin, str) else float(origin),
        columns=tuple(columns),
        constants=constants,
        process=process_values(data.get("process", {}), f"{src} [process]"),
        sheet=meta.get("sheet"),
        title=str(meta.get("title", "")),
    )


def _read_table(path: Path, mapping: RecordMapping) -> pd.DataFrame:
    import pandas as pd

    kind = FORMATS.get(path.suffix.lower())
    if kind is None:
        raise ConfigError(
            f"{path}: unknown export format {path.suffix!r}; use .csv, .xlsx or .parquet."
        )
    try:
        if kind == "csv":
            return pd.read_csv(path)
        if kind == "parquet":
            return pd.read_parquet(path)
        if importlib.util.find_spec("openpyxl") is None:  # pandas' reader of .xlsx
            raise ConfigError(
                f"{path}: reading Excel files needs openpyxl: pip install 'hmpc[excel]' "
                "(or export the sheet as CSV)."
            )
        return pd.read_excel(path, sheet_name=mapping.sheet if mapping.sheet else 0)
    except ConfigError:
        raise
    except (OSError, ValueError, ImportError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot be read as {kind} ({exc}).") from None


def _hours(path: Path, raw: pd.DataFrame, mapping: RecordMapping) -> Any:
    import numpy as np
    import pandas as pd

    col = raw[mapping.time_column]
    w = f"{path} column {mapping.time_column!r}"
    if mapping.time_unit == "datetime":
        try:
            stamps = pd.to_datetime(col)
            if mapping.time_origin == "first":
                origin = stamps.iloc[0]
            else:
                origin = pd.Timestamp(str(mapping.time_origin))
                if stamps.dt.tz is not None and origin.tz is None:
                    origin = origin.tz_localize(stamps.dt.tz)
            hours = (stamps - origin).dt.total_seconds().to_numpy(float) / 3600.0
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"{w}: not timestamps ({exc}).") from None
        return hours
    try:
        values = col.astype(float).to_numpy()
    except (ValueError, TypeError):
        raise ConfigError(f"{w}: not numbers in {mapping.time_unit}.") from None
    origin_value = values[0] if mapping.time_origin == "first" else float(mapping.time_origin)
    factor = column_factor("time", mapping.time_unit, "h", w)
    return np.asarray((values - origin_value) * factor, dtype=float)


def read_export(
    path: str | Path, mapping: RecordMapping, model: MechanisticModel[Any]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A vendor export as a batch record's tables, in canonical units.

    Returns:
        ``(steps, assays)``: ``steps`` has ``time`` (h), ``measured_<state>`` for the online
        columns, ``volume`` and the inputs, one row per export row that has all of them
        (rows of assays only are skipped); ``assays`` has ``name``, ``value``, ``unit``,
        ``sample_time`` (h) for every assay value present.

    Raises:
        ConfigError: unreadable file, a mapped column missing (named, with close matches),
            values that are not numbers (the column named).
    """
    import numpy as np
    import pandas as pd

    p = Path(path)
    raw = _read_table(p, mapping)
    raw.columns = [str(c).strip() for c in raw.columns]
    wanted = [mapping.time_column, *(c.column for c in mapping.columns)]
    absent = [c for c in wanted if c not in raw.columns]
    if absent:
        hints = "".join(suggest(c, list(raw.columns)) for c in absent)
        raise ConfigError(
            f"{p}: column(s) {absent} of the mapping {mapping.path} are not in the export.{hints}"
        )
    units = canonical_record_units(model)
    hours = _hours(p, raw, mapping)
    steps: dict[str, Any] = {"time": hours}
    assay_rows: list[pd.DataFrame] = []
    for c in mapping.columns:
        w = f"{p} column {c.column!r} (mapping {mapping.path})"
        try:
            values = pd.to_numeric(raw[c.column], errors="raise").to_numpy(float)
        except (ValueError, TypeError):
            raise ConfigError(f"{w}: not numbers.") from None
        values = values * column_factor(c.variable, c.unit, units[c.variable], w)
        if c.source == "assay":
            have = np.isfinite(values)
            assay_rows.append(
                pd.DataFrame(
                    {
                        "name": c.variable,
                        "value": values[have],
                        "unit": units[c.variable],
                        "sample_time": hours[have],
                    }
                )
            )
        elif c.source == "online":
            steps[f"measured_{c.variable}"] = values
        else:
            steps[c.variable] = values
    for name, (value, unit) in mapping.constants.items():
        factor = column_factor(name, unit, units[name], f"{mapping.path} [constants] {name}")
        steps[name] = np.full(len(hours), value * factor)
    table = pd.DataFrame(steps)
    infinite = [c for c in table.columns if np.isinf(table[c].to_numpy(float)).any()]
    if infinite:
        raise ConfigError(f"{p}: column(s) for {infinite} hold infinite values.")
    complete = table.notna().all(axis=1).to_numpy() & np.isfinite(hours)
    table = table[complete].reset_index(drop=True)
    assays = (
        pd.concat(assay_rows, ignore_index=True)
        .sort_values(["sample_time", "name"], kind="stable")
        .reset_index(drop=True)
        if assay_rows
        else pd.DataFrame(columns=["name", "value", "unit", "sample_time"])
    )
    return table, assays

"""Units of batch records: header units checked and converted (or refused naming the
column), assay units, and vendor exports read through a mapping file (CSV, Parquet, Excel)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from controller.training.batches import load_batch_records, read_batch_record
from controller.training.fitting import nominal_model
from controller.training.record_units import load_record_mapping
from plant_models.errors import ConfigError

GLUCOSE_MOLAR_MASS = 180.156
LACTATE_MOLAR_MASS = 90.078


@pytest.fixture(scope="module")
def model():  # type: ignore[no-untyped-def]
    return nominal_model("tcell")


def _native(n: int = 30, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """A T-cell batch record in canonical units: steps and assays."""
    rng = np.random.default_rng(seed)
    t = np.arange(n, dtype=float)
    steps = pd.DataFrame(
        {
            "time": t,
            "measured_viable_cells": 0.5 * np.exp(0.02 * t) * (1 + 0.02 * rng.normal(size=n)),
            "measured_glucose": 20.0 - 0.1 * t,
            "measured_lactate": 0.2 * t,
            "volume": np.full(n, 1.0),
            "perfusion_rate": np.where(t >= 10, 0.5, 0.0),
            "glucose_feed": np.zeros(n),
            "il2_addition": np.zeros(n),
        }
    )
    assays = pd.DataFrame(
        {
            "name": ["viable_cells", "viability", "glucose"] * 2,
            "value": [0.52, 0.91, 19.9, 0.81, 0.88, 17.6],
            "unit": ["1e6 cells/mL", "1", "mM"] * 2,
            "sample_time": [0.0, 0.0, 0.0, 24.0, 24.0, 24.0],
        }
    )
    return steps, assays


def _write_native(folder: Path, steps: pd.DataFrame, assays: pd.DataFrame, units: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    header = [f"{c} [{units[c]}]" if c in units else c for c in steps.columns]
    steps.to_csv(folder / "trajectory.csv", index=False, header=header)
    assays.to_csv(folder / "assays.csv", index=False)
    return folder / "trajectory.csv"


CANONICAL = {
    "time": "h",
    "measured_viable_cells": "1e6 cells/mL",
    "measured_glucose": "mM",
    "measured_lactate": "mM",
    "volume": "L",
    "perfusion_rate": "1/d",
    "glucose_feed": "mL/h",
    "il2_addition": "kIU/h",
}


def test_header_units_in_cells_per_ml_and_g_per_l_are_converted(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    steps, assays = _native()
    native = read_batch_record(_write_native(tmp_path / "a", steps, assays, CANONICAL), model)
    vendor_units = steps.copy()
    vendor_units["measured_viable_cells"] *= 1e6  # cells/mL
    vendor_units["measured_glucose"] *= GLUCOSE_MOLAR_MASS / 1000.0  # g/L
    vendor_units["volume"] *= 1000.0  # mL
    vendor_units["time"] *= 60.0  # min
    units = {
        **CANONICAL,
        "measured_viable_cells": "cells/mL",
        "measured_glucose": "g/L",
        "volume": "mL",
        "time": "min",
    }
    rec = read_batch_record(_write_native(tmp_path / "b", vendor_units, assays, units), model)
    pd.testing.assert_frame_equal(rec.steps, native.steps, rtol=1e-9)
    assert rec.steps["measured_glucose"].iloc[0] == pytest.approx(20.0)
    assert rec.steps["measured_viable_cells"].iloc[0] == pytest.approx(
        steps["measured_viable_cells"].iloc[0]
    )


@pytest.mark.parametrize(
    ("column", "unit"),
    [("measured_glucose", "cells/mL"), ("measured_viable_cells", "g/L"), ("volume", "mM")],
)
def test_a_header_unit_that_does_not_fit_is_refused_naming_the_column(
    tmp_path: Path,
    model,  # type: ignore[no-untyped-def]
    column: str,
    unit: str,
) -> None:
    steps, assays = _native()
    path = _write_native(tmp_path, steps, assays, {**CANONICAL, column: unit})
    with pytest.raises(ConfigError) as err:
        read_batch_record(path, model)
    assert f"{column} [{unit}]" in str(err.value) and str(path) in str(err.value)


def test_assay_units_are_converted_or_refused(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    steps, assays = _native()
    native = read_batch_record(_write_native(tmp_path / "a", steps, assays, CANONICAL), model)
    other = assays.copy()
    other.loc[other["name"] == "glucose", "value"] *= GLUCOSE_MOLAR_MASS / 1000.0
    other.loc[other["name"] == "glucose", "unit"] = "g/L"
    other.loc[other["name"] == "viability", "value"] *= 100.0
    other.loc[other["name"] == "viability", "unit"] = "%"
    rec = read_batch_record(_write_native(tmp_path / "b", steps, other, CANONICAL), model)
    np.testing.assert_allclose(rec.assays["value"], native.assays["value"], rtol=1e-12)
    assert list(rec.assays["unit"]) == list(native.assays["unit"])
    bad = assays.copy()
    bad.loc[bad["name"] == "viable_cells", "unit"] = "g/L"
    path = _write_native(tmp_path / "c", steps, bad, CANONICAL)
    with pytest.raises(ConfigError, match=r"assays\.csv: assay 'viable_cells'.*'g/L'"):
        read_batch_record(path, model)


MAPPING = """
[meta]
title = "a vendor's export"

[time]
column = "Process Time"
unit = "min"

[columns."VCD (cells/mL)"]
variable = "viable_cells"
unit = "cells/mL"
source = "online"

[columns."Glucose online"]
variable = "glucose"
unit = "g/L"
source = "online"

[columns."Lactate online"]
variable = "lactate"
unit = "mmol/L"
source = "online"

[columns."Offline VCD"]
variable = "viable_cells"
unit = "1e5 cells/mL"
source = "assay"

[columns."Offline viability"]
variable = "viability"
unit = "%"
source = "assay"

[columns."Offline glucose"]
variable = "glucose"
unit = "g/L"
source = "assay"

[columns."Working volume"]
variable = "volume"
unit = "mL"

[columns."Perfusion"]
variable = "perfusion_rate"
unit = "1/d"

[constants]
glucose_feed = { value = 0.0, unit = "mL/h" }
il2_addition = { value = 0.0, unit = "IU/h" }

[process]
working_volume = { value = 1000.0, unit = "mL" }
"""


def _vendor_table(steps: pd.DataFrame, assays: pd.DataFrame) -> pd.DataFrame:
    """The native record as a vendor exports it: own names, own units, assays as sparse
    columns of the same table."""
    out = pd.DataFrame(
        {
            "Process Time": steps["time"] * 60.0,
            "VCD (cells/mL)": steps["measured_viable_cells"] * 1e6,
            "Glucose online": steps["measured_glucose"] * GLUCOSE_MOLAR_MASS / 1000.0,
            "Lactate online": steps["measured_lactate"],
            "Working volume": steps["volume"] * 1000.0,
            "Perfusion": steps["perfusion_rate"],
            "Operator": "x",  # an unmapped column is ignored
        }
    )
    for column, name, factor in (
        ("Offline VCD", "viable_cells", 10.0),
        ("Offline viability", "viability", 100.0),
        ("Offline glucose", "glucose", GLUCOSE_MOLAR_MASS / 1000.0),
    ):
        sel = assays[assays["name"] == name]
        values = np.full(len(out), np.nan)
        for t, v in zip(sel["sample_time"], sel["value"], strict=True):
            values[int(np.argmin(np.abs(steps["time"].to_numpy() - t)))] = v * factor
        out[column] = values
    return out


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_a_vendor_export_with_a_mapping_equals_the_native_record(
    tmp_path: Path,
    model,  # type: ignore[no-untyped-def]
    suffix: str,
) -> None:
    steps, assays = _native()
    native = read_batch_record(_write_native(tmp_path / "native", steps, assays, CANONICAL), model)
    (tmp_path / "map.toml").write_text(MAPPING)
    table = _vendor_table(steps, assays)
    export = tmp_path / f"export{suffix}"
    if suffix == ".csv":
        table.to_csv(export, index=False)
    else:
        table.to_parquet(export, index=False)
    (rec,) = load_batch_records(str(tmp_path / f"*{suffix}"), model, mapping=tmp_path / "map.toml")
    assert rec.name == "export"
    pd.testing.assert_frame_equal(
        rec.steps, native.steps[rec.steps.columns], rtol=1e-9, check_like=False
    )
    assert list(rec.steps.columns) == list(native.steps.columns)
    key = ["sample_time", "name"]
    got = rec.assays.sort_values(key).reset_index(drop=True)
    want = native.assays.sort_values(key).reset_index(drop=True)
    assert list(got["name"]) == list(want["name"])
    np.testing.assert_allclose(got["value"], want["value"], rtol=1e-12)
    np.testing.assert_allclose(got["sample_time"], want["sample_time"])
    assert rec.process["working_volume"].value == 1000.0
    assert rec.process["working_volume"].unit == "mL"


def test_timestamps_as_the_time_base(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    steps, assays = _native()
    table = _vendor_table(steps, assays)
    start = pd.Timestamp("2026-03-01T08:00:00")
    table["Process Time"] = [start + pd.Timedelta(minutes=float(m)) for m in table["Process Time"]]
    table.to_csv(tmp_path / "export.csv", index=False)
    text = MAPPING.replace('unit = "min"', 'unit = "datetime"\norigin = "2026-03-01T07:00:00"')
    (tmp_path / "map.toml").write_text(text)
    rec = read_batch_record(tmp_path / "export.csv", model, mapping=tmp_path / "map.toml")
    np.testing.assert_allclose(rec.steps["time"], steps["time"] + 1.0)


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        ('unit = "cells/mL"', 'unit = "g/L"', r"VCD \(cells/mL\).*'g/L'.*viable_cells"),
        ('variable = "volume"', 'variable = "volumes"', r"'volumes'.*Did you mean 'volume'"),
        ('unit = "min"', 'unit = "weeks"', r"\[time\] unit: 'weeks'"),
        (
            '[constants]\nglucose_feed = { value = 0.0, unit = "mL/h" }\n',
            "[constants]\n",
            "glucose_feed",
        ),
        (
            'source = "online"\n\n[columns."Glucose',
            'source = "assay"\n\n[columns."Glucose',
            r"Offline VCD.*viable_cells \(assay\) is mapped twice",
        ),
        ('source = "online"\n\n[columns."Lactate', '\n[columns."Lactate', "source must be"),
    ],
)
def test_mapping_errors_name_the_column(
    tmp_path: Path,
    model,  # type: ignore[no-untyped-def]
    old: str,
    new: str,
    message: str,
) -> None:
    assert old in MAPPING
    (tmp_path / "map.toml").write_text(MAPPING.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as err:
        load_record_mapping(tmp_path / "map.toml", model)
    assert str(tmp_path / "map.toml") in str(err.value)


def test_a_mapped_column_missing_from_the_export_is_named(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    steps, assays = _native()
    table = _vendor_table(steps, assays).rename(columns={"Working volume": "Working Volume (mL)"})
    table.to_csv(tmp_path / "export.csv", index=False)
    (tmp_path / "map.toml").write_text(MAPPING)
    with pytest.raises(ConfigError, match=r"\['Working volume'\].*Did you mean 'Working Volume"):
        read_batch_record(tmp_path / "export.csv", model, mapping=tmp_path / "map.toml")


def test_excel_exports_need_the_excel_extra(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    steps, assays = _native()
    (tmp_path / "map.toml").write_text(MAPPING)
    path = tmp_path / "export.xlsx"
    if importlib.util.find_spec("openpyxl") is None:
        path.write_bytes(b"PK\x03\x04")  # never opened: the missing reader is reported first
        with pytest.raises(ConfigError, match=r"openpyxl.*hmpc\[excel\]"):
            read_batch_record(path, model, mapping=tmp_path / "map.toml")
        return
    native = read_batch_record(_write_native(tmp_path / "native", steps, assays, CANONICAL), model)
    _vendor_table(steps, assays).to_excel(path, index=False)
    rec = read_batch_record(path, model, mapping=tmp_path / "map.toml")
    pd.testing.assert_frame_equal(rec.steps, native.steps, rtol=1e-9)


@pytest.mark.parametrize(
    ("column", "value", "unit"),
    [
        ("measured_glucose", "nan", "mM"),
        ("measured_glucose", "bad", "g/L"),  # text in a converted column: not coerced to NaN
        ("glucose_feed", "inf", "mL/h"),
        ("volume", "", "L"),
        ("perfusion_rate", "bad", "1/d"),  # text in a canonical column: named, not a bare error
    ],
)
def test_a_cell_that_is_not_a_finite_number_is_refused_naming_column_and_row(
    tmp_path: Path,
    model,  # type: ignore[no-untyped-def]
    column: str,
    value: str,
    unit: str,
) -> None:
    steps, assays = _native()
    if unit == "g/L":
        steps[column] *= GLUCOSE_MOLAR_MASS / 1000.0
    steps = steps.astype(object)
    steps.loc[5, column] = value
    path = _write_native(tmp_path, steps, assays, {**CANONICAL, column: unit})
    with pytest.raises(ConfigError, match="not a finite number") as err:
        read_batch_record(path, model)
    assert column in str(err.value) and "row 7" in str(err.value) and str(path) in str(err.value)


def test_a_process_value_that_is_not_finite_never_fits(tmp_path: Path, model) -> None:  # type: ignore[no-untyped-def]
    from controller.training import check_records_fit_process

    steps, assays = _native()
    path = _write_native(tmp_path / "b1", steps, assays, CANONICAL)
    (tmp_path / "b1" / "record.toml").write_text(
        '[process]\nmedia_glucose = { value = nan, unit = "mM" }\n'
    )
    with pytest.raises(ConfigError, match="media_glucose"):
        check_records_fit_process([read_batch_record(path, model)], model)

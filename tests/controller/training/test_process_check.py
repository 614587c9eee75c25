"""Records checked against the process before a fit: start volume, declared feed
composition (controller.training.check_records_fit_process and `hmpc fit`)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from controller.cli import main
from controller.training import check_records_fit_process, load_batch_records
from controller.training.fitting import nominal_model
from plant_models.errors import ConfigError
from plant_models.process import get_process

UNITS = {
    "time": "h",
    "measured_viable_cells": "1e6 cells/mL",
    "measured_glucose": "mM",
    "measured_lactate": "mM",
    "volume": "L",
    "perfusion_rate": "1/d",
    "glucose_feed": "mL/h",
    "il2_addition": "kIU/h",
}


def _record(folder: Path, volume: float, process_toml: str | None = None) -> None:
    t = np.arange(40, dtype=float)
    steps = pd.DataFrame(
        {
            "time": t,
            "measured_viable_cells": 0.5 * np.exp(0.02 * t),
            "measured_glucose": 20.0 - 0.1 * t,
            "measured_lactate": 0.2 * t,
            "volume": np.full(t.size, volume),
            "perfusion_rate": np.zeros(t.size),
            "glucose_feed": np.zeros(t.size),
            "il2_addition": np.zeros(t.size),
        }
    )
    folder.mkdir(parents=True)
    steps.to_csv(
        folder / "trajectory.csv", index=False, header=[f"{c} [{UNITS[c]}]" for c in steps]
    )
    if process_toml is not None:
        (folder / "record.toml").write_text(process_toml)


FEED = """
[process]
media_glucose = { value = 20.0, unit = "mM" }
media_il2 = { value = 100.0, unit = "IU/mL" }
glucose_stock = { value = 180.156, unit = "g/L" }   # 1000 mM
"""


def _small_process(tmp_path: Path, volume: float) -> Path:
    text = get_process("tcell").process_file().read_text()
    old = 'working_volume = { value = 1.0, unit = "L"'
    assert old in text
    path = tmp_path / "small_process.toml"
    path.write_text(text.replace(old, f'working_volume = {{ value = {volume}, unit = "L"'))
    return path


def test_matching_records_pass_and_a_missing_feed_composition_is_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    model = nominal_model("tcell")
    _record(tmp_path / "A", 1.0)
    _record(tmp_path / "B", 1.02, FEED)  # within the 5 % tolerance; declares its feed
    records = load_batch_records(str(tmp_path / "*" / "trajectory.csv"), model)
    with caplog.at_level(logging.WARNING):
        warnings = check_records_fit_process(records, model)
    (warning,) = warnings
    assert "1 batch record(s) (A) declare no feed composition" in warning
    assert "glucose_stock = 1000 mM" in warning
    assert warning in caplog.text
    declared = load_batch_records(str(tmp_path / "B" / "trajectory.csv"), model)
    assert check_records_fit_process(declared, model) == ()


def test_a_start_volume_mismatch_is_an_error_unless_the_process_matches(tmp_path: Path) -> None:
    _record(tmp_path / "A", 0.35, FEED)
    _record(tmp_path / "B", 0.35, FEED)
    model = nominal_model("tcell")
    records = load_batch_records(str(tmp_path / "*" / "trajectory.csv"), model)
    with pytest.raises(ConfigError) as err:
        check_records_fit_process(records, model)
    text = str(err.value)
    assert "default process of 'tcell'" in text and "starts at 1 L" in text
    assert "A (0.35 L), B (0.35 L)" in text and "pass --process" in text
    small = _small_process(tmp_path, 0.35)
    matched = nominal_model("tcell", process=small)
    assert check_records_fit_process(records, matched, small) == ()
    other = _small_process(tmp_path, 0.5)
    with pytest.raises(ConfigError, match=r"the process file .*small_process.toml.*0\.5 L"):
        check_records_fit_process(records, nominal_model("tcell", process=other), other)


@pytest.mark.parametrize(
    ("declared", "message"),
    [
        (
            'glucose_stock = { value = 500.0, unit = "mM" }',
            r"glucose_stock = 500 mM.*has glucose_stock = 1000 mM",
        ),
        ('glucose_stock = { value = 1.0, unit = "cells/mL" }', r"glucose_stock.*'cells/mL'"),
        (
            'glucose_stok = { value = 1000.0, unit = "mM" }',
            r"'glucose_stok' is not a value.*Did you mean 'glucose_stock'",
        ),
    ],
)
def test_a_declared_feed_composition_that_does_not_match_is_an_error(
    tmp_path: Path, declared: str, message: str
) -> None:
    _record(tmp_path / "A", 1.0, f"[process]\n{declared}\n")
    model = nominal_model("tcell")
    records = load_batch_records(str(tmp_path / "*" / "trajectory.csv"), model)
    with pytest.raises(ConfigError, match=message):
        check_records_fit_process(records, model)


def test_a_declared_value_outside_the_feed_composition_only_warns(tmp_path: Path) -> None:
    _record(
        tmp_path / "A", 1.0, FEED + 'seeding_density = { value = 0.4, unit = "1e6 cells/mL" }\n'
    )
    model = nominal_model("tcell")
    records = load_batch_records(str(tmp_path / "*" / "trajectory.csv"), model)
    (warning,) = check_records_fit_process(records, model)
    assert "seeding_density = 0.4" in warning and "0.5" in warning


def test_hmpc_fit_without_process_on_records_of_another_volume_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    _record(tmp_path / "A", 0.35)
    _record(tmp_path / "B", 0.35)
    args = ["fit", "--data", str(tmp_path / "*" / "trajectory.csv"), "--model", "tcell"]
    args += ["--out", str(tmp_path / "r.npz"), "--report", str(tmp_path / "rep")]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert "default process of 'tcell'" in err and "pass --process" in err
    assert not (tmp_path / "r.npz").exists()


def test_simulated_records_declare_what_they_ran_with(tmp_path: Path) -> None:
    """``hmpc-sim simulate`` writes record.toml (feed composition, start volume): its
    records pass the check without a warning for their own process and fail for another."""
    from sim.cli import main as sim_main

    out = tmp_path / "b1"
    args = ["simulate", "--model", "cho", "--controller", "rule", "--days", "1"]
    assert sim_main([*args, "--out", str(out)]) == 0
    model = nominal_model("cho")
    records = load_batch_records(str(tmp_path / "*" / "trajectory.csv"), model)
    assert set(records[0].process) >= {"feed_glucose", "feed_glutamine", "initial_volume"}
    assert check_records_fit_process(records, model) == ()
    other = tmp_path / "other.toml"
    text = get_process("cho").process_file().read_text()
    line = 'feed_glucose = { value = 500.0, unit = "mM"'
    assert line in text
    other.write_text(text.replace(line, 'feed_glucose = { value = 300.0, unit = "mM"'))
    plugin = get_process("cho")
    other_model = plugin.model(plugin.load_parameters()[0], plugin.load_process(other)[0])
    with pytest.raises(ConfigError, match="feed_glucose"):
        check_records_fit_process(records, other_model, other)

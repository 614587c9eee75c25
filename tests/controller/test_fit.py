"""Training data from batch records and the `hmpc fit` command, on simulated records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from controller.cli import main, nominal_model
from controller.training import growth_rate_observations, load_batch_records, reconstruct_states
from plant_models.errors import ConfigError
from plant_models.gp import GPResidual
from sim.cli import main as sim_main


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cohort")
    assert (
        sim_main(
            [
                "cohort",
                "--patients",
                "4",
                "--seed",
                "3",
                "--controller",
                "rule",
                "--days",
                "9",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    return out


def test_rate_estimates_track_the_true_growth_rate(records: Path) -> None:
    model = nominal_model("tcell")
    recs = load_batch_records(str(records / "*" / "trajectory.csv"), model)
    assert len(recs) == 4
    obs = growth_rate_observations(recs, model, ["lactate", "culture_age"])
    assert {"growth_rate_observed", "residual", "lactate", "culture_age"} <= set(obs.columns)
    # compare with the simulator's true (net) growth recorded beside the measurements
    import pandas as pd

    errors = []
    for name, group in obs.groupby("batch"):
        truth = pd.read_csv(records / str(name) / "trajectory.csv")
        true_mu = np.interp(group["time"], truth["time [h]"], truth["growth_rate [1/h]"])
        errors.append(group["growth_rate_observed"].to_numpy() - true_mu)
    err = np.concatenate(errors)
    assert abs(err.mean()) < 0.004 and err.std() < 0.006  # mu is 0.01-0.04 1/h


def test_reconstruction_uses_measurements_only(records: Path) -> None:
    model = nominal_model("tcell")
    rec = load_batch_records(str(records / "*" / "trajectory.csv"), model)[0]
    x = reconstruct_states(rec, model)
    assert x.shape == (len(rec.steps), 7) and np.all(np.isfinite(x)) and x.min() >= 0.0
    np.testing.assert_allclose(x[:, 0], np.maximum(rec.steps["measured_viable_cells"], 1e-6))


def test_fit_command_writes_residual_and_validation(records: Path, tmp_path: Path) -> None:
    out = tmp_path / "residual.npz"
    rc = main(
        [
            "fit",
            "--data",
            str(records / "*" / "trajectory.csv"),
            "--model",
            "tcell",
            "--out",
            str(out),
            "--report",
            str(tmp_path / "rep"),
            "--iterations",
            "30",
        ]
    )
    assert rc == 0
    report = json.loads((tmp_path / "rep" / "validation.json").read_text())
    assert report["rmse_mechanistic"] > 0 and report["rmse_hybrid"] > 0
    assert report["held_out_batches"] and report["predictions"] > 5
    assert (tmp_path / "rep" / "validation.png").stat().st_size > 10_000
    loaded = GPResidual.load(out, expected_features=report["features"])
    assert loaded.feature_names == tuple(report["features"])


def test_fit_errors_are_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert (
        main(
            [
                "fit",
                "--data",
                str(tmp_path / "none*.csv"),
                "--out",
                "r.npz",
                "--report",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "no batch records match" in capsys.readouterr().err
    bad = tmp_path / "bad.csv"
    bad.write_text("time,glucose\n0,1\n1,2\n2,3\n")
    with pytest.raises(ConfigError, match="lacks column"):
        load_batch_records(str(bad), nominal_model("tcell"))
    assert (
        main(
            [
                "fit",
                "--data",
                str(bad),
                "--features",
                "lactic",
                "--out",
                "r.npz",
                "--report",
                str(tmp_path),
            ]
        )
        == 2
    )
    assert "unknown ['lactic']" in capsys.readouterr().err

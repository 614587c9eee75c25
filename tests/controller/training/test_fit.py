"""Training data from batch records and the `hmpc fit` command, on simulated records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from controller.cli import main
from controller.training.batches import (
    BatchRecord,
    causal_log_cells,
    estimate_log_noise,
    growth_rate_observations,
    load_batch_records,
    reconstruct_states,
)
from controller.training.fitting import nominal_model, validate_24h
from plant_models.errors import ConfigError
from plant_models.gp import GPResidual
from plant_models.hybrid import HybridModel, RateCorrection
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
    # defaults: a multiplicative residual with a per-batch drift, learned in the batch
    assert report["mode"] == "multiplicative" and report["batch_effect"] == "drift"
    assert loaded.has_batch_effect and loaded.target_unit == "1"
    assert report["adapted_parameters"] == []
    assert 0.0 <= report["coverage_95"] <= 1.0
    assert not set(report["held_out_batches"]) & set(report["training_batches"])
    assert set(report["per_batch"]) == set(report["held_out_batches"])


def test_fit_command_without_batch_effect_is_additive_as_before(
    records: Path, tmp_path: Path
) -> None:
    out = tmp_path / "residual.npz"
    args = ["fit", "--data", str(records / "*" / "trajectory.csv"), "--out", str(out)]
    args += ["--report", str(tmp_path), "--iterations", "20", "--mode", "additive"]
    assert main([*args, "--batch-effect", "none", "--folds", "2"]) == 0
    report = json.loads((tmp_path / "validation.json").read_text())
    loaded = GPResidual.load(out)
    assert not loaded.has_batch_effect and loaded.target_unit == "1/h"
    assert report["rmse_hybrid"] > 0 and report["coverage_95"] >= 0
    # cross-validation: every batch held out once
    cross = report["cross_validation"]
    held = [name for fold in cross["folds"] for name in fold["held_out_batches"]]
    assert sorted(held) == sorted(report["training_batches"] + report["held_out_batches"])
    assert cross["predictions"] > report["predictions"] and 0 <= cross["coverage_95"] <= 1
    assert main([*args, "--folds", "1"]) == 2


def test_fit_with_patient_parameters(
    records: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "residual.npz"
    args = ["fit", "--data", str(records / "*" / "trajectory.csv"), "--out", str(out)]
    args += ["--report", str(tmp_path), "--iterations", "20"]
    assert main([*args, "--adapt", "auto"]) == 0
    report = json.loads((tmp_path / "validation.json").read_text())
    # the running batch's patient parameters are fitted, the residual has no batch effect
    assert report["batch_effect"] == "none"
    assert [p["name"] for p in report["adapted_parameters"]] == [
        "mu_max",
        "exhaustion_threshold",
        "lag_time",
    ]
    assert not GPResidual.load(out).has_batch_effect
    assert report["rmse_hybrid"] > 0 and 0.0 < report["coverage_95"] <= 1.0
    # both learn the running batch: one at a time; unknown parameters are named
    assert main([*args, "--adapt", "auto", "--batch-effect", "drift"]) == 2
    assert "use one" in capsys.readouterr().err
    assert main([*args, "--adapt", "mu_max,k_lys"]) == 2
    assert "unknown parameter(s) ['k_lys']" in capsys.readouterr().err
    assert main([*args, "--adapt", "auto", "--adapt-window-hours", "0"]) == 2


def test_patient_parameters_are_fitted_causally(
    records: Path,
) -> None:
    """Each prediction's patient parameters come from the measurements up to its start:
    changing later readings changes no earlier prediction."""
    from controller.training.fitting import training_observations as _training_observations
    from plant_models.process import get_process

    base = nominal_model("tcell")
    recs = load_batch_records(str(records / "*" / "trajectory.csv"), base)
    features = ["lactate", "culture_age"]
    adapt = get_process("tcell").adapted_parameters()
    simulated = ("viable_cells", "inhibitor")
    # the residual learns what each training batch's own patient parameters leave
    obs = _training_observations(recs[:3], base, features, adapt, simulated, min_model_rate=0.01)
    obs = obs[np.isfinite(obs["relative_residual"])]
    gp = GPResidual(features, ["mM", "h"], "growth_rate_factor", "1", training_iterations=20).fit(
        obs[features].to_numpy(), obs["relative_residual"].to_numpy()
    )
    hybrid = HybridModel(base, [RateCorrection("growth_rate", gp)])
    # the probe-noise model comes from the training batches (as in `hmpc fit`)
    noise = estimate_log_noise(recs[:3])
    kwargs = {"adapt": adapt, "adapt_simulated": simulated, "noise": noise}
    result = validate_24h(base, hybrid, recs, min_model_rate=0.01, **kwargs)
    rows = result["rows"]
    assert all(set(r["adapted"]) == {p.name for p in adapt} for r in rows)
    # these four patients are close to the nominal one (the nominal model is within 0.5e6
    # cells/mL): adapting must not cost accuracy (the gains on cohorts with the domain's
    # spread are in docs/hybrid.md)
    assert result["rmse_hybrid_true"] <= 1.05 * result["rmse_mechanistic_true"]
    assert 0.0 < result["coverage_95"] <= 1.0
    # later readings scrambled from hour 150 on: predictions made up to 150 h unchanged
    rec = recs[0]
    steps = rec.steps.copy()
    late = steps["time"] > 150.0
    steps.loc[late, "measured_viable_cells"] *= 1.5
    changed = BatchRecord(rec.name, steps, rec.assays)
    a = validate_24h(base, hybrid, [rec], min_model_rate=0.01, **kwargs)["rows"]
    b = validate_24h(base, hybrid, [changed], min_model_rate=0.01, **kwargs)["rows"]
    early = [(x, y) for x, y in zip(a, b, strict=True) if x["start"] <= 150.0]
    assert early and all(x["hybrid"] == y["hybrid"] for x, y in early)
    assert any(x["hybrid"] != y["hybrid"] for x, y in zip(a, b, strict=True) if x["start"] > 150)


def _synthetic_record(seed: int, relative: float, absolute: float) -> BatchRecord:
    """A batch with smooth exponential growth, measured hourly with known probe noise
    (sd = absolute + relative * X, like the simulator's capacitance probe)."""
    rng = np.random.default_rng(seed)
    t = np.arange(0.0, 241.0)
    cells = 0.5 * np.exp(0.018 * t)
    measured = cells + (absolute + relative * cells) * rng.standard_normal(t.size)
    steps = pd.DataFrame(
        {
            "time": t,
            "measured_viable_cells": measured,
            "measured_glucose": 20.0,
            "measured_lactate": 5.0,
            "volume": 1.0,
            "perfusion_rate": 1.0,
            "glucose_feed": 0.0,
            "il2_addition": 0.0,
        }
    )
    return BatchRecord(f"synthetic-{seed}", steps, pd.DataFrame(columns=["name", "value"]))


def test_log_noise_model_recovers_the_probe_noise() -> None:
    records = [_synthetic_record(seed, 0.05, 0.02) for seed in range(6)]
    noise = estimate_log_noise(records)
    for level in (1.0, 5.0, 40.0):
        truth = ((0.02 + 0.05 * level) / level) ** 2
        assert float(noise.variance(level)) == pytest.approx(truth, rel=0.25)


def test_causal_start_uses_only_the_past() -> None:
    rec = _synthetic_record(1, 0.05, 0.02)
    index = 100
    value, leverage = causal_log_cells(rec, index, 12.0)
    t = rec.steps["time"].to_numpy()[88:101]
    logx = np.log(rec.steps["measured_viable_cells"].to_numpy()[88:101])
    assert value == pytest.approx(np.polyval(np.polyfit(t, logx, 1), 100.0), rel=1e-12)
    n = t.size
    assert leverage == pytest.approx(1 / n + (100.0 - t.mean()) ** 2 / np.sum((t - t.mean()) ** 2))
    # changing the future does not change the estimate
    rec.steps.loc[index + 1 :, "measured_viable_cells"] *= 3.0
    assert causal_log_cells(rec, index, 12.0)[0] == value
    raw, one = causal_log_cells(rec, index, 0.0)
    assert one == 1.0 and raw == pytest.approx(np.log(rec.steps["measured_viable_cells"][index]))


def test_validation_learns_causally_and_reports_its_coverage(records: Path) -> None:
    base = nominal_model("tcell")
    recs = load_batch_records(str(records / "*" / "trajectory.csv"), base)
    features = ["lactate", "culture_age"]
    obs = growth_rate_observations(recs[:3], base, features, min_model_rate=0.01)
    obs = obs[np.isfinite(obs["relative_residual"])]
    gp = GPResidual(
        features,
        ["mM", "h"],
        "growth_rate_factor",
        "1",
        batch_effect="drift",
        batch_feature="culture_age",
        batch_min_lengthscale=24.0,
        training_iterations=30,
    ).fit(obs[features].to_numpy(), obs["relative_residual"].to_numpy(), obs["batch"].tolist())
    hybrid = HybridModel(base, [RateCorrection("growth_rate", gp)])
    result = validate_24h(base, hybrid, recs[3:], min_model_rate=0.01)
    rows = result["rows"]
    assert len(rows) > 5
    # in-batch observations are used only after their window closed (centre + 12 h)
    own = growth_rate_observations(recs[3:], base, features, min_model_rate=0.01)
    own = own[np.isfinite(own["relative_residual"])]
    for row in rows:
        assert row["batch_observations"] == int((own["available"] <= row["start"] + 1e-9).sum())
        assert row["sd_log"] > 0.0 and row["time"] == row["start"] + 24.0
    counts = [row["batch_observations"] for row in rows]
    assert counts == sorted(counts) and counts[-1] > counts[0]
    # the coverage is the share of measured points inside the +-1.96 sd band
    z = [np.log(r["measured"] / r["hybrid"]) / r["sd_log"] for r in rows]
    assert result["coverage_95"] == pytest.approx(np.mean(np.abs(z) <= 1.959964))
    # the residual given to validate_24h is not changed by the in-batch learning
    assert gp.n_running_ == 0


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


def test_validation_scores_against_the_true_cells_of_simulated_records(records: Path) -> None:
    """Simulator records carry the true viable cells: the validation scores the same
    predictions against them too (``*_true``); site records without them get no such keys."""
    model = nominal_model("tcell")
    recs = load_batch_records(str(records / "*" / "trajectory.csv"), model)
    gp = GPResidual(
        ("lactate", "culture_age"), ("mM", "h"), "growth_rate_residual", "1/h",
        training_iterations=20,
    )  # fmt: skip
    obs = growth_rate_observations(recs[:3], model, ["lactate", "culture_age"])
    gp.fit(obs[["lactate", "culture_age"]].to_numpy(float), obs["residual"].to_numpy(float))
    hybrid = HybridModel(model, [RateCorrection("growth_rate", gp, "additive")])
    result = validate_24h(model, hybrid, recs[3:])
    truth = pd.read_csv(records / recs[3].name / "trajectory.csv")
    rows = result["rows"]
    true = np.interp(
        [r["time"] for r in rows], truth["time [h]"], truth["viable_cells [1e6 cells/mL]"]
    )
    np.testing.assert_allclose([r["true"] for r in rows], true, rtol=1e-12)
    mech = np.sqrt(np.mean((np.array([r["mechanistic"] for r in rows]) - true) ** 2))
    assert result["rmse_mechanistic_true"] == pytest.approx(mech, rel=1e-12)
    assert 0.0 <= result["coverage_95_true"] <= 1.0
    # the measured value is the true one plus probe noise: they differ
    assert result["rmse_mechanistic_true"] != pytest.approx(result["rmse_mechanistic"])
    site = BatchRecord(
        recs[3].name, recs[3].steps.drop(columns="true_viable_cells"), recs[3].assays
    )
    plain = validate_24h(model, hybrid, [site])
    assert not [k for k in plain if k.endswith("_true")]
    assert plain["rmse_mechanistic"] == pytest.approx(result["rmse_mechanistic"], rel=1e-12)

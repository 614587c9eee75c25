"""`hmpc calibrate` on simulated CHO records whose kinetics are known.

The records come from the virtual bioreactor (``hmpc-sim simulate``) on a truth parameter
file that differs from the shipped CHO kinetics in ``mu_max`` (x1.1) and ``mu_d_max``
(x1.5); its other parameters are the shipped ones. Four batches with different starts
(seeding density, glucose, glutamine) and seeded sensor noise: three to calibrate on, one
held out. Calibrating ``mu_max``, ``mu_d_max`` and ``k_glucose`` must recover all three
inside their 95 % intervals (Laplace and profile) and flag ``mu_max`` / ``k_glucose``:
with glucose far above ``k_glucose`` the growth rate sees ``mu_max * glc / (k + glc)``,
and the two trade off against each other (the seeds are fixed, so the test is
deterministic; a 95 % interval misses on 5 % of seeds).
"""

from __future__ import annotations

import dataclasses
import json
import tomllib
from pathlib import Path

import numpy as np
import pytest

from controller.cli import main
from controller.training.batches import load_batch_records
from controller.training.calibration import (
    CalibrationSettings,
    calibrate,
    parameter_prior,
    validate_24h_mechanistic,
)
from controller.training.calibration_report import file_sha256
from plant_models.errors import ConfigError
from plant_models.process import get_process
from sim.cli import main as sim_main

DATA = Path(__file__).resolve().parents[3] / "plant_models" / "data"
TRUTH = {"mu_max": 0.0638, "mu_d_max": 0.045, "k_glucose": 0.75}
#: (seeding density 1e9 cells/L, glucose mM, glutamine mM) of the four batches
STARTS = ((0.15, 20, 3), (0.30, 40, 5), (0.20, 25, 4), (0.25, 35, 3.5))


def _replace(text: str, key: str, old: str, new: str) -> str:
    line = f"{key} = {{ value = {old},"
    assert line in text, line
    return text.replace(line, f"{key} = {{ value = {new},")


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("calibration")
    truth = (DATA / "cho_kontoravdi2010.toml").read_text()
    truth = _replace(truth, "mu_max", "0.058", "0.0638")
    truth = _replace(truth, "mu_d_max", "0.03", "0.045")
    (out / "truth.toml").write_text(truth)
    process = (DATA / "cho_process.toml").read_text()
    for k, (seeding, glucose, glutamine) in enumerate(STARTS, start=1):
        text = _replace(process, "seeding_density", "0.23", str(seeding))
        text = _replace(text, "initial_glucose", "30.0", str(float(glucose)))
        text = _replace(text, "initial_glutamine", "4.0", str(float(glutamine)))
        (out / f"process{k}.toml").write_text(text)
        folder = "held" if k == len(STARTS) else "train"
        args = ["simulate", "--model", "cho", "--controller", "rule", "--sensor-seed", str(k)]
        args += [
            "--parameters",
            str(out / "truth.toml"),
            "--process",
            str(out / f"process{k}.toml"),
        ]
        assert sim_main([*args, "--out", str(out / folder / f"batch{k}")]) == 0
    return out


def test_calibrate_recovers_known_parameters_and_flags_the_pair(
    records: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out, report = tmp_path / "calibrated.toml", tmp_path / "report.html"
    rc = main(
        [
            "calibrate",
            "--process",
            "cho",
            "--data",
            str(records / "train"),
            "--holdout",
            str(records / "held"),
            "--parameters",
            "mu_max,mu_d_max,k_glucose",
            "--out",
            str(out),
            "--report",
            str(report),
        ]
    )
    printed = capsys.readouterr().out
    assert rc == 0, printed
    figures = json.loads(report.with_suffix(".json").read_text())
    for name, true in TRUTH.items():
        p = figures["parameters"][name]
        assert p["laplace95"][0] < true < p["laplace95"][1], (name, p)
        assert p["profile95"][0] < true < p["profile95"][1], (name, p)
        # the shipped value lies outside the interval where the truth differs from it
        if name != "k_glucose":
            assert not p["profile95"][0] < p["prior_centre"] < p["profile95"][1], (name, p)
    pairs = {tuple(sorted(p[:2])) for p in figures["flagged_pairs"]}
    assert pairs == {("k_glucose", "mu_max")}
    assert "flagged pair: mu_max and k_glucose" in printed
    assert figures["converged"] and 0.7 < figures["chi2_per_observation"] < 1.3
    # 24 h ahead on the held-out batch: the calibrated model beats the shipped one
    val = figures["validation_24h"]
    assert val["rmse_calibrated"] < 0.5 * val["rmse_shipped"]
    assert val["rmse_calibrated_true"] < val["rmse_shipped_true"]
    # the parameter file loads with the ordinary loader and carries the provenance
    plugin = get_process("cho")
    params, prov = plugin.load_parameters(out)
    for name in TRUTH:
        assert getattr(params, name) == pytest.approx(figures["parameters"][name]["value"])
    shipped = plugin.load_parameters()[0]
    assert params.ki_lactate == shipped.ki_lactate  # the others unchanged
    raw = tomllib.loads(out.read_text())
    record = records / "train" / "batch1" / "trajectory.csv"
    assert raw["sources"]["data_1"].startswith(f"{record} sha256:{file_sha256(record)}")
    assert "assays.csv sha256:" in raw["sources"]["data_1"]
    assert "maximum a posteriori" in raw["sources"]["calibration"]
    assert figures["date"] in raw["meta"]["description"]
    assert raw["parameters"]["mu_max"]["source"] == "[calibration]"
    assert "profile [" in raw["parameters"]["mu_max"]["note"]
    assert prov.sources["calibration"] == raw["sources"]["calibration"]
    page = report.read_text()
    for plot in ("profiles", "correlation", "fits", "validation"):
        assert f'id="{plot}"' in page
        assert report.with_name(f"report-{plot}.png").stat().st_size > 1000


def test_calibrate_fixed_initial_states_without_profiles(records: Path) -> None:
    plugin = get_process("cho")
    model = plugin.build_model()
    recs = load_batch_records(str(records / "train" / "*" / "trajectory.csv"), model)
    result = calibrate(
        plugin,
        model,
        recs,
        CalibrationSettings(("mu_max", "mu_d_max"), initial="measured", profiles=False),
    )
    assert not result.profiles and all(e.profile is None for e in result.estimates)
    assert all(b.estimated_states == () for b in result.batches)
    values = result.values
    # the start from noisy first readings costs some accuracy, not the order of magnitude
    assert values["mu_max"] == pytest.approx(TRUTH["mu_max"], rel=0.05)
    assert values["mu_d_max"] == pytest.approx(TRUTH["mu_d_max"], rel=0.1)


def test_validation_matches_hmpc_fits_mechanistic_predictor(records: Path) -> None:
    """The 24 h check is hmpc fit's mechanistic predictor: same starts, same figures."""
    from controller.training.fitting import validate_24h
    from plant_models.gp import GPResidual
    from plant_models.hybrid import HybridModel, RateCorrection

    model = get_process("cho").build_model()
    recs = load_batch_records(str(records / "held" / "*" / "trajectory.csv"), model)
    gp = GPResidual(["glucose"], ["mM"], "growth_rate_factor", "1", training_iterations=5)
    gp.fit(np.array([[10.0], [20.0], [30.0], [40.0]]), np.array([0.01, -0.02, 0.0, 0.02]))
    fit = validate_24h(
        model, HybridModel(model, [RateCorrection("growth_rate", gp, "multiplicative")]), recs
    )
    ours = validate_24h_mechanistic({"shipped": model}, recs)
    assert ours["predictions"] == len(fit["rows"])
    assert ours["rmse_shipped"] == pytest.approx(fit["rmse_mechanistic"], rel=1e-9)


def test_prior_from_the_declared_range() -> None:
    shipped = get_process("cho").load_parameters()[0]
    prior = parameter_prior(shipped, "mu_max")  # (0, 0.5] 1/h, nominal 0.058
    assert prior.centre == 0.058 and prior.unit == "1/h"
    assert prior.sd_log == pytest.approx(np.log(0.5 / 0.058) / 1.959964, rel=1e-6)
    assert prior.range95[1] == pytest.approx(0.5, rel=1e-6)
    assert 0 < prior.low < 0.058 < prior.high <= 0.5
    with pytest.raises(ConfigError, match="not a parameter"):
        parameter_prior(shipped, "mu_maxx")
    with pytest.raises(ConfigError, match="positive nominal"):
        parameter_prior(dataclasses.replace(shipped, lysis_rate=0.0), "lysis_rate")


def test_calibrate_refuses_bad_options(
    records: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    base = ["calibrate", "--data", str(records / "train")]
    assert main([*base, "--process", "cho", "--parameters", "mu_maxx"]) == 2
    assert "mu_maxx" in capsys.readouterr().err
    assert main([*base, "--process", "nonesuch", "--parameters", "mu_max"]) == 2
    assert "neither a registered process" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    rc = main(["calibrate", "--process", "cho", "--data", str(empty), "--parameters", "mu_max"])
    assert rc == 2 and "no batch records match" in capsys.readouterr().err
    # records run at 1 L do not fit a process that starts at 0.35 L: refused before fitting
    small = tmp_path / "small_process.toml"
    text = (DATA / "cho_process.toml").read_text()
    small.write_text(_replace(text, "initial_volume", "1.0", "0.35"))
    assert main([*base, "--process", str(small), "--parameters", "mu_max"]) == 2
    assert "start at another volume" in capsys.readouterr().err
    # a held-out batch that is also calibrated on, and a report over the parameter file
    rc = main(
        [*base, "--process", "cho", "--parameters", "mu_max", "--holdout", str(records / "train")]
    )
    assert rc == 2 and "also in --data" in capsys.readouterr().err
    out = str(tmp_path / "same.toml")
    rc = main([*base, "--process", "cho", "--parameters", "mu_max", "--out", out, "--report", out])
    assert rc == 2 and "same file" in capsys.readouterr().err


def test_a_parameter_the_data_cannot_see_has_a_flat_profile(records: Path) -> None:
    """Without the viability assays nothing measured depends on the lysis of dead cells
    (it moves the total cells only): its profile stays flat over the prior's range."""
    plugin = get_process("cho")
    model = plugin.build_model()
    recs = load_batch_records(str(records / "train" / "*" / "trajectory.csv"), model)
    for rec in recs:
        rec.assays = rec.assays[rec.assays["name"] != "viability"]
    result = calibrate(plugin, model, recs, CalibrationSettings(("mu_max", "lysis_rate")))
    by_name = {e.name: e for e in result.estimates}
    assert by_name["lysis_rate"].flat == "both" and not by_name["lysis_rate"].identifiable
    assert result.flat_parameters == ("lysis_rate",)
    assert by_name["mu_max"].identifiable
    profile = result.profiles["lysis_rate"]
    assert np.max(np.abs(profile.delta_data)) < 0.5  # the data do not move
    # its interval is the prior's: the profile reaches the prior's 95 % range
    low, high = by_name["lysis_rate"].prior.range95
    assert by_name["lysis_rate"].profile is not None
    assert by_name["lysis_rate"].profile[0] == pytest.approx(low, rel=0.1)
    assert by_name["lysis_rate"].profile[1] == pytest.approx(high, rel=0.1)

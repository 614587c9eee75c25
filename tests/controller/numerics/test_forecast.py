"""Harvest forecast: the interval contains the truth of a known model, it is monotonic in
the growth factor, the GP variance widens it, and bad input gets a clear error."""

from __future__ import annotations

import dataclasses
import itertools
import math
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from scipy.integrate import solve_ivp

from controller.numerics.estimator import Estimator, EstimatorConfig, EstimatorResult
from controller.numerics.forecast import (
    ForecastConfig,
    HarvestForecaster,
    InputPlan,
    load_forecast_config,
)
from controller.numerics.measurements import Measurement
from plant_models.errors import ConfigError, ModelError
from plant_models.gp import GPResidual
from plant_models.hybrid import HybridModel, RateCorrection
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process

INPUTS = {"perfusion_rate": 2.0, "glucose_feed": 0.0, "il2_addition": 0.0}
TRUE_FACTOR = 1.2


@pytest.fixture(scope="module")
def model() -> TCellExpansionModel:
    return TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])


@pytest.fixture(scope="module")
def truth(model: TCellExpansionModel) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """The model itself with the patient's growth factor 1.2, hourly, inputs held."""
    par = dataclasses.replace(model.parameters, mu_max=model.parameters.mu_max * TRUE_FACTOR)
    patient = TCellExpansionModel(par, model.process)
    u = model.input_vector(INPUTS)
    x0 = model.state_vector(model.initial_state())
    times = np.arange(0.0, 241.0)
    sol = solve_ivp(
        lambda t, x: patient.rhs(t, x, u),
        (0.0, 240.0),
        x0,
        t_eval=times,
        method="LSODA",
        rtol=1e-9,
        atol=1e-10,
    )
    return times, sol.y.T


def true_dose_time(times: Any, states: Any, dose: float) -> float:
    cells = states[:, 0] * states[:, 6]
    k = int(np.flatnonzero(cells >= dose)[0])
    frac = (math.log(dose) - math.log(cells[k - 1])) / (math.log(cells[k]) - math.log(cells[k - 1]))
    return float(times[k - 1] + frac)


def estimate_at(
    model: TCellExpansionModel, truth: Any, until_h: float, seed: int
) -> EstimatorResult:
    """The estimator run on noisy online measurements of the known model up to ``until_h``."""
    times, states = truth
    rng = np.random.default_rng(seed)
    est = Estimator(model, dataclasses.replace(EstimatorConfig.for_model(model), online_gains=()))
    sd = np.array([0.05, 0.01, 1.0, 0.3, 10.0, 1.0, 0.01])
    result = est.initialize(model.initial_state(), sd**2)
    names = model.state_names
    units = {s.name: s.unit for s in model.states}
    for i, t in enumerate(times[1:], start=1):
        if t > until_h:
            break
        ms = [
            Measurement(
                n,
                float(states[i, names.index(n)] * (1 + 0.05 * rng.normal())),
                units[n],
                t,
                t,
                "online",
            )
            for n in ("viable_cells", "glucose", "lactate")
        ]
        result = est.update(float(t), INPUTS, ms)
    return result


@pytest.fixture(scope="module")
def forecaster(model: TCellExpansionModel) -> HarvestForecaster:
    cfg = EstimatorConfig.for_model(model)
    return HarvestForecaster(model, ForecastConfig.from_estimator(cfg))


def test_interval_contains_the_truth_of_a_known_model(
    model: TCellExpansionModel, truth: Any, forecaster: HarvestForecaster
) -> None:
    dose = model.process.dose_cells
    actual = true_dose_time(*truth, dose)
    assert 100.0 < actual < 160.0  # the scenario: dose well before the harvest
    hits = 0
    for seed in range(4):
        result = estimate_at(model, truth, actual - 48.0, seed)
        fc = forecaster.forecast(result, inputs=INPUTS)
        assert fc.time_h == pytest.approx(math.floor(actual - 48.0))
        assert fc.dose_time_low_h <= fc.dose_time_h <= fc.dose_time_high_h
        assert fc.dose_time_high_h - fc.dose_time_low_h < 30.0  # informative, not just wide
        assert abs(fc.dose_time_h - actual) < 8.0
        hits += fc.dose_time_low_h <= actual <= fc.dose_time_high_h
        assert fc.probability_dose_by_harvest == 1.0  # 48 h ahead of a dose 60 h early
        true_harvest = float(np.interp(192.0, truth[0], truth[1][:, 0] * truth[1][:, 6]))
        assert fc.harvest_cells_low <= true_harvest <= fc.harvest_cells_high
    assert hits >= 3


def test_monotonic_in_growth_factor(
    model: TCellExpansionModel, truth: Any, forecaster: HarvestForecaster
) -> None:
    base = estimate_at(model, truth, 60.0, seed=0)
    results = []
    for factor in (0.7, 0.85, 1.0, 1.15, 1.3):
        estimate = dataclasses.replace(base, factors={"mu_max": factor})
        results.append(forecaster.forecast(estimate, inputs=INPUTS))
    dose_times = [r.dose_time_h for r in results]
    cells = [r.harvest_cells for r in results]
    probability = [r.probability_dose_by_harvest for r in results]
    assert all(a > b for a, b in itertools.pairwise(dose_times))
    assert all(a < b for a, b in itertools.pairwise(cells))
    assert all(a <= b for a, b in itertools.pairwise(probability))
    assert probability[0] < 1.0 and probability[-1] == 1.0


def test_band_is_ordered_seeded_and_physical(
    model: TCellExpansionModel, truth: Any, forecaster: HarvestForecaster
) -> None:
    estimate = estimate_at(model, truth, 60.0, seed=1)
    a = forecaster.forecast(estimate, inputs=INPUTS)
    b = forecaster.forecast(estimate, inputs=INPUTS)
    assert a.dose_time_h == b.dose_time_h and np.array_equal(a.cells_median, b.cells_median)
    assert np.all(a.cells_low <= a.cells_median) and np.all(a.cells_median <= a.cells_high)
    assert np.all(a.cells_low >= 0.0)
    assert a.times_h[0] == pytest.approx(estimate.time_h) and a.horizon_end_h >= 192.0
    median, low, high = a.cells_at(192.0)
    assert (median, low, high) == pytest.approx(
        (a.harvest_cells, a.harvest_cells_low, a.harvest_cells_high), rel=1e-9
    )
    summary = a.summary()
    assert summary["probability_dose_by_harvest"] == a.probability_dose_by_harvest


def test_dose_already_reached_and_never_reached(
    model: TCellExpansionModel, truth: Any, forecaster: HarvestForecaster
) -> None:
    estimate = estimate_at(model, truth, 60.0, seed=2)
    reached = forecaster.forecast(estimate, inputs=INPUTS, dose_cells=0.01)
    assert reached.dose_time_h == pytest.approx(estimate.time_h)
    assert reached.probability_dose_by_harvest == 1.0
    never = forecaster.forecast(estimate, inputs=INPUTS, dose_cells=5000.0)
    assert math.isinf(never.dose_time_h) and math.isinf(never.dose_time_high_h)
    assert never.probability_dose_by_harvest == 0.0
    assert never.summary()["dose_time_h"] is None


def test_input_plan_and_policy_change_the_forecast(
    model: TCellExpansionModel, truth: Any, forecaster: HarvestForecaster
) -> None:
    estimate = estimate_at(model, truth, 60.0, seed=0)
    held = forecaster.forecast(estimate, inputs=INPUTS)
    plan = InputPlan(
        model.input_names, np.array([0.0, 100.0]), np.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    )
    assert plan.at(50.0, model.input_names).tolist() == [2.0, 0.0, 0.0]
    assert plan.at(150.0, ("il2_addition", "glucose_feed", "perfusion_rate")).tolist() == [
        0.0,
        0.0,
        0.0,
    ]
    stopped = forecaster.forecast(estimate, plan=plan)
    assert stopped.input_plan == "plan" and held.input_plan == "hold"
    # no perfusion from 100 h: glucose runs out and lactate accumulates, fewer cells
    assert stopped.harvest_cells < held.harvest_cells

    def policy(time_h: float, states: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
        u = np.zeros((states.shape[0], 3))
        u[:, 0] = np.clip(0.1 * states[:, 0], 0.0, 4.0)  # perfusion on cells
        return u

    fed = forecaster.forecast(estimate, plan=policy)
    assert fed.input_plan == "policy" and fed.harvest_cells > 0
    mpc = SimpleNamespace(
        input_names=model.input_names,
        predicted_times=np.array([60.0, 62.0, 64.0]),
        predicted_inputs=np.array([[2.0, 0.0, 0.0], [2.5, 0.0, 0.0]]),
    )
    from_mpc = InputPlan.from_mpc(mpc)
    assert from_mpc.at(70.0, model.input_names).tolist() == [2.5, 0.0, 0.0]
    failed = SimpleNamespace(**{**mpc.__dict__, "predicted_inputs": np.full((2, 3), np.nan)})
    with pytest.raises(ModelError, match="hold"):
        InputPlan.from_mpc(failed)


def test_gp_variance_widens_the_interval(model: TCellExpansionModel, truth: Any) -> None:
    rng = np.random.default_rng(4)
    x = rng.uniform([0.0, 0.0], [25.0, 240.0], size=(20, 2))
    y = 0.002 * np.sin(x[:, 1] / 40.0) + 0.0005 * rng.normal(size=20)
    residual = GPResidual(
        ["lactate", "culture_age"],
        ["mM", "h"],
        "growth_rate_residual",
        "1/h",
        training_iterations=10,
    ).fit(x, y)
    hybrid = HybridModel(model, [RateCorrection("growth_rate", residual)])
    estimate = estimate_at(model, truth, 60.0, seed=0)
    with_var = HarvestForecaster(hybrid, ForecastConfig()).forecast(estimate, inputs=INPUTS)
    without = HarvestForecaster(hybrid, ForecastConfig(gp_variance=False)).forecast(
        estimate, inputs=INPUTS
    )
    assert with_var.gp_variance_used and not without.gp_variance_used
    width = with_var.dose_time_high_h - with_var.dose_time_low_h
    assert width > without.dose_time_high_h - without.dose_time_low_h
    assert with_var.harvest_cells_high - with_var.harvest_cells_low > (
        without.harvest_cells_high - without.harvest_cells_low
    )


def test_bad_input_gets_clear_errors(
    model: TCellExpansionModel, truth: Any, forecaster: HarvestForecaster
) -> None:
    estimate = estimate_at(model, truth, 10.0, seed=0)
    state = dict(estimate.state)
    del state["volume"]
    with pytest.raises(ModelError, match="lacks states.*volume"):
        forecaster.forecast(dataclasses.replace(estimate, state=state), inputs=INPUTS)
    with pytest.raises(ModelError, match="finite"):
        forecaster.forecast(
            dataclasses.replace(estimate, state={**estimate.state, "glucose": math.nan}),
            inputs=INPUTS,
        )
    with pytest.raises(ModelError, match="covariance of shape"):
        forecaster.forecast(dataclasses.replace(estimate, covariance=np.eye(3)), inputs=INPUTS)
    with pytest.raises(ModelError, match="positive semi-definite"):
        forecaster.forecast(dataclasses.replace(estimate, covariance=-np.eye(9)), inputs=INPUTS)
    with pytest.raises(ModelError, match="no factor on"):
        forecaster.forecast(dataclasses.replace(estimate, factors={}), inputs=INPUTS)
    with pytest.raises(ConfigError, match="dose_cells must be positive"):
        forecaster.forecast(estimate, inputs=INPUTS, dose_cells=-1.0)
    with pytest.raises(ConfigError, match="harvest_time_h"):
        forecaster.forecast(estimate, inputs=INPUTS, harvest_time_h=math.inf)
    with pytest.raises(ModelError, match="present inputs"):
        forecaster.forecast(estimate)
    with pytest.raises(ModelError, match="missing.*il2_addition"):
        forecaster.forecast(estimate, inputs={"perfusion_rate": 1.0, "glucose_feed": 0.0})
    with pytest.raises(ModelError, match="policy returned shape"):
        forecaster.forecast(estimate, plan=lambda t, x: np.zeros((3, 3)))
    with pytest.raises(ModelError, match="strictly increasing"):
        InputPlan(model.input_names, np.array([1.0, 1.0]), np.zeros((2, 3)))
    with pytest.raises(ModelError, match="factor on 'mu_maximum'"):
        HarvestForecaster(model, factor_names=("mu_maximum",))


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"members": 7}, "even"),
        ({"members": 1.5}, "whole number"),
        ({"level": 1.0}, "level"),
        ({"step_h": 0.0}, "step_h"),
        ({"max_substep_h": 2.0}, "must not exceed"),
        ({"factor_random_walk": -0.1}, "factor_random_walk"),
        ({"process_noise": {"viable_cells": (-1.0, 0.0)}}, "process_noise"),
    ],
)
def test_config_validation(changes: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ForecastConfig(**changes)


def test_config_file(tmp_path: Path, model: TCellExpansionModel) -> None:
    path = tmp_path / "forecast.toml"
    path.write_text(
        "[forecast]\nmembers = 32\nlevel = 0.8\n[process_noise]\nviable_cells = [0.0, 0.02]\n"
    )
    config = load_forecast_config(path)
    assert config.members == 32 and config.level == 0.8
    assert config.process_noise == {"viable_cells": (0.0, 0.02)}
    path.write_text("[forecast]\nmember = 32\n")
    with pytest.raises(ConfigError, match=r"forecast\.toml \[forecast\].*'member'.*'members'"):
        load_forecast_config(path)
    path.write_text("[forecast]\nlevel = 2.0\n")
    with pytest.raises(ConfigError, match=r"forecast\.toml.*level"):
        load_forecast_config(path)
    path.write_text("[forecast]\n[process_noise]\nviable = [0.0, 0.02]\n")
    with pytest.raises(ConfigError, match="not states of the model"):
        HarvestForecaster(model, load_forecast_config(path))


def test_bench_forecast_scores_patients_against_the_truth() -> None:
    from sim.bench_forecast import run_forecast_benchmark

    figures = run_forecast_benchmark(2, seed=0, config=ForecastConfig(members=16))
    assert figures["patients"] == 2 and figures["patients_scored"] == 2
    assert 0.0 <= figures["coverage"] <= 1.0
    for row in figures["per_patient"]:
        # made at least 48 h (one control step at most more) before the dose was reached
        lead = row["actual_dose_time_h"] - row["forecast_time_h"]
        assert 48.0 <= lead < 49.0
        assert row["covered"] == (
            row["dose_time_low_h"] <= row["actual_dose_time_h"] <= row["dose_time_high_h"]
        )

"""Per-batch patient parameters (plant_models.adaptation)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from plant_models.adaptation import (
    AdaptedParameter,
    PatientAdaptation,
    with_parameters,
)
from plant_models.errors import ConfigError, ModelError
from plant_models.hybrid import discretize
from plant_models.process import get_process
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process

TRUE = {"mu_max": 0.036 * 0.8, "exhaustion_threshold": 1800.0 * 1.3, "lag_time": 30.0}


@pytest.fixture(scope="module")
def model() -> TCellExpansionModel:
    return TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])


def _batch(model: TCellExpansionModel, values: dict[str, float], hours: int, seed: int = 0):
    """A batch of the model itself with ``values``, perfused at 2 volumes/day; states exact,
    ln(cells) measured with 2 % noise."""
    step = discretize(with_parameters(model, values), 1.0)
    x = model.state_vector(model.initial_state())
    u = np.array([2.0, 0.0, 0.0])
    xs, us = [x], []
    for k in range(hours):
        x = np.maximum(np.array(step(float(k), x, u)).ravel(), 0.0)
        xs.append(x)
        us.append(u)
    us.append(u)
    t = np.arange(hours + 1, dtype=float)
    states = np.array(xs)
    rng = np.random.default_rng(seed)
    log_cells = np.log(states[:, 0]) + rng.normal(0.0, 0.02, t.size)
    return t, states, np.array(us), log_cells, np.full(t.size, 0.02)


def _fitter(model: TCellExpansionModel, window_h: float = 400.0) -> PatientAdaptation:
    return PatientAdaptation(
        model,
        get_process("tcell").adapted_parameters(),
        simulated=get_process("tcell").simulated_states,
        window_h=window_h,
    )


def test_fit_recovers_the_patient_of_a_matched_model(model: TCellExpansionModel) -> None:
    t, x, u, y, sd = _batch(model, TRUE, 200)
    fit = _fitter(model).fit(t, x, u, y, sd, len(t) - 1)
    assert fit.converged and fit.points == 200
    assert fit.values["mu_max"] == pytest.approx(TRUE["mu_max"], rel=0.03)
    assert fit.values["exhaustion_threshold"] == pytest.approx(
        TRUE["exhaustion_threshold"], rel=0.08
    )
    assert fit.values["lag_time"] == pytest.approx(TRUE["lag_time"], abs=2.0)
    # the posterior is much narrower than the prior
    prior = np.array([p.prior_sd for p in get_process("tcell").adapted_parameters()])
    assert np.all(np.sqrt(np.diag(fit.covariance)) < 0.5 * prior)


def test_without_informative_data_the_prior_holds(model: TCellExpansionModel) -> None:
    """Before the exhaustion threshold is approached the data say nothing about it: the
    estimate stays at the population's value, with the prior's spread."""
    t, x, u, y, sd = _batch(model, TRUE, 72)
    fit = _fitter(model).fit(t, x, u, y, sd, len(t) - 1)
    assert fit.values["exhaustion_threshold"] == pytest.approx(1800.0, rel=0.05)
    assert math.sqrt(fit.covariance[1, 1]) > 0.85 * 0.4
    # while the growth rate is already known well
    assert math.sqrt(fit.covariance[0, 0]) < 0.2 * 0.25


def test_window_and_warm_start(model: TCellExpansionModel) -> None:
    t, x, u, y, sd = _batch(model, TRUE, 200)
    fitter = _fitter(model, window_h=96.0)
    first = fitter.fit(t, x, u, y, sd, 150)
    assert first.points == 96
    warm = fitter.fit(t, x, u, y, sd, 150, start_theta=first.theta)
    assert warm.values == pytest.approx(first.values, rel=1e-4)
    # non-finite readings are skipped, not fitted
    y_nan = y.copy()
    y_nan[100:110] = np.nan
    assert fitter.fit(t, x, u, y_nan, sd, 150).points == 86


def test_predictor_matches_the_adapted_model_and_its_sensitivity(
    model: TCellExpansionModel,
) -> None:
    t, x, u, _, _ = _batch(model, TRUE, 200)
    fitter = _fitter(model)
    theta = np.array([math.log(0.8), math.log(1.3), 12.0])
    values = {"mu_max": 0.036 * 0.8, "exhaustion_threshold": 1800.0 * 1.3, "lag_time": 30.0}
    pred = fitter.predictor(24)
    path, grad = pred(x[100], t[100:124][None, :], u[100:124].T, theta)
    step = discretize(with_parameters(model, values), 1.0)
    xk = x[100]
    for k in range(100, 124):
        xk = np.maximum(np.array(step(t[k], xk, u[k])).ravel(), 0.0)
    np.testing.assert_allclose(np.array(path)[:, -1], xk, rtol=1e-10, atol=1e-12)
    eps = 1e-6
    for j in range(3):
        d = np.zeros(3)
        d[j] = eps
        hi = np.array(pred(x[100], t[100:124][None, :], u[100:124].T, theta + d)[0])[0, -1]
        lo = np.array(pred(x[100], t[100:124][None, :], u[100:124].T, theta - d)[0])[0, -1]
        fd = (math.log(hi) - math.log(lo)) / (2 * eps)
        assert float(np.array(grad).ravel()[j]) == pytest.approx(fd, rel=1e-5, abs=1e-9)


def test_with_parameters_copies(model: TCellExpansionModel) -> None:
    adapted = with_parameters(model, {"mu_max": 0.05})
    assert adapted.parameters.mu_max == 0.05 and model.parameters.mu_max == 0.036
    assert adapted.process is model.process
    with pytest.raises(ConfigError, match="unknown parameter"):
        with_parameters(model, {"mu_maximum": 0.05})


def test_bad_configuration_and_records_are_refused(model: TCellExpansionModel) -> None:
    with pytest.raises(ConfigError, match="kind"):
        AdaptedParameter("mu_max", "scale", 0.2)
    with pytest.raises(ConfigError, match="prior_sd"):
        AdaptedParameter("mu_max", "factor", 0.0)
    with pytest.raises(ConfigError, match="no parameters"):
        PatientAdaptation(model, [])
    with pytest.raises(ConfigError, match="twice"):
        PatientAdaptation(model, [AdaptedParameter("mu_max", "factor", 0.2)] * 2)
    with pytest.raises(ConfigError, match="simulated states"):
        PatientAdaptation(
            model, get_process("tcell").adapted_parameters(), simulated=("viable_cell",)
        )
    with pytest.raises(ConfigError, match="not registered"):
        get_process("yeast")
    t, x, u, y, sd = _batch(model, TRUE, 50)
    fitter = _fitter(model, window_h=48.0)
    t_bad = t.copy()
    t_bad[30:] += 0.5
    with pytest.raises(ConfigError, match="sampled every 1.0 h"):
        fitter.fit(t_bad, x, u, y, sd, 40)
    with pytest.raises(ModelError, match="outside"):
        fitter.fit(t, x, u, y, sd, 51)
    with pytest.raises(ModelError, match="shapes"):
        fitter.fit(t, x[:, :3], u, y, sd, 40)

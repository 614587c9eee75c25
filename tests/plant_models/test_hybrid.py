"""HybridModel: residual-corrected rates, CasADi/numpy agreement, variance, discretisation."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from plant_models.errors import ConfigError, ModelError
from plant_models.gp import GPResidual
from plant_models.hybrid import HybridModel, RateCorrection, discretize
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process


@pytest.fixture(scope="module")
def base() -> TCellExpansionModel:
    return TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])


@pytest.fixture(scope="module")
def residual() -> GPResidual:
    rng = np.random.default_rng(1)
    x = rng.uniform([0.0, 0.0], [25.0, 240.0], size=(40, 2))
    y = -0.004 * x[:, 0] / 25.0 + 0.0002 * rng.normal(size=40)
    return GPResidual(
        ["lactate", "culture_age"],
        ["mM", "h"],
        "growth_rate_residual",
        "1/h",
        training_iterations=40,
    ).fit(x, y)


def test_additive_correction_equals_mechanistic_plus_gp(base, residual) -> None:  # type: ignore[no-untyped-def]
    hybrid = HybridModel(base, [RateCorrection("growth_rate", residual)])
    x = base.state_vector(base.initial_state())
    x[3] = 15.0
    u = np.array([1.0, 0.0, 0.0])
    mean, _ = residual.predict([[15.0, 50.0]])
    assert hybrid.rates_numpy(50.0, x, u)["growth_rate"] == pytest.approx(
        base.rates_numpy(50.0, x, u)["growth_rate"] + mean[0], rel=1e-10
    )
    # other rates untouched
    assert (
        hybrid.rates_numpy(50.0, x, u)["death_rate"] == base.rates_numpy(50.0, x, u)["death_rate"]
    )


def test_multiplicative_and_symbolic_agree_with_numpy(base) -> None:  # type: ignore[no-untyped-def]
    rng = np.random.default_rng(2)
    x_train = rng.uniform([0.0, 0.0], [25.0, 240.0], size=(30, 2))
    factor = GPResidual(
        ["lactate", "culture_age"], ["mM", "h"], "growth_factor", "1", training_iterations=30
    ).fit(x_train, -0.01 * x_train[:, 0])
    hybrid = HybridModel(base, [RateCorrection("growth_rate", factor, "multiplicative")])
    f = hybrid.dynamics()
    for _ in range(10):
        x = base.state_vector(base.initial_state()) * rng.uniform(0.5, 20.0, size=7)
        x[6] = 1.0
        u = np.array([rng.uniform(0, 4), rng.uniform(0, 5), 0.0])
        t = float(rng.uniform(0, 200))
        np.testing.assert_allclose(
            np.array(f(t, x, u)[0]).ravel(), hybrid.rhs(t, x, u), rtol=1e-10, atol=1e-12
        )
    mech = base.rates_numpy(10.0, x, u)["growth_rate"]
    m, _ = factor.predict([[x[3], 10.0]])
    assert hybrid.rates_numpy(10.0, x, u)["growth_rate"] == pytest.approx(mech * (1 + m[0]))


def test_rate_variance_matches_gp(base, residual) -> None:  # type: ignore[no-untyped-def]
    hybrid = HybridModel(base, [RateCorrection("growth_rate", residual)])
    x = base.state_vector(base.initial_state())
    x[3] = 40.0  # outside the training range: variance grows
    _, var_out = residual.predict([[40.0, 50.0]])
    v = float(hybrid.rate_variance()(50.0, x, np.zeros(3)))
    assert v == pytest.approx(var_out[0], rel=1e-8)
    x[3] = 10.0
    assert float(hybrid.rate_variance()(50.0, x, np.zeros(3))) < v


def test_discretize_matches_accurate_integration(base, residual) -> None:  # type: ignore[no-untyped-def]
    hybrid = HybridModel(base, [RateCorrection("growth_rate", residual)])
    step = hybrid.discretize(1.0)
    x0 = base.state_vector(base.initial_state())
    u = np.array([1.0, 1.0, 2.0])
    ref = solve_ivp(lambda t, y: hybrid.rhs(t, y, u), (30.0, 31.0), x0, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(np.array(step(30.0, x0, u)).ravel(), ref.y[:, -1], rtol=1e-6)
    mech = discretize(base, 1.0)
    assert np.array(mech(30.0, x0, u)).ravel()[0] != np.array(step(30.0, x0, u)).ravel()[0]


def test_mismatched_features_or_units_fail(base) -> None:  # type: ignore[no-untyped-def]
    gp = GPResidual(["lactate"], ["g/L"], "r", "1/h", training_iterations=5).fit(
        np.linspace(0, 20, 10)[:, None], np.zeros(10)
    )
    with pytest.raises(ConfigError, match="'g/L' but the model uses 'mM'"):
        HybridModel(base, [RateCorrection("growth_rate", gp)])
    gp2 = GPResidual(["lactic"], ["mM"], "r", "1/h", training_iterations=5).fit(
        np.linspace(0, 20, 10)[:, None], np.zeros(10)
    )
    with pytest.raises(ConfigError, match="not a model variable"):
        HybridModel(base, [RateCorrection("growth_rate", gp2)])
    gp3 = GPResidual(["lactate"], ["mM"], "r", "1/h", training_iterations=5).fit(
        np.linspace(0, 20, 10)[:, None], np.zeros(10)
    )
    with pytest.raises(ConfigError, match="unknown rate"):
        HybridModel(base, [RateCorrection("growth", gp3)])
    with pytest.raises(ConfigError, match="must be in '1'"):
        HybridModel(base, [RateCorrection("growth_rate", gp3, "multiplicative")])


@pytest.fixture(scope="module")
def batch_factor() -> GPResidual:
    """A multiplicative growth-rate residual with a per-batch drift over culture age:
    batches whose growth factor differs by a random amount."""
    rng = np.random.default_rng(5)
    rows, ys, ids = [], [], []
    for b in range(6):
        age = np.linspace(20.0, 200.0, 10)
        lactate = rng.uniform(0.0, 20.0, 10)
        rows.append(np.column_stack([lactate, age]))
        ys.append(-0.01 * lactate + rng.normal(0.0, 0.3) + 0.01 * rng.standard_normal(10))
        ids += [b] * 10
    return GPResidual(
        ["lactate", "culture_age"],
        ["mM", "h"],
        "growth_rate_factor",
        "1",
        batch_effect="drift",
        batch_feature="culture_age",
        batch_capacity=8,
        training_iterations=80,
    ).fit(np.vstack(rows), np.concatenate(ys), batches=ids)


def test_mode_follows_the_residual_unit(base, residual, batch_factor) -> None:  # type: ignore[no-untyped-def]
    additive = HybridModel(base, [RateCorrection("growth_rate", residual)])
    assert additive.corrections[0].mode == "additive"
    factor = HybridModel(base, [RateCorrection("growth_rate", batch_factor)])
    assert factor.corrections[0].mode == "multiplicative"


def test_observe_learns_the_running_batch_and_begin_batch_forgets(base, batch_factor) -> None:  # type: ignore[no-untyped-def]
    import copy

    hybrid = HybridModel(base, [RateCorrection("growth_rate", copy.deepcopy(batch_factor))])
    x = base.state_vector(base.initial_state())
    x[3] = 10.0
    u = np.array([1.0, 0.0, 0.0])
    mech = base.rates_numpy(100.0, x, u)["growth_rate"]
    before = hybrid.rates_numpy(100.0, x, u)["growth_rate"]
    var_before = float(hybrid.rate_variance()(100.0, x, u))
    # this batch grows 50 % faster than the mechanistic model says
    features = np.column_stack([np.full(5, 10.0), np.linspace(60.0, 96.0, 5)])
    hybrid.observe("growth_rate", features, np.full(5, 0.5))
    after = hybrid.rates_numpy(100.0, x, u)["growth_rate"]
    assert after == pytest.approx(1.5 * mech, rel=0.05)
    assert abs(after - 1.5 * mech) < abs(before - 1.5 * mech)
    assert float(hybrid.rate_variance()(100.0, x, u)) < var_before
    # the exported dynamics and the numpy rates agree after the update
    f = hybrid.dynamics()
    np.testing.assert_allclose(
        np.array(f(100.0, x, u)[0]).ravel(), hybrid.rhs(100.0, x, u), rtol=1e-10, atol=1e-12
    )
    hybrid.begin_batch()
    assert hybrid.rates_numpy(100.0, x, u)["growth_rate"] == pytest.approx(before, rel=1e-12)
    with pytest.raises(ModelError, match="no residual"):
        hybrid.observe("death_rate", features, np.zeros(5))


def _reference_correction(hybrid: HybridModel, t: float, x, u):  # type: ignore[no-untyped-def]
    """(mean, variance) of each corrected rate from the residuals' embedded export built
    now (``GPResidual.to_casadi``: the symbolic path before issue 25)."""
    means, variances = [], []
    base_rates = hybrid.base.rates_numpy(t, x, u)
    for c in hybrid.corrections:
        feats = hybrid.features(t, list(x), list(u), c.residual.feature_names)
        mean, var = (float(v) for v in c.residual.to_casadi("ref")(np.array(feats)))
        if c.mode == "multiplicative":
            rate = base_rates[c.rate]
            mean, var = rate * mean, var * rate**2
        means.append(mean)
        variances.append(var)
    return np.array(means), np.array(variances)


def test_refresh_swaps_data_and_keeps_the_functions(base, batch_factor) -> None:  # type: ignore[no-untyped-def]
    """Issue 25: observe/refresh only swap the residual's numeric data; the parametric
    rate correction built once gives what a symbolic re-export would, before and after
    learning (also with more observations than running-batch slots)."""
    import copy

    hybrid = HybridModel(base, [RateCorrection("growth_rate", copy.deepcopy(batch_factor))])
    fn = hybrid.rate_correction()
    size = hybrid.residual_data_size
    rng = np.random.default_rng(8)
    probes = []
    for _ in range(6):
        x = base.state_vector(base.initial_state()) * rng.uniform(0.5, 5.0, size=7)
        probes.append((float(rng.uniform(20.0, 200.0)), x, np.array([1.0, 0.5, 0.0])))

    def check() -> None:
        data = hybrid.residual_data()
        for t, x, u in probes:
            mean, var = (np.asarray(v, dtype=float).ravel() for v in fn(t, x, u, data))
            ref_mean, ref_var = _reference_correction(hybrid, t, x, u)
            np.testing.assert_allclose(mean, ref_mean, rtol=1e-9, atol=1e-12)
            np.testing.assert_allclose(var, ref_var, rtol=1e-9, atol=1e-15)
            assert hybrid.rates_numpy(t, x, u)["growth_rate"] == pytest.approx(
                hybrid.base.rates_numpy(t, x, u)["growth_rate"] + ref_mean[0], rel=1e-9
            )

    check()
    capacity = batch_factor.batch_capacity
    features = np.column_stack([np.full(capacity + 4, 10.0), np.linspace(30.0, 96.0, capacity + 4)])
    hybrid.observe("growth_rate", features[:3], np.full(3, 0.4))
    assert hybrid.rate_correction() is fn and hybrid.residual_data_size == size
    check()
    hybrid.observe("growth_rate", features[3:], np.full(capacity + 1, 0.5))  # overfull
    assert hybrid.corrections[0].residual.n_running_ == capacity
    assert hybrid.rate_correction() is fn and hybrid.residual_data_size == size
    check()
    hybrid.begin_batch()
    assert hybrid.rate_correction() is fn
    check()


def test_a_changed_data_layout_rebuilds_once_and_says_so(  # type: ignore[no-untyped-def]
    base, residual, caplog
) -> None:
    """A residual re-fitted on more points has a longer data vector: refresh rebuilds the
    functions once (logged) and they agree with the new residual."""
    import copy
    import logging

    gp = copy.deepcopy(residual)
    hybrid = HybridModel(base, [RateCorrection("growth_rate", gp)])
    fn = hybrid.rate_correction()
    size = hybrid.residual_data_size
    rng = np.random.default_rng(9)
    x_train = rng.uniform([0.0, 0.0], [25.0, 240.0], size=(55, 2))
    gp.fit(x_train, -0.004 * x_train[:, 0] / 25.0 + 0.0002 * rng.normal(size=55))
    with caplog.at_level(logging.WARNING, logger="plant_models.hybrid"):
        hybrid.refresh()
    assert "data layout changed" in caplog.text
    assert hybrid.residual_data_size > size and hybrid.rate_correction() is not fn
    x = base.state_vector(base.initial_state())
    u = np.array([1.0, 0.0, 0.0])
    mean = float(hybrid.rate_correction()(50.0, x, u, hybrid.residual_data())[0])
    assert mean == pytest.approx(_reference_correction(hybrid, 50.0, x, u)[0][0], rel=1e-9)

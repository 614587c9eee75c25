"""Physical invariants and symbolic/numpy agreement of the mechanistic models."""

from __future__ import annotations

import dataclasses

import casadi as ca
import numpy as np
import pytest
from scipy.integrate import solve_ivp

from plant_models.base import MechanisticModel
from plant_models.cho import CHOFedBatchModel, load_cho_parameters, load_cho_process
from plant_models.errors import ModelError
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process


def tcell() -> TCellExpansionModel:
    return TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])


def cho() -> CHOFedBatchModel:
    return CHOFedBatchModel(load_cho_parameters()[0], load_cho_process()[0])


def random_points(model: MechanisticModel, rng: np.random.Generator, n: int):  # type: ignore[no-untyped-def]
    x0 = model.state_vector(model.initial_state())  # type: ignore[attr-defined]
    bounds = model.operating_bounds()  # type: ignore[attr-defined]
    for _ in range(n):
        x = x0 * rng.uniform(0.0, 30.0, size=x0.size) + rng.uniform(0, 1, size=x0.size)
        x[-1] = x0[-1] * rng.uniform(0.8, 1.4)  # volume stays near the working volume
        u = np.array([rng.uniform(lo, hi) for lo, hi in bounds.values()])
        yield rng.uniform(0, 240), x, u


@pytest.mark.parametrize("make", [tcell, cho], ids=["tcell", "cho"])
def test_symbolic_dynamics_agree_with_numpy(make) -> None:  # type: ignore[no-untyped-def]
    model = make()
    f = model.dynamics()
    assert f.name_in() == ["t", "x", "u"] and f.name_out() == ["xdot", "rates"]
    rng = np.random.default_rng(0)
    for t, x, u in random_points(model, rng, 50):
        sym = f(t=t, x=x, u=u)
        np.testing.assert_allclose(
            np.array(sym["xdot"]).ravel(), model.rhs(t, x, u), rtol=1e-12, atol=1e-12
        )
        rates = model.rates_numpy(t, x, u)
        np.testing.assert_allclose(
            np.array(sym["rates"]).ravel(),
            [rates[k] for k in model.rate_names],
            rtol=1e-12,
            atol=1e-14,
        )


def test_symbolic_parameters_become_an_input() -> None:
    model = tcell()
    f = model.dynamics(symbolic_parameters=["mu_max"])
    assert f.name_in() == ["t", "x", "u", "p"]
    t, x, u = 50.0, model.state_vector(model.initial_state()), np.array([1.0, 0.0, 0.0])
    faster = dataclasses.replace(model.parameters, mu_max=2 * model.parameters.mu_max)
    np.testing.assert_allclose(
        np.array(f(t, x, u, faster.mu_max)[0]).ravel(), model.rhs(t, x, u, faster), rtol=1e-12
    )
    with pytest.raises(ModelError, match="unknown parameter"):
        model.dynamics(symbolic_parameters=["mu_maximum"])


def test_wrong_sizes_are_a_clear_error() -> None:
    model = tcell()
    with pytest.raises(ModelError, match="expected 7 states"):
        model.rhs(0.0, np.ones(3), np.zeros(3))
    with pytest.raises(ModelError, match="missing"):
        model.input_vector({"perfusion_rate": 1.0})


def _simulate(model: MechanisticModel, x0: np.ndarray, u: np.ndarray, hours: float):  # type: ignore[no-untyped-def]
    return solve_ivp(
        lambda t, y: model.rhs(t, y, u),
        (0.0, hours),
        x0,
        method="LSODA",
        rtol=1e-9,
        atol=1e-11,
        dense_output=True,
    )


def test_exponential_growth_when_nothing_limits() -> None:
    base = tcell()
    p = dataclasses.replace(
        base.parameters,
        glucose_half_saturation=0.0,
        lactate_inhibition=1e9,
        il2_half_saturation=0.0,
        exhaustion_threshold=1e9,
        lag_time=-1.0,
        lag_width=1e-3,
        death_rate_basal=0.0,
        death_rate_lactate=0.0,
        death_rate_exhaustion=0.0,
        death_rate_starvation=0.0,
        lysis_rate=0.0,
        glucose_maintenance=0.0,
        yield_cells_glucose=1e6,
    )
    model = TCellExpansionModel(p, base.process)
    x0 = model.state_vector(model.initial_state())
    sol = _simulate(model, x0, np.array([2.0, 0.0, 0.0]), 72.0)
    t = np.linspace(1.0, 72.0, 20)
    np.testing.assert_allclose(sol.sol(t)[0], x0[0] * np.exp(p.mu_max * t), rtol=1e-6)


def test_nonnegative_under_starvation() -> None:
    model = tcell()
    x0 = model.state_vector(model.initial_state())
    x0[2] = 1.0  # little glucose, no perfusion: cells starve
    sol = _simulate(model, x0, np.zeros(3), 400.0)
    assert sol.success
    assert sol.y.min() > -1e-8
    assert sol.y[2, -1] < 0.5  # glucose exhausted ...
    assert sol.y[0, -1] < sol.y[0].max()  # ... and viable cells decline


def test_rates_at_zero_concentrations_do_not_drive_negative() -> None:
    for model in (tcell(), cho()):
        x0 = model.state_vector(model.initial_state())
        for i, spec in enumerate(model.states[:-1]):  # all but the volume
            x = x0.copy()
            x[i] = 0.0
            dx = model.rhs(10.0, x, np.zeros(model.nu))
            assert dx[i] >= -1e-12, f"{model.name}: d{spec.name}/dt < 0 at {spec.name} = 0"


def test_volume_balance_with_glucose_feed() -> None:
    model = tcell()
    x0 = model.state_vector(model.initial_state())
    feed = 3.0  # mL/h of stock
    sol = _simulate(model, x0, np.array([1.0, feed, 0.0]), 48.0)
    np.testing.assert_allclose(sol.y[6, -1], x0[6] + feed / 1000.0 * 48.0, rtol=1e-9)


def test_glucose_lactate_conservation_without_feed() -> None:
    """No perfusion, no feed: lactate formed equals Y_LG times glucose consumed."""
    model = tcell()
    x0 = model.state_vector(model.initial_state())
    sol = _simulate(model, x0, np.zeros(3), 150.0)
    y = model.parameters.yield_lactate_glucose
    invariant = sol.y[3] + y * sol.y[2]
    np.testing.assert_allclose(invariant, invariant[0], rtol=1e-6)
    np.testing.assert_allclose(sol.y[6], x0[6], rtol=1e-12)  # volume constant


def test_total_cells_conserved_without_growth_and_lysis() -> None:
    base = tcell()
    p = dataclasses.replace(base.parameters, mu_max=1e-12, lysis_rate=0.0)
    model = TCellExpansionModel(p, base.process)
    x0 = model.state_vector(model.initial_state())
    sol = _simulate(model, x0, np.zeros(3), 200.0)
    total = sol.y[0] + sol.y[1]
    np.testing.assert_allclose(total, total[0], rtol=1e-6)


def test_cho_lactate_follows_glucose_without_feed() -> None:
    model = cho()
    x0 = model.state_vector(model.initial_state())
    sol = _simulate(model, x0, np.zeros(1), 100.0)
    y = model.parameters.yield_lactate_glucose
    invariant = sol.y[4] + y * sol.y[2]
    np.testing.assert_allclose(invariant, invariant[0], rtol=1e-6)


def test_cho_matches_published_behaviour() -> None:
    """Batch phase of FB1: growth at about mu_max minus death early on."""
    model = cho()
    x0 = model.state_vector(model.initial_state())
    sol = _simulate(model, x0, np.zeros(1), 24.0)
    rate = np.log(sol.y[0, -1] / x0[0]) / 24.0
    assert 0.03 < rate < model.parameters.mu_max


def test_dynamics_function_is_differentiable() -> None:
    model = tcell()
    f = model.dynamics()
    x = ca.SX.sym("x", model.nx)
    u = ca.SX.sym("u", model.nu)
    jac = ca.Function("j", [x, u], [ca.jacobian(f(0.0, x, u)[0], x)])
    value = np.array(jac(model.state_vector(model.initial_state()), [1, 0, 0]))
    assert np.all(np.isfinite(value)) and value[0, 0] != 0.0

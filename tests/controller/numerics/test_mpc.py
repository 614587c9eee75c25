"""Tests of the nonlinear MPC (controller/numerics/mpc.py, controller/numerics/mpc_config.py)
with the real solvers: known answers, configuration errors, failure policies, limits, warm
starts."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import casadi as ca
import numpy as np
import pytest
import scipy.linalg

from controller.numerics.mpc import MPCResult, NonlinearMPC
from controller.numerics.mpc_config import (
    MPCConfig,
    SoftBound,
    SolverSettings,
    StateBound,
    TrackingTerm,
    load_mpc_config,
    with_process_limits,
)
from plant_models.errors import ConfigError, SolverFailedError
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process

REPO = Path(__file__).resolve().parents[3]
TCELL_CONFIG = REPO / "configs" / "mpc_tcell.toml"


# ----------------------------------------------------------------------------- models


class LinearModel:
    """xdot = A x + B u (the protocol the MPC needs, nothing more)."""

    name = "linear"
    state_names = ("position", "velocity")
    input_names = ("force",)
    a = np.array([[0.0, 1.0], [-1.0, -0.3]])
    b = np.array([[0.0], [1.0]])

    def dynamics(self) -> ca.Function:
        t = ca.SX.sym("t")
        x = ca.SX.sym("x", 2)
        u = ca.SX.sym("u", 1)
        xdot = ca.mtimes(ca.DM(self.a), x) + ca.mtimes(ca.DM(self.b), u)
        return ca.Function(
            "linear", [t, x, u], [xdot, ca.SX.zeros(0, 1)], ["t", "x", "u"], ["xdot", "rates"]
        )


def rk4_matrices(a: np.ndarray, b: np.ndarray, h: float) -> tuple[np.ndarray, np.ndarray]:
    """Exact discrete map of one RK4 step of a linear system with constant input."""
    n = a.shape[0]
    ha = h * a
    eye = np.eye(n)
    ad = eye + ha + ha @ ha / 2 + ha @ ha @ ha / 6 + ha @ ha @ ha @ ha / 24
    bd = h * (eye + ha / 2 + ha @ ha / 6 + ha @ ha @ ha / 24) @ b
    return ad, bd


def lqr_config(horizon: int, q: tuple[float, float], r: float, **extra: Any) -> MPCConfig:
    return MPCConfig(
        step_h=0.1,
        horizon=horizon,
        sample_period_h=0.1,
        objective="tracking",
        tracking={
            "position": TrackingTerm(0.0, q[0]),
            "velocity": TrackingTerm(0.0, q[1]),
        },
        input_quadratic_weights={"force": r},
        input_bounds={"force": (-100.0, 100.0)},
        state_scaling={"position": 1.0, "velocity": 1.0},
        input_scaling={"force": 1.0},
        solver=SolverSettings(tolerance=1e-10, max_cpu_time_s=60.0),
        limits_from_process=False,
        **extra,
    )


@pytest.fixture(scope="module")
def tcell() -> TCellExpansionModel:
    return TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])


def small_tcell_config(model: TCellExpansionModel, **changes: Any) -> MPCConfig:
    """The shipped T-cell tuning with a short horizon (fast tests)."""
    base = with_process_limits(
        load_mpc_config(TCELL_CONFIG), model.process, model.operating_bounds()
    )
    return dataclasses.replace(base, horizon=12, step_h=4.0, **changes)


# ----------------------------------------------------------------------------- known answer


def test_first_move_equals_finite_horizon_lqr() -> None:
    model = LinearModel()
    n, h, q, r = 30, 0.1, (2.0, 0.5), 0.3
    mpc = NonlinearMPC(model, lqr_config(n, q, r))
    x0 = np.array([1.0, -0.5])
    res = mpc.step(x0, 0.0, np.zeros(1))
    assert res.success and res.status == "Solve_Succeeded"
    # Riccati recursion: sum_{k<N} x'Qx + u'Ru + x_N' Q x_N on the RK4 discretisation
    ad, bd = rk4_matrices(model.a, model.b, h)
    qm, rm = np.diag(q), np.array([[r]])
    p = qm.copy()
    gain = np.zeros((1, 2))
    for _ in range(n):
        gain = np.linalg.solve(rm + bd.T @ p @ bd, bd.T @ p @ ad)
        p = qm + ad.T @ p @ (ad - bd @ gain)
    expected = -(gain @ x0)
    assert res.u["force"] == pytest.approx(float(expected[0]), rel=1e-6, abs=1e-8)
    # the whole predicted input sequence follows the time-varying LQR law too
    assert res.predicted_inputs.shape == (n, 1)
    assert res.predicted_states.shape == (n + 1, 2)


def test_long_horizon_approaches_infinite_horizon_lqr() -> None:
    model = LinearModel()
    h, q, r = 0.1, (1.0, 1.0), 1.0
    mpc = NonlinearMPC(model, lqr_config(150, q, r))
    x0 = np.array([0.3, 0.2])
    res = mpc.step(x0, 0.0, np.zeros(1))
    ad, bd = rk4_matrices(model.a, model.b, h)
    p = scipy.linalg.solve_discrete_are(ad, bd, np.diag(q), np.array([[r]]))
    k = np.linalg.solve(np.array([[r]]) + bd.T @ p @ bd, bd.T @ p @ ad)
    assert res.u["force"] == pytest.approx(float(-(k @ x0)[0]), rel=1e-4)


def test_sqp_solver_gives_the_same_move() -> None:
    model = LinearModel()
    base = lqr_config(20, (2.0, 0.5), 0.3)
    sqp = dataclasses.replace(
        base, solver=dataclasses.replace(base.solver, name="sqpmethod", tolerance=1e-9)
    )
    x0 = np.array([1.0, 0.0])
    u_ipopt = NonlinearMPC(model, base).step(x0, 0.0, np.zeros(1)).u["force"]
    res = NonlinearMPC(model, sqp).step(x0, 0.0, np.zeros(1))
    assert res.success
    assert res.u["force"] == pytest.approx(u_ipopt, rel=1e-5)


# ----------------------------------------------------------------------------- configuration


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "mpc.toml"
    p.write_text(text)
    return p


MINIMAL = """
[mpc]
step_h = 1.0
horizon = 10
objective = "tracking"
[tracking]
glucose = { reference = 8.0, weight = 1.0 }
"""


def test_shipped_configs_load() -> None:
    names = sorted(p.name for p in (REPO / "configs").glob("mpc_*.toml"))
    assert {"mpc_tcell.toml", "mpc_cho.toml", "mpc_tcell_batch_ontarget.toml"} <= set(names)
    for name in names:
        cfg = load_mpc_config(REPO / "configs" / name)
        assert cfg.horizon >= 1 and cfg.source.endswith(name)


def test_unknown_key_is_rejected_with_a_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("horizon = 10", "horizn = 10\nhorizon = 10"))
    with pytest.raises(ConfigError, match=r"unknown key 'horizn'.*Did you mean 'horizon'") as err:
        load_mpc_config(path)
    assert str(path) in str(err.value)


def test_unknown_table_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"'solvr'.*Did you mean 'solver'"):
        load_mpc_config(write(tmp_path, MINIMAL + "[solvr]\nmax_iter = 3\n"))


@pytest.mark.parametrize(
    ("old", "new", "pattern"),
    [
        ("step_h = 1.0", "step_h = -1.0", r"step_h = -1.0 h is outside"),
        ("horizon = 10", "horizon = 0", r"horizon = 0 is outside"),
        ('objective = "tracking"', 'objective = "trackin"', r"Did you mean 'tracking'"),
        ("step_h = 1.0", 'step_h = "one"', r"must be a number"),
    ],
)
def test_out_of_range_and_wrong_values(tmp_path: Path, old: str, new: str, pattern: str) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_mpc_config(write(tmp_path, MINIMAL.replace(old, new)))


def test_cpu_time_must_stay_below_the_sample_period(tmp_path: Path) -> None:
    text = MINIMAL.replace("step_h = 1.0", "step_h = 1.0\nsample_period_h = 0.001")
    with pytest.raises(ConfigError, match="max_cpu_time_s.*below the sample period"):
        load_mpc_config(write(tmp_path, text + "[solver]\nmax_cpu_time_s = 10.0\n"))


def test_name_not_in_the_model_is_rejected(tcell: TCellExpansionModel, tmp_path: Path) -> None:
    text = MINIMAL.replace("glucose = {", "glucos = {")
    cfg = load_mpc_config(write(tmp_path, text))
    with pytest.raises(ConfigError, match=r"glucos.*Did you mean 'glucose'"):
        NonlinearMPC(tcell, cfg)


def test_recipe_policy_needs_a_recipe(tcell: TCellExpansionModel) -> None:
    with pytest.raises(ConfigError, match="recipe"):
        NonlinearMPC(tcell, small_tcell_config(tcell, on_failure="recipe"))


def test_process_limits_fill_what_the_file_leaves_out(tcell: TCellExpansionModel) -> None:
    cfg = small_tcell_config(tcell)
    proc = tcell.process
    assert cfg.hard_bounds["lactate"] == StateBound(None, proc.lactate_high_hard)
    assert cfg.hard_bounds["glucose"] == StateBound(proc.glucose_low_hard, proc.glucose_high_hard)
    assert cfg.hard_bounds["volume"].high == proc.volume_max
    assert cfg.soft_bounds["lactate"].high == proc.lactate_high_soft
    assert cfg.rate_limits["perfusion_rate"] == proc.perfusion_rate_limit
    assert cfg.input_bounds["perfusion_rate"] == (0.0, proc.perfusion_max)
    assert cfg.dose.dose_cells == proc.dose_cells
    assert cfg.dose.harvest_time == proc.harvest_time


# ----------------------------------------------------------------------------- T-cell problem


@pytest.fixture(scope="module")
def tcell_mpc(tcell: TCellExpansionModel) -> NonlinearMPC:
    return NonlinearMPC(tcell, small_tcell_config(tcell))


def state_at(model: TCellExpansionModel, **changes: float) -> np.ndarray:
    values = model.initial_state()
    values.update(changes)
    return model.state_vector(values)


def test_solution_respects_hard_bounds_and_limits(
    tcell: TCellExpansionModel, tcell_mpc: NonlinearMPC
) -> None:
    tcell_mpc.reset()
    x = state_at(tcell, viable_cells=8.0, lactate=18.0, glucose=6.0, inhibitor=300.0)
    res = tcell_mpc.step(
        x, 100.0, {"perfusion_rate": 1.0, "glucose_feed": 0.0, "il2_addition": 0.0}
    )
    assert res.success
    cfg = tcell_mpc.config
    names = list(res.state_names)
    pred = res.predicted_states[1 : res.horizon_steps + 1]
    for name, bound in cfg.hard_bounds.items():
        col = pred[:, names.index(name)]
        if bound.high is not None:
            assert np.all(col <= bound.high + 1e-6)
        if bound.low is not None:
            assert np.all(col >= bound.low - 1e-6)
    u = res.predicted_inputs
    low, high = tcell_mpc.u_low, tcell_mpc.u_high
    assert np.all(u >= low - 1e-8) and np.all(u <= high + 1e-8)
    dperf = np.abs(np.diff(u[:, 0]))
    assert np.all(dperf <= cfg.rate_limits["perfusion_rate"] * cfg.step_h + 1e-6)


@pytest.mark.parametrize("previous", [0.0, 4.0, 2.0])
def test_returned_move_respects_bounds_and_rate_limit(
    tcell: TCellExpansionModel, tcell_mpc: NonlinearMPC, previous: float
) -> None:
    tcell_mpc.reset()
    cfg = tcell_mpc.config
    x = state_at(tcell, viable_cells=12.0, lactate=19.0, glucose=5.0, inhibitor=600.0)
    prev = {"perfusion_rate": previous, "glucose_feed": 0.0, "il2_addition": 0.0}
    for t in (120.0, 121.0):
        res = tcell_mpc.step(x, t, prev)
        rate = cfg.rate_limits["perfusion_rate"] * cfg.sample_period_h
        assert abs(res.u["perfusion_rate"] - prev["perfusion_rate"]) <= rate + 1e-9
        for name, (low, high) in cfg.input_bounds.items():
            assert low - 1e-12 <= res.u[name] <= high + 1e-12
        prev = dict(res.u)


def test_warm_start_reduces_iterations(tcell: TCellExpansionModel) -> None:
    cfg = small_tcell_config(tcell)
    warm = NonlinearMPC(tcell, cfg)
    cold = NonlinearMPC(
        tcell, dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, warm_start=False))
    )
    x = state_at(tcell, viable_cells=3.0, lactate=6.0, glucose=15.0, inhibitor=100.0)
    u0 = {"perfusion_rate": 1.0, "glucose_feed": 0.0, "il2_addition": 0.0}
    first = warm.step(x, 80.0, u0)
    cold.step(x, 80.0, u0)
    x1 = warm.simulate(x, 80.0, first.predicted_inputs[:1])[-1]
    # the plant moved one control period (1 h) from x along the first move
    x1 = x + (x1 - x) * cfg.sample_period_h / cfg.step_h
    r_warm = warm.step(x1, 81.0, first.u)
    r_cold = cold.step(x1, 81.0, first.u)
    assert r_warm.success and r_cold.success
    assert r_warm.iterations < r_cold.iterations
    for name in r_warm.u:
        assert r_warm.u[name] == pytest.approx(r_cold.u[name], rel=1e-3, abs=1e-3)


def test_same_inputs_give_the_same_move(tcell: TCellExpansionModel) -> None:
    cfg = small_tcell_config(tcell)
    x = state_at(tcell, viable_cells=2.0, lactate=4.0)
    u0 = {"perfusion_rate": 0.5, "glucose_feed": 0.0, "il2_addition": 0.0}
    a = NonlinearMPC(tcell, cfg).step(x, 60.0, u0)
    b = NonlinearMPC(tcell, cfg).step(x, 60.0, u0)
    assert a.u == b.u and a.iterations == b.iterations


def test_dose_by_date_plans_to_reach_the_dose(tcell: TCellExpansionModel) -> None:
    cfg = small_tcell_config(tcell)
    mpc = NonlinearMPC(tcell, cfg)
    x = state_at(tcell, viable_cells=6.0, lactate=10.0, glucose=14.0, inhibitor=250.0)
    res = mpc.step(x, 150.0, {"perfusion_rate": 2.0, "glucose_feed": 0.0, "il2_addition": 0.0})
    assert res.success
    # harvest at 192 h: 42 h to go, 4-h steps -> 11 active steps (shrinking horizon)
    assert res.horizon_steps == 11
    end = res.predicted_states[res.horizon_steps]
    names = list(res.state_names)
    cells = end[names.index("viable_cells")] * end[names.index("volume")]
    target = cfg.dose.dose_cells * (1 + cfg.dose.margin)
    assert cells >= target * (1 - 1e-4)
    assert res.slacks["dose_shortfall"] == pytest.approx(0.0, abs=1e-5)


def test_overshoot_penalty_holds_a_fast_grower_back_at_the_harvest(
    tcell: TCellExpansionModel,
) -> None:
    """A patient far ahead of the dose: without the penalty the plan ends well above 1.5x
    the target; with it the plan ends lower, by using less of what drives growth."""
    x = state_at(tcell, viable_cells=18.0, lactate=8.0, glucose=14.0, inhibitor=250.0)
    u0 = {"perfusion_rate": 2.0, "glucose_feed": 0.0, "il2_addition": 0.0}
    plain_cfg = small_tcell_config(tcell)
    dose = dataclasses.replace(plain_cfg.dose, overshoot_weight=2000.0, overshoot_band=0.5)
    results = {}
    for name, cfg in (
        ("plain", plain_cfg),
        ("on_target", dataclasses.replace(plain_cfg, dose=dose)),
    ):
        res = NonlinearMPC(tcell, cfg).step(x, 150.0, u0)
        assert res.success
        end = res.predicted_states[res.horizon_steps]
        names = list(res.state_names)
        results[name] = (end[names.index("viable_cells")] * end[names.index("volume")], res)
    target = plain_cfg.dose.dose_cells * (1 + plain_cfg.dose.margin)
    assert results["plain"][0] > 1.5 * target
    assert results["on_target"][0] < results["plain"][0] - 0.05 * target
    assert results["on_target"][0] >= target  # never below the dose target for it
    used = {k: r.predicted_inputs[: r.horizon_steps, 0].sum() for k, (_, r) in results.items()}
    assert used["on_target"] < used["plain"]  # less perfusion


@pytest.mark.parametrize("glucose", [4.0, 0.6])
def test_back_off_keeps_the_plan_inside_the_hard_glucose_limit(
    tcell: TCellExpansionModel, glucose: float
) -> None:
    """The overshoot penalty holds a fast grower back by starving it down to the hard
    glucose limit; a [back_off] of 1 mM keeps the plan 1 mM inside that limit (model error
    then has room before the plant crosses it). Started from 0.6 mM, inside the back-off,
    the problem stays feasible and the plan climbs back out."""
    x = state_at(tcell, viable_cells=18.0, lactate=8.0, glucose=glucose, inhibitor=250.0)
    u0 = {"perfusion_rate": 2.0, "glucose_feed": 0.0, "il2_addition": 0.0}
    plain = small_tcell_config(tcell)
    cfg = dataclasses.replace(
        plain, dose=dataclasses.replace(plain.dose, overshoot_weight=2000.0, overshoot_band=0.5)
    )
    low = cfg.hard_bounds["glucose"].low
    assert low is not None
    mins = {}
    for name, c in (
        ("at_limit", cfg),
        ("back_off", dataclasses.replace(cfg, back_off={"glucose": StateBound(1.0, None)})),
    ):
        res = NonlinearMPC(tcell, c).step(x, 150.0, u0)
        assert res.success, res.status
        col = res.predicted_states[
            1 : res.horizon_steps + 1, list(res.state_names).index("glucose")
        ]
        assert np.all(col >= low - 1e-6)  # the hard limit either way
        mins[name] = col.min()
    assert mins["at_limit"] < low + 0.05  # without it the plan rides the hard limit
    assert mins["back_off"] >= low + 1.0 - 1e-4


def test_back_off_needs_a_hard_limit_on_that_side(
    tcell: TCellExpansionModel, tmp_path: Path
) -> None:
    text = MINIMAL + "[back_off]\nglucose = { low = 1.0 }\nlactate = { low = 2.0 }\n"
    cfg = load_mpc_config(write(tmp_path, text))
    assert cfg.back_off["glucose"] == StateBound(1.0, None)
    cfg = with_process_limits(cfg, tcell.process, tcell.operating_bounds())
    with pytest.raises(ConfigError, match=r"\[back_off\] lactate: low = 2.0.*no hard low limit"):
        NonlinearMPC(tcell, cfg)
    with pytest.raises(ConfigError, match=r"\[back_off\] glucose low = -1.0 .* is outside"):
        load_mpc_config(write(tmp_path, MINIMAL + "[back_off]\nglucose = { low = -1.0 }\n"))
    crossed = dataclasses.replace(cfg, back_off={"glucose": StateBound(30.0, 30.0)})
    with pytest.raises(ConfigError, match=r"\[back_off\] glucose: the back-offs leave no room"):
        NonlinearMPC(tcell, crossed)
    with pytest.raises(ConfigError, match=r"'lw'.*Did you mean 'low'"):
        load_mpc_config(write(tmp_path, MINIMAL + "[back_off]\nglucose = { lw = 1.0 }\n"))


def test_overshoot_penalty_is_off_while_the_harvest_is_beyond_the_horizon(
    tcell: TCellExpansionModel,
) -> None:
    cfg = small_tcell_config(tcell)  # 12 steps of 4 h: the 192 h harvest is beyond at t=20 h
    on = dataclasses.replace(cfg, dose=dataclasses.replace(cfg.dose, overshoot_weight=2000.0))
    x = state_at(tcell, viable_cells=3.0)
    u0 = {"perfusion_rate": 1.0, "glucose_feed": 0.0, "il2_addition": 0.0}
    a = NonlinearMPC(tcell, cfg).step(x, 20.0, u0)
    b = NonlinearMPC(tcell, on).step(x, 20.0, u0)
    assert a.success and b.success
    np.testing.assert_allclose(b.predicted_inputs, a.predicted_inputs, atol=1e-8)


def test_reference_growth_follows_the_batch_growth_rate(tcell: TCellExpansionModel) -> None:
    """With ``reference_growth_parameter = "mu_max"`` a slow grower (mu_max 0.6x nominal)
    must end the horizon nearer the dose than the population's growth rate asks; at the
    nominal value the plan is the plain tuning's."""
    cfg = small_tcell_config(tcell)  # the 192 h harvest lies beyond the horizon at t = 20 h
    scaled = dataclasses.replace(
        cfg, dose=dataclasses.replace(cfg.dose, reference_growth_parameter="mu_max")
    )
    x = state_at(tcell, viable_cells=0.5)
    u0 = {"perfusion_rate": 1.0, "glucose_feed": 0.0, "il2_addition": 0.0}
    nominal = tcell.parameters.mu_max
    ends = {}
    for name, c, mu in (
        ("plain", cfg, 0.6 * nominal),
        ("scaled", scaled, 0.6 * nominal),
        ("scaled_nominal", scaled, nominal),
        ("plain_nominal", cfg, nominal),
    ):
        res = NonlinearMPC(tcell, c, model_parameters=("mu_max",)).step(
            x, 20.0, u0, model_parameters={"mu_max": mu}
        )
        assert res.success
        names = list(res.state_names)
        end = res.predicted_states[res.horizon_steps]
        ends[name] = (end[names.index("viable_cells")] * end[names.index("volume")], res)
    assert ends["scaled"][0] > 1.02 * ends["plain"][0]
    used = {k: r.predicted_inputs[:, 0].sum() for k, (_, r) in ends.items()}
    assert used["scaled"] > used["plain"]  # it perfuses more to grow faster
    np.testing.assert_allclose(
        ends["scaled_nominal"][1].predicted_inputs,
        ends["plain_nominal"][1].predicted_inputs,
        atol=1e-8,
    )


def test_reference_growth_parameter_must_be_a_model_parameter(
    tcell: TCellExpansionModel,
) -> None:
    cfg = small_tcell_config(tcell)
    bad = dataclasses.replace(
        cfg, dose=dataclasses.replace(cfg.dose, reference_growth_parameter="mu_mx")
    )
    with pytest.raises(ConfigError, match=r"reference_growth_parameter = 'mu_mx'.*mu_max"):
        NonlinearMPC(tcell, bad)


# ----------------------------------------------------------------------------- failures


def infeasible_state(model: TCellExpansionModel) -> np.ndarray:
    # a finite state on which the model overflows: no solver attempt (strict or recovery)
    # can succeed. (A state beyond a hard limit is no longer one: recovery mode solves it.)
    return state_at(model, viable_cells=1e300, lactate=10.0, glucose=10.0, inhibitor=500.0)


U_PREV = {"perfusion_rate": 1.0, "glucose_feed": 0.5, "il2_addition": 0.0}


def fast_failing(model: TCellExpansionModel, policy: str) -> MPCConfig:
    cfg = small_tcell_config(model, on_failure=policy)
    return dataclasses.replace(cfg, solver=dataclasses.replace(cfg.solver, max_iter=60))


def check_failed(res: MPCResult, used: str) -> None:
    assert not res.success
    assert res.fallback_used == used
    assert "solver status" in res.fallback_reason
    assert res.status not in ("Solve_Succeeded", "Solved_To_Acceptable_Level")
    assert np.all(np.isnan(res.predicted_states))


def test_infeasible_problem_holds_the_last_move(tcell: TCellExpansionModel) -> None:
    mpc = NonlinearMPC(tcell, fast_failing(tcell, "hold"))
    res = mpc.step(infeasible_state(tcell), 100.0, U_PREV)
    check_failed(res, "hold")
    assert res.u == U_PREV


def test_infeasible_problem_falls_back_to_the_recipe_within_limits(
    tcell: TCellExpansionModel,
) -> None:
    recipe = {"perfusion_rate": 3.0, "glucose_feed": 0.0, "il2_addition": 0.0}
    mpc = NonlinearMPC(tcell, fast_failing(tcell, "recipe"), recipe=lambda t: recipe)
    res = mpc.step(infeasible_state(tcell), 100.0, U_PREV)
    check_failed(res, "recipe")
    # the recipe's jump from 1.0 to 3.0 1/d is rate limited to 0.5 1/d per h
    assert res.u["perfusion_rate"] == pytest.approx(1.5)
    assert res.u["glucose_feed"] == 0.0


def test_infeasible_problem_shifts_the_previous_plan(tcell: TCellExpansionModel) -> None:
    mpc = NonlinearMPC(tcell, fast_failing(tcell, "shift"))
    ok = mpc.step(state_at(tcell, viable_cells=5.0, lactate=8.0), 96.0, U_PREV)
    assert ok.success
    res = mpc.step(infeasible_state(tcell), 100.0, ok.u)
    check_failed(res, "shift")
    planned = ok.predicted_inputs[1]  # 100 h lies in the second 4-h step of the plan
    rate = mpc.config.rate_limits["perfusion_rate"]
    expected = np.clip(planned, mpc.u_low, mpc.u_high)
    expected[0] = np.clip(expected[0], ok.u["perfusion_rate"] - rate, ok.u["perfusion_rate"] + rate)
    assert [res.u[n] for n in res.input_names] == pytest.approx(expected.tolist())


def test_raise_policy_raises_with_the_status(tcell: TCellExpansionModel) -> None:
    mpc = NonlinearMPC(tcell, fast_failing(tcell, "raise"))
    with pytest.raises(SolverFailedError) as err:
        mpc.step(infeasible_state(tcell), 100.0, U_PREV)
    assert err.value.status not in ("", "Solve_Succeeded")


def test_non_finite_state_is_never_solved(
    tcell_mpc: NonlinearMPC, tcell: TCellExpansionModel
) -> None:
    x = state_at(tcell)
    x[2] = np.nan
    res = tcell_mpc.step(x, 10.0, U_PREV)
    assert not res.success and res.fallback_used in ("hold", "shift")
    assert all(np.isfinite(v) for v in res.u.values())


# ----------------------------------------------------------------------------- uncertainty


class UncertainTCell(TCellExpansionModel):
    """The T-cell model with a (constant) growth-rate residual std, as a hybrid model has."""

    residual_names = ("growth_rate",)

    def residual_std(self) -> ca.Function:
        t = ca.SX.sym("t")
        x = ca.SX.sym("x", self.nx)
        u = ca.SX.sym("u", self.nu)
        return ca.Function("std", [t, x, u], [ca.DM([0.004])], ["t", "x", "u"], ["std"])


def test_variance_tightens_the_constraints(tcell: TCellExpansionModel) -> None:
    model = UncertainTCell(tcell.parameters, tcell.process)
    cfg = small_tcell_config(model, kappa=2.0)
    cfg = dataclasses.replace(cfg, soft_bounds={"lactate": SoftBound(None, 20.0, 1e4, 1e3)})
    mpc = NonlinearMPC(model, cfg)
    x = state_at(model, viable_cells=10.0, lactate=17.0, glucose=8.0, inhibitor=500.0)
    res = mpc.step(x, 150.0, {"perfusion_rate": 2.0, "glucose_feed": 0.0, "il2_addition": 0.0})
    assert res.success
    assert res.predicted_std.shape == (cfg.horizon, 1)
    assert np.allclose(res.predicted_std, 0.004)
    names = list(res.state_names)
    sd = res.predicted_state_std[:, names.index("lactate")]
    assert sd[0] == 0.0 and np.all(np.diff(sd[: res.horizon_steps + 1]) >= 0) and sd[5] > 0.1
    lac = res.predicted_states[1 : res.horizon_steps + 1, names.index("lactate")]
    tight = 30.0 - cfg.kappa * sd[1 : res.horizon_steps + 1]
    assert np.all(lac <= tight + 1e-5)


# ----------------------------------------------------------------------------- recovery mode


def test_from_beyond_a_hard_limit_the_mpc_recovers_instead_of_holding(
    tcell: TCellExpansionModel,
) -> None:
    """Issue 22: glucose at 130 mM (hard limit 40) with the feed at its maximum. The strict
    problem is infeasible (it used to return Infeasible_Problem_Detected and hold the feed
    at 5 mL/h); recovery mode relaxes the hard limits by an exact penalty: a solved move
    that stops the feed and a plan that drives glucose back under the limit."""
    cfg = small_tcell_config(tcell)
    high = cfg.hard_bounds["glucose"].high
    assert high is not None and high < 130.0
    mpc = NonlinearMPC(tcell, cfg)
    x = state_at(tcell, viable_cells=8.0, lactate=10.0, glucose=130.0, inhibitor=300.0)
    u_prev = {"perfusion_rate": 1.0, "glucose_feed": 5.0, "il2_addition": 0.0}
    res = mpc.step(x, 100.0, u_prev)
    assert res.success and res.recovery and not res.fallback_used, res.status
    assert res.u["glucose_feed"] == pytest.approx(0.0, abs=1e-6)
    rate = cfg.rate_limits["perfusion_rate"] * cfg.sample_period_h
    assert abs(res.u["perfusion_rate"] - u_prev["perfusion_rate"]) <= rate + 1e-9
    glucose = res.predicted_states[: res.horizon_steps + 1, list(res.state_names).index("glucose")]
    assert np.all(np.diff(glucose) < 0)  # driven back, never away
    assert glucose[-1] <= high  # and inside the limit within the horizon
    assert res.slacks["glucose_high_recovery"] == pytest.approx(glucose[1] - high, rel=1e-3)
    # inside the limits the hard limits stay hard (no recovery) and the plan respects them
    inside = mpc.step(state_at(tcell, viable_cells=8.0, glucose=10.0), 100.0, u_prev)
    assert inside.success and not inside.recovery
    assert "glucose_high_recovery" not in inside.slacks

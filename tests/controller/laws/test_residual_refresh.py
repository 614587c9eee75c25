"""Issue 25: the hybrid MPC's residual takes its learned data as a numeric input.

``refresh_residual`` swaps arrays (no CasADi function is built), and the one per-step
function (spread propagation and residual linearisation) gives what the symbolic path gave
(functions rebuilt from the residual's embedded export after every change, derivatives by
``ca.jacobian``, the spread propagated in numpy), before and after the running batch is
observed. No timing here: ``hmpc-sim bench mpc --problem hybrid-atmp`` reports
``refresh_residual_median_s``.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from pathlib import Path
from typing import Any

import casadi as ca
import numpy as np
import pytest

from controller.laws.control import HybridPredictionModel
from controller.numerics.mpc import NonlinearMPC
from controller.numerics.mpc_config import load_mpc_config, with_process_limits
from plant_models.gp import GPResidual
from plant_models.hybrid import HybridModel, RateCorrection
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process

HOURLY = Path(__file__).resolve().parents[3] / "configs" / "mpc_tcell_hourly.toml"

FloatArray = np.ndarray


@pytest.fixture(scope="module")
def base() -> TCellExpansionModel:
    return TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])


@pytest.fixture(scope="module")
def factor() -> GPResidual:
    """A multiplicative growth-rate residual with a drift batch effect (as `hmpc fit`)."""
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
        batch_capacity=5,
        training_iterations=60,
    ).fit(np.vstack(rows), np.concatenate(ys), batches=ids)


def _mpc(base: TCellExpansionModel, gp: GPResidual) -> tuple[NonlinearMPC, HybridModel]:
    hybrid = HybridModel(base, [RateCorrection("growth_rate", gp)])
    config = with_process_limits(load_mpc_config(HOURLY), base.process, base.operating_bounds())
    config = dataclasses.replace(config, horizon=12)
    assert config.residual == "linearized" and config.kappa > 0
    return NonlinearMPC(HybridPredictionModel(hybrid), config), hybrid


def _symbolic_reference(mpc: NonlinearMPC, hybrid: HybridModel) -> dict[str, ca.Function]:
    """The residual's functions rebuilt symbolically from the embedded export, as
    refresh_residual did before issue 25."""
    c = hybrid.corrections[0]
    t = ca.MX.sym("t")
    x = ca.MX.sym("x", mpc.nx)
    u = ca.MX.sym("u", mpc.nu)
    xs = [x[i] for i in range(mpc.nx)]
    us = [u[i] for i in range(mpc.nu)]
    feats = ca.vertcat(*hybrid.features(t, xs, us, c.residual.feature_names))
    gp_mean, gp_var = c.residual.to_casadi("embedded")(feats)
    rate = hybrid.base.dynamics()(t, x, u)[1][hybrid.base.rate_names.index(c.rate)]
    mean, var = rate * gp_mean, gp_var * rate**2
    return {
        "mean": ca.Function("m", [t, x, u], [mean]),
        "std": ca.Function("s", [t, x, u], [ca.sqrt(ca.fmax(var, 0.0))]),
        "lin": ca.Function("q", [t, x, u], [ca.vertcat(mean, ca.vec(ca.jacobian(mean, x)), x)]),
    }


def _reference_spread(
    mpc: NonlinearMPC, ref: dict[str, ca.Function], states: Any, inputs: Any, times: Any
) -> tuple[FloatArray, FloatArray, FloatArray]:
    """The pre-issue-25 ``_uncertainty`` and ``_linearisation`` (numpy loop)."""
    n, h = mpc.horizon, mpc.config.step_h
    tt, xx, uu = times[:n].reshape(1, -1), states[:n].T, inputs.T
    std = np.asarray(ref["std"].map(n)(tt, xx, uu), dtype=float).reshape(-1, n).T
    std = np.nan_to_num(np.maximum(std, 0.0))
    pp = np.tile(mpc._pvals.reshape(-1, 1), (1, n))
    a_all = np.asarray(mpc._jac_fn.map(n)(tt, xx, uu, pp), dtype=float)
    g_all = np.asarray(mpc._map_fn.map(n)(tt, xx, uu), dtype=float)
    n_r = std.shape[1]
    cov = np.zeros((mpc.nx, mpc.nx))
    out = np.zeros((n + 1, mpc.nx))
    for k in range(n):
        a = a_all[:, k * mpc.nx : (k + 1) * mpc.nx]
        gk = g_all[:, k * n_r : (k + 1) * n_r] * h
        cov = a @ cov @ a.T + gk @ np.diag(std[k] ** 2) @ gk.T
        out[k + 1] = np.sqrt(np.maximum(np.diag(cov), 0.0))
    q = np.asarray(ref["lin"].map(n)(tt, xx, uu), dtype=float)
    return std, out, q


def _plan(mpc: NonlinearMPC, base: TCellExpansionModel) -> tuple[Any, Any, Any]:
    x0 = base.state_vector(base.initial_state())
    x0[list(mpc.state_names).index("viable_cells")] = 3.0
    x0[list(mpc.state_names).index("lactate")] = 12.0
    t0 = 80.0
    inputs = np.tile([1.0, 1.0, 0.0], (mpc.horizon, 1))
    states = mpc.simulate(x0, t0, inputs)
    times = t0 + mpc.config.step_h * np.arange(mpc.horizon + 1)
    return states, inputs, times


def _assert_same(
    mpc: NonlinearMPC, hybrid: HybridModel, states: Any, inputs: Any, times: Any
) -> None:
    ref = _symbolic_reference(mpc, hybrid)
    std_ref, state_std_ref, q_ref = _reference_spread(mpc, ref, states, inputs, times)
    std, state_std = mpc._uncertainty(states, inputs, times)
    q = mpc._linearisation(states, inputs, times)
    assert np.max(state_std_ref) > 0.0  # the spread is not trivially zero
    np.testing.assert_allclose(std, std_ref, rtol=1e-9, atol=1e-14)
    np.testing.assert_allclose(state_std, state_std_ref, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(q, q_ref, rtol=1e-9, atol=1e-12)
    for k in (0, 5):
        mean, sd = mpc.residual_at(times[k], states[k], inputs[k])
        assert mean[0] == pytest.approx(
            float(ref["mean"](times[k], states[k], inputs[k])), rel=1e-9
        )
        assert sd[0] == pytest.approx(float(ref["std"](times[k], states[k], inputs[k])), rel=1e-9)


@pytest.mark.parametrize("scalar", [True, False], ids=["sx-stage", "mx-stage"])
def test_refresh_swaps_data_and_matches_the_symbolic_path(  # type: ignore[no-untyped-def]
    base, factor, scalar, monkeypatch
) -> None:
    if not scalar:  # the matrix form a large exact GP keeps
        monkeypatch.setattr("controller.numerics.mpc._EXPAND_LIMIT", 0)
    mpc, hybrid = _mpc(base, copy.deepcopy(factor))
    per_step, residual_fn = mpc._lin_fn, mpc._res_fn
    assert per_step is not None and residual_fn is not None
    states, inputs, times = _plan(mpc, base)
    _assert_same(mpc, hybrid, states, inputs, times)
    data_before = mpc._res_data.copy()
    capacity = factor.batch_capacity
    features = np.column_stack([np.full(capacity + 3, 12.0), np.linspace(40.0, 78.0, capacity + 3)])
    hybrid.observe("growth_rate", features[:2], np.full(2, 0.4))
    mpc.refresh_residual()
    # nothing was built: the same functions, new numbers
    assert mpc._lin_fn is per_step and mpc._res_fn is residual_fn
    assert mpc._res_data.size == data_before.size
    assert not np.array_equal(mpc._res_data, data_before)
    _assert_same(mpc, hybrid, states, inputs, times)
    # more observations than running-batch slots: the most recent `capacity` are kept
    hybrid.observe("growth_rate", features[2:], np.full(capacity + 1, 0.5))
    mpc.refresh_residual()
    assert factor.batch_capacity == hybrid.corrections[0].residual.n_running_
    assert mpc._lin_fn is per_step and mpc._res_fn is residual_fn
    _assert_same(mpc, hybrid, states, inputs, times)


def test_learned_residual_moves_the_plan(base, factor) -> None:  # type: ignore[no-untyped-def]
    """The swapped data reach the solve: a batch observed growing 50 % faster changes the
    linearisation the NLP receives and the planned viable cells."""
    mpc, hybrid = _mpc(base, copy.deepcopy(factor))
    states, inputs, times = _plan(mpc, base)
    q_before = mpc._linearisation(states, inputs, times).copy()
    x0 = states[0]
    u_prev = {"perfusion_rate": 1.0, "glucose_feed": 1.0, "il2_addition": 0.0}
    first = mpc.step(x0, float(times[0]), u_prev)
    mpc.reset()
    features = np.column_stack([np.full(4, 12.0), np.linspace(60.0, 78.0, 4)])
    hybrid.observe("growth_rate", features, np.full(4, 0.5))
    mpc.refresh_residual()
    assert not np.allclose(mpc._linearisation(states, inputs, times)[0], q_before[0])
    second = mpc.step(x0, float(times[0]), u_prev)
    assert first.success and second.success
    iv = list(mpc.state_names).index("viable_cells")
    assert second.predicted_states[6, iv] > first.predicted_states[6, iv]


def test_a_longer_data_vector_rebuilds_once_and_logs(base, factor, caplog) -> None:  # type: ignore[no-untyped-def]
    """A residual re-fitted on more points (another layout) cannot be swapped in: the MPC
    rebuilds its residual functions once, says so, and then matches the new residual."""
    gp = copy.deepcopy(factor)
    mpc, hybrid = _mpc(base, gp)
    per_step = mpc._lin_fn
    rng = np.random.default_rng(11)
    rows = np.column_stack([rng.uniform(0.0, 20.0, 70), rng.uniform(20.0, 200.0, 70)])
    gp.fit(rows, -0.01 * rows[:, 0], batches=np.repeat(np.arange(7), 10))
    with caplog.at_level(logging.WARNING):
        hybrid.refresh()
        mpc.refresh_residual()
    assert "data length changed" in caplog.text and "data layout changed" in caplog.text
    assert mpc._lin_fn is not per_step
    _assert_same(mpc, hybrid, *_plan(mpc, base))

"""``hmpc-sim bench mpc``: timing of the nonlinear MPC against a peer and against itself.

Problems (performance.md):

Each problem runs side by side, interleaved step by step so that all see the same machine
state: the structured path (``[solver] name = "sqpmethod"``: SQP with qrqp, bounds as
bounds, primal-dual warm start, compiled NLP cached on disk; "ours"), the IPOPT
reference path (the shipped tuning, "ipopt_path") and, for ``dompc-batch``, the peer.
The load average (1, 5, 15 min) is recorded at the start and the end.

- ``dompc-batch``: the do-mpc batch bioreactor example, run in one process with hmpc's
  MPC and with do-mpc 5.1.2 (benchmark-only dependency, extra ``bench``), each in its own
  closed loop. Output: ``ours_median_s``, ``ipopt_path_median_s``, ``peer_median_s``,
  ``speedup`` (peer / ours), ``speedup_vs_ipopt_path`` (IPOPT path / ours),
  ``fingerprint_max_abs_err`` (our first five inputs vs the peer's), ``failed_steps`` (of
  ours: no move from an accepted SQP solve, recovery steps excepted, which IPOPT solves by
  design: ``recovery_steps``) and more.
- ``hybrid-atmp``: the T-cell problem (hourly steps, 48-step horizon, all constraints)
  with a GP residual of N points on the growth rate, optionally with variance-aware
  tightening; the same problem without GP is timed in the same run, on both paths.
  Output: ``median_s``, ``p95_s``, ``iterations_median``, ``mechanistic_median_s``,
  ``gp_overhead_ratio`` (ours), the same with ``ipopt_path_`` in front, ``speedup_vs_ipopt_path``,
  ``failed_steps`` and ``refresh_residual_median_s`` (``NonlinearMPC.refresh_residual``
  of the hybrid MPC, timed after the loop).

Wire-up: :func:`add_bench_mpc` adds ``mpc`` to an existing ``bench`` sub-parser set;
:func:`register` adds ``bench`` itself when no one else has.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import importlib.util
import json
import logging
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import casadi as ca
import numpy as np
import numpy.typing as npt

from controller.config_files import config_file
from controller.laws.control import HybridPredictionModel
from controller.numerics.mpc import NonlinearMPC
from controller.numerics.mpc_config import MPCConfig, load_mpc_config, with_process_limits
from plant_models.errors import ConfigError, HmpcError
from plant_models.hybrid import HybridModel, RateCorrection
from plant_models.process import DEFAULT_PROCESS
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process
from sim.baselines import make_baseline
from sim.closed_loop import default_limiter
from sim.mpc_controllers import fit_growth_residual_gp
from sim.patients import VirtualPatient
from sim.plant import VirtualBioreactor

__all__ = [
    "DOMPC_FINGERPRINT",
    "DompcBatchModel",
    "add_bench_mpc",
    "bench_dompc_batch",
    "bench_hybrid_atmp",
    "register",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]


#: The peer's closed loop as documented in performance.md (first five inputs, final state).
DOMPC_FINGERPRINT = {
    "first_inputs": [0.0081000, 0.0145017, 0.0192925, 0.0226668, 0.0248766],
    "final_state": [3.70000, 1.6046e-4, 1.681883, 123.955096],
}
DOMPC_X0 = (1.0, 0.5, 0.0, 120.0)


# ---------------------------------------------------------------------- problem A


class DompcBatchModel:
    """do-mpc's batch bioreactor (examples/batch_reactor) as an MPC prediction model.

    States biomass X, substrate S, product P, volume V; input feed u::

        mu(S) = mu_m S / (K_m + S + S^2/K_i)
        dX = mu X - u/V X;  dS = -mu X/Y_x - v X/Y_p + u/V (S_in - S)
        dP = v X - u/V P;   dV = u
    """

    name = "dompc_batch"
    state_names = ("biomass", "substrate", "product", "volume")
    input_names = ("feed",)

    def __init__(
        self,
        mu_m: float = 0.02,
        k_m: float = 0.05,
        k_i: float = 5.0,
        v: float = 0.004,
        y_p: float = 1.2,
        y_x: float = 0.5,
        s_in: float = 200.0,
    ) -> None:
        self.mu_m, self.k_m, self.k_i, self.v = mu_m, k_m, k_i, v
        self.y_p, self.y_x, self.s_in = y_p, y_x, s_in

    def dynamics(self) -> ca.Function:
        t = ca.SX.sym("t")
        x = ca.SX.sym("x", 4)
        u = ca.SX.sym("u", 1)
        xb, s, p, vol = x[0], x[1], x[2], x[3]
        mu = self.mu_m * s / (self.k_m + s + s**2 / self.k_i)
        xdot = ca.vertcat(
            mu * xb - u[0] / vol * xb,
            -mu * xb / self.y_x - self.v * xb / self.y_p + u[0] / vol * (self.s_in - s),
            self.v * xb - u[0] / vol * p,
            u[0],
        )
        return ca.Function("dompc_batch", [t, x, u], [xdot, mu], ["t", "x", "u"], ["xdot", "rates"])


def _cvodes_plant(model: DompcBatchModel) -> ca.Function:
    f = model.dynamics()
    x = ca.SX.sym("x", 4)
    u = ca.SX.sym("u", 1)
    ode = f(0.0, x, u)[0]
    opts = {"abstol": 1e-10, "reltol": 1e-10}
    return ca.integrator("dompc_plant", "cvodes", {"x": x, "p": u, "ode": ode}, 0.0, 1.0, opts)


def _dompc_peer(model: DompcBatchModel) -> tuple[Any, Any]:
    """do-mpc's own MPC and simulator for the batch reactor (as in its example)."""
    if importlib.util.find_spec("do_mpc") is None:
        raise ConfigError(
            "bench mpc --problem dompc-batch needs do-mpc 5.1.2 (the peer); install the "
            "benchmark extra: pip install 'hmpc[bench]' (or do-mpc==5.1.2)."
        )
    # optional, benchmark-only dependency (untyped): imported by name, used as Any
    do_mpc: Any = importlib.import_module("do_mpc")

    m = do_mpc.model.Model("continuous")
    xb = m.set_variable("_x", "X_s")
    s = m.set_variable("_x", "S_s")
    p = m.set_variable("_x", "P_s")
    vol = m.set_variable("_x", "V_s")
    inp = m.set_variable("_u", "inp")
    y_x = m.set_variable("_p", "Y_x")
    s_in = m.set_variable("_p", "S_in")
    mu = model.mu_m * s / (model.k_m + s + s**2 / model.k_i)
    m.set_rhs("X_s", mu * xb - inp / vol * xb)
    m.set_rhs("S_s", -mu * xb / y_x - model.v * xb / model.y_p + inp / vol * (s_in - s))
    m.set_rhs("P_s", model.v * xb - inp / vol * p)
    m.set_rhs("V_s", inp)
    m.setup()

    mpc = do_mpc.controller.MPC(m)
    mpc.settings.n_horizon = 20
    mpc.settings.n_robust = 0
    mpc.settings.open_loop = False
    mpc.settings.t_step = 1.0
    mpc.settings.state_discretization = "collocation"
    mpc.settings.collocation_type = "radau"
    mpc.settings.collocation_deg = 2
    mpc.settings.collocation_ni = 2
    mpc.settings.store_full_solution = False
    mpc.settings.supress_ipopt_output()
    mpc.set_objective(mterm=-m.x["P_s"], lterm=-m.x["P_s"])
    mpc.set_rterm(inp=1.0)
    mpc.bounds["lower", "_x", "X_s"] = 0.0
    mpc.bounds["lower", "_x", "S_s"] = -0.01
    mpc.bounds["lower", "_x", "P_s"] = 0.0
    mpc.bounds["lower", "_x", "V_s"] = 0.0
    mpc.bounds["upper", "_x", "X_s"] = 3.7
    mpc.bounds["upper", "_x", "P_s"] = 3.0
    mpc.bounds["lower", "_u", "inp"] = 0.0
    mpc.bounds["upper", "_u", "inp"] = 0.2
    mpc.set_uncertainty_values(Y_x=np.array([model.y_x]), S_in=np.array([model.s_in]))
    mpc.setup()

    sim = do_mpc.simulator.Simulator(m)
    sim.settings.t_step = 1.0
    sim.settings.integration_tool = "cvodes"
    sim.settings.abstol = 1e-10
    sim.settings.reltol = 1e-10
    p_template = sim.get_p_template()

    def p_fun(t_now: float) -> Any:
        p_template["Y_x"] = model.y_x
        p_template["S_in"] = model.s_in
        return p_template

    sim.set_p_fun(p_fun)
    sim.setup()
    x0 = np.array(DOMPC_X0).reshape(-1, 1)
    mpc.x0 = x0
    sim.x0 = x0
    mpc.set_initial_guess()
    return mpc, sim


def structured_config(config: MPCConfig, *, jit: bool = True) -> MPCConfig:
    """``config`` on the structured path: ``sqpmethod`` (qrqp, IPOPT fallback), compiled."""
    solver = dataclasses.replace(config.solver, name="sqpmethod", qpsol="qrqp", jit=jit)
    return dataclasses.replace(config, solver=solver)


def _load_average() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def _failed(res: Any) -> bool:
    """A step of the structured path whose move is not from an accepted SQP solve (a
    recovery step, solved by IPOPT by design, excepted)."""
    return (not res.success) or (res.solver != "sqpmethod" and not res.recovery)


def _compile_info(mpc: NonlinearMPC) -> list[dict[str, Any]]:
    return [
        {"action": o.action, "compile_s": round(o.compile_s, 2), "path": str(o.path)}
        for o in mpc.compile_outcomes
    ]


def bench_dompc_batch(
    steps: int = 150, *, with_peer: bool = True, jit: bool = True
) -> dict[str, Any]:
    """Closed loops of problem A with our two paths and do-mpc, interleaved step by step."""
    load_start = _load_average()
    model = DompcBatchModel()
    config = dataclasses.replace(
        load_mpc_config(config_file("mpc_dompc_batch.toml")), on_failure="hold"
    )
    t_build = time.perf_counter()
    ours = NonlinearMPC(model, structured_config(config, jit=jit))
    build_s = time.perf_counter() - t_build
    ref = NonlinearMPC(model, config)
    plant = _cvodes_plant(model)
    peer = _dompc_peer(model) if with_peer else None
    x = np.array(DOMPC_X0, dtype=float)
    x_ref = x.copy()
    u_prev, u_ref = np.zeros(1), np.zeros(1)
    ours_t: list[float] = []
    ours_it: list[int] = []
    ours_u: list[float] = []
    ref_t: list[float] = []
    ref_it: list[int] = []
    ref_u: list[float] = []
    failed = ref_failed = recovery = 0
    peer_t: list[float] = []
    peer_u: list[float] = []
    x_peer = np.array(DOMPC_X0, dtype=float).reshape(-1, 1)
    for k in range(steps):
        t0 = time.perf_counter()
        res = ours.step(x, float(k), u_prev)
        ours_t.append(time.perf_counter() - t0)
        ours_it.append(res.iterations)
        failed += int(_failed(res))
        recovery += int(res.recovery)
        if _failed(res):
            log.warning("dompc-batch step %d: %s (%s)", k, res.status, res.solver or "no move")
        u_prev = np.array([res.u["feed"]])
        ours_u.append(float(u_prev[0]))
        x = np.asarray(plant(x0=x, p=u_prev)["xf"], dtype=float).reshape(-1)
        t0 = time.perf_counter()
        rr = ref.step(x_ref, float(k), u_ref)
        ref_t.append(time.perf_counter() - t0)
        ref_it.append(rr.iterations)
        ref_failed += int(not rr.success)
        u_ref = np.array([rr.u["feed"]])
        ref_u.append(float(u_ref[0]))
        x_ref = np.asarray(plant(x0=x_ref, p=u_ref)["xf"], dtype=float).reshape(-1)
        if peer is not None:
            mpc, sim = peer
            t0 = time.perf_counter()
            u_peer = mpc.make_step(x_peer)
            peer_t.append(time.perf_counter() - t0)
            status = str(mpc.solver_stats.get("return_status", ""))
            if not mpc.solver_stats.get("success", False):
                log.warning("do-mpc step %d: %s", k, status)
            peer_u.append(float(np.asarray(u_peer).reshape(-1)[0]))
            x_peer = sim.make_step(u_peer)
    first = np.array(ours_u[:5])
    first_ref = np.array(ref_u[:5])
    ours_med, ref_med = statistics.median(ours_t), statistics.median(ref_t)
    out: dict[str, Any] = {
        "problem": "dompc-batch",
        "steps": steps,
        "ours_solver": "sqpmethod + qrqp, exact Hessian, "
        + (f"compiled {config.solver.jit_optimisation}" if jit else "not compiled"),
        "ours_median_s": ours_med,
        "ours_p95_s": float(np.percentile(ours_t, 95)),
        "ours_iterations_median": statistics.median(ours_it),
        "ours_variables": ours.n_variables,
        "ours_first_inputs": first.tolist(),
        "ours_final_state": x.tolist(),
        "ours_build_s": build_s,
        "ours_compile": _compile_info(ours),
        "failed_steps": failed,
        "recovery_steps": recovery,
        "ipopt_path_median_s": ref_med,
        "ipopt_path_p95_s": float(np.percentile(ref_t, 95)),
        "ipopt_path_iterations_median": statistics.median(ref_it),
        "ipopt_path_first_inputs": first_ref.tolist(),
        "ipopt_path_final_state": x_ref.tolist(),
        "ipopt_path_failed_steps": ref_failed,
        "speedup_vs_ipopt_path": ref_med / ours_med,
        "ours_vs_ipopt_path_inputs_max_abs_diff": float(
            np.max(np.abs(np.array(ours_u) - np.array(ref_u)))
        ),
        "documented_fingerprint": DOMPC_FINGERPRINT,
        "fingerprint_vs_documented_max_abs_err": float(
            np.max(np.abs(first - DOMPC_FINGERPRINT["first_inputs"][: first.size]))
        ),
        "transcription": (
            f"multiple shooting, RK4 x{config.integrator_substeps} per step "
            "(peer: Radau collocation degree 2, 2 elements per step)"
        ),
    }
    if peer is not None:
        pf = np.array(peer_u[:5])
        mpc = peer[0]
        peer_med = statistics.median(peer_t)
        out.update(
            {
                "peer": "do-mpc " + _version("do_mpc"),
                "peer_median_s": peer_med,
                "peer_p95_s": float(np.percentile(peer_t, 95)),
                "peer_variables": int(mpc._opt_x_num.cat.shape[0]),
                "peer_first_inputs": pf.tolist(),
                "peer_final_state": np.asarray(x_peer, dtype=float).reshape(-1).tolist(),
                "speedup": peer_med / ours_med,
                "ipopt_path_speedup": peer_med / ref_med,
                "fingerprint_max_abs_err": float(np.max(np.abs(first - pf))),
                "ipopt_path_fingerprint_max_abs_err": float(np.max(np.abs(first_ref - pf))),
                "final_state_max_abs_err": float(
                    np.max(np.abs(x - np.asarray(x_peer, dtype=float).reshape(-1)))
                ),
            }
        )
    out["load_average"] = {"start": load_start, "end": _load_average()}
    return out


def _version(module: str) -> str:
    try:
        from importlib.metadata import version

        return version(module.replace("_", "-"))
    except Exception:
        return "unknown"


# ---------------------------------------------------------------------- problem B


def bench_hybrid_atmp(
    gp_points: int,
    *,
    variance: bool,
    steps: int = 48,
    sparse: bool = True,
    seed: int = 0,
    start_h: float = 72.0,
    residual: str | None = None,
    config_path: Path | None = None,
    refreshes: int = 20,
    jit: bool = True,
) -> dict[str, Any]:
    """Problem B: hourly T-cell MPC with and without a GP residual, on the structured path
    and on the IPOPT reference path, interleaved per step.

    The nominal patient's batch runs on the recipe until ``start_h``, then the four MPCs
    are stepped ``steps`` times from the same true state (the plant follows the hybrid MPC
    of the IPOPT path, as before the structured path existed). ``residual`` overrides the
    tuning's residual mode (``exact`` or ``linearized``). Afterwards the residual learns
    ``refreshes`` times (:func:`_time_refreshes`): ``refresh_residual_median_s`` is the
    median of ``NonlinearMPC.refresh_residual`` of the structured hybrid MPC.
    """
    load_start = _load_average()
    proc = load_tcell_process()[0]
    base = TCellExpansionModel(load_tcell_parameters()[0], proc)
    path = config_path or config_file("mpc_tcell_hourly.toml")
    config: MPCConfig = with_process_limits(load_mpc_config(path), proc, base.operating_bounds())
    if not variance:
        config = dataclasses.replace(config, kappa=0.0)
    if residual is not None:
        config = dataclasses.replace(config, residual=residual)
    fast = structured_config(config, jit=jit)
    t_fit = time.perf_counter()
    gp = fit_growth_residual_gp(gp_points, sparse=sparse, seed=seed)
    fit_s = time.perf_counter() - t_fit
    # the deployed hybrid model (controller.laws.control): the residual's data are a
    # numeric input of functions built once, so refresh_residual swaps arrays
    hybrid_model = HybridModel(base, [RateCorrection("growth_rate", gp, "additive")])
    hybrid = HybridPredictionModel(hybrid_model)
    t_build = time.perf_counter()
    mpc_gp = NonlinearMPC(hybrid, fast)
    build_s = time.perf_counter() - t_build
    mpc_mech = NonlinearMPC(base, fast)
    ref_gp = NonlinearMPC(hybrid, config)
    ref_mech = NonlinearMPC(base, config)
    plant = VirtualBioreactor.for_process(DEFAULT_PROCESS, VirtualPatient.nominal())
    limiter = default_limiter(plant)
    # the recipe brings the culture to the growth phase, where the inputs matter
    recipe = make_baseline("recipe", DEFAULT_PROCESS)
    u_ref = {n: plant.bounds[n][0] for n in plant.model.input_names}
    while plant.time_h < start_h - 1e-9:
        u_ref = limiter.apply(recipe.step(plant.time_h, [], u_ref), u_ref, 1.0)
        plant.step(u_ref, 1.0)
    x = plant.state.copy()
    # one previous input per MPC
    prev = {"gp": dict(u_ref), "mech": dict(u_ref), "ref_gp": dict(u_ref), "ref_mech": dict(u_ref)}
    mpcs = {"gp": mpc_gp, "mech": mpc_mech, "ref_gp": ref_gp, "ref_mech": ref_mech}
    times: dict[str, list[float]] = {k: [] for k in mpcs}
    iters: dict[str, list[int]] = {k: [] for k in mpcs}
    failed = ref_failures = failures = 0
    move_diff = 0.0
    for _ in range(steps):
        t = plant.time_h
        results = {}
        for key, mpc in mpcs.items():
            t0 = time.perf_counter()
            results[key] = mpc.step(x, t, prev[key])
            times[key].append(time.perf_counter() - t0)
            iters[key].append(results[key].iterations)
            prev[key] = limiter.apply(results[key].u, prev[key], 1.0)
        failed += int(_failed(results["gp"]))
        failures += int(not results["gp"].success)
        ref_failures += int(not results["ref_gp"].success)
        move_diff = max(
            move_diff,
            max(abs(results["gp"].u[n] - results["ref_gp"].u[n]) for n in results["gp"].u),
        )
        plant.step(prev["ref_gp"], 1.0)
        x = plant.state.copy()
    refresh_s, refresh_total_s = _time_refreshes(gp, hybrid_model, mpc_gp, refreshes, seed)
    med = {k: statistics.median(v) for k, v in times.items()}
    return {
        "problem": "hybrid-atmp",
        "gp_points": gp_points,
        "gp_kind": "sparse" if sparse else "exact",
        "gp_basis": int(gp.n_basis_),
        "variance": variance,
        "kappa": config.kappa,
        "residual": config.residual,
        "start_h": start_h,
        "steps": steps,
        "horizon": config.horizon,
        "step_h": config.step_h,
        "ours_solver": f"sqpmethod + qrqp, {'compiled' if jit else 'not compiled'}",
        "median_s": med["gp"],
        "p95_s": float(np.percentile(times["gp"], 95)),
        "iterations_median": statistics.median(iters["gp"]),
        "failures": failures,
        "failed_steps": failed,
        "mechanistic_median_s": med["mech"],
        "gp_overhead_ratio": med["gp"] / med["mech"],
        "ipopt_path_median_s": med["ref_gp"],
        "ipopt_path_p95_s": float(np.percentile(times["ref_gp"], 95)),
        "ipopt_path_iterations_median": statistics.median(iters["ref_gp"]),
        "ipopt_path_failures": ref_failures,
        "ipopt_path_mechanistic_median_s": med["ref_mech"],
        "ipopt_path_gp_overhead_ratio": med["ref_gp"] / med["ref_mech"],
        "speedup_vs_ipopt_path": med["ref_gp"] / med["gp"],
        "ours_vs_ipopt_path_move_max_abs_diff": move_diff,
        "gp_fit_s": fit_s,
        "nlp_build_s": build_s,
        "ours_compile": _compile_info(mpc_gp),
        "variables": mpc_gp.n_variables,
        "refreshes": refreshes,
        "refresh_residual_median_s": statistics.median(refresh_s) if refresh_s else None,
        "refresh_with_update_median_s": (
            statistics.median(refresh_total_s) if refresh_total_s else None
        ),
        "load_average": {"start": load_start, "end": _load_average()},
    }


def _time_refreshes(
    gp: Any, hybrid: HybridModel, mpc: NonlinearMPC, count: int, seed: int
) -> tuple[list[float], list[float]]:
    """After the timed loop: ``count`` times, the residual learns 4 new points
    (``GPResidual.update``), the hybrid model re-reads its data (``refresh``) and the MPC
    takes them (``refresh_residual``). Returns the times of ``refresh_residual`` alone and
    of the three together, s."""
    rng = np.random.default_rng(seed + 1)
    mpc_s: list[float] = []
    total_s: list[float] = []
    for _ in range(count):
        x_new = gp.x_mean_ + gp.x_scale_ * rng.standard_normal((4, gp.n_features))
        y_new = gp.predict(x_new)[0] + 1e-3 * rng.standard_normal(4)
        t0 = time.perf_counter()
        gp.update(x_new, y_new)
        hybrid.refresh()
        t1 = time.perf_counter()
        mpc.refresh_residual()
        t2 = time.perf_counter()
        mpc_s.append(t2 - t1)
        total_s.append(t2 - t0)
    return mpc_s, total_s


# ---------------------------------------------------------------------- CLI


def add_bench_mpc(bench_subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``mpc`` to the sub-commands of ``hmpc-sim bench``."""
    p = bench_subparsers.add_parser("mpc", help="time the nonlinear MPC (vs do-mpc, GP sizes)")
    p.add_argument("--problem", choices=("dompc-batch", "hybrid-atmp"), required=True)
    p.add_argument("--json", type=Path, required=True, help="write the figures here")
    p.add_argument("--steps", type=int, default=None, help="closed-loop steps (150 / 48)")
    p.add_argument("--gp-points", type=int, default=300, help="GP training points N")
    p.add_argument("--variance", action="store_true", help="variance-aware tightening")
    p.add_argument("--exact-gp", action="store_true", help="exact GP instead of sparse")
    p.add_argument("--no-peer", action="store_true", help="dompc-batch: skip do-mpc")
    p.add_argument(
        "--no-jit",
        action="store_true",
        help="structured path without compiled functions (else compiled, cached on disk: "
        "$HMPC_CACHE_DIR or ~/.cache/hmpc)",
    )
    p.add_argument("--seed", type=int, default=0, help="seed of the GP training data")
    p.add_argument(
        "--residual",
        choices=("exact", "linearized"),
        default=None,
        help="hybrid-atmp: GP mean exactly in the NLP or linearised about the last plan",
    )
    p.add_argument(
        "--start-hours", type=float, default=72.0, help="hybrid-atmp: recipe until this age"
    )
    p.set_defaults(func=cmd_bench_mpc)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """EXTRA_COMMANDS hook: add ``bench`` (if nobody has) and ``bench mpc``."""
    bench = subparsers.choices.get("bench")
    if bench is None:
        bench = subparsers.add_parser("bench", help="benchmarks")
    bench_sub = next(
        (a for a in bench._actions if isinstance(a, argparse._SubParsersAction)),
        None,
    )
    if bench_sub is None:
        bench_sub = bench.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    add_bench_mpc(bench_sub)


def cmd_bench_mpc(args: argparse.Namespace) -> int:
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be at least 1, got {args.steps}")
    if args.gp_points < 10:
        raise ConfigError(f"--gp-points must be at least 10, got {args.gp_points}")
    try:
        if args.problem == "dompc-batch":
            out = bench_dompc_batch(
                args.steps or 150, with_peer=not args.no_peer, jit=not args.no_jit
            )
        else:
            out = bench_hybrid_atmp(
                args.gp_points,
                variance=args.variance,
                steps=args.steps or 48,
                sparse=not args.exact_gp,
                seed=args.seed,
                start_h=args.start_hours,
                residual=args.residual,
                jit=not args.no_jit,
            )
    except HmpcError:
        raise
    out["machine"] = {"python": platform.python_version(), "casadi": _version("casadi")}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    _print_table(out)
    print(f"wrote {args.json}")
    return 0


def _print_table(out: dict[str, Any]) -> None:
    """The figures side by side: peer, IPOPT path, structured path."""
    load = out.get("load_average", {})
    print(f"{out['problem']}: {out['steps']} steps, load average {load}")
    rows: list[tuple[str, str, str, str]] = [("", "median s", "p95 s", "failed")]
    if out["problem"] == "dompc-batch":
        if "peer_median_s" in out:
            rows.append(
                (out["peer"], f"{out['peer_median_s']:.4g}", f"{out['peer_p95_s']:.4g}", "")
            )
        rows.append(
            (
                "ours, IPOPT path",
                f"{out['ipopt_path_median_s']:.4g}",
                f"{out['ipopt_path_p95_s']:.4g}",
                str(out["ipopt_path_failed_steps"]),
            )
        )
        rows.append(
            (
                "ours, structured path",
                f"{out['ours_median_s']:.4g}",
                f"{out['ours_p95_s']:.4g}",
                str(out["failed_steps"]),
            )
        )
        keys = ("speedup", "ipopt_path_speedup", "speedup_vs_ipopt_path", "fingerprint_max_abs_err")
    else:
        rows.append(
            (
                "hybrid, IPOPT path",
                f"{out['ipopt_path_median_s']:.4g}",
                f"{out['ipopt_path_p95_s']:.4g}",
                str(out["ipopt_path_failures"]),
            )
        )
        rows.append(
            (
                "hybrid, structured path",
                f"{out['median_s']:.4g}",
                f"{out['p95_s']:.4g}",
                str(out["failed_steps"]),
            )
        )
        rows.append(
            ("mechanistic, IPOPT path", f"{out['ipopt_path_mechanistic_median_s']:.4g}", "", "")
        )
        rows.append(("mechanistic, structured path", f"{out['mechanistic_median_s']:.4g}", "", ""))
        keys = (
            "speedup_vs_ipopt_path",
            "gp_overhead_ratio",
            "ipopt_path_gp_overhead_ratio",
            "refresh_residual_median_s",
        )
    for row in rows:
        print(f"  {row[0]:<30} {row[1]:>10} {row[2]:>10} {row[3]:>7}")
    print(", ".join(f"{k} {out[k]:.4g}" for k in keys if isinstance(out.get(k), float | int)))

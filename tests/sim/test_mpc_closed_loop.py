"""Closed-loop tests of the MPC controllers (sim/mpc_controllers.py) and the benchmark
command (sim/bench_mpc.py), with the real solver and the virtual plant."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
from pathlib import Path

import casadi as ca
import numpy as np
import pytest

from controller.config_files import config_file
from controller.numerics.mpc import NonlinearMPC
from controller.numerics.mpc_config import load_mpc_config, with_process_limits
from plant_models.errors import ConfigError
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process
from sim.bench_mpc import (
    DOMPC_FINGERPRINT,
    add_bench_mpc,
    bench_dompc_batch,
    register,
)
from sim.closed_loop import run_closed_loop, summarize
from sim.mpc_controllers import (
    GP_FEATURES,
    GPCorrectedTCellModel,
    make_mpc_controller,
    mpc_statistics,
)
from sim.patients import VirtualPatient
from sim.plant import VirtualBioreactor


def test_mechanistic_mpc_reaches_the_dose_on_the_nominal_patient() -> None:
    plant = VirtualBioreactor.for_process("tcell", VirtualPatient.nominal())
    controller = make_mpc_controller("mechanistic-mpc", plant)
    days = plant.process.harvest_time / 24.0
    df = run_closed_loop(plant, controller, days=days)
    s = summarize(df, plant)
    stats = mpc_statistics(controller)
    assert s["dose_reached_by_harvest"]
    assert s["hard_constraint_violations"] == 0
    assert s["plant_clamped_inputs"] == 0
    assert s["final_viability"] > 0.75
    assert stats["mpc_steps"] == len(df) - 1
    assert stats["mpc_failures"] <= 2
    # the economic objective uses far less media than the fixed recipe (12.5 L)
    assert s["media_used"] < 8.0


@pytest.mark.parametrize("kind", ["tcell", "cho"])
@pytest.mark.parametrize("name", ["oracle", "mechanistic-mpc"])
def test_controllers_run_on_both_models(kind: str, name: str) -> None:
    patient = VirtualPatient.nominal()
    plant = (
        VirtualBioreactor.for_process("tcell", patient)
        if kind == "tcell"
        else VirtualBioreactor.for_process("cho", patient)
    )
    controller = make_mpc_controller(name, plant)
    df = run_closed_loop(plant, controller, days=0.25)
    assert controller.name == name
    assert len(controller.results) == 6
    # the CHO kinetics are non-smooth near depleted glutamine (configs/mpc_cho.toml): a rare
    # failed solve is allowed, but it must be caught by the shift policy
    failed = [r for r in controller.results if not r.success]
    assert len(failed) <= (1 if kind == "cho" else 0)
    assert all(r.fallback_used == "shift" for r in failed)
    assert df["hard_violation"].sum() == 0
    for r in controller.results:
        for n, (low, high) in plant.bounds.items():
            assert low <= r.u[n] <= high


def test_hybrid_mpc_runs_with_a_learned_residual() -> None:
    plant = VirtualBioreactor.for_process("tcell", VirtualPatient.nominal())
    controller = make_mpc_controller("hybrid-mpc", plant, gp_points=100)
    df = run_closed_loop(plant, controller, days=0.25)
    assert controller.mpc.residual_names == ("growth_rate",)
    assert all(r.success for r in controller.results)
    assert df["hard_violation"].sum() == 0
    # kappa > 0 in the tuning: the GP std is propagated and reported
    last = controller.results[-1]
    assert np.all(last.predicted_std > 0)
    assert last.predicted_state_std[-1, list(last.state_names).index("viable_cells")] > 0


def test_hybrid_mpc_on_cho_needs_a_fitted_residual() -> None:
    plant = VirtualBioreactor.for_process("cho", VirtualPatient.nominal())
    with pytest.raises(ValueError, match="--residual"):
        make_mpc_controller("hybrid-mpc", plant)


def test_hybrid_mpc_on_cho_from_cohort_records(tmp_path: Path) -> None:
    """CHO end to end through the CLIs: rule cohort -> hmpc fit -> simulate hybrid-mpc."""
    from controller.cli import main as hmpc_main
    from sim.cli import main as sim_main

    cohort = tmp_path / "cohort"
    assert sim_main(["cohort", "--model", "cho", "--patients", "4", "--seed", "3",
                     "--controller", "rule", "--out", str(cohort)]) == 0  # fmt: skip
    residual = tmp_path / "residual.npz"
    assert hmpc_main(["fit", "--data", str(cohort / "*" / "trajectory.csv"), "--model", "cho",
                      "--batch-effect", "none", "--out", str(residual),
                      "--report", str(tmp_path / "fit")]) == 0  # fmt: skip
    out = tmp_path / "run"
    assert sim_main(["simulate", "--model", "cho", "--controller", "hybrid-mpc",
                     "--residual", str(residual), "--patient-seed", "5", "--days", "0.5",
                     "--out", str(out)]) == 0  # fmt: skip
    summary = json.loads((out / "summary.json").read_text())
    assert summary["controller"] == "hybrid-mpc" and summary["model"] == "cho"
    assert summary["mpc_steps"] == 12 and summary["hard_constraint_violations"] == 0
    # the residual names the model it was trained for: a T-cell run refuses it
    with pytest.raises(ConfigError, match="'ammonia' is not a model variable"):
        plant = VirtualBioreactor.for_process("tcell", VirtualPatient.nominal())
        make_mpc_controller("hybrid-mpc", plant, residual=residual)


def test_residual_flag_is_for_hybrid_mpc_only(tmp_path: Path) -> None:
    from sim.cli import main as sim_main

    status = sim_main(["simulate", "--controller", "mechanistic-mpc", "--residual",
                       str(tmp_path / "r.npz"), "--out", str(tmp_path / "o")])  # fmt: skip
    assert status == 2 and not (tmp_path / "o").exists()


def test_unknown_controller_name() -> None:
    plant = VirtualBioreactor.for_process("tcell", VirtualPatient.nominal())
    with pytest.raises(ValueError, match="mechanistic-mpc"):
        make_mpc_controller("hybrid-mp", plant)


def test_mpc_sees_the_estimate_and_the_estimate_follows_the_truth() -> None:
    plant = VirtualBioreactor.for_process("tcell", VirtualPatient.nominal())
    controller = make_mpc_controller("mechanistic-mpc", plant)
    run_closed_loop(plant, controller, days=4.0)
    est = controller.last_estimate
    assert est is not None
    names = plant.model.state_names
    for name, rel in (("viable_cells", 0.1), ("glucose", 0.1), ("volume", 1e-2)):
        assert est.state[name] == pytest.approx(plant.state[names.index(name)], rel=rel)
    # the MPC was started from the estimate, not from the plant's true state
    first = controller.results[-1]
    x_mpc = first.predicted_states[0]
    assert x_mpc[names.index("viable_cells")] == pytest.approx(est.state["viable_cells"])
    assert x_mpc[names.index("viable_cells")] != plant.state[names.index("viable_cells")]


# ----------------------------------------------------------------------------- benchmark


def test_dompc_batch_matches_the_peers_fingerprint() -> None:
    out = bench_dompc_batch(steps=5, with_peer=False, jit=False)
    assert out["fingerprint_vs_documented_max_abs_err"] < 1e-4
    assert np.allclose(out["ours_first_inputs"], DOMPC_FINGERPRINT["first_inputs"], atol=1e-4)
    # both of our paths: the structured one (SQP, every step) and the IPOPT reference
    assert np.allclose(out["ipopt_path_first_inputs"], out["ours_first_inputs"], atol=1e-6)
    assert out["failed_steps"] == 0 and out["ipopt_path_failed_steps"] == 0


@pytest.mark.slow
def test_dompc_batch_full_closed_loop_final_state() -> None:
    out = bench_dompc_batch(steps=150, with_peer=False, jit=False)
    assert np.allclose(
        out["ours_final_state"], DOMPC_FINGERPRINT["final_state"], atol=1e-4, rtol=1e-5
    )
    assert np.allclose(
        out["ipopt_path_final_state"], DOMPC_FINGERPRINT["final_state"], atol=1e-4, rtol=1e-5
    )
    # biomass reaches its 3.7 limit: the SQP path solves every step (recovery aside)
    assert out["failed_steps"] == 0


@pytest.mark.slow
def test_dompc_batch_against_do_mpc_itself() -> None:
    if importlib.util.find_spec("do_mpc") is None:
        pytest.skip("do-mpc (extra 'bench') is not installed")
    out = bench_dompc_batch(steps=10, with_peer=True)
    assert out["fingerprint_max_abs_err"] < 1e-4
    assert out["speedup"] > 0


def test_bench_command_registers_next_to_other_bench_commands(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="hmpc-sim")
    sub = parser.add_subparsers(dest="command", required=True)
    # another module already added "bench" with its own sub-command
    other = sub.add_parser("bench").add_subparsers(dest="bench_command", required=True)
    other.add_parser("campaign")
    register(sub)
    args = parser.parse_args(
        ["bench", "mpc", "--problem", "dompc-batch", "--json", str(tmp_path / "o.json")]
    )
    assert args.problem == "dompc-batch" and callable(args.func)
    # and on a parser without "bench" it adds it
    parser2 = argparse.ArgumentParser(prog="hmpc-sim")
    sub2 = parser2.add_subparsers(dest="command", required=True)
    register(sub2)
    args2 = parser2.parse_args(
        [
            "bench",
            "mpc",
            "--problem",
            "hybrid-atmp",
            "--gp-points",
            "100",
            "--variance",
            "--json",
            "x.json",
        ]
    )
    assert args2.gp_points == 100 and args2.variance
    # add_bench_mpc works on any bench sub-parser set
    parser3 = argparse.ArgumentParser()
    add_bench_mpc(parser3.add_subparsers())


def test_bench_command_writes_json(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="hmpc-sim")
    register(parser.add_subparsers(dest="command", required=True))
    out = tmp_path / "bench.json"
    args = parser.parse_args(
        [
            "bench",
            "mpc",
            "--problem",
            "dompc-batch",
            "--no-peer",
            "--no-jit",
            "--steps",
            "3",
            "--json",
            str(out),
        ]
    )
    assert args.func(args) == 0
    data = json.loads(out.read_text())
    assert data["problem"] == "dompc-batch" and data["steps"] == 3
    assert data["ours_median_s"] > 0
    for key in ("ipopt_path_median_s", "speedup_vs_ipopt_path", "failed_steps", "load_average"):
        assert key in data


# ----------------------------------------------------------------------------- hybrid model


class AnalyticResidual:
    """A smooth, known growth-rate residual with the GPResidual export interface."""

    def to_casadi(self, name: str = "gp_residual", *, variance: bool = True) -> ca.Function:
        z = ca.MX.sym("features", 3)
        mean = 0.006 * ca.tanh((z[1] - 10.0) / 10.0) - 0.002 * z[0] / (5.0 + z[0])
        outs = [mean, ca.MX(1e-5)] if variance else [mean]
        names = ["mean", "variance"] if variance else ["mean"]
        return ca.Function(name, [z], outs, ["features"], names)


def hybrid_mpc(residual: str, kappa: float) -> tuple[NonlinearMPC, np.ndarray]:
    proc = load_tcell_process()[0]
    base = TCellExpansionModel(load_tcell_parameters()[0], proc)
    model = GPCorrectedTCellModel(base, AnalyticResidual(), GP_FEATURES)
    cfg = with_process_limits(
        load_mpc_config(config_file("mpc_tcell_hourly.toml")), proc, base.operating_bounds()
    )
    cfg = dataclasses.replace(cfg, residual=residual, kappa=kappa, horizon=16, step_h=3.0)
    values = base.initial_state()
    values.update(viable_cells=6.0, lactate=14.0, glucose=9.0, inhibitor=300.0)
    return NonlinearMPC(model, cfg), base.state_vector(values)


def test_linearized_residual_converges_to_the_exact_hybrid_solution() -> None:
    u0 = {"perfusion_rate": 2.0, "glucose_feed": 0.0, "il2_addition": 0.0}
    exact, x = hybrid_mpc("exact", 0.0)
    lin, _ = hybrid_mpc("linearized", 0.0)
    ref = exact.step(x, 120.0, u0)
    assert ref.success
    moves = []
    for _ in range(4):  # same state and time: each solve re-linearises about the last plan
        res = lin.step(x, 120.0, u0)
        assert res.success
        moves.append(np.array([res.u[n] for n in res.input_names]))
    target = np.array([ref.u[n] for n in ref.input_names])
    assert np.allclose(moves[-1], target, rtol=1e-3, atol=1e-4)
    assert np.allclose(
        lin.simulate(x, 120.0, res.predicted_inputs), ref.predicted_states, rtol=0.05
    )


def test_hybrid_std_is_reported_and_tightens() -> None:
    mpc, x = hybrid_mpc("exact", 2.0)
    res = mpc.step(x, 120.0, {"perfusion_rate": 2.0, "glucose_feed": 0.0, "il2_addition": 0.0})
    assert res.success
    assert res.residual_names == ("growth_rate",)
    assert np.allclose(res.predicted_std, np.sqrt(1e-5))
    assert res.predicted_state_std[-1, list(res.state_names).index("viable_cells")] > 0

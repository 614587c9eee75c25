"""The structured SQP path of the MPC ([solver] name = "sqpmethod": initial state and hard
state limits as variable bounds, IPOPT fallback) and the compiled, disk-cached NLP
(controller/numerics/compiled.py), against the IPOPT reference path, with the real
solvers and the real C compiler."""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.numerics.compiled import default_cache_dir
from controller.numerics.mpc import NonlinearMPC
from controller.numerics.mpc_config import MPCConfig, load_mpc_config, with_process_limits
from plant_models.errors import ConfigError
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process

REPO = Path(__file__).resolve().parents[3]
TCELL_CONFIG = REPO / "configs" / "mpc_tcell.toml"
U0 = {"perfusion_rate": 1.0, "glucose_feed": 0.5, "il2_addition": 0.0}


@pytest.fixture(scope="module")
def tcell() -> TCellExpansionModel:
    return TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])


def config(model: TCellExpansionModel, horizon: int = 12, **solver: Any) -> MPCConfig:
    base = with_process_limits(
        load_mpc_config(TCELL_CONFIG), model.process, model.operating_bounds()
    )
    base = dataclasses.replace(base, horizon=horizon, step_h=4.0)
    return dataclasses.replace(base, solver=dataclasses.replace(base.solver, **solver))


def state(model: TCellExpansionModel, **changes: float) -> np.ndarray:
    values = model.initial_state()
    values.update(changes)
    return model.state_vector(values)


def closed_loop(mpc: NonlinearMPC, model: TCellExpansionModel, steps: int) -> list[Any]:
    """``steps`` hourly steps from a growth-phase state near the glucose limit, the plant
    being the MPC's own model (so both paths see the same states if their moves agree)."""
    x = state(model, viable_cells=8.0, lactate=12.0, glucose=38.0, inhibitor=300.0)
    u = dict(U0)
    out = []
    for k in range(steps):
        t = 100.0 + k
        res = mpc.step(x, t, u)
        out.append(res)
        u = dict(res.u)
        uu = np.array([u[n] for n in mpc.input_names])
        x1 = mpc.simulate(x, t, uu.reshape(1, -1))[-1]
        x = x + (x1 - x) * mpc.config.sample_period_h / mpc.config.step_h
    return out


def test_structured_sqp_matches_the_ipopt_path_in_closed_loop(tcell: TCellExpansionModel) -> None:
    ipopt = NonlinearMPC(tcell, config(tcell, tolerance=1e-8))
    sqp = NonlinearMPC(tcell, config(tcell, name="sqpmethod", tolerance=1e-8))
    ref, got = closed_loop(ipopt, tcell, 6), closed_loop(sqp, tcell, 6)
    for r, g in zip(ref, got, strict=True):
        assert r.success and g.success
        assert g.solver == "sqpmethod", g.status  # solved by the SQP, no fallback
        for name in r.u:
            assert g.u[name] == pytest.approx(r.u[name], rel=1e-4, abs=1e-5)
        high = sqp.config.hard_bounds["glucose"].high
        assert high is not None
        glucose = g.predicted_states[1 : g.horizon_steps + 1, g.state_names.index("glucose")]
        assert np.all(glucose <= high + 1e-6)  # the bound (not a row) holds


def test_failed_sqp_step_falls_back_to_ipopt(tcell: TCellExpansionModel) -> None:
    # one SQP iteration from a cold start cannot converge: IPOPT re-solves the step
    cfg = config(tcell, name="sqpmethod", sqp_max_iter=1)
    x = state(tcell, viable_cells=8.0, lactate=12.0, glucose=20.0, inhibitor=300.0)
    res = NonlinearMPC(tcell, cfg).step(x, 100.0, U0)
    assert res.success and res.solver == "ipopt" and not res.fallback_used
    ref = NonlinearMPC(tcell, config(tcell)).step(x, 100.0, U0)
    for name in ref.u:
        assert res.u[name] == pytest.approx(ref.u[name], rel=1e-3, abs=1e-4)


def test_failed_sqp_step_without_fallback_applies_the_failure_policy(
    tcell: TCellExpansionModel,
) -> None:
    cfg = config(tcell, name="sqpmethod", sqp_max_iter=1, fallback="none")
    cfg = dataclasses.replace(cfg, on_failure="hold")
    x = state(tcell, viable_cells=8.0, lactate=12.0, glucose=20.0, inhibitor=300.0)
    res = NonlinearMPC(tcell, cfg).step(x, 100.0, U0)
    assert not res.success and res.fallback_used == "hold" and res.solver == ""
    assert res.u == U0


def test_structured_path_recovers_from_beyond_a_hard_limit(tcell: TCellExpansionModel) -> None:
    cfg = config(tcell, name="sqpmethod")
    x = state(tcell, viable_cells=8.0, lactate=10.0, glucose=130.0, inhibitor=300.0)
    res = NonlinearMPC(tcell, cfg).step(x, 100.0, dict(U0, glucose_feed=5.0))
    assert res.success and res.recovery and res.solver == "ipopt"
    assert res.u["glucose_feed"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("key", "value"),
    [("name", "snopt"), ("qpsol", "gurobi"), ("fallback", "hold"), ("jit_optimisation", "-O9")],
)
def test_bad_solver_settings_are_config_errors(tmp_path: Path, key: str, value: str) -> None:
    path = tmp_path / "mpc.toml"
    path.write_text(
        '[mpc]\nstep_h = 1.0\nhorizon = 10\nobjective = "tracking"\n'
        "[tracking]\nglucose = { reference = 8.0, weight = 1.0 }\n"
        f'[solver]\n{key} = "{value}"\n'
    )
    with pytest.raises(ConfigError, match=f"{key}.*{value}"):
        load_mpc_config(path)


def test_default_cache_dir_follows_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HMPC_CACHE_DIR", str(tmp_path / "c"))
    assert default_cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HMPC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert default_cache_dir() == tmp_path / "x" / "hmpc"


def replace_file(path: Path, data: bytes) -> None:
    staged = path.with_name(path.name + ".damaged")
    staged.write_bytes(data)
    os.replace(staged, path)


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler")
def test_compiled_nlp_is_cached_on_disk_and_rebuilt_when_corrupt(
    tcell: TCellExpansionModel, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # a short horizon and -O0: a quick compile; the mechanism is the same
    cfg = config(
        tcell, horizon=4, name="sqpmethod", jit=True, jit_optimisation="-O0",
        cache_dir=str(tmp_path), tolerance=1e-8,
    )  # fmt: skip
    first = NonlinearMPC(tcell, cfg)
    assert [o.action for o in first.compile_outcomes] == ["built"]
    lib = first.compile_outcomes[0].path
    assert lib.parent == tmp_path and lib.exists()
    mtime = lib.stat().st_mtime_ns

    second = NonlinearMPC(tcell, cfg)  # a restart: loaded, not compiled
    assert [o.action for o in second.compile_outcomes] == ["hit"]
    assert lib.stat().st_mtime_ns == mtime

    # the compiled solver gives the interpreted solver's answer
    plain = NonlinearMPC(tcell, dataclasses.replace(cfg, solver=dataclasses.replace(
        cfg.solver, jit=False)))  # fmt: skip
    x = state(tcell, viable_cells=8.0, lactate=12.0, glucose=38.0, inhibitor=300.0)
    a, b = second.step(x, 100.0, U0), plain.step(x, 100.0, U0)
    assert a.success and b.success and a.solver == "sqpmethod"
    for name in a.u:
        assert a.u[name] == pytest.approx(b.u[name], rel=1e-6, abs=1e-8)
    np.testing.assert_allclose(a.predicted_states, b.predicted_states, rtol=1e-6, atol=1e-8)

    # a damaged library is detected (digest), logged and rebuilt: never loaded, no crash.
    # (The damaged copy replaces the file, as another process would: the library mapped
    # into this process must not be overwritten in place.)
    data = bytearray(lib.read_bytes())
    data[len(data) // 2 : len(data) // 2 + 64] = b"\0" * 64
    replace_file(lib, bytes(data))
    with caplog.at_level(logging.WARNING, logger="controller.numerics.compiled"):
        third = NonlinearMPC(tcell, cfg)
    assert [o.action for o in third.compile_outcomes] == ["rebuilt"]
    assert "SHA-256 does not match" in caplog.text
    c = third.step(x, 100.0, U0)
    assert c.success and c.u == pytest.approx(a.u)

    # a truncated library and a lost digest file: the same
    replace_file(lib, b"not a library")
    lib.with_suffix(".sha256").unlink()
    fourth = NonlinearMPC(tcell, cfg)
    assert [o.action for o in fourth.compile_outcomes] == ["rebuilt"]
    assert fourth.step(x, 100.0, U0).u == pytest.approx(a.u)

    # a library that is a symbolic link (to a working library with a matching digest), or
    # that group or others may write to, is code someone else could have put there: it
    # is not loaded but rebuilt, and the rebuilt file is a private regular file
    planted = tmp_path / "elsewhere.so"
    planted.write_bytes(lib.read_bytes())
    lib.unlink()
    lib.symlink_to(planted)
    with caplog.at_level(logging.WARNING, logger="controller.numerics.compiled"):
        fifth = NonlinearMPC(tcell, cfg)
    assert [o.action for o in fifth.compile_outcomes] == ["rebuilt"]
    assert "symbolic link" in caplog.text
    assert not lib.is_symlink() and lib.stat().st_mode & 0o022 == 0
    lib.chmod(0o666)
    sixth = NonlinearMPC(tcell, cfg)
    assert [o.action for o in sixth.compile_outcomes] == ["rebuilt"]
    assert [o.action for o in NonlinearMPC(tcell, cfg).compile_outcomes] == ["hit"]
    # no staging file is left behind, and none has a guessable (pid-based) name
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".sha256", ".so", ".so"]


def test_a_cache_directory_others_may_write_to_is_refused(
    tcell: TCellExpansionModel, tmp_path: Path
) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)
    cfg = config(tcell, horizon=4, name="sqpmethod", jit=True, cache_dir=str(shared))
    with pytest.raises(ConfigError, match="group or others may write to it"):
        NonlinearMPC(tcell, cfg)
    assert list(shared.iterdir()) == []  # nothing compiled, nothing loaded


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs a C compiler")
def test_a_different_problem_gets_a_different_library(
    tcell: TCellExpansionModel, tmp_path: Path
) -> None:
    cfg = config(
        tcell, horizon=3, name="sqpmethod", jit=True, jit_optimisation="-O0",
        cache_dir=str(tmp_path),
    )  # fmt: skip
    a = NonlinearMPC(tcell, cfg).compile_outcomes[0]
    b = NonlinearMPC(tcell, dataclasses.replace(cfg, horizon=2)).compile_outcomes[0]
    assert a.key != b.key and a.path != b.path and b.action == "built"


def test_plan_multipliers_are_kept_in_the_full_nlp_layout(tcell: TCellExpansionModel) -> None:
    # glucose near its hard limit: state-bound multipliers are active in the plan
    mpc = NonlinearMPC(tcell, config(tcell, name="sqpmethod"))
    res = closed_loop(mpc, tcell, 2)[-1]
    assert res.solver == "sqpmethod"
    plan = mpc._plan
    assert plan is not None
    assert plan.lam_x.shape == (mpc.n_variables,) and plan.lam_g.shape == (mpc.n_constraints,)
    # the structured NLP's multipliers survive the round trip through the full layout
    sol_x, sol_g = mpc._to_structured_duals(plan.lam_x, plan.lam_g)
    back_x, back_g = mpc._to_full_duals(sol_x, sol_g)
    np.testing.assert_allclose(back_x, plan.lam_x, atol=1e-12)
    np.testing.assert_allclose(back_g, plan.lam_g, atol=1e-12)
    assert np.any(plan.lam_g[mpc._x0_rows] != 0.0)  # the initial state's multipliers

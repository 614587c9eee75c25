"""The deployable control laws (controller/control.py) in closed loop with the virtual
plant: the hybrid MPC learns the running batch's growth-rate deviation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from controller.control import ControllerSpec, RunningBatchLearner, build_controller
from plant_models.errors import ConfigError
from plant_models.gp import GPResidual
from sim.closed_loop import run_closed_loop
from sim.patients import VirtualPatient, load_cohort_spec
from sim.plant import VirtualBioreactor

HOURLY = Path(__file__).resolve().parents[2] / "configs" / "mpc_tcell_hourly.toml"


def _batch_effect_residual(path: Path) -> Path:
    """A multiplicative growth-rate residual with a per-batch offset, fitted on synthetic
    earlier batches whose growth differs from the model by a batch-specific factor."""
    rng = np.random.default_rng(3)
    xs, ys, batches = [], [], []
    for b in range(6):
        offset = rng.normal(0.0, 0.2)
        for _ in range(15):
            x = [rng.uniform(5, 25), rng.uniform(0, 20), rng.uniform(0, 190)]
            xs.append(x)
            ys.append(offset + 0.1 * np.tanh((x[1] - 10) / 5) + rng.normal(0, 0.02))
            batches.append(b)
    gp = GPResidual(
        ("glucose", "lactate", "culture_age"),
        ("mM", "mM", "h"),
        "growth_rate_residual",
        "1",
        batch_effect="offset",
        training_iterations=60,
    )
    gp.fit(np.array(xs), np.array(ys), batches=batches)
    gp.save(path)
    return path


def test_hybrid_mpc_learns_from_the_running_batch(tmp_path: Path) -> None:
    residual = _batch_effect_residual(tmp_path / "residual.npz")
    spec = ControllerSpec("hybrid-mpc", residual=residual, mpc_config=HOURLY, harvest_time=192.0)
    controller = build_controller(spec)
    learner = controller.learner
    assert isinstance(learner, RunningBatchLearner)
    mpc = controller.mpc
    probe = (100.0, np.array([1.0, 0.1, 10.0, 5.0, 30.0, 50.0, 1.0]), np.zeros(3))
    before = float(mpc._mean_fn(*probe))
    plant = VirtualBioreactor.tcell(VirtualPatient.draw(1, load_cohort_spec()[0]))  # slow grower
    df = run_closed_loop(plant, controller, days=2.5)
    # 24 h windows close from 24 h on, one every 6 h: the running batch was observed and
    # the MPC's residual function now differs (the NLP was not rebuilt)
    assert learner.observations >= 3
    after = float(mpc._mean_fn(*probe))
    assert after != pytest.approx(before, abs=1e-9)
    assert all(r.success for r in controller.results)
    assert df["hard_violation"].sum() == 0
    for r in controller.results:
        for name, (low, high) in plant.bounds.items():
            assert low <= r.u[name] <= high


def test_hybrid_mpc_needs_a_residual_file() -> None:
    with pytest.raises(ConfigError, match="residual"):
        ControllerSpec("hybrid-mpc")
    with pytest.raises(ConfigError, match="unknown"):
        ControllerSpec("fuzzy-mpc")

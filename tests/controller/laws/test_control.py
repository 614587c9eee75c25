"""The deployable control laws (controller/laws/control.py) in closed loop with the virtual
plant: the hybrid MPC learns the running batch's growth-rate deviation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from controller.laws.control import ControllerSpec, RunningBatchLearner, build_controller
from plant_models.errors import ConfigError
from plant_models.gp import GPResidual
from sim.closed_loop import run_closed_loop
from sim.patients import VirtualPatient, load_cohort_spec
from sim.plant import VirtualBioreactor

HOURLY = Path(__file__).resolve().parents[3] / "configs" / "mpc_tcell_hourly.toml"


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
    before = float(mpc.residual_at(*probe)[0][0])
    plant = VirtualBioreactor.for_process(
        "tcell", VirtualPatient.draw(1, load_cohort_spec()[0])
    )  # slow grower
    df = run_closed_loop(plant, controller, days=2.5)
    # 24 h windows close from 24 h on, one every 6 h: the running batch was observed and
    # the MPC's residual function now differs (the NLP was not rebuilt)
    assert learner.observations >= 3
    after = float(mpc.residual_at(*probe)[0][0])
    assert after != pytest.approx(before, abs=1e-9)
    assert all(r.success for r in controller.results)
    assert df["hard_violation"].sum() == 0
    for r in controller.results:
        for name, (low, high) in plant.bounds.items():
            assert low <= r.u[name] <= high


def test_patient_parameters_and_a_batch_effect_do_not_learn_the_same_batch(
    tmp_path: Path,
) -> None:
    """Both would fit the running batch's growth from the same cells (the rule of
    ``hmpc fit --adapt``): refused with the way out; without in-batch learning the residual's
    batch effect stays idle and the patient-parameter fit alone learns the batch."""
    residual = _batch_effect_residual(tmp_path / "residual.npz")
    args = {"residual": residual, "mpc_config": HOURLY, "harvest_time": 192.0}
    with pytest.raises(ConfigError, match=r"both learn the running batch.*--adapt auto"):
        build_controller(ControllerSpec("hybrid-mpc", patient_parameters=("mu_max",), **args))
    idle = build_controller(
        ControllerSpec("hybrid-mpc", patient_parameters=("mu_max",), learn_in_batch=False, **args)
    )
    assert idle.learner is None and idle.adapter is not None


def test_hybrid_mpc_needs_a_residual_file() -> None:
    with pytest.raises(ConfigError, match="residual"):
        ControllerSpec("hybrid-mpc")
    with pytest.raises(ConfigError, match="unknown"):
        ControllerSpec("fuzzy-mpc")


def test_mpc_fits_the_patient_parameters_of_the_running_batch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """With ``patient_parameters`` the MPC predicts with the running batch's fitted growth
    rate, exhaustion threshold and lag (plant_models.adaptation) instead of the nominal
    ones; a slow grower's fitted growth rate ends below the nominal one."""
    from controller.laws.control import PatientParameterLearner

    names = ("mu_max", "exhaustion_threshold", "lag_time")
    spec = ControllerSpec(
        "mechanistic-mpc", mpc_config=HOURLY, harvest_time=192.0, patient_parameters=names
    )
    controller = build_controller(spec)
    adapter = controller.adapter
    assert isinstance(adapter, PatientParameterLearner)
    assert set(names) <= set(controller.mpc.parameter_names)
    nominal = controller.mpc.model.parameters
    patient = VirtualPatient.draw(1, load_cohort_spec()[0])  # slow grower
    assert patient.growth_factor < 0.8
    plant = VirtualBioreactor.for_process("tcell", patient)
    df = run_closed_loop(plant, controller, days=3.0)
    # fits every 6 h from 24 h of record on
    assert adapter.fits >= 6 and adapter.failures == 0
    assert set(adapter.values) == set(names)
    assert adapter.values["mu_max"] < nominal.mu_max
    # the MPC got them: its parameter vector holds the fitted values
    sent = dict(zip(controller.mpc.parameter_names, controller.mpc._pvals, strict=True))
    for name in names:
        assert sent[name] == pytest.approx(adapter.values[name])
    assert all(r.success for r in controller.results) and df["hard_violation"].sum() == 0
    # a record that is not sampled evenly: the fit is skipped with a warning, values kept
    kept = dict(adapter.values)
    adapter.record.rows[-1]["time"] += 0.4
    adapter._next_h = -1.0
    with caplog.at_level("WARNING", logger="controller.laws.control"):
        last = controller.last_estimate
        assert last is not None
        assert adapter(adapter.record.rows[-1]["time"] + 1.0, [], last, {}) == kept
    assert adapter.failures == 1 and "fit skipped" in caplog.text


def test_patient_parameters_are_for_mpcs_and_named_ones() -> None:
    with pytest.raises(ConfigError, match="only an MPC"):
        ControllerSpec("recipe", patient_parameters=("mu_max",))
    with pytest.raises(ConfigError, match="unknown"):
        ControllerSpec("mechanistic-mpc", patient_parameters=("k_lys",))
    with pytest.raises(ConfigError, match="none for this model"):
        ControllerSpec("mechanistic-mpc", model="cho", patient_parameters=("mu_max",))

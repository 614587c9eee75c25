"""The virtual plant, its sensors, patients and baselines."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from plant_models.errors import ModelError
from sim.baselines import make_baseline
from sim.closed_loop import default_limiter, run_closed_loop, summarize
from sim.patients import PatientCohort, VirtualPatient, load_cohort_spec
from sim.plant import VirtualBioreactor


def batch(
    patient: VirtualPatient,
    controller: str = "recipe",
    kind: str = "tcell",
    days: float = 10.0,
    seed: int = 0,
) -> tuple[pd.DataFrame, VirtualBioreactor]:
    plant = (
        VirtualBioreactor.for_process("tcell", patient, seed=seed)
        if kind == "tcell"
        else VirtualBioreactor.for_process("cho", patient, seed=seed)
    )
    return run_closed_loop(plant, make_baseline(controller, kind), days=days), plant


def test_nominal_patient_expands_in_documented_range() -> None:
    """docs/models.md: a nominal patient expands 40-80 fold in 7-9 days under the recipe."""
    df, _ = batch(VirtualPatient.nominal(), days=9)
    fold = df["total_viable_cells"] / df["total_viable_cells"].iloc[0]
    day7, day9 = fold[df["time"] == 168].item(), fold.iloc[-1]
    assert 40 <= day7 <= 80 and 40 <= day9 <= 80
    assert df["viability"].iloc[-1] > 0.8


def test_same_seed_same_batch_and_other_seed_differs() -> None:
    p = VirtualPatient.draw(7, load_cohort_spec()[0])
    a, _ = batch(p, "rule", seed=3, days=4)
    b, _ = batch(VirtualPatient.draw(7, load_cohort_spec()[0]), "rule", seed=3, days=4)
    pd.testing.assert_frame_equal(a, b)
    c, _ = batch(p, "recipe", seed=3, days=4)
    d, _ = batch(p, "recipe", seed=4, days=4)
    assert not np.allclose(c["measured_glucose"], d["measured_glucose"])  # other sensor noise
    np.testing.assert_allclose(c["lactate"], d["lactate"])  # same truth under a fixed recipe


def test_cohort_is_reproducible_and_independent_of_size() -> None:
    small, large = PatientCohort(5, seed=11), PatientCohort(50, seed=11)
    assert small.patients == large.patients[:5]
    assert PatientCohort(5, seed=12).patients != small.patients


def test_cohort_spread_matches_domain_priors() -> None:
    spec = load_cohort_spec()[0]
    cohort = PatientCohort(400, seed=1)
    growth = np.array([p.growth_factor for p in cohort if not p.non_expander])
    assert 0.18 < growth.std() / growth.mean() < 0.32  # CV 20-30 %
    lags = np.array([p.lag_time for p in cohort])
    assert lags.min() >= spec.lag_min and lags.max() <= spec.lag_max
    exhaustion = np.array([p.exhaustion_factor for p in cohort])
    assert 0.3 < exhaustion.std() / exhaustion.mean() < 0.5
    via = np.array([p.initial_viability for p in cohort])
    assert via.min() >= 0.70 and via.max() <= 0.98
    non = np.mean([p.non_expander for p in cohort])
    assert 0.03 < non < 0.12


@pytest.mark.slow
def test_twenty_patient_cohort_outcome_spread() -> None:
    """Yields differ several-fold between donors (Sci Rep 2022;12:7045: 0.9-9.7x)."""
    folds = []
    for patient in PatientCohort(20, seed=1):
        df, plant = batch(patient)
        folds.append(summarize(df, plant)["fold_expansion"])
    folds_a = np.array(folds)
    assert folds_a.max() / folds_a.min() > 2.0
    assert 0.15 < folds_a.std() / folds_a.mean() < 0.8
    assert np.median(folds_a) > 30


def test_assays_arrive_late_with_their_sample_time() -> None:
    plant = VirtualBioreactor.for_process("tcell", VirtualPatient.nominal())
    arrived = []
    plant.initial_measurements()
    for _ in range(60):
        for m in plant.step({"perfusion_rate": 1.0}, 1.0):
            if m.source == "assay":
                arrived.append(m)
    names = {m.name for m in arrived}
    assert names == {"viable_cells", "viability", "glucose", "lactate", "il2"}
    sample_times = sorted({m.sample_time for m in arrived})
    assert sample_times == [0.0, 24.0, 48.0]
    assert all(m.arrival_time - m.sample_time == pytest.approx(4.0) for m in arrived)


def test_assay_is_taken_at_sample_time_inside_a_long_step() -> None:
    plant = VirtualBioreactor.for_process("tcell", VirtualPatient.nominal(), sensors=None)
    plant.initial_measurements()
    plant.step({"perfusion_rate": 1.0}, 20.0)
    out = plant.step({"perfusion_rate": 1.0}, 10.0)  # t 20 -> 30: sample at 24, arrives 28
    assays = [m for m in out if m.source == "assay"]
    assert {m.sample_time for m in assays} == {24.0}
    assert plant.time_h == 30.0


def test_plant_clamps_inputs_and_rejects_unknown_ones() -> None:
    plant = VirtualBioreactor.for_process("tcell", VirtualPatient.nominal())
    plant.step({"perfusion_rate": 99.0, "glucose_feed": float("nan")}, 1.0)
    assert plant.clamped_inputs == 1
    with pytest.raises(ModelError, match="unknown input"):
        plant.step({"perfusion": 1.0}, 1.0)
    with pytest.raises(ModelError, match="positive"):
        plant.step({}, 0.0)


def test_states_never_negative_in_a_starving_batch() -> None:
    plant = VirtualBioreactor.for_process("tcell", VirtualPatient.draw(5, load_cohort_spec()[0]))
    for _ in range(24 * 14):
        plant.step({}, 1.0)  # no perfusion at all for two weeks
        assert np.all(plant.state >= 0.0)
    assert plant.true_values()["glucose"] < 1.0


@pytest.mark.parametrize("controller", ["recipe", "rule"])
@pytest.mark.parametrize("kind", ["tcell", "cho"])
def test_baselines_respect_bounds_and_rate_limits(controller: str, kind: str) -> None:
    df, plant = batch(VirtualPatient.draw(2, load_cohort_spec()[0]), controller, kind, days=7)
    limiter = default_limiter(plant)
    for name, (low, high) in plant.bounds.items():
        assert df[name].between(low, high).all()
        if name in limiter.rate_limits:
            assert df[name].diff().abs().max() <= limiter.rate_limits[name] + 1e-12
    assert plant.clamped_inputs == 0
    s = summarize(df, plant)
    assert s["hard_constraint_violations"] == 0
    assert s["fold_expansion"] > 3


def test_rule_uses_less_media_than_recipe_on_nominal_patient() -> None:
    recipe, p1 = batch(VirtualPatient.nominal(), "recipe", days=8)
    rule, p2 = batch(VirtualPatient.nominal(), "rule", days=8)
    s1, s2 = summarize(recipe, p1), summarize(rule, p2)
    assert s2["media_used"] < s1["media_used"]
    assert s2["dose_reached_by_harvest"]


def test_truth_differs_from_the_controller_model() -> None:
    from plant_models.tcell import TCellExpansionModel, load_tcell_parameters

    plant = VirtualBioreactor.for_process("tcell", VirtualPatient.nominal())
    model = TCellExpansionModel(load_tcell_parameters()[0], plant.process)
    x = plant.state.copy()
    x[3] = 25.0  # high lactate, low glucose: where the structures differ
    x[2] = 0.5
    u = np.array([1.0, 0.0, 0.0])
    truth, nominal = plant.model.rates_numpy(60.0, x, u), model.rates_numpy(60.0, x, u)
    assert truth["growth_rate"] < 0.8 * nominal["growth_rate"]
    assert truth["lactate_production"] < nominal["lactate_production"]


def test_probe_calibration_error_is_constant_per_batch_and_leaves_noise_streams() -> None:
    """A per-batch calibration factor scales every online reading of its probe alone; the
    noise stream (and so every other reading and assay) is the calibrated plant's."""
    import dataclasses

    from sim.sensors import default_sensor_spec

    patient = PatientCohort(1, seed=4).patients[0]
    spec = dataclasses.replace(
        default_sensor_spec("tcell"), online_calibration_sd={"viable_cells": 0.1}
    )
    exact = VirtualBioreactor.for_process("tcell", patient, seed=9)
    off = VirtualBioreactor.for_process("tcell", patient, seed=9, sensors=spec)
    gain = off.probe_gains["viable_cells"]
    assert gain != 1.0 and 0.6 < gain < 1.6 and exact.probe_gains == {}
    inputs = {n: exact.bounds[n][0] for n in exact.model.input_names}
    ratios = []
    for _ in range(30):
        a, b = exact.step(inputs, 1.0), off.step(inputs, 1.0)
        for ma, mb in zip(a, b, strict=True):
            assert (ma.name, ma.source, ma.sample_time) == (mb.name, mb.source, mb.sample_time)
            if ma.name == "viable_cells" and ma.source == "online":
                ratios.append(mb.value / ma.value)
            else:
                assert mb.value == ma.value
    # same noise draw: sd scales with the value, so each reading is the exact one x gain
    # up to the absolute part of the noise
    assert np.allclose(ratios, gain, rtol=0.02)
    # the draw is seeded by the plant's seed
    again = VirtualBioreactor.for_process("tcell", patient, seed=9, sensors=spec)
    assert again.probe_gains == off.probe_gains
    with pytest.raises(ValueError, match="not an online probe"):
        dataclasses.replace(spec, online_calibration_sd={"viability": 0.1})
    with pytest.raises(ValueError, match=">= 0"):
        dataclasses.replace(spec, online_calibration_sd={"viable_cells": float("nan")})

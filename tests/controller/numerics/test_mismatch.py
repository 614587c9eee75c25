"""The estimator's model-mismatch diagnostic: innovation statistics against their
chi-square band, and the probe-gain drift alarm; quiet on a matched plant."""

from __future__ import annotations

import dataclasses
import logging
import math

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from controller.numerics.estimator import Estimator, EstimatorConfig, EstimatorResult
from controller.numerics.measurements import Measurement
from controller.numerics.mismatch import MismatchMonitor, chi2_band
from plant_models.process import get_process
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process

INPUTS = {"perfusion_rate": 1.0, "glucose_feed": 0.0, "il2_addition": 0.0}


@pytest.fixture(scope="module")
def model() -> TCellExpansionModel:
    return TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])


def run_batch(
    model: TCellExpansionModel,
    plant: TCellExpansionModel,
    *,
    probe_gain: float = 1.0,
    hours: int = 120,
    seed: int = 1,
) -> list[EstimatorResult]:
    """The plant integrated hour by hour, read by the plug-in's sensors (noise as the
    estimator assumes it; assays daily, 4 h late), estimated with the model's defaults."""
    sensors = get_process("tcell").sensors
    rng = np.random.default_rng(seed)
    x = plant.state_vector(plant.initial_state())
    u = plant.input_vector(INPUTS)
    est = Estimator(model)
    x0 = model.initial_state()
    est.initialize(x0, np.array([(0.05 * abs(v) + 1e-3) ** 2 for v in x0.values()]))
    results, pending = [], []
    for k in range(1, hours + 1):
        t = float(k)
        sol = solve_ivp(lambda tt, xx: plant.rhs(tt, xx, u), (t - 1, t), x, rtol=1e-8, atol=1e-10)
        x = np.maximum(sol.y[:, -1], 0.0)
        truth = dict(zip(plant.state_names, (float(v) for v in x), strict=True))
        truth["viability"] = truth["viable_cells"] / (truth["viable_cells"] + truth["dead_cells"])

        def noisy(value: float, noise: object) -> float:
            sd = noise.absolute + noise.relative * abs(value)  # type: ignore[attr-defined]
            return max(value + rng.normal(0.0, sd), 0.0)

        ms = [
            Measurement(
                n,
                noisy(truth[n] * (probe_gain if n == "viable_cells" else 1.0), s),
                s.unit,
                t,
                t,
                "online",
            )
            for n, s in sensors.online.items()
        ]
        if k % 24 == 0:
            pending += [
                Measurement(
                    n,
                    min(noisy(truth[n], s), 1.0) if n == "viability" else noisy(truth[n], s),
                    s.unit,
                    t,
                    t + 4,
                    "assay",
                )
                for n, s in sensors.assays.items()
            ]
        ms += [m for m in pending if m.arrival_time <= t]
        pending = [m for m in pending if m.arrival_time > t]
        results.append(est.update(t, INPUTS, ms))
    return results


def _alarms(results: list[EstimatorResult]) -> set[str]:
    return {a for r in results for a in r.mismatch.alarms}


def test_a_matched_plant_raises_no_mismatch_alarm(
    model: TCellExpansionModel, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.WARNING, logger="controller.numerics.mismatch"):
        results = run_batch(model, model)
    assert _alarms(results) == set()
    assert "model mismatch" not in caplog.text
    last = results[-1].mismatch
    low, high = last.band["online.lactate"]
    assert last.samples["online.lactate"] == 24
    assert low < last.nis["online.lactate"] < high
    values = last.values()
    assert values["nis.online.glucose"] == pytest.approx(last.nis["online.glucose"])
    assert "gain.viable_cells" in values and not any(k.startswith("alarm.") for k in values)


@pytest.mark.parametrize(
    ("field", "factor", "expected"),
    [
        # twice the lactate per glucose: the growth factor and the probe gain absorb it (as
        # on the CHO FMU) until the gain leaves its band and the cell assays disagree
        ("yield_lactate_glucose", 2.0, {"gain.viable_cells", "nis.assay.viable_cells"}),
        # five times the basal death: the viability assays stay far from the model
        ("death_rate_basal", 5.0, {"nis.assay.viability"}),
    ],
)
def test_a_mismatched_plant_raises_the_alarm_once_per_episode(
    model: TCellExpansionModel,
    caplog: pytest.LogCaptureFixture,
    field: str,
    factor: float,
    expected: set[str],
) -> None:
    plant = TCellExpansionModel(
        dataclasses.replace(model.parameters, **{field: getattr(model.parameters, field) * factor}),
        model.process,
    )
    with caplog.at_level(logging.WARNING, logger="controller.numerics.mismatch"):
        results = run_batch(model, plant)
    assert expected <= _alarms(results)
    for key in expected:
        first = next(r for r in results if key in r.mismatch.alarms)
        assert key in first.mismatch.started
        report = first.mismatch
        if key.startswith("nis."):
            stat = key.removeprefix("nis.")
            assert report.nis[stat] > report.band[stat][1]
            assert report.values()[f"alarm.{key}"] == 1.0
        episodes = sum(key in r.mismatch.started for r in results)
        steps = sum(key in r.mismatch.alarms for r in results)
        kind, _, name = key.partition(".")
        subject = name.replace(".", " ") + ":" if kind == "nis" else f"the {name} probe's"
        logged = [r for r in caplog.records if subject in r.getMessage()]
        assert len(logged) == episodes >= 1
        # once per episode, not once per step in alarm
        assert episodes < steps


def test_a_drifting_probe_gain_raises_the_drift_alarm(model: TCellExpansionModel) -> None:
    """The probe reads 1.4 times the true cells; the assays pull the estimated gain up
    until it leaves the 20 % band around 1."""
    config = EstimatorConfig.for_model(model)
    assert "viable_cells" in config.online_gains
    results = run_batch(model, model, probe_gain=1.4, hours=144)
    assert "gain.viable_cells" in _alarms(results)
    first = next(r for r in results if "gain.viable_cells" in r.mismatch.alarms)
    assert abs(first.mismatch.gains["viable_cells"] - 1.0) > 0.2
    assert "gain.viable_cells" in first.mismatch.started


def test_the_band_and_the_cap_of_single_spikes() -> None:
    low, high = chi2_band(24, 0.001)
    assert 0.2 < low < 1.0 < high < 2.5
    monitor = MismatchMonitor({"online": 24}, 0.001, {"online": 16.0}, 0.2)
    for k in range(24):
        monitor.record("online", "glucose", float(k), 1e6 if k == 10 else 1.0)
    report = monitor.report(24.0, {})
    assert report.nis["online.glucose"] == pytest.approx((23 + 16) / 24)
    assert report.alarms == ()
    for k in range(24, 48):
        monitor.record("online", "glucose", float(k), 9.0)  # a 3-sigma bias
    assert monitor.report(48.0, {}).alarms == ("nis.online.glucose",)
    assert monitor.report(49.0, {}).started == ()
    assert math.isfinite(monitor.report(49.0, {"viable_cells": 1.5}).nis["online.glucose"])
    assert "gain.viable_cells" in monitor.report(50.0, {"viable_cells": 1.5}).alarms

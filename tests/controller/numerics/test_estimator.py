"""Tests of the EKF with delayed assays, measurement validation and parameter adaptation.

The data come from the controller's own T-cell model integrated with scipy (a matched
"truth" with a known growth factor), so these tests need nothing from ``sim``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from controller.numerics.estimator import (
    Estimator,
    EstimatorConfig,
    EstimatorResult,
    load_estimator_config,
)
from controller.numerics.measurements import Measurement
from plant_models.cho import CHOFedBatchModel, load_cho_parameters, load_cho_process
from plant_models.errors import ConfigError, ModelError
from plant_models.gp import GPResidual
from plant_models.hybrid import HybridModel, RateCorrection
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process

ONLINE_NOISE = {"viable_cells": (0.02, 0.05), "glucose": (0.2, 0.02), "lactate": (0.3, 0.02)}
ASSAY_NOISE = {
    "viable_cells": (0.01, 0.03),
    "viability": (0.01, 0.0),
    "glucose": (0.1, 0.01),
    "lactate": (0.1, 0.01),
    "il2": (1.0, 0.1),
}
INPUTS = {"perfusion_rate": 1.0, "glucose_feed": 0.0, "il2_addition": 0.0}
#: canonical units of the T-cell model's measurable variables
UNIT = {s.name: s.unit for s in TCellExpansionModel.states} | {"viability": "1"}


@pytest.fixture(scope="module")
def model() -> TCellExpansionModel:
    return TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])


@dataclasses.dataclass
class Batch:
    """A simulated batch: truth per hour, online readings per hour, assays by sample."""

    times: list[float]
    truth: list[dict[str, float]]
    online: list[list[Measurement]]
    assays: list[Measurement]


def simulate(
    model: TCellExpansionModel,
    *,
    growth_factor: float = 1.0,
    hours: int = 72,
    seed: int = 0,
    assay_every: float = 24.0,
    assay_delay: float = 4.0,
    viability: float = 0.8,
) -> Batch:
    """Integrate the model with mu_max x growth_factor; noisy online and assay readings."""
    truth_model = TCellExpansionModel(
        dataclasses.replace(model.parameters, mu_max=model.parameters.mu_max * growth_factor),
        model.process,
    )
    rng = np.random.default_rng(seed)
    x = truth_model.state_vector(truth_model.initial_state(viability=viability))
    u = truth_model.input_vector(INPUTS)
    times, truth, online, assays = [], [], [], []
    for k in range(hours + 1):
        t = float(k)
        if k > 0:
            sol = solve_ivp(
                lambda tt, y: truth_model.rhs(tt, y, u), (t - 1, t), x, rtol=1e-8, atol=1e-10
            )
            x = np.maximum(sol.y[:, -1], 0.0)
        values = dict(zip(truth_model.state_names, (float(v) for v in x), strict=True))
        values["viability"] = values["viable_cells"] / (
            values["viable_cells"] + values["dead_cells"]
        )
        times.append(t)
        truth.append(values)
        online.append(
            [
                Measurement(n, _noisy(values[n], a, r, rng, math.inf), UNIT[n], t, t, "online")
                for n, (a, r) in ONLINE_NOISE.items()
            ]
        )
        if k % round(assay_every) == 0:
            assays += [
                Measurement(
                    n,
                    _noisy(values[n], a, r, rng, 1.0 if n == "viability" else math.inf),
                    UNIT[n],
                    t,
                    t + assay_delay,
                    "assay",
                )
                for n, (a, r) in ASSAY_NOISE.items()
            ]
    return Batch(times, truth, online, assays)


def _noisy(
    value: float, absolute: float, relative: float, rng: np.random.Generator, upper: float
) -> float:
    v = value + rng.normal(0.0, absolute + relative * abs(value))
    return min(max(v, 0.0), upper)


def start(model: TCellExpansionModel, config: EstimatorConfig | None = None) -> Estimator:
    """Estimator with the process-specification prior (viability 0.9 assumed, 0.8 true)."""
    est = Estimator(model, config)
    x0 = model.initial_state()
    sd = {
        "viable_cells": 0.05,
        "dead_cells": 0.1,
        "glucose": 1.0,
        "lactate": 0.3,
        "il2": 10.0,
        "inhibitor": 1.0,
        "volume": 0.01,
    }
    est.initialize(x0, np.array([sd[n] ** 2 for n in model.state_names]))
    return est


def run(
    est: Estimator,
    batch: Batch,
    *,
    assays: str = "late",
    extra: dict[int, list[Measurement]] | None = None,
) -> list[EstimatorResult]:
    """Feed the batch; ``assays``: late (at arrival), on_time (at sample) or none."""
    results = []
    for k, t in enumerate(batch.times):
        ms = list(batch.online[k])
        if assays == "late":
            ms += [m for m in batch.assays if abs(m.arrival_time - t) < 1e-9]
        elif assays == "on_time":
            ms += [m for m in batch.assays if abs(m.sample_time - t) < 1e-9]
        if extra and k in extra:
            ms += extra[k]
        results.append(est.update(t, INPUTS, ms))
    return results


def rmse(results: Sequence[EstimatorResult], batch: Batch, name: str) -> float:
    err = [r.outputs[name] - tr[name] for r, tr in zip(results, batch.truth, strict=True)]
    return float(math.sqrt(np.mean(np.square(err))))


# -- delayed assays ----------------------------------------------------------------------
def test_late_assays_improve_the_estimate(model: TCellExpansionModel) -> None:
    batch = simulate(model, growth_factor=1.2, hours=96, seed=1)
    online_only = run(start(model), batch, assays="none")
    with_assays = run(start(model), batch, assays="late")
    # viability (dead cells) is seen only by the assays: the gain is large
    assert rmse(with_assays, batch, "viability") < 0.5 * rmse(online_only, batch, "viability")
    # viable cells: not worse (the online probe already sees them every hour)
    assert rmse(with_assays, batch, "viable_cells") <= 1.02 * rmse(
        online_only, batch, "viable_cells"
    )


def test_assay_after_newer_online_samples_is_applied_at_its_sample_time(
    model: TCellExpansionModel,
) -> None:
    """An assay sampled at 24 h that arrives at 28 h (after four newer online samples)
    gives the same present estimate as the same assay processed in time order."""
    batch = simulate(model, hours=34, seed=2)
    late = start(model)
    in_order = start(model)
    late_results = run(late, batch, assays="late")
    in_order_results = run(in_order, batch, assays="on_time")
    at_arrival = late_results[28]
    assert at_arrival.reprocessed_from_h == pytest.approx(24.0)
    assert {d.measurement.name for d in at_arrival.accepted if d.measurement.source == "assay"} == {
        "viable_cells",
        "viability",
        "glucose",
        "lactate",
        "il2",
    }
    for k in (28, 34):
        a, b = late_results[k], in_order_results[k]
        for name in model.state_names:
            assert a.state[name] == pytest.approx(b.state[name], rel=1e-9, abs=1e-12)
            assert a.std[name] == pytest.approx(b.std[name], rel=1e-9, abs=1e-12)
        assert a.growth_factor == pytest.approx(b.growth_factor, rel=1e-9)
    # before the assay arrived the two differ (the late one has not seen it yet)
    assert late_results[26].state["dead_cells"] != pytest.approx(
        in_order_results[26].state["dead_cells"], rel=1e-6
    )


def test_assay_between_update_times_is_inserted(model: TCellExpansionModel) -> None:
    batch = simulate(model, hours=30, seed=3)
    truth_mid = batch.truth[20]["viable_cells"]
    assay = Measurement("viable_cells", truth_mid * 1.1, UNIT["viable_cells"], 20.5, 26.0, "assay")
    late, in_order = start(model), start(model)
    for k, t in enumerate(batch.times):
        late.update(t, INPUTS, batch.online[k] + ([assay] if k == 26 else []))
        if k == 21:
            in_order.update(20.5, INPUTS, [assay])
        r_in = in_order.update(t, INPUTS, batch.online[k])
    r_late = late.update(30.0, INPUTS, [])
    assert 20.5 in late.history_times
    for name in model.state_names:
        assert r_late.state[name] == pytest.approx(r_in.state[name], rel=1e-9, abs=1e-12)


def test_out_of_order_assays_give_the_in_order_result(model: TCellExpansionModel) -> None:
    batch = simulate(model, hours=60, seed=4)
    day1 = [m for m in batch.assays if m.sample_time == 24.0]
    day2 = [m for m in batch.assays if m.sample_time == 48.0]
    day0 = [m for m in batch.assays if m.sample_time == 0.0]
    swapped, ordered = start(model), start(model)
    r1 = run(swapped, batch, assays="none", extra={4: day0, 52: day2, 55: day1[::-1]})
    r2 = run(ordered, batch, assays="none", extra={4: day0, 28: day1, 52: day2})
    assert r1[55].reprocessed_from_h == pytest.approx(24.0)
    for name in model.state_names:
        assert r1[-1].state[name] == pytest.approx(r2[-1].state[name], rel=1e-9, abs=1e-12)


def test_duplicate_assay_is_ignored_and_logged(
    model: TCellExpansionModel, caplog: pytest.LogCaptureFixture
) -> None:
    batch = simulate(model, hours=40, seed=5)
    day1 = [m for m in batch.assays if m.sample_time == 24.0]
    again = [dataclasses.replace(m, arrival_time=33.0, value=m.value * 0.9) for m in day1]
    once, twice = start(model), start(model)
    r1 = run(once, batch, assays="late")
    with caplog.at_level(logging.INFO, logger="controller.numerics.validation"):
        r2 = run(twice, batch, assays="late", extra={33: again})
    assert [d.reason for d in r2[33].rejected] == ["duplicate"] * len(day1)
    assert sum("duplicate" in rec.getMessage() for rec in caplog.records) == len(day1)
    for name in model.state_names:
        assert r2[-1].state[name] == pytest.approx(r1[-1].state[name], rel=1e-12, abs=1e-12)


def test_assay_older_than_history_is_rejected(model: TCellExpansionModel) -> None:
    config = dataclasses.replace(EstimatorConfig.for_model(model), history_h=12.0)
    est = start(model, config)
    batch = simulate(model, hours=30, seed=6)
    run(est, batch, assays="none")
    assert est.history_times[0] >= 30.0 - 12.0 - 1e-9
    assert len(est.history_times) <= 14
    old = Measurement("viable_cells", 1.0, UNIT["viable_cells"], 10.0, 30.0, "assay")
    result = est.update(30.0, INPUTS, [old])
    assert [d.reason for d in result.rejected] == ["older_than_history"]


def test_late_assay_improves_the_present_estimate(model: TCellExpansionModel) -> None:
    """The day-1 assays (sampled at 24 h, delivered at 28 h after four newer online samples)
    move the present estimate towards the truth at once, and it stays closer after."""
    batch = simulate(model, growth_factor=1.3, hours=34, seed=14)
    day = {t: [m for m in batch.assays if m.sample_time == t] for t in (0.0, 24.0)}

    def error(results: list[EstimatorResult], k: int, name: str) -> float:
        return abs(results[k].outputs[name] - batch.truth[k][name])

    # viability: the online probes do not see dead cells (prior viability 0.9, truth 0.8)
    with_assay = run(start(model), batch, assays="none", extra={28: day[24.0]})
    without = run(start(model), batch, assays="none")
    assert with_assay[28].reprocessed_from_h == pytest.approx(24.0)
    for k in (28, 31, 34):
        assert error(with_assay, k, "viability") < 0.5 * error(without, k, "viability")
    # viable cells, when the cell probe is out (glucose and lactate online only)
    no_probe = dataclasses.replace(
        batch, online=[[m for m in ms if m.name != "viable_cells"] for ms in batch.online]
    )
    with_assay = run(start(model), no_probe, assays="none", extra={4: day[0.0], 28: day[24.0]})
    without = run(start(model), no_probe, assays="none", extra={4: day[0.0]})
    for k in (28, 31, 34):
        assert error(with_assay, k, "viable_cells") < 0.5 * error(without, k, "viable_cells")


# -- validation -----------------------------------------------------------------------------
def _clean_and_faulty(
    model: TCellExpansionModel, k: int, faulty: list[Measurement], *, drop_clean: str = ""
) -> tuple[list[EstimatorResult], list[EstimatorResult], Batch]:
    batch = simulate(model, hours=40, seed=7)
    clean = run(start(model), batch, assays="late")
    est = start(model)
    results = []
    for i, t in enumerate(batch.times):
        ms = [m for m in batch.online[i] if not (i == k and m.name == drop_clean)]
        ms += [m for m in batch.assays if abs(m.arrival_time - t) < 1e-9]
        if i == k:
            ms += faulty
        results.append(est.update(t, INPUTS, ms))
    return clean, results, batch


@pytest.mark.parametrize(
    ("value", "sample_time", "quality", "name", "reason"),
    [
        (math.nan, 30.0, "good", "viable_cells", "non_finite"),
        (math.inf, 30.0, "good", "glucose", "non_finite"),
        (-math.inf, 30.0, "good", "lactate", "non_finite"),
        (-0.5, 30.0, "good", "glucose", "out_of_range"),
        (1e5, 30.0, "good", "viable_cells", "out_of_range"),
        (5.0, 30.0, "bad", "viable_cells", "bad_quality"),
        (5.0, 30.0, "good", "oxygen", "unknown_variable"),
        (0.9, 24.0, "good", "viable_cells", "stale"),
        (0.9, 31.0, "good", "viable_cells", "future_timestamp"),
        (8.0, 30.0, "good", "viable_cells", "innovation_gate"),
    ],
)
def test_each_invalid_online_value_is_rejected_and_the_estimate_goes_on(
    model: TCellExpansionModel,
    value: float,
    sample_time: float,
    quality: str,
    name: str,
    reason: str,
) -> None:
    bad = Measurement(name, value, UNIT.get(name, "1"), sample_time, 30.0, "online", quality)
    clean, faulty, batch = _clean_and_faulty(model, 30, [bad], drop_clean=name)
    decisions = [d for d in faulty[30].rejected if d.measurement is bad]
    assert [d.reason for d in decisions] == [reason]
    assert decisions[0].detail
    # the estimate is not derailed: within a few per cent of the clean run at the end
    truth = batch.truth[-1]["viable_cells"]
    assert abs(faulty[-1].state["viable_cells"] - truth) < 0.05 * truth
    assert faulty[-1].state["viable_cells"] == pytest.approx(
        clean[-1].state["viable_cells"], rel=0.03
    )


def test_uncertain_quality_weighs_less(model: TCellExpansionModel) -> None:
    shifts = {}
    for quality in ("good", "uncertain"):
        est = start(model)
        m = Measurement("glucose", 19.0, "mM", 0.0, 0.0, "online", quality)
        r = est.update(0.0, INPUTS, [m])
        assert [d.reason for d in r.accepted] == ["accepted"]
        shifts[quality] = model.initial_state()["glucose"] - r.state["glucose"]
    assert 0.0 < shifts["uncertain"] < 0.8 * shifts["good"]


def test_stuck_online_value_is_rejected_after_n_samples(model: TCellExpansionModel) -> None:
    batch = simulate(model, hours=40, seed=8)
    est = start(model)
    frozen = batch.online[20][0].value
    reasons = []
    for k, t in enumerate(batch.times):
        ms = list(batch.online[k])
        if k >= 20:
            ms[0] = dataclasses.replace(ms[0], value=frozen)
        r = est.update(t, INPUTS, ms)
        if k >= 20:
            reasons.append(
                next(d.reason for d in r.accepted + r.rejected if d.measurement is ms[0])
            )
    n = est.config.stuck_samples
    assert reasons[: n - 1] == ["accepted"] * (n - 1)
    assert set(reasons[n - 1 :]) == {"stuck"}
    truth = batch.truth[-1]["viable_cells"]
    assert abs(r.state["viable_cells"] - truth) < 0.1 * truth


def test_spike_gate_re_admits_a_persistent_change(model: TCellExpansionModel) -> None:
    """Three readings in a row far from the prediction mean the model is wrong: the
    filter re-admits them instead of rejecting the sensor forever."""
    batch = simulate(model, hours=30, seed=9)
    est = start(model)
    reasons = []
    for k, t in enumerate(batch.times):
        ms = list(batch.online[k])
        if k >= 20:  # the culture really has twice the cells from 20 h (e.g. a re-seed)
            ms[0] = dataclasses.replace(ms[0], value=2.0 * batch.truth[k]["viable_cells"])
        r = est.update(t, INPUTS, ms)
        if k >= 20:
            reasons.append(
                next(d.reason for d in r.accepted + r.rejected if d.measurement is ms[0])
            )
    assert reasons[:2] == ["innovation_gate"] * 2
    assert reasons[2] == "accepted"
    assert r.state["viable_cells"] == pytest.approx(2.0 * batch.truth[-1]["viable_cells"], rel=0.15)


# -- calibration check of the online probe ----------------------------------------------------
GAIN_CHECK = {"gain_check_threshold": 2.5, "gain_check_slack": 1.0}


def _configs(model: TCellExpansionModel) -> tuple[EstimatorConfig, EstimatorConfig]:
    """(with the calibration check, without the probe-gain state)."""
    default = EstimatorConfig.for_model(model)
    checked = dataclasses.replace(
        default,
        gain_check_threshold=GAIN_CHECK["gain_check_threshold"],
        gain_check_slack=GAIN_CHECK["gain_check_slack"],
    )
    return checked, dataclasses.replace(default, online_gains=())


def _miscalibrated(batch: Batch, gain: float) -> Batch:
    """The online cell probe reads ``gain`` times the truth."""
    return dataclasses.replace(
        batch,
        online=[
            [
                dataclasses.replace(m, value=m.value * gain) if m.name == "viable_cells" else m
                for m in ms
            ]
            for ms in batch.online
        ],
    )


def test_calibration_check_leaves_a_calibrated_probe_alone(model: TCellExpansionModel) -> None:
    checked, no_gain = _configs(model)
    batch = simulate(model, growth_factor=1.2, hours=120, seed=15)
    results = run(start(model, checked), batch)
    reference = run(start(model, no_gain), batch)
    assert not any(r.gains_estimated["viable_cells"] for r in results)
    assert {r.online_gains["viable_cells"] for r in results} == {1.0}
    # the gain state without variance changes nothing: the estimate of the gain-free filter
    for r, ref in zip(results, reference, strict=True):
        for name in model.state_names:
            assert r.state[name] == pytest.approx(ref.state[name], rel=1e-9, abs=1e-12)


def test_calibration_check_catches_a_miscalibrated_probe(model: TCellExpansionModel) -> None:
    checked, no_gain = _configs(model)
    batch = _miscalibrated(simulate(model, hours=120, seed=16), 1.2)
    results = run(start(model, checked), batch)
    fired = next(k for k, r in enumerate(results) if r.gains_estimated["viable_cells"])
    assert 24 < fired <= 52  # one assay never fires it; the second or third does
    assert results[fired - 1].online_gains["viable_cells"] == 1.0
    assert results[-1].online_gains["viable_cells"] == pytest.approx(1.2, abs=0.05)
    truth = batch.truth[-1]["viable_cells"]
    assert abs(results[-1].state["viable_cells"] - truth) < 0.05 * truth
    uncorrected = run(start(model, no_gain), batch)[-1].state["viable_cells"]
    assert abs(uncorrected - truth) > 0.1 * truth


def test_calibration_check_with_out_of_order_assays_gives_the_in_order_result(
    model: TCellExpansionModel,
) -> None:
    checked, _ = _configs(model)
    batch = _miscalibrated(simulate(model, hours=80, seed=17), 1.2)
    day = {t: [m for m in batch.assays if m.sample_time == t] for t in (0.0, 24.0, 48.0, 72.0)}
    swapped = run(
        start(model, checked),
        batch,
        assays="none",
        extra={4: day[0.0], 52: day[48.0], 55: day[24.0][::-1], 76: day[72.0]},
    )
    ordered = run(
        start(model, checked),
        batch,
        assays="none",
        extra={4: day[0.0], 28: day[24.0], 52: day[48.0], 76: day[72.0]},
    )
    assert swapped[-1].gains_estimated == ordered[-1].gains_estimated == {"viable_cells": True}
    for name in model.state_names:
        assert swapped[-1].state[name] == pytest.approx(
            ordered[-1].state[name], rel=1e-9, abs=1e-12
        )
    assert swapped[-1].online_gains["viable_cells"] == pytest.approx(
        ordered[-1].online_gains["viable_cells"], rel=1e-9
    )


# -- snapshot and restore -------------------------------------------------------------------
def test_snapshot_and_restore_continue_exactly(model: TCellExpansionModel) -> None:
    """A restored estimator (snapshot through JSON) continues exactly as the original:
    a late assay sampled before the snapshot, a duplicate of an assay seen before it, a
    stuck probe and the calibration check all behave the same."""
    checked, no_gain = _configs(model)
    batch = _miscalibrated(simulate(model, hours=60, seed=18), 1.25)
    held = [m for m in batch.assays if m.sample_time == 24.0]  # delivered after the snapshot
    again = [m for m in batch.assays if m.sample_time == 0.0]  # delivered twice

    def delivery(k: int) -> list[Measurement]:
        ms = list(batch.online[k])
        if k >= 26:  # the glucose reading freezes from 26 h
            ms[1] = dataclasses.replace(ms[1], value=batch.online[26][1].value)
        ms += [m for m in batch.assays if abs(m.arrival_time - k) < 1e-9 and m not in held]
        return ms + (held if k == 33 else []) + (again if k == 40 else [])

    original = start(model, checked)
    for k in range(31):
        original.update(batch.times[k], INPUTS, delivery(k))
    text = json.dumps(original.snapshot(), allow_nan=False)
    restored = Estimator(model, checked)
    first = restored.restore(json.loads(text))
    assert first.time_h == 30.0 and restored.history_times == original.history_times
    for k in range(31, len(batch.times)):
        a = original.update(batch.times[k], INPUTS, delivery(k))
        b = restored.update(batch.times[k], INPUTS, delivery(k))
        assert a.state == b.state and a.std == b.std
        assert np.array_equal(a.covariance, b.covariance)
        assert a.gains_estimated == b.gains_estimated
        assert [(d.reason, d.detail) for d in a.accepted + a.rejected] == [
            (d.reason, d.detail) for d in b.accepted + b.rejected
        ]
    reasons = {d.reason for d in restored.events}
    assert {"duplicate", "stuck"} <= reasons
    assert b.reprocessed_from_h is None and b.gains_estimated == {"viable_cells": True}
    # snapshots of another configuration or anything else are refused
    with pytest.raises(ModelError, match="gain_names"):
        Estimator(model, no_gain).restore(json.loads(text))
    with pytest.raises(ModelError, match="snapshot"):
        Estimator(model, checked).restore({"format": "something else"})
    broken = json.loads(text)
    broken["steps"][0]["post_cov"] = [[1.0]]
    with pytest.raises(ModelError, match="malformed"):
        Estimator(model, checked).restore(broken)


# -- physical invariants and adaptation -------------------------------------------------------
def test_estimates_never_go_negative(model: TCellExpansionModel) -> None:
    est = start(model)
    # a viability of 1.0 pulls dead cells below zero in a linear update; a zero glucose
    # reading with a large prior spread pulls glucose down
    r = est.update(0.0, INPUTS, [Measurement("viability", 1.0, "1", 0.0, 0.0, "assay")])
    assert r.state["dead_cells"] >= 0.0
    batch = simulate(model, hours=48, seed=10)
    for k, t in enumerate(batch.times[1:], start=1):
        zeros = [Measurement(n, 0.0, UNIT[n], t, t, "online") for n in ("glucose", "lactate")]
        r = est.update(t, INPUTS, [batch.online[k][0], *zeros])
        assert min(r.state.values()) >= 0.0
        assert min(r.outputs.values()) >= 0.0
        assert 0.0 < r.growth_factor


def test_growth_factor_converges_to_the_patients_factor(model: TCellExpansionModel) -> None:
    batch = simulate(model, growth_factor=1.3, hours=120, seed=11)
    results = run(start(model), batch, assays="late")
    final = results[-1]
    assert final.growth_factor == pytest.approx(1.3, rel=0.08)
    assert final.growth_factor_std < 0.3
    assert abs(final.growth_factor - 1.3) < 0.3 * abs(results[0].growth_factor - 1.3)
    slow = simulate(model, growth_factor=0.75, hours=120, seed=12)
    assert run(start(model), slow, assays="late")[-1].growth_factor == pytest.approx(0.75, rel=0.1)


def test_estimator_runs_on_the_cho_model() -> None:
    cho = CHOFedBatchModel(load_cho_parameters()[0], load_cho_process()[0])
    est = Estimator(cho)
    x0 = dict(zip(cho.state_names, [0.23, 0.25, 30.0, 4.0, 1.0, 0.5, 1.5], strict=True))
    est.initialize(x0, np.diag([0.02**2, 0.02**2, 1.0, 0.2, 0.2, 0.1, 0.01]))
    for t in range(1, 25):
        r = est.update(
            float(t),
            {"feed_rate": 0.0},
            [Measurement("viable_cells", 0.23 * math.exp(0.03 * t), "1e9 cells/L", t, t, "online")],
        )
    assert set(r.state) == set(cho.state_names)
    assert all(np.isfinite(list(r.state.values())))
    assert min(r.state.values()) >= 0.0
    assert r.growth_factor > 0.5


def test_estimator_runs_on_a_hybrid_model(model: TCellExpansionModel) -> None:
    """The hybrid model (GP-corrected growth rate) has the same interface."""
    rng = np.random.default_rng(1)
    features = rng.uniform([0.0, 0.0], [25.0, 240.0], size=(20, 2))
    target = -0.004 * features[:, 0] / 25.0 + 0.0002 * rng.normal(size=20)
    gp = GPResidual(
        ["lactate", "culture_age"],
        ["mM", "h"],
        "growth_rate_residual",
        "1/h",
        training_iterations=10,
    ).fit(features, target)
    hybrid = HybridModel(model, [RateCorrection("growth_rate", gp)])
    batch = simulate(model, growth_factor=1.2, hours=48, seed=13)
    est = Estimator(hybrid)
    est.initialize(model.initial_state(), np.diag([0.05, 0.1, 1.0, 0.3, 10.0, 1.0, 0.01]) ** 2)
    results = run(est, batch, assays="late")
    assert min(results[-1].state.values()) >= 0.0
    truth = batch.truth[-1]["viable_cells"]
    assert results[-1].state["viable_cells"] == pytest.approx(truth, rel=0.05)


def test_tuning_file_is_loaded_and_checked(model: TCellExpansionModel, tmp_path: Path) -> None:
    good = tmp_path / "estimator.toml"
    good.write_text(
        "[estimator]\n"
        'parameter_factors = ["mu_max", "il2_uptake"]\n'
        "online_gains = []\n"
        "innovation_gate = 5.0\n"
        "stuck_samples = 6\n"
        "gain_bounds = [0.8, 1.25]\n"
        "[assay_noise]\n"
        "il2 = [2.0, 0.15]\n"
    )
    config = load_estimator_config(good, model)
    assert config.parameter_factors == ("mu_max", "il2_uptake")
    assert config.online_gains == ()
    assert config.innovation_gate == 5.0 and config.stuck_samples == 6
    assert config.gain_bounds == (0.8, 1.25)
    assert config.assay_noise["il2"] == (2.0, 0.15)
    assert (
        config.assay_noise["viability"] == EstimatorConfig.for_model(model).assay_noise["viability"]
    )
    bad = tmp_path / "bad.toml"
    for text, match in [
        ("[estimator]\ninnovation_gat = 5.0\n", "Did you mean 'innovation_gate'"),
        ("[estimator]\nstuck_samples = 2.5\n", "whole number"),
        ("[estimator]\nhistory_h = -1.0\n", "history_h must be positive"),
        ('[estimator]\nparameter_factors = ["mu_maks"]\n', "mu_maks"),
        ("[process_noise]\nglucose = [0.1]\n", r"\[process_noise\] glucose"),
        ("[filter]\n", "unknown key 'filter'"),
    ]:
        bad.write_text(text)
        with pytest.raises(ConfigError, match=match) as info:
            load_estimator_config(bad, model)
        assert str(bad) in str(info.value)


# -- API errors -----------------------------------------------------------------------------
def test_invalid_configuration_and_calls_raise_typed_errors(model: TCellExpansionModel) -> None:
    with pytest.raises(ConfigError, match="innovation_gate"):
        EstimatorConfig(innovation_gate=-1.0)
    with pytest.raises(ConfigError, match="not_a_parameter"):
        Estimator(model, EstimatorConfig(parameter_factors=("not_a_parameter",)))
    with pytest.raises(ConfigError, match="oxygen"):
        Estimator(model, EstimatorConfig(online_gains=("oxygen",)))
    with pytest.raises(ConfigError, match="gain_bounds"):
        EstimatorConfig(gain_bounds=(1.5, 2.0))
    est = Estimator(model)
    with pytest.raises(ModelError, match="initialize"):
        est.update(1.0, INPUTS, [])
    with pytest.raises(ModelError, match="P0"):
        est.initialize(model.initial_state(), np.eye(3))
    est.initialize(model.initial_state(), np.eye(model.nx) * 0.01)
    est.update(2.0, INPUTS, [])
    with pytest.raises(ModelError, match="backwards"):
        est.update(1.0, INPUTS, [])
    with pytest.raises(ModelError, match="missing"):
        est.update(3.0, {"perfusion_rate": 1.0}, [])


def _glucose_run(model: TCellExpansionModel, readings: Sequence[Measurement]) -> list[Any]:
    """An estimator started at 20 mM glucose fed one glucose reading per hour."""
    est = Estimator(model)
    est.initialize(model.initial_state(), np.diag(np.full(len(model.state_names), 1e-4)))
    return [est.update(m.sample_time, INPUTS, [m]) for m in readings]


def test_a_measurement_in_another_unit_is_converted_before_the_estimator_uses_it(
    model: TCellExpansionModel,
) -> None:
    """Glucose sent in g/L (3.6 g/L = 20 mM) is converted: the estimate stays near 20 mM and
    the decisions carry the canonical value; before, it was rejected twice by the gate and
    then taken as 3.6 mM."""
    grams = [Measurement("glucose", 3.6, "g/L", t, t, "online") for t in (1.0, 2.0, 3.0, 4.0)]
    results = _glucose_run(model, grams)
    for r in results:
        (d,) = r.accepted
        assert d.measurement.unit == "mM"
        assert d.measurement.value == pytest.approx(3.6 * 1000.0 / 180.156)
    assert results[-1].state["glucose"] == pytest.approx(20.0, abs=0.5)


def test_a_measurement_in_a_unit_that_cannot_be_converted_never_reaches_the_filter(
    model: TCellExpansionModel,
) -> None:
    wrong = [Measurement("glucose", 3.6, "cells/mL", t, t, "online") for t in (1.0, 2.0, 3.0)]
    wrong += [Measurement("viable_cells", 3.6, "", 4.0, 4.0, "online")]
    results = _glucose_run(model, wrong)
    for r, m in zip(results, wrong, strict=True):
        assert not r.accepted
        (d,) = r.rejected
        assert d.reason == "unit" and d.measurement is m
        assert repr(m.unit) in d.detail and repr(UNIT[m.name]) in d.detail
    # the gate never re-admitted it: the state is the model's, not pulled to 3.6
    assert results[-1].state["glucose"] == pytest.approx(20.0, abs=0.5)

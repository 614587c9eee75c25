"""Sensor fault injection and the estimator's response to each fault on the virtual plant,
and the ``bench estimation`` figures."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest

from controller.numerics.estimator import Estimator
from controller.numerics.measurements import Measurement
from plant_models.errors import ConfigError
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process
from sim import cli
from sim.bench_estimation import (
    RecordedStep,
    add_bench_estimation,
    cmd_bench_estimation,
    initial_estimate,
    record_batch,
    register,
    run_estimation_benchmark,
    run_estimator,
)
from sim.faults import FAULT_KINDS, FaultInjector, FaultSpec, default_fault, parse_fault_kinds
from sim.patients import PatientCohort

#: the reason the estimator must give for a corrupted measurement of each kind
EXPECTED_REASON = {
    "nan": {"non_finite"},
    "out_of_range": {"out_of_range"},
    "stuck": {"stuck"},
    "spike": {"innovation_gate", "out_of_range"},
    "stale": {"stale"},
    "duplicate": {"duplicate"},
}


@pytest.fixture(scope="module")
def model() -> TCellExpansionModel:
    return TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])


@pytest.fixture(scope="module")
def batch() -> list[RecordedStep]:
    patient = PatientCohort(2, seed=5).patients[1]
    return record_batch(patient, seed=11, days=6.0)


def _stream(batch: list[RecordedStep], injector: FaultInjector) -> list[list[Measurement]]:
    return [injector(s.time_h, list(s.measurements)) for s in batch]


# -- the injector ---------------------------------------------------------------------------
def test_injector_is_seeded(batch: list[RecordedStep]) -> None:
    faults = [default_fault(k) for k in FAULT_KINDS]
    a = _stream(batch, FaultInjector(faults, seed=1))
    b = _stream(batch, FaultInjector(faults, seed=1))
    c = _stream(batch, FaultInjector(faults, seed=2))

    def key(stream: list[list[Measurement]]) -> list[tuple[str, float, float]]:
        return [(m.name, m.sample_time, m.value) for ms in stream for m in ms]

    assert repr(key(a)) == repr(key(b))  # NaN-safe equality
    assert repr(key(a)) != repr(key(c))


@pytest.mark.parametrize("kind", FAULT_KINDS)
def test_each_fault_kind_corrupts_the_stream_as_specified(
    batch: list[RecordedStep], kind: str
) -> None:
    injector = FaultInjector([default_fault(kind)], seed=3)
    stream = _stream(batch, injector)
    assert injector.injected, f"no {kind} fault injected"
    for f in injector.injected:
        old, new = f.original, f.delivered
        assert f.kind == kind
        if kind == "nan":
            assert not math.isfinite(new.value)
        elif kind == "out_of_range":
            assert new.value < 0 or new.value > 1000 * max(abs(old.value), 1.0)
        elif kind == "stuck":
            assert new.value == injector.injected[0].delivered.value
            assert 72.0 <= f.time_h <= 120.0 and new.name == "viable_cells"
        elif kind == "spike":
            assert abs(new.value - old.value) >= 3.0 - 1e-12
        elif kind == "stale":
            assert new.sample_time <= f.time_h - 6.0 + 1e-9 and new.arrival_time == f.time_h
        elif kind == "duplicate":
            assert (new.name, new.sample_time, new.value) == (old.name, old.sample_time, old.value)
            assert new.arrival_time > f.time_h
        elif kind == "drift":
            gain = 1.0 + 0.04 * (f.time_h - 24.0) / 24.0
            assert new.value == pytest.approx(old.value * gain) and f.time_h >= 24.0
        else:
            assert new.arrival_time == pytest.approx(f.time_h + 26.0)
    delivered = [m for ms in stream for m in ms]
    if kind == "duplicate":
        keys = [(m.name, m.sample_time) for m in delivered if m.source == "assay"]
        assert len(keys) > len(set(keys))
    if kind == "out_of_order":
        samples = [m.sample_time for m in delivered if m.source == "assay"]
        assert any(b < a for a, b in itertools.pairwise(samples))


def test_fault_list_from_the_command_line() -> None:
    assert [f.kind for f in parse_fault_kinds("spike, stuck")] == ["spike", "stuck"]
    assert [f.kind for f in parse_fault_kinds("all")] == list(FAULT_KINDS)
    with pytest.raises(ConfigError, match="gremlin"):
        parse_fault_kinds("spike,gremlin")


def test_fault_spec_is_validated() -> None:
    with pytest.raises(ConfigError, match="unknown"):
        FaultSpec("gremlin")
    with pytest.raises(ConfigError, match="probability"):
        FaultSpec("spike", probability=1.5)
    with pytest.raises(ConfigError, match="sources"):
        FaultSpec("spike", sources=("lab",))


# -- the estimator under faults ---------------------------------------------------------------
def _rmse(errors: np.ndarray) -> float:
    return float(np.sqrt(np.mean(errors**2)))


@pytest.mark.parametrize("kind", [k for k in FAULT_KINDS if k not in ("out_of_order", "drift")])
def test_each_fault_is_rejected_without_derailing_the_estimate(
    model: TCellExpansionModel, batch: list[RecordedStep], kind: str
) -> None:
    clean = run_estimator(model, batch)
    injector = FaultInjector([default_fault(kind)], seed=4)
    est = Estimator(model)
    est.initialize(*initial_estimate(model))
    decisions = {}
    errors = []
    for step in batch:
        result = est.update(
            step.time_h, step.inputs, injector(step.time_h, list(step.measurements))
        )
        for d in result.accepted + result.rejected:
            decisions[id(d.measurement)] = d.reason
        errors.append(result.outputs["viable_cells"] - step.truth["viable_cells"])
        assert min(result.state.values()) >= 0.0
    corrupted = [f.delivered for f in injector.injected]
    if kind == "stuck":  # the first stuck_samples - 1 frozen readings are indistinguishable
        corrupted = corrupted[est.config.stuck_samples - 1 :]
    if kind == "duplicate":  # copies still held at the end of the batch were never delivered
        corrupted = [m for m in corrupted if id(m) in decisions]
    reasons = [decisions[id(m)] for m in corrupted]
    assert reasons and set(reasons) <= EXPECTED_REASON[kind], kind
    clean_rmse = _rmse(clean["errors"]["viable_cells"])
    assert _rmse(np.array(errors)) < 1.3 * clean_rmse + 0.02


def test_probe_drift_is_tracked_by_the_assays(model: TCellExpansionModel) -> None:
    """A slow calibration drift passes every check; the probe-gain state, observed through
    the assays, follows it and keeps the cell estimate on the truth (typical patient)."""
    batch = record_batch(PatientCohort(1, seed=0).patients[0], seed=3, days=6.0)
    clean = run_estimator(model, batch)
    injector = FaultInjector([default_fault("drift")], seed=4)
    est = Estimator(model)
    est.initialize(*initial_estimate(model))
    errors = []
    for step in batch:
        result = est.update(
            step.time_h, step.inputs, injector(step.time_h, list(step.measurements))
        )
        errors.append(result.outputs["viable_cells"] - step.truth["viable_cells"])
    true_gain = 1.0 + 0.04 * (batch[-1].time_h - 24.0) / 24.0
    assert result.online_gains["viable_cells"] == pytest.approx(true_gain, abs=0.06)
    assert _rmse(np.array(errors)) < 1.3 * _rmse(clean["errors"]["viable_cells"]) + 0.02
    # without the gain state the same drift drags the estimate away
    no_gain = dataclasses.replace(est.config, online_gains=())
    drifted = run_estimator(
        model, batch, injector=FaultInjector([default_fault("drift")], seed=4), config=no_gain
    )
    assert _rmse(drifted["errors"]["viable_cells"]) > 2.0 * _rmse(np.array(errors))


def test_out_of_order_assays_end_at_the_in_order_estimate(
    model: TCellExpansionModel, batch: list[RecordedStep]
) -> None:
    injector = FaultInjector([default_fault("out_of_order")], seed=4)
    est, ref = Estimator(model), Estimator(model)
    est.initialize(*initial_estimate(model))
    ref.initialize(*initial_estimate(model))
    for step in batch:
        r = est.update(step.time_h, step.inputs, injector(step.time_h, list(step.measurements)))
        r_ref = ref.update(step.time_h, step.inputs, list(step.measurements))
    assert any(f.kind == "out_of_order" for f in injector.injected)
    late = injector.held  # still held at the end of the batch: deliver them now
    r = est.update(batch[-1].time_h, batch[-1].inputs, late)
    held_times = {m.sample_time for m in late}
    assert all(t >= batch[-1].time_h - est.config.history_h for t in held_times)
    ref_assays = sum(1 for s in batch for m in s.measurements if m.source == "assay")
    est_assays = sum(1 for d in est.events if d.measurement.source == "assay" and d.accepted)
    assert est_assays == ref_assays
    for name in model.state_names:
        assert r.state[name] == pytest.approx(r_ref.state[name], rel=1e-7, abs=1e-9)


# -- the benchmark ---------------------------------------------------------------------------
def test_bench_estimation_command_writes_the_figures(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser(prog="hmpc-sim")
    sub = parser.add_subparsers(dest="command", required=True)
    bench = sub.add_parser("bench")
    add_bench_estimation(bench.add_subparsers(dest="bench_command", required=True))
    # the EXTRA_COMMANDS hook creates "bench" or reuses one another module created
    other = argparse.ArgumentParser(prog="hmpc-sim")
    other_sub = other.add_subparsers(dest="command", required=True)
    existing = other_sub.add_parser("bench").add_subparsers(dest="bench_command", required=True)
    existing.add_parser("mpc")
    register(other_sub)
    assert other.parse_args(["bench", "mpc"]).bench_command == "mpc"
    fresh = argparse.ArgumentParser(prog="hmpc-sim")
    register(fresh.add_subparsers(dest="command", required=True))
    assert fresh.parse_args(["bench", "estimation", "--json", "x.json"]).patients == 20
    parsed = other.parse_args(["bench", "estimation", "--json", "x.json"])
    assert parsed.patients == 20 and parsed.func is cmd_bench_estimation
    out = tmp_path / "est.json"
    args = parser.parse_args(
        ["bench", "estimation", "--patients", "1", "--days", "2", "--json", str(out)]
    )
    assert args.func(args) == 0
    figures = json.loads(out.read_text())
    keys = ["rmse_viable_cells_online_only", "rmse_viable_cells_with_assays"]
    keys += [f"rmse_viable_cells_fault_{k}" for k in FAULT_KINDS]
    keys += [
        "rmse_viable_cells_online_only_miscalibrated",
        "rmse_viable_cells_with_assays_miscalibrated",
    ]
    for key in keys:
        assert math.isfinite(figures[key]) and figures[key] > 0, key
    assert figures["setup"]["patients"] == 1
    # and through the installed command line
    wired = tmp_path / "wired.json"
    argv = ["bench", "estimation", "--patients", "1", "--days", "1", "--json", str(wired)]
    assert cli.main(argv) == 0
    assert "rmse_viable_cells_fault_drift" in json.loads(wired.read_text())


@pytest.mark.slow
def test_benchmark_figures_on_twenty_patients() -> None:
    figures = run_estimation_benchmark(20, seed=0)
    online = figures["rmse_viable_cells_online_only"]
    assays = figures["rmse_viable_cells_with_assays"]
    # an unbiased hourly probe leaves little for the assays to add to viable cells ...
    assert figures["rmse_viable_cells_with_assays_no_probe_gain"] <= 1.02 * online
    assert assays < 1.1 * online
    # ... but they alone see viability, they correct a probe whose calibration is off for
    # this batch (the common case), and they alone catch a drifting probe
    assert figures["rmse_reduction_from_assays_miscalibrated_probe"] > 0.5
    assert figures["patients_improved_by_assays_miscalibrated_probe"] >= 15
    assert figures["rmse_viability_with_assays"] < 0.5 * figures["rmse_viability_online_only"]
    assert (
        figures["rmse_viable_cells_fault_drift"]
        < 0.3 * figures["rmse_viable_cells_fault_drift_online_only"]
    )
    assert figures["rmse_viable_cells_fault_drift_no_probe_gain"] > 2.0 * assays
    # the calibration check drops the probe-gain state's cost on this unbiased probe (the
    # assays then lower the RMSE, a little) and still catches the drift, days later
    assert figures["rmse_viable_cells_with_assays_gain_checked"] < online
    assert figures["gain_check_fired"]["with_assays_gain_checked"]["patients"] <= 2
    assert figures["gain_check_fired"]["fault_drift_gain_checked"]["patients"] == 20
    assert (
        figures["rmse_viable_cells_fault_drift_gain_checked"]
        < 0.3 * figures["rmse_viable_cells_fault_drift_online_only"]
    )
    # re-processing at the sample time beats using the assays as if sampled at arrival
    assert assays < 0.5 * figures["rmse_viable_cells_assays_naive_at_arrival"]
    for kind in FAULT_KINDS:
        assert figures[f"rmse_viable_cells_fault_{kind}"] < 1.3 * assays, kind
    assert figures["rmse_viable_cells_fault_all"] < 1.5 * assays

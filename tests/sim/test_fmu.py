"""The FMU plant (sim/fmu.py) on the vendored Bioprocess Library CHO fed-batch FMU, run for
the hmpc_amribt plug-in: the author's figures through the Plant protocol, restarts, sensors,
the closed loop, ``hmpc-sim simulate --plant fmu:...`` and a residual fit on FMU batches.

fmpy is the optional extra ``hmpc[fmu]`` (installed by ``make setup``); without it these
tests skip.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

fmpy = pytest.importorskip("fmpy", reason="fmpy (the extra hmpc[fmu]) is not installed")

import hmpc_amribt  # noqa: E402  (after the skip: the plug-in package, installed by make setup)

from controller.numerics.baselines import RuleController, make_baseline  # noqa: E402
from plant_models.errors import ConfigError, ModelError  # noqa: E402
from plant_models.process import ProcessPlugin, get_process, schedule_value  # noqa: E402
from sim.closed_loop import hard_violations, run_closed_loop, summarize  # noqa: E402
from sim.fmu import FMUPlant, load_variable_map  # noqa: E402
from sim.patients import VirtualPatient  # noqa: E402
from sim.plant import VirtualBioreactor  # noqa: E402

FMU = hmpc_amribt.FMU_PATH
#: The author's figures (external plant README): viable cells (1e6 cells/mL = 1e9 cells/L).
AUTHOR_VIABLE_CELLS = {24: 0.45, 48: 0.99, 72: 1.45, 96: 2.08, 120: 2.98, 150: 3.31}


@pytest.fixture(scope="module")
def plugin() -> ProcessPlugin:
    return get_process("amribt")


@pytest.fixture
def plant(plugin: ProcessPlugin) -> Iterator[FMUPlant]:
    p = FMUPlant(FMU, plugin)
    yield p
    p.close()


def _patient(viability: float) -> VirtualPatient:
    """The nominal patient (growth factor 1) with the given inoculum viability."""
    return dataclasses.replace(VirtualPatient.nominal(), initial_viability=viability)


def _recipe_run(
    plant: FMUPlant, plugin: ProcessPlugin, dt_h: float
) -> dict[float, dict[str, float]]:
    """Step the plant through the recipe (Plant protocol only); true values by time."""
    steps = plugin.recipe()["feed_rate"]
    out = {0.0: plant.true_values()}
    plant.initial_measurements()
    for _ in range(round(150.0 / dt_h)):
        plant.step({"feed_rate": schedule_value(steps, plant.time_h + 1e-9)}, dt_h)
        out[round(plant.time_h, 6)] = plant.true_values()
    return out


def test_vendored_fmu_with_attribution_and_map() -> None:
    notice = (FMU.parent / "NOTICE.md").read_text()
    assert "janpeter19/BPL_CHO_Fedbatch" in notice and "409ddb5" in notice
    assert "Jan Peter Axelsson" in notice and "MIT License" in notice
    md = fmpy.read_model_description(str(FMU), validate=False)
    assert md.fmiVersion == "2.0" and md.modelExchange is not None
    vmap = load_variable_map(hmpc_amribt.FMU_VARIABLE_MAP)
    assert vmap.process == "amribt"
    assert {s.name for s in vmap.states} == set(get_process("amribt").build_model().state_names)


def test_fmu_plant_reproduces_the_authors_figures(plant: FMUPlant, plugin: ProcessPlugin) -> None:
    values = _recipe_run(plant, plugin, 1.0)
    for hour, cells in AUTHOR_VIABLE_CELLS.items():
        assert values[hour]["viable_cells"] == pytest.approx(cells, abs=0.006)
    end = values[150.0]
    assert end["product"] == pytest.approx(2.93, abs=0.006)
    assert end["volume"] == pytest.approx(1.09, abs=0.006)
    assert end["total_viable_cells"] == pytest.approx(end["viable_cells"] * end["volume"])
    assert end["viability"] == pytest.approx(
        end["viable_cells"] / (end["viable_cells"] + end["dead_cells"])
    )
    # and the plug-in's model, given the same parameters, is the same plant
    virtual = VirtualBioreactor.for_process(plugin, _patient(viability=1.0))
    steps = plugin.recipe()["feed_rate"]
    for _ in range(150):
        virtual.step({"feed_rate": schedule_value(steps, virtual.time_h + 1e-9)}, 1.0)
        truth = virtual.true_values()
        fmu = values[round(virtual.time_h, 6)]
        for name in plugin.build_model().state_names:
            assert fmu[name] == pytest.approx(truth[name], rel=1e-4, abs=1e-6), name
    assert plant.clamped_inputs == 0 and plant.time_h == pytest.approx(150.0)


def test_restart_every_interval_equals_one_continuous_run(
    plant: FMUPlant, plugin: ProcessPlugin
) -> None:
    """Hourly and 0.125 h restarts (1200 intervals on one reused FMU instance) match the
    author's way: one simulation with the whole feed table."""
    steps = plugin.recipe()["feed_rate"]
    par, proc = plant.parameters, plant.process
    vmap = plant.variables
    start: dict[str, float] = {p.fmu: getattr(par, p.name) for p in vmap.parameters}
    start.update({p.fmu: getattr(proc, p.name) for p in vmap.process_fields})
    start.update({"bioreactor.V_start": 0.35, "bioreactor.m_start[1]": 0.07})
    start.update({"bioreactor.m_start[4]": 6.3, "bioreactor.m_start[5]": 0.84})
    for i, (t, value) in enumerate([*steps, (150.0, steps[-1][1])], start=1):
        start[f"dosagescheme.table[{i},1]"] = t
        start[f"dosagescheme.table[{i},2]"] = value
    names = [s.fmu for s in vmap.states]
    result = fmpy.simulate_fmu(
        str(FMU),
        start_time=0.0,
        stop_time=150.0,
        relative_tolerance=1e-10,
        output_interval=1.0,
        start_values=start,
        output=names,
    )
    continuous = {s.name: float(result[s.fmu][-1]) for s in vmap.states}
    hourly = _recipe_run(plant, plugin, 1.0)[150.0]
    fine = FMUPlant(FMU, plugin)
    try:
        short = _recipe_run(fine, plugin, 0.125)[150.0]
    finally:
        fine.close()
    for name, value in continuous.items():
        assert hourly[name] == pytest.approx(value, rel=1e-5, abs=1e-8), name
        assert short[name] == pytest.approx(value, rel=1e-5, abs=1e-8), name


def test_a_long_step_with_assays_inside_equals_hourly_steps(plugin: ProcessPlugin) -> None:
    """Assays sampled inside a step are taken at their sample time: the plant runs to each
    sample time and on (two FMU runs more), and ends where hourly steps end."""
    long, hourly = FMUPlant(FMU, plugin, seed=1), FMUPlant(FMU, plugin, seed=1)
    try:
        long.initial_measurements()
        got = long.step({"feed_rate": 0.002}, 50.0)
        for _ in range(50):
            hourly.step({"feed_rate": 0.002}, 1.0)
        a, b = long.true_values(), hourly.true_values()
    finally:
        long.close()
        hourly.close()
    assert a == pytest.approx(b, rel=1e-6)
    assays = [m for m in got if m.source == "assay"]
    assert {m.sample_time for m in assays} == {0.0, 24.0}  # the 48 h ones arrive at 52 h
    day1 = {m.name: m.value for m in assays if m.sample_time == 24.0}
    assert day1["viable_cells"] == pytest.approx(0.4454, rel=0.15)


def test_sensors_are_the_virtual_bioreactors(plugin: ProcessPlugin) -> None:
    """Same seed, same truth: the FMU plant's probes and assays are the virtual plant's
    (the shared sim.sensors.PlantSensors), readings equal up to the plants' difference."""
    patient = VirtualPatient.nominal()
    fmu_plant = FMUPlant(FMU, plugin, seed=7, viability=patient.initial_viability)
    virtual = VirtualBioreactor.for_process(plugin, patient, seed=7)
    try:
        a, b = fmu_plant.initial_measurements(), virtual.initial_measurements()
        for _ in range(60):
            a += fmu_plant.step({"feed_rate": 0.003}, 1.0)
            b += virtual.step({"feed_rate": 0.003}, 1.0)
    finally:
        fmu_plant.close()
    assert len(a) == len(b) and len(a) > 60
    for ma, mb in zip(a, b, strict=True):
        key = (ma.name, ma.unit, ma.source, ma.sample_time, ma.arrival_time)
        assert key == (mb.name, mb.unit, mb.source, mb.sample_time, mb.arrival_time)
        assert ma.value == pytest.approx(mb.value, rel=1e-4, abs=1e-6)
    assays = [m for m in a if m.source == "assay"]
    assert {m.name for m in assays} == set(plugin.sensors.assays)
    assert {m.sample_time for m in assays} == {0.0, 24.0, 48.0}
    assert all(m.arrival_time == m.sample_time + 4.0 for m in assays)
    # another seed: other noise
    other = FMUPlant(FMU, plugin, seed=8)
    try:
        assert [m.value for m in other.initial_measurements()] != [
            m.value for m in a[: len(plugin.sensors.online)]
        ]
    finally:
        other.close()


def test_inputs_are_clamped_and_errors_are_typed(
    plant: FMUPlant, plugin: ProcessPlugin, tmp_path: Path
) -> None:
    plant.step({"feed_rate": 1.0}, 1.0)  # above feed_max
    assert plant.clamped_inputs == 1
    assert plant.true_values()["volume"] == pytest.approx(0.35 + 0.02, rel=1e-6)
    plant.step({"feed_rate": math.nan}, 1.0)  # non-finite: the lower bound (no feed)
    assert plant.true_values()["volume"] == pytest.approx(0.37, rel=1e-6)
    with pytest.raises(ModelError, match="unknown input"):
        plant.step({"perfusion_rate": 1.0}, 1.0)
    with pytest.raises(ModelError, match="positive"):
        plant.step({"feed_rate": 0.0}, 0.0)
    assert plant.variable_units()["viable_cells"] == "1e9 cells/L"
    assert plant.variable_units()["feed_rate"] == "L/h"
    assert set(plant.true_rates({"feed_rate": 0.0})) == {"growth_rate", "death_rate"}

    text = hmpc_amribt.FMU_VARIABLE_MAP.read_text()
    fmu_copy = tmp_path / "plant.fmu"
    fmu_copy.write_bytes(FMU.read_bytes())
    bad_unit = text.replace('unit = "mg/L"', 'unit = "g/L"')
    (tmp_path / "plant.toml").write_text(bad_unit)
    with pytest.raises(ConfigError, match=r"product: unit 'g/L'.*'mg/L'"):
        FMUPlant(fmu_copy, plugin)
    (tmp_path / "plant.toml").write_text(text.replace('process = "amribt"', 'process = "cho"'))
    with pytest.raises(ConfigError, match="written for it"):
        FMUPlant(fmu_copy, plugin)
    (tmp_path / "plant.toml").write_text(text.replace("bioreactor.c[8]", "bioreactor.c[9]"))
    with pytest.raises(ConfigError, match=r"no variable\(s\) \['bioreactor.c\[9\]'\]"):
        FMUPlant(fmu_copy, plugin)
    lines = [ln for ln in text.splitlines() if not ln.startswith("product =")]
    (tmp_path / "plant.toml").write_text("\n".join(lines))
    with pytest.raises(ConfigError, match="sensors read.*product"):
        FMUPlant(fmu_copy, plugin)
    with pytest.raises(ConfigError, match="not found"):
        FMUPlant(tmp_path / "missing.fmu", plugin)


def test_missing_fmpy_says_how_to_install(
    plugin: ProcessPlugin, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "fmpy", None)
    with pytest.raises(ConfigError, match=r"pip install 'hmpc\[fmu\]'"):
        FMUPlant(FMU, plugin)


@pytest.mark.parametrize("controller", ["recipe", "rule"])
def test_closed_loop_runs_on_the_fmu_plant(plugin: ProcessPlugin, controller: str) -> None:
    plant = FMUPlant(FMU, plugin, seed=2)
    try:
        df = run_closed_loop(plant, make_baseline(controller, plugin), days=150 / 24)
        summary = summarize(df, plant)
        violations = hard_violations(plant, plant.true_values())
    finally:
        plant.close()
    assert len(df) == 151 and df["time"].iloc[-1] == pytest.approx(150.0)
    assert summary["model"] == "amribt" and summary["patient"] == FMU.stem
    assert summary["hard_constraint_violations"] == 0 and violations == []
    assert df.attrs["units"]["product"] == "mg/L" and len(df.attrs["assays"]) > 0
    assert {"measured_viable_cells", "measured_glucose", "growth_rate"} <= set(df.columns)
    assert summary["media_used"] == pytest.approx(df["volume"].iloc[-1] - 0.35, rel=1e-6)
    if controller == "recipe":  # the rate limit (0.005 L/h per h) passes the recipe's steps
        assert summary["final_viable_cells"] == pytest.approx(3.31 * 1.09, rel=0.01)
        assert df["product"].iloc[-1] == pytest.approx(2.93, abs=0.006)
    else:  # the rule feeds by the measured cells from 50 h, within its band
        fed = df.loc[df["time"] >= 50.0, "feed_rate"].iloc[:-1]
        assert (df.loc[df["time"] < 50.0, "feed_rate"] == 0.0).all()
        assert fed.between(0.0012, 0.010).all() and fed.nunique() > 10


def test_hmpc_sim_simulate_runs_the_fmu_plant(tmp_path: Path) -> None:
    from sim.cli import main

    out = tmp_path / "run"
    assert main(["simulate", "--model", "amribt", "--plant", f"fmu:{FMU}", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["model"] == "amribt" and summary["controller"] == "recipe"
    assert summary["duration_h"] == 150.0
    df = pd.read_csv(out / "trajectory.csv")
    assert "viable_cells [1e9 cells/L]" in df.columns and "product [mg/L]" in df.columns
    assert df["viable_cells [1e9 cells/L]"].iloc[-1] == pytest.approx(3.31, abs=0.006)
    assert (out / "assays.csv").is_file()
    # user errors: one line, exit status 2
    args = ["simulate", "--model", "amribt", "--out", str(tmp_path / "x")]
    assert main([*args, "--plant", "fmu:" + str(FMU), "--patient-seed", "3"]) == 2
    assert main([*args, "--plant", "fmu:" + str(tmp_path / "none.fmu")]) == 2
    assert main([*args, "--plant", "opc:somewhere"]) == 2


@pytest.fixture(scope="module")
def fmu_records(tmp_path_factory: pytest.TempPathFactory, plugin: ProcessPlugin) -> str:
    """Five FMU batch records (trajectory.csv, assays.csv) under the rule with varied feeds;
    the FMU's cells grow 25 % faster than the plug-in's model (both cell yields x 1.25): a
    mismatch for the residual. Returns their glob."""
    from sim.report import write_batch

    out = tmp_path_factory.mktemp("fmu_batches")
    lab = plugin.load_parameters()[0]
    faster = dataclasses.replace(
        lab,
        yield_cells_glucose=lab.yield_cells_glucose * 1.25,
        yield_cells_glutamine=lab.yield_cells_glutamine * 1.25,
    )
    for i, feed in enumerate([0.002, 0.0025, 0.003, 0.0035, 0.004]):
        plant = FMUPlant(FMU, plugin, parameters=faster, seed=i, plant_id=f"B{i}")
        rule = RuleController(
            plugin, dataclasses.replace(plugin.rule_settings(), cell_specific_feed=feed)
        )
        try:
            df = run_closed_loop(plant, rule, days=150 / 24)
            write_batch(df, summarize(df, plant), out / f"B{i}", title=f"B{i}")
        finally:
            plant.close()
    return str(out / "*" / "trajectory.csv")


def test_hmpc_fit_cli_accepts_the_plugin(tmp_path: Path, fmu_records: str) -> None:
    from controller.cli import main

    args = ["fit", "--model", "amribt", "--data", fmu_records]
    args += [
        "--out",
        str(tmp_path / "r.npz"),
        "--report",
        str(tmp_path / "rep"),
        "--iterations",
        "30",
    ]
    assert main(args) == 0
    assert (tmp_path / "r.npz").is_file()
    assert (tmp_path / "rep" / "validation.json").is_file()


def test_residual_fit_on_fmu_batches(
    tmp_path: Path, plugin: ProcessPlugin, fmu_records: str
) -> None:
    """What ``hmpc fit --model amribt`` does, step by step through the library:
    growth-rate observations of FMU batch records, a GP residual, the hybrid
    model and the 24 h-ahead validation on a held-out batch."""
    from controller.training import validate_24h
    from controller.training.batches import (
        estimate_log_noise,
        growth_rate_observations,
        load_batch_records,
    )
    from plant_models.gp import GPResidual
    from plant_models.hybrid import HybridModel, RateCorrection, feature_units

    base = plugin.build_model()
    records = load_batch_records(fmu_records, base)
    assert [r.name for r in records] == ["B0", "B1", "B2", "B3", "B4"]
    train, held = records[:-1], records[-1:]
    features = plugin.gp_features
    obs = growth_rate_observations(train, base, features)
    units = feature_units(base)
    gp = GPResidual(
        features,
        [units[f] for f in features],
        "growth_rate_residual",
        "1/h",
        training_iterations=60,
        seed=0,
    )
    gp.fit(obs[list(features)].to_numpy(float), obs["residual"].to_numpy(float))
    gp.save(tmp_path / "residual.npz")
    loaded = GPResidual.load(tmp_path / "residual.npz")
    assert tuple(loaded.feature_names) == tuple(features)
    # the plant grows faster than the model (mu x 1.25, ~0.008 1/h while substrates last)
    mean, _ = loaded.predict(obs[list(features)].to_numpy(float))
    assert 0.003 < float(np.mean(mean)) < 0.012
    hybrid = HybridModel(base, [RateCorrection("growth_rate", loaded)])
    validation = validate_24h(base, hybrid, held, noise=estimate_log_noise(train))
    assert validation["rows"] and np.isfinite(validation["rmse_hybrid"])
    assert np.isfinite(validation["rmse_mechanistic"]) and validation["rmse_mechanistic"] > 0.1


def test_an_fmu_without_a_variable_map_is_a_clear_error(tmp_path: Path) -> None:
    from sim.fmu import load_variable_map

    with pytest.raises(ConfigError, match="no FMU variable map"):
        load_variable_map(tmp_path / "other_plant.toml")

"""The third process plug-in, hmpc_amribt (examples/hmpc_amribt): an installable package of
its own, found through its entry point, with the Amribt 2013 kinetics written once for
CasADi and numpy.

The package is installed by the project's set-up (``make setup``:
``pip install -e examples/hmpc_amribt``); these tests need no FMU.
"""

from __future__ import annotations

import dataclasses
import itertools
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
from scipy.integrate import solve_ivp

from plant_models.process import (
    ENTRY_POINT_GROUP,
    ProcessPlugin,
    available_processes,
    get_process,
    schedule_value,
)
from plant_models.tcell import load_tcell_parameters

#: The author's figures (BPL_CHO_Fedbatch, /work/shared/external/bpl_cho_fedbatch/README.md):
#: viable cells (1e6 cells/mL) under the author's recipe and lab parameters.
AUTHOR_VIABLE_CELLS = {24: 0.45, 48: 0.99, 72: 1.45, 96: 2.08, 120: 2.98, 150: 3.31}
AUTHOR_PRODUCT_150H = 2.93
AUTHOR_VOLUME_150H = 1.09


@pytest.fixture(scope="module")
def plugin() -> ProcessPlugin:
    return get_process("amribt")


def _run_recipe(plugin: ProcessPlugin, feed_factor: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """The plug-in's model under its recipe (feed x ``feed_factor``), sampled hourly, with
    three running integrals appended: new cells (integral of mu Xv V), glucose and
    glutamine taken up by the cells (integral of q Xv V)."""
    model = plugin.build_model()
    steps = plugin.recipe()["feed_rate"]
    names = model.state_names
    iv, ivol = names.index("viable_cells"), names.index("volume")

    def rhs(t: float, y: np.ndarray) -> np.ndarray:
        u = np.array([feed_factor * schedule_value(steps, t)])
        x = y[: model.nx]
        r = model.rates_numpy(t, x, u)
        cells = x[iv] * x[ivol]
        extra = [
            r["growth_rate"] * cells,
            r["glucose_uptake"] * cells,
            r["glutamine_uptake"] * cells,
        ]
        return np.concatenate([model.rhs(t, x, u), extra])

    y = np.concatenate([model.state_vector(model.initial_state()), np.zeros(3)])
    times = np.arange(0.0, 151.0)
    out = [y]
    bounds = sorted({0.0, 150.0, *(s for s, _ in steps if s < 150.0)})
    t_out: list[float] = [0.0]
    for a, b in itertools.pairwise(bounds):  # one solve per recipe step
        sel = times[(times > a) & (times <= b)]
        sol = solve_ivp(rhs, (a, b), y, method="LSODA", rtol=1e-9, atol=1e-12, t_eval=sel)
        assert sol.success
        out.extend(sol.y.T)
        t_out.extend(sol.t)
        y = sol.y[:, -1]
    return np.array(t_out), np.array(out)


def test_found_through_its_entry_point_as_an_installed_package(plugin: ProcessPlugin) -> None:
    eps = {ep.name: ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP)}
    assert "amribt" in eps, (
        "hmpc_amribt is not installed: pip install -e examples/hmpc_amribt (make setup)"
    )
    assert eps["amribt"].value == "hmpc_amribt:PROCESS"
    assert eps["amribt"].dist is not None and eps["amribt"].dist.name == "hmpc-amribt"
    assert "amribt" in available_processes()
    import hmpc_amribt

    assert plugin is hmpc_amribt.PROCESS and plugin.name == "amribt"
    # the package lives in examples/, not inside hmpc's own packages
    assert Path(hmpc_amribt.__file__).parent.parent.name == "hmpc_amribt"


def test_the_plugin_imports_no_simulator_code() -> None:
    code = (
        "import sys, hmpc_amribt; print(sorted(m for m in sys.modules if m.split('.')[0] == 'sim'))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_files_state_units_sources_and_the_authors_set(plugin: ProcessPlugin) -> None:
    par, prov = plugin.load_parameters()
    assert prov.model == "amribt" and "bpl" in prov.sources and "amribt" in prov.sources
    assert "409ddb5" in prov.sources["bpl"] and "Amribt" in prov.sources["amribt"]
    # the lab set of Amribt_lab.xlsx (README of the external plant), not the FMU defaults
    assert (par.product_growth_associated, par.product_non_growth) == (0.4167, 0.0100)
    assert (par.glucose_uptake_max, par.glutamine_oxidation_max, par.kd_glutamine) == (
        0.2971,
        0.0218,
        0.0020,
    )
    proc, pprov = plugin.load_process()
    assert pprov.model == "amribt-process"
    assert (proc.initial_volume, proc.seeding_density, proc.harvest_time) == (0.35, 0.2, 150.0)
    assert (proc.initial_glucose, proc.initial_glutamine) == pytest.approx((18.0, 2.4))
    assert (proc.feed_glucose, proc.feed_glutamine) == (15.0, 4.0)
    assert plugin.recipe()["feed_rate"] == (
        (0.0, 0.0),
        (50.0, 0.0012),
        (64.0, 0.002),
        (78.0, 0.004),
        (92.0, 0.008),
        (106.0, 0.012),
    )
    # truth variant: its own nominal file
    assert plugin.load_truth_parameters()[0] == par
    # a file of another model is refused
    with pytest.raises(ValueError, match="amribt"):
        plugin.load_parameters(load_tcell_parameters()[1].path)


def test_packaged_mpc_tuning_loads_and_fits_the_model(plugin: ProcessPlugin) -> None:
    from controller.laws.control import default_mpc_config
    from controller.numerics.mpc_config import load_mpc_config, with_process_limits

    path = default_mpc_config("amribt")
    assert path.is_absolute() and path.is_file() and path.parent.parent.name == "hmpc_amribt"
    model = plugin.build_model()
    proc = plugin.load_process()[0]
    cfg = with_process_limits(load_mpc_config(path), proc, model.operating_bounds())  # type: ignore[attr-defined]
    assert cfg.hard_bounds["volume"].high == proc.volume_max
    assert cfg.hard_bounds["glucose"].low == proc.glucose_low_hard
    assert set(cfg.state_scaling) == set(model.state_names)


def test_casadi_and_numpy_are_the_same_equations(plugin: ProcessPlugin) -> None:
    model = plugin.build_model()
    f = model.dynamics()
    rng = np.random.default_rng(3)
    for _ in range(20):
        # both regimes: overflow (much substrate) and limitation (little)
        x = np.array(
            [
                rng.uniform(0.1, 5.0),
                rng.uniform(0.0, 1.0),
                10 ** rng.uniform(-3, 1.5),
                10 ** rng.uniform(-4, 0.5),
                rng.uniform(0, 20),
                rng.uniform(0, 4),
                rng.uniform(0, 3),
                rng.uniform(0.3, 1.2),
            ]
        )
        u = np.array([rng.uniform(0.0, 0.02)])
        xdot, rates = (np.array(v).ravel() for v in f(10.0, x, u))
        assert np.allclose(xdot, model.rhs(10.0, x, u), rtol=1e-12, atol=1e-15)
        assert np.allclose(rates, list(model.rates_numpy(10.0, x, u).values()), rtol=1e-12)


def test_model_reproduces_the_authors_figures_under_the_recipe(plugin: ProcessPlugin) -> None:
    t, y = _run_recipe(plugin)
    names = plugin.build_model().state_names
    at = {round(ti): row for ti, row in zip(t, y, strict=True)}
    for hour, cells in AUTHOR_VIABLE_CELLS.items():
        assert at[hour][names.index("viable_cells")] == pytest.approx(cells, abs=0.006)
    assert at[150][names.index("product")] == pytest.approx(AUTHOR_PRODUCT_150H, abs=0.006)
    assert at[150][names.index("volume")] == pytest.approx(AUTHOR_VOLUME_150H, abs=0.006)


@pytest.mark.parametrize("feed_factor", [0.0, 1.0, 1.6])
def test_balances_conserve_cells_and_substrates(plugin: ProcessPlugin, feed_factor: float) -> None:
    """Physical invariants under no feed (starvation: substrates run out), the recipe and
    more feed: every concentration stays >= 0; death moves viable cells to dead ones and
    creates or loses none; the feed's volume, glucose and glutamine are all accounted for
    (what is in the broth + what the cells took up = inoculum + feed)."""
    model = plugin.build_model()
    proc = plugin.load_process()[0]
    names = model.state_names
    t, y = _run_recipe(plugin, feed_factor)
    x, grown, glc_up, gln_up = y[:, : model.nx], y[:, -3], y[:, -2], y[:, -1]
    assert np.all(x >= -1e-9), "a concentration went negative"
    s = {n: x[:, i] for i, n in enumerate(names)}
    vol = s["volume"]
    fed = vol - proc.initial_volume
    # volume: the integral of the recipe's (scaled) piecewise-constant feed
    steps = plugin.recipe()["feed_rate"]
    ends = [start for start, _ in steps[1:]] + [np.inf]
    expected_fed = [
        feed_factor
        * sum(v * max(0.0, min(ti, end) - a) for (a, v), end in zip(steps, ends, strict=True))
        for ti in t
    ]
    assert np.allclose(fed, expected_fed, atol=1e-9)
    cells = (s["viable_cells"] + s["dead_cells"]) * vol
    assert np.allclose(cells - cells[0], grown, rtol=1e-6, atol=1e-8)
    glc0, gln0 = (
        proc.initial_glucose * proc.initial_volume,
        proc.initial_glutamine * proc.initial_volume,
    )
    assert np.allclose(
        s["glucose"] * vol + glc_up, glc0 + proc.feed_glucose * fed, rtol=1e-6, atol=1e-8
    )
    assert np.allclose(
        s["glutamine"] * vol + gln_up, gln0 + proc.feed_glutamine * fed, rtol=1e-6, atol=1e-8
    )
    if feed_factor == 0.0:  # starvation: glutamine runs out and cells die
        assert s["glutamine"][-1] < 1e-3 and s["dead_cells"][-1] > 0.5


def test_growth_factor_scales_growth_only(plugin: ProcessPlugin) -> None:
    proc = plugin.load_process()[0]

    @dataclasses.dataclass(frozen=True)
    class Clone:
        growth_factor: float = 1.3
        lag_time: float = 0.0
        exhaustion_factor: float = 1.0
        initial_viability: float = 0.95

    nominal, clone = plugin.build_model(), plugin.truth_model(Clone(), proc)
    x = nominal.state_vector(nominal.initial_state(viability=0.95))
    u = np.array([0.004])
    r0, r1 = nominal.rates_numpy(0.0, x, u), clone.rates_numpy(0.0, x, u)
    assert r1["growth_rate"] == pytest.approx(1.3 * r0["growth_rate"])
    for k in ("death_rate", "glucose_uptake", "glutamine_uptake", "lactate_production"):
        assert r1[k] == pytest.approx(r0[k])
    assert x[nominal.state_names.index("dead_cells")] == pytest.approx(0.2 * 0.05 / 0.95)


def test_rule_feeds_by_cells_after_50_hours_within_its_band(plugin: ProcessPlugin) -> None:
    assert plugin.rule({"viable_cells": 2.0}, 49.0) == {"feed_rate": 0.0}
    assert plugin.rule({"viable_cells": 2.0}, 60.0)["feed_rate"] == pytest.approx(0.006)
    assert plugin.rule({"viable_cells": 0.1}, 60.0)["feed_rate"] == pytest.approx(0.0012)
    assert plugin.rule({"viable_cells": 9.0}, 60.0)["feed_rate"] == pytest.approx(0.010)
    assert plugin.media_litres({"feed_rate": 0.01}, {}, 2.0) == pytest.approx(0.02)
    proc = plugin.load_process()[0]
    assert plugin.rate_limits(proc) == {"feed_rate": 0.005}
    assert plugin.violations(proc, {"glucose": 0.1, "lactate": 1, "volume": 1, "ammonia": 6}) == [
        "glucose_low",
        "ammonia_high",
    ]


def test_the_estimator_defaults_are_the_plugins_own() -> None:
    """The estimator asks the plug-in (its sensors' noise and EstimatorDefaults): a process
    without ``mu_max`` gets no factor on it (was: "estimator parameter factor 'mu_max' is not
    a model parameter", so mechanistic-mpc could not run on this process)."""
    from controller.numerics.estimator import Estimator, EstimatorConfig
    from plant_models.process import get_process, process_of

    plugin = get_process("amribt")
    model = plugin.build_model()
    assert process_of(model) is plugin
    config = EstimatorConfig.for_model(model)
    assert config.parameter_factors == () and config.online_gains == ()
    assert config.assay_noise["product"] == (0.02, 0.05)  # from the plug-in's assays
    assert config.process_noise == dict(plugin.estimator.process_noise)
    Estimator(model, config)  # builds: every name is one of the model's

"""The process plug-in contract (plant_models.process) and the two built-in plug-ins."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest

from plant_models.errors import ConfigError
from plant_models.process import (
    ENTRY_POINT_GROUP,
    ProcessPlugin,
    available_processes,
    get_process,
    load_recipe,
    schedule_value,
)

ROOT = Path(__file__).resolve().parents[2]
BUILT_IN = ("tcell", "cho")


def test_built_ins_are_registered_through_the_entry_point_group() -> None:
    assert set(BUILT_IN) <= set(available_processes())
    for name in BUILT_IN:
        plugin = get_process(name)
        assert isinstance(plugin, ProcessPlugin) and plugin.name == name
        assert get_process(plugin) is plugin
    with pytest.raises(ConfigError, match=r"'tcel' is not registered.*Did you mean 'tcell'"):
        get_process("tcel")
    with pytest.raises(ConfigError, match=ENTRY_POINT_GROUP):
        get_process("no-such-process")


@pytest.mark.parametrize("name", BUILT_IN)
def test_a_plug_in_answers_every_question_the_code_asks(name: str) -> None:
    plugin = get_process(name)
    model = plugin.build_model()
    process = model.process  # type: ignore[attr-defined]
    states = set(model.state_names)
    # features, simulated states, sensors and limits name the model's own variables
    assert set(plugin.gp_features) - {"culture_age"} <= states
    assert set(plugin.simulated_states) <= states
    assert set(plugin.correctable_rates) <= set(model.rate_names)
    derived = {"viability", "total_viable_cells"}
    for noise in (plugin.sensors.online, plugin.sensors.assays):
        assert set(noise) <= states | derived
    assert {h.variable for h in plugin.hard_limits} <= states
    assert set(plugin.rate_limits(process)) <= set(model.input_names)
    # the recipe covers every input within its bounds
    recipe = plugin.recipe()
    bounds = model.operating_bounds()  # type: ignore[attr-defined]
    assert set(recipe) == set(model.input_names)
    for input_name, steps in recipe.items():
        low, high = bounds[input_name]
        assert all(low <= v <= high for _, v in steps)
    # the rule answers every input from measured values alone, and nothing else
    values = {s: float(v) for s, v in model.initial_state().items()}  # type: ignore[attr-defined]
    assert set(plugin.rule(values, 72.0)) == set(model.input_names)
    # truth variants load, and the truth plant has the model's state and inputs
    for path in plugin.truth_variants.values():
        truth = plugin.load_truth_parameters(path)[0]

        class Patient:
            growth_factor, lag_time, exhaustion_factor, initial_viability = 1.2, 10.0, 1.0, 0.9

        plant_model = plugin.truth_model(Patient(), process, truth)
        assert plant_model.state_names == model.state_names
        assert plant_model.input_names == model.input_names
    x0 = model.state_vector(values)
    u0 = model.input_vector({n: steps[0][1] for n, steps in recipe.items()})
    assert np.all(np.isfinite(model.rhs(0.0, x0, u0)))


def test_violations_and_derived_values_follow_the_declarations() -> None:
    tcell, cho = get_process("tcell"), get_process("cho")
    proc = tcell.load_process()[0]
    ok = {"glucose": 10.0, "lactate": 5.0, "volume": 1.0}
    assert tcell.violations(proc, ok) == []
    bad = {"glucose": proc.glucose_high_hard + 1, "lactate": 5.0, "volume": proc.volume_max + 0.1}
    assert tcell.violations(proc, bad) == ["volume_high", "glucose_high"]
    cproc = cho.load_process()[0]
    assert cho.violations(cproc, {**ok, "ammonia": cproc.ammonia_high_hard * 2}) == ["ammonia_high"]
    # T cell: viable + dead; CHO: a total-cells state
    assert tcell.derived_values({"viable_cells": 3.0, "dead_cells": 1.0, "volume": 2.0}) == {
        "viability": 0.75,
        "total_viable_cells": 6.0,
    }
    got = cho.derived_values({"viable_cells": 3.0, "total_cells": 4.0, "volume": 2.0})
    assert got == {"viability": 0.75, "total_viable_cells": 6.0}
    assert tcell.dose_cells(proc) == proc.dose_cells and cho.dose_cells(cproc) is None


def test_the_packaged_recipes_are_the_former_fixed_ones() -> None:
    """The recipes moved from code into the process files without changing."""
    assert dict(get_process("tcell").recipe()) == {
        "perfusion_rate": ((0.0, 0.0), (48.0, 0.5), (72.0, 1.0), (96.0, 2.0), (120.0, 3.0)),
        "glucose_feed": ((0.0, 0.0),),
        "il2_addition": ((0.0, 0.0),),
    }
    assert dict(get_process("cho").recipe()) == {"feed_rate": ((0.0, 0.0), (48.0, 0.001))}
    steps = ((0.0, 0.0), (48.0, 0.5), (72.0, 1.0))
    assert [schedule_value(steps, t) for t in (0.0, 47.9, 48.0, 100.0)] == [0.0, 0.0, 0.5, 1.0]


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ('feed_rate = { unit = "mL/h", steps = [[0.0, 0.0]] }', "unit 'mL/h' given"),
        ('feed_rate = { unit = "L/h", steps = [[0.0, 0.0], [0.0, 0.001]] }', "must begin at 0"),
        ('feed_rate = { unit = "L/h", steps = [[1.0, 0.0]] }', "must begin at 0"),
        ('feed_rate = { unit = "L/h", steps = [[0.0, 99.0]] }', "outside the input's bounds"),
        ('feed_rate = { unit = "L/h", steps = [[0.0, "x"]] }', "not a \\[start_h, value\\]"),
        ('feed_rate = { unit = "L/h", steps = [] }', "non-empty list"),
        ('feed_rte = { unit = "L/h", steps = [[0.0, 0.0]] }', "Did you mean 'feed_rate'"),
        ('feed_rate = { unit = "L/h" }', "missing required key"),
    ],
)
def test_a_bad_recipe_is_refused_naming_file_and_input(
    tmp_path: Path, table: str, message: str
) -> None:
    plugin = get_process("cho")
    packaged = plugin.process_file().read_text()
    text = packaged[: packaged.index("[recipe]")] + "[recipe]\n" + table + "\n"
    path = tmp_path / "process.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_recipe(path, plugin.build_model(process=path))
    assert str(path) in str(err.value)
    no_recipe = tmp_path / "no_recipe.toml"
    no_recipe.write_text(packaged[: packaged.index("[recipe]")])
    with pytest.raises(ConfigError, match=r"\[recipe\]: missing"):
        plugin.recipe(no_recipe)


def test_no_code_outside_the_plug_ins_branches_on_a_process_name() -> None:
    """The issue's check (`git grep -nE '"(tcell|cho)"' controller sim`), as a test: no
    string constant in controller/ or sim/ is a built-in process's name (the plug-ins own
    everything that depends on the process; defaults use DEFAULT_PROCESS)."""
    found = []
    for package in ("controller", "sim"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.Constant) and node.value in BUILT_IN:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno}: {node.value!r}")
    assert found == []
    # the check itself sees such a constant
    tree = ast.parse('if model == "cho":\n    pass\n')
    assert any(isinstance(n, ast.Constant) and n.value in BUILT_IN for n in ast.walk(tree))


def test_a_plug_in_without_its_rule_or_media_cannot_be_made() -> None:
    class Incomplete(ProcessPlugin):
        name = "incomplete"

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()  # type: ignore[abstract]
    tcell = get_process("tcell")
    proc = tcell.load_process()[0]
    assert tcell.soft_limit_values(proc) == [
        ("glucose", "low", proc.glucose_low_soft),
        ("lactate", "high", proc.lactate_high_soft),
    ]

"""Baseline controllers: a fixed recipe and a rule a careful operator would run (they are
also the deployable fallbacks; the simulator re-exports them from ``sim.baselines``).

A controller sees only measurements (never the truth) and returns the next inputs; the
output limiter (absolute bounds, rate limits) is applied by the closed loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from controller.numerics.measurements import Measurement
from plant_models.process import ProcessPlugin, Recipe, get_process, schedule_value

__all__ = [
    "Controller",
    "LatestValues",
    "RecipeController",
    "RuleController",
    "make_baseline",
]


class Controller(Protocol):
    """What the closed loop needs of a controller."""

    name: str

    def step(
        self, time_h: float, measurements: Sequence[Measurement], previous: Mapping[str, float]
    ) -> dict[str, float]:
        """Next inputs, given the measurements that arrived since the last call."""
        ...


class LatestValues:
    """Latest measured value of each variable (online or assay, by sample time)."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.times: dict[str, float] = {}

    def update(self, measurements: Sequence[Measurement]) -> None:
        for m in measurements:
            if m.quality == "good" and m.sample_time >= self.times.get(m.name, -1e300):
                self.values[m.name] = m.value
                self.times[m.name] = m.sample_time


@dataclasses.dataclass
class RecipeController:
    """A fixed schedule of inputs by culture age (no feedback): per input, (start_h, value)
    steps (a process plug-in's :meth:`~plant_models.process.ProcessPlugin.recipe`)."""

    schedules: Recipe
    name: str = "recipe"

    def step(
        self, time_h: float, measurements: Sequence[Measurement], previous: Mapping[str, float]
    ) -> dict[str, float]:
        return {k: schedule_value(v, time_h) for k, v in self.schedules.items()}


@dataclasses.dataclass
class RuleController:
    """Feedback rules as an operator would run them: the process plug-in's
    :meth:`~plant_models.process.ProcessPlugin.rule` on the latest measured values (online
    or assay), with its ``settings`` (default: the plug-in's)."""

    process: ProcessPlugin
    settings: Any = None
    name: str = "rule"
    latest: LatestValues = dataclasses.field(default_factory=LatestValues)

    def __post_init__(self) -> None:
        if self.settings is None:
            self.settings = self.process.rule_settings()

    def step(
        self, time_h: float, measurements: Sequence[Measurement], previous: Mapping[str, float]
    ) -> dict[str, float]:
        self.latest.update(measurements)
        return self.process.rule(self.latest.values, time_h, self.settings)


def make_baseline(
    name: str, process: str | ProcessPlugin, process_file: Path | None = None
) -> RecipeController | RuleController:
    """A baseline controller by name (``recipe`` or ``rule``) for a process; the recipe is
    the process file's ``[recipe]`` (default: the plug-in's packaged process file)."""
    plugin = get_process(process)
    if name == "recipe":
        return RecipeController(plugin.recipe(process_file))
    if name == "rule":
        return RuleController(plugin)
    raise ValueError(f"unknown baseline controller {name!r}; expected 'recipe' or 'rule'")

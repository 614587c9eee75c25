"""Baseline controllers: a fixed recipe and a rule a careful operator would run (they are
also the deployable fallbacks; the simulator re-exports them from ``sim.baselines``).

A controller sees only measurements (never the truth) and returns the next inputs; the
output limiter (absolute bounds, rate limits) is applied by the closed loop.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Protocol

from controller.measurements import Measurement

__all__ = [
    "CHO_RECIPE",
    "TCELL_RECIPE",
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


def _schedule(table: Sequence[tuple[float, float]], time_h: float) -> float:
    """Piecewise-constant schedule: (start_h, value) rows in increasing start order."""
    value = table[0][1]
    for start, v in table:
        if time_h >= start:
            value = v
    return value


@dataclasses.dataclass
class RecipeController:
    """A fixed schedule of inputs by culture age (no feedback)."""

    schedules: Mapping[str, Sequence[tuple[float, float]]]
    name: str = "recipe"

    def step(
        self, time_h: float, measurements: Sequence[Measurement], previous: Mapping[str, float]
    ) -> dict[str, float]:
        return {k: _schedule(v, time_h) for k, v in self.schedules.items()}


#: The T-cell recipe: batch for two days, then perfusion stepped up daily (vessel volumes/day).
TCELL_RECIPE = {
    "perfusion_rate": [(0.0, 0.0), (48.0, 0.5), (72.0, 1.0), (96.0, 2.0), (120.0, 3.0)],
    "glucose_feed": [(0.0, 0.0)],
    "il2_addition": [(0.0, 0.0)],
}
#: The CHO recipe: batch for two days, then a constant feed (L/h).
CHO_RECIPE = {"feed_rate": [(0.0, 0.0), (48.0, 0.001)]}


@dataclasses.dataclass
class RuleController:
    """Feedback rules as an operator would run them.

    T cell: perfusion follows a cell-specific perfusion rate (CSPR) on the measured viable
    cells, raised when lactate nears its soft limit; glucose stock is fed when glucose
    falls below its target; IL-2 is topped up when the assay shows it low.
    CHO: the feed keeps measured glucose near its target (proportional rule).
    """

    kind: str
    name: str = "rule"
    cell_specific_perfusion: float = 0.1  # 1/d per 1e6 cells/mL (100 pL/cell/day)
    minimum_perfusion: float = 0.0
    lactate_target: float = 15.0  # mM, below the 20 mM soft limit
    lactate_gain: float = 0.25  # 1/d per mM above target
    glucose_target: float = 8.0  # mM
    glucose_gain: float = 0.4  # mL/h per mM below target (T cell)
    il2_target: float = 40.0  # IU/mL
    il2_dose: float = 5.0  # kIU/h while low
    cho_glucose_target: float = 20.0  # mM
    cho_feed_gain: float = 0.0001  # L/h per mM below target
    latest: LatestValues = dataclasses.field(default_factory=LatestValues)

    def step(
        self, time_h: float, measurements: Sequence[Measurement], previous: Mapping[str, float]
    ) -> dict[str, float]:
        self.latest.update(measurements)
        v = self.latest.values
        if self.kind == "cho":
            if time_h < 48.0:
                return {"feed_rate": 0.0}
            error = self.cho_glucose_target - v.get("glucose", self.cho_glucose_target)
            return {"feed_rate": max(0.0005, 0.001 + self.cho_feed_gain * error)}
        cells = v.get("viable_cells", 0.0)
        perfusion = max(self.minimum_perfusion, self.cell_specific_perfusion * cells)
        lactate = v.get("lactate", 0.0)
        if lactate > self.lactate_target:
            perfusion += self.lactate_gain * (lactate - self.lactate_target)
        glucose = v.get("glucose", self.glucose_target)
        feed = max(0.0, self.glucose_gain * (self.glucose_target - glucose))
        il2 = v.get("il2")
        il2_add = self.il2_dose if il2 is not None and il2 < self.il2_target else 0.0
        return {"perfusion_rate": perfusion, "glucose_feed": feed, "il2_addition": il2_add}


def make_baseline(name: str, kind: str) -> RecipeController | RuleController:
    """A baseline controller by name (``recipe`` or ``rule``) for a model kind."""
    if name == "recipe":
        return RecipeController(TCELL_RECIPE if kind == "tcell" else CHO_RECIPE)
    if name == "rule":
        return RuleController(kind)
    raise ValueError(f"unknown baseline controller {name!r}; expected 'recipe' or 'rule'")

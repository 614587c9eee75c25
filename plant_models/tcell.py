"""T-cell / CAR-T expansion in a perfusion bioreactor (reference model 1 of domain.md).

Structure after the Manchester ambr15 T-cell model (Duran-Villalobos et al.; repository
CarlosADuranVIllalobos/webappdemo, file cells_sim_2.py): lag phase, glucose limitation,
an accumulating "inhibitor" (integral of viable cell density, a surrogate of exhaustion)
that arrests growth and promotes death, and starvation death; extended with lactate and
IL-2, perfusion with full cell retention and a concentrated glucose feed. Recalibrated for
a CAR-T perfusion process: see docs/models.md.

Canonical units: time h; cells 1e6 cells/mL; glucose, lactate mM; IL-2 IU/mL;
inhibitor 1e6 cells·h/mL; volume L; perfusion vessel volumes per day (1/d);
glucose feed mL/h of stock; IL-2 addition kIU/h.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from plant_models.base import MechanisticModel, VariableSpec
from plant_models.config import ParameterFile, load_parameters, param

__all__ = [
    "TCellExpansionModel",
    "TCellParameters",
    "TCellProcess",
    "load_tcell_parameters",
    "load_tcell_process",
]

DATA = resources.files("plant_models") / "data"


@dataclasses.dataclass(frozen=True)
class TCellParameters:
    """Kinetic and stoichiometric parameters of the T-cell model."""

    mu_max: float = param("1/h", 0.0, 0.2, "maximum specific growth rate", low_open=True)
    glucose_half_saturation: float = param("mM", 0.0, 50.0, "Monod constant of glucose for growth")
    lactate_inhibition: float = param(
        "mM", 0.0, 500.0, "lactate level halving growth (K_IL)", low_open=True
    )
    il2_half_saturation: float = param("IU/mL", 0.0, 500.0, "Monod constant of IL-2 for growth")
    exhaustion_threshold: float = param(
        "1e6 cells*h/mL", 0.0, 1e5, "inhibitor level at which growth is halved", low_open=True
    )
    exhaustion_width: float = param(
        "1e6 cells*h/mL",
        0.0,
        1e5,
        "width of the sigmoid growth arrest by the inhibitor",
        low_open=True,
    )
    lag_time: float = param("h", 0.0, 240.0, "activation lag: culture age at half growth")
    lag_width: float = param("h", 0.0, 100.0, "width of the lag sigmoid", low_open=True)
    death_rate_basal: float = param("1/h", 0.0, 0.1, "basal specific death rate")
    death_rate_lactate: float = param("1/h", 0.0, 0.5, "maximum lactate-driven death rate")
    death_lactate_half: float = param(
        "mM", 0.0, 500.0, "lactate at half of lactate death", low_open=True
    )
    death_rate_exhaustion: float = param("1/h", 0.0, 0.5, "maximum exhaustion-driven death rate")
    death_exhaustion_half: float = param(
        "1e6 cells*h/mL", 0.0, 1e5, "inhibitor at half of exhaustion death", low_open=True
    )
    death_rate_starvation: float = param("1/h", 0.0, 1.0, "death rate without glucose")
    starvation_glucose: float = param("mM", 0.0, 20.0, "glucose at half of starvation death")
    starvation_width: float = param(
        "mM", 0.0, 10.0, "width of the starvation sigmoid", low_open=True
    )
    lysis_rate: float = param("1/h", 0.0, 0.5, "lysis of dead cells")
    yield_cells_glucose: float = param(
        "1e9 cells/mmol", 0.0, 100.0, "cells formed per glucose consumed", low_open=True
    )
    glucose_maintenance: float = param("mmol/(1e9 cells*h)", 0.0, 1.0, "glucose maintenance uptake")
    yield_lactate_glucose: float = param("mol/mol", 0.0, 2.0, "lactate formed per glucose")
    il2_uptake: float = param("IU/(1e6 cells*h)", 0.0, 100.0, "cell-specific IL-2 consumption")
    il2_decay: float = param("1/h", 0.0, 1.0, "first-order IL-2 degradation")


@dataclasses.dataclass(frozen=True)
class TCellProcess:
    """Process recipe and specification: vessel, media, initial culture, input bounds, limits."""

    working_volume: float = param("L", 0.0, 1000.0, "working volume at inoculation", low_open=True)
    seeding_density: float = param(
        "1e6 cells/mL", 0.0, 100.0, "viable cells at inoculation", low_open=True
    )
    seeding_viability: float = param("1", 0.0, 1.0, "viability at inoculation", low_open=True)
    media_glucose: float = param("mM", 0.0, 100.0, "glucose in fresh perfusion media")
    media_il2: float = param("IU/mL", 0.0, 5000.0, "IL-2 in fresh perfusion media")
    glucose_stock: float = param("mM", 0.0, 6000.0, "glucose in the feed stock", low_open=True)
    perfusion_max: float = param("1/d", 0.0, 20.0, "maximum perfusion rate", low_open=True)
    perfusion_rate_limit: float = param(
        "1/d per h", 0.0, 20.0, "maximum change of perfusion per hour", low_open=True
    )
    glucose_feed_max: float = param("mL/h", 0.0, 1000.0, "maximum glucose stock feed")
    il2_addition_max: float = param("kIU/h", 0.0, 1e4, "maximum IL-2 addition rate")
    glucose_low_soft: float = param("mM", 0.0, 50.0, "soft lower glucose limit")
    glucose_low_hard: float = param("mM", 0.0, 50.0, "hard lower glucose limit")
    glucose_high_hard: float = param("mM", 0.0, 200.0, "hard upper glucose limit", low_open=True)
    lactate_high_soft: float = param("mM", 0.0, 200.0, "soft upper lactate limit", low_open=True)
    lactate_high_hard: float = param("mM", 0.0, 200.0, "hard upper lactate limit", low_open=True)
    volume_max: float = param("L", 0.0, 1000.0, "maximum working volume", low_open=True)
    dose_cells: float = param(
        "1e9 cells", 0.0, 1e4, "patient dose (total viable cells)", low_open=True
    )
    harvest_time: float = param("h", 0.0, 1000.0, "scheduled harvest (culture age)", low_open=True)


class TCellExpansionModel(MechanisticModel[TCellParameters]):
    """T-cell expansion in a perfusion bioreactor with cell retention.

    States: viable_cells, dead_cells, glucose, lactate, il2, inhibitor, volume.
    Inputs: perfusion_rate, glucose_feed, il2_addition.
    Rates: growth_rate, death_rate, glucose_uptake, lactate_production, il2_uptake.

    Media composition and feed stock come from the :class:`TCellProcess`.
    """

    name = "tcell"
    states = (
        VariableSpec("viable_cells", "1e6 cells/mL", "viable cell density"),
        VariableSpec("dead_cells", "1e6 cells/mL", "dead (non-lysed) cell density"),
        VariableSpec("glucose", "mM", "glucose concentration"),
        VariableSpec("lactate", "mM", "lactate concentration"),
        VariableSpec("il2", "IU/mL", "interleukin-2 concentration"),
        VariableSpec(
            "inhibitor", "1e6 cells*h/mL", "integral of viable cell density (exhaustion surrogate)"
        ),
        VariableSpec("volume", "L", "working volume", low=0.0),
    )
    inputs = (
        VariableSpec("perfusion_rate", "1/d", "media exchange, vessel volumes per day"),
        VariableSpec("glucose_feed", "mL/h", "feed of concentrated glucose stock"),
        VariableSpec("il2_addition", "kIU/h", "IL-2 addition"),
    )
    rate_specs = (
        VariableSpec("growth_rate", "1/h", "specific growth rate", low=0.0),
        VariableSpec("death_rate", "1/h", "specific death rate", low=0.0),
        VariableSpec("glucose_uptake", "mmol/(1e9 cells*h)", "specific glucose uptake"),
        VariableSpec(
            "lactate_production",
            "mmol/(1e9 cells*h)",
            "specific lactate production",
            low=float("-inf"),
        ),
        VariableSpec("il2_uptake", "IU/(1e6 cells*h)", "specific IL-2 uptake"),
    )

    def __init__(self, parameters: TCellParameters, process: TCellProcess) -> None:
        super().__init__(parameters)
        self.process = process

    # Kinetics -------------------------------------------------------------------------
    def growth_factors(self, t: Any, x: Sequence[Any], p: Any, ops: Any) -> dict[str, Any]:
        """The multiplicative factors of the growth rate (each in [0, 1])."""
        glucose = ops.fmax(x[2], 0.0)
        lactate = ops.fmax(x[3], 0.0)
        il2 = ops.fmax(x[4], 0.0)
        return {
            "glucose": glucose / (p.glucose_half_saturation + glucose),
            "lactate": p.lactate_inhibition / (p.lactate_inhibition + lactate),
            "il2": il2 / (p.il2_half_saturation + il2),
            "exhaustion": ops.logistic(-(x[5] - p.exhaustion_threshold) / p.exhaustion_width),
            "lag": ops.logistic((t - p.lag_time) / p.lag_width),
        }

    def rates(self, t: Any, x: Sequence[Any], u: Sequence[Any], p: Any, ops: Any) -> dict[str, Any]:
        f = self.growth_factors(t, x, p, ops)
        mu = p.mu_max * f["glucose"] * f["lactate"] * f["il2"] * f["exhaustion"] * f["lag"]
        glucose = ops.fmax(x[2], 0.0)
        lactate = ops.fmax(x[3], 0.0)
        inhibitor = ops.fmax(x[5], 0.0)
        death = (
            p.death_rate_basal
            + p.death_rate_lactate * lactate**2 / (p.death_lactate_half**2 + lactate**2)
            + p.death_rate_exhaustion * inhibitor / (p.death_exhaustion_half + inhibitor)
            + p.death_rate_starvation
            * ops.logistic(-(glucose - p.starvation_glucose) / p.starvation_width)
        )
        # Uptake stops with glucose itself (Monod switch at 0.1 mM) so glucose stays >= 0.
        uptake = (mu / p.yield_cells_glucose + p.glucose_maintenance) * glucose / (0.1 + glucose)
        il2 = ops.fmax(x[4], 0.0)
        return {
            "growth_rate": mu,
            "death_rate": death,
            "glucose_uptake": uptake,
            "lactate_production": p.yield_lactate_glucose * uptake,
            "il2_uptake": p.il2_uptake * il2 / (p.il2_half_saturation + il2),
        }

    # Mass balances --------------------------------------------------------------------
    def balances(
        self, t: Any, x: Sequence[Any], u: Sequence[Any], r: Mapping[str, Any], p: Any, ops: Any
    ) -> list[Any]:
        viable, dead, glucose, lactate, il2, _inhibitor, volume = x
        perfusion, feed, il2_add = u
        q = self.process
        d_perf = perfusion / 24.0  # 1/d -> 1/h; permeate is cell-free (full retention)
        d_feed = feed / 1000.0 / volume  # mL/h of stock -> 1/h dilution by the feed volume
        return [
            (r["growth_rate"] - r["death_rate"] - d_feed) * viable,
            r["death_rate"] * viable - p.lysis_rate * dead - d_feed * dead,
            -r["glucose_uptake"] * viable
            + d_perf * (q.media_glucose - glucose)
            + d_feed * (q.glucose_stock - glucose),
            r["lactate_production"] * viable - d_perf * lactate - d_feed * lactate,
            -r["il2_uptake"] * viable
            - p.il2_decay * il2
            + d_perf * (q.media_il2 - il2)
            + il2_add / volume
            - d_feed * il2,
            viable,
            feed / 1000.0,
        ]

    # Helpers --------------------------------------------------------------------------
    def initial_state(self, viability: float | None = None) -> dict[str, float]:
        """Inoculation state from the process specification (viability overrides it)."""
        q = self.process
        v = q.seeding_viability if viability is None else viability
        return {
            "viable_cells": q.seeding_density,
            "dead_cells": q.seeding_density * (1.0 - v) / v,
            "glucose": q.media_glucose,
            "lactate": 0.0,
            "il2": q.media_il2,
            "inhibitor": 0.0,
            "volume": q.working_volume,
        }

    def operating_bounds(self) -> dict[str, tuple[float, float]]:
        """Input bounds of the process specification."""
        q = self.process
        return {
            "perfusion_rate": (0.0, q.perfusion_max),
            "glucose_feed": (0.0, q.glucose_feed_max),
            "il2_addition": (0.0, q.il2_addition_max),
        }


def load_tcell_parameters(path: str | Path | None = None) -> tuple[TCellParameters, ParameterFile]:
    """Load T-cell kinetics (default: the calibrated nominal set)."""
    src = Path(str(DATA / "tcell_nominal.toml")) if path is None else Path(path)
    return load_parameters(TCellParameters, src, model="tcell")


def load_tcell_process(path: str | Path | None = None) -> tuple[TCellProcess, ParameterFile]:
    """Load the T-cell process specification (default: 1 L perfusion CAR-T process)."""
    src = Path(str(DATA / "tcell_process.toml")) if path is None else Path(path)
    return load_parameters(TCellProcess, src, model="tcell-process")

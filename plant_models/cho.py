"""CHO fed-batch (reference model 2 of domain.md): Kontoravdi et al. 2010 as coded by
Ohkubo et al. 2023 (repository kkunida/202212_Ohkubo_bioRxiv, Kontoravdi2010/stateFcn).

Canonical units: time h; cells 1e9 cells/L (= 1e6 cells/mL, the T-cell unit);
metabolites mM; volume L; feed L/h. Yields and specific rates are rescaled from the
published per-cell units by 1e9 (docs/models.md).
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
    "CHOFedBatchModel",
    "CHOParameters",
    "CHOProcess",
    "load_cho_parameters",
    "load_cho_process",
]

DATA = resources.files("plant_models") / "data"


@dataclasses.dataclass(frozen=True)
class CHOParameters:
    """Kontoravdi 2010 / Ohkubo 2023 kinetic parameters (cells in 1e9 cells)."""

    mu_max: float = param("1/h", 0.0, 0.5, "maximum specific growth rate", low_open=True)
    mu_d_max: float = param("1/h", 0.0, 0.5, "maximum specific death rate")
    k_glucose: float = param("mM", 0.0, 50.0, "Monod constant of glucose", low_open=True)
    k_glutamine: float = param("mM", 0.0, 50.0, "Monod constant of glutamine", low_open=True)
    ki_lactate: float = param("mM", 0.0, 2000.0, "lactate inhibition constant", low_open=True)
    ki_ammonia: float = param("mM", 0.0, 500.0, "ammonia inhibition constant", low_open=True)
    kd_ammonia: float = param("mM", 0.0, 100.0, "ammonia constant of death", low_open=True)
    death_hill: float = param(
        "1", 0.0, 10.0, "Hill exponent of ammonia-driven death", low_open=True
    )
    lysis_rate: float = param("1/h", 0.0, 1.0, "lysis of dead cells")
    yield_cells_glucose: float = param(
        "1e9 cells/mmol", 0.0, 100.0, "cells per glucose", low_open=True
    )
    yield_cells_glutamine: float = param(
        "1e9 cells/mmol", 0.0, 100.0, "cells per glutamine", low_open=True
    )
    glucose_maintenance: float = param("mmol/(1e9 cells*h)", 0.0, 1.0, "glucose maintenance uptake")
    glutamine_maintenance_max: float = param(
        "mmol/(1e9 cells*h)", 0.0, 1.0, "a1: maximum glutamine maintenance uptake"
    )
    glutamine_maintenance_half: float = param(
        "mM", 0.0, 100.0, "a2: glutamine at half maintenance", low_open=True
    )
    yield_lactate_glucose: float = param("mol/mol", 0.0, 5.0, "lactate per glucose")
    yield_ammonia_glutamine: float = param("mol/mol", 0.0, 5.0, "ammonia per glutamine")
    glutamine_degradation: float = param("1/h", 0.0, 1.0, "glutamine decay to ammonia")


@dataclasses.dataclass(frozen=True)
class CHOProcess:
    """Fed-batch recipe and specification."""

    initial_volume: float = param("L", 0.0, 20000.0, "volume at inoculation", low_open=True)
    seeding_density: float = param(
        "1e9 cells/L", 0.0, 100.0, "viable cells at inoculation", low_open=True
    )
    initial_glucose: float = param("mM", 0.0, 200.0, "glucose at inoculation")
    initial_glutamine: float = param("mM", 0.0, 100.0, "glutamine at inoculation")
    initial_lactate: float = param("mM", 0.0, 200.0, "lactate at inoculation")
    initial_ammonia: float = param("mM", 0.0, 100.0, "ammonia at inoculation")
    feed_glucose: float = param("mM", 0.0, 5000.0, "glucose in the feed")
    feed_glutamine: float = param("mM", 0.0, 1000.0, "glutamine in the feed")
    feed_max: float = param("L/h", 0.0, 1000.0, "maximum feed rate", low_open=True)
    feed_rate_limit: float = param(
        "L/h per h", 0.0, 1000.0, "maximum feed change per hour", low_open=True
    )
    volume_max: float = param("L", 0.0, 20000.0, "maximum volume", low_open=True)
    glucose_low_hard: float = param("mM", 0.0, 50.0, "hard lower glucose limit")
    lactate_high_soft: float = param("mM", 0.0, 500.0, "soft upper lactate limit", low_open=True)
    lactate_high_hard: float = param("mM", 0.0, 500.0, "hard upper lactate limit", low_open=True)
    ammonia_high_hard: float = param("mM", 0.0, 100.0, "hard upper ammonia limit", low_open=True)
    harvest_time: float = param("h", 0.0, 1000.0, "end of the fed-batch", low_open=True)


class CHOFedBatchModel(MechanisticModel[CHOParameters]):
    """CHO fed-batch: states viable_cells, total_cells, glucose, glutamine, lactate, ammonia,
    volume; input feed_rate. Rates: growth_rate, death_rate, glucose_uptake,
    glutamine_uptake."""

    name = "cho"
    states = (
        VariableSpec("viable_cells", "1e9 cells/L", "viable cell density"),
        VariableSpec("total_cells", "1e9 cells/L", "total (viable and dead) cell density"),
        VariableSpec("glucose", "mM", "glucose"),
        VariableSpec("glutamine", "mM", "glutamine"),
        VariableSpec("lactate", "mM", "lactate"),
        VariableSpec("ammonia", "mM", "ammonia"),
        VariableSpec("volume", "L", "volume"),
    )
    inputs = (VariableSpec("feed_rate", "L/h", "feed of concentrated medium"),)
    rate_specs = (
        VariableSpec("growth_rate", "1/h", "specific growth rate"),
        VariableSpec("death_rate", "1/h", "specific death rate"),
        VariableSpec("glucose_uptake", "mmol/(1e9 cells*h)", "specific glucose uptake"),
        VariableSpec("glutamine_uptake", "mmol/(1e9 cells*h)", "specific glutamine uptake"),
    )

    def __init__(self, parameters: CHOParameters, process: CHOProcess) -> None:
        super().__init__(parameters)
        self.process = process

    def rates(self, t: Any, x: Sequence[Any], u: Sequence[Any], p: Any, ops: Any) -> dict[str, Any]:
        glc = ops.fmax(x[2], 0.0)
        gln = ops.fmax(x[3], 0.0)
        lac = ops.fmax(x[4], 0.0)
        amm = ops.fmax(x[5], 1e-9)
        mu = (
            p.mu_max
            * glc
            / (p.k_glucose + glc)
            * gln
            / (p.k_glutamine + gln)
            * p.ki_lactate
            / (p.ki_lactate + lac)
            * p.ki_ammonia
            / (p.ki_ammonia + amm)
        )
        # mu_d = mu_d_max / (1 + (K_d_Amm/Amm)^n), written as Amm^n/(Amm^n + K^n) (same value)
        amm_n = amm**p.death_hill
        mu_d = p.mu_d_max * amm_n / (amm_n + p.kd_ammonia**p.death_hill)
        # Uptakes switch off with their substrate (as in the reference, which clips at 0).
        q_glc = (mu / p.yield_cells_glucose + p.glucose_maintenance) * glc / (1e-3 + glc)
        m_gln = p.glutamine_maintenance_max * gln / (p.glutamine_maintenance_half + gln)
        q_gln = mu / p.yield_cells_glutamine + m_gln
        return {
            "growth_rate": mu,
            "death_rate": mu_d,
            "glucose_uptake": q_glc,
            "glutamine_uptake": q_gln,
        }

    def balances(
        self, t: Any, x: Sequence[Any], u: Sequence[Any], r: Mapping[str, Any], p: Any, ops: Any
    ) -> list[Any]:
        xv, xt, glc, gln, lac, amm, vol = x
        (feed,) = u
        d = feed / vol
        q = self.process
        return [
            (r["growth_rate"] - r["death_rate"] - d) * xv,
            r["growth_rate"] * xv - d * xt - p.lysis_rate * (xt - xv),
            -r["glucose_uptake"] * xv + d * (q.feed_glucose - glc),
            -r["glutamine_uptake"] * xv
            + d * (q.feed_glutamine - gln)
            - p.glutamine_degradation * gln,
            p.yield_lactate_glucose * r["glucose_uptake"] * xv - d * lac,
            p.yield_ammonia_glutamine * r["glutamine_uptake"] * xv
            - d * amm
            + p.glutamine_degradation * gln,
            feed,
        ]

    def initial_state(self, viability: float | None = None) -> dict[str, float]:
        q = self.process
        v = 1.0 if viability is None else viability
        return {
            "viable_cells": q.seeding_density,
            "total_cells": q.seeding_density / v,
            "glucose": q.initial_glucose,
            "glutamine": q.initial_glutamine,
            "lactate": q.initial_lactate,
            "ammonia": q.initial_ammonia,
            "volume": q.initial_volume,
        }

    def operating_bounds(self) -> dict[str, tuple[float, float]]:
        return {"feed_rate": (0.0, self.process.feed_max)}


def load_cho_parameters(path: str | Path | None = None) -> tuple[CHOParameters, ParameterFile]:
    src = Path(str(DATA / "cho_kontoravdi2010.toml")) if path is None else Path(path)
    return load_parameters(CHOParameters, src, model="cho")


def load_cho_process(path: str | Path | None = None) -> tuple[CHOProcess, ParameterFile]:
    src = Path(str(DATA / "cho_process.toml")) if path is None else Path(path)
    return load_parameters(CHOProcess, src, model="cho-process")

"""The Amribt et al. 2013 CHO fed-batch kinetics with a product state, as a hmpc model.

Amribt, Niu and Bogaerts (2013), Biochem. Eng. J. 70:196-209: overflow metabolism of
glucose and glutamine. Glucose and glutamine are taken up in proportion to saturating
kinetics; what exceeds the cells' oxidative capacity (``glucose_oxidation_max``,
``glutamine_oxidation_max``) overflows to lactate and ammonia. The form is the one of the
Bioprocess Library (BPL) implementation by Jan Peter Axelsson (repository
janpeter19/BPL_CHO_Fedbatch, commit 409ddb5), which adds a recombinant product
(Luedeking-Piret: ``alpha * mu + beta``); its FMU is vendored in this package (fmu/) and
the equations below reproduce it.

Canonical units: time h; cells 1e9 cells/L (= 1e6 cells/mL, the FMU's unit); glucose,
glutamine, lactate, ammonia mM; product mg/L (the FMU labels it mM, but its production
constant ``beta`` is in ng/(1e6 cells h) = mg/(1e9 cells h) on cells in 1e6 cells/mL);
volume L; feed L/h. Specific rates are per 1e9 viable cells.

The model is written once against the ``ops`` namespace: the CasADi dynamics of the MPC
and the numpy right-hand side of the simulator are the same equations.
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
    "AmribtModel",
    "AmribtParameters",
    "AmribtProcess",
    "load_amribt_parameters",
    "load_amribt_process",
]

DATA = resources.files("hmpc_amribt") / "data"

#: Fixed stoichiometry of the overflow reactions in the BPL implementation (not parameters
#: there): lactate per glucose overflowed, lactate and ammonia per glutamine overflowed
#: (mol/mol).
LACTATE_PER_GLUCOSE_OVERFLOW = 2.0
LACTATE_PER_GLUTAMINE_OVERFLOW = 0.5
AMMONIA_PER_GLUTAMINE_OVERFLOW = 1.0


@dataclasses.dataclass(frozen=True)
class AmribtParameters:
    """Amribt 2013 kinetic parameters (cells in 1e9 cells; the BPL symbol in brackets)."""

    glucose_uptake_max: float = param(
        "mmol/(1e9 cells*h)", 0.0, 10.0, "qG_max1: maximum glucose uptake", low_open=True
    )
    glucose_oxidation_max: float = param(
        "mmol/(1e9 cells*h)", 0.0, 10.0, "qG_max2: oxidative capacity for glucose", low_open=True
    )
    glucose_maintenance: float = param("mmol/(1e9 cells*h)", 0.0, 1.0, "mG: glucose maintenance")
    k_glucose: float = param("mM", 0.0, 100.0, "KG: Monod constant of glucose", low_open=True)
    k_glutamine_glucose: float = param(
        "mM", 0.0, 100.0, "KGn1: glutamine constant of glucose uptake", low_open=True
    )
    glutamine_uptake_max: float = param(
        "mmol/(1e9 cells*h)", 0.0, 10.0, "qGn_max1: maximum glutamine uptake", low_open=True
    )
    glutamine_oxidation_max: float = param(
        "mmol/(1e9 cells*h)",
        0.0,
        10.0,
        "qGn_max2: oxidative capacity for glutamine",
        low_open=True,
    )
    glutamine_maintenance: float = param(
        "mmol/(1e9 cells*h)", 0.0, 1.0, "mGn: glutamine maintenance"
    )
    k_glutamine: float = param("mM", 0.0, 100.0, "KGn: Monod constant of glutamine", low_open=True)
    ki_ammonia: float = param(
        "mM", 0.0, 500.0, "KN: ammonia inhibition of glutamine uptake", low_open=True
    )
    yield_cells_glucose: float = param(
        "1e9 cells/mmol", 0.0, 100.0, "a: cells per glucose oxidised", low_open=True
    )
    yield_lactate_glucose: float = param("mol/mol", 0.0, 5.0, "b: lactate per glucose oxidised")
    yield_cells_glutamine: float = param(
        "1e9 cells/mmol", 0.0, 100.0, "cc: cells per glutamine oxidised", low_open=True
    )
    yield_ammonia_glutamine: float = param("mol/mol", 0.0, 5.0, "d: ammonia per glutamine oxidised")
    mu_d_max: float = param("1/h", 0.0, 1.0, "mu_d_max: maximum specific death rate")
    kd_glucose: float = param(
        "mM", 0.0, 100.0, "KGd: glucose constant of starvation death", low_open=True
    )
    kd_glutamine: float = param(
        "mM", 0.0, 100.0, "KGnd: glutamine constant of starvation death", low_open=True
    )
    product_growth_associated: float = param(
        "mg/(1e9 cells)", 0.0, 100.0, "alpha: product per new cell (Luedeking-Piret)"
    )
    product_non_growth: float = param(
        "mg/(1e9 cells*h)", 0.0, 100.0, "beta: product per cell and hour (Luedeking-Piret)"
    )


@dataclasses.dataclass(frozen=True)
class AmribtProcess:
    """The fed-batch: inoculum, feed composition, limits and harvest."""

    initial_volume: float = param("L", 0.0, 20000.0, "volume at inoculation", low_open=True)
    seeding_density: float = param(
        "1e9 cells/L", 0.0, 100.0, "viable cells at inoculation", low_open=True
    )
    initial_glucose: float = param("mM", 0.0, 200.0, "glucose at inoculation")
    initial_glutamine: float = param("mM", 0.0, 100.0, "glutamine at inoculation")
    initial_lactate: float = param("mM", 0.0, 200.0, "lactate at inoculation")
    initial_ammonia: float = param("mM", 0.0, 100.0, "ammonia at inoculation")
    initial_product: float = param("mg/L", 0.0, 10000.0, "product at inoculation")
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


class AmribtModel(MechanisticModel[AmribtParameters]):
    """Amribt 2013 CHO fed-batch with product.

    States: viable_cells, dead_cells (1e9 cells/L), glucose, glutamine, lactate, ammonia
    (mM), product (mg/L), volume (L). Input: feed_rate (L/h) of a feed with the process's
    glucose and glutamine. Rates (per 1e9 viable cells): growth_rate, death_rate (1/h),
    glucose_uptake, glutamine_uptake, lactate_production, ammonia_production
    (mmol/(1e9 cells*h)).

    Kinetics (concentrations clipped at 0)::

        qG1  = qG_max1 G/(G+KG) Gn/(Gn+KGn1)       glucose uptake capacity
        qGn1 = qGn_max1 Gn/(Gn+KGn) KN/(KN+N)      glutamine uptake capacity
        qG   = min(qG1, qG_max2),  qG_over  = qG1 - qG      oxidised / overflowed
        qGn  = min(qGn1, qGn_max2), qGn_over = qGn1 - qGn
        mu   = a qG + cc qGn
        mu_d = mu_d_max KGd/(KGd+G) KGnd/(KGnd+Gn)
        glucose uptake   = qG1 + min(mG, G)        (maintenance stops with the substrate,
        glutamine uptake = qGn1 + min(mGn, Gn)      as in the BPL code: numerically in mM)
        lactate  = b qG + 2 qG_over + 0.5 qGn_over
        ammonia  = d qGn + qGn_over
        product  = alpha mu + beta

    The balances use the (possibly GP-corrected) ``growth_rate`` for cells and product.
    The BPL model's lysed cells are left out: their lysis and toxicity constants are 0 in
    the author's set, so that state stays 0.
    """

    name = "amribt"
    states = (
        VariableSpec("viable_cells", "1e9 cells/L", "viable cell density"),
        VariableSpec("dead_cells", "1e9 cells/L", "dead cell density"),
        VariableSpec("glucose", "mM", "glucose"),
        VariableSpec("glutamine", "mM", "glutamine"),
        VariableSpec("lactate", "mM", "lactate"),
        VariableSpec("ammonia", "mM", "ammonia"),
        VariableSpec("product", "mg/L", "recombinant product"),
        VariableSpec("volume", "L", "broth volume"),
    )
    inputs = (VariableSpec("feed_rate", "L/h", "feed of glucose and glutamine medium"),)
    rate_specs = (
        VariableSpec("growth_rate", "1/h", "specific growth rate"),
        VariableSpec("death_rate", "1/h", "specific death rate"),
        VariableSpec("glucose_uptake", "mmol/(1e9 cells*h)", "specific glucose uptake"),
        VariableSpec("glutamine_uptake", "mmol/(1e9 cells*h)", "specific glutamine uptake"),
        VariableSpec("lactate_production", "mmol/(1e9 cells*h)", "specific lactate production"),
        VariableSpec("ammonia_production", "mmol/(1e9 cells*h)", "specific ammonia production"),
    )

    def __init__(self, parameters: AmribtParameters, process: AmribtProcess) -> None:
        super().__init__(parameters)
        self.process = process

    def rates(self, t: Any, x: Sequence[Any], u: Sequence[Any], p: Any, ops: Any) -> dict[str, Any]:
        glc = ops.fmax(x[2], 0.0)
        gln = ops.fmax(x[3], 0.0)
        amm = ops.fmax(x[5], 0.0)
        q_glc_cap = (
            p.glucose_uptake_max * glc / (glc + p.k_glucose) * gln / (gln + p.k_glutamine_glucose)
        )
        q_gln_cap = (
            p.glutamine_uptake_max
            * gln
            / (gln + p.k_glutamine)
            * p.ki_ammonia
            / (p.ki_ammonia + amm)
        )
        q_glc = ops.fmin(q_glc_cap, p.glucose_oxidation_max)
        q_gln = ops.fmin(q_gln_cap, p.glutamine_oxidation_max)
        glc_over = q_glc_cap - q_glc
        gln_over = q_gln_cap - q_gln
        mu = p.yield_cells_glucose * q_glc + p.yield_cells_glutamine * q_gln
        mu_d = (
            p.mu_d_max
            * p.kd_glucose
            / (p.kd_glucose + glc)
            * p.kd_glutamine
            / (p.kd_glutamine + gln)
        )
        return {
            "growth_rate": mu,
            "death_rate": mu_d,
            "glucose_uptake": q_glc_cap + ops.fmin(p.glucose_maintenance, glc),
            "glutamine_uptake": q_gln_cap + ops.fmin(p.glutamine_maintenance, gln),
            "lactate_production": p.yield_lactate_glucose * q_glc
            + LACTATE_PER_GLUCOSE_OVERFLOW * glc_over
            + LACTATE_PER_GLUTAMINE_OVERFLOW * gln_over,
            "ammonia_production": p.yield_ammonia_glutamine * q_gln
            + AMMONIA_PER_GLUTAMINE_OVERFLOW * gln_over,
        }

    def balances(
        self, t: Any, x: Sequence[Any], u: Sequence[Any], r: Mapping[str, Any], p: Any, ops: Any
    ) -> list[Any]:
        xv, xd, glc, gln, lac, amm, prod, vol = x
        (feed,) = u
        d = feed / vol
        q = self.process
        mu = r["growth_rate"]
        return [
            (mu - r["death_rate"] - d) * xv,
            r["death_rate"] * xv - d * xd,
            -r["glucose_uptake"] * xv + d * (q.feed_glucose - glc),
            -r["glutamine_uptake"] * xv + d * (q.feed_glutamine - gln),
            r["lactate_production"] * xv - d * lac,
            r["ammonia_production"] * xv - d * amm,
            (p.product_growth_associated * mu + p.product_non_growth) * xv - d * prod,
            feed,
        ]

    def initial_state(self, viability: float | None = None) -> dict[str, float]:
        """The inoculum of the process specification (``viability`` sets dead cells)."""
        q = self.process
        v = 1.0 if viability is None else viability
        return {
            "viable_cells": q.seeding_density,
            "dead_cells": q.seeding_density * (1.0 - v) / v,
            "glucose": q.initial_glucose,
            "glutamine": q.initial_glutamine,
            "lactate": q.initial_lactate,
            "ammonia": q.initial_ammonia,
            "product": q.initial_product,
            "volume": q.initial_volume,
        }

    def operating_bounds(self) -> dict[str, tuple[float, float]]:
        """Input -> (low, high) of the process specification."""
        return {"feed_rate": (0.0, self.process.feed_max)}


def load_amribt_parameters(
    path: str | Path | None = None,
) -> tuple[AmribtParameters, ParameterFile]:
    """Kinetics from a parameter file (default: the author's lab set, data/amribt_lab.toml)."""
    src = Path(str(DATA / "amribt_lab.toml")) if path is None else Path(path)
    return load_parameters(AmribtParameters, src, model="amribt")


def load_amribt_process(path: str | Path | None = None) -> tuple[AmribtProcess, ParameterFile]:
    """The process specification (default: data/amribt_process.toml)."""
    src = Path(str(DATA / "amribt_process.toml")) if path is None else Path(path)
    return load_parameters(AmribtProcess, src, model="amribt-process")

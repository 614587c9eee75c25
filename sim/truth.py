"""Truth plants: the controller's model structure with its own parameters and the
structural mismatch of domain.md, which no controller model contains.

T cell, beyond the nominal model:
- stronger (Hill-type) lactate inhibition of growth;
- a lactate switch: cells consume lactate when glucose runs low;
- IL-2 depletion: extra IL-2 consumption proportional to growth.
CHO: the published plant-model mismatch of Ohkubo 2023 (the controller's model has mu_max
x 0.9, Ki_Lac x 0.5, Ki_Amm x 0.5 of the truth).
Both take a :class:`VirtualPatient` (growth factor, lag, exhaustion threshold).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from plant_models.cho import CHOFedBatchModel, CHOParameters, CHOProcess
from plant_models.config import ParameterFile, load_parameters, load_toml, param
from plant_models.tcell import TCellExpansionModel, TCellParameters, TCellProcess
from sim.patients import VirtualPatient

__all__ = [
    "TCellTruthModel",
    "TCellTruthParameters",
    "cho_truth_model",
    "load_cho_truth_parameters",
    "load_tcell_truth_parameters",
    "tcell_truth_model",
]

DATA = resources.files("sim") / "data"


@dataclasses.dataclass(frozen=True)
class TCellTruthParameters(TCellParameters):
    """Truth kinetics: the nominal fields plus the structure the controller model lacks."""

    lactate_inhibition_hill: float = param("1", 1.0, 6.0, "Hill exponent of lactate inhibition")
    lactate_consumption_max: float = param(
        "mmol/(1e9 cells*h)", 0.0, 1.0, "maximum lactate consumption when glucose is low"
    )
    lactate_switch_glucose: float = param(
        "mM", 0.0, 50.0, "glucose below which cells switch to lactate", low_open=True
    )
    il2_growth_uptake: float = param(
        "IU/(1e6 cells)", 0.0, 1000.0, "IL-2 consumed per new cell (depletion by growth)"
    )


#: Values of the truth-only fields that switch the extra structure off.
NEUTRAL_STRUCTURE = {
    "lactate_inhibition_hill": 1.0,
    "lactate_consumption_max": 0.0,
    "lactate_switch_glucose": 1.0,
    "il2_growth_uptake": 0.0,
}


def load_tcell_truth_parameters(
    path: str | Path | None = None,
) -> tuple[TCellTruthParameters, ParameterFile]:
    """Load truth kinetics. A plain ``tcell`` parameter file (the controller's format) is
    accepted too: it runs the truth plant with the extra structure switched off."""
    src = Path(str(DATA / "tcell_truth.toml")) if path is None else Path(path)
    meta = load_toml(src).get("meta", {})
    if isinstance(meta, dict) and meta.get("model") == "tcell":
        base, prov = load_parameters(TCellParameters, src, model="tcell")
        return TCellTruthParameters(**dataclasses.asdict(base), **NEUTRAL_STRUCTURE), prov
    return load_parameters(TCellTruthParameters, src, model="tcell-truth")


def load_cho_truth_parameters(
    path: str | Path | None = None,
) -> tuple[CHOParameters, ParameterFile]:
    src = Path(str(DATA / "cho_truth.toml")) if path is None else Path(path)
    return load_parameters(CHOParameters, src, model="cho")


class TCellTruthModel(TCellExpansionModel):
    """T-cell truth kinetics (same balances as the controller model)."""

    name = "tcell_truth"

    def growth_factors(self, t: Any, x: Sequence[Any], p: Any, ops: Any) -> dict[str, Any]:
        factors = super().growth_factors(t, x, p, ops)
        lactate = ops.fmax(x[3], 0.0)
        n = p.lactate_inhibition_hill
        k_n = p.lactate_inhibition**n
        factors["lactate"] = k_n / (k_n + lactate**n)
        return factors

    def rates(self, t: Any, x: Sequence[Any], u: Sequence[Any], p: Any, ops: Any) -> dict[str, Any]:
        r = super().rates(t, x, u, p, ops)
        glucose = ops.fmax(x[2], 0.0)
        lactate = ops.fmax(x[3], 0.0)
        switch = p.lactate_switch_glucose / (p.lactate_switch_glucose + glucose)
        r["lactate_production"] = r[
            "lactate_production"
        ] - p.lactate_consumption_max * switch**2 * lactate / (1.0 + lactate)
        r["il2_uptake"] = r["il2_uptake"] + p.il2_growth_uptake * r["growth_rate"]
        return r


def tcell_truth_model(
    patient: VirtualPatient, process: TCellProcess, truth: TCellTruthParameters | None = None
) -> TCellTruthModel:
    """The truth plant kinetics of one patient."""
    base = truth if truth is not None else load_tcell_truth_parameters()[0]
    par = dataclasses.replace(
        base,
        mu_max=base.mu_max * patient.growth_factor,
        lag_time=patient.lag_time,
        exhaustion_threshold=base.exhaustion_threshold * patient.exhaustion_factor,
    )
    return TCellTruthModel(par, process)


def cho_truth_model(
    patient: VirtualPatient, process: CHOProcess, truth: CHOParameters | None = None
) -> CHOFedBatchModel:
    """CHO truth kinetics of one clone/batch (the patient's growth factor applies)."""
    base = truth if truth is not None else load_cho_truth_parameters()[0]
    model = CHOFedBatchModel(
        dataclasses.replace(base, mu_max=base.mu_max * patient.growth_factor), process
    )
    model.name = "cho_truth"
    return model

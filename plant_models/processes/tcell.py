"""The T-cell / CAR-T perfusion process as a plug-in (plant_models.process).

Besides the controller's model (plant_models.tcell), it owns the truth plant the simulator
runs: the same balances with the structural mismatch of domain.md that no controller model
contains (stronger, Hill-type lactate inhibition; a lactate switch when glucose runs low;
IL-2 depletion by growth), and the patient's growth factor, lag and exhaustion threshold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from plant_models.adaptation import AdaptedParameter
from plant_models.config import ParameterFile, load_parameters, load_toml, param
from plant_models.process import (
    EstimatorDefaults,
    HardLimit,
    PatientLike,
    ProcessPlugin,
    SensorDefaults,
    SensorNoise,
)
from plant_models.tcell import (
    TCellExpansionModel,
    TCellParameters,
    TCellProcess,
)

__all__ = [
    "NEUTRAL_STRUCTURE",
    "PROCESS",
    "TCellPlugin",
    "TCellRule",
    "TCellTruthModel",
    "TCellTruthParameters",
]

DATA = resources.files("plant_models") / "data"


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


@dataclasses.dataclass(frozen=True)
class TCellRule:
    """The operator's rule for the T-cell process: perfusion follows a cell-specific
    perfusion rate (CSPR) on the measured viable cells, raised when lactate nears its soft
    limit; glucose stock is fed when glucose falls below its target; IL-2 is topped up when
    the assay shows it low."""

    cell_specific_perfusion: float = 0.1  # 1/d per 1e6 cells/mL (100 pL/cell/day)
    minimum_perfusion: float = 0.0
    lactate_target: float = 15.0  # mM, below the 20 mM soft limit
    lactate_gain: float = 0.25  # 1/d per mM above target
    glucose_target: float = 8.0  # mM
    glucose_gain: float = 0.4  # mL/h per mM below target
    il2_target: float = 40.0  # IU/mL
    il2_dose: float = 5.0  # kIU/h while low


class TCellPlugin(ProcessPlugin):
    """T-cell / CAR-T expansion in a perfusion bioreactor with cell retention."""

    name = "tcell"
    model_type = TCellExpansionModel
    parameters_type = TCellParameters
    process_type = TCellProcess
    parameters_path = Path(str(DATA / "tcell_nominal.toml"))
    process_path = Path(str(DATA / "tcell_process.toml"))
    title = "T-cell / CAR-T expansion, perfusion with cell retention"
    default_mpc_config = "mpc_tcell.toml"
    gp_features = ("lactate", "il2", "inhibitor", "culture_age")
    feed_composition = ("media_glucose", "media_il2", "glucose_stock")
    simulated_states = ("viable_cells", "inhibitor")
    sensors = SensorDefaults(
        online={
            "viable_cells": SensorNoise("1e6 cells/mL", 0.02, 0.05),  # capacitance
            "glucose": SensorNoise("mM", 0.2, 0.02),  # Raman / analyser
            "lactate": SensorNoise("mM", 0.3, 0.02),
        },
        assays={
            "viable_cells": SensorNoise("1e6 cells/mL", 0.01, 0.03),  # cell counter
            "viability": SensorNoise("1", 0.01, 0.0),
            "glucose": SensorNoise("mM", 0.1, 0.01),
            "lactate": SensorNoise("mM", 0.1, 0.01),
            "il2": SensorNoise("IU/mL", 1.0, 0.1),  # ELISA
        },
    )
    hard_limits = (
        HardLimit("glucose_low", "glucose", "low", "glucose_low_hard"),
        HardLimit("lactate_high", "lactate", "high", "lactate_high_hard"),
        HardLimit("volume_high", "volume", "high", "volume_max"),
        HardLimit("glucose_high", "glucose", "high", "glucose_high_hard"),
    )
    estimator = EstimatorDefaults(
        # model error the filter expects, per sqrt(h)
        process_noise={
            "viable_cells": (0.002, 0.01),
            "dead_cells": (0.002, 0.01),
            "glucose": (0.05, 0.01),
            "lactate": (0.05, 0.01),
            "il2": (0.5, 0.01),
            "inhibitor": (0.1, 0.005),
            "volume": (1e-4, 0.0),
        },
        physical_ranges={
            "viable_cells": (0.0, 500.0),
            "dead_cells": (0.0, 500.0),
            "glucose": (0.0, 200.0),
            "lactate": (0.0, 200.0),
            "il2": (0.0, 1e4),
            "inhibitor": (0.0, 1e6),
            "volume": (0.0, 1000.0),
            "viability": (0.0, 1.0),
            "total_viable_cells": (0.0, 1e6),
        },
        parameter_factors=("mu_max",),
        online_gains=("viable_cells",),
    )
    rate_limited_inputs: ClassVar[Mapping[str, str]] = {"perfusion_rate": "perfusion_rate_limit"}
    soft_limits: ClassVar[Mapping[str, str]] = {
        "glucose_low": "glucose_low_soft",
        "lactate_high": "lactate_high_soft",
    }
    dose_field = "dose_cells"
    truth_variants: ClassVar[Mapping[str, Path]] = {
        "packaged": Path(str(DATA / "tcell_truth.toml")),
        "lactate20": Path(str(DATA / "tcell_truth_lactate20.toml")),
    }

    def load_truth_parameters(
        self, path: str | Path | None = None
    ) -> tuple[TCellTruthParameters, ParameterFile]:
        """Truth kinetics. A plain T-cell parameter file (the controller's format) is
        accepted too: it runs the truth plant with the extra structure switched off."""
        src = self.truth_variants["packaged"] if path is None else Path(path)
        meta = load_toml(src).get("meta", {})
        if isinstance(meta, dict) and meta.get("model") == self.name:
            base, prov = load_parameters(TCellParameters, src, model=self.name)
            return TCellTruthParameters(**dataclasses.asdict(base), **NEUTRAL_STRUCTURE), prov
        return load_parameters(TCellTruthParameters, src, model="tcell-truth")

    def truth_model(self, patient: PatientLike, process: Any, truth: Any = None) -> TCellTruthModel:
        """The truth plant kinetics of one patient."""
        base = truth if truth is not None else self.load_truth_parameters()[0]
        par = dataclasses.replace(
            base,
            mu_max=base.mu_max * patient.growth_factor,
            lag_time=patient.lag_time,
            exhaustion_threshold=base.exhaustion_threshold * patient.exhaustion_factor,
        )
        return TCellTruthModel(par, process)

    def adapted_parameters(self) -> tuple[AdaptedParameter, ...]:
        """Growth rate (CV 25 %), exhaustion threshold (CV 40 %), activation lag (0-48 h:
        sd 16 h around the nominal 18 h, kept >= 0), the cohort spreads of domain.md."""
        return (
            AdaptedParameter("mu_max", "factor", 0.25),
            AdaptedParameter("exhaustion_threshold", "factor", 0.4),
            AdaptedParameter("lag_time", "shift", 16.0, low=0.0, high=120.0),
        )

    def rule(
        self, values: Mapping[str, float], time_h: float, settings: Any = None
    ) -> dict[str, float]:
        s: TCellRule = settings if settings is not None else TCellRule()
        cells = values.get("viable_cells", 0.0)
        perfusion = max(s.minimum_perfusion, s.cell_specific_perfusion * cells)
        lactate = values.get("lactate", 0.0)
        if lactate > s.lactate_target:
            perfusion += s.lactate_gain * (lactate - s.lactate_target)
        glucose = values.get("glucose", s.glucose_target)
        feed = max(0.0, s.glucose_gain * (s.glucose_target - glucose))
        il2 = values.get("il2")
        il2_add = s.il2_dose if il2 is not None and il2 < s.il2_target else 0.0
        return {"perfusion_rate": perfusion, "glucose_feed": feed, "il2_addition": il2_add}

    def rule_settings(self) -> TCellRule:
        return TCellRule()

    def media_litres(
        self, inputs: Mapping[str, float], values: Mapping[str, float], step_h: float
    ) -> float:
        return (
            inputs["perfusion_rate"] / 24.0 * values["volume"] + inputs["glucose_feed"] / 1000.0
        ) * step_h


PROCESS = TCellPlugin()

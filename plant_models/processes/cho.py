"""The CHO fed-batch process as a plug-in (plant_models.process).

The truth plant the simulator runs is the model with its own kinetics: the published
plant-model mismatch of Ohkubo 2023 (the controller's model has mu_max x 0.9, Ki_Lac x 0.5,
Ki_Amm x 0.5 of the truth), with the clone's growth factor applied.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from plant_models.base import MechanisticModel
from plant_models.cho import CHOFedBatchModel, CHOParameters, CHOProcess
from plant_models.process import (
    EstimatorDefaults,
    HardLimit,
    ProcessPlugin,
    SensorDefaults,
    SensorNoise,
)

__all__ = ["PROCESS", "CHOPlugin", "CHORule"]

DATA = resources.files("plant_models") / "data"


@dataclasses.dataclass(frozen=True)
class CHORule:
    """The operator's rule for the fed-batch: no feed before ``feed_start``, then a base
    feed corrected in proportion to measured glucose below its target."""

    feed_start: float = 48.0  # h
    base_feed: float = 0.001  # L/h
    minimum_feed: float = 0.0005  # L/h
    glucose_target: float = 20.0  # mM
    feed_gain: float = 0.0001  # L/h per mM below target


class CHOPlugin(ProcessPlugin):
    """CHO fed-batch (Kontoravdi 2010 / Ohkubo 2023 kinetics)."""

    name = "cho"
    model_type = CHOFedBatchModel
    parameters_type = CHOParameters
    process_type = CHOProcess
    parameters_path = Path(str(DATA / "cho_kontoravdi2010.toml"))
    process_path = Path(str(DATA / "cho_process.toml"))
    title = "CHO fed-batch, concentrated feed"
    default_mpc_config = "mpc_cho.toml"
    gp_features = ("glucose", "lactate", "ammonia", "culture_age")
    feed_composition = ("feed_glucose", "feed_glutamine")
    simulated_states = ("viable_cells",)
    sensors = SensorDefaults(
        online={
            "viable_cells": SensorNoise("1e9 cells/L", 0.02, 0.05),
            "glucose": SensorNoise("mM", 0.3, 0.02),
            "lactate": SensorNoise("mM", 0.3, 0.02),
        },
        assays={
            "viable_cells": SensorNoise("1e9 cells/L", 0.01, 0.03),
            "viability": SensorNoise("1", 0.01, 0.0),
            "glucose": SensorNoise("mM", 0.1, 0.01),
            "glutamine": SensorNoise("mM", 0.05, 0.02),
            "lactate": SensorNoise("mM", 0.1, 0.01),
            "ammonia": SensorNoise("mM", 0.05, 0.02),
        },
    )
    hard_limits = (
        HardLimit("glucose_low", "glucose", "low", "glucose_low_hard"),
        HardLimit("lactate_high", "lactate", "high", "lactate_high_hard"),
        HardLimit("volume_high", "volume", "high", "volume_max"),
        HardLimit("ammonia_high", "ammonia", "high", "ammonia_high_hard"),
    )
    estimator = EstimatorDefaults(
        process_noise={
            "viable_cells": (0.002, 0.01),
            "total_cells": (0.002, 0.01),
            "glucose": (0.05, 0.01),
            "glutamine": (0.01, 0.01),
            "lactate": (0.05, 0.01),
            "ammonia": (0.01, 0.01),
            "volume": (1e-4, 0.0),
        },
        physical_ranges={
            "viable_cells": (0.0, 100.0),
            "total_cells": (0.0, 200.0),
            "glucose": (0.0, 500.0),
            "glutamine": (0.0, 200.0),
            "lactate": (0.0, 500.0),
            "ammonia": (0.0, 100.0),
            "volume": (0.0, 20000.0),
            "viability": (0.0, 1.0),
            "total_viable_cells": (0.0, 1e6),
        },
        parameter_factors=("mu_max",),
        online_gains=("viable_cells",),
    )
    rate_limited_inputs: ClassVar[Mapping[str, str]] = {"feed_rate": "feed_rate_limit"}
    soft_limits: ClassVar[Mapping[str, str]] = {"lactate_high": "lactate_high_soft"}
    truth_variants: ClassVar[Mapping[str, Path]] = {
        "packaged": Path(str(DATA / "cho_truth.toml")),
    }

    def truth_model(self, patient: Any, process: Any, truth: Any = None) -> MechanisticModel[Any]:
        model = super().truth_model(patient, process, truth)
        model.name = "cho_truth"
        return model

    def derived_values(self, values: Mapping[str, float]) -> dict[str, float]:
        viable, total = float(values["viable_cells"]), float(values["total_cells"])
        return {
            "viability": viable / total if total > 0 else 0.0,
            "total_viable_cells": viable * float(values["volume"]),
        }

    def rule(
        self, values: Mapping[str, float], time_h: float, settings: Any = None
    ) -> dict[str, float]:
        s: CHORule = settings if settings is not None else CHORule()
        if time_h < s.feed_start:
            return {"feed_rate": 0.0}
        error = s.glucose_target - values.get("glucose", s.glucose_target)
        return {"feed_rate": max(s.minimum_feed, s.base_feed + s.feed_gain * error)}

    def rule_settings(self) -> CHORule:
        return CHORule()

    def media_litres(
        self, inputs: Mapping[str, float], values: Mapping[str, float], step_h: float
    ) -> float:
        return inputs["feed_rate"] * step_h


PROCESS = CHOPlugin()

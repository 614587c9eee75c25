"""hmpc_amribt: a site's own process plug-in for hmpc, as a package of its own.

The CHO fed-batch of the Bioprocess Library example (Amribt et al. 2013 kinetics with a
recombinant product, :mod:`hmpc_amribt.model`) registered under the entry point group
``hmpc.processes`` as ``amribt`` (pyproject.toml), so ``hmpc-sim simulate --model amribt``
and ``get_process("amribt")`` find it once the package is installed. It ships its parameter
and process files, its MPC tuning, and the external plant it was written against: the
author's FMU (fmu/, with its attribution and licence) and the variable map that lets
``sim.fmu.FMUPlant`` run it (``hmpc-sim simulate --model amribt --plant fmu:FMU``).

It imports hmpc's ``plant_models`` only: a process plug-in knows nothing of the simulator.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any, ClassVar

from hmpc_amribt.model import (
    AmribtModel,
    AmribtParameters,
    AmribtProcess,
    load_amribt_parameters,
    load_amribt_process,
)
from plant_models.base import MechanisticModel
from plant_models.process import (
    EstimatorDefaults,
    HardLimit,
    PatientLike,
    ProcessPlugin,
    SensorDefaults,
    SensorNoise,
)

__all__ = [
    "FMU_PATH",
    "FMU_VARIABLE_MAP",
    "PROCESS",
    "AmribtModel",
    "AmribtParameters",
    "AmribtPlugin",
    "AmribtProcess",
    "AmribtRule",
    "load_amribt_parameters",
    "load_amribt_process",
]

_PACKAGE = resources.files("hmpc_amribt")
DATA = _PACKAGE / "data"
#: The vendored FMU (FMI 2.0 Model Exchange, Linux x86_64): see fmu/NOTICE.md.
FMU_PATH = Path(str(_PACKAGE / "fmu" / "BPL_CHO_Fedbatch_linux_om_me.fmu"))
#: FMU variable -> plug-in variable map beside it (read by ``sim.fmu.FMUPlant``).
FMU_VARIABLE_MAP = FMU_PATH.with_suffix(".toml")


@dataclasses.dataclass(frozen=True)
class AmribtRule:
    """The operator's rule: no feed before ``feed_start``, then a feed in proportion to the
    measured viable cells (the author's recipe steps the feed up as the cells grow),
    between ``minimum_feed`` and ``maximum_feed``."""

    feed_start: float = 50.0  # h
    cell_specific_feed: float = 0.003  # L/h per 1e9 cells/L
    minimum_feed: float = 0.0012  # L/h
    maximum_feed: float = 0.010  # L/h, keeps the volume below 1.2 L by 150 h


class AmribtPlugin(ProcessPlugin):
    """CHO fed-batch, Amribt 2013 kinetics with product (Bioprocess Library example)."""

    name = "amribt"
    # the model and its files: the generic loaders of ProcessPlugin do the rest
    model_type = AmribtModel
    parameters_type = AmribtParameters
    process_type = AmribtProcess
    parameters_path = Path(str(DATA / "amribt_lab.toml"))
    process_path = Path(str(DATA / "amribt_process.toml"))
    title = "CHO fed-batch, Amribt 2013 overflow kinetics with product (BPL example)"
    default_mpc_config = str(Path(str(DATA / "mpc_amribt.toml")))
    gp_features = ("glucose", "glutamine", "lactate", "culture_age")
    feed_composition = ("feed_glucose", "feed_glutamine")
    correctable_rates = ("growth_rate",)
    simulated_states = ("viable_cells",)
    sensors = SensorDefaults(
        online={
            "viable_cells": SensorNoise("1e9 cells/L", 0.02, 0.05),  # capacitance
            "glucose": SensorNoise("mM", 0.3, 0.02),  # Raman / analyser
            "lactate": SensorNoise("mM", 0.3, 0.02),
        },
        assays={
            "viable_cells": SensorNoise("1e9 cells/L", 0.01, 0.03),  # cell counter
            "viability": SensorNoise("1", 0.01, 0.0),
            "glucose": SensorNoise("mM", 0.1, 0.01),
            "glutamine": SensorNoise("mM", 0.01, 0.02),
            "lactate": SensorNoise("mM", 0.1, 0.01),
            "ammonia": SensorNoise("mM", 0.05, 0.02),
            "product": SensorNoise("mg/L", 0.02, 0.05),  # titre (ELISA / HPLC)
        },
    )
    estimator = EstimatorDefaults(
        # model error the filter expects, per sqrt(h); no estimated parameter factor or
        # probe gain: with assays only every 24 h they would absorb the model's error
        process_noise={
            "viable_cells": (0.002, 0.01),
            "dead_cells": (0.002, 0.01),
            "glucose": (0.05, 0.01),
            "glutamine": (0.01, 0.01),
            "lactate": (0.05, 0.01),
            "ammonia": (0.01, 0.01),
            "product": (0.01, 0.01),
            "volume": (1e-4, 0.0),
        },
        physical_ranges={
            "viable_cells": (0.0, 100.0),
            "dead_cells": (0.0, 100.0),
            "glucose": (0.0, 500.0),
            "glutamine": (0.0, 200.0),
            "lactate": (0.0, 500.0),
            "ammonia": (0.0, 100.0),
            "product": (0.0, 1e5),
            "volume": (0.0, 20000.0),
            "viability": (0.0, 1.0),
        },
    )
    hard_limits = (
        HardLimit("glucose_low", "glucose", "low", "glucose_low_hard"),
        HardLimit("lactate_high", "lactate", "high", "lactate_high_hard"),
        HardLimit("volume_high", "volume", "high", "volume_max"),
        HardLimit("ammonia_high", "ammonia", "high", "ammonia_high_hard"),
    )
    rate_limited_inputs: ClassVar[Mapping[str, str]] = {"feed_rate": "feed_rate_limit"}
    soft_limits: ClassVar[Mapping[str, str]] = {"lactate_high": "lactate_high_soft"}
    truth_variants: ClassVar[Mapping[str, Path]] = {
        "packaged": Path(str(DATA / "amribt_lab.toml")),
    }

    def truth_model(
        self, patient: PatientLike, process: Any, truth: Any = None
    ) -> MechanisticModel[Any]:
        """The virtual plant of one clone: the growth factor scales both cell yields, so the
        growth rate (``a qG + cc qGn``) scales by it and the uptakes do not."""
        base: AmribtParameters = truth if truth is not None else self.load_truth_parameters()[0]
        f = patient.growth_factor
        par = dataclasses.replace(
            base,
            yield_cells_glucose=base.yield_cells_glucose * f,
            yield_cells_glutamine=base.yield_cells_glutamine * f,
        )
        model = AmribtModel(par, process)
        model.name = "amribt_truth"
        return model

    def rule(
        self, values: Mapping[str, float], time_h: float, settings: Any = None
    ) -> dict[str, float]:
        s: AmribtRule = settings if settings is not None else AmribtRule()
        if time_h < s.feed_start:
            return {"feed_rate": 0.0}
        feed = s.cell_specific_feed * values.get("viable_cells", 0.0)
        return {"feed_rate": min(max(feed, s.minimum_feed), s.maximum_feed)}

    def rule_settings(self) -> AmribtRule:
        return AmribtRule()

    def media_litres(
        self, inputs: Mapping[str, float], values: Mapping[str, float], step_h: float
    ) -> float:
        return inputs["feed_rate"] * step_h


PROCESS = AmribtPlugin()

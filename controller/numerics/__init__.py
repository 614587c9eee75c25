"""Pure numerics of the controller (no I/O, no asyncio): measurements and their
validation, the estimator, the MPC and its tuning, the harvest forecast, output limits and the
baseline control laws.

The names below are the public API; the modules are the implementation."""

from __future__ import annotations

from controller.numerics.baselines import (
    Controller,
    LatestValues,
    RecipeController,
    RuleController,
    make_baseline,
)
from controller.numerics.estimator import (
    Estimator,
    EstimatorConfig,
    EstimatorResult,
    load_estimator_config,
)
from controller.numerics.forecast import (
    ForecastConfig,
    HarvestForecast,
    HarvestForecaster,
    InputPlan,
    InputPolicy,
    load_forecast_config,
)
from controller.numerics.limits import OutputLimiter
from controller.numerics.measurements import Measurement
from controller.numerics.mpc import MPCResult, NonlinearMPC, PredictionModel, VectorLayout
from controller.numerics.mpc_config import MPCConfig, load_mpc_config, with_process_limits
from controller.numerics.validation import (
    MeasurementDecision,
    MeasurementValidator,
    ValidationSettings,
)

__all__ = [
    "Controller",
    "Estimator",
    "EstimatorConfig",
    "EstimatorResult",
    "ForecastConfig",
    "HarvestForecast",
    "HarvestForecaster",
    "InputPlan",
    "InputPolicy",
    "LatestValues",
    "MPCConfig",
    "MPCResult",
    "Measurement",
    "MeasurementDecision",
    "MeasurementValidator",
    "NonlinearMPC",
    "OutputLimiter",
    "PredictionModel",
    "RecipeController",
    "RuleController",
    "ValidationSettings",
    "VectorLayout",
    "load_estimator_config",
    "load_forecast_config",
    "load_mpc_config",
    "make_baseline",
    "with_process_limits",
]

"""The deployable control laws behind one protocol, and the factory that builds them.

A control law sees what the plant delivers (measurements with their sample times, never
the truth) and returns the next inputs: ``step(time_h, measurements, previous) -> inputs``
(:class:`controller.numerics.baselines.Controller`). The runtime loop (OPC UA), the in-process
closed loop and the campaigns all drive the same objects.

:class:`EstimatingMPC` is the model-predictive controller as deployed:

1. :class:`controller.numerics.estimator.Estimator` (EKF on the same model) fuses the online probes
   and the late assays and estimates the patient's growth-rate factor;
2. :class:`controller.numerics.mpc.NonlinearMPC` re-optimises from the estimate, with the estimated
   factor as an NLP parameter (``mu_max`` times the factor), so the prediction follows the
   patient rather than the cohort's average;
3. with a hybrid model, the GP residual may learn from the running batch
   (:class:`ResidualLearner`); the MPC then re-reads the residual functions
   (:meth:`NonlinearMPC.refresh_residual`) without rebuilding its NLP.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import casadi as ca
import numpy as np
import numpy.typing as npt

from controller.config_files import config_file
from controller.numerics.baselines import (
    Controller,
    RecipeController,
    make_baseline,
)
from controller.numerics.estimator import (
    Estimator,
    EstimatorConfig,
    EstimatorResult,
    load_estimator_config,
)
from controller.numerics.measurements import Measurement
from controller.numerics.mpc import MPCResult, NonlinearMPC
from controller.numerics.mpc_config import MPCConfig, load_mpc_config, with_process_limits
from plant_models.adaptation import PatientAdaptation
from plant_models.base import MechanisticModel
from plant_models.errors import ConfigError, HmpcError, ModelError
from plant_models.hybrid import HybridModel
from plant_models.process import DEFAULT_PROCESS, get_process

__all__ = [
    "CONTROLLER_KINDS",
    "Controller",
    "ControllerSpec",
    "EstimatingMPC",
    "HybridPredictionModel",
    "PatientParameterLearner",
    "ResidualLearner",
    "RunningBatchLearner",
    "RunningRecord",
    "build_controller",
    "build_model",
    "default_mpc_config",
    "initial_estimate",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: Control laws :func:`build_controller` makes.
CONTROLLER_KINDS = ("recipe", "rule", "mechanistic-mpc", "hybrid-mpc")

#: Absolute floors of the prior standard deviation at inoculation (canonical units).
_PRIOR_FLOOR = {
    "dead_cells": 0.1,
    "glucose": 1.0,
    "lactate": 0.3,
    "il2": 10.0,
    "inhibitor": 1.0,
    "volume": 0.01,
    "ammonia": 0.3,
    "total_cells": 0.05,
}


def initial_estimate(model: Any) -> tuple[dict[str, float], FloatArray]:
    """Prior at inoculation: the process specification, 10 % relative spread (the seeding
    count) with absolute floors for what is less certain (dead cells: viability is known
    only within 70-98 %; media composition to about a millimolar).

    Returns the mean (state name -> value) and the diagonal of the covariance.
    """
    spec = model if hasattr(model, "initial_state") else model.base  # a HybridModel's base
    x0 = dict(spec.initial_state())
    var = []
    for name in model.state_names:
        sd = max(0.1 * abs(float(x0[name])), _PRIOR_FLOOR.get(name, 1e-6))
        var.append(sd**2)
    return x0, np.array(var, dtype=float)


# ------------------------------------------------------------------ hybrid model for the MPC


class HybridPredictionModel:
    """A :class:`plant_models.hybrid.HybridModel` as the MPC's prediction model.

    Offers what :class:`NonlinearMPC` uses for a hybrid model: ``dynamics`` (the full
    hybrid), ``base_dynamics`` (the mechanistic part; both accept symbolic parameters),
    ``residual_mean`` (the correction added to each corrected rate) and ``residual_std``
    (the residual's predictive standard deviation), with ``residual_names`` the corrected
    rates. After the residual learned (``GPResidual.update``) call :meth:`refresh`.
    """

    def __init__(self, hybrid: HybridModel) -> None:
        self.hybrid = hybrid
        self.base = hybrid.base
        self.name = getattr(hybrid, "name", "hybrid")
        self.state_names: tuple[str, ...] = tuple(hybrid.state_names)
        self.input_names: tuple[str, ...] = tuple(hybrid.input_names)
        self.rate_names: tuple[str, ...] = tuple(hybrid.rate_names)
        self.parameters = hybrid.parameters
        self.residual_names: tuple[str, ...] = tuple(c.rate for c in hybrid.corrections)

    def __getattr__(self, name: str) -> Any:
        # process specification helpers (initial_state, operating_bounds, process, ...)
        if name in {"hybrid", "base"}:
            raise AttributeError(name)
        return getattr(self.base, name)

    def refresh(self) -> None:
        """Re-read the residual's data after it learned (arrays only, nothing is rebuilt)."""
        self.hybrid.refresh()

    def dynamics(self, symbolic_parameters: Sequence[str] = ()) -> ca.Function:
        return self.hybrid.dynamics(symbolic_parameters=symbolic_parameters)

    def base_dynamics(self, symbolic_parameters: Sequence[str] = ()) -> ca.Function:
        return self.base.dynamics(symbolic_parameters=symbolic_parameters)

    def residual_data(self) -> FloatArray:
        """Numeric data of the residual (``data`` of :meth:`residual_parametric`), as of the
        hybrid model's last refresh."""
        return self.hybrid.residual_data()

    def residual_parametric(self) -> ca.Function:
        """``(t, x, u, data) -> (mean, std)`` of the corrected rates' residual, built once;
        the MPC passes :meth:`residual_data` as ``data`` (no rebuild when the residual
        learns)."""
        fn = self.hybrid.rate_correction()
        t = ca.MX.sym("t")
        x = ca.MX.sym("x", len(self.state_names))
        u = ca.MX.sym("u", len(self.input_names))
        data = ca.MX.sym("data", fn.size1_in(3))
        mean, var = fn.call([t, x, u, data], True, False)  # inlined: mean and std stay apart
        return ca.Function(
            "residual",
            [t, x, u, data],
            [mean, ca.sqrt(ca.fmax(var, 0.0))],
            ["t", "x", "u", "data"],
            ["mean", "std"],
        )

    def residual_mean(self) -> ca.Function:
        """``(t, x, u) -> mean`` with the current data embedded."""
        return self._embedded(0, "residual_mean", "mean")

    def residual_std(self) -> ca.Function:
        """``(t, x, u) -> std`` with the current data embedded."""
        return self._embedded(1, "residual_std", "std")

    def _embedded(self, index: int, name: str, output: str) -> ca.Function:
        fn = self.residual_parametric()
        t = ca.MX.sym("t")
        x = ca.MX.sym("x", len(self.state_names))
        u = ca.MX.sym("u", len(self.input_names))
        value = fn(t, x, u, ca.DM(self.residual_data()))[index]
        return ca.Function(name, [t, x, u], [value], ["t", "x", "u"], [output])


# ------------------------------------------------------------------ the estimator-fed MPC


#: In-batch learning hook: (time_h, measurements, estimate, inputs applied since the last
#: step) -> True when the model changed.
ResidualLearner = Callable[
    [float, Sequence[Measurement], EstimatorResult, Mapping[str, float]], bool
]


class RunningRecord:
    """The running batch kept as a batch record is (controller/training/batches.py): per step the
    latest accepted online readings, the estimated volume and the inputs applied over the
    step; the accepted assays with their sample times."""

    def __init__(self, input_names: Sequence[str]) -> None:
        self.input_names = tuple(input_names)
        self.rows: list[dict[str, float]] = []
        self.assays: list[dict[str, Any]] = []
        self._latest: dict[str, float] = {}

    def add(
        self,
        time_h: float,
        measurements: Sequence[Measurement],
        estimate: EstimatorResult,
        previous: Mapping[str, float],
    ) -> bool:
        """Add one step; False while the online cells, glucose or lactate are still unseen."""
        # the estimator's accepted measurements (``measurements`` in arrival order, those in
        # another unit converted to the canonical one)
        for m in (d.measurement for d in estimate.accepted):
            if m.source == "assay":
                self.assays.append({"name": m.name, "value": m.value, "sample_time": m.sample_time})
            else:
                self._latest[m.name] = m.value
        if self.rows:  # the inputs held over the interval that ends now
            self.rows[-1].update({n: float(previous.get(n, 0.0)) for n in self.input_names})
        if not all(n in self._latest for n in ("viable_cells", "glucose", "lactate")):
            return False
        row = {
            "time": float(time_h),
            "measured_viable_cells": self._latest["viable_cells"],
            "measured_glucose": self._latest["glucose"],
            "measured_lactate": self._latest["lactate"],
            "volume": float(estimate.state.get("volume", 1.0)),
        }
        row.update({n: float(previous.get(n, 0.0)) for n in self.input_names})
        self.rows.append(row)
        return True

    def batch_record(self) -> Any:
        """The record so far as a :class:`controller.training.batches.BatchRecord`."""
        import pandas as pd

        from controller.training.batches import BatchRecord

        return BatchRecord(
            "running",
            pd.DataFrame(self.rows),
            pd.DataFrame(self.assays, columns=["name", "value", "sample_time"]),
        )


class RunningBatchLearner:
    """Learning during the running batch (docs/hybrid.md): the batch's own growth-rate
    observations condition the residual's batch effect (:meth:`HybridModel.observe`).

    The running record is kept as a batch record is (controller/training/batches.py): per step the
    latest online readings, the estimated volume and the inputs applied over the step; the
    assays with their sample times. Every ``every_h`` the growth-rate observations whose
    ``window_h`` window has closed since the last call are computed exactly as for training
    and observed (relative residual for a multiplicative residual, absolute for additive).
    The residual keeps a bounded number of running points, so the cost per update and the
    size of the exported functions stay fixed.
    """

    def __init__(
        self,
        hybrid: HybridModel,
        *,
        rate: str = "growth_rate",
        window_h: float = 24.0,
        every_h: float = 6.0,
        min_model_rate: float = 0.01,
    ) -> None:
        self.hybrid = hybrid
        self.base = hybrid.base
        self.rate = rate
        self.window_h, self.every_h, self.min_model_rate = window_h, every_h, min_model_rate
        correction = next(c for c in hybrid.corrections if c.rate == rate)
        self.residual = correction.residual
        self.column = "relative_residual" if correction.mode == "multiplicative" else "residual"
        self.record = RunningRecord(self.base.input_names)
        self._seen_until = -math.inf
        self._next_h = -math.inf
        self.observations = 0
        if getattr(self.residual, "has_batch_effect", False):
            hybrid.begin_batch()

    def __call__(
        self,
        time_h: float,
        measurements: Sequence[Measurement],
        estimate: EstimatorResult,
        previous: Mapping[str, float],
    ) -> bool:
        if not self.record.add(time_h, measurements, estimate, previous):
            return False
        if time_h < self._next_h or not getattr(self.residual, "has_batch_effect", False):
            return False
        self._next_h = time_h + self.every_h
        return self._learn(time_h)

    def _learn(self, time_h: float) -> bool:
        from controller.training.batches import growth_rate_observations

        try:
            obs = growth_rate_observations(
                [self.record.batch_record()],
                self.base,
                self.residual.feature_names,
                window_h=self.window_h,
                every_h=self.every_h,
                min_model_rate=self.min_model_rate,
            )
        except (ModelError, ValueError, KeyError) as exc:
            log.info("in-batch learning skipped at %.1f h: %s", time_h, exc)
            return False
        fresh = obs[(obs["available"] > self._seen_until) & (obs["available"] <= time_h + 1e-9)]
        fresh = fresh[np.isfinite(fresh[self.column].to_numpy(float))]
        if fresh.empty:
            return False
        self._seen_until = float(fresh["available"].max())
        X = fresh[list(self.residual.feature_names)].to_numpy(float)
        y = fresh[self.column].to_numpy(float)
        self.hybrid.observe(self.rate, X, y)
        self.observations += len(y)
        log.info(
            "in-batch learning at %.1f h: %d observation(s) of the %s residual (%d so far)",
            time_h,
            len(y),
            self.rate,
            self.observations,
        )
        return True


class PatientParameterLearner:
    """The running batch's patient parameters (growth rate, exhaustion threshold, lag; see
    :mod:`plant_models.adaptation` and docs/hybrid.md), fitted every ``every_h`` hours to
    the batch's accepted viable-cell readings; the MPC predicts with them.

    Called after each estimate like a :data:`ResidualLearner`, it returns the current
    values (empty until the first fit, ``min_hours`` into the batch). A failed fit (a
    record not sampled evenly, too few readings for the noise estimate, a singular
    problem) is logged and the previous values are kept.
    """

    def __init__(
        self,
        model: MechanisticModel[Any],
        parameters: Sequence[Any],
        *,
        simulated: Sequence[str] = ("viable_cells",),
        every_h: float = 6.0,
        window_h: float = 240.0,
        min_hours: float = 24.0,
    ) -> None:
        self.model = model
        self.parameters = tuple(parameters)
        self.simulated = tuple(simulated)
        self.every_h, self.window_h, self.min_hours = every_h, window_h, min_hours
        self.record = RunningRecord(model.input_names)
        self.values: dict[str, float] = {}
        self.fits = 0
        self.failures = 0
        self._theta: Any = None
        self._next_h = -math.inf
        self._adaptations: dict[float, PatientAdaptation] = {}

    def __call__(
        self,
        time_h: float,
        measurements: Sequence[Measurement],
        estimate: EstimatorResult,
        previous: Mapping[str, float],
    ) -> dict[str, float]:
        if not self.record.add(time_h, measurements, estimate, previous):
            return self.values
        rows = self.record.rows
        if time_h < self._next_h or rows[-1]["time"] - rows[0]["time"] < self.min_hours:
            return self.values
        self._next_h = time_h + self.every_h
        try:
            self._fit()
        except (HmpcError, ValueError, np.linalg.LinAlgError) as exc:
            self.failures += 1
            log.warning("patient parameters at %.1f h: fit skipped (%s)", time_h, exc)
        return self.values

    def _fit(self) -> None:
        from controller.training.batches import estimate_log_noise, reconstruct_states

        rec = self.record.batch_record()
        t = rec.steps["time"].to_numpy(float)
        step = float(np.median(np.diff(t)))
        adaptation = self._adaptations.get(step)
        if adaptation is None:
            adaptation = PatientAdaptation(
                self.model,
                self.parameters,
                simulated=self.simulated,
                window_h=self.window_h,
                step_h=step,
            )
            self._adaptations[step] = adaptation
        x = reconstruct_states(rec, self.model)
        u = rec.steps[list(self.model.input_names)].to_numpy(float)
        cells = np.maximum(x[:, self.model.state_names.index(self.simulated[0])], 1e-9)
        noise = estimate_log_noise([rec])
        fit = adaptation.fit(
            t,
            x,
            u,
            np.log(cells),
            np.sqrt(noise.variance(cells)),
            len(t) - 1,
            start_theta=self._theta,
        )
        self._theta, self.values = fit.theta, dict(fit.values)
        self.fits += 1
        log.info(
            "patient parameters at %.1f h: %s",
            t[-1],
            ", ".join(f"{k} {v:.4g}" for k, v in self.values.items()),
        )


@dataclasses.dataclass
class EstimatingMPC:
    """Estimator + MPC behind the controller protocol.

    Attributes:
        name: ``mechanistic-mpc`` or ``hybrid-mpc``.
        estimator: the EKF (initialised on the first step from :func:`initial_estimate`
            unless :meth:`Estimator.initialize` was called before).
        mpc: the optimiser; its ``model_parameters`` receive the estimated factors.
        learner: optional in-batch learning of the residual: called after each estimate,
            returns True when the model changed (the MPC then refreshes its residual).
        adapter: optional :class:`PatientParameterLearner`: its fitted patient parameters
            replace the estimator's factors (and the nominal values) in the MPC's model.
        harvest_time: culture age of the scheduled harvest, h (None: the tuning's).
        results: every step's :class:`MPCResult`.
        estimates: every step's :class:`EstimatorResult`.
    """

    name: str
    estimator: Estimator
    mpc: NonlinearMPC
    learner: ResidualLearner | None = None
    adapter: PatientParameterLearner | None = None
    harvest_time: float | None = None
    keep_history: bool = True
    results: list[MPCResult] = dataclasses.field(default_factory=list)
    estimates: list[EstimatorResult] = dataclasses.field(default_factory=list)
    last_result: MPCResult | None = None
    last_estimate: EstimatorResult | None = None
    _started: bool = False

    def start(self, time_h: float = 0.0) -> None:
        """Initialise the estimator from the process specification at ``time_h``."""
        x0, p0 = initial_estimate(self.estimator.model)
        self.estimator.initialize(x0, p0, time_h=time_h)
        self._started = True

    def step(
        self, time_h: float, measurements: Sequence[Measurement], previous: Mapping[str, float]
    ) -> dict[str, float]:
        if not self._started:
            self.start(min([time_h, *(m.sample_time for m in measurements)]))
        estimate = self.estimator.update(time_h, previous, measurements)
        for d in estimate.rejected:
            log.info(
                "%s t=%.2f h: %s %s rejected (%s)",
                self.name,
                time_h,
                d.measurement.source,
                d.measurement.name,
                d.reason,
            )
        if self.learner is not None and self.learner(time_h, measurements, estimate, previous):
            # the estimator keeps the population residual (its growth factor adapts; a
            # rebuild of its EKF step costs seconds), the MPC re-reads the learned one
            self.mpc.refresh_residual()
        nominal: Any = getattr(self.mpc.model, "parameters", None)
        factors = {
            name: float(getattr(nominal, name)) * float(value)
            for name, value in estimate.factors.items()
            if name in self.mpc.parameter_names
        }
        if self.adapter is not None:
            factors.update(self.adapter(time_h, measurements, estimate, previous))
        x = estimate.state_vector(self.mpc.state_names)
        result = self.mpc.step(
            x, time_h, previous, harvest_time=self.harvest_time, model_parameters=factors
        )
        self.last_result, self.last_estimate = result, estimate
        if self.keep_history:
            self.results.append(result)
            self.estimates.append(estimate)
        if not result.success:
            log.warning(
                "%s t=%.2f h: %s -> %s (%s)",
                self.name,
                time_h,
                result.status,
                result.fallback_used,
                result.fallback_reason,
            )
        return dict(result.u)


# ------------------------------------------------------------------ factory


@dataclasses.dataclass(frozen=True)
class ControllerSpec:
    """What a site file (or the simulator) says about a unit's controller.

    Attributes:
        kind: one of :data:`CONTROLLER_KINDS`.
        model: the process plug-in's name (plant_models.process; ``hmpc-sim processes``
            lists them).
        mpc_config: MPC tuning file (default: the plug-in's packaged tuning).
        residual: fitted residual (``hmpc fit`` output, .npz); required for hybrid-mpc.
        estimator_config: estimator tuning file (default: the model's defaults).
        parameters, process: model parameter / process specification files (defaults:
            the packaged nominal ones).
        harvest_time: culture age of the scheduled harvest, h (default: the process's).
        learn_in_batch: update the residual from the running batch (hybrid-mpc).
        patient_parameters: model parameters fitted to the running batch's readings and
            used by the MPC (:class:`PatientParameterLearner`; a subset of
            :meth:`plant_models.process.ProcessPlugin.adapted_parameters`); empty: none.
    """

    kind: str
    model: str = DEFAULT_PROCESS
    mpc_config: Path | None = None
    residual: Path | None = None
    estimator_config: Path | None = None
    parameters: Path | None = None
    process: Path | None = None
    harvest_time: float | None = None
    learn_in_batch: bool = True
    patient_parameters: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in CONTROLLER_KINDS:
            raise ConfigError(
                f"controller kind {self.kind!r} is unknown; choose one of "
                f"{', '.join(CONTROLLER_KINDS)}."
            )
        plugin = get_process(self.model)
        if self.patient_parameters:
            known = [p.name for p in plugin.adapted_parameters()]
            unknown = [n for n in self.patient_parameters if n not in known]
            if unknown or self.kind not in ("mechanistic-mpc", "hybrid-mpc"):
                raise ConfigError(
                    f"patient_parameters {list(self.patient_parameters)}: only an MPC fits "
                    f"them, and only {known or '(none for this model)'} (unknown: {unknown})"
                )
        if self.kind == "hybrid-mpc" and self.residual is None:
            raise ConfigError(
                "hybrid-mpc needs a fitted residual file (residual = 'residual.npz'); train "
                "one with `hmpc fit --data 'runs/*/trajectory.csv' --out residual.npz ...`."
            )


def default_mpc_config(model: str) -> Path:
    """The packaged MPC tuning of a process (a plug-in may name an absolute path)."""
    name = get_process(model).default_mpc_config
    return Path(name) if Path(name).is_absolute() else config_file(name)


def build_model(
    model: str, parameters: Path | None = None, process: Path | None = None
) -> MechanisticModel[Any]:
    """The controller's nominal mechanistic model of a process plug-in."""
    return get_process(model).build_model(parameters, process)


def _hybrid(base: MechanisticModel[Any], residual: Path, model: str) -> HybridModel:
    """The hybrid model: ``base`` with the rate the residual file was trained on corrected
    (its target ``<rate>_residual`` or ``<rate>_factor``), one of the process plug-in's
    correctable rates."""
    from plant_models.gp import GPResidual
    from plant_models.hybrid import RateCorrection

    gp = GPResidual.load(residual)
    rate = gp.target_name.removesuffix("_residual").removesuffix("_factor")
    allowed = get_process(model).correctable_rates
    if rate not in allowed or rate not in base.rate_names:
        raise ConfigError(
            f"{residual}: the residual corrects {rate!r} (target {gp.target_name!r}); the "
            f"process {model!r} lets a residual correct only {list(allowed)}."
        )
    return HybridModel(base, [RateCorrection(rate, gp)])


def _recipe(model: str, process: Path | None = None) -> Callable[[float], Mapping[str, float]]:
    rc = RecipeController(get_process(model).recipe(process))
    return lambda t: rc.step(t, [], {})


def mpc_tuning(spec: ControllerSpec, model: Any) -> MPCConfig:
    """The MPC tuning of a spec, completed with the process limits of the model."""
    path = spec.mpc_config if spec.mpc_config is not None else default_mpc_config(spec.model)
    return with_process_limits(load_mpc_config(path), model.process, model.operating_bounds())


def build_controller(spec: ControllerSpec, *, learner: ResidualLearner | None = None) -> Controller:
    """The control law of a spec.

    ``recipe``/``rule``: the baselines. ``mechanistic-mpc``: EKF + MPC on the nominal model.
    ``hybrid-mpc``: EKF + MPC on the hybrid model (nominal + the residual file), with the
    residual learning from the running batch when ``learner`` is given.

    Raises:
        ConfigError: bad files or names (messages name the file and the key).
    """
    if spec.kind in ("recipe", "rule"):
        return make_baseline(spec.kind, spec.model, spec.process)
    base = build_model(spec.model, spec.parameters, spec.process)
    config = mpc_tuning(spec, base)
    if spec.kind == "hybrid-mpc":
        if spec.residual is None:  # guarded by ControllerSpec
            raise ConfigError("hybrid-mpc needs a residual file.")
        hybrid = _hybrid(base, spec.residual, spec.model)
        model: Any = HybridPredictionModel(hybrid)
        est_model: Any = hybrid
    else:
        model, est_model = base, base
    est_config = (
        load_estimator_config(spec.estimator_config, est_model)
        if spec.estimator_config is not None
        else EstimatorConfig.for_model(est_model)
    )
    batch_effect = spec.kind == "hybrid-mpc" and any(
        getattr(c.residual, "has_batch_effect", False) for c in hybrid.corrections
    )
    if batch_effect and spec.learn_in_batch and spec.patient_parameters:
        # the same rule as `hmpc fit --adapt` (docs/hybrid.md): the patient-parameter fit and
        # the residual's batch effect would both learn the running batch from the same cells
        raise ConfigError(
            f"patient_parameters {list(spec.patient_parameters)} and the residual "
            f"{spec.residual}, which has a batch effect, both learn the running batch; use a "
            "residual fitted against the patient parameters (`hmpc fit --adapt auto`, no batch "
            "effect) or drop patient_parameters."
        )
    if batch_effect and spec.learn_in_batch and learner is None:
        learner = RunningBatchLearner(hybrid)
    if spec.kind != "hybrid-mpc" or not spec.learn_in_batch:
        learner = None
    factors = tuple(f for f in est_config.parameter_factors if _finite_parameter(base, f))
    adapter = None
    if spec.patient_parameters:
        chosen = [
            p
            for p in get_process(spec.model).adapted_parameters()
            if p.name in spec.patient_parameters
        ]
        adapter = PatientParameterLearner(
            est_model, chosen, simulated=get_process(spec.model).simulated_states
        )
        factors = tuple(dict.fromkeys([*factors, *(p.name for p in chosen)]))
    # The MPC applies the estimator's growth factor and, with in-batch learning, the
    # residual's batch effect as well: on the five-patient check of docs/mpc.md both
    # together reached the dose on 5 of 5 (the batch effect alone: 3 of 5), with less media
    # for the slow grower than the factor alone.
    mpc = NonlinearMPC(
        model, config, recipe=_recipe(spec.model, spec.process), model_parameters=factors
    )
    estimator = Estimator(est_model, est_config)
    return EstimatingMPC(
        spec.kind,
        estimator,
        mpc,
        learner=learner,
        adapter=adapter,
        harvest_time=spec.harvest_time,
    )


def _finite_parameter(model: Any, name: str) -> bool:
    value = getattr(model.parameters, name, None)
    if value is None:
        raise ModelError(f"estimator parameter factor {name!r} is not a model parameter.")
    return math.isfinite(float(value))

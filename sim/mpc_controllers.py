"""The nonlinear MPC as a closed-loop controller of the virtual plant (the
:class:`controller.numerics.baselines.Controller` protocol): ``mechanistic-mpc`` and ``hybrid-mpc``
are the deployable estimator-fed controllers of :mod:`controller.laws.control` (they see the
measurements only); ``oracle`` is the MPC on the plant's own truth model and true state
(the bound on what any controller can reach).

Also here for the benchmarks: :func:`fit_growth_residual_gp` (a residual fitted on rate
samples of simulated earlier batches) and :class:`GPCorrectedTCellModel` (a growth-rate
residual with any ``to_casadi`` export plugged into the T-cell model).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import casadi as ca
import numpy as np
import numpy.typing as npt

from controller.laws.control import (
    ControllerSpec,
    EstimatingMPC,
    build_controller,
    default_mpc_config,
)
from controller.numerics.mpc import MPCResult, NonlinearMPC, PredictionModel
from controller.numerics.mpc_config import MPCConfig, load_mpc_config, with_process_limits
from plant_models.base import CASADI_OPS, MechanisticModel
from plant_models.errors import ConfigError
from plant_models.process import DEFAULT_PROCESS, get_process
from sim.baselines import RecipeController, RuleController
from sim.closed_loop import default_limiter
from sim.patients import VirtualPatient, load_cohort_spec
from sim.plant import VirtualBioreactor
from sim.sensors import Measurement

__all__ = [
    "GP_FEATURES",
    "MPC_CONTROLLERS",
    "GPCorrectedTCellModel",
    "MPCController",
    "fit_growth_residual_gp",
    "growth_residual_data",
    "make_mpc_controller",
    "mpc_statistics",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: Controller names this module builds.
MPC_CONTROLLERS = ("mechanistic-mpc", "hybrid-mpc", "oracle")


@dataclasses.dataclass
class MPCController:
    """A :class:`NonlinearMPC` behind the closed loop's controller protocol.

    Attributes:
        name: controller name (``mechanistic-mpc``, ``oracle``).
        mpc: the optimiser.
        state_source: ``(time_h, measurements, previous inputs) -> state vector``.
        results: every step's :class:`MPCResult` (for reports and tests).
    """

    name: str
    mpc: NonlinearMPC
    state_source: Callable[[float, Sequence[Measurement], Mapping[str, float]], FloatArray]
    results: list[MPCResult] = dataclasses.field(default_factory=list)

    def step(
        self, time_h: float, measurements: Sequence[Measurement], previous: Mapping[str, float]
    ) -> dict[str, float]:
        x = self.state_source(time_h, measurements, previous)
        result = self.mpc.step(x, time_h, previous)
        self.results.append(result)
        return dict(result.u)


# ---------------------------------------------------------------- hybrid model (stop-gap)


class GPCorrectedTCellModel:
    """The T-cell model with a GP residual added to its growth rate (hybrid model).

    Until ``plant_models`` offers a ``HybridModel``, this is the benchmark's hybrid model:
    ``growth_rate = mechanistic growth_rate + GP mean(features)``; ``residual_std()`` gives
    the GP standard deviation for constraint tightening (zero order, never in the NLP).
    Any object with ``to_casadi(variance=...)`` returning ``features -> (mean[, variance])``
    (for example :class:`plant_models.gp.GPResidual`) plugs in.
    """

    residual_names = ("growth_rate",)

    def __init__(self, base: MechanisticModel[Any], gp: Any, features: Sequence[str]) -> None:
        self.base = base
        self.name = f"{base.name}_hybrid"
        self.gp = gp
        self.features = tuple(features)
        self.state_names = base.state_names
        self.input_names = base.input_names
        self.rate_names = base.rate_names
        self.parameters = base.parameters
        self._mean = gp.to_casadi("gp_mean", variance=False)
        self._var = gp.to_casadi("gp_var", variance=True)

    def _feature_vector(self, x: Any) -> Any:
        return ca.vertcat(*[x[self.state_names.index(f)] for f in self.features])

    def balances(
        self, t: Any, x: Sequence[Any], u: Sequence[Any], r: Mapping[str, Any], p: Any, ops: Any
    ) -> list[Any]:
        return self.base.balances(t, x, u, r, p, ops)

    def input_bounds(self) -> tuple[FloatArray, FloatArray]:
        return self.base.input_bounds()

    def dynamics(self) -> ca.Function:
        t = ca.MX.sym("t")
        x = ca.MX.sym("x", self.base.nx)
        u = ca.MX.sym("u", self.base.nu)
        xs = [x[i] for i in range(self.base.nx)]
        us = [u[i] for i in range(self.base.nu)]
        p = self.base.parameters
        r = dict(self.base.rates(t, xs, us, p, CASADI_OPS))
        r["growth_rate"] = r["growth_rate"] + self._mean(self._feature_vector(x))
        xdot = ca.vertcat(*self.base.balances(t, xs, us, r, p, CASADI_OPS))
        rv = ca.vertcat(*[r[k] for k in self.rate_names])
        return ca.Function(
            f"{self.name}_dynamics", [t, x, u], [xdot, rv], ["t", "x", "u"], ["xdot", "rates"]
        )

    def base_dynamics(self) -> ca.Function:
        """The mechanistic part alone."""
        return self.base.dynamics()

    def residual_mean(self) -> ca.Function:
        t = ca.MX.sym("t")
        x = ca.MX.sym("x", self.base.nx)
        u = ca.MX.sym("u", self.base.nu)
        mean = self._mean(self._feature_vector(x))
        return ca.Function("gp_mean", [t, x, u], [mean], ["t", "x", "u"], ["mean"])

    def residual_std(self) -> ca.Function:
        t = ca.MX.sym("t")
        x = ca.MX.sym("x", self.base.nx)
        u = ca.MX.sym("u", self.base.nu)
        _, var = self._var(self._feature_vector(x))
        return ca.Function(
            "gp_std", [t, x, u], [ca.sqrt(ca.fmax(var, 0.0))], ["t", "x", "u"], ["std"]
        )


GP_FEATURES = ("glucose", "lactate", "il2")


def growth_residual_data(n_points: int, seed: int = 0) -> tuple[FloatArray, FloatArray]:
    """Training data of the growth-rate residual (truth minus nominal model) from simulated
    batches of seeded virtual patients under the rule controller with perturbed moves.

    Returns X (n, 3) of GP_FEATURES and y (n,) in 1/h.
    """
    plugin = get_process(DEFAULT_PROCESS)
    proc = plugin.load_process()[0]
    nominal = plugin.model(plugin.load_parameters()[0], proc)
    spec = load_cohort_spec()[0]
    rng = np.random.default_rng(seed)
    xs: list[FloatArray] = []
    ys: list[float] = []
    batch = 0
    while len(ys) < 2 * n_points:
        plant = VirtualBioreactor.for_process(
            plugin, VirtualPatient.draw(1000 + batch, spec), seed=batch
        )
        settings = dataclasses.replace(
            plugin.rule_settings(), cell_specific_perfusion=float(rng.uniform(0.03, 0.15))
        )
        rule = RuleController(plugin, settings)
        limiter = default_limiter(plant)
        inputs = {n: plant.bounds[n][0] for n in plant.model.input_names}
        measurements = plant.initial_measurements()
        for _ in range(int(proc.harvest_time)):
            proposed = rule.step(plant.time_h, measurements, inputs)
            inputs = limiter.apply(proposed, inputs, 1.0)
            u = plant.model.input_vector(inputs)
            truth = plant.model.rates_numpy(plant.time_h, plant.state, u)
            model = nominal.rates_numpy(plant.time_h, plant.state, u)
            names = plant.model.state_names
            xs.append(np.array([plant.state[names.index(f)] for f in GP_FEATURES]))
            ys.append(truth["growth_rate"] - model["growth_rate"])
            measurements = plant.step(inputs, 1.0)
        batch += 1
    idx = rng.choice(len(ys), size=n_points, replace=False)
    return np.array(xs)[idx], np.array(ys)[idx]


def fit_growth_residual_gp(n_points: int, *, sparse: bool = True, seed: int = 0) -> Any:
    """A GP of the growth-rate residual on :func:`growth_residual_data` (sparse: at most 64
    inducing points)."""
    try:
        from plant_models.gp import GPResidual
    except ImportError as exc:
        raise ConfigError(f"bench hybrid-atmp needs plant_models.gp.GPResidual ({exc}).") from exc
    x, y = growth_residual_data(n_points, seed=seed)
    gp = GPResidual(
        GP_FEATURES,
        ("mM", "mM", "IU/mL"),
        "growth_rate_residual",
        "1/h",
        sparse=sparse,
        n_inducing=min(64, n_points),
        training_iterations=60,
        seed=seed,
        max_points=max(2000, n_points),
    )
    return gp.fit(x, y)


def _recipe(kind: str) -> Callable[[float], Mapping[str, float]]:
    rc = RecipeController(get_process(kind).recipe())
    return lambda t: rc.step(t, [], {})


def load_plant_config(plant: VirtualBioreactor, config_path: str | Path | None) -> MPCConfig:
    """The tuning file (default ``configs/mpc_<kind>.toml``), completed with the plant's
    process limits."""
    path = Path(config_path) if config_path is not None else default_mpc_config(plant.kind)
    return with_process_limits(load_mpc_config(path), plant.process, plant.bounds)


def make_mpc_controller(
    name: str,
    plant: VirtualBioreactor,
    config_path: str | Path | None = None,
    *,
    residual: str | Path | None = None,
    gp_points: int = 300,
    gp_seed: int = 0,
    learner: Any = None,
    patient_parameters: Sequence[str] = (),
) -> MPCController | EstimatingMPC:
    """An MPC controller by name for a plant (``tcell`` or ``cho``).

    Args:
        name: ``mechanistic-mpc`` (estimator + MPC on the nominal model, as deployed:
            :func:`controller.laws.control.build_controller`), ``hybrid-mpc`` (the
            same on the hybrid model: nominal + GP growth-rate residual) or ``oracle`` (the
            plant's truth model and true state).
        plant: the virtual bioreactor (the oracle reads its model and state).
        config_path: MPC tuning file (default ``configs/mpc_<kind>.toml``).
        residual: fitted residual file for ``hybrid-mpc`` (``hmpc fit`` output; required
            for CHO). Without one (T cell), a benchmark residual is fitted on ``gp_points``
            rate samples of earlier simulated batches of other patients
            (:func:`fit_growth_residual_gp`).
        learner: in-batch learning hook of the hybrid residual
            (:data:`controller.laws.control.ResidualLearner`).
        patient_parameters: parameters the MPC fits to the running batch's readings
            (:class:`controller.laws.control.PatientParameterLearner`; not for the oracle).
    Raises:
        ValueError: unknown name. ConfigError: invalid tuning file.
    """
    if name == "oracle":
        if patient_parameters:
            raise ValueError("the oracle knows the patient: patient_parameters are for MPCs")
        config = load_plant_config(plant, config_path)
        model: PredictionModel = plant.model
        mpc = NonlinearMPC(model, config, recipe=_recipe(plant.kind))

        def true_state(
            time_h: float, measurements: Sequence[Measurement], previous: Mapping[str, float]
        ) -> FloatArray:
            return np.asarray(plant.state, dtype=float).copy()

        return MPCController("oracle", mpc, true_state)
    if name not in MPC_CONTROLLERS:
        raise ValueError(
            f"unknown MPC controller {name!r}; expected one of {', '.join(MPC_CONTROLLERS)}"
        )
    if name == "hybrid-mpc" and plant.kind != DEFAULT_PROCESS and residual is None:
        raise ValueError(
            f"hybrid-mpc on the {plant.kind} model needs a fitted residual (--residual FILE, "
            f"from `hmpc fit --model {plant.kind}`); the built-in benchmark residual is "
            f"for the {DEFAULT_PROCESS} model"
        )
    path = Path(config_path) if config_path is not None else None
    if name == "hybrid-mpc" and residual is None:
        with tempfile.TemporaryDirectory(prefix="hmpc-residual-") as tmp:
            fitted = Path(tmp) / "residual.npz"
            fit_growth_residual_gp(gp_points, seed=gp_seed).save(fitted)
            return make_mpc_controller(
                name,
                plant,
                config_path,
                residual=fitted,
                learner=learner,
                patient_parameters=patient_parameters,
            )
    spec = ControllerSpec(
        name,
        plant.kind,
        mpc_config=path,
        residual=Path(residual) if residual is not None else None,
        harvest_time=float(plant.process.harvest_time),
        patient_parameters=tuple(patient_parameters),
    )
    built = build_controller(spec, learner=learner)
    if not isinstance(built, EstimatingMPC):  # narrowing: MPC kinds build EstimatingMPC
        raise TypeError(f"{name} did not build an MPC controller")
    return built


def mpc_statistics(controller: MPCController | EstimatingMPC) -> dict[str, float | int]:
    """Solver figures of a run: steps, failures, median/max solve time, median iterations."""
    times = [r.solve_time_s for r in controller.results]
    iters = [r.iterations for r in controller.results]
    return {
        "mpc_steps": len(times),
        "mpc_failures": sum(1 for r in controller.results if not r.success),
        "solve_time_median_s": float(statistics.median(times)) if times else float("nan"),
        "solve_time_max_s": float(max(times)) if times else float("nan"),
        "iterations_median": float(statistics.median(iters)) if iters else float("nan"),
    }

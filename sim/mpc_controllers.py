"""The nonlinear MPC as a closed-loop controller (the :class:`sim.baselines.Controller`
protocol): ``mechanistic-mpc`` (nominal model, state from a simple observer),
``hybrid-mpc`` (T cell: nominal model plus a GP residual on the growth rate, a stop-gap
hybrid model until plant_models offers one) and ``oracle`` (the plant's own truth model and
true state: the bound on what any controller can reach).

Until the estimator (controller/estimator.py) lands, the mechanistic MPC takes its state
from :class:`ModelObserver`: the model's open-loop prediction, corrected towards each new
measurement with a fixed gain; states nobody measures (inhibitor, volume) stay on the
prediction (the inhibitor is the integral of the estimated viable cells).
"""

from __future__ import annotations

import dataclasses
import logging
import statistics
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import casadi as ca
import numpy as np
import numpy.typing as npt

from controller.mpc import MPCResult, NonlinearMPC, PredictionModel
from controller.mpc_config import MPCConfig, load_mpc_config, with_process_limits
from plant_models.base import CASADI_OPS
from plant_models.cho import CHOFedBatchModel, load_cho_parameters
from plant_models.errors import ConfigError
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process
from sim.baselines import CHO_RECIPE, TCELL_RECIPE, RecipeController, RuleController
from sim.closed_loop import default_limiter
from sim.patients import VirtualPatient, load_cohort_spec
from sim.plant import VirtualBioreactor
from sim.sensors import Measurement

__all__ = [
    "GP_FEATURES",
    "MPC_CONTROLLERS",
    "GPCorrectedTCellModel",
    "MPCController",
    "ModelObserver",
    "default_config_path",
    "fit_growth_residual_gp",
    "growth_residual_data",
    "make_mpc_controller",
    "mpc_statistics",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: Controller names this module builds.
MPC_CONTROLLERS = ("mechanistic-mpc", "hybrid-mpc", "oracle")

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def default_config_path(kind: str) -> Path:
    """The MPC tuning file of a model kind (``configs/mpc_<kind>.toml``)."""
    return CONFIG_DIR / f"mpc_{kind}.toml"


def _rk4_function(model: PredictionModel) -> ca.Function:
    """``(t, x, u, dt) -> x(t + dt)``: 4 RK4 sub-steps of the model's dynamics."""
    f = model.dynamics()
    n_x, n_u = len(model.state_names), len(model.input_names)
    t = ca.MX.sym("t")
    x = ca.MX.sym("x", n_x)
    u = ca.MX.sym("u", n_u)
    dt = ca.MX.sym("dt")
    h = dt / 4
    xk, tk = x, t
    for _ in range(4):
        k1 = f(tk, xk, u)[0]
        k2 = f(tk + h / 2, xk + h / 2 * k1, u)[0]
        k3 = f(tk + h / 2, xk + h / 2 * k2, u)[0]
        k4 = f(tk + h, xk + h * k3, u)[0]
        xk = xk + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        tk = tk + h
    fn = ca.Function("observer_step", [t, x, u, dt], [xk])
    try:
        return fn.expand()
    except RuntimeError:
        return fn


class ModelObserver:
    """Open-loop model prediction corrected by the latest measurements (fixed gains).

    Per call: predict from the last estimate with the inputs applied since, then blend
    each measured state towards its measurement (``online_gain`` for probes,
    ``assay_gain`` for offline assays). A ``viability`` assay sets ``dead_cells``
    (T cell) or ``total_cells`` (CHO) from the estimated viable cells. The ``inhibitor``
    (integral of viable cells) is integrated from the estimated viable cells.
    """

    def __init__(
        self,
        model: PredictionModel,
        x0: FloatArray,
        *,
        online_gain: float = 0.5,
        assay_gain: float = 0.8,
    ) -> None:
        self.model = model
        self.names = tuple(model.state_names)
        self.inputs = tuple(model.input_names)
        self.x = np.asarray(x0, dtype=float).copy()
        self.time_h = 0.0
        self.online_gain = online_gain
        self.assay_gain = assay_gain
        self._step = _rk4_function(model)

    def update(
        self, time_h: float, measurements: Sequence[Measurement], applied: Mapping[str, float]
    ) -> FloatArray:
        """The state estimate at ``time_h`` (copy)."""
        dt = time_h - self.time_h
        before = self.x.copy()
        if dt > 0:
            u = np.array([float(applied.get(n, 0.0)) for n in self.inputs])
            pred = np.asarray(self._step(self.time_h, self.x, u, dt), dtype=float).reshape(-1)
            if np.all(np.isfinite(pred)):
                self.x = np.maximum(pred, 0.0)
            else:
                log.warning("observer: non-finite prediction at t=%.2f h; state held", time_h)
        self.time_h = time_h
        viability: float | None = None
        for m in measurements:
            if m.quality != "good":
                continue
            if m.name == "viability":
                viability = m.value
                continue
            if m.name in self.names:
                i = self.names.index(m.name)
                gain = self.online_gain if m.source == "online" else self.assay_gain
                self.x[i] += gain * (m.value - self.x[i])
        if "viable_cells" in self.names:
            iv = self.names.index("viable_cells")
            if viability is not None and 0.0 < viability <= 1.0:
                xv = self.x[iv]
                if "dead_cells" in self.names:
                    self.x[self.names.index("dead_cells")] = xv * (1.0 - viability) / viability
                elif "total_cells" in self.names:
                    self.x[self.names.index("total_cells")] = xv / viability
            if "inhibitor" in self.names and dt > 0:
                ii = self.names.index("inhibitor")
                self.x[ii] = before[ii] + 0.5 * (before[iv] + self.x[iv]) * dt
        self.x = np.maximum(self.x, 0.0)
        return self.x.copy()


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

    def __init__(self, base: TCellExpansionModel, gp: Any, features: Sequence[str]) -> None:
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
    proc = load_tcell_process()[0]
    nominal = TCellExpansionModel(load_tcell_parameters()[0], proc)
    spec = load_cohort_spec()[0]
    rng = np.random.default_rng(seed)
    xs: list[FloatArray] = []
    ys: list[float] = []
    batch = 0
    while len(ys) < 2 * n_points:
        plant = VirtualBioreactor.tcell(VirtualPatient.draw(1000 + batch, spec), seed=batch)
        rule = RuleController("tcell", cell_specific_perfusion=float(rng.uniform(0.03, 0.15)))
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
    rc = RecipeController(TCELL_RECIPE if kind == "tcell" else CHO_RECIPE)
    return lambda t: rc.step(t, [], {})


def _nominal_model(plant: VirtualBioreactor) -> PredictionModel:
    proc: Any = plant.process
    if plant.kind == "tcell":
        return TCellExpansionModel(load_tcell_parameters()[0], proc)
    return CHOFedBatchModel(load_cho_parameters()[0], proc)


def load_plant_config(plant: VirtualBioreactor, config_path: str | Path | None) -> MPCConfig:
    """The tuning file (default ``configs/mpc_<kind>.toml``), completed with the plant's
    process limits."""
    path = Path(config_path) if config_path is not None else default_config_path(plant.kind)
    return with_process_limits(load_mpc_config(path), plant.process, plant.bounds)


def make_mpc_controller(
    name: str,
    plant: VirtualBioreactor,
    config_path: str | Path | None = None,
    *,
    gp_points: int = 300,
    gp_seed: int = 0,
) -> MPCController:
    """An MPC controller by name for a plant (``tcell`` or ``cho``).

    Args:
        name: ``mechanistic-mpc`` (nominal model; state from :class:`ModelObserver`),
            ``hybrid-mpc`` (T cell: nominal model + GP growth-rate residual learned from
            ``gp_points`` samples of earlier simulated batches of other patients; same
            observer) or ``oracle`` (the plant's truth model and true state).
        plant: the virtual bioreactor (the oracle reads its model and state).
        config_path: MPC tuning file (default ``configs/mpc_<kind>.toml``).
        gp_points, gp_seed: training-set size and seed of the hybrid model's GP.
    Raises:
        ValueError: unknown name. ConfigError: invalid tuning file.
    """
    config = load_plant_config(plant, config_path)
    recipe = _recipe(plant.kind)
    if name == "oracle":
        model: PredictionModel = plant.model
        mpc = NonlinearMPC(model, config, recipe=recipe)

        def true_state(
            time_h: float, measurements: Sequence[Measurement], previous: Mapping[str, float]
        ) -> FloatArray:
            return np.asarray(plant.state, dtype=float).copy()

        return MPCController("oracle", mpc, true_state)
    if name == "hybrid-mpc":
        if plant.kind != "tcell":
            raise ValueError("hybrid-mpc exists for the T-cell model only (GP on its growth rate)")
        base = _nominal_model(plant)
        if not isinstance(base, TCellExpansionModel):  # narrowing for the type checker
            raise TypeError("hybrid-mpc needs the T-cell model")
        gp = fit_growth_residual_gp(gp_points, seed=gp_seed)
        model = GPCorrectedTCellModel(base, gp, GP_FEATURES)
        mpc = NonlinearMPC(model, config, recipe=recipe)
        init = plant.model.initial_state()  # type: ignore[attr-defined]
        hybrid_observer = ModelObserver(model, np.array([init[n] for n in model.state_names]))
        return MPCController(
            "hybrid-mpc", mpc, lambda t, ms, prev: hybrid_observer.update(t, ms, prev)
        )
    if name == "mechanistic-mpc":
        model = _nominal_model(plant)
        mpc = NonlinearMPC(model, config, recipe=recipe)
        init = plant.model.initial_state()  # type: ignore[attr-defined]  # process spec, not truth
        observer = ModelObserver(model, np.array([init[n] for n in model.state_names]))
        return MPCController(
            "mechanistic-mpc", mpc, lambda t, ms, prev: observer.update(t, ms, prev)
        )
    raise ValueError(
        f"unknown MPC controller {name!r}; expected one of {', '.join(MPC_CONTROLLERS)}"
    )


def mpc_statistics(controller: MPCController) -> dict[str, float | int]:
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

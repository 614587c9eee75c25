"""The nonlinear MPC as a closed-loop controller (the :class:`sim.baselines.Controller`
protocol): ``mechanistic-mpc`` (nominal model, state from a simple observer) and
``oracle`` (the plant's own truth model and true state: the bound on what any controller
can reach).

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
from plant_models.cho import CHOFedBatchModel, load_cho_parameters
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters
from sim.baselines import CHO_RECIPE, TCELL_RECIPE, RecipeController
from sim.plant import VirtualBioreactor
from sim.sensors import Measurement

__all__ = [
    "MPC_CONTROLLERS",
    "MPCController",
    "ModelObserver",
    "default_config_path",
    "make_mpc_controller",
    "mpc_statistics",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: Controller names this module builds.
MPC_CONTROLLERS = ("mechanistic-mpc", "oracle")

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
    name: str, plant: VirtualBioreactor, config_path: str | Path | None = None
) -> MPCController:
    """An MPC controller by name for a plant (``tcell`` or ``cho``).

    Args:
        name: ``mechanistic-mpc`` (nominal model; state from :class:`ModelObserver`) or
            ``oracle`` (the plant's truth model and true state).
        plant: the virtual bioreactor (the oracle reads its model and state).
        config_path: MPC tuning file (default ``configs/mpc_<kind>.toml``).
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

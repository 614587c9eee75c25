"""Harvest forecast: when will the patient's dose be reached, and how many viable cells will
a harvest yield, with an interval from the estimator's and the GP's uncertainty.

Method (a seeded Monte-Carlo ensemble, vectorised over its members by CasADi ``map``):

1. draw ``members`` initial points of ``[x; log f]`` from the estimator's posterior (state
   mean and the joint covariance of the states and the log parameter factors, e.g. the
   patient's growth factor on ``mu_max``), antithetic pairs so the ensemble mean is exact,
   projected onto the physical box of each state;
2. give every member a fixed standard-normal draw ``xi`` per GP residual of a hybrid
   model: along its trajectory the residual is ``mean + xi * sqrt(GP variance)`` at the
   member's (t, x, u) (a systematic model error, the conservative reading of the GP band;
   none for a mechanistic model). The residual is evaluated once per sample step and held
   over its RK4 sub-steps (it varies slowly; evaluating the GP in every sub-step would
   cost 40 times more);
3. integrate every member with RK4 over the fixed future input plan (the MPC's predicted
   inputs when given, else the present inputs held), adding the estimator's own model of
   what the filter does not know yet: the random walk of each log-factor and the process
   noise of each state, per sample step;
4. read, per member, the first time the total viable cells (``viable_cells x volume``,
   1e9 cells) reach the dose (linear in log cells between steps) and the cells at the
   scheduled harvest; report quantiles and the probability of the dose by the harvest.

Pure numerics: no asyncio, no I/O; :meth:`HarvestForecaster.forecast` takes tens of ms
(``hmpc-sim bench forecast`` prints the figure). Units: time is culture age in h; cells in
1e9 cells; inputs in the model's canonical units.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import casadi as ca
import numpy as np
import numpy.typing as npt

from plant_models.base import CASADI_OPS, rk4
from plant_models.config import check_keys, load_fields, load_toml, setting
from plant_models.errors import ConfigError, ModelError

__all__ = [
    "ForecastConfig",
    "HarvestForecast",
    "HarvestForecaster",
    "InputPlan",
    "InputPolicy",
    "load_forecast_config",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
NoiseTable = Mapping[str, tuple[float, float]]


@dataclasses.dataclass(frozen=True)
class ForecastConfig:
    """Settings of the :class:`HarvestForecaster`.

    Attributes:
        members: ensemble size (even: antithetic pairs), 2..4096.
        level: central probability of the reported intervals (0.9: 5 %-95 %).
        step_h: sample step of the forecast grid, h (crossing times are interpolated).
        max_substep_h: longest RK4 sub-step, h (the glucose-uptake switch is stiff at high
            cell density; see docs/estimation.md).
        horizon_h: how far beyond the present the forecast looks, h (always at least to the
            scheduled harvest).
        factor_random_walk: standard deviation per sqrt(h) of each log-factor's random walk
            (the estimator's ``factor_random_walk``).
        process_noise: state -> (absolute, relative) standard deviation per sqrt(h) (the
            estimator's ``process_noise``); states not named get none.
        gp_variance: use the GP residual variance of a hybrid model (False: the residual's
            mean only).
        seed: seed of the ensemble draws (the same inputs give the same forecast).
    """

    members: int = setting(64, low=2, high=4096, description="ensemble size (even)")
    level: float = setting(0.9, low=0.0, high=1.0, low_open=True, description="interval level")
    step_h: float = setting(1.0, low=0.0, low_open=True, unit="h", description="grid step")
    max_substep_h: float = setting(
        0.1, low=0.0, low_open=True, unit="h", description="longest RK4 sub-step"
    )
    horizon_h: float = setting(240.0, low=0.0, low_open=True, unit="h", description="horizon")
    factor_random_walk: float = setting(
        0.01, low=0.0, unit="1/sqrt(h)", description="log-factor random walk"
    )
    process_noise: NoiseTable = setting(
        default_factory=dict, low=0.0, description="[absolute, relative]"
    )
    gp_variance: bool = setting(True, description="use the GP residual variance")
    seed: int = setting(0, description="seed of the ensemble draws")

    def __post_init__(self) -> None:
        if isinstance(self.members, bool) or not isinstance(self.members, int):
            raise ConfigError(
                f"forecast config: members must be a whole number, got {self.members!r}."
            )
        if not 2 <= self.members <= 4096 or self.members % 2:
            raise ConfigError(
                f"forecast config: members must be an even number in 2..4096, got {self.members}."
            )
        if not (math.isfinite(self.level) and 0.0 < self.level < 1.0):
            raise ConfigError(f"forecast config: level must be in (0, 1), got {self.level!r}.")
        for key in ("step_h", "max_substep_h", "horizon_h"):
            value = getattr(self, key)
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"forecast config: {key} must be positive, got {value!r} h.")
        if self.max_substep_h > self.step_h:
            raise ConfigError(
                f"forecast config: max_substep_h ({self.max_substep_h} h) must not exceed "
                f"step_h ({self.step_h} h)."
            )
        if self.horizon_h / self.step_h > 100_000:
            raise ConfigError("forecast config: horizon_h / step_h exceeds 100 000 steps.")
        if not (math.isfinite(self.factor_random_walk) and self.factor_random_walk >= 0):
            raise ConfigError(
                "forecast config: factor_random_walk must be >= 0, "
                f"got {self.factor_random_walk!r}."
            )
        for name, pair in self.process_noise.items():
            absolute, relative = pair
            if not (
                math.isfinite(absolute)
                and math.isfinite(relative)
                and absolute >= 0
                and relative >= 0
            ):
                raise ConfigError(
                    f"forecast config: process_noise[{name!r}] = {pair!r} needs two "
                    "non-negative numbers (absolute, relative)."
                )

    @classmethod
    def from_estimator(cls, estimator_config: Any, **changes: Any) -> ForecastConfig:
        """The estimator's random walk and process noise (its model of what it does not
        know), with other settings from ``changes``."""
        return cls(
            factor_random_walk=float(estimator_config.factor_random_walk),
            process_noise=dict(estimator_config.process_noise),
            **changes,
        )


#: the settings of the ``[forecast]`` table (``process_noise`` is a table of its own)
_SCALARS = tuple(f.name for f in dataclasses.fields(ForecastConfig) if f.name != "process_noise")


def load_forecast_config(path: str | Path) -> ForecastConfig:
    """A ``[forecast]`` table (the scalar settings) and an optional ``[process_noise]``
    table (state = [absolute, relative]) from a TOML file.

    Raises:
        ConfigError: unknown key (with a suggestion), wrong type or value; the message
        names the file and the key.
    """
    where = str(path)
    data = load_toml(path)
    check_keys(data, ("forecast", "process_noise"), where)
    return forecast_config_from_dict(data, where)


def forecast_config_from_dict(data: Mapping[str, Any], where: str) -> ForecastConfig:
    """:func:`load_forecast_config` on an already parsed document (``where`` names it)."""
    values = load_fields(
        ForecastConfig, data.get("forecast", {}), f"{where} [forecast]", names=_SCALARS
    )
    noise = {"process_noise": data.get("process_noise", {})}
    values.update(load_fields(ForecastConfig, noise, where, names=("process_noise",), root=True))
    try:
        return ForecastConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None


@dataclasses.dataclass(frozen=True, eq=False)
class InputPlan:
    """Future inputs, piecewise constant: row ``k`` applies from ``times_h[k]`` until the
    next row; the first row also before ``times_h[0]``, the last one after it.

    Attributes:
        names: input names (columns of ``values``).
        times_h: (k,) increasing start times, h.
        values: (k, nu) canonical units.
    """

    names: tuple[str, ...]
    times_h: FloatArray
    values: FloatArray

    def __post_init__(self) -> None:
        times = np.asarray(self.times_h, dtype=float).reshape(-1)
        values = np.asarray(self.values, dtype=float)
        if values.ndim == 1:
            values = values.reshape(1, -1)
        if times.size == 0 or values.shape != (times.size, len(self.names)):
            raise ModelError(
                f"input plan: values of shape {values.shape} do not match {times.size} times "
                f"and {len(self.names)} inputs {list(self.names)}."
            )
        if not (np.all(np.isfinite(times)) and np.all(np.isfinite(values))):
            raise ModelError("input plan: times and values must be finite.")
        if np.any(np.diff(times) <= 0):
            raise ModelError("input plan: times must be strictly increasing.")
        object.__setattr__(self, "times_h", times)
        object.__setattr__(self, "values", values)

    @classmethod
    def hold(cls, inputs: Mapping[str, float], time_h: float = 0.0) -> InputPlan:
        """The present inputs held over the whole forecast."""
        names = tuple(inputs)
        return cls(names, np.array([time_h]), np.array([[float(inputs[n]) for n in names]]))

    @classmethod
    def from_mpc(cls, result: Any) -> InputPlan:
        """The optimiser's predicted inputs (an ``MPCResult``: ``input_names``,
        ``predicted_times`` (N+1,), ``predicted_inputs`` (N, nu)); the last move is held
        beyond the horizon.

        Raises:
            ModelError: the result holds no usable plan (a failed solve has NaN); hold
            the applied inputs instead (:meth:`hold`).
        """
        times = np.asarray(result.predicted_times, dtype=float).reshape(-1)
        values = np.asarray(result.predicted_inputs, dtype=float)
        if values.ndim != 2 or values.shape[0] == 0 or times.size < values.shape[0]:
            raise ModelError("input plan: the MPC result has no predicted inputs.")
        if not np.all(np.isfinite(values)):
            raise ModelError(
                "input plan: the MPC's predicted inputs are not finite (failed solve); "
                "use InputPlan.hold(applied inputs)."
            )
        return cls(tuple(result.input_names), times[: values.shape[0]], values)

    def at(self, time_h: float, order: Sequence[str]) -> FloatArray:
        """Inputs in force at ``time_h``, ordered as ``order``."""
        k = int(np.searchsorted(self.times_h, time_h + 1e-9, side="right")) - 1
        row = self.values[max(k, 0)]
        index = {n: i for i, n in enumerate(self.names)}
        return np.array([row[index[n]] for n in order], dtype=float)


class InputPolicy(Protocol):
    """A feedback law evaluated on every member (e.g. the site's rule controller):
    ``(time_h, states (n, nx) in the model's state order) -> inputs (n, nu)`` in the
    model's input order, within the process bounds."""

    def __call__(self, time_h: float, states: FloatArray) -> FloatArray: ...


@dataclasses.dataclass(frozen=True, eq=False)
class HarvestForecast:
    """A forecast of the dose-reached time and of the harvest yield.

    Attributes:
        time_h: culture age at which the forecast was made, h.
        dose_cells: the patient's dose, 1e9 viable cells.
        harvest_time_h: the scheduled harvest, h.
        level: central probability of the intervals (e.g. 0.9).
        members: ensemble size.
        dose_time_h: median time the dose is reached, h (``inf``: not within the
            horizon for most members).
        dose_time_low_h, dose_time_high_h: the interval of the dose-reached time
            (``high`` may be ``inf``: some members do not reach it within the horizon).
        probability_dose_by_harvest: fraction of members with the dose by the harvest.
        harvest_cells: median viable cells at the scheduled harvest, 1e9 cells.
        harvest_cells_low, harvest_cells_high: its interval, 1e9 cells.
        times_h: (k,) forecast grid, h.
        cells_median, cells_low, cells_high: (k,) viable-cell band on the grid, 1e9 cells.
        horizon_end_h: last time of the grid, h.
        input_plan: where the future inputs came from (``hold``, ``plan`` or ``policy``).
        gp_variance_used: a GP residual variance widened the band.
        elapsed_s: computation time, s.
    """

    time_h: float
    dose_cells: float
    harvest_time_h: float
    level: float
    members: int
    dose_time_h: float
    dose_time_low_h: float
    dose_time_high_h: float
    probability_dose_by_harvest: float
    harvest_cells: float
    harvest_cells_low: float
    harvest_cells_high: float
    times_h: FloatArray
    cells_median: FloatArray
    cells_low: FloatArray
    cells_high: FloatArray
    horizon_end_h: float
    input_plan: str
    gp_variance_used: bool
    elapsed_s: float = 0.0

    def cells_at(self, time_h: float) -> tuple[float, float, float]:
        """(median, low, high) viable cells at ``time_h`` (held at the grid's ends), 1e9."""
        return (
            float(np.interp(time_h, self.times_h, self.cells_median)),
            float(np.interp(time_h, self.times_h, self.cells_low)),
            float(np.interp(time_h, self.times_h, self.cells_high)),
        )

    def summary(self) -> dict[str, Any]:
        """The scalar figures, JSON-serialisable (``inf`` written as None)."""

        def num(v: float) -> float | None:
            return float(v) if math.isfinite(v) else None

        return {
            "time_h": self.time_h,
            "dose_cells": self.dose_cells,
            "harvest_time_h": self.harvest_time_h,
            "level": self.level,
            "members": self.members,
            "dose_time_h": num(self.dose_time_h),
            "dose_time_low_h": num(self.dose_time_low_h),
            "dose_time_high_h": num(self.dose_time_high_h),
            "probability_dose_by_harvest": self.probability_dose_by_harvest,
            "harvest_cells": self.harvest_cells,
            "harvest_cells_low": self.harvest_cells_low,
            "harvest_cells_high": self.harvest_cells_high,
            "horizon_end_h": self.horizon_end_h,
            "input_plan": self.input_plan,
            "gp_variance_used": self.gp_variance_used,
        }


class HarvestForecaster:
    """Builds the ensemble integrator of ``model`` once; :meth:`forecast` per call.

    Args:
        model: a mechanistic model (e.g. :class:`~plant_models.tcell.TCellExpansionModel`)
            or a :class:`~plant_models.hybrid.HybridModel`, with states ``viable_cells``
            and ``volume``. Its ``process`` (if any) gives the default dose and harvest.
        config: settings (default :class:`ForecastConfig`).
        factor_names: model parameters whose log-factor the estimate carries, in the
            estimator's order (default ``("mu_max",)``).
    """

    def __init__(
        self,
        model: Any,
        config: ForecastConfig | None = None,
        factor_names: Sequence[str] = ("mu_max",),
    ) -> None:
        self.model = model
        self.config = config if config is not None else ForecastConfig()
        self.state_names: tuple[str, ...] = tuple(model.state_names)
        self.input_names: tuple[str, ...] = tuple(model.input_names)
        for needed in ("viable_cells", "volume"):
            if needed not in self.state_names:
                raise ModelError(
                    f"forecast: the model {getattr(model, 'name', model)!r} has no state "
                    f"{needed!r}; the harvest forecast needs viable_cells and volume."
                )
        self.factor_names = tuple(factor_names)
        self.nx, self.nu, self.nf = (
            len(self.state_names),
            len(self.input_names),
            len(self.factor_names),
        )
        nominal = []
        for name in self.factor_names:
            value = getattr(model.parameters, name, None)
            if value is None or not (math.isfinite(float(value)) and float(value) > 0):
                raise ModelError(
                    f"forecast: factor on {name!r}, but the model has no positive parameter "
                    "of that name."
                )
            nominal.append(float(value))
        self._nominal = np.array(nominal, dtype=float)
        corrections = tuple(getattr(model, "corrections", ()))
        self.corrected_rates: tuple[str, ...] = tuple(c.rate for c in corrections)
        self.nr = len(corrections)
        self.gp_variance_used = bool(self.nr and self.config.gp_variance)
        self._mechanistic = getattr(model, "base", model) if self.nr else model
        specs = {s.name: s for s in model.states}
        self._low = np.array([specs[n].low for n in self.state_names], dtype=float)
        self._high = np.array([specs[n].high for n in self.state_names], dtype=float)
        self._iv = self.state_names.index("viable_cells")
        self._ivol = self.state_names.index("volume")
        self._noise_abs = np.zeros(self.nx)
        self._noise_rel = np.zeros(self.nx)
        for i, name in enumerate(self.state_names):
            if name in self.config.process_noise:
                self._noise_abs[i], self._noise_rel[i] = self.config.process_noise[name]
        unknown = [n for n in self.config.process_noise if n not in self.state_names]
        if unknown:
            raise ConfigError(
                f"forecast config: process_noise names {unknown}, which are not states of the "
                f"model; states are {list(self.state_names)}."
            )
        self._step = self._build_step().map(self.config.members)
        self._residuals = self._build_residuals().map(self.config.members) if self.nr else None

    # -- construction ------------------------------------------------------------------
    def _build_step(self) -> ca.Function:
        """``(t, x, u, logf, r) -> x_next`` over one ``step_h`` with RK4 sub-steps; ``r``
        (nr,) are the GP corrections of the corrected rates, held over the step."""
        t = ca.SX.sym("t")
        x = ca.SX.sym("x", self.nx)
        u = ca.SX.sym("u", self.nu)
        logf = ca.SX.sym("logf", self.nf)
        corr = ca.SX.sym("r", self.nr)
        base = self._mechanistic
        if self.nf:
            par, psym = base.symbolic_parameters(self.factor_names)
            rhs = ca.Function("rhs", [t, x, u, psym, corr], [self._xdot(par, t, x, u, corr)])
            ptarget = ca.DM(self._nominal) * ca.exp(logf)

            def f(tt: Any, xx: Any) -> Any:
                return rhs(tt, xx, u, ptarget, corr)

        else:

            def f(tt: Any, xx: Any) -> Any:
                return self._xdot(base.parameters, tt, xx, u, corr)

        cfg = self.config
        m = max(1, math.ceil(cfg.step_h / cfg.max_substep_h - 1e-9))
        xk = rk4(f, t, x, cfg.step_h, m)
        return ca.Function(
            "forecast_step", [t, x, u, logf, corr], [xk], ["t", "x", "u", "logf", "r"], ["x_next"]
        )

    def _xdot(self, par: Any, t: Any, x: Any, u: Any, corr: Any) -> Any:
        """Mechanistic balances with the corrected rates ``rate + r`` (additive) or
        ``rate * (1 + r)`` (multiplicative)."""
        base = self._mechanistic
        xs = [x[i] for i in range(self.nx)]
        us = [u[i] for i in range(self.nu)]
        r = dict(base.rates(t, xs, us, par, CASADI_OPS))
        for j, c in enumerate(getattr(self.model, "corrections", ())):
            if c.mode == "additive":
                r[c.rate] = r[c.rate] + corr[j]
            else:
                r[c.rate] = r[c.rate] * (1.0 + corr[j])
        return ca.vertcat(*base.balances(t, xs, us, r, par, CASADI_OPS))

    def _build_residuals(self) -> ca.Function:
        """``(t, x, u) -> (mean, std)`` of every residual (nr,), in the residual's unit."""
        t = ca.SX.sym("t")
        x = ca.SX.sym("x", self.nx)
        u = ca.SX.sym("u", self.nu)
        xs = [x[i] for i in range(self.nx)]
        us = [u[i] for i in range(self.nu)]
        means, stds = [], []
        for c in self.model.corrections:
            gp = c.residual.to_casadi(name=f"forecast_{c.rate}")
            mean, var = gp(ca.vertcat(*self.model.features(t, xs, us, c.residual.feature_names)))
            means.append(mean)
            stds.append(ca.sqrt(ca.fmax(var, 0.0)))
        return ca.Function(
            "forecast_residuals",
            [t, x, u],
            [ca.vertcat(*means), ca.vertcat(*stds)],
            ["t", "x", "u"],
            ["mean", "std"],
        )

    # -- the forecast ------------------------------------------------------------------
    def forecast(
        self,
        estimate: Any,
        *,
        inputs: Mapping[str, float] | None = None,
        plan: InputPlan | InputPolicy | None = None,
        dose_cells: float | None = None,
        harvest_time_h: float | None = None,
    ) -> HarvestForecast:
        """Forecast from an estimate.

        Args:
            estimate: an :class:`~controller.numerics.estimator.EstimatorResult` (``time_h``,
                ``state``, ``factors``, ``covariance`` over ``[x; log factors; ...]``).
            inputs: the inputs applied now (held when no ``plan`` is given).
            plan: future inputs (e.g. :meth:`InputPlan.from_mpc`) or a feedback law applied
                to every member (:class:`InputPolicy`); wins over ``inputs``.
            dose_cells: the dose, 1e9 viable cells (default: the model's process).
            harvest_time_h: scheduled harvest, h (default: the model's process).

        Raises:
            ModelError: missing or non-finite state, wrong covariance shape, missing inputs;
            ConfigError: dose or harvest time not positive and finite.
        """
        import time

        started = time.perf_counter()
        cfg = self.config
        dose, harvest = self._targets(dose_cells, harvest_time_h)
        t0 = float(estimate.time_h)
        if not math.isfinite(t0):
            raise ModelError(f"forecast: the estimate's time {t0!r} is not finite.")
        mean, cov = self._posterior(estimate)
        source, inputs_at = self._plan(plan, inputs, t0)
        n = cfg.members
        rng = np.random.default_rng(np.random.SeedSequence([8231, cfg.seed]))
        d = self.nx + self.nf
        half = rng.standard_normal((n // 2, d))
        z = np.concatenate([half, -half]) @ _sqrt_psd(cov).T + mean
        x = np.clip(z[:, : self.nx], self._low, self._high)
        logf = z[:, self.nx :]
        xi_half = rng.standard_normal((self.nr, n // 2))
        xi = np.concatenate([xi_half, -xi_half], axis=1) if self.gp_variance_used else 0.0
        end = max(t0 + cfg.horizon_h, harvest)
        steps = max(1, math.ceil((end - t0) / cfg.step_h - 1e-9))
        times = np.asarray(t0 + cfg.step_h * np.arange(steps + 1), dtype=np.float64)
        cells = np.full((steps + 1, n), np.nan)
        cells[0] = x[:, self._iv] * x[:, self._ivol]
        sq = math.sqrt(cfg.step_h)
        walk = cfg.factor_random_walk * sq
        noisy = bool(np.any(self._noise_abs > 0) or np.any(self._noise_rel > 0))
        last = steps
        for k in range(steps):
            u = inputs_at(float(times[k]), x)
            corr = np.zeros((self.nr, n))
            if self._residuals is not None:
                mean, std = self._residuals(float(times[k]), x.T, u)
                corr = np.asarray(mean, dtype=float) + xi * np.asarray(std, dtype=float)
            out = self._step(float(times[k]), x.T, u, logf.T, corr)
            x = np.asarray(out, dtype=float).T
            if noisy:
                scale = (self._noise_abs + self._noise_rel * np.abs(x)) * sq
                x = x + scale * rng.standard_normal(x.shape)
            if not np.all(np.isfinite(x)):
                bad = int(np.sum(~np.all(np.isfinite(x), axis=1)))
                raise ModelError(
                    f"forecast: {bad} ensemble member(s) became non-finite at "
                    f"{times[k + 1]:.4g} h; lower max_substep_h or check the inputs."
                )
            x = np.clip(x, self._low, self._high)
            if walk > 0 and self.nf:
                logf = logf + walk * rng.standard_normal(logf.shape)
            cells[k + 1] = x[:, self._iv] * x[:, self._ivol]
            if times[k + 1] >= harvest and np.all(np.max(cells[: k + 2], axis=0) >= dose):
                last = k + 1
                break
        times, cells = times[: last + 1], cells[: last + 1]
        dose_times = _crossing_times(times, cells, dose)
        at_harvest = np.array([np.interp(harvest, times, cells[:, j]) for j in range(n)])
        lo_q, hi_q = (1.0 - cfg.level) / 2.0, 1.0 - (1.0 - cfg.level) / 2.0
        dt_lo, dt_med, dt_hi = _quantiles(dose_times, (lo_q, 0.5, hi_q))
        hc_lo, hc_med, hc_hi = (float(v) for v in np.quantile(at_harvest, (lo_q, 0.5, hi_q)))
        band = np.quantile(cells, (lo_q, 0.5, hi_q), axis=1)
        result = HarvestForecast(
            time_h=t0,
            dose_cells=dose,
            harvest_time_h=harvest,
            level=cfg.level,
            members=n,
            dose_time_h=dt_med,
            dose_time_low_h=dt_lo,
            dose_time_high_h=dt_hi,
            probability_dose_by_harvest=float(np.mean(dose_times <= harvest + 1e-9)),
            harvest_cells=hc_med,
            harvest_cells_low=hc_lo,
            harvest_cells_high=hc_hi,
            times_h=times,
            cells_median=band[1],
            cells_low=band[0],
            cells_high=band[2],
            horizon_end_h=float(times[-1]),
            input_plan=source,
            gp_variance_used=self.gp_variance_used,
            elapsed_s=time.perf_counter() - started,
        )
        log.debug(
            "forecast at %.1f h: dose %.1f h [%.1f, %.1f], P(by harvest) %.2f",
            t0,
            dt_med,
            dt_lo,
            dt_hi,
            result.probability_dose_by_harvest,
        )
        return result

    def _targets(
        self, dose_cells: float | None, harvest_time_h: float | None
    ) -> tuple[float, float]:
        process = getattr(self.model, "process", None)
        dose = dose_cells if dose_cells is not None else getattr(process, "dose_cells", None)
        harvest = (
            harvest_time_h if harvest_time_h is not None else getattr(process, "harvest_time", None)
        )
        if dose is None or harvest is None:
            raise ConfigError(
                "forecast: the model has no process with dose_cells and harvest_time; "
                "pass dose_cells and harvest_time_h."
            )
        if not (math.isfinite(float(dose)) and float(dose) > 0):
            raise ConfigError(f"forecast: dose_cells must be positive, got {dose!r} (1e9 cells).")
        if not (math.isfinite(float(harvest)) and float(harvest) > 0):
            raise ConfigError(f"forecast: harvest_time_h must be positive, got {harvest!r} h.")
        return float(dose), float(harvest)

    def _posterior(self, estimate: Any) -> tuple[FloatArray, FloatArray]:
        """Mean and covariance of ``[x; log factors]`` from the estimate."""
        state = estimate.state
        missing = [n for n in self.state_names if n not in state]
        if missing:
            raise ModelError(
                f"forecast: the estimate lacks states {missing}; expected {list(self.state_names)}."
            )
        mean_x = np.array([float(state[n]) for n in self.state_names], dtype=float)
        factors = dict(getattr(estimate, "factors", {}) or {})
        order = list(factors)
        absent = [n for n in self.factor_names if n not in factors]
        if absent:
            raise ModelError(
                f"forecast: the estimate carries no factor on {absent}; build the forecaster "
                f"with factor_names={tuple(order)!r}."
            )
        logf = np.array([math.log(float(factors[n])) for n in self.factor_names], dtype=float)
        cov_in = np.asarray(estimate.covariance, dtype=float)
        size = self.nx + len(order)
        if cov_in.ndim != 2 or cov_in.shape[0] != cov_in.shape[1] or cov_in.shape[0] < size:
            raise ModelError(
                f"forecast: covariance of shape {cov_in.shape}; expected at least ({size}, {size}) "
                "over [states; log factors; ...] as the estimator reports it."
            )
        index = list(range(self.nx)) + [self.nx + order.index(n) for n in self.factor_names]
        cov = cov_in[np.ix_(index, index)]
        mean = np.concatenate([mean_x, logf])
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
            raise ModelError("forecast: the estimate's mean and covariance must be finite.")
        if np.min(np.linalg.eigvalsh(0.5 * (cov + cov.T))) < -1e-9 * max(
            1.0, float(np.max(np.abs(cov)))
        ):
            raise ModelError("forecast: the estimate's covariance is not positive semi-definite.")
        return mean, 0.5 * (cov + cov.T)

    def _plan(
        self, plan: InputPlan | InputPolicy | None, inputs: Mapping[str, float] | None, t0: float
    ) -> tuple[str, Any]:
        """(source, ``(t, x (n, nx)) -> u`` as (nu,) or (nu, n)) for the integrator."""
        if plan is None:
            if inputs is None:
                raise ModelError("forecast: give the present inputs, an input plan or a policy.")
            plan = InputPlan.hold(inputs, t0)
            source = "hold"
        elif isinstance(plan, InputPlan):
            source = "plan"
        else:
            policy = plan
            n, nu = self.config.members, self.nu

            def feedback(t: float, x: FloatArray) -> FloatArray:
                u = np.asarray(policy(t, x), dtype=float)
                if u.shape != (n, nu) or not np.all(np.isfinite(u)):
                    raise ModelError(
                        f"forecast: the input policy returned shape {u.shape} (expected "
                        f"({n}, {nu}), inputs {list(self.input_names)}) or non-finite values."
                    )
                return np.ascontiguousarray(u.T)

            return "policy", feedback
        missing = [n for n in self.input_names if n not in plan.names]
        unknown = [n for n in plan.names if n not in self.input_names]
        if missing or unknown:
            raise ModelError(
                f"forecast: inputs have missing {missing} / unknown {unknown}; "
                f"expected {list(self.input_names)}."
            )
        fixed = plan
        return source, lambda t, x: fixed.at(t, self.input_names)


def _sqrt_psd(cov: FloatArray) -> FloatArray:
    """A square root ``L`` with ``L L' = cov`` for a positive semi-definite matrix."""
    w, v = np.linalg.eigh(cov)
    return np.asarray(v * np.sqrt(np.maximum(w, 0.0)), dtype=float)


def _crossing_times(times: FloatArray, cells: FloatArray, dose: float) -> FloatArray:
    """First time each column of ``cells`` (k, n) reaches ``dose``; ``inf`` if never.
    Linear interpolation in log cells between grid points."""
    n = cells.shape[1]
    out = np.full(n, np.inf)
    above = cells >= dose
    for j in range(n):
        hits = np.flatnonzero(above[:, j])
        if hits.size == 0:
            continue
        k = int(hits[0])
        if k == 0:
            out[j] = times[0]
            continue
        c0, c1 = max(cells[k - 1, j], 1e-12), max(cells[k, j], 1e-12)
        frac = (math.log(dose) - math.log(c0)) / (math.log(c1) - math.log(c0))
        out[j] = times[k - 1] + min(max(frac, 0.0), 1.0) * (times[k] - times[k - 1])
    return out


def _quantiles(values: FloatArray, qs: Sequence[float]) -> list[float]:
    """Quantiles of values that may hold ``inf`` (a quantile landing on ``inf`` is ``inf``)."""
    finite = np.isfinite(values)
    if not np.any(finite):
        return [math.inf for _ in qs]
    big = float(np.max(values[finite])) * 10.0 + 1e6
    filled = np.where(finite, values, big)
    out = []
    for q in qs:
        v = float(np.quantile(filled, q))
        out.append(math.inf if v > big * 0.5 else v)
    return out

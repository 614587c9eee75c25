"""Calibration of a process model's population parameters to batch records.

The library behind ``hmpc calibrate`` (:func:`controller.cli.cmd_calibrate`): a maximum a
posteriori (MAP) estimate of selected kinetic parameters over all batches, with per-batch
initial states, confidence intervals, an identifiability report and a 24 h-ahead check on
held-out batches. Pure numerics: the records come in as
:class:`controller.training.batches.BatchRecord` (read by ``load_batch_records``), the files
are written by :mod:`controller.training.calibration_report`.

The problem (docs/calibration.md):

* **Parameters** ``theta`` (selected fields of the plug-in's parameter dataclass) are
  estimated on the log scale, ``theta = exp(l)``. Each has a log-normal **prior** centred
  on the value of the parameter file (the nominal) whose ~95 % range reaches the farther
  end of the field's declared physical range ``[low, high]``
  (:func:`plant_models.config.param`): ``sd_log = max(ln(high/nominal), ln(nominal/low))
  / 1.96``, sides with ``low = 0`` or an infinite ``high`` left out (a factor 10 when
  neither side is finite). The search stays inside ``[low, high]`` and within 4 prior sds.
* **Initial states** of each batch: by default (``initial="estimate"``) every state that a
  measurement sees is free (no prior; its first measurements pin it), the others and the
  volume are taken from the record at the first row
  (:func:`controller.training.batches.reconstruct_states`, assays sampled then override
  it); ``initial="measured"`` fixes them all that way.
* **Measurements**: the online probes (record columns ``measured_<name>``) and the assays
  (``assays.csv``) that the plug-in declares in its ``sensors``, with their noise
  ``sd = absolute + relative * |value|``, first at the measured values, then (twice) at the
  fitted model's predictions and the fit repeated (weights from the noisy readings favour
  low readings). A measurement is a model state, or ``viability`` (viable over viable +
  dead, or over total cells).
* **Model**: the plug-in's model with the recorded inputs held over each record step,
  RK4 (as :func:`plant_models.hybrid.discretize`), states kept >= 0; the sensitivities to
  the initial states and ``l`` are carried along the steps (CasADi), and
  Levenberg-Marquardt with bound projection minimises ``0.5 * |r|^2`` with ``r`` the
  normalised misfits and the prior terms.

The **Laplace** interval is ``l_hat +- 1.96 sd`` with the covariance ``(J^T J)^-1`` at the
MAP (Gauss-Newton Hessian, initial states included and marginalised). The **profile** of a
parameter fixes it on a grid around the MAP and re-optimises everything else; its 95 %
interval is where ``2 (cost - cost_MAP)`` stays below the chi-square threshold 3.84. A
profile is **flat** on a side when the data's part of it (the profile without the
parameter's own prior term) does not rise by 3.84 within the prior's 95 % range: the data
do not see the parameter there, and its interval is the prior's. Pairs whose Laplace
correlation exceeds 0.95 in magnitude are **flagged** (only a combination of the two is
identified).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import casadi as ca
import numpy as np
import numpy.typing as npt

from plant_models.base import MechanisticModel, rk4
from plant_models.errors import ConfigError, FitError
from plant_models.process import ProcessPlugin

__all__ = [
    "CHI2_95",
    "INITIAL_MODES",
    "BatchFit",
    "CalibrationResult",
    "CalibrationSettings",
    "ParameterEstimate",
    "Prior",
    "Profile",
    "batch_observations",
    "calibrate",
    "parameter_prior",
    "validate_24h_mechanistic",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: 95 % quantile of the chi-square distribution with one degree of freedom.
CHI2_95 = 3.841458820694124
#: two-sided 95 % normal quantile
Z95 = 1.959963984540054
#: How a batch's initial states are set: estimated, or taken from the first measurements.
INITIAL_MODES = ("estimate", "measured")
#: Prior sd (log scale) of a parameter whose declared range has no finite side.
DEFAULT_PRIOR_SD = math.log(10.0) / Z95
#: The search stays within this many prior sds of the nominal value.
SEARCH_SDS = 4.0


# -- priors ---------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Prior:
    """Log-normal prior of one parameter: ``ln theta ~ N(ln centre, sd_log^2)``; the search
    is kept within ``[low, high]``.

    Attributes:
        name, unit: the parameter and its canonical unit.
        centre: the parameter file's (nominal) value.
        sd_log: standard deviation of ``ln theta``.
        low, high: search bounds (the declared physical range, within 4 sds of the centre).
    """

    name: str
    unit: str
    centre: float
    sd_log: float
    low: float
    high: float

    @property
    def range95(self) -> tuple[float, float]:
        """The prior's 95 % range, within the search bounds."""
        return (
            max(self.centre * math.exp(-Z95 * self.sd_log), self.low),
            min(self.centre * math.exp(Z95 * self.sd_log), self.high),
        )


def parameter_prior(parameters: Any, name: str) -> Prior:
    """The prior of parameter ``name`` of the parameter dataclass instance ``parameters``
    (module docstring: centred on its value, the declared range as ~95 % range).

    Raises:
        ConfigError: not a parameter of the dataclass, or a value <= 0 (no log scale).
    """
    fields = {f.name: f for f in dataclasses.fields(parameters)}
    if name not in fields:
        raise ConfigError(
            f"--parameters: {name!r} is not a parameter of the model; known: {sorted(fields)}"
        )
    meta = fields[name].metadata
    nominal = float(getattr(parameters, name))
    if not (math.isfinite(nominal) and nominal > 0):
        raise ConfigError(
            f"--parameters: {name} = {nominal!r} in the parameter file; calibration works on "
            "the log scale and needs a positive nominal value (set a small positive prior "
            "guess in the file)"
        )
    low_meta, high_meta = meta.get("low"), meta.get("high")
    low = 0.0 if low_meta is None else float(low_meta)
    high = math.inf if high_meta is None else float(high_meta)
    sides = []
    if math.isfinite(high) and high > nominal:
        sides.append(math.log(high / nominal))
    if low > 0 and low < nominal:
        sides.append(math.log(nominal / low))
    sd = max(sides) / Z95 if sides else DEFAULT_PRIOR_SD
    lo = max(low, nominal * math.exp(-SEARCH_SDS * sd))
    if lo <= 0:  # low = 0 and nothing else: keep the log finite
        lo = nominal * math.exp(-SEARCH_SDS * sd)
    hi = min(high, nominal * math.exp(SEARCH_SDS * sd))
    return Prior(name, str(meta.get("unit", "")), nominal, sd, lo, hi)


# -- observations ---------------------------------------------------------------------------


def _observation_function(name: str, model: MechanisticModel[Any]) -> tuple[Any, tuple[str, ...]]:
    """``(h, states)``: ``h(X)`` the measured quantity from states ``X`` (nx x n, CasADi) and
    the states it reads; ``(None, ())`` when the model cannot predict ``name``."""
    states = model.state_names
    if name in states:
        i = states.index(name)
        return (lambda x: x[i, :]), (name,)
    if name == "viability" and "viable_cells" in states:
        iv = states.index("viable_cells")
        if "total_cells" in states:
            it = states.index("total_cells")
            return (lambda x: x[iv, :] / ca.fmax(x[it, :], 1e-9)), ("viable_cells", "total_cells")
        if "dead_cells" in states:
            idd = states.index("dead_cells")
            return (
                lambda x: x[iv, :] / ca.fmax(x[iv, :] + x[idd, :], 1e-9),
                ("viable_cells", "dead_cells"),
            )
    return None, ()


def batch_observations(
    record: Any, model: MechanisticModel[Any], plugin: ProcessPlugin
) -> dict[str, Any]:
    """The measurements of one batch record that the model predicts, with their noise.

    Returns:
        ``name``, ``source`` (``online``/``assay``), ``time`` (h), ``value``, ``sd`` (at
        the measured value) and ``noise`` (absolute and relative part, n x 2) as arrays, one
        entry per measurement, and ``unused`` (measured names the model does not predict).
    """
    steps = record.steps
    t = steps["time"].to_numpy(float)
    names: list[str] = []
    sources: list[str] = []
    times: list[float] = []
    values: list[float] = []
    sds: list[float] = []
    noise_parts: list[tuple[float, float]] = []
    unused: set[str] = set()
    for name, noise in plugin.sensors.online.items():
        column = f"measured_{name}"
        if column not in steps.columns:
            continue
        if _observation_function(name, model)[0] is None:
            unused.add(name)
            continue
        y = steps[column].to_numpy(float)
        for ti, yi in zip(t, y, strict=True):
            sd = noise.absolute + noise.relative * abs(yi)
            if math.isfinite(yi) and sd > 0:
                names.append(name)
                sources.append("online")
                times.append(float(ti))
                values.append(float(yi))
                sds.append(float(sd))
                noise_parts.append((noise.absolute, noise.relative))
    assays = record.assays
    for name, noise in plugin.sensors.assays.items():
        sel = assays[assays["name"] == name] if len(assays) else assays
        if not len(sel):
            continue
        if _observation_function(name, model)[0] is None:
            unused.add(name)
            continue
        if "unit" in sel.columns:
            wrong = sorted({str(u) for u in sel["unit"] if str(u) != noise.unit})
            if wrong:
                raise ConfigError(
                    f"batch {record.name}: assay {name!r} in {wrong}, but the process's assay "
                    f"is in {noise.unit!r}; convert the values (never converted silently)"
                )
        for ts, yi in zip(
            sel["sample_time"].to_numpy(float), sel["value"].to_numpy(float), strict=True
        ):
            sd = noise.absolute + noise.relative * abs(yi)
            if math.isfinite(yi) and math.isfinite(ts) and t[0] - 1e-9 <= ts <= t[-1] + 1e-9:
                if sd > 0:
                    names.append(name)
                    sources.append("assay")
                    times.append(float(ts))
                    values.append(float(yi))
                    sds.append(float(sd))
                    noise_parts.append((noise.absolute, noise.relative))
    return {
        "name": np.array(names, dtype=object),
        "source": np.array(sources, dtype=object),
        "time": np.array(times, dtype=float),
        "value": np.array(values, dtype=float),
        "sd": np.array(sds, dtype=float),
        "noise": np.array(noise_parts, dtype=float).reshape(-1, 2),
        "unused": sorted(unused),
    }


def _first_states(record: Any, model: MechanisticModel[Any]) -> FloatArray:
    """The states at the record's first row from measurements: the reconstruction of
    :func:`controller.training.batches.reconstruct_states`, with assays sampled at the first
    time taking precedence (an assay is more precise than a probe)."""
    from controller.training.batches import reconstruct_states

    x0 = reconstruct_states(record, model)[0].copy()
    t0 = float(record.steps["time"].iloc[0])
    assays = record.assays
    if len(assays):
        first = assays[np.abs(assays["sample_time"].to_numpy(float) - t0) < 1e-6]
        for name, group in first.groupby("name"):
            if name in model.state_names:
                x0[model.state_names.index(str(name))] = float(group["value"].astype(float).mean())
        viability = first[first["name"] == "viability"]
        if len(viability) and "viable_cells" in model.state_names:
            v = float(np.clip(viability["value"].astype(float).mean(), 0.05, 1.0))
            xv = x0[model.state_names.index("viable_cells")]
            if "total_cells" in model.state_names:
                x0[model.state_names.index("total_cells")] = xv / v
            elif "dead_cells" in model.state_names:
                x0[model.state_names.index("dead_cells")] = xv * (1.0 - v) / v
    return np.maximum(x0, 0.0)


# -- the per-batch CasADi problem --------------------------------------------------------


class _BatchProblem:
    """One batch: its measurements and ``(log theta, x0) -> (predictions, d/dlog theta,
    d/dx0)`` as a CasADi function (single shooting over the record's steps)."""

    def __init__(
        self,
        record: Any,
        model: MechanisticModel[Any],
        plugin: ProcessPlugin,
        names: Sequence[str],
        initial: str,
    ) -> None:
        self.name = str(record.name)
        self.model = model
        steps = record.steps
        self.t = steps["time"].to_numpy(float)
        self.u = steps[list(model.input_names)].to_numpy(float)
        self.obs = batch_observations(record, model, plugin)
        if self.obs["value"].size == 0:
            raise ConfigError(
                f"batch {self.name}: no measurement the model predicts (online "
                f"{sorted(plugin.sensors.online)}, assays {sorted(plugin.sensors.assays)})"
            )
        self.x0_ref = _first_states(record, model)
        seen: set[str] = set()
        for name in dict.fromkeys(self.obs["name"].tolist()):
            seen |= set(_observation_function(str(name), model)[1])
        if initial == "estimate":
            self.free = [i for i, s in enumerate(model.state_names) if s in seen and s != "volume"]
        else:
            self.free = []
        self.scale = np.array(
            [max(abs(self.x0_ref[i]), self._typical_sd(model.state_names[i])) for i in self.free]
        )
        self._fun = self._build(list(names))

    def _typical_sd(self, state: str) -> float:
        sel = self.obs["name"] == state
        return float(np.median(self.obs["sd"][sel])) if sel.any() else 1e-3

    def _build(self, names: list[str]) -> ca.Function:
        """``(log theta, x0) -> (y, dy/dlog theta, dy/dx0)``. The sensitivities of the states
        to ``w = [x0, log theta]`` are carried along the steps (forward sensitivity of the
        discrete RK4 map, exact), so a Jacobian costs little more than a simulation."""
        model = self.model
        nx, nu, npar = model.nx, model.nu, len(names)
        nw = nx + npar
        f = model.dynamics(names)
        dt_max = float(np.max(np.diff(self.t)))
        substeps = max(4, math.ceil(dt_max / 0.25))
        x = ca.SX.sym("x", nx)
        sens = ca.SX.sym("sens", nx * nw)  # d x / d w, column-major nx x nw
        t = ca.SX.sym("t")
        h = ca.SX.sym("h")
        u = ca.SX.sym("u", nu)
        lt = ca.SX.sym("lt", npar)
        p = ca.exp(lt)
        xn = rk4(lambda tk, xk: f(tk, xk, u, p)[0], t, x, h, substeps)
        a = ca.jacobian(xn, x)
        b = ca.jacobian(xn, lt)
        s_mat = ca.reshape(sens, nx, nw)
        s_next = ca.mtimes(a, s_mat) + ca.horzcat(ca.SX(nx, nx), b)
        keep = xn > 0  # the states are kept >= 0: a clipped state does not move
        s_next = s_next * ca.repmat(keep, 1, nw)
        step = ca.Function(
            "calibration_step",
            [ca.vertcat(x, sens), t, h, u, lt],
            [ca.vertcat(ca.fmax(xn, 0.0), ca.reshape(s_next, nx * nw, 1))],
        )
        n = self.t.size
        sim = step.mapaccum("calibration_sim", n - 1)
        lt_in = ca.MX.sym("log_theta", npar)
        x0 = ca.MX.sym("x0", nx)
        s0 = ca.DM(np.hstack([np.eye(nx), np.zeros((nx, npar))]).reshape(-1, order="F"))
        path = sim(
            ca.vertcat(x0, s0),
            ca.DM(self.t[:-1]).T,
            ca.DM(np.diff(self.t)).T,
            ca.DM(self.u[:-1].T),
            lt_in,
        )
        full = ca.horzcat(ca.vertcat(x0, s0), path)  # (nx + nx nw) x n, every record time
        xs, ss = full[:nx, :], full[nx:, :]
        parts, jparts = [], []
        order: list[npt.NDArray[np.intp]] = []
        xo_sym = ca.SX.sym("xo", nx)
        fun_of_name = {}
        for name in dict.fromkeys(self.obs["name"].tolist()):
            sel = np.flatnonzero(self.obs["name"] == name)
            weights = self._interpolation(self.obs["time"][sel])
            fun, _ = _observation_function(str(name), model)
            fun_of_name[str(name)] = fun
            hx = fun(xo_sym)
            hfun = ca.Function("observe", [xo_sym], [hx, ca.gradient(hx, xo_sym)]).map(sel.size)
            xo = ca.mtimes(xs, weights)  # nx x m
            so = ca.mtimes(ss, weights)  # nx nw x m
            y, g = hfun(xo)
            jac_t = ca.MX(nw, sel.size)
            for i in range(nx):  # dy/dw^T = sum_i g_i * d x_i / d w
                jac_t = jac_t + so[i::nx, :] * ca.repmat(g[i, :], nw, 1)
            parts.append(y.T)
            jparts.append(jac_t.T)
            order.append(sel)
        self.order = np.concatenate(order)
        y_all = ca.vertcat(*parts)
        j_all = ca.vertcat(*jparts)
        self._predict = self._build_predict(names, substeps, fun_of_name)
        return ca.Function(
            "calibration_batch",
            [lt_in, x0],
            [y_all, j_all[:, nx:], j_all[:, :nx]],
            ["log_theta", "x0"],
            ["y", "dy_dlog_theta", "dy_dx0"],
        )

    def _build_predict(
        self, names: list[str], substeps: int, funs: Mapping[str, Any]
    ) -> ca.Function:
        """``(log theta, x0) -> y`` without sensitivities (the cheap misfit evaluation)."""
        model = self.model
        f = model.dynamics(names)
        x = ca.SX.sym("x", model.nx)
        t = ca.SX.sym("t")
        h = ca.SX.sym("h")
        u = ca.SX.sym("u", model.nu)
        lt = ca.SX.sym("lt", len(names))
        xn = rk4(lambda tk, xk: f(tk, xk, u, ca.exp(lt))[0], t, x, h, substeps)
        step = ca.Function("calibration_predict_step", [x, t, h, u, lt], [ca.fmax(xn, 0.0)])
        sim = step.mapaccum("calibration_predict_sim", self.t.size - 1)
        lt_in = ca.MX.sym("log_theta", len(names))
        x0 = ca.MX.sym("x0", model.nx)
        path = sim(x0, ca.DM(self.t[:-1]).T, ca.DM(np.diff(self.t)).T, ca.DM(self.u[:-1].T), lt_in)
        xs = ca.horzcat(x0, path)
        parts = []
        for name in dict.fromkeys(self.obs["name"].tolist()):
            sel = np.flatnonzero(self.obs["name"] == name)
            parts.append(
                funs[str(name)](ca.mtimes(xs, self._interpolation(self.obs["time"][sel]))).T
            )
        return ca.Function(
            "calibration_predict", [lt_in, x0], [ca.vertcat(*parts)], ["log_theta", "x0"], ["y"]
        )

    def _interpolation(self, times: FloatArray) -> ca.DM:
        """Sparse weights (n_steps x len(times)): linear interpolation between record times."""
        n = self.t.size
        rows: list[int] = []
        cols: list[int] = []
        vals: list[float] = []
        for j, ts in enumerate(times):
            k = int(np.clip(np.searchsorted(self.t, ts, side="right") - 1, 0, n - 1))
            if k >= n - 1 or abs(ts - self.t[k]) < 1e-9:
                rows.append(k)
                cols.append(j)
                vals.append(1.0)
                continue
            w = (ts - self.t[k]) / (self.t[k + 1] - self.t[k])
            rows += [k, k + 1]
            cols += [j, j]
            vals += [1.0 - w, w]
        dense = np.zeros((n, len(times)))
        for r, c, v in zip(rows, cols, vals, strict=True):
            dense[r, c] += v
        return ca.sparsify(ca.DM(dense))

    def x0(self, s: FloatArray) -> FloatArray:
        x0 = self.x0_ref.copy()
        if self.free:
            x0[self.free] = self.x0_ref[self.free] + self.scale * s
        return x0

    def s_bounds(self) -> tuple[FloatArray, FloatArray]:
        lo = -self.x0_ref[self.free] / self.scale
        return lo, np.full(len(self.free), np.inf)

    def reweight(self, log_theta: FloatArray, s: FloatArray) -> None:
        """Noise sds at the model's predictions instead of the measured values (weights
        that do not depend on the noise itself: with sds at the measured values, readings
        that happen to be low weigh more and bias the fit)."""
        pred = self.predict(log_theta, s)
        sd = self.obs["noise"][:, 0] + self.obs["noise"][:, 1] * np.abs(pred)
        ok = np.isfinite(sd) & (sd > 0)
        self.obs["sd"] = np.where(ok, sd, self.obs["sd"])

    def misfits(self, log_theta: FloatArray, s: FloatArray) -> FloatArray:
        """Normalised misfits (n_obs,)."""
        return (self.predict(log_theta, s) - self.obs["value"]) / self.obs["sd"]

    def evaluate(
        self, log_theta: FloatArray, s: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """Normalised misfits (n_obs,) and their Jacobians wrt log theta and s."""
        y, jl, jx = self._fun(log_theta, self.x0(s))
        pred = np.empty(self.obs["value"].size)
        pred[self.order] = np.asarray(y, dtype=float).ravel()
        jl_full = np.empty((pred.size, log_theta.size))
        jl_full[self.order] = np.asarray(jl, dtype=float)
        jx_full = np.empty((pred.size, self.model.nx))
        jx_full[self.order] = np.asarray(jx, dtype=float)
        sd = self.obs["sd"]
        r = (pred - self.obs["value"]) / sd
        js = jx_full[:, self.free] * self.scale[None, :] if self.free else np.zeros((pred.size, 0))
        return r, jl_full / sd[:, None], js / sd[:, None]

    def predict(self, log_theta: FloatArray, s: FloatArray) -> FloatArray:
        """The model's predictions of the measurements (in their order)."""
        y = np.asarray(self._predict(log_theta, self.x0(s)), dtype=float).ravel()
        out = np.empty(y.size)
        out[self.order] = y
        return out


# -- settings and results -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CalibrationSettings:
    """What :func:`calibrate` estimates and how.

    Attributes:
        parameters: the population parameters to estimate (fields of the model's parameter
            dataclass).
        initial: ``estimate`` (each batch's measured states free) or ``measured`` (fixed at
            the first measurements).
        profiles: also compute the profile likelihoods (the slow part).
        profile_steps: at most this many profile points on each side of the MAP.
        correlation_threshold: pairs with a larger |correlation| are flagged.
        max_iterations: Levenberg-Marquardt iterations of the MAP fit.
    """

    parameters: tuple[str, ...]
    initial: str = "estimate"
    profiles: bool = True
    profile_steps: int = 12
    correlation_threshold: float = 0.95
    max_iterations: int = 300

    def __post_init__(self) -> None:
        object.__setattr__(self, "parameters", tuple(self.parameters))
        if not self.parameters:
            raise ConfigError("--parameters: name at least one parameter to calibrate")
        if len(set(self.parameters)) != len(self.parameters):
            raise ConfigError(f"--parameters: a name is listed twice: {list(self.parameters)}")
        if self.initial not in INITIAL_MODES:
            raise ConfigError(
                f"--initial must be one of {list(INITIAL_MODES)}, got {self.initial!r}"
            )
        if self.profile_steps < 2:
            raise ConfigError(f"profile_steps must be at least 2, got {self.profile_steps}")
        if not 0.0 < self.correlation_threshold < 1.0:
            raise ConfigError(
                f"correlation_threshold must lie in (0, 1), got {self.correlation_threshold}"
            )


@dataclasses.dataclass(frozen=True)
class Profile:
    """The profile of one parameter: its values on the grid, ``2 (cost - cost_MAP)`` (the
    posterior profile) and the same without the parameter's own prior term (the data's)."""

    values: FloatArray
    delta: FloatArray
    delta_data: FloatArray


@dataclasses.dataclass(frozen=True)
class ParameterEstimate:
    """The calibrated value of one parameter.

    Attributes:
        prior: its prior.
        value: the MAP value.
        sd_log: Laplace standard deviation of ``ln value``.
        laplace: Laplace 95 % interval.
        profile: profile-likelihood 95 % interval (an end that the profile did not reach
            within the search is the last value tried, and ``profile_open`` says which).
        profile_open: ``""``, ``"low"``, ``"high"`` or ``"both"``: ends not reached.
        flat: ``""``, ``"low"``, ``"high"`` or ``"both"``: sides on which the data's
            profile does not rise by the chi-square threshold within the prior's range.
        at_bound: the MAP sits at a search bound.
    """

    prior: Prior
    value: float
    sd_log: float
    laplace: tuple[float, float]
    profile: tuple[float, float] | None
    profile_open: str
    flat: str
    at_bound: bool

    @property
    def name(self) -> str:
        return self.prior.name

    @property
    def identifiable(self) -> bool:
        """Not flat on either side and not at a bound."""
        return not self.flat and not self.at_bound


@dataclasses.dataclass(frozen=True)
class BatchFit:
    """One batch's fit: the measurements, the model's predictions at the prior centre and
    at the MAP (each from its own initial states), and the initial states."""

    name: str
    observations: Mapping[str, Any]
    predicted_nominal: FloatArray
    predicted: FloatArray
    initial_states: Mapping[str, float]
    estimated_states: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CalibrationResult:
    """What :func:`calibrate` found.

    Attributes:
        estimates: per calibrated parameter (in the order asked).
        values: the calibrated parameter values by name.
        correlation: Laplace correlation matrix of ``ln theta`` (parameters x parameters).
        flagged_pairs: ``(a, b, correlation)`` with |correlation| above the threshold.
        profiles: name -> :class:`Profile` (empty without profiles).
        cost: ``0.5 |r|^2`` at the MAP; ``cost_nominal``: at the prior centre (initial
            states fitted there too).
        chi2_data: sum of squared normalised misfits at the MAP; ``observations`` their
            number: ``chi2_data / observations`` near 1 means the noise model fits.
        batches: per training batch.
        converged, message: the MAP fit's status.
    """

    settings: CalibrationSettings
    estimates: tuple[ParameterEstimate, ...]
    correlation: FloatArray
    flagged_pairs: tuple[tuple[str, str, float], ...]
    profiles: Mapping[str, Profile]
    cost: float
    cost_nominal: float
    chi2_data: float
    chi2_data_nominal: float
    observations: int
    batches: tuple[BatchFit, ...]
    converged: bool
    message: str
    unused_measurements: tuple[str, ...]

    @property
    def values(self) -> dict[str, float]:
        return {e.name: e.value for e in self.estimates}

    @property
    def flat_parameters(self) -> tuple[str, ...]:
        return tuple(e.name for e in self.estimates if e.flat)


# -- the estimation --------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Solution:
    success: bool
    message: str
    iterations: int
    evaluations: int


class _Problem:
    """All batches and the priors: the stacked misfits ``r(z)`` and their Jacobian, with
    ``z = [log theta, s_batch1, s_batch2, ...]``."""

    def __init__(self, batches: Sequence[_BatchProblem], priors: Sequence[Prior]) -> None:
        self.batches = list(batches)
        self.priors = list(priors)
        self.np = len(priors)
        self.mu = np.array([math.log(p.centre) for p in priors])
        self.sd = np.array([p.sd_log for p in priors])
        self.offsets = [self.np]
        for b in self.batches:
            self.offsets.append(self.offsets[-1] + len(b.free))
        self.nz = self.offsets[-1]
        lo = [math.log(p.low) for p in priors]
        hi = [math.log(p.high) for p in priors]
        for b in self.batches:
            blo, bhi = b.s_bounds()
            lo += blo.tolist()
            hi += bhi.tolist()
        self.lower, self.upper = np.array(lo), np.array(hi)
        self._cache: tuple[bytes, FloatArray, FloatArray] | None = None

    def reweight(self, z: FloatArray) -> None:
        """:meth:`_BatchProblem.reweight` of every batch at ``z``."""
        lt, ss = self.split(z)
        for b, s in zip(self.batches, ss, strict=True):
            b.reweight(lt, s)
        self._cache = None

    def split(self, z: FloatArray) -> tuple[FloatArray, list[FloatArray]]:
        return z[: self.np], [
            z[self.offsets[k] : self.offsets[k + 1]] for k in range(len(self.batches))
        ]

    def z0(self) -> FloatArray:
        return np.concatenate([self.mu, np.zeros(self.nz - self.np)])

    def misfits(self, z: FloatArray) -> FloatArray:
        """The stacked normalised misfits and prior terms (no Jacobian)."""
        key = z.tobytes()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1]
        lt, ss = self.split(z)
        r_all = np.concatenate(
            [
                *(b.misfits(lt, s) for b, s in zip(self.batches, ss, strict=True)),
                (lt - self.mu) / self.sd,
            ]
        )
        return np.where(np.isfinite(r_all), r_all, 1e6)

    def evaluate(self, z: FloatArray) -> tuple[FloatArray, FloatArray]:
        key = z.tobytes()
        if self._cache is not None and self._cache[0] == key:
            return self._cache[1], self._cache[2]
        lt, ss = self.split(z)
        rs, rows = [], []
        for k, (b, s) in enumerate(zip(self.batches, ss, strict=True)):
            r, jl, js = b.evaluate(lt, s)
            jac = np.zeros((r.size, self.nz))
            jac[:, : self.np] = jl
            jac[:, self.offsets[k] : self.offsets[k + 1]] = js
            rs.append(r)
            rows.append(jac)
        prior_r = (lt - self.mu) / self.sd
        prior_j = np.zeros((self.np, self.nz))
        prior_j[:, : self.np] = np.diag(1.0 / self.sd)
        r_all = np.concatenate([*rs, prior_r])
        j_all = np.vstack([*rows, prior_j])
        bad = ~np.isfinite(r_all)
        if bad.any():  # a diverging simulation: a large, finite cost keeps the solver away
            r_all = np.where(bad, 1e6, r_all)
            j_all = np.where(np.isfinite(j_all), j_all, 0.0)
        self._cache = (key, r_all, j_all)
        return r_all, j_all

    def solve(
        self,
        z0: FloatArray,
        fixed: Sequence[int] = (),
        max_iterations: int = 200,
        tolerance: float = 1e-10,
    ) -> tuple[FloatArray, _Solution]:
        """Minimise ``0.5 |r|^2`` from ``z0`` by Levenberg-Marquardt with the exact Jacobian,
        steps projected onto the bounds; the components ``fixed`` stay at their ``z0``
        values. Converged: the cost's relative decrease fell below ``tolerance``, or no step
        decreases it any more (a minimum)."""
        free = np.ones(self.nz, dtype=bool)
        free[list(fixed)] = False
        lo, hi = self.lower[free], self.upper[free]
        z = z0.copy()
        z[free] = np.clip(z[free], lo, hi)
        r, jac = self.evaluate(z)
        cost = float(r @ r)
        lam = 1e-3
        status, iterations, evaluations = "iteration limit", 0, 1
        for iterations in range(1, max_iterations + 1):
            jf = jac[:, free]
            a = jf.T @ jf
            g = jf.T @ r
            d = np.diag(a) + 1e-12
            zf = z[free]
            # a component on its bound that the gradient pushes outwards stays there
            stuck = ((zf <= lo) & (g > 0)) | ((zf >= hi) & (g < 0))
            move = ~stuck
            step = np.zeros(zf.size)
            try:
                step[move] = -np.linalg.solve(
                    a[np.ix_(move, move)] + lam * np.diag(d[move]), g[move]
                )
            except np.linalg.LinAlgError:
                lam *= 10.0
                continue
            trial = z.copy()
            trial[free] = np.clip(zf + step, lo, hi)
            r2 = self.misfits(trial)
            evaluations += 1
            cost2 = float(r2 @ r2)
            if math.isfinite(cost2) and cost2 < cost:
                decrease = (cost - cost2) / max(cost, 1e-300)
                z = trial
                r, jac = self.evaluate(z)
                cost = cost2
                lam = max(lam / 4.0, 1e-10)
                log.debug("LM %d: cost %.10g lambda %.3g", iterations, cost, lam)
                if decrease < tolerance:
                    status = "converged (relative decrease below tolerance)"
                    break
            else:
                lam *= 6.0
                if lam > 1e12:
                    status = "converged (no step decreases the cost)"
                    break
        solution = _Solution(status.startswith("converged"), status, iterations, evaluations)
        log.debug("Levenberg-Marquardt: %s after %d iterations", status, iterations)
        return z, solution

    def cost(self, z: FloatArray) -> float:
        r = self.misfits(z)
        return 0.5 * float(r @ r)

    def own_prior(self, z: FloatArray, i: int) -> float:
        """Parameter ``i``'s prior term of ``0.5 |r|^2``."""
        return 0.5 * float(((z[i] - self.mu[i]) / self.sd[i]) ** 2)


def calibrate(
    plugin: ProcessPlugin,
    model: MechanisticModel[Any],
    records: Sequence[Any],
    settings: CalibrationSettings,
) -> CalibrationResult:
    """MAP estimate of ``settings.parameters`` of ``model`` (whose parameters are the prior
    centres) over the batch ``records`` (module docstring).

    Raises:
        ConfigError: unknown parameters, a non-positive nominal value, no records, a record
            without a measurement the model predicts.
        FitError: the MAP fit produced no finite cost.
    """
    if not records:
        raise ConfigError("calibration needs at least one batch record")
    priors = [parameter_prior(model.parameters, n) for n in settings.parameters]
    batches = [
        _BatchProblem(r, model, plugin, settings.parameters, settings.initial) for r in records
    ]
    problem = _Problem(batches, priors)
    # the prior centre, with the initial states fitted to it: the reference cost
    z_nom, _ = problem.solve(problem.z0(), fixed=range(problem.np), max_iterations=100)
    z_hat, res = problem.solve(z_nom, max_iterations=settings.max_iterations)
    for _ in range(2):  # weights from the fitted model, then refit
        problem.reweight(z_hat)
        z_hat, res = problem.solve(z_hat, max_iterations=settings.max_iterations)
    cost = problem.cost(z_hat)
    cost_nominal = problem.cost(z_nom)
    if not math.isfinite(cost) or cost >= 1e11:
        raise FitError(f"calibration failed: no finite cost ({res.message})")
    converged = res.success
    if not converged:
        log.warning("calibration: the MAP fit stopped early: %s", res.message)
    jac = problem.evaluate(z_hat)[1]
    cov = np.asarray(np.linalg.pinv(jac.T @ jac), dtype=np.float64)
    npar = problem.np
    sd = np.sqrt(np.maximum(np.diag(cov)[:npar], 0.0))
    block = cov[:npar, :npar]
    denom = np.sqrt(np.outer(np.diag(block), np.diag(block)))
    corr = np.divide(block, denom, out=np.zeros_like(block), where=denom > 0)
    np.fill_diagonal(corr, 1.0)
    flagged = tuple(
        (settings.parameters[i], settings.parameters[j], float(corr[i, j]))
        for i in range(npar)
        for j in range(i + 1, npar)
        if abs(corr[i, j]) > settings.correlation_threshold
    )
    profiles: dict[str, Profile] = {}
    estimates = []
    for i, prior in enumerate(priors):
        lt = float(z_hat[i])
        at_bound = bool(
            lt <= problem.lower[i] + 1e-6 * (1 + abs(lt))
            or lt >= problem.upper[i] - 1e-6 * (1 + abs(lt))
        )
        laplace = (math.exp(lt - Z95 * sd[i]), math.exp(lt + Z95 * sd[i]))
        interval: tuple[float, float] | None = None
        open_ends, flat = "", ""
        if settings.profiles:
            prof, interval, open_ends, flat = _profile(
                problem, z_hat, i, cov, cost, settings.profile_steps
            )
            profiles[prior.name] = prof
        estimates.append(
            ParameterEstimate(
                prior=prior,
                value=math.exp(lt),
                sd_log=float(sd[i]),
                laplace=laplace,
                profile=interval,
                profile_open=open_ends,
                flat=flat,
                at_bound=at_bound,
            )
        )
    lt_hat, s_hat = problem.split(z_hat)
    lt_nom, s_nom = problem.split(z_nom)
    fits = []
    n_obs = 0
    chi2 = chi2_nom = 0.0
    for b, s, s0 in zip(batches, s_hat, s_nom, strict=True):
        pred = b.predict(lt_hat, s)
        pred0 = b.predict(lt_nom, s0)
        n_obs += pred.size
        chi2 += float(np.sum(((pred - b.obs["value"]) / b.obs["sd"]) ** 2))
        chi2_nom += float(np.sum(((pred0 - b.obs["value"]) / b.obs["sd"]) ** 2))
        x0 = b.x0(s)
        fits.append(
            BatchFit(
                name=b.name,
                observations=b.obs,
                predicted_nominal=pred0,
                predicted=pred,
                initial_states=dict(zip(model.state_names, x0.tolist(), strict=True)),
                estimated_states=tuple(model.state_names[i] for i in b.free),
            )
        )
    unused = sorted({u for b in batches for u in b.obs["unused"]})
    return CalibrationResult(
        settings=settings,
        estimates=tuple(estimates),
        correlation=corr,
        flagged_pairs=flagged,
        profiles=profiles,
        cost=cost,
        cost_nominal=cost_nominal,
        chi2_data=chi2,
        chi2_data_nominal=chi2_nom,
        observations=n_obs,
        batches=tuple(fits),
        converged=converged,
        message=str(res.message),
        unused_measurements=tuple(unused),
    )


def _inside(z: FloatArray, lo: FloatArray, hi: FloatArray) -> FloatArray:
    """``z`` moved just inside the bounds."""
    eps_lo = np.where(np.isfinite(lo), 1e-9 * (1.0 + np.abs(lo)), 0.0)
    eps_hi = np.where(np.isfinite(hi), 1e-9 * (1.0 + np.abs(hi)), 0.0)
    return np.asarray(np.clip(z, lo + eps_lo, hi - eps_hi), dtype=np.float64)


def _profile(
    problem: _Problem,
    z_hat: FloatArray,
    i: int,
    covariance: FloatArray,
    cost_hat: float,
    max_steps: int,
) -> tuple[Profile, tuple[float, float], str, str]:
    """Walk parameter ``i`` away from the MAP on both sides, re-optimising the rest, until
    both the posterior and the data's profile rise by :data:`CHI2_95` (or the search bound,
    or ``max_steps``); a crossing after a large jump is bisected. Returns the profile, the
    95 % interval, the open ends and the flat sides (module docstring)."""
    prior = problem.priors[i]
    l_hat = float(z_hat[i])
    edge_lo, edge_hi = (math.log(v) for v in prior.range95)
    width = max(edge_hi - edge_lo, 1e-6)
    sd = math.sqrt(max(float(covariance[i, i]), 0.0))
    step = float(np.clip(0.75 * sd if sd > 0 else width / 6, width / 60, width / 6))
    own_hat = problem.own_prior(z_hat, i)
    points: list[tuple[float, float, float]] = [(l_hat, 0.0, 0.0)]
    # warm start: the others follow the fixed one as the Laplace approximation says
    slope = covariance[:, i] / covariance[i, i] if covariance[i, i] > 0 else 0.0 * z_hat

    def at(value: float, start: FloatArray) -> tuple[float, float, float, FloatArray]:
        z = start + slope * (value - start[i])
        z = _inside(z, problem.lower, problem.upper)
        z[i] = value
        z, _ = problem.solve(z, fixed=(i,), max_iterations=60, tolerance=1e-9)
        delta = 2.0 * (problem.cost(z) - cost_hat)
        delta_data = delta - 2.0 * (problem.own_prior(z, i) - own_hat)
        points.append((value, delta, delta_data))
        return value, delta, delta_data, z

    def crossing(
        a: tuple[float, float, float, FloatArray], b: tuple[float, float, float, FloatArray], k: int
    ) -> float:
        # a below the threshold, b at or above it (in component k); bisect a large jump
        for _ in range(4):
            if b[k] <= 2.0 * CHI2_95:
                break
            mid = at(0.5 * (a[0] + b[0]), a[3])
            if mid[k] >= CHI2_95:
                b = mid
            else:
                a = mid
        return _crossing(a[0], float(a[k]), b[0], float(b[k]))

    ends: dict[int, float] = {}
    open_sides: list[str] = []
    flat_sides: list[str] = []
    for direction, label in ((-1, "low"), (1, "high")):
        bound = float(problem.lower[i] if direction < 0 else problem.upper[i])
        edge = edge_lo if direction < 0 else edge_hi
        prev: tuple[float, float, float, FloatArray] = (l_hat, 0.0, 0.0, z_hat)
        post_cross: float | None = None
        data_cross: float | None = None
        for k in range(1, max_steps + 1):
            value = l_hat + direction * k * step
            if (value - bound) * direction > 0:
                value = bound
            point = at(value, prev[3])
            if post_cross is None and point[1] >= CHI2_95:
                post_cross = crossing(prev, point, 1)
            if data_cross is None and point[2] >= CHI2_95:
                data_cross = crossing(prev, point, 2)
            prev = point
            past_edge = (value - edge) * direction >= 0
            if post_cross is not None and (data_cross is not None or past_edge):
                break
            if value == bound:
                break
        if post_cross is None:
            open_sides.append(label)
            post_cross = prev[0]
        ends[direction] = post_cross
        # flat: the data's profile does not reach the threshold inside the prior range
        inside = (l_hat - edge) * direction < 0  # the MAP lies inside the range on this side
        if inside and (data_cross is None or (data_cross - edge) * direction > 0):
            flat_sides.append(label)
    points.sort()
    arr = np.array(points)
    profile = Profile(np.exp(arr[:, 0]), arr[:, 1], arr[:, 2])
    interval = (math.exp(ends[-1]), math.exp(ends[1]))
    return profile, interval, _sides(open_sides), _sides(flat_sides)


def _crossing(x0: float, y0: float, x1: float, y1: float) -> float:
    """Where the profile between (x0, y0) and (x1, y1) reaches :data:`CHI2_95`, by linear
    interpolation of ``sqrt(y)`` (exact for a quadratic profile; ``y`` itself, convex near
    the MAP, would put the crossing too close to it)."""
    r0, r1, target = math.sqrt(max(y0, 0.0)), math.sqrt(max(y1, 0.0)), math.sqrt(CHI2_95)
    if r1 == r0:
        return x1
    return x0 + (target - r0) * (x1 - x0) / (r1 - r0)


def _sides(sides: Sequence[str]) -> str:
    return "both" if len(sides) == 2 else (sides[0] if sides else "")


# -- 24 h-ahead check ------------------------------------------------------------------------


def validate_24h_mechanistic(
    models: Mapping[str, MechanisticModel[Any]],
    records: Sequence[Any],
    *,
    horizon_h: float = 24.0,
    every_h: float = 12.0,
    smoothing_h: float = 12.0,
) -> dict[str, Any]:
    """24 h-ahead viable-cell predictions of mechanistic models on (held-out) records.

    The ``mechanistic`` predictor of :func:`controller.training.fitting.validate_24h` (the
    check ``hmpc fit`` reports), for several models side by side: every ``every_h`` hours
    from day 1 each model starts from the state reconstructed from the measurements up to
    then (viable cells: a causal fit of ln X over ``smoothing_h`` hours) and runs the
    recorded inputs for ``horizon_h``; it is compared with the measured viable cells then
    (and with the simulated true cells when every record carries them).

    Returns:
        ``rows`` (batch, start, time, measured, true, one prediction per model), per model
        ``rmse`` (1e6 cells/mL) and ``rmse_true`` (or None), and ``per_batch`` RMSEs.
    """
    from controller.training.batches import (
        TRUE_CELLS_KEY,
        causal_log_cells,
        forecast_windows,
        reconstruct_states,
    )
    from plant_models.hybrid import discretize

    if not models:
        raise ConfigError("validate_24h_mechanistic: no model to validate")
    first = next(iter(models.values()))
    i_cells = first.state_names.index("viable_cells")
    steppers: dict[tuple[str, float], ca.Function] = {}
    rows: list[dict[str, Any]] = []
    for rec in records:
        x = reconstruct_states(rec, first)
        t = rec.steps["time"].to_numpy(float)
        u = rec.steps[list(first.input_names)].to_numpy(float)
        for i, end in forecast_windows(t, horizon_h, every_h):
            log_start, _ = causal_log_cells(rec, i, smoothing_h)
            x0 = x[i].copy()
            x0[i_cells] = math.exp(log_start)
            row: dict[str, Any] = {
                "batch": rec.name,
                "start": float(t[i]),
                "time": float(t[end]),
                "measured": float(x[end, i_cells]),
                "true": (
                    float(rec.steps[TRUE_CELLS_KEY].iloc[end])
                    if TRUE_CELLS_KEY in rec.steps
                    else math.nan
                ),
            }
            for label, model in models.items():
                xm = x0.copy()
                for k in range(i, end):
                    dt = float(t[k + 1] - t[k])
                    key = (label, dt)
                    if key not in steppers:
                        steppers[key] = discretize(model, dt)
                    xm = np.maximum(np.array(steppers[key](t[k], xm, u[k])).ravel(), 0.0)
                row[label] = float(xm[i_cells])
            rows.append(row)
    if not rows:
        raise ConfigError("held-out batches are too short for a 24 h-ahead validation")
    meas = np.array([r["measured"] for r in rows])
    true = np.array([r["true"] for r in rows])
    batches = [r["batch"] for r in rows]

    def rmse(label: str, target: FloatArray, sel: Any = slice(None)) -> float:
        pred = np.array([r[label] for r in rows])[sel]
        return float(np.sqrt(np.mean((pred - target[sel]) ** 2)))

    out: dict[str, Any] = {"rows": rows, "models": list(models), "predictions": len(rows)}
    for label in models:
        out[f"rmse_{label}"] = rmse(label, meas)
        out[f"rmse_{label}_true"] = rmse(label, true) if np.all(np.isfinite(true)) else None
    out["per_batch"] = {
        name: {
            f"rmse_{label}": rmse(label, meas, np.array([b == name for b in batches]))
            for label in models
        }
        for name in dict.fromkeys(batches)
    }
    return out

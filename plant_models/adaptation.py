"""Per-batch patient parameters estimated from the running batch's viable-cell record.

A virtual (or real) patient's cells differ from the population's in a few parameters the
model names: the growth rate (``mu_max``), the exhaustion threshold, the activation lag.
:class:`PatientAdaptation` finds the maximum a-posteriori values of such parameters from
the batch's measurements so far:

* the cells (and the states that integrate them, e.g. the T-cell inhibitor) are simulated
  over the last ``window_h`` hours with the recorded inputs, every other state is taken
  from the measurements at each step (so the fit does not inherit the model's errors in
  glucose, lactate or IL-2);
* the misfit is ``(ln X_model - ln X_measured) / sd`` with the probe's ln-noise ``sd``, plus
  the priors: each parameter is a ``factor`` (``value = nominal * exp(theta)``,
  ``theta ~ N(0, prior_sd^2)``) or a ``shift`` (``value = nominal + theta``), and the cells
  at the start of the window are free around their measured value;
* Levenberg-Marquardt with the exact Jacobian (CasADi), warm-started from the last fit.

The model may be a :class:`plant_models.hybrid.HybridModel`: its residuals then correct
the adapted mechanistic rates, and :func:`with_parameters` gives the adapted model to
predict with. Pure numerics: no I/O, no clock.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any

import casadi as ca
import numpy as np
import numpy.typing as npt

from plant_models.base import MechanisticModel, rk4
from plant_models.errors import ConfigError, ModelError

__all__ = [
    "AdaptationResult",
    "AdaptedParameter",
    "PatientAdaptation",
    "with_parameters",
]

FloatArray = npt.NDArray[np.float64]

_KINDS = ("factor", "shift")


@dataclasses.dataclass(frozen=True)
class AdaptedParameter:
    """A model parameter estimated per batch.

    Attributes:
        name: the model parameter (a field of the model's parameter dataclass).
        kind: ``factor`` (``nominal * exp(theta)``) or ``shift`` (``nominal + theta``).
        prior_sd: standard deviation of ``theta`` across patients (ln units for a factor,
            the parameter's unit for a shift).
        low, high: the adapted value is kept within these (default: a factor within
            ``exp(+-2)``, a shift unbounded except by ``low``/``high``).
    """

    name: str
    kind: str
    prior_sd: float
    low: float = -math.inf
    high: float = math.inf

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ConfigError(
                f"adapted parameter {self.name!r}: kind {self.kind!r}; expected one of {_KINDS}"
            )
        if not (math.isfinite(self.prior_sd) and self.prior_sd > 0):
            raise ConfigError(
                f"adapted parameter {self.name!r}: prior_sd must be positive, got {self.prior_sd!r}"
            )
        if not self.low < self.high:
            raise ConfigError(
                f"adapted parameter {self.name!r}: low {self.low} must be below high {self.high}"
            )


def with_parameters(model: MechanisticModel[Any], values: Mapping[str, float]) -> Any:
    """A copy of ``model`` (mechanistic or hybrid) whose parameters have ``values``.

    The copy shares everything else (process, residuals): the rates take their parameters
    from ``model.parameters``, so only that attribute changes.
    """
    fields = {f.name for f in dataclasses.fields(model.parameters)}
    unknown = sorted(set(values) - fields)
    if unknown:
        raise ConfigError(f"{model.name}: unknown parameter(s) {unknown}; known: {sorted(fields)}")
    out = copy.copy(model)
    out.parameters = dataclasses.replace(model.parameters, **values)
    return out


@dataclasses.dataclass(frozen=True)
class AdaptationResult:
    """One fit: the adapted parameter values, the estimates ``theta`` (factor: ln of the
    multiplier; shift: the offset) and their posterior covariance (Gauss-Newton), the
    fitted ln cells at the window's start, the final cost (sum of squared normalised
    misfits and prior terms), the points fitted and whether the iteration converged."""

    values: dict[str, float]
    theta: FloatArray
    covariance: FloatArray
    log_start: float
    cost: float
    points: int
    converged: bool


class PatientAdaptation:
    """MAP estimate of per-batch parameters from the batch's ln(viable cells).

    Args:
        model: the model to adapt (mechanistic or hybrid).
        parameters: the adapted parameters (a process plug-in's ``adapted_parameters()``).
        simulated: states simulated in the fit; the first is the cell number whose log is
            fitted, the others are states driven by it (the T-cell inhibitor, its integral).
            Every other state is taken from the measurements.
        window_h: the fit uses the last ``window_h`` hours of the batch.
        step_h: the records' sample period (h).
        max_iterations: Levenberg-Marquardt iterations per fit.
    """

    def __init__(
        self,
        model: MechanisticModel[Any],
        parameters: Sequence[AdaptedParameter],
        *,
        simulated: Sequence[str] = ("viable_cells",),
        window_h: float = 240.0,
        step_h: float = 1.0,
        max_iterations: int = 30,
    ) -> None:
        if not parameters:
            raise ConfigError("PatientAdaptation: no parameters to adapt")
        names = [p.name for p in parameters]
        if len(set(names)) != len(names):
            raise ConfigError(f"PatientAdaptation: a parameter is listed twice: {names}")
        unknown = [s for s in simulated if s not in model.state_names]
        if not simulated or unknown:
            raise ConfigError(
                f"PatientAdaptation: simulated states {list(simulated)} must be model states "
                f"{list(model.state_names)} (unknown: {unknown})"
            )
        if not (window_h > 0 and step_h > 0 and max_iterations >= 1):
            raise ConfigError(
                "PatientAdaptation: window_h and step_h must be positive and "
                f"max_iterations >= 1, got {window_h}, {step_h}, {max_iterations}"
            )
        self.model = model
        self.parameters = tuple(parameters)
        self.simulated = tuple(simulated)
        self.window_h = float(window_h)
        self.step_h = float(step_h)
        self.max_iterations = int(max_iterations)
        self.steps = max(1, round(window_h / step_h))
        nominal = model.parameters
        self.nominal = np.array([float(getattr(nominal, p.name)) for p in self.parameters])
        for p, v in zip(self.parameters, self.nominal, strict=True):
            if p.kind == "factor" and v <= 0:
                raise ConfigError(
                    f"adapted parameter {p.name!r}: a factor needs a positive nominal value, "
                    f"got {v}"
                )
        self._fun = self._build()

    # -- the CasADi problem -------------------------------------------------------------
    def _values(self, theta: Any) -> list[Any]:
        out = []
        for i, (p, v) in enumerate(zip(self.parameters, self.nominal, strict=True)):
            out.append(v * ca.exp(theta[i]) if p.kind == "factor" else v + theta[i])
        return out

    def _build(self) -> ca.Function:
        model = self.model
        f = model.dynamics([p.name for p in self.parameters])
        idx = [model.state_names.index(s) for s in self.simulated]
        nz, nx, nu, npar = len(idx), model.nx, model.nu, len(self.parameters)
        z = ca.MX.sym("z", nz)
        t = ca.MX.sym("t")
        u = ca.MX.sym("u", nu)
        xe = ca.MX.sym("xe", nx)
        p = ca.MX.sym("p", npar)

        def zdot(tk: Any, zk: Any) -> Any:
            cells = ca.exp(zk[0])
            parts = [xe[i] for i in range(nx)]
            parts[idx[0]] = cells
            for j, i in enumerate(idx[1:], start=1):
                parts[i] = zk[j]
            xdot = f(tk, ca.vertcat(*parts), u, p)[0]
            return ca.vertcat(xdot[idx[0]] / cells, *[xdot[i] for i in idx[1:]])

        zk = rk4(zdot, t, z, self.step_h)
        step = ca.Function("adapt_step", [z, t, u, xe, p], [zk])
        sim = step.mapaccum("adapt_sim", self.steps)
        theta = ca.MX.sym("theta", npar + 1)  # [ln X_start, parameter thetas]
        z_rest = ca.MX.sym("z_rest", nz - 1)
        tt = ca.MX.sym("tt", 1, self.steps)
        uu = ca.MX.sym("uu", nu, self.steps)
        xx = ca.MX.sym("xx", nx, self.steps)
        pvals = ca.vertcat(*self._values(theta[1:]))
        traj = sim(ca.vertcat(theta[0], z_rest), tt, uu, xx, ca.repmat(pvals, 1, self.steps))
        logx = traj[0, :].T
        return ca.Function(
            "adapt_fit", [theta, z_rest, tt, uu, xx], [logx, ca.jacobian(logx, theta)]
        )

    # -- fitting --------------------------------------------------------------------------
    def fit(
        self,
        time_h: FloatArray,
        states: FloatArray,
        inputs: FloatArray,
        log_cells: FloatArray,
        log_sd: FloatArray,
        end: int,
        *,
        start_theta: FloatArray | None = None,
    ) -> AdaptationResult:
        """Fit the parameters to the batch's record up to step ``end`` (inclusive).

        Args:
            time_h: sample times (n,), one every ``step_h`` hours.
            states: model states reconstructed from measurements (n, nx): the other
                states of the fit and the start of the simulated ones.
            inputs: inputs applied from each sample to the next (n, nu).
            log_cells: measured ln(cells) (n,); non-finite entries are skipped.
            log_sd: their standard deviations (n,).
            end: the last step to use (the present).
            start_theta: previous estimate to start from (warm start), or None.
        """
        t = np.asarray(time_h, dtype=float)
        x = np.asarray(states, dtype=float)
        u = np.asarray(inputs, dtype=float)
        y_all = np.asarray(log_cells, dtype=float)
        s_all = np.asarray(log_sd, dtype=float)
        n_total = t.size
        if x.shape != (n_total, self.model.nx) or u.shape != (n_total, self.model.nu):
            raise ModelError(
                f"PatientAdaptation.fit: shapes time {t.shape}, states {x.shape}, inputs "
                f"{u.shape}; expected (n,), (n, {self.model.nx}), (n, {self.model.nu})"
            )
        if y_all.shape != t.shape or s_all.shape != t.shape:
            raise ModelError("PatientAdaptation.fit: log_cells and log_sd must have shape (n,)")
        if not 1 <= end < n_total:
            raise ModelError(f"PatientAdaptation.fit: end {end} outside [1, {n_total - 1}]")
        j0 = max(0, end - self.steps)
        n = end - j0
        if np.any(np.abs(np.diff(t[j0 : end + 1]) - self.step_h) > 1e-6):
            raise ConfigError(
                f"PatientAdaptation: the record must be sampled every {self.step_h} h "
                f"(times {t[j0]}..{t[end]} are not)"
            )
        tt = np.full((1, self.steps), t[end - 1])
        uu = np.repeat(u[end - 1][:, None], self.steps, axis=1)
        xx = np.repeat(x[end - 1][:, None], self.steps, axis=1)
        tt[0, :n] = t[j0:end]
        uu[:, :n] = u[j0:end].T
        xx[:, :n] = x[j0:end].T
        idx = [self.model.state_names.index(s) for s in self.simulated]
        z_rest = np.array([x[j0, i] for i in idx[1:]], dtype=float)
        y = y_all[j0 + 1 : end + 1]
        s = s_all[j0 + 1 : end + 1]
        ok = np.isfinite(y) & np.isfinite(s) & (s > 0)
        start_log = (
            float(y_all[j0])
            if math.isfinite(y_all[j0])
            else float(np.log(max(x[j0, idx[0]], 1e-9)))
        )
        start_sd = max(float(s_all[j0]) if math.isfinite(s_all[j0]) else 0.1, 0.03)
        prior_mean = np.concatenate([[start_log], np.zeros(len(self.parameters))])
        prior_sd = np.concatenate([[start_sd], [p.prior_sd for p in self.parameters]])
        lo, hi = self._theta_bounds()
        theta = prior_mean.copy()
        if start_theta is not None:
            previous = np.asarray(start_theta, dtype=float)[-len(self.parameters) :]
            theta[1:] = np.clip(previous, lo, hi)

        def residuals(th: FloatArray) -> tuple[FloatArray, FloatArray]:
            logx, jac = self._fun(th, z_rest, tt, uu, xx)
            logx = np.asarray(logx, dtype=float).ravel()[:n][ok]
            jac = np.asarray(jac, dtype=float)[:n][ok]
            r = np.concatenate([(logx - y[ok]) / s[ok], (th - prior_mean) / prior_sd])
            jr = np.vstack([jac / s[ok][:, None], np.diag(1.0 / prior_sd)])
            return r, jr

        r, jr = residuals(theta)
        cost = float(r @ r)
        lam, converged = 1e-2, False
        for _ in range(self.max_iterations):
            a, g = jr.T @ jr, jr.T @ r
            step = -np.linalg.solve(a + lam * np.diag(np.diag(a) + 1e-12), g)
            trial = theta + step
            trial[1:] = np.clip(trial[1:], lo, hi)
            r2, jr2 = residuals(trial)
            cost2 = float(r2 @ r2)
            if math.isfinite(cost2) and cost2 < cost:
                small = float(np.max(np.abs(trial - theta))) < 1e-5
                theta, r, jr, cost = trial, r2, jr2, cost2
                lam = max(lam / 3.0, 1e-7)
                if small:
                    converged = True
                    break
            else:
                lam *= 5.0
                if lam > 1e7:
                    converged = True  # no descent direction left: a (local) minimum
                    break
        values = {
            p.name: float(v)
            for p, v in zip(self.parameters, self._values_numeric(theta[1:]), strict=True)
        }
        covariance = np.asarray(np.linalg.pinv(jr.T @ jr)[1:, 1:], dtype=np.float64)
        return AdaptationResult(
            values,
            theta[1:].copy(),
            covariance,
            float(theta[0]),
            cost,
            int(ok.sum()),
            converged,
        )

    def predictor(self, horizon_steps: int) -> ca.Function:
        """``(x0, tt, uu, theta) -> (path, dlogcells_dtheta)``: the model with adapted
        parameters ``theta`` run from the full state ``x0`` over ``horizon_steps`` samples
        (``tt`` (1, H) start times, ``uu`` (nu, H) inputs); ``path`` (nx, H) holds the state
        after each sample, ``dlogcells_dtheta`` (1, k) the sensitivity of ln(cells) at the
        end, for the band (``g Sigma g^T`` with :attr:`AdaptationResult.covariance`)."""
        if horizon_steps < 1:
            raise ConfigError(f"PatientAdaptation.predictor: horizon_steps {horizon_steps} < 1")
        model = self.model
        f = model.dynamics([p.name for p in self.parameters])
        x = ca.MX.sym("x", model.nx)
        t = ca.MX.sym("t")
        u = ca.MX.sym("u", model.nu)
        p = ca.MX.sym("p", len(self.parameters))
        xk = rk4(lambda tk, xk: f(tk, xk, u, p)[0], t, x, self.step_h)
        step = ca.Function("adapt_predict_step", [x, t, u, p], [ca.fmax(xk, 0.0)])
        sim = step.mapaccum("adapt_predict", horizon_steps)
        x0 = ca.MX.sym("x0", model.nx)
        tt = ca.MX.sym("tt", 1, horizon_steps)
        uu = ca.MX.sym("uu", model.nu, horizon_steps)
        theta = ca.MX.sym("theta", len(self.parameters))
        pvals = ca.vertcat(*self._values(theta))
        path = sim(x0, tt, uu, ca.repmat(pvals, 1, horizon_steps))
        cells = model.state_names.index(self.simulated[0])
        log_end = ca.log(ca.fmax(path[cells, horizon_steps - 1], 1e-12))
        return ca.Function(
            "adapt_predict",
            [x0, tt, uu, theta],
            [path, ca.jacobian(log_end, theta)],
            ["x0", "tt", "uu", "theta"],
            ["path", "dlogcells_dtheta"],
        )

    def _values_numeric(self, theta: FloatArray) -> list[float]:
        return [
            float(v * math.exp(th)) if p.kind == "factor" else float(v + th)
            for p, v, th in zip(self.parameters, self.nominal, theta, strict=True)
        ]

    def _theta_bounds(self) -> tuple[FloatArray, FloatArray]:
        lo, hi = [], []
        for p, v in zip(self.parameters, self.nominal, strict=True):
            if p.kind == "factor":
                low = math.log(p.low / v) if p.low > 0 else -2.0
                high = math.log(p.high / v) if math.isfinite(p.high) else 2.0
                lo.append(max(low, -2.0))
                hi.append(min(high, 2.0))
            else:
                lo.append(p.low - v)
                hi.append(p.high - v)
        return np.array(lo), np.array(hi)

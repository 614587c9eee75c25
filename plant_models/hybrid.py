"""The hybrid model: mechanistic mass balances whose selected kinetic rates are corrected by
Gaussian-process residuals.

``rate_hybrid = rate_mech + r(features)`` (additive) or ``rate_mech * (1 + r(features))``
(multiplicative), with ``r`` a fitted :class:`~plant_models.gp.GPResidual` evaluated in
closed form through CasADi. The same object serves the MPC (``dynamics()``,
``discretize()``), the estimator and the simulator (``rhs()``).

Features are named model variables: any state (``glucose``, ``lactate``, ``il2``,
``inhibitor``, ``viable_cells`` ...), any input, or ``culture_age`` (= t, h). A residual's
feature names and units must match the model's, or construction fails.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import casadi as ca
import numpy as np
import numpy.typing as npt

from plant_models.base import CASADI_OPS, MechanisticModel, rk4
from plant_models.errors import ConfigError, ModelError
from plant_models.gp import GPResidual

__all__ = ["HybridModel", "RateCorrection", "feature_units"]

log = logging.getLogger(__name__)

Mode = Literal["additive", "multiplicative"]


@dataclasses.dataclass(frozen=True)
class RateCorrection:
    """One corrected rate: its residual and how the residual is applied.

    ``mode=None`` (default) takes it from the residual's target unit: the rate's own unit
    means additive, ``"1"`` multiplicative (``hmpc fit --mode`` writes either).
    """

    rate: str
    residual: GPResidual
    mode: Mode | None = None


def feature_units(model: MechanisticModel[Any]) -> dict[str, str]:
    """Name -> unit of every feature a residual of ``model`` may use."""
    units = {"culture_age": "h"}
    for spec in model.states + model.inputs:
        units[spec.name] = spec.unit
    return units


class HybridModel(MechanisticModel[Any]):
    """Mechanistic model with GP-corrected rates (same states, inputs, rates and balances).

    Args:
        base: the mechanistic model (its parameters and process are used as they are).
        corrections: the corrected rates, at most one correction per rate.
    """

    def __init__(self, base: MechanisticModel[Any], corrections: Sequence[RateCorrection]) -> None:
        super().__init__(base.parameters)
        self.base = base
        self.name = f"hybrid_{base.name}"
        self.states, self.inputs, self.rate_specs = base.states, base.inputs, base.rate_specs
        self.process = getattr(base, "process", None)
        self.corrections = tuple(self._resolve_mode(c) for c in corrections)
        self._check()
        self._layouts: tuple[tuple[tuple[str, int], ...], ...] | None = None
        self._correction_fn: ca.Function | None = None
        self.refresh()

    def _resolve_mode(self, c: RateCorrection) -> RateCorrection:
        if c.mode is not None:
            return c
        rate_units = {s.name: s.unit for s in self.base.rate_specs}
        unit = getattr(c.residual, "target_unit", None)
        if c.rate in rate_units and unit == "1" and rate_units[c.rate] != "1":
            return dataclasses.replace(c, mode="multiplicative")
        return dataclasses.replace(c, mode="additive")

    def _check(self) -> None:
        units = feature_units(self.base)
        rate_units = {s.name: s.unit for s in self.base.rate_specs}
        seen: set[str] = set()
        for c in self.corrections:
            if c.rate not in rate_units:
                raise ConfigError(
                    f"{self.name}: cannot correct unknown rate {c.rate!r}; "
                    f"rates are {sorted(rate_units)}."
                )
            if c.rate in seen:
                raise ConfigError(f"{self.name}: rate {c.rate!r} is corrected twice.")
            seen.add(c.rate)
            if c.mode not in ("additive", "multiplicative"):
                raise ConfigError(f"{self.name}: mode {c.mode!r} is not additive/multiplicative.")
            if not c.residual.is_fitted:
                raise ModelError(f"{self.name}: the residual of {c.rate!r} is not fitted.")
            for feat, unit in zip(c.residual.feature_names, c.residual.feature_units, strict=True):
                if feat not in units:
                    raise ConfigError(
                        f"{self.name}: residual feature {feat!r} is not a model "
                        f"variable; features are {sorted(units)}."
                    )
                if unit != units[feat]:
                    raise ConfigError(
                        f"{self.name}: residual feature {feat!r} is in {unit!r} "
                        f"but the model uses {units[feat]!r}."
                    )
            expected = rate_units[c.rate] if c.mode == "additive" else "1"
            if c.residual.target_unit != expected:
                raise ConfigError(
                    f"{self.name}: a {c.mode} residual of {c.rate!r} must be in "
                    f"{expected!r}, got {c.residual.target_unit!r}."
                )

    def observe(self, rate: str, X: Any, y: Any) -> None:
        """Learning during the running batch: condition ``rate``'s residual on the batch's
        own observations and re-export (:meth:`GPResidual.observe`; the residual needs a
        batch effect).

        Args:
            rate: the corrected rate, e.g. ``"growth_rate"``.
            X: features, shape (k, d), columns in the residual's ``feature_names`` order
                (:meth:`feature_matrix` builds them from (t, x, u) rows).
            y: residual observations, shape (k,), in the residual's target unit (additive:
                observed minus mechanistic rate; multiplicative: their ratio minus 1).
        """
        self._correction(rate).residual.observe(X, y)
        self.refresh()

    def begin_batch(self) -> None:
        """A new batch starts: forget the running batch's observations in every residual
        with a batch effect (:meth:`GPResidual.begin_batch`) and re-export."""
        for c in self.corrections:
            if c.residual.has_batch_effect:
                c.residual.begin_batch()
        self.refresh()

    def refresh(self) -> None:
        """Re-read the residuals' numeric data (call after :meth:`GPResidual.update` or
        ``observe``). Only arrays are swapped: the CasADi functions of the residuals take
        their data as an input (:meth:`GPResidual.to_casadi_data`) and are built once. A
        residual whose data layout changed (re-fitted on another number of points, another
        ``batch_capacity``) gets its functions rebuilt once, with a log line."""
        layouts = tuple(c.residual.data_layout() for c in self.corrections)
        if self._layouts != layouts:
            if self._layouts is not None:
                log.warning(
                    "%s: a residual's data layout changed (%s -> %s); its CasADi functions "
                    "are rebuilt",
                    self.name,
                    [sum(n for _, n in lay) for lay in self._layouts],
                    [sum(n for _, n in lay) for lay in layouts],
                )
            self._gp_data_fn = [
                c.residual.to_casadi_data(name=f"gp_{c.rate}") for c in self.corrections
            ]
            self._gp_mean_data_fn = [
                c.residual.to_casadi_data(name=f"gp_{c.rate}_mean", variance=False)
                for c in self.corrections
            ]
            self._correction_fn = None
            self._layouts = layouts
        self._gp_data = [c.residual.casadi_data() for c in self.corrections]
        self._gp_data_dm = [ca.DM(data) for data in self._gp_data]  # converted once
        self._data = (
            np.concatenate(self._gp_data) if self._gp_data else np.zeros(0, dtype=np.float64)
        )

    def residual_data(self) -> npt.NDArray[np.float64]:
        """The residuals' numeric data as of the last :meth:`refresh`, concatenated in
        corrections order: the ``data`` input of :meth:`rate_correction` (a copy)."""
        return self._data.copy()

    @property
    def residual_data_size(self) -> int:
        """Length of :meth:`residual_data`."""
        return int(self._data.size)

    def rate_correction(self) -> ca.Function:
        """``(t, x, u, data) -> (mean, variance)``: the correction added to each corrected
        rate (corrected minus mechanistic rate: ``r`` additive, ``rate_mech * r``
        multiplicative) and its variance (``var_r``, or ``var_r * rate_mech^2``), in
        corrections order, rate units. ``data`` is :meth:`residual_data`; the function is
        built once (MX, nominal parameters) and stays valid while the layout does."""
        if self._correction_fn is not None:
            return self._correction_fn
        t = ca.MX.sym("t")
        x = ca.MX.sym("x", self.nx)
        u = ca.MX.sym("u", self.nu)
        data = ca.MX.sym("data", self.residual_data_size)
        base_rates = self.base.dynamics()(t, x, u)[1]
        rate_names = self.base.rate_names
        xs = [x[i] for i in range(self.nx)]
        us = [u[i] for i in range(self.nu)]
        means, variances = [], []
        offset = 0
        single = len(self.corrections) == 1  # no slice: the data are not copied per call
        for c, f_mean, f, size in zip(
            self.corrections,
            self._gp_mean_data_fn,
            self._gp_data_fn,
            (g.size for g in self._gp_data),
            strict=True,
        ):
            feats = ca.vertcat(*self.features(t, xs, us, c.residual.feature_names))
            block = data if single else data[offset : offset + size]
            # the mean from the mean-only function: its derivatives (the MPC's
            # linearisation) then never touch the variance's triangular factors
            mean = f_mean(feats, block)
            var = f(feats, block)[1]
            offset += size
            if c.mode == "additive":
                means.append(mean)
                variances.append(var)
            else:
                rate = base_rates[rate_names.index(c.rate)]
                means.append(rate * mean)
                variances.append(var * rate**2)
        self._correction_fn = ca.Function(
            f"{self.name}_rate_correction",
            [t, x, u, data],
            [ca.vertcat(*means), ca.vertcat(*variances)],
            ["t", "x", "u", "data"],
            ["mean", "variance"],
        )
        return self._correction_fn

    # -- features ------------------------------------------------------------------------
    def features(
        self, t: Any, x: Sequence[Any], u: Sequence[Any], names: Sequence[str]
    ) -> list[Any]:
        """Values of the named features at (t, x, u)."""
        lookup: dict[str, Any] = {"culture_age": t}
        lookup.update(zip(self.state_names, x, strict=True))
        lookup.update(zip(self.input_names, u, strict=True))
        return [lookup[n] for n in names]

    def feature_matrix(self, t: Any, x: Any, u: Any, rate: str) -> np.ndarray:
        """Features of ``rate``'s residual for rows of (t, x, u). Shapes (n,), (n, nx), (n, nu)
        -> (n, d)."""
        c = self._correction(rate)
        tt = np.atleast_1d(np.asarray(t, dtype=float))
        xx = np.atleast_2d(np.asarray(x, dtype=float))
        uu = np.atleast_2d(np.asarray(u, dtype=float))
        return np.array(
            [self.features(tt[i], xx[i], uu[i], c.residual.feature_names) for i in range(tt.size)],
            dtype=float,
        )

    def _correction(self, rate: str) -> RateCorrection:
        for c in self.corrections:
            if c.rate == rate:
                return c
        raise ModelError(f"{self.name}: rate {rate!r} has no residual.")

    # -- the equations -------------------------------------------------------------------
    def rates(self, t: Any, x: Sequence[Any], u: Sequence[Any], p: Any, ops: Any) -> dict[str, Any]:
        r = self.base.rates(t, x, u, p, ops)
        for c, f, data in zip(
            self.corrections, self._gp_mean_data_fn, self._gp_data_dm, strict=True
        ):
            feats = self.features(t, x, u, c.residual.feature_names)
            if ops is CASADI_OPS:
                mean = f(ca.vertcat(*feats), data)
            else:
                mean = float(f(np.array(feats, dtype=float), data))
            r[c.rate] = r[c.rate] + mean if c.mode == "additive" else r[c.rate] * (1.0 + mean)
        return r

    def balances(
        self, t: Any, x: Sequence[Any], u: Sequence[Any], r: Mapping[str, Any], p: Any, ops: Any
    ) -> list[Any]:
        return self.base.balances(t, x, u, r, p, ops)

    def rate_variance(self) -> ca.Function:
        """``(t, x, u) -> variance`` of each corrected rate (in corrections order), in the
        rate's unit squared (a multiplicative residual's variance is scaled by rate²)."""
        t = ca.SX.sym("t")
        x = ca.SX.sym("x", self.nx)
        u = ca.SX.sym("u", self.nu)
        xs = [x[i] for i in range(self.nx)]
        us = [u[i] for i in range(self.nu)]
        base_rates = self.base.rates(t, xs, us, self.parameters, CASADI_OPS)
        out = []
        for c, f, data in zip(self.corrections, self._gp_data_fn, self._gp_data_dm, strict=True):
            feats = ca.vertcat(*self.features(t, xs, us, c.residual.feature_names))
            var = f(feats, data)[1]
            out.append(var if c.mode == "additive" else var * base_rates[c.rate] ** 2)
        v = ca.vertcat(*out) if out else ca.SX(0, 1)
        return ca.Function(
            f"{self.name}_rate_variance", [t, x, u], [v], ["t", "x", "u"], ["variance"]
        )

    def discretize(self, step_h: float, substeps: int = 4) -> ca.Function:
        """One sample period with RK4: ``(t, x, u) -> x_next``, inputs held constant."""
        return discretize(self, step_h, substeps)


def discretize(model: MechanisticModel[Any], step_h: float, substeps: int = 4) -> ca.Function:
    """RK4 discretisation of any model's ``dynamics()``: ``(t, x, u) -> x_next``."""
    if not (step_h > 0 and substeps >= 1):
        raise ModelError(
            f"discretize: step must be positive and substeps >= 1, got {step_h!r}, {substeps!r}"
        )
    f = model.dynamics()
    t = ca.MX.sym("t")
    x = ca.MX.sym("x", model.nx)
    u = ca.MX.sym("u", model.nu)
    xk = rk4(lambda tk, xk: f(tk, xk, u)[0], t, x, step_h, substeps)
    return ca.Function(f"{model.name}_step", [t, x, u], [xk], ["t", "x", "u"], ["x_next"])

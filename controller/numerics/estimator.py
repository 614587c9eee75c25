"""State estimation: an extended Kalman filter that fuses online probes every step and
offline assays that arrive hours after their sample time.

Pipeline of one :meth:`Estimator.update`:

1. predict from the last update to ``time_h`` with the inputs applied in between;
2. validate every measurement without the estimate (:mod:`controller.numerics.validation`);
3. place each valid measurement at its **sample time** in a bounded history of steps
   (inserting a step when the sample time falls between two updates);
4. re-process the history from the earliest changed step to the present: predict, gate
   each measurement on its innovation (spike check), correct. A late assay therefore
   corrects the present estimate exactly as if it had arrived on time.

The augmented state is ``z = [x; log f]``: the model states ``x`` and the logarithms of
multiplicative factors ``f`` on selected model parameters (default: ``mu_max``, the
patient's growth-rate factor), each a slow random walk. The discretised dynamics are one
CasADi function (RK4 with fixed sub-steps, built once) with its Jacobian.

Non-negativity: states are kept in linear coordinates and the mean is projected onto the
physical box (``low <= x <= high`` of each state) after every prediction and every scalar
correction; factors live in log coordinates, so they are positive by construction. See
docs/estimation.md for the reasons of this choice.

Optionally (``online_gains``) the state also carries the log-gain of selected online probes
(``online reading = gain * true value``): a capacitance probe's cells-per-signal calibration
drifts as activated T cells change size, and only the assays can see that. The assays then
recalibrate the probe instead of merely nudging the state. With the calibration check
(``gain_check_threshold > 0``) a probe is taken as calibrated until its assays disagree
with it (CUSUM); its gain is then estimated from the start of the disagreement on.

:meth:`Estimator.snapshot` / :meth:`Estimator.restore` write and read the whole filter
state (history, validation state) as JSON-compatible data, for a restart from a historian.

Shapes: ``nx`` model states, ``nf`` factors, ``ng`` probe gains, ``nz = nx + nf + ng``;
covariances ``(nz, nz)`` in the order ``[x; log factors; log gains]``.
Units are the model's canonical units; time is culture age in h.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import casadi as ca
import numpy as np
import numpy.typing as npt

from controller.numerics.measurements import Measurement
from controller.numerics.mismatch import MismatchMonitor, MismatchReport
from controller.numerics.units import known_conversion
from controller.numerics.validation import (
    MeasurementDecision,
    MeasurementValidator,
    ValidationSettings,
    log_rejection,
)
from plant_models.base import rk4
from plant_models.config import load_fields, load_toml
from plant_models.errors import ConfigError, IntegrationError, ModelError
from plant_models.process import get_process, process_of

__all__ = [
    "Estimator",
    "EstimatorConfig",
    "EstimatorResult",
    "MeasurementDecision",
    "load_estimator_config",
]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]
NoiseTable = Mapping[str, tuple[float, float]]
_GateCounts = dict[tuple[str, str], tuple[float, ...]]
_Decisions = dict[int, tuple[bool, str, str]]


class _Check(NamedTuple):
    """State of the calibration check of one probe: the two CUSUM sums, whether its gain
    is estimated, and the sample time at which each sum last rose from zero."""

    high: float = 0.0
    low: float = 0.0
    estimated: bool = False
    high_since: float = math.nan
    low_since: float = math.nan


_Checks = dict[str, _Check]


@dataclasses.dataclass(frozen=True)
class EstimatorConfig:
    """Tuning of the :class:`Estimator` (use :meth:`for_model` for per-model defaults).

    Attributes:
        process_noise: state -> (absolute, relative) standard deviation of the model error
            per sqrt(h); missing states get (1e-6, 0.01).
        online_noise: variable -> (absolute, relative) measurement standard deviation of
            the online probes.
        assay_noise: the same for offline assays.
        physical_ranges: variable -> (low, high); measurements outside are rejected and
            state means are projected into the box. Missing: the model's state bounds.
        parameter_factors: model parameters with an estimated multiplicative factor (the
            first is reported as ``growth_factor`` when it is ``mu_max``).
        factor_initial_std: initial standard deviation of each log-factor.
        factor_random_walk: standard deviation of each log-factor's random walk per sqrt(h).
        factor_bounds: (low, high) of every factor.
        online_gains: online variables whose probe gain is estimated (empty: probes are
            taken as calibrated).
        gain_initial_std: standard deviation of each log-gain when its estimation starts
            (with the calibration check: at least the relative disagreement that fired it).
        gain_random_walk: standard deviation of each log-gain's random walk per sqrt(h),
            while the gain is estimated.
        gain_bounds: (low, high) of every probe gain.
        gain_check_threshold: 0 (default): every gain in ``online_gains`` is estimated from
            the start. Positive: the calibration check. Each probe is taken as calibrated
            (gain 1, no variance) until a two-sided CUSUM of the normalised innovations of
            its variable's assays exceeds this many standard deviations; its gain is then
            estimated from the start of the disagreement on. See docs/estimation.md for
            the trade-off (2.5 with ``gain_check_slack`` 1.0 is the tested setting).
        gain_check_slack: the CUSUM's reference value (allowance per assay), sd.
        innovation_gate: online measurement rejected as a spike when
            |innovation| > gate * sqrt(innovation variance).
        assay_innovation_gate: the same for assays.
        gate_reset_after: after this many consecutive gate rejections of one variable
            within ``gate_reset_window_h`` the model, not the sensor, is taken to be wrong:
            the value is accepted and the variance of the states it measures inflated until
            it passes the gate.
        gate_reset_window_h: the time span of those rejections, h (isolated spikes or a
            recurring frozen value hours apart never re-admit).
        stuck_samples: online value unchanged for this many samples is stuck.
        stuck_tolerance: change regarded as "unchanged".
        max_online_age_h: older online samples are stale.
        history_h: how far back a late measurement can be re-processed, h.
        max_substep_h: longest RK4 sub-step of the prediction, h.
        substeps_per_call: RK4 sub-steps inside the CasADi step function.
        time_tolerance_h: timestamps closer than this are the same time.
        uncertain_variance_factor: measurement variance multiplier for values whose source
            flags their quality ``uncertain`` (``bad`` ones are rejected).
        mismatch_window_online: the model-mismatch diagnostic
            (:mod:`controller.numerics.mismatch`) averages the normalised innovations
            squared of each online variable over this many values.
        mismatch_window_assay: the same for each assay.
        mismatch_alpha: false-alarm probability of the diagnostic's chi-square band per
            window.
        gain_drift_alarm: a probe gain further than this (relative) from 1 raises the
            diagnostic's drift alarm; 0: off.
    """

    process_noise: NoiseTable = dataclasses.field(default_factory=dict)
    online_noise: NoiseTable = dataclasses.field(default_factory=dict)
    assay_noise: NoiseTable = dataclasses.field(default_factory=dict)
    physical_ranges: NoiseTable = dataclasses.field(default_factory=dict)
    parameter_factors: tuple[str, ...] = ("mu_max",)
    factor_initial_std: float = 0.3
    factor_random_walk: float = 0.01
    factor_bounds: tuple[float, float] = (0.1, 5.0)
    online_gains: tuple[str, ...] = ()
    gain_initial_std: float = 0.05
    gain_random_walk: float = 0.01
    gain_bounds: tuple[float, float] = (0.5, 2.0)
    gain_check_threshold: float = 0.0
    gain_check_slack: float = 1.0
    innovation_gate: float = 4.0
    assay_innovation_gate: float = 4.0
    gate_reset_after: int = 3
    gate_reset_window_h: float = 4.0
    stuck_samples: int = 5
    stuck_tolerance: float = 0.0
    max_online_age_h: float = 2.0
    history_h: float = 72.0
    max_substep_h: float = 0.05
    substeps_per_call: int = 10
    time_tolerance_h: float = 1e-6
    uncertain_variance_factor: float = 4.0
    mismatch_window_online: int = 24
    mismatch_window_assay: int = 4
    mismatch_alpha: float = 0.001
    gain_drift_alarm: float = 0.2

    def __post_init__(self) -> None:
        positive = {
            "factor_initial_std": self.factor_initial_std,
            "innovation_gate": self.innovation_gate,
            "assay_innovation_gate": self.assay_innovation_gate,
            "max_online_age_h": self.max_online_age_h,
            "gate_reset_window_h": self.gate_reset_window_h,
            "history_h": self.history_h,
            "max_substep_h": self.max_substep_h,
            "time_tolerance_h": self.time_tolerance_h,
            "uncertain_variance_factor": self.uncertain_variance_factor,
        }
        for key, value in positive.items():
            if not (math.isfinite(value) and value > 0):
                raise ConfigError(f"estimator config: {key} must be positive, got {value!r}.")
        if not (math.isfinite(self.factor_random_walk) and self.factor_random_walk >= 0):
            raise ConfigError(
                "estimator config: factor_random_walk must be >= 0, "
                f"got {self.factor_random_walk!r}."
            )
        for key, (low, high) in (
            ("factor_bounds", self.factor_bounds),
            ("gain_bounds", self.gain_bounds),
        ):
            if not 0 < low <= 1.0 <= high < math.inf:
                raise ConfigError(
                    f"estimator config: {key} ({low}, {high}) must bracket 1 and be > 0."
                )
        if not (math.isfinite(self.gain_random_walk) and self.gain_random_walk >= 0):
            raise ConfigError(
                f"estimator config: gain_random_walk must be >= 0, got {self.gain_random_walk!r}."
            )
        if not (math.isfinite(self.gain_initial_std) and self.gain_initial_std > 0):
            raise ConfigError(
                "estimator config: gain_initial_std must be positive, "
                f"got {self.gain_initial_std!r}."
            )
        for key, value in (
            ("gain_check_threshold", self.gain_check_threshold),
            ("gain_check_slack", self.gain_check_slack),
        ):
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"estimator config: {key} must be >= 0, got {value!r}.")
        for key, ival in (
            ("gate_reset_after", self.gate_reset_after),
            ("stuck_samples", self.stuck_samples),
            ("substeps_per_call", self.substeps_per_call),
            ("mismatch_window_online", self.mismatch_window_online),
            ("mismatch_window_assay", self.mismatch_window_assay),
        ):
            if ival < 1:
                raise ConfigError(f"estimator config: {key} must be at least 1, got {ival!r}.")
        if not 0.0 < self.mismatch_alpha < 0.5:
            raise ConfigError(
                "estimator config: mismatch_alpha must lie in (0, 0.5), "
                f"got {self.mismatch_alpha!r}."
            )
        if not (math.isfinite(self.gain_drift_alarm) and self.gain_drift_alarm >= 0):
            raise ConfigError(
                f"estimator config: gain_drift_alarm must be >= 0, got {self.gain_drift_alarm!r}."
            )
        for table_name in ("process_noise", "online_noise", "assay_noise"):
            for name, (absolute, relative) in getattr(self, table_name).items():
                if not (absolute >= 0 and relative >= 0 and absolute + relative > 0):
                    raise ConfigError(
                        f"estimator config: {table_name}[{name!r}] = ({absolute}, {relative}) "
                        "needs non-negative parts, not both zero."
                    )
        for name, (rlow, rhigh) in self.physical_ranges.items():
            if not rlow < rhigh:
                raise ConfigError(
                    f"estimator config: physical_ranges[{name!r}] = ({rlow}, {rhigh}) is empty."
                )

    @classmethod
    def for_model(cls, model: Any, process: Any = None) -> EstimatorConfig:
        """The defaults the model's process plug-in declares (``process``: a plug-in or its
        name; default: the registered plug-in of the model's class, see
        :func:`plant_models.process.process_of`): its sensors' and assays' noise and its
        :class:`~plant_models.process.EstimatorDefaults`. A model no plug-in declares gets
        generic relative defaults, with a factor on ``mu_max`` only if it has one.

        The T-cell and CHO defaults estimate the gain of the online viable-cell probe,
        which only assays can observe: for a site without assays use
        ``dataclasses.replace(config, online_gains=())``; for a site whose probe is known
        to hold its calibration, the calibration check (``gain_check_threshold``).
        """
        plugin = get_process(process) if process is not None else process_of(model)
        if plugin is None:
            params = getattr(model, "parameters", None)
            factors = tuple(n for n in ("mu_max",) if hasattr(params, n))
            return cls(parameter_factors=factors)
        declared = plugin.estimator
        return cls(
            process_noise=dict(declared.process_noise),
            online_noise={k: (v.absolute, v.relative) for k, v in plugin.sensors.online.items()},
            assay_noise={k: (v.absolute, v.relative) for k, v in plugin.sensors.assays.items()},
            physical_ranges=dict(declared.physical_ranges),
            online_gains=tuple(declared.online_gains),
            parameter_factors=tuple(declared.parameter_factors),
        )


#: Tables of an estimator tuning file (name = [a, b]); every other field is in [estimator].
_TABLES = ("process_noise", "online_noise", "assay_noise", "physical_ranges")
_SECTION = tuple(f.name for f in dataclasses.fields(EstimatorConfig) if f.name not in _TABLES)


def load_estimator_config(path: str | Path, model: Any) -> EstimatorConfig:
    """Estimator tuning from a TOML file, on top of :meth:`EstimatorConfig.for_model`.

    The file has an ``[estimator]`` table with the scalar settings, ``parameter_factors``
    and ``online_gains`` (lists of names), ``factor_bounds`` and ``gain_bounds`` (pairs),
    and optional tables ``[process_noise]``, ``[online_noise]``, ``[assay_noise]`` (name =
    [absolute, relative]) and ``[physical_ranges]`` (name = [low, high]) whose entries
    replace the defaults of those names. Unknown keys are rejected with suggestions; keys
    and types are checked by :func:`plant_models.config.load_fields` from the fields of
    :class:`EstimatorConfig`, values by :meth:`EstimatorConfig.__post_init__`.

    Raises:
        ConfigError: naming the file and the key.
    """
    data = load_toml(path)
    where = str(path)
    tables = load_fields(
        EstimatorConfig, data, where, names=_TABLES, extra=("estimator",), root=True
    )
    section = data.get("estimator", {})
    changes = load_fields(EstimatorConfig, section, f"{where} [estimator]", names=_SECTION)
    base = EstimatorConfig.for_model(model)
    for table, entries in tables.items():
        if entries:
            changes[table] = {**getattr(base, table), **entries}
    try:
        config = dataclasses.replace(base, **changes)
        Estimator(model, config)  # names of factors and gains checked against the model
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return config


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: it holds a numpy array
class EstimatorResult:
    """The estimate after one :meth:`Estimator.update`.

    Attributes:
        time_h: culture age of the estimate, h.
        state: state name -> posterior mean (canonical units).
        std: state name -> posterior standard deviation.
        outputs: measurable variable (states and derived, e.g. viability) -> mean.
        growth_factor: estimated factor on ``mu_max`` (1.0 when not estimated).
        growth_factor_std: its standard deviation (delta method on the log-factor).
        factors: parameter name -> estimated multiplicative factor.
        online_gains: online variable -> estimated probe gain (reading / true value); 1.0
            while the probe passes the calibration check.
        covariance: ``(nz, nz)`` covariance of ``[x; log factors; log probe gains]``.
        accepted: decisions on the measurements of this call that were used.
        rejected: decisions on the measurements of this call that were rejected.
        reprocessed_from_h: earliest time re-processed because of a late measurement
            (None when only the present step was updated).
        gains_estimated: online variable -> whether its probe gain is being estimated
            (the assays disagreed with the probe; False while it passes the check).
        mismatch: the model-mismatch diagnostic (innovation statistics, probe-gain drift;
            :class:`controller.numerics.mismatch.MismatchReport`).
    """

    time_h: float
    state: Mapping[str, float]
    std: Mapping[str, float]
    outputs: Mapping[str, float]
    growth_factor: float
    growth_factor_std: float
    factors: Mapping[str, float]
    online_gains: Mapping[str, float]
    covariance: FloatArray
    accepted: tuple[MeasurementDecision, ...]
    rejected: tuple[MeasurementDecision, ...]
    reprocessed_from_h: float | None
    gains_estimated: Mapping[str, bool] = dataclasses.field(default_factory=dict)
    mismatch: MismatchReport = dataclasses.field(default_factory=MismatchReport)

    def state_vector(self, names: Sequence[str]) -> FloatArray:
        """State means ordered as ``names`` (e.g. ``model.state_names``) -> (len(names),)."""
        return np.array([self.state[n] for n in names], dtype=float)


@dataclasses.dataclass
class _Step:
    """One point of the history: the measurements fused at ``time_h`` and the estimate
    before (prior) and after (posterior) fusing them. ``inputs`` were applied over the
    interval that ends here."""

    time_h: float
    inputs: FloatArray
    measurements: list[Measurement]
    prior_mean: FloatArray
    prior_cov: FloatArray
    post_mean: FloatArray
    post_cov: FloatArray
    gate_counts_before: _GateCounts
    gate_counts_after: _GateCounts
    decisions: dict[int, tuple[bool, str, str]]
    checks_before: _Checks = dataclasses.field(default_factory=dict)
    checks_after: _Checks = dataclasses.field(default_factory=dict)
    #: (source, variable, normalised innovation squared) of the measurements fused here
    innovations: list[tuple[str, str, float]] = dataclasses.field(default_factory=list)

    @classmethod
    def start(cls, time_h: float, inputs: FloatArray, prev: _Step) -> _Step:
        """A new step after ``prev`` (prior and posterior set to ``prev``'s posterior until
        the history is re-run)."""
        return cls(
            time_h=time_h,
            inputs=inputs,
            measurements=[],
            prior_mean=prev.post_mean,
            prior_cov=prev.post_cov,
            post_mean=prev.post_mean,
            post_cov=prev.post_cov,
            gate_counts_before=dict(prev.gate_counts_after),
            gate_counts_after=dict(prev.gate_counts_after),
            decisions={},
            checks_before=dict(prev.checks_after),
            checks_after=dict(prev.checks_after),
        )


class Estimator:
    """Extended Kalman filter with delayed-measurement re-processing and parameter factors.

    Args:
        model: any model with ``state_names``, ``input_names``, ``parameters`` (for the
            nominal values of ``config.parameter_factors``) and
            ``dynamics(symbolic_parameters=...) -> ca.Function (t, x, u, p) -> (xdot, ...)``.
        config: tuning; default :meth:`EstimatorConfig.for_model`.
    """

    def __init__(self, model: Any, config: EstimatorConfig | None = None) -> None:
        self.model = model
        self.config = config if config is not None else EstimatorConfig.for_model(model)
        cfg = self.config
        self.state_names: tuple[str, ...] = tuple(model.state_names)
        self.input_names: tuple[str, ...] = tuple(model.input_names)
        self.factor_names: tuple[str, ...] = tuple(cfg.parameter_factors)
        self.nx = len(self.state_names)
        self.nu = len(self.input_names)
        self.nf = len(self.factor_names)
        self.gain_names: tuple[str, ...] = tuple(cfg.online_gains)
        self.ng = len(self.gain_names)
        self.nz = self.nx + self.nf + self.ng
        self._nominal = self._nominal_parameters()
        self._low, self._high = self._state_box()
        self._step_fn = self._build_step()
        self.output_names, self._output_fn = self._build_outputs()
        ranges = {**self._default_ranges(), **cfg.physical_ranges}
        self.validator = MeasurementValidator(
            ValidationSettings(
                physical_ranges=ranges,
                stuck_samples=cfg.stuck_samples,
                stuck_tolerance=cfg.stuck_tolerance,
                max_online_age_h=cfg.max_online_age_h,
                time_tolerance_h=cfg.time_tolerance_h,
            ),
            frozenset(self.output_names),
        )
        #: canonical unit of every measurable variable the model declares a unit for
        self.units: dict[str, str] = {
            s.name: s.unit for s in getattr(model, "states", ()) if getattr(s, "unit", "")
        }
        self.units.setdefault("viability", "1")
        self._history: list[_Step] = []
        self._alarms_logged: set[tuple[str, float]] = set()
        #: probe variable -> (time from which its gain is estimated, i.e. the start of the
        #: disagreement, and the time of the assay that raised the calibration alarm), h
        self._gain_start: dict[str, tuple[float, float]] = {}
        #: Every decision taken, oldest first (bounded to the last 10 000).
        self.events: list[MeasurementDecision] = []
        #: the model-mismatch diagnostic (innovation windows, alarm episodes)
        self.mismatch = MismatchMonitor(
            {"online": cfg.mismatch_window_online, "assay": cfg.mismatch_window_assay},
            cfg.mismatch_alpha,
            {"online": cfg.innovation_gate**2, "assay": cfg.assay_innovation_gate**2},
            cfg.gain_drift_alarm,
        )

    # -- construction ------------------------------------------------------------------
    def _nominal_parameters(self) -> FloatArray:
        values = []
        params = getattr(self.model, "parameters", None)
        for name in self.factor_names:
            value = getattr(params, name, None)
            if value is None or not math.isfinite(float(value)) or float(value) <= 0:
                raise ConfigError(
                    f"estimator config: parameter_factors names {name!r}, but the model has no "
                    "positive parameter of that name; choose one of its kinetic parameters."
                )
            values.append(float(value))
        return np.array(values, dtype=float)

    def _state_box(self) -> tuple[FloatArray, FloatArray]:
        specs = {s.name: s for s in getattr(self.model, "states", ())}
        ranges = self.config.physical_ranges
        low = np.zeros(self.nz)
        high = np.full(self.nz, np.inf)
        for i, name in enumerate(self.state_names):
            if name in specs:
                low[i], high[i] = specs[name].low, specs[name].high
            if name in ranges:
                low[i], high[i] = max(low[i], ranges[name][0]), min(high[i], ranges[name][1])
        flow, fhigh = self.config.factor_bounds
        glow, ghigh = self.config.gain_bounds
        nxf = self.nx + self.nf
        low[self.nx : nxf], high[self.nx : nxf] = math.log(flow), math.log(fhigh)
        low[nxf:], high[nxf:] = math.log(glow), math.log(ghigh)
        return low, high

    def _default_ranges(self) -> dict[str, tuple[float, float]]:
        ranges = {
            n: (float(self._low[i]), float(self._high[i])) for i, n in enumerate(self.state_names)
        }
        ranges["viability"] = (0.0, 1.0)
        return ranges

    def _build_step(self) -> ca.Function:
        """``(t, z, u, h) -> (z_next, A)``: RK4 over ``h`` in ``substeps_per_call`` sub-steps
        and ``A = d z_next / d z``."""
        dyn = self.model.dynamics(symbolic_parameters=self.factor_names)
        t = ca.SX.sym("t")
        z = ca.SX.sym("z", self.nz)
        u = ca.SX.sym("u", self.nu)
        h = ca.SX.sym("h")
        p = ca.DM(self._nominal) * ca.exp(z[self.nx : self.nx + self.nf]) if self.nf else None

        def f(tt: Any, xx: Any) -> Any:
            args = [tt, xx, u] if p is None else [tt, xx, u, p]
            return dyn(*args)[0]

        x = rk4(f, t, z[: self.nx], h, self.config.substeps_per_call)
        z_next = ca.vertcat(x, z[self.nx :])
        jac = ca.jacobian(z_next, z)
        return ca.Function(
            "estimator_step", [t, z, u, h], [z_next, jac], ["t", "z", "u", "h"], ["z_next", "A"]
        )

    def _build_outputs(self) -> tuple[tuple[str, ...], ca.Function]:
        """``z -> (y, C)``: every measurable variable and its Jacobian."""
        z = ca.SX.sym("z", self.nz)
        idx = {n: i for i, n in enumerate(self.state_names)}
        names = list(self.state_names)
        exprs = [z[i] for i in range(self.nx)]
        if "viable_cells" in idx and ("dead_cells" in idx or "total_cells" in idx):
            viable = z[idx["viable_cells"]]
            total = viable + z[idx["dead_cells"]] if "dead_cells" in idx else z[idx["total_cells"]]
            names.append("viability")
            exprs.append(viable / ca.fmax(total, 1e-9))
        if "viable_cells" in idx and "volume" in idx:
            names.append("total_viable_cells")
            exprs.append(z[idx["viable_cells"]] * z[idx["volume"]])
        # rows: ("", name) true value (assays); ("online", name) as read by a probe with gain
        self._rows: dict[tuple[str, str], int] = {("", n): i for i, n in enumerate(names)}
        for i, name in enumerate(self.gain_names):
            if name not in names:
                raise ConfigError(
                    f"estimator config: online_gains names {name!r}, which the model cannot "
                    f"predict; choose from {names}."
                )
            self._rows[("online", name)] = len(exprs)
            exprs.append(ca.exp(z[self.nx + self.nf + i]) * exprs[names.index(name)])
        y = ca.vertcat(*exprs)
        fn = ca.Function("estimator_outputs", [z], [y, ca.jacobian(y, z)], ["z"], ["y", "C"])
        return tuple(names), fn

    # -- public API --------------------------------------------------------------------
    def initialize(
        self,
        x0_mean: Mapping[str, float],
        P0: npt.ArrayLike,
        time_h: float = 0.0,
    ) -> EstimatorResult:
        """Start (or restart) the filter.

        Args:
            x0_mean: state name -> initial mean (all states).
            P0: initial covariance of the states, ``(nx, nx)``, or of the augmented state
                ``(nz, nz)``; a vector is taken as the diagonal. Factor variances default
                to ``factor_initial_std**2``.
            time_h: culture age of the initial estimate.
        """
        missing = [n for n in self.state_names if n not in x0_mean]
        unknown = [n for n in x0_mean if n not in self.state_names]
        if missing or unknown:
            raise ModelError(
                f"initialize: x0_mean has missing {missing} / unknown {unknown} states; "
                f"expected {list(self.state_names)}."
            )
        mean = np.zeros(self.nz)
        mean[: self.nx] = [float(x0_mean[n]) for n in self.state_names]
        p_in = np.asarray(P0, dtype=float)
        if p_in.ndim == 1:
            p_in = np.diag(p_in)
        cov = np.diag(
            np.concatenate(
                [
                    np.zeros(self.nx),
                    np.full(self.nf, self.config.factor_initial_std**2),
                    np.full(self.ng, self.config.gain_initial_std**2),
                ]
            )
        )
        if p_in.shape == (self.nx, self.nx):
            cov[: self.nx, : self.nx] = p_in
        elif p_in.shape == (self.nz, self.nz):
            cov = p_in.copy()
        else:
            raise ModelError(
                f"initialize: P0 has shape {p_in.shape}; expected ({self.nx}, {self.nx}) or "
                f"({self.nz}, {self.nz}) (states, log-factors {list(self.factor_names)}, "
                f"log-gains {list(self.gain_names)})."
            )
        if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(cov))):
            raise ModelError("initialize: x0_mean and P0 must be finite.")
        cov = 0.5 * (cov + cov.T)
        if np.min(np.linalg.eigvalsh(cov)) < -1e-12 * max(1.0, float(np.max(np.abs(cov)))):
            raise ModelError("initialize: P0 must be positive semi-definite.")
        mean = self._project(mean)
        # a probe under the calibration check has gain 1 and no variance until the assays
        # disagree with it; a full P0 with a gain variance starts its estimation at once
        checks: _Checks = {}
        full = p_in.shape == (self.nz, self.nz)
        for i, name in enumerate(self.gain_names):
            j = self.nx + self.nf + i
            estimated = self.config.gain_check_threshold == 0 or (full and cov[j, j] > 0)
            checks[name] = _Check(estimated=estimated)
            if not estimated:
                cov[j, :] = 0.0
                cov[:, j] = 0.0
        self._alarms_logged.clear()
        self._gain_start = {}
        self.mismatch.forget()
        self.validator = MeasurementValidator(
            self.validator.settings, self.validator.known_variables
        )
        self._history = [
            _Step(
                time_h=float(time_h),
                inputs=np.zeros(self.nu),
                measurements=[],
                prior_mean=mean,
                prior_cov=cov,
                post_mean=mean.copy(),
                post_cov=cov.copy(),
                gate_counts_before={},
                gate_counts_after={},
                decisions={},
                checks_before=dict(checks),
                checks_after=dict(checks),
            )
        ]
        self.events = []
        return self._result([], None)

    def snapshot(self) -> dict[str, Any]:
        """The whole filter state as JSON-compatible data (``json.dumps`` works on it).

        It holds the history kept for re-processing (times, inputs, fused measurements,
        prior and posterior of every step, gate and calibration-check state), the
        calibration alarms and the validation state (stuck sensors, assays already seen),
        so an estimator restored from it continues exactly as this one would, including
        late assays sampled before the snapshot and duplicate rejection. Not included: the
        configuration and the model (construct the new estimator with the same ones) and
        :attr:`events` (the decision log; it lives in the historian).
        """
        self._require_initialized()
        return {
            "format": _SNAPSHOT_FORMAT,
            "state_names": list(self.state_names),
            "factor_names": list(self.factor_names),
            "gain_names": list(self.gain_names),
            "steps": [_dump_step(step) for step in self._history],
            "gain_start": {n: [_num(a), _num(b)] for n, (a, b) in self._gain_start.items()},
            "alarms_logged": [[n, _num(t)] for n, t in sorted(self._alarms_logged)],
            "validator": self.validator.snapshot(),
        }

    def restore(self, data: Mapping[str, Any]) -> EstimatorResult:
        """Continue from a :meth:`snapshot` (instead of :meth:`initialize`).

        Returns:
            The estimate at the snapshot's present time (no measurement decisions).

        Raises:
            ModelError: the snapshot is malformed, or was taken with another model or
                configuration (different states, factors or probe gains); re-initialise
                the estimator in that case.
        """
        if not isinstance(data, Mapping) or data.get("format") != _SNAPSHOT_FORMAT:
            raise ModelError(
                f"restore: not an estimator snapshot (format {_SNAPSHOT_FORMAT!r} expected); "
                "pass the dict returned by Estimator.snapshot()."
            )
        names = {
            "state_names": self.state_names,
            "factor_names": self.factor_names,
            "gain_names": self.gain_names,
        }
        for key, ours in names.items():
            if tuple(data.get(key, ())) != ours:
                raise ModelError(
                    f"restore: the snapshot has {key} {data.get(key)!r}, this estimator "
                    f"{list(ours)!r}; restore with the model and configuration it was taken "
                    "with, or initialise a new estimator."
                )
        validator = MeasurementValidator(self.validator.settings, self.validator.known_variables)
        try:
            steps = [_load_step(d, self.nz, self.nu) for d in data["steps"]]
            gain_start = {
                str(n): (_unnum(v[0]), _unnum(v[1])) for n, v in data["gain_start"].items()
            }
            alarms = {(str(n), _unnum(t)) for n, t in data["alarms_logged"]}
            validator.restore(data["validator"])
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as exc:
            raise ModelError(f"restore: malformed estimator snapshot ({exc!r}).") from None
        times = [st.time_h for st in steps]
        if not steps or any(b <= a for a, b in itertools.pairwise(times)):
            raise ModelError(
                "restore: the snapshot's history is empty or its times do not increase."
            )
        self._history = steps
        self._gain_start = gain_start
        self.mismatch.forget()  # the diagnostic's windows are not part of the snapshot
        self._alarms_logged = alarms
        self.validator = validator
        self.events = []
        return self._result([], None)

    @property
    def history_times(self) -> tuple[float, ...]:
        """Times of the steps kept for re-processing, oldest first, h."""
        return tuple(step.time_h for step in self._history)

    @property
    def time_h(self) -> float:
        """Culture age of the present estimate, h."""
        self._require_initialized()
        return self._history[-1].time_h

    def update(
        self,
        time_h: float,
        inputs_applied_since_last: Mapping[str, float],
        measurements: Sequence[Measurement],
    ) -> EstimatorResult:
        """Advance to ``time_h`` and fuse the measurements that arrived since the last call.

        Args:
            time_h: present culture age (not before the previous update), h.
            inputs_applied_since_last: input name -> value held since the last update
                (all inputs; ignored when ``time_h`` equals the previous time).
            measurements: online readings and assays, each placed at its ``sample_time``.

        Returns:
            The estimate at ``time_h`` with the decision on every measurement of this call.
        """
        self._require_initialized()
        cfg = self.config
        tol = cfg.time_tolerance_h
        last = self._history[-1]
        if not math.isfinite(time_h) or time_h < last.time_h - tol:
            raise ModelError(
                f"update: time {time_h!r} h is before the last update at {last.time_h:g} h; "
                "the estimator's clock must not run backwards."
            )
        changed = len(self._history) - 1
        if time_h > last.time_h + tol:
            u = self._input_vector(inputs_applied_since_last)
            self._history.append(_Step.start(float(time_h), u, last))
            changed = len(self._history) - 1
        now = self._history[-1].time_h
        rejected_early: list[MeasurementDecision] = []
        placed: list[Measurement] = []
        for received in measurements:
            m, problem = self._canonical(received)
            if problem:
                rejected_early.append(MeasurementDecision(received, False, "unit", problem, now))
                continue
            ok, reason, detail = self.validator.check(m, now, self._history[0].time_h)
            if not ok:
                rejected_early.append(MeasurementDecision(m, False, reason, detail, now))
                continue
            index = self._place(m)
            changed = min(changed, index)
            placed.append(m)
        changed = self._undo_alarms(changed)
        reprocessed = self._history[changed].time_h if changed < len(self._history) - 1 else None
        if reprocessed is not None:
            log.info("re-processing the history from %.4g h to %.4g h", reprocessed, now)
        self._replay(changed)
        decisions: dict[int, tuple[bool, str, str]] = {}
        for step in self._history[changed:]:
            decisions.update(step.decisions)
        self._prune()
        for step in self._history:  # re-processed steps replace their earlier values
            for source, name, nis in step.innovations:
                self.mismatch.record(source, name, step.time_h, nis)
        return self._result(placed, reprocessed, rejected_early, decisions)

    def _canonical(self, m: Measurement) -> tuple[Measurement, str]:
        """``m`` in its variable's canonical unit (the same object when it is in it
        already; a converted copy when the conversion table knows the pair) and ``""``, or
        ``m`` and why its unit is refused. A value never enters the filter in another unit."""
        canonical = self.units.get(m.name)
        if canonical is None or m.unit == canonical:
            return m, ""
        factor = known_conversion(m.name, m.unit, canonical)
        if factor is None:
            return m, (
                f"unit {m.unit!r} of {m.name} cannot be converted to its canonical unit "
                f"{canonical!r}"
            )
        return dataclasses.replace(m, value=m.value * factor, unit=canonical), ""

    # -- history -----------------------------------------------------------------------
    def _place(self, m: Measurement) -> int:
        """Attach ``m`` to the step at its sample time (inserting one if needed); index."""
        tol = self.config.time_tolerance_h
        hist = self._history
        for i in range(len(hist) - 1, -1, -1):
            step = hist[i]
            if abs(step.time_h - m.sample_time) <= tol:
                step.measurements.append(m)
                return i
            if step.time_h < m.sample_time:
                # strictly between step i and i + 1: the inputs of that interval apply to both
                nxt = hist[i + 1]
                new = _Step.start(m.sample_time, nxt.inputs.copy(), step)
                new.measurements.append(m)
                hist.insert(i + 1, new)
                return i + 1
        raise ModelError(  # the validator rejects samples older than the history
            f"measurement {m.name} sampled at {m.sample_time:g} h precedes the history."
        )

    def _replay(self, start: int) -> None:
        hist = self._history
        k = start
        while k < len(hist):
            step = hist[k]
            if k > 0:
                prev = hist[k - 1]
                step.checks_before = dict(prev.checks_after)
                step.prior_mean, step.prior_cov = self._predict(
                    prev.post_mean,
                    prev.post_cov,
                    prev.time_h,
                    step.time_h,
                    step.inputs,
                    step.checks_before,
                )
                step.gate_counts_before = dict(prev.gate_counts_after)
            (
                step.post_mean,
                step.post_cov,
                step.gate_counts_after,
                step.checks_after,
                step.decisions,
                step.innovations,
            ) = self._correct(
                step.prior_mean,
                step.prior_cov,
                step.time_h,
                step.measurements,
                step.gate_counts_before,
                step.checks_before,
            )
            k = self._restart_after_alarm(k)

    def _undo_alarms(self, changed: int) -> int:
        """Forget calibration alarms raised at or after the step re-processing starts from
        (the check runs again on the new data) and return where the re-processing must
        start so that it covers the steps those alarms changed. Hence assays that arrive in
        any order give the in-order result."""
        tol = self.config.time_tolerance_h
        t_start = self._history[changed].time_h
        for name, (since, raised_at) in list(self._gain_start.items()):
            if raised_at >= t_start - tol:
                del self._gain_start[name]
                j = next(
                    (i for i, st in enumerate(self._history) if st.time_h >= since - tol),
                    changed,
                )
                changed = min(changed, j)
        return changed

    def _restart_after_alarm(self, k: int) -> int:
        """The step to re-run next after step ``k``: ``k + 1``, or, when the calibration check
        of a probe fired at step ``k``, the step where the disagreement began (the gain is
        then estimated from there on, so the present estimate uses every assay of it)."""
        hist = self._history
        step = hist[k]
        tol = self.config.time_tolerance_h
        restart = k + 1
        for name, after in step.checks_after.items():
            before = step.checks_before.get(name)
            if before is None or before.estimated or not after.estimated:
                continue
            if name in self._gain_start:
                continue
            since = after.high_since if after.high >= after.low else after.low_since
            if not math.isfinite(since):
                since = step.time_h
            since = max(since, hist[0].time_h)
            self._gain_start[name] = (since, step.time_h)
            j = next(i for i, st in enumerate(hist) if st.time_h >= since - tol)
            restart = min(restart, j)
        return restart

    def _prune(self) -> None:
        cutoff = self._history[-1].time_h - self.config.history_h
        drop = 0
        while drop < len(self._history) - 1 and self._history[drop + 1].time_h <= cutoff:
            drop += 1
        if drop:
            del self._history[:drop]
            # the oldest kept step is now the start of any re-processing
            self.validator.forget_before(self._history[0].time_h)

    # -- filter equations --------------------------------------------------------------
    def _predict(
        self,
        mean: FloatArray,
        cov: FloatArray,
        t0: float,
        t1: float,
        u: FloatArray,
        checks: _Checks,
    ) -> tuple[FloatArray, FloatArray]:
        dt = t1 - t0
        if dt <= 0:
            return mean.copy(), cov.copy()
        cfg = self.config
        span = cfg.max_substep_h * cfg.substeps_per_call
        n = max(1, math.ceil(dt / span - 1e-9))
        h = dt / n
        z = mean.copy()
        phi = np.eye(self.nz)
        t = t0
        for _ in range(n):
            z_next, a_mat = self._step_fn(t, z, u, h)
            z = self._project(np.asarray(z_next, dtype=float).reshape(-1))
            phi = np.asarray(a_mat, dtype=float) @ phi
            t += h
        if not (np.all(np.isfinite(z)) and np.all(np.isfinite(phi))):
            raise IntegrationError(
                f"estimator prediction {t0:g}-{t1:g} h gave non-finite values; "
                "check the model, the inputs and max_substep_h."
            )
        q = np.zeros(self.nz)
        for i, name in enumerate(self.state_names):
            absolute, relative = cfg.process_noise.get(name, (1e-6, 0.01))
            q[i] = (absolute + relative * abs(mean[i])) ** 2 * dt
        q[self.nx : self.nx + self.nf] = cfg.factor_random_walk**2 * dt
        for i, name in enumerate(self.gain_names):
            # a probe taken as calibrated keeps gain 1 exactly until the check fires
            if name not in checks or checks[name].estimated:
                q[self.nx + self.nf + i] = cfg.gain_random_walk**2 * dt
        new_cov = phi @ cov @ phi.T + np.diag(q)
        return z, 0.5 * (new_cov + new_cov.T)

    def _correct(
        self,
        mean: FloatArray,
        cov: FloatArray,
        time_h: float,
        measurements: Sequence[Measurement],
        gate_counts: _GateCounts,
        gain_checks: _Checks,
    ) -> tuple[FloatArray, FloatArray, _GateCounts, _Checks, _Decisions, list[Any]]:
        cfg = self.config
        x = mean.copy()
        p = cov.copy()
        counts = dict(gate_counts)
        checks = dict(gain_checks)
        for name, check in checks.items():
            # a probe found miscalibrated later: its gain is estimated from the start of
            # the disagreement on (see _replay)
            start = self._gain_start.get(name, (math.inf, math.inf))[0]
            if not check.estimated and time_h >= start - cfg.time_tolerance_h:
                checks[name] = check._replace(estimated=True)
                p = self._release_gain(name, x, p, cfg.gain_initial_std)
        decisions: _Decisions = {}
        innovations: list[tuple[str, str, float]] = []
        index = self._rows
        # canonical order, so the result does not depend on arrival order
        for m in sorted(measurements, key=lambda m: (m.source, m.name, m.value)):
            y_all, c_all = self._output_fn(x)
            j = index.get((m.source, m.name), index[("", m.name)])
            y_hat = float(y_all[j])
            c_row = np.asarray(c_all[j, :], dtype=float).reshape(-1)
            table = cfg.online_noise if m.source == "online" else cfg.assay_noise
            absolute, relative = table.get(m.name, (0.0, 0.05))
            r = max((absolute + relative * abs(y_hat)) ** 2, 1e-12)
            if m.quality == "uncertain":
                r *= cfg.uncertain_variance_factor
            pc = p @ c_row
            s = float(c_row @ pc) + r
            nu = m.value - y_hat
            gate = cfg.innovation_gate if m.source == "online" else cfg.assay_innovation_gate
            sigmas = abs(nu) / math.sqrt(s)
            key = (m.source, m.name)
            alarm = ""
            if m.source == "assay" and m.name in checks and not checks[m.name].estimated:
                p, alarm = self._check_probe(m, time_h, x, y_hat, nu, s, p, checks)
                if alarm:
                    pc = p @ c_row
                    s = float(c_row @ pc) + r
                    sigmas = abs(nu) / math.sqrt(s)
            innovations.append((m.source, m.name, sigmas**2))
            if sigmas > gate:
                times = (*counts.get(key, ()), time_h)[-cfg.gate_reset_after :]
                counts[key] = times
                persistent = (
                    len(times) >= cfg.gate_reset_after
                    and times[-1] - times[0] <= cfg.gate_reset_window_h
                )
                if not persistent:
                    decisions[id(m)] = (
                        False,
                        "innovation_gate",
                        f"innovation {nu:.4g} is {sigmas:.1f} sd (gate {gate:g})",
                    )
                    continue
                p = self._inflate(p, c_row, nu**2 / gate**2 * 1.05 - r)
                log.warning(
                    "%s %s rejected by the gate %d times in a row at %.4g h: taking the model to "
                    "be wrong, variance of the states it measures inflated",
                    m.source,
                    m.name,
                    len(times),
                    time_h,
                )
                pc = p @ c_row
                s = float(c_row @ pc) + r
                detail = f"re-admitted after {len(times)} gate rejections ({sigmas:.1f} sd)"
            else:
                detail = f"innovation {sigmas:.2f} sd"
            detail += alarm
            counts[key] = ()
            gain = pc / s
            x = self._project(x + gain * nu)
            ikc = np.eye(self.nz) - np.outer(gain, c_row)
            p = ikc @ p @ ikc.T + r * np.outer(gain, gain)
            p = 0.5 * (p + p.T)
            decisions[id(m)] = (True, "accepted", detail)
        return x, p, counts, checks, decisions, innovations

    def _check_probe(
        self,
        m: Measurement,
        time_h: float,
        x: FloatArray,
        y_hat: float,
        nu: float,
        s: float,
        p: FloatArray,
        checks: _Checks,
    ) -> tuple[FloatArray, str]:
        """The calibration check of the online probe of ``m.name`` (updates ``checks``).

        A two-sided CUSUM of the assay's normalised innovations. One assay adds at most 60 %
        of the threshold (an assay the gate rejects counts, but a single spiked assay never
        starts the estimation; two in a row in the same direction can). When it exceeds
        ``gain_check_threshold`` the probe's gain is estimated from this assay on: variance
        is added along the direction the online data cannot see (log-gain up, true value
        down so that gain * value stays as read), at least the relative disagreement of
        this assay, so the assay itself recalibrates the probe. Returns the covariance and
        a note for the decision ("" when the check passes).
        """
        cfg = self.config
        old = checks[m.name]
        z = nu / math.sqrt(s)
        most = 0.6 * cfg.gain_check_threshold
        high = max(0.0, old.high + min(z - cfg.gain_check_slack, most))
        low = max(0.0, old.low + min(-z - cfg.gain_check_slack, most))
        check = _Check(
            high,
            low,
            max(high, low) > cfg.gain_check_threshold,
            old.high_since if old.high > 0 else (time_h if high > 0 else math.nan),
            old.low_since if old.low > 0 else (time_h if low > 0 else math.nan),
        )
        checks[m.name] = check
        if not check.estimated:
            return p, ""
        sigma = max(cfg.gain_initial_std, abs(nu) / max(abs(y_hat), 1e-12))
        p = self._release_gain(m.name, x, p, sigma)
        if (m.name, time_h) not in self._alarms_logged:
            self._alarms_logged.add((m.name, time_h))
            log.warning(
                "assay %s=%.4g sampled at %.4g h disagrees with the online probe (CUSUM %.1f "
                "sd > %g): estimating the probe's gain from now on; recalibrate the probe "
                "against the assay",
                m.name,
                m.value,
                time_h,
                max(high, low),
                cfg.gain_check_threshold,
            )
        return p, f"; probe gain estimated from now on (CUSUM {max(high, low):.1f} sd)"

    def _release_gain(self, name: str, x: FloatArray, p: FloatArray, sigma: float) -> FloatArray:
        """Start estimating the gain of the online probe of ``name``: add variance
        ``sigma**2`` along the direction the online data cannot see (log-gain up, the true
        value down so that gain * value stays as read)."""
        y_all, c_all = self._output_fn(x)
        row = self._rows[("", name)]
        y_true = float(np.asarray(y_all, dtype=float).reshape(-1)[row])
        c_x = np.asarray(c_all, dtype=float)[row].reshape(-1)[: self.nx]
        norm = float(c_x @ c_x)
        direction = np.zeros(self.nz)
        direction[self.nx + self.nf + self.gain_names.index(name)] = 1.0
        if norm > 0:
            direction[: self.nx] = -y_true * c_x / norm
        return p + sigma**2 * np.outer(direction, direction)

    def _inflate(self, p: FloatArray, c_row: FloatArray, target: float) -> FloatArray:
        """Add variance to the model states a measurement depends on (diagonal, in proportion
        to their present variance) until its predicted variance ``c P c'`` reaches ``target``.
        Factors and probe gains are slow by design and are not inflated."""
        involved = np.abs(c_row) > 0
        involved[self.nx :] = False
        d = np.where(involved, np.maximum(np.diag(p), 1e-12), 0.0)
        present = float(c_row @ p @ c_row)
        along = float(np.sum(c_row**2 * d))
        if target <= present or along <= 0:
            return p
        return p + np.diag(d * (target - present) / along)

    def _project(self, z: FloatArray) -> FloatArray:
        return np.clip(z, self._low, self._high)

    # -- helpers -----------------------------------------------------------------------
    def _require_initialized(self) -> None:
        if not self._history:
            raise ModelError("the estimator is not initialised: call initialize(x0_mean, P0).")

    def _input_vector(self, inputs: Mapping[str, float]) -> FloatArray:
        missing = [n for n in self.input_names if n not in inputs]
        unknown = [n for n in inputs if n not in self.input_names]
        if missing or unknown:
            raise ModelError(
                f"update: inputs have missing {missing} / unknown {unknown}; "
                f"expected {list(self.input_names)}."
            )
        u = np.array([float(inputs[n]) for n in self.input_names], dtype=float)
        if not np.all(np.isfinite(u)):
            raise ModelError(f"update: inputs must be finite, got {dict(inputs)}.")
        return u

    def _result(
        self,
        placed: Sequence[Measurement],
        reprocessed: float | None,
        rejected_early: Sequence[MeasurementDecision] = (),
        decisions: Mapping[int, tuple[bool, str, str]] | None = None,
    ) -> EstimatorResult:
        now = self._history[-1]
        decisions = decisions or {}
        accepted: list[MeasurementDecision] = []
        rejected: list[MeasurementDecision] = list(rejected_early)
        for m in placed:
            ok, reason, detail = decisions[id(m)]
            (accepted if ok else rejected).append(
                MeasurementDecision(m, ok, reason, detail, now.time_h)
            )
        for d in rejected:
            log_rejection(d)
        self.events.extend(accepted + rejected)
        if len(self.events) > 10_000:
            del self.events[: len(self.events) - 10_000]
        z, p = now.post_mean, now.post_cov
        sd = np.sqrt(np.maximum(np.diag(p), 0.0))
        y = np.asarray(self._output_fn(z)[0], dtype=float).reshape(-1)
        factors = {n: float(math.exp(z[self.nx + i])) for i, n in enumerate(self.factor_names)}
        gains = {
            n: float(math.exp(z[self.nx + self.nf + i])) for i, n in enumerate(self.gain_names)
        }
        if "mu_max" in self.factor_names:
            i = self.nx + self.factor_names.index("mu_max")
            growth, growth_sd = math.exp(z[i]), math.exp(z[i]) * float(sd[i])
        else:
            growth, growth_sd = 1.0, 0.0
        return EstimatorResult(
            time_h=now.time_h,
            state={n: float(z[i]) for i, n in enumerate(self.state_names)},
            std={n: float(sd[i]) for i, n in enumerate(self.state_names)},
            outputs={n: float(y[i]) for i, n in enumerate(self.output_names)},
            growth_factor=float(growth),
            growth_factor_std=float(growth_sd),
            factors=factors,
            online_gains=gains,
            covariance=p.copy(),
            accepted=tuple(accepted),
            rejected=tuple(rejected),
            reprocessed_from_h=reprocessed,
            gains_estimated={n: bool(now.checks_after[n].estimated) for n in self.gain_names},
            mismatch=self.mismatch.report(now.time_h, gains),
        )


_SNAPSHOT_FORMAT = "hmpc.estimator.snapshot/1"


def _num(value: float) -> float | str:
    """A float for JSON: non-finite values as the strings "nan", "inf", "-inf"."""
    value = float(value)
    return value if math.isfinite(value) else repr(value)


def _unnum(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str) and value not in ("nan", "inf", "-inf"):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _dump_step(step: _Step) -> dict[str, Any]:
    return {
        "time_h": step.time_h,
        "inputs": [float(v) for v in step.inputs],
        "measurements": [dataclasses.asdict(m) for m in step.measurements],
        "prior_mean": [float(v) for v in step.prior_mean],
        "prior_cov": [[float(v) for v in row] for row in step.prior_cov],
        "post_mean": [float(v) for v in step.post_mean],
        "post_cov": [[float(v) for v in row] for row in step.post_cov],
        "gate_counts_before": [[s, n, list(t)] for (s, n), t in step.gate_counts_before.items()],
        "gate_counts_after": [[s, n, list(t)] for (s, n), t in step.gate_counts_after.items()],
        "checks_before": {n: [_num(v) for v in c] for n, c in step.checks_before.items()},
        "checks_after": {n: [_num(v) for v in c] for n, c in step.checks_after.items()},
    }


def _load_step(d: Mapping[str, Any], nz: int, nu: int) -> _Step:
    def vector(key: str, n: int) -> FloatArray:
        v = np.array([_unnum(x) for x in d[key]], dtype=float)
        if v.shape != (n,) or not np.all(np.isfinite(v)):
            raise ValueError(f"{key} must be {n} finite numbers")
        return v

    def matrix(key: str) -> FloatArray:
        m = np.array([[_unnum(x) for x in row] for row in d[key]], dtype=float)
        if m.shape != (nz, nz) or not np.all(np.isfinite(m)):
            raise ValueError(f"{key} must be a finite ({nz}, {nz}) matrix")
        return m

    def counts(key: str) -> _GateCounts:
        return {(str(s), str(n)): tuple(_unnum(t) for t in times) for s, n, times in d[key]}

    def checks(key: str) -> _Checks:
        out: _Checks = {}
        for n, c in d[key].items():
            high, low, estimated, high_since, low_since = (_unnum(v) for v in c)
            out[str(n)] = _Check(high, low, bool(estimated), high_since, low_since)
        return out

    measurements = [Measurement(**m) for m in d["measurements"]]
    return _Step(
        time_h=_unnum(d["time_h"]),
        inputs=vector("inputs", nu),
        measurements=measurements,
        prior_mean=vector("prior_mean", nz),
        prior_cov=matrix("prior_cov"),
        post_mean=vector("post_mean", nz),
        post_cov=matrix("post_cov"),
        gate_counts_before=counts("gate_counts_before"),
        gate_counts_after=counts("gate_counts_after"),
        decisions={},
        checks_before=checks("checks_before"),
        checks_after=checks("checks_after"),
    )

"""Tuning of the nonlinear MPC: a frozen :class:`MPCConfig` loaded from TOML and validated.

A tuning file (``configs/mpc_*.toml``) looks like::

    [mpc]
    step_h = 2.0              # prediction step, h
    horizon = 96              # prediction steps (fixed NLP size)
    sample_period_h = 1.0     # control period (the first move is applied this long)
    objective = "dose-by-date"   # or "tracking" or "economic"
    kappa = 2.0               # constraint tightening, multiples of the predicted std
    on_failure = "shift"      # hold | shift | recipe | raise

    [back_off]                # plan this far inside a hard limit (state units; soft,
    glucose = { low = 1.0 }   # heavily weighted, so the problem stays feasible)

    [solver]
    name = "ipopt"
    max_iter = 200
    max_cpu_time_s = 20.0

    [dose]                    # dose-by-date only
    margin = 0.15
    ...

Every table and key is checked (unknown keys are rejected with close-match suggestions),
every number against its range; errors are :class:`~plant_models.errors.ConfigError`
naming the file and key. Defaults, ranges and choices are declared once, on the dataclass
fields (:func:`plant_models.config.setting`), and read by the generic loader
(:func:`plant_models.config.load_fields`); only the checks across fields are written here.

Limits that the process specification already states (hard and soft state limits, input
bounds, rate limits) may be left out and filled in from the process with
:func:`with_process_limits`; values in the tuning file win.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from plant_models.config import load_dataclass, load_fields, load_toml, setting
from plant_models.errors import ConfigError

__all__ = [
    "FAILURE_POLICIES",
    "OBJECTIVES",
    "SOLVERS",
    "DoseObjective",
    "MPCConfig",
    "SoftBound",
    "SolverSettings",
    "StateBound",
    "TrackingTerm",
    "load_mpc_config",
    "with_process_limits",
]

OBJECTIVES = ("dose-by-date", "tracking", "economic")
FAILURE_POLICIES = ("hold", "shift", "recipe", "raise")
SOLVERS = ("ipopt", "sqpmethod")
HESSIANS = ("exact", "limited-memory")
INTEGRATORS = ("rk4",)
RESIDUAL_MODES = ("exact", "linearized")
LINEAR_SOLVERS = ("mumps", "ma27", "ma57")
QP_SOLVERS = ("qrqp", "qpoases", "osqp")
FALLBACK_SOLVERS = ("ipopt", "none")
JIT_OPTIMISATION = ("-O0", "-O1", "-O2", "-O3")


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


# Ranges shared by several fields (keyword arguments of `setting`).
_WEIGHT: dict[str, Any] = {"low": 0.0, "high": 1e8, "unit": "1", "description": "weight"}
_SLACK: dict[str, Any] = {**_WEIGHT, "description": "slack weight"}
_LIMIT: dict[str, Any] = {
    "low": -1e9,
    "high": 1e9,
    "unit": "state unit",
    "description": "state limit",
}
_WEIGHTS: dict[str, Any] = {
    "default_factory": _empty,
    "low": 0.0,
    "high": 1e6,
    "unit": "1",
    "description": "weight",
}
_SIGNED_WEIGHTS: dict[str, Any] = {**_WEIGHTS, "low": -1e6}
_BACK_OFF: dict[str, Any] = {
    "low": 0.0,
    "high": 1e9,
    "unit": "state unit",
    "description": "back-off from the hard limit",
}
_INPUT_BOUND: dict[str, Any] = {
    "low": -1e9,
    "high": 1e9,
    "unit": "input unit",
    "description": "input bound",
}
_SCALES: dict[str, Any] = {
    "default_factory": _empty,
    "low": 0.0,
    "low_open": True,
    "high": 1e12,
    "unit": "unit",
    "description": "scale",
}


@dataclasses.dataclass(frozen=True)
class SolverSettings:
    """Optimiser choice and limits.

    Attributes:
        name: ``ipopt`` (interior point, default) or ``sqpmethod`` (CasADi SQP with a QP
            solver; the structure-exploiting path: the hard state limits are bounds of the
            state variables, the initial state is fixed by bounds, primal and dual warm
            start from the shifted plan; a failed SQP solve falls back to ``fallback``).
        max_iter: iteration limit per solve.
        max_cpu_time_s: CPU-time limit per solve, s (must be below the sample period).
        tolerance: convergence tolerance (IPOPT ``tol``).
        acceptable_tolerance: IPOPT ``acceptable_tol``.
        hessian: ``exact`` or ``limited-memory`` (quasi-Newton).
        warm_start: start each solve from the shifted previous solution (primal and dual).
        warm_start_mu: IPOPT barrier parameter to restart from on warm starts (small: few
            iterations when the active set barely changes; a failed warm solve is retried
            cold).
        linear_solver: IPOPT linear solver.
        expand: expand the NLP to scalar (SX) expressions when the model allows it.
        jit: compile the NLP's functions to C (needs a C compiler; takes seconds to
            minutes once, then every evaluation is several times faster). The library is
            cached on disk by a hash of the problem (:mod:`controller.numerics.compiled`),
            so a restart does not compile again.
        jit_optimisation: the compiler's optimisation flag.
        cache_dir: directory of the compiled libraries ("" : ``$HMPC_CACHE_DIR`` or
            ``~/.cache/hmpc``, sub-directory ``nlp``).
        qpsol: QP solver of ``sqpmethod`` (``qrqp``: CasADi's sparse active-set solver).
        sqp_max_iter: iteration limit of one SQP solve (``sqpmethod``; a failed SQP solve
            should leave time for the fallback).
        fallback: ``sqpmethod`` only: ``ipopt`` re-solves a failed SQP step with IPOPT from
            the same initial guess (within ``max_cpu_time_s``); ``none`` goes straight to
            the failure policy.
    """

    name: str = setting("ipopt", choices=SOLVERS)
    max_iter: int = setting(200, low=1, high=100000)
    max_cpu_time_s: float = setting(
        30.0, low=0.0, low_open=True, high=1e6, unit="s", description="CPU limit"
    )
    tolerance: float = setting(
        1e-6, low=0.0, low_open=True, high=1.0, unit="1", description="tolerance"
    )
    acceptable_tolerance: float = setting(
        1e-4, low=0.0, low_open=True, high=1.0, unit="1", description="acceptable tolerance"
    )
    hessian: str = setting("exact", choices=HESSIANS)
    warm_start: bool = setting(True)
    warm_start_mu: float = setting(
        1e-6, low=0.0, low_open=True, high=1.0, unit="1", description="barrier restart"
    )
    linear_solver: str = setting("mumps", choices=LINEAR_SOLVERS)
    expand: bool = setting(True)
    jit: bool = setting(False)
    jit_optimisation: str = setting("-O2", choices=JIT_OPTIMISATION)
    cache_dir: str = setting("")
    qpsol: str = setting("qrqp", choices=QP_SOLVERS)
    sqp_max_iter: int = setting(100, low=1, high=100000)
    fallback: str = setting("ipopt", choices=FALLBACK_SOLVERS)


@dataclasses.dataclass(frozen=True)
class DoseObjective:
    """The dose-by-date economic objective (T cells; any model with a cell count).

    Attributes:
        dose_cells: patient dose, 1e9 total viable cells (None: from the process).
        harvest_time: scheduled harvest, culture age in h (None: from the process).
        margin: aim for ``dose_cells * (1 + margin)`` (reserve for model mismatch).
        weight: quadratic penalty on the relative dose shortfall at harvest.
        weight_linear: linear (exact) penalty on the relative dose shortfall.
        viability_weight: penalty on ``1 - viability`` at the end of the horizon.
        overshoot_weight: quadratic penalty on the relative excess of the cells at the
            harvest above ``target * (1 + overshoot_band)`` (on-target, reproducible
            doses: fast growers are held back instead of tripling the dose). Applied only
            once the harvest lies within the horizon. 0 turns it off.
        overshoot_band: relative band above the target that costs nothing.
        reference_growth_rate: 1/h; while the harvest lies beyond the horizon, the end of
            the horizon must hold ``target * exp(-rate * time still to harvest)``.
        reference_growth_parameter: a model parameter (one of the MPC's
            ``model_parameters``, e.g. ``mu_max``) whose value this step, relative to its
            nominal value, scales ``reference_growth_rate``: a slow grower must be nearer
            the target at the end of the horizon, a fast one less near. Empty: the rate as
            given (also for an MPC without that model parameter, such as the oracle).
        cells_state, volume_state: state names whose product is the total viable cells.
    """

    dose_cells: float | None = setting(
        None, low=0.0, low_open=True, high=1e6, unit="1e9 cells", description="dose"
    )
    harvest_time: float | None = setting(
        None, low=0.0, low_open=True, high=1e4, unit="h", description="harvest"
    )
    margin: float = setting(0.15, low=0.0, high=5.0, unit="1", description="dose margin")
    weight: float = setting(100.0, **_WEIGHT)
    weight_linear: float = setting(20.0, **_WEIGHT)
    viability_weight: float = setting(1.0, **_WEIGHT)
    overshoot_weight: float = setting(0.0, **_WEIGHT)
    overshoot_band: float = setting(
        0.5, low=0.0, high=100.0, unit="1", description="overshoot band"
    )
    reference_growth_rate: float = setting(
        0.02, low=0.0, high=1.0, unit="1/h", description="growth rate"
    )
    reference_growth_parameter: str = setting("")
    cells_state: str = setting("viable_cells")
    volume_state: str = setting("volume")


@dataclasses.dataclass(frozen=True)
class TrackingTerm:
    """A reference to track: ``weight * ((x - reference) / scale)^2`` per stage."""

    reference: float = setting(low=-1e9, high=1e9, unit="unit", description="reference")
    weight: float = setting(1.0, **_WEIGHT)


@dataclasses.dataclass(frozen=True)
class StateBound:
    """Hard limits of one state (None: no limit on that side)."""

    low: float | None = setting(None, **_LIMIT)
    high: float | None = setting(None, **_LIMIT)


@dataclasses.dataclass(frozen=True)
class SoftBound:
    """Soft limits of one state with slack penalties.

    Cost per stage: ``weight * s^2 + weight_linear * s`` with ``s`` the violation divided by
    the state's scale.
    """

    low: float | None = setting(None, **_LIMIT)
    high: float | None = setting(None, **_LIMIT)
    weight: float = setting(100.0, **_SLACK)
    weight_linear: float = setting(10.0, **_SLACK)


@dataclasses.dataclass(frozen=True)
class MPCConfig:
    """Tuning of :class:`controller.numerics.mpc.NonlinearMPC` (frozen; see the module docstring).

    Weights act on scaled quantities (a state divided by its scale, an input by its
    scale) unless stated otherwise; ``input_usage`` is in cost per input unit and hour.
    ``back_off`` holds distances (state units, >= 0) that the plan keeps inside the hard
    limits of ``hard_bounds``, on top of the ``kappa`` tightening: a reserve for model
    error, kept as a heavily weighted soft constraint (the hard limit itself stays hard).
    """

    step_h: float = setting(
        1.0, low=0.0, low_open=True, high=48.0, unit="h", description="prediction step"
    )
    horizon: int = setting(48, low=1, high=2000)
    sample_period_h: float = setting(
        1.0, low=0.0, low_open=True, high=48.0, unit="h", description="control period"
    )
    objective: str = setting("tracking", choices=OBJECTIVES)
    integrator: str = setting("rk4", choices=INTEGRATORS)
    integrator_substeps: int = setting(1, low=1, high=100)
    kappa: float = setting(0.0, low=0.0, high=10.0, unit="1", description="tightening in std")
    on_failure: str = setting("hold", choices=FAILURE_POLICIES)
    residual: str = setting("exact", choices=RESIDUAL_MODES)
    solver: SolverSettings = dataclasses.field(default_factory=SolverSettings)
    dose: DoseObjective = dataclasses.field(default_factory=DoseObjective)
    tracking: Mapping[str, TrackingTerm] = dataclasses.field(default_factory=_empty)
    # [weights]: input_usage and the state weights may be negative (rewards)
    input_move_weights: Mapping[str, float] = setting(key="input_move", **_WEIGHTS)
    input_usage_weights: Mapping[str, float] = setting(key="input_usage", **_SIGNED_WEIGHTS)
    input_quadratic_weights: Mapping[str, float] = setting(key="input_quadratic", **_WEIGHTS)
    stage_state_weights: Mapping[str, float] = setting(key="stage_state", **_SIGNED_WEIGHTS)
    terminal_state_weights: Mapping[str, float] = setting(key="terminal_state", **_SIGNED_WEIGHTS)
    hard_bounds: Mapping[str, StateBound] = setting(default_factory=_empty, key="bounds")
    back_off: Mapping[str, StateBound] = dataclasses.field(default_factory=_empty)
    soft_bounds: Mapping[str, SoftBound] = dataclasses.field(default_factory=_empty)
    input_bounds: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=_empty)
    rate_limits: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    # [scaling]
    state_scaling: Mapping[str, float] = setting(key="states", **_SCALES)
    input_scaling: Mapping[str, float] = setting(key="inputs", **_SCALES)
    limits_from_process: bool = setting(True)
    source: str = "<defaults>"

    def __post_init__(self) -> None:
        where = self.source
        if not (self.step_h > 0 and math.isfinite(self.step_h)):
            raise ConfigError(f"{where} [mpc] step_h = {self.step_h!r} must be positive.")
        if self.horizon < 1:
            raise ConfigError(f"{where} [mpc] horizon = {self.horizon!r} must be at least 1.")
        if self.objective not in OBJECTIVES:
            raise ConfigError(
                f"{where} [mpc] objective = {self.objective!r}; allowed: {', '.join(OBJECTIVES)}."
            )
        if self.residual not in RESIDUAL_MODES:
            raise ConfigError(
                f"{where} [mpc] residual = {self.residual!r}; allowed: {', '.join(RESIDUAL_MODES)}."
            )
        if self.on_failure not in FAILURE_POLICIES:
            raise ConfigError(
                f"{where} [mpc] on_failure = {self.on_failure!r}; allowed: "
                f"{', '.join(FAILURE_POLICIES)}."
            )
        for key, value, allowed in (
            ("name", self.solver.name, SOLVERS),
            ("qpsol", self.solver.qpsol, QP_SOLVERS),
            ("fallback", self.solver.fallback, FALLBACK_SOLVERS),
            ("jit_optimisation", self.solver.jit_optimisation, JIT_OPTIMISATION),
        ):
            if value not in allowed:
                raise ConfigError(
                    f"{where} [solver] {key} = {value!r}; allowed: {', '.join(allowed)}."
                )
        if self.solver.max_cpu_time_s >= self.sample_period_h * 3600.0:
            raise ConfigError(
                f"{where} [solver] max_cpu_time_s = {self.solver.max_cpu_time_s:g} s must be "
                f"below the sample period ({self.sample_period_h:g} h = "
                f"{self.sample_period_h * 3600.0:g} s); lower it or lengthen sample_period_h."
            )
        if self.objective == "tracking" and not self.tracking:
            raise ConfigError(
                f"{where}: objective 'tracking' needs a [tracking] table with at least one "
                "state, e.g. glucose = { reference = 8.0, weight = 1.0 }."
            )
        for name, b in list(self.hard_bounds.items()) + list(self.soft_bounds.items()):
            if b.low is not None and b.high is not None and b.low > b.high:
                raise ConfigError(f"{where}: bounds of {name!r} have low {b.low} > high {b.high}.")
        for name, b in self.back_off.items():
            for side, v in (("low", b.low), ("high", b.high)):
                if v is not None and not (v >= 0 and math.isfinite(v)):
                    raise ConfigError(
                        f"{where} [back_off] {name}: {side} = {v!r} must be a distance >= 0 "
                        "(state units inside the hard limit)."
                    )
        for name, (low, high) in self.input_bounds.items():
            if low > high:
                raise ConfigError(
                    f"{where} [inputs] {name}: low {low} is above high {high}; swap them."
                )


# -- loading ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _BackOffEntry:
    """A ``[back_off]`` entry: distances inside the hard limits (read into a StateBound)."""

    low: float | None = setting(None, **_BACK_OFF)
    high: float | None = setting(None, **_BACK_OFF)


@dataclasses.dataclass(frozen=True)
class _InputEntry:
    """An ``[inputs]`` entry: bounds (both or neither) and a rate limit of one input."""

    low: float | None = setting(None, **_INPUT_BOUND)
    high: float | None = setting(None, **_INPUT_BOUND)
    rate_limit: float | None = setting(
        None, low=0.0, low_open=True, high=1e9, unit="input unit per h", description="rate limit"
    )


@dataclasses.dataclass(frozen=True)
class _FileTables:
    """The tables of a tuning file that are reshaped into :class:`MPCConfig` fields."""

    back_off: Mapping[str, _BackOffEntry] = dataclasses.field(default_factory=_empty)
    inputs: Mapping[str, _InputEntry] = dataclasses.field(default_factory=_empty)


# Which MPCConfig fields each table of the file holds.
_SECTIONS = ("solver", "dose", "tracking", "hard_bounds", "soft_bounds")  # one table each
_MPC = (
    "step_h",
    "horizon",
    "sample_period_h",
    "objective",
    "integrator",
    "integrator_substeps",
    "kappa",
    "on_failure",
    "residual",
    "limits_from_process",
)
_WEIGHT_TABLES = (
    "input_move_weights",
    "input_usage_weights",
    "input_quadratic_weights",
    "stage_state_weights",
    "terminal_state_weights",
)
_SCALING = ("state_scaling", "input_scaling")


def load_mpc_config(path: str | Path) -> MPCConfig:
    """Load and validate an MPC tuning file.

    Raises:
        ConfigError: unknown table or key (with a suggestion), wrong type, value out of
        range, inconsistent settings; the message names the file and key.
    """
    p = Path(path)
    data = load_toml(p)
    return config_from_dict(data, str(p))


def config_from_dict(data: Mapping[str, Any], source: str) -> MPCConfig:
    """Build an :class:`MPCConfig` from a parsed TOML document (see :func:`load_mpc_config`)."""
    reshaped = tuple(f.name for f in dataclasses.fields(_FileTables))
    values = load_fields(
        MPCConfig,
        data,
        source,
        names=_SECTIONS,
        extra=("mpc", "weights", "scaling", *reshaped),
        required=("mpc",),
        root=True,
    )
    values |= load_fields(
        MPCConfig,
        data["mpc"],
        f"{source} [mpc]",
        names=_MPC,
        required=("step_h", "horizon", "objective"),
    )
    values.setdefault("sample_period_h", values["step_h"])  # the file's default: one step
    values |= load_fields(
        MPCConfig, data.get("weights", {}), f"{source} [weights]", names=_WEIGHT_TABLES
    )
    values |= load_fields(MPCConfig, data.get("scaling", {}), f"{source} [scaling]", names=_SCALING)
    if "dose" in values:
        dose = values["dose"]
        values["dose"] = dataclasses.replace(
            dose, reference_growth_parameter=dose.reference_growth_parameter.strip()
        )

    tables = load_dataclass(
        _FileTables, {k: data[k] for k in reshaped if k in data}, source, root=True
    )
    back_off = {name: StateBound(e.low, e.high) for name, e in tables.back_off.items()}
    input_bounds: dict[str, tuple[float, float]] = {}
    rate_limits: dict[str, float] = {}
    for name, entry in tables.inputs.items():
        if entry.low is not None and entry.high is not None:
            input_bounds[name] = (entry.low, entry.high)
        elif entry.low is not None or entry.high is not None:
            raise ConfigError(f"{source} [inputs] {name}: give both low and high (or neither).")
        if entry.rate_limit is not None:
            rate_limits[name] = entry.rate_limit
    return MPCConfig(
        **values,
        back_off=_frozen(back_off),
        input_bounds=_frozen(input_bounds),
        rate_limits=_frozen(rate_limits),
        source=source,
    )


# -- limits from the process specification ----------------------------------------------


def with_process_limits(
    config: MPCConfig,
    process: Any,
    input_bounds: Mapping[str, tuple[float, float]],
) -> MPCConfig:
    """Fill limits the tuning file leaves out from a process specification.

    Reads process attributes named ``{state}_{low|high}_{soft|hard}`` (e.g.
    ``lactate_high_soft``), ``volume_max`` (hard upper volume), ``{input}_limit`` (rate
    limit, per h, e.g. ``perfusion_rate_limit``), ``dose_cells`` and ``harvest_time``.
    ``input_bounds`` are the process's input bounds (``model.operating_bounds()``).
    Values in the tuning file always win. Returns ``config`` unchanged when
    ``limits_from_process`` is false.
    """
    if not config.limits_from_process:
        return config
    fields = (
        {f.name: getattr(process, f.name) for f in dataclasses.fields(process)}
        if dataclasses.is_dataclass(process)
        else {}
    )
    hard: dict[str, dict[str, float | None]] = {}
    soft: dict[str, dict[str, float | None]] = {}
    for key, value in fields.items():
        parts = key.rsplit("_", 2)
        if len(parts) == 3 and parts[1] in ("low", "high") and parts[2] in ("soft", "hard"):
            target = hard if parts[2] == "hard" else soft
            target.setdefault(parts[0], {"low": None, "high": None})[parts[1]] = float(value)
    if "volume_max" in fields:
        hard.setdefault("volume", {"low": None, "high": None})["high"] = float(fields["volume_max"])
    new_hard = {n: StateBound(v["low"], v["high"]) for n, v in hard.items()}
    new_hard.update(config.hard_bounds)
    new_soft = {n: SoftBound(v["low"], v["high"]) for n, v in soft.items()}
    new_soft.update(config.soft_bounds)
    new_inputs = dict(input_bounds)
    new_inputs.update(config.input_bounds)
    new_rates = {
        name: float(fields[f"{name}_limit"]) for name in input_bounds if f"{name}_limit" in fields
    }
    new_rates.update(config.rate_limits)
    dose = config.dose
    if dose.dose_cells is None and "dose_cells" in fields:
        dose = dataclasses.replace(dose, dose_cells=float(fields["dose_cells"]))
    if dose.harvest_time is None and "harvest_time" in fields:
        dose = dataclasses.replace(dose, harvest_time=float(fields["harvest_time"]))
    return dataclasses.replace(
        config,
        hard_bounds=_frozen(new_hard),
        soft_bounds=_frozen(new_soft),
        input_bounds=_frozen(new_inputs),
        rate_limits=_frozen(new_rates),
        dose=dose,
    )

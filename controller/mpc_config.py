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
naming the file and key. Limits that the process specification already states (hard and
soft state limits, input bounds, rate limits) may be left out and filled in from the
process with :func:`with_process_limits`; values in the tuning file win.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from pathlib import Path
from types import MappingProxyType
from typing import Any

from plant_models.config import check_keys, check_range, load_toml
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


def _empty() -> Mapping[str, Any]:
    return MappingProxyType({})


def _frozen(d: Mapping[str, Any]) -> Mapping[str, Any]:
    return MappingProxyType(dict(d))


@dataclasses.dataclass(frozen=True)
class SolverSettings:
    """Optimiser choice and limits.

    Attributes:
        name: ``ipopt`` (interior point, default) or ``sqpmethod`` (CasADi SQP with qrqp).
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
        jit: compile the NLP's functions to C at build time (needs a C compiler; takes
            seconds to minutes once, then every evaluation is several times faster).
    """

    name: str = "ipopt"
    max_iter: int = 200
    max_cpu_time_s: float = 30.0
    tolerance: float = 1e-6
    acceptable_tolerance: float = 1e-4
    hessian: str = "exact"
    warm_start: bool = True
    warm_start_mu: float = 1e-6
    linear_solver: str = "mumps"
    expand: bool = True
    jit: bool = False


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

    dose_cells: float | None = None
    harvest_time: float | None = None
    margin: float = 0.15
    weight: float = 100.0
    weight_linear: float = 20.0
    viability_weight: float = 1.0
    overshoot_weight: float = 0.0
    overshoot_band: float = 0.5
    reference_growth_rate: float = 0.02
    reference_growth_parameter: str = ""
    cells_state: str = "viable_cells"
    volume_state: str = "volume"


@dataclasses.dataclass(frozen=True)
class TrackingTerm:
    """A reference to track: ``weight * ((x - reference) / scale)^2`` per stage."""

    reference: float
    weight: float


@dataclasses.dataclass(frozen=True)
class StateBound:
    """Hard limits of one state (None: no limit on that side)."""

    low: float | None = None
    high: float | None = None


@dataclasses.dataclass(frozen=True)
class SoftBound:
    """Soft limits of one state with slack penalties.

    Cost per stage: ``weight * s^2 + weight_linear * s`` with ``s`` the violation divided by
    the state's scale.
    """

    low: float | None = None
    high: float | None = None
    weight: float = 100.0
    weight_linear: float = 10.0


@dataclasses.dataclass(frozen=True)
class MPCConfig:
    """Tuning of :class:`controller.mpc.NonlinearMPC` (frozen; see the module docstring).

    Weights act on scaled quantities (a state divided by its scale, an input by its
    scale) unless stated otherwise; ``input_usage`` is in cost per input unit and hour.
    ``back_off`` holds distances (state units, >= 0) that the plan keeps inside the hard
    limits of ``hard_bounds``, on top of the ``kappa`` tightening: a reserve for model
    error, kept as a heavily weighted soft constraint (the hard limit itself stays hard).
    """

    step_h: float = 1.0
    horizon: int = 48
    sample_period_h: float = 1.0
    objective: str = "tracking"
    integrator: str = "rk4"
    integrator_substeps: int = 1
    kappa: float = 0.0
    on_failure: str = "hold"
    residual: str = "exact"
    solver: SolverSettings = dataclasses.field(default_factory=SolverSettings)
    dose: DoseObjective = dataclasses.field(default_factory=DoseObjective)
    tracking: Mapping[str, TrackingTerm] = dataclasses.field(default_factory=_empty)
    input_move_weights: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    input_usage_weights: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    input_quadratic_weights: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    stage_state_weights: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    terminal_state_weights: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    hard_bounds: Mapping[str, StateBound] = dataclasses.field(default_factory=_empty)
    back_off: Mapping[str, StateBound] = dataclasses.field(default_factory=_empty)
    soft_bounds: Mapping[str, SoftBound] = dataclasses.field(default_factory=_empty)
    input_bounds: Mapping[str, tuple[float, float]] = dataclasses.field(default_factory=_empty)
    rate_limits: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    state_scaling: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    input_scaling: Mapping[str, float] = dataclasses.field(default_factory=_empty)
    limits_from_process: bool = True
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


def _meta(unit: str, low: float, high: float, description: str, *, low_open: bool = False) -> Any:
    return {
        "unit": unit,
        "low": low,
        "high": high,
        "description": description,
        "low_open": low_open,
    }


def _number(
    table: Mapping[str, Any],
    key: str,
    where: str,
    default: float,
    meta: Mapping[str, Any],
) -> float:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{where} {key}: must be a number, got {value!r}.")
    check_range(float(value), meta, f"{where} {key}")
    return float(value)


def _integer(
    table: Mapping[str, Any], key: str, where: str, default: int, low: int, high: int
) -> int:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{where} {key}: must be an integer, got {value!r}.")
    if not low <= value <= high:
        raise ConfigError(f"{where} {key} = {value} is outside its range [{low}, {high}].")
    return int(value)


def _choice(
    table: Mapping[str, Any], key: str, where: str, default: str, allowed: tuple[str, ...]
) -> str:
    if key not in table:
        return default
    value = table[key]
    if value not in allowed:
        from plant_models.config import suggest

        raise ConfigError(
            f"{where} {key} = {value!r} is not allowed.{suggest(str(value), allowed)} "
            f"Allowed: {', '.join(allowed)}."
        )
    return str(value)


def _boolean(table: Mapping[str, Any], key: str, where: str, default: bool) -> bool:
    if key not in table:
        return default
    value = table[key]
    if not isinstance(value, bool):
        raise ConfigError(f"{where} {key}: must be true or false, got {value!r}.")
    return value


def _text(table: Mapping[str, Any], key: str, where: str) -> str:
    value = table.get(key, "")
    if not isinstance(value, str):
        raise ConfigError(f"{where} {key}: must be a string (a name), got {value!r}.")
    return value.strip()


def _table(data: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise ConfigError(f"{where} [{key}]: must be a table.")
    return value


def _weights(table: Mapping[str, Any], where: str, *, signed: bool) -> dict[str, float]:
    """name = weight entries; ``signed`` allows negative weights (rewards)."""
    meta = _meta("1", -1e6 if signed else 0.0, 1e6, "weight")
    return {key: _number(table, key, where, 0.0, meta) for key in table}


_LIMIT = _meta("state unit", -1e9, 1e9, "state limit")
_BACK_OFF = _meta("state unit", 0.0, 1e9, "back-off from the hard limit")


def _bound_side(entry: Mapping[str, Any], key: str, where: str, meta: Any = _LIMIT) -> float | None:
    if key not in entry:
        return None
    return _number(entry, key, where, 0.0, meta)


def _state_bounds(
    data: Mapping[str, Any], table: str, source: str, meta: Any, hint: str = ""
) -> dict[str, StateBound]:
    """A table of ``state = { low = ..., high = ... }`` entries (either side optional)."""
    out: dict[str, StateBound] = {}
    for name, entry in _table(data, table, source).items():
        w = f"{source} [{table}] {name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{w}: expected {{ low = ..., high = ... }}{hint}.")
        check_keys(entry, ["low", "high"], w)
        out[name] = StateBound(
            _bound_side(entry, "low", w, meta), _bound_side(entry, "high", w, meta)
        )
    return out


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
    tables = [
        "mpc",
        "solver",
        "dose",
        "tracking",
        "weights",
        "bounds",
        "soft_bounds",
        "back_off",
        "inputs",
        "scaling",
    ]
    check_keys(data, tables, source, required=["mpc"])
    mpc = _table(data, "mpc", source)
    w = f"{source} [mpc]"
    check_keys(
        mpc,
        [
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
        ],
        w,
        required=["step_h", "horizon", "objective"],
    )
    step_h = _number(mpc, "step_h", w, 1.0, _meta("h", 0.0, 48.0, "prediction step", low_open=True))
    horizon = _integer(mpc, "horizon", w, 48, 1, 2000)
    sample = _number(
        mpc, "sample_period_h", w, step_h, _meta("h", 0.0, 48.0, "control period", low_open=True)
    )
    objective = _choice(mpc, "objective", w, "tracking", OBJECTIVES)
    integrator = _choice(mpc, "integrator", w, "rk4", INTEGRATORS)
    substeps = _integer(mpc, "integrator_substeps", w, 1, 1, 100)
    kappa = _number(mpc, "kappa", w, 0.0, _meta("1", 0.0, 10.0, "tightening in std"))
    on_failure = _choice(mpc, "on_failure", w, "hold", FAILURE_POLICIES)
    from_process = _boolean(mpc, "limits_from_process", w, True)
    residual = _choice(mpc, "residual", w, "exact", RESIDUAL_MODES)

    sol = _table(data, "solver", source)
    w = f"{source} [solver]"
    check_keys(
        sol,
        [f.name for f in dataclasses.fields(SolverSettings)],
        w,
    )
    solver = SolverSettings(
        name=_choice(sol, "name", w, "ipopt", SOLVERS),
        max_iter=_integer(sol, "max_iter", w, 200, 1, 100000),
        max_cpu_time_s=_number(
            sol, "max_cpu_time_s", w, 30.0, _meta("s", 0.0, 1e6, "CPU limit", low_open=True)
        ),
        tolerance=_number(
            sol, "tolerance", w, 1e-6, _meta("1", 0.0, 1.0, "tolerance", low_open=True)
        ),
        acceptable_tolerance=_number(
            sol,
            "acceptable_tolerance",
            w,
            1e-4,
            _meta("1", 0.0, 1.0, "acceptable tolerance", low_open=True),
        ),
        hessian=_choice(sol, "hessian", w, "exact", HESSIANS),
        warm_start=_boolean(sol, "warm_start", w, True),
        warm_start_mu=_number(
            sol, "warm_start_mu", w, 1e-6, _meta("1", 0.0, 1.0, "barrier restart", low_open=True)
        ),
        linear_solver=_choice(sol, "linear_solver", w, "mumps", ("mumps", "ma27", "ma57")),
        expand=_boolean(sol, "expand", w, True),
        jit=_boolean(sol, "jit", w, False),
    )

    dose_t = _table(data, "dose", source)
    w = f"{source} [dose]"
    check_keys(dose_t, [f.name for f in dataclasses.fields(DoseObjective)], w)
    dose = DoseObjective(
        dose_cells=(
            _number(
                dose_t, "dose_cells", w, 0.0, _meta("1e9 cells", 0.0, 1e6, "dose", low_open=True)
            )
            if "dose_cells" in dose_t
            else None
        ),
        harvest_time=(
            _number(dose_t, "harvest_time", w, 0.0, _meta("h", 0.0, 1e4, "harvest", low_open=True))
            if "harvest_time" in dose_t
            else None
        ),
        margin=_number(dose_t, "margin", w, 0.15, _meta("1", 0.0, 5.0, "dose margin")),
        weight=_number(dose_t, "weight", w, 100.0, _meta("1", 0.0, 1e8, "weight")),
        weight_linear=_number(dose_t, "weight_linear", w, 20.0, _meta("1", 0.0, 1e8, "weight")),
        viability_weight=_number(
            dose_t, "viability_weight", w, 1.0, _meta("1", 0.0, 1e8, "weight")
        ),
        overshoot_weight=_number(
            dose_t, "overshoot_weight", w, 0.0, _meta("1", 0.0, 1e8, "weight")
        ),
        overshoot_band=_number(
            dose_t, "overshoot_band", w, 0.5, _meta("1", 0.0, 100.0, "overshoot band")
        ),
        reference_growth_rate=_number(
            dose_t, "reference_growth_rate", w, 0.02, _meta("1/h", 0.0, 1.0, "growth rate")
        ),
        reference_growth_parameter=_text(dose_t, "reference_growth_parameter", w),
        cells_state=str(dose_t.get("cells_state", "viable_cells")),
        volume_state=str(dose_t.get("volume_state", "volume")),
    )

    tracking: dict[str, TrackingTerm] = {}
    trk = _table(data, "tracking", source)
    for name, entry in trk.items():
        w = f"{source} [tracking] {name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{w}: expected {{ reference = ..., weight = ... }}.")
        check_keys(entry, ["reference", "weight"], w, required=["reference"])
        tracking[name] = TrackingTerm(
            reference=_number(entry, "reference", w, 0.0, _meta("unit", -1e9, 1e9, "reference")),
            weight=_number(entry, "weight", w, 1.0, _meta("1", 0.0, 1e8, "weight")),
        )

    wt = _table(data, "weights", source)
    w = f"{source} [weights]"
    weight_tables = [
        "input_move",
        "input_usage",
        "input_quadratic",
        "stage_state",
        "terminal_state",
    ]
    check_keys(wt, weight_tables, w)
    parsed: dict[str, dict[str, float]] = {}
    for key in weight_tables:
        sub = wt.get(key, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"{w} {key}: must be a table of name = weight.")
        parsed[key] = _weights(
            sub, f"{w} {key}", signed=key in ("input_usage", "stage_state", "terminal_state")
        )

    hard = _state_bounds(data, "bounds", source, _LIMIT)
    back_off = _state_bounds(data, "back_off", source, _BACK_OFF, " (distances, >= 0)")

    soft: dict[str, SoftBound] = {}
    for name, entry in _table(data, "soft_bounds", source).items():
        w = f"{source} [soft_bounds] {name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{w}: expected {{ low = ..., high = ..., weight = ... }}.")
        check_keys(entry, ["low", "high", "weight", "weight_linear"], w)
        soft[name] = SoftBound(
            _bound_side(entry, "low", w),
            _bound_side(entry, "high", w),
            _number(entry, "weight", w, 100.0, _meta("1", 0.0, 1e8, "slack weight")),
            _number(entry, "weight_linear", w, 10.0, _meta("1", 0.0, 1e8, "slack weight")),
        )

    in_bounds: dict[str, tuple[float, float]] = {}
    rates: dict[str, float] = {}
    for name, entry in _table(data, "inputs", source).items():
        w = f"{source} [inputs] {name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{w}: expected {{ low = ..., high = ..., rate_limit = ... }}.")
        check_keys(entry, ["low", "high", "rate_limit"], w)
        if "low" in entry or "high" in entry:
            if not ("low" in entry and "high" in entry):
                raise ConfigError(f"{w}: give both low and high (or neither).")
            m = _meta("input unit", -1e9, 1e9, "input bound")
            in_bounds[name] = (_number(entry, "low", w, 0.0, m), _number(entry, "high", w, 0.0, m))
        if "rate_limit" in entry:
            rates[name] = _number(
                entry,
                "rate_limit",
                w,
                0.0,
                _meta("input unit per h", 0.0, 1e9, "rate limit", low_open=True),
            )

    sc = _table(data, "scaling", source)
    w = f"{source} [scaling]"
    check_keys(sc, ["states", "inputs"], w)
    scaling: dict[str, dict[str, float]] = {}
    for key in ("states", "inputs"):
        sub = sc.get(key, {})
        if not isinstance(sub, dict):
            raise ConfigError(f"{w} {key}: must be a table of name = scale.")
        scaling[key] = {
            n: _number(sub, n, f"{w} {key}", 1.0, _meta("unit", 0.0, 1e12, "scale", low_open=True))
            for n in sub
        }

    return MPCConfig(
        step_h=step_h,
        horizon=horizon,
        sample_period_h=sample,
        objective=objective,
        integrator=integrator,
        integrator_substeps=substeps,
        kappa=kappa,
        on_failure=on_failure,
        residual=residual,
        solver=solver,
        dose=dose,
        tracking=_frozen(tracking),
        input_move_weights=_frozen(parsed["input_move"]),
        input_usage_weights=_frozen(parsed["input_usage"]),
        input_quadratic_weights=_frozen(parsed["input_quadratic"]),
        stage_state_weights=_frozen(parsed["stage_state"]),
        terminal_state_weights=_frozen(parsed["terminal_state"]),
        hard_bounds=_frozen(hard),
        back_off=_frozen(back_off),
        soft_bounds=_frozen(soft),
        input_bounds=_frozen(in_bounds),
        rate_limits=_frozen(rates),
        state_scaling=_frozen(scaling["states"]),
        input_scaling=_frozen(scaling["inputs"]),
        limits_from_process=from_process,
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

"""Nonlinear model-predictive control: the NLP is built once, re-solved every step.

Pipeline (docs/mpc.md): model ``dynamics()`` -> RK4 step function ``F(t, x, u)`` over
``step_h`` -> multiple-shooting NLP in scaled variables, every per-step datum an NLP
parameter -> IPOPT (or CasADi's SQP) -> status check -> move, or the failure policy.

The model is anything with ``state_names``, ``input_names`` and ``dynamics()`` (a
``ca.Function (t, x, u) -> (xdot, rates)``), see :class:`PredictionModel`. A hybrid model
may add ``residual_std()`` (``ca.Function (t, x, u) -> std`` of its corrected rates,
names in ``residual_names``); the standard deviation is then propagated along the previous
solution (zero order: evaluated numerically, never differentiated) and tightens every
bounded state by ``kappa * sigma``.

Parameter vector of the NLP (per step): initial state, previous input, start time, stage
mask (shrinking horizon with a fixed-size NLP), terminal selector, dose target, tracking
references, the tightening terms and (``residual = "linearized"``) the residual's
first-order expansion about the previous plan. Its order, and that of the decision vector,
is kept in one :class:`VectorLayout` each: a new parameter is one entry of the layout in
``_build`` and one value in ``step``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import casadi as ca
import numpy as np
import numpy.typing as npt

from controller.numerics.compiled import CompileOutcome, compiled_nlpsol
from controller.numerics.mpc_config import MPCConfig, StateBound
from plant_models.base import CASADI_OPS, rk4
from plant_models.config import suggest
from plant_models.errors import ConfigError, ModelError, SolverFailedError

__all__ = ["LayoutEntry", "MPCResult", "NonlinearMPC", "PredictionModel", "VectorLayout"]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: Solver return statuses whose solution may be applied.
ACCEPTED_STATUSES = frozenset({"Solve_Succeeded", "Solved_To_Acceptable_Level"})
#: Small move penalty on the stages beyond the harvest, so that their inputs stay defined.
_IDLE_MOVE_WEIGHT = 1e-4
#: Quadratic and linear weight of the (scaled) slack of a hard bound's kappa*sigma margin.
_MARGIN_WEIGHT = 1e3
#: Linear (exact-penalty) and quadratic weight of the (scaled) violation of a hard state
#: limit in recovery mode: large enough that any plan which meets the limits is preferred,
#: so the recovery move drives the state back as fast as the inputs allow.
_RECOVERY_WEIGHT = 1e5
#: Largest residual data vector (values; an exact GP of N points has about N^2/2) whose
#: per-stage function is expanded to scalar code (SX) rather than kept as MX.
_EXPAND_LIMIT = 10_000
#: A state this far beyond a hard limit (relative to the state's scale) starts recovery.
_RECOVERY_TOLERANCE = 1e-6


class PredictionModel(Protocol):
    """What the MPC needs of a model (mechanistic or hybrid).

    Optional extras of a hybrid model, looked up with ``getattr``:

    - ``residual_names``: names of the corrected rates (n_r);
    - ``residual_std()`` -> ``ca.Function (t, x, u) -> std`` (n_r,): used for constraint
      tightening (evaluated along the previous plan, never differentiated);
    - ``residual_mean()`` -> ``ca.Function (t, x, u) -> mean`` (n_r,) and
      ``base_dynamics()`` -> the mechanistic ``(t, x, u) -> (xdot, ...)`` without the
      residual: needed by ``residual = "linearized"``, where the NLP holds the mechanistic
      model plus the residual's first-order expansion about the previous plan (as
      parameters), so its cost does not grow with the GP;
    - ``residual_state_map()`` -> ``ca.Function (t, x, u) -> d xdot / d rate`` (nx, n_r)
      (derived from ``balances`` when the model has them, as a
      :class:`~plant_models.base.MechanisticModel` does);
    - ``residual_parametric()`` -> ``ca.Function (t, x, u, data) -> (mean, std)`` and
      ``residual_data()`` -> its numeric ``data`` vector: the residual with its learned
      data as an input (a :class:`~controller.laws.control.HybridPredictionModel` offers
      them). Then :meth:`NonlinearMPC.refresh_residual` only swaps ``data``; without them
      it rebuilds the functions from ``residual_mean()``/``residual_std()``.
    """

    @property
    def state_names(self) -> tuple[str, ...]: ...

    @property
    def input_names(self) -> tuple[str, ...]: ...

    def dynamics(self) -> ca.Function: ...


@dataclasses.dataclass(frozen=True, eq=False)
class MPCResult:
    """Outcome of one MPC step.

    Attributes:
        u: the move to apply, input name -> value (always within bounds and rate limits).
        success: the solver's solution was accepted (False: a fallback move).
        status: solver return status (or the reason no solve was made).
        iterations: solver iterations (all attempts).
        solve_time_s: wall time of the solve(s), s.
        time_h: culture age of the step.
        horizon_steps: active prediction steps (shrinks towards the harvest).
        state_names, input_names, residual_names: column names of the arrays.
        predicted_times: (N+1,) h.
        predicted_states: (N+1, nx) physical units (NaN when no solution was accepted).
        predicted_inputs: (N, nu).
        predicted_std: (N, n_r) standard deviation of the corrected rates along the plan
            (zeros when the model has no residual or ``kappa`` is 0: no tightening, so the
            propagation is skipped).
        predicted_state_std: (N+1, nx) propagated state standard deviation (zeros likewise).
        cost: objective value (NaN on failure).
        slacks: largest slack of each soft constraint over the horizon, in state units, and
            ``dose_shortfall`` (relative to the dose target).
        fallback_used: which failure policy produced ``u`` (``""`` when none).
        fallback_reason: why (``""`` when none).
        recovery: the hard state limits were relaxed by exact-penalty slacks (the initial
            state was already beyond one, or the strict problem was infeasible); the
            violations are in ``slacks`` as ``<state>_<low|high>_recovery``.
        solver: the solver whose solution was accepted (``sqpmethod`` or ``ipopt``; ``""``
            when none was); with ``[solver] name = "sqpmethod"``, ``ipopt`` means the SQP
            solve failed and the IPOPT fallback (or recovery) produced the move.
    """

    u: Mapping[str, float]
    success: bool
    status: str
    iterations: int
    solve_time_s: float
    time_h: float
    horizon_steps: int
    state_names: tuple[str, ...]
    input_names: tuple[str, ...]
    residual_names: tuple[str, ...]
    predicted_times: FloatArray
    predicted_states: FloatArray
    predicted_inputs: FloatArray
    predicted_std: FloatArray
    predicted_state_std: FloatArray
    cost: float
    slacks: Mapping[str, float]
    fallback_used: str = ""
    fallback_reason: str = ""
    recovery: bool = False
    solver: str = ""


@dataclasses.dataclass
class _Plan:
    """The last accepted solution (for warm starts and the ``shift`` policy).

    ``w``, ``lam_x`` and ``lam_g`` are in the layout of the full NLP whichever NLP solved
    (the structured one's multipliers embedded: zeros for its missing rows and variables),
    so that a stored plan (controller/runtime/restart.py) fits either path."""

    time_h: float
    w: FloatArray
    lam_x: FloatArray
    lam_g: FloatArray
    states: FloatArray  # (N+1, nx)
    inputs: FloatArray  # (N, nu)


@dataclasses.dataclass(frozen=True)
class _Soft:
    state: int
    sign: float  # +1: x <= limit, -1: x >= limit
    limit: float
    weight: float
    weight_linear: float
    label: str


@dataclasses.dataclass(frozen=True)
class LayoutEntry:
    """One named block of a :class:`VectorLayout`: a (rows, cols) matrix stored column-major
    (as ``ca.vec``) at ``offset``."""

    name: str
    shape: tuple[int, int]
    offset: int

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def slice(self) -> slice:
        return slice(self.offset, self.offset + self.size)


class VectorLayout:
    """The order of named blocks in a flat vector (NLP parameters or decision variables).

    Built once from name -> shape (an int ``k`` is a (k, 1) column); the symbolic vector
    (:meth:`symbols`, :meth:`concat`) and the numeric one (:meth:`pack`, :meth:`unpack`)
    both take their order from it, so a new block is one new entry. Matrices are stored
    column-major, as ``ca.vec`` does (numpy ``order="F"``).

    Args:
        shapes: name -> shape, in vector order.
        label: what the vector is, for error messages (e.g. ``"NLP parameter"``).

    Raises:
        ModelError: a shape is not one or two non-negative integers.
    """

    def __init__(self, shapes: Mapping[str, int | tuple[int, int]], label: str = "block") -> None:
        self.label = label
        entries: dict[str, LayoutEntry] = {}
        offset = 0
        for name, spec in shapes.items():
            dims = (spec, 1) if isinstance(spec, int | np.integer) else tuple(spec)
            if len(dims) != 2 or any(not isinstance(d, int | np.integer) or d < 0 for d in dims):
                raise ModelError(
                    f"{label} {name!r}: shape {spec!r} is not a size or a (rows, cols) pair of "
                    "non-negative integers."
                )
            entry = LayoutEntry(name, (int(dims[0]), int(dims[1])), offset)
            entries[name] = entry
            offset += entry.size
        self._entries = entries
        self.size = offset

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    @property
    def entries(self) -> tuple[LayoutEntry, ...]:
        return tuple(self._entries.values())

    def __getitem__(self, name: str) -> LayoutEntry:
        entry = self._entries.get(name)
        if entry is None:
            raise ModelError(
                f"{self.label} {name!r} is not in the layout.{suggest(name, self.names)} "
                f"Known: {', '.join(self.names)}."
            )
        return entry

    def symbols(self, sym: Any = ca.SX) -> dict[str, Any]:
        """New symbols (``ca.SX`` or ``ca.MX``) named and shaped after the entries."""
        return {e.name: sym.sym(e.name, *e.shape) for e in self._entries.values()}

    def concat(self, pieces: Mapping[str, Any]) -> Any:
        """The symbolic vector ``vertcat(vec(piece) ...)`` (size,) in layout order.

        Raises:
            ModelError: a name is missing or unknown, or a piece has the wrong shape.
        """
        self._check_names(pieces)
        out = []
        for e in self._entries.values():
            piece = pieces[e.name]
            if tuple(piece.shape) != e.shape:
                raise ModelError(
                    f"{self.label} {e.name!r}: expected shape {e.shape}, got {tuple(piece.shape)}."
                )
            out.append(ca.vec(piece))
        return ca.vertcat(*out)

    def pack(self, values: Mapping[str, Any]) -> FloatArray:
        """The numeric vector (size,) of ``values`` (name -> array-like) in layout order.

        A value has the entry's shape; a row or column entry also takes a 1-D array of its
        length, and a (1, 1) entry a scalar. Matrices are flattened column-major.

        Raises:
            ModelError: a name is missing or unknown, or a value has the wrong shape.
        """
        self._check_names(values)
        out = np.empty(self.size, dtype=np.float64)
        for e in self._entries.values():
            arr = np.asarray(values[e.name], dtype=float)
            vector_ok = arr.ndim <= 1 and min(e.shape) <= 1 and arr.size == e.size
            if arr.shape != e.shape and not vector_ok:
                raise ModelError(
                    f"{self.label} {e.name!r}: expected shape {e.shape}, got {arr.shape}."
                )
            out[e.slice] = arr.reshape(-1, order="F")
        return out

    def unpack(self, vector: Any) -> dict[str, FloatArray]:
        """Name -> (rows, cols) array (a copy) of a numeric vector (size,) in this layout.

        Raises:
            ModelError: the vector does not have the layout's size.
        """
        arr = np.asarray(vector, dtype=float).reshape(-1)
        if arr.size != self.size:
            raise ModelError(f"{self.label} vector: expected {self.size} values, got {arr.size}.")
        return {
            e.name: arr[e.slice].reshape(e.shape, order="F").copy() for e in self._entries.values()
        }

    def _check_names(self, values: Mapping[str, Any]) -> None:
        missing = [k for k in self._entries if k not in values]
        unknown = [k for k in values if k not in self._entries]
        if missing or unknown:
            hints = "".join(suggest(k, self.names) for k in unknown)
            raise ModelError(
                f"{self.label} values: missing {missing}, unknown {unknown}.{hints} "
                f"Expected: {', '.join(self.names)}."
            )


class NonlinearMPC:
    """Nonlinear MPC with a fixed NLP (multiple shooting, RK4) and warm starts.

    Args:
        model: see :class:`PredictionModel`.
        config: tuning; fill process limits first with
            :func:`controller.numerics.mpc_config.with_process_limits`.
        recipe: culture age -> inputs; needed when ``on_failure = "recipe"``.
        model_parameters: names of model parameters that become NLP parameters (e.g.
            ``("mu_max",)`` so the estimator's per-patient growth factor reaches the
            prediction); the model's ``dynamics(symbolic_parameters=names)`` (and
            ``base_dynamics(symbolic_parameters=names)`` for a linearised residual) must
            accept them. Values are given per step (default: the model's nominal values).

    Raises:
        ConfigError: a name in the tuning is not a state/input of the model (with a
            suggestion), or the objective lacks what it needs.
        ModelError: the model does not offer the interface above.
    """

    # the residual (set by _setup_residual, swapped by refresh_residual)
    _res_fn: ca.Function | None
    _res_data: FloatArray
    _parametric: bool
    _has_mean: bool
    _has_std: bool
    _linearized: bool

    def __init__(
        self,
        model: PredictionModel,
        config: MPCConfig,
        *,
        recipe: Callable[[float], Mapping[str, float]] | None = None,
        model_parameters: Sequence[str] = (),
    ) -> None:
        self.model = model
        self.config = config
        self.recipe = recipe
        self.parameter_names: tuple[str, ...] = tuple(model_parameters)
        self._nominal_parameters = self._parameter_defaults()
        self._pvals = self._nominal_parameters.copy()
        # index of [dose] reference_growth_parameter among model_parameters (None: unscaled)
        name = config.dose.reference_growth_parameter
        self._growth_index: int | None = None
        if name in self.parameter_names:
            i = self.parameter_names.index(name)
            nominal = float(self._nominal_parameters[i])
            self._growth_index = i if nominal > 0 and math.isfinite(nominal) else None
        self.state_names: tuple[str, ...] = tuple(model.state_names)
        self.input_names: tuple[str, ...] = tuple(model.input_names)
        self.nx, self.nu, self.horizon = (
            len(self.state_names),
            len(self.input_names),
            config.horizon,
        )
        self._check_config()
        self._scales()
        self._setup_residual()
        self._build()
        self._plan: _Plan | None = None

    # ------------------------------------------------------------------ set-up
    def _name_error(self, name: str, table: str, allowed: Sequence[str], kind: str) -> ConfigError:
        return ConfigError(
            f"{self.config.source} [{table}] {name}: not a {kind} of model "
            f"{getattr(self.model, 'name', type(self.model).__name__)!r}."
            f"{suggest(name, allowed)} Known {kind}s: {', '.join(allowed)}."
        )

    def _check_config(self) -> None:
        c = self.config
        states, inputs = self.state_names, self.input_names
        state_tables: tuple[tuple[str, Mapping[str, Any]], ...] = (
            ("tracking", c.tracking),
            ("weights stage_state", c.stage_state_weights),
            ("weights terminal_state", c.terminal_state_weights),
            ("bounds", c.hard_bounds),
            ("back_off", c.back_off),
            ("soft_bounds", c.soft_bounds),
            ("scaling states", c.state_scaling),
        )
        for table, names in state_tables:
            for n in names:
                if n not in states:
                    raise self._name_error(n, table, states, "state")
        input_tables: tuple[tuple[str, Mapping[str, Any]], ...] = (
            ("weights input_move", c.input_move_weights),
            ("weights input_usage", c.input_usage_weights),
            ("weights input_quadratic", c.input_quadratic_weights),
            ("inputs", c.input_bounds),
            ("inputs rate_limit", c.rate_limits),
            ("scaling inputs", c.input_scaling),
        )
        for table, names in input_tables:
            for n in names:
                if n not in inputs:
                    raise self._name_error(n, table, inputs, "input")
        for n, b in c.back_off.items():
            hb = c.hard_bounds.get(n)
            for side in ("low", "high"):
                if getattr(b, side) is not None and (hb is None or getattr(hb, side) is None):
                    raise ConfigError(
                        f"{c.source} [back_off] {n}: {side} = {getattr(b, side)!r} but {n!r} "
                        f"has no hard {side} limit to back off from (give it under [bounds] "
                        "or in the process specification)."
                    )
            if hb is not None and hb.low is not None and hb.high is not None:
                inner_low, inner_high = hb.low + (b.low or 0.0), hb.high - (b.high or 0.0)
                if inner_low > inner_high:
                    raise ConfigError(
                        f"{c.source} [back_off] {n}: the back-offs leave no room between the "
                        f"hard limits {hb.low:g} and {hb.high:g} (plan band {inner_low:g} > "
                        f"{inner_high:g}); make them smaller."
                    )
        if c.on_failure == "recipe" and self.recipe is None:
            raise ConfigError(
                f"{c.source} [mpc] on_failure = 'recipe' but no recipe was given to the MPC; "
                "pass recipe=... or choose hold/shift."
            )
        if c.objective == "dose-by-date":
            d = c.dose
            for n in (d.cells_state, d.volume_state):
                if n not in states:
                    raise self._name_error(n, "dose", states, "state")
            known = getattr(self.model, "parameters", None)
            name = d.reference_growth_parameter
            if name and dataclasses.is_dataclass(known):
                fields = [f.name for f in dataclasses.fields(known)]
                if name not in fields:
                    raise ConfigError(
                        f"{c.source} [dose] reference_growth_parameter = {name!r}: not a "
                        f"parameter of the model.{suggest(name, fields)}"
                    )
            if d.dose_cells is None or d.harvest_time is None:
                raise ConfigError(
                    f"{c.source} [dose]: dose-by-date needs dose_cells and harvest_time; give "
                    "them in the file or fill them from the process (with_process_limits)."
                )

    def _scales(self) -> None:
        c = self.config
        sx = np.ones(self.nx)
        for i, n in enumerate(self.state_names):
            hard = c.hard_bounds.get(n)
            if n in c.state_scaling:
                sx[i] = c.state_scaling[n]
            elif hard is not None and hard.high is not None and hard.high > 0:
                sx[i] = hard.high
        lo = np.full(self.nu, -np.inf)
        hi = np.full(self.nu, np.inf)
        bounds_fn = getattr(self.model, "input_bounds", None)
        if callable(bounds_fn):
            mlo, mhi = bounds_fn()
            lo, hi = np.asarray(mlo, dtype=float).copy(), np.asarray(mhi, dtype=float).copy()
        for i, n in enumerate(self.input_names):
            if n in c.input_bounds:
                lo[i], hi[i] = c.input_bounds[n]
        su = np.ones(self.nu)
        for i, n in enumerate(self.input_names):
            if n in c.input_scaling:
                su[i] = c.input_scaling[n]
            elif math.isfinite(hi[i]) and hi[i] > 0:
                su[i] = hi[i]
        rates = np.full(self.nu, np.inf)
        for i, n in enumerate(self.input_names):
            if n in c.rate_limits:
                rates[i] = c.rate_limits[n]
        self.state_scale, self.input_scale = sx, su
        self.u_low, self.u_high, self.rate_limits = lo, hi, rates

    def _build(self) -> None:
        c = self.config
        nx, nu, n, h = self.nx, self.nu, self.horizon, c.step_h
        f = self._model_function("dynamics")
        if f is None:
            raise ModelError("the model has no dynamics() method.")
        npar = len(self.parameter_names)
        # one RK4 step over step_h (integrator_substeps sub-steps)
        t = ca.MX.sym("t")
        x = ca.MX.sym("x", nx)
        u = ca.MX.sym("u", nu)
        linearized = self._linearized
        n_r = len(self.residual_names)
        nq = n_r + n_r * nx + nx if linearized else 0
        q = ca.MX.sym("q", nq)
        pm = ca.MX.sym("pm", npar)

        def call(fn: ca.Function, tk: Any, xk: Any) -> Any:
            return fn(tk, xk, u, pm)[0] if npar else fn(tk, xk, u)[0]

        def exact(tk: Any, xk: Any) -> Any:
            return call(f, tk, xk)

        base_fn, map_fn = self._base_fn, self._map_fn

        def first_order(tk: Any, xk: Any) -> Any:
            # mechanistic part + residual linearised about the previous plan (parameters q)
            if base_fn is None or map_fn is None:  # guarded by _setup_residual
                raise ModelError("linearized residual without base_dynamics/state map")
            mean = q[:n_r] + ca.mtimes(ca.reshape(q[n_r : n_r + n_r * nx], n_r, nx), xk - q[-nx:])
            return call(base_fn, tk, xk) + ca.mtimes(map_fn(tk, xk, u), mean)

        rhs = first_order if linearized else exact
        step_fn = ca.Function(
            "mpc_step",
            [t, x, u, q, pm],
            [self._rk4(rhs, t, x)],
            ["t", "x", "u", "q", "p"],
            ["x_next"],
        )
        x_exact = self._rk4(exact, t, x)
        sim_fn = ca.Function(
            "mpc_simulate", [t, x, u, pm], [x_exact], ["t", "x", "u", "p"], ["x_next"]
        )
        jac_fn = ca.Function(
            "mpc_step_jac", [t, x, u, pm], [ca.jacobian(x_exact, x)], ["t", "x", "u", "p"], ["A"]
        )
        if c.solver.expand:
            try:
                step_fn = step_fn.expand()
                sim_fn = sim_fn.expand()
                jac_fn = jac_fn.expand()
            except RuntimeError as exc:  # e.g. a model with MX-only nodes
                log.info("MPC: NLP kept as MX (cannot expand: %s)", exc)
        self._step_fn, self._sim_fn, self._jac_fn = step_fn, sim_fn, jac_fn
        self._lin_fn = self._linearisation_function()
        sym: Any = ca.SX if step_fn.is_a("SXFunction") else ca.MX

        sx = ca.DM(self.state_scale)
        su = ca.DM(self.input_scale)

        # soft constraints
        softs: list[_Soft] = []
        for name, b in c.soft_bounds.items():
            i = self.state_names.index(name)
            if b.high is not None:
                softs.append(_Soft(i, 1.0, b.high, b.weight, b.weight_linear, f"{name}_high"))
            if b.low is not None:
                softs.append(_Soft(i, -1.0, b.low, b.weight, b.weight_linear, f"{name}_low"))
        # The margin from a hard bound (the [back_off] distance plus kappa*sigma) is itself
        # soft (heavily penalised): the bound stays hard, but a wide GP band far from the
        # data, or a state already inside the back-off, cannot make the problem
        # infeasible; the margin is kept wherever it can be.
        tightened = self._std_fn is not None and c.kappa > 0
        w = _MARGIN_WEIGHT
        for name, hb in c.hard_bounds.items():
            i = self.state_names.index(name)
            bo = c.back_off.get(name, StateBound())
            if hb.high is not None and (tightened or bo.high):
                high = hb.high - (bo.high or 0.0)
                softs.append(_Soft(i, 1.0, high, w, w, f"{name}_high_margin"))
            if hb.low is not None and (tightened or bo.low):
                low = hb.low + (bo.low or 0.0)
                softs.append(_Soft(i, -1.0, low, w, w, f"{name}_low_margin"))
        self._softs = softs
        ns = len(softs)
        dose_mode = c.objective == "dose-by-date"
        self.tracked = tuple(c.tracking)
        nt = len(self.tracked)

        # hard state limits: (state index, sign, limit, label); each has a recovery slack,
        # fixed at 0 (a hard limit) unless the step runs in recovery mode
        hards: list[_Soft] = []
        for name, hb in c.hard_bounds.items():
            i = self.state_names.index(name)
            if hb.high is not None:
                hards.append(_Soft(i, 1.0, hb.high, 0.0, 0.0, f"{name}_high_recovery"))
            if hb.low is not None:
                hards.append(_Soft(i, -1.0, hb.low, 0.0, 0.0, f"{name}_low_recovery"))
        self._hards = hards
        nh = len(hards)

        # decision variables (scaled): states, inputs, soft-constraint slacks, dose shortfall,
        # recovery slacks of the hard state limits
        self._w_layout = VectorLayout(
            {
                "states": (nx, n + 1),
                "inputs": (nu, n),
                "slacks": (ns, n),
                "dose_slack": 1 if dose_mode else 0,
                "recovery_slacks": (nh, n),
            },
            "NLP variable",
        )
        wsym = self._w_layout.symbols(sym)
        rs = wsym["recovery_slacks"]
        xs, us, ss, sd = wsym["states"], wsym["inputs"], wsym["slacks"], wsym["dose_slack"]
        xp = ca.diag(sx) @ xs
        up = ca.diag(su) @ us

        # parameters (per step): one entry here and one in the values given in step()
        self._p_layout = VectorLayout(
            {
                "x0": nx,
                "u_prev": nu,
                "t0": 1,
                "mask": (1, n),
                "terminal": (1, n),
                "dose_target": 1,
                "reference": (nt, n + 1),
                "tightening": (nx, n),
                "residual_linearisation": (nq, n),
                "model_parameters": npar,
                "overshoot_active": 1,
            },
            "NLP parameter",
        )
        par = self._p_layout.symbols(sym)

        g: list[Any] = []
        lbg: list[FloatArray] = []
        ubg: list[FloatArray] = []

        blocks: list[tuple[int, int, int]] = []  # (start, size, rows per stage or 0)
        # what each row block is: "x0" (initial state) and "hard" (hard state limits) are
        # variable bounds in the structured (sqpmethod) NLP, not rows
        tags: list[str] = []

        def add(
            expr: Any,
            low: float | FloatArray,
            high: float | FloatArray,
            *,
            staged: bool = True,
            tag: str = "",
        ) -> None:
            e = ca.vec(expr)
            size = int(e.size1())
            start = int(sum(int(q.size1()) for q in g))
            blocks.append((start, size, int(expr.size1()) if staged else 0))
            tags.append(tag)
            g.append(e)
            lbg.append(np.broadcast_to(np.asarray(low, dtype=float), (size,)).copy())
            ubg.append(np.broadcast_to(np.asarray(high, dtype=float), (size,)).copy())

        # initial state and shooting gaps (scaled)
        add(xs[:, 0] - par["x0"] / sx, 0.0, 0.0, staged=False, tag="x0")
        times = par["t0"] + h * ca.DM(np.arange(n)).T
        x_next = step_fn.map(n)(
            times,
            xp[:, :n],
            up,
            par["residual_linearisation"],
            ca.repmat(par["model_parameters"], 1, n),
        )
        add((x_next - xp[:, 1:]) / ca.repmat(sx, 1, n), 0.0, 0.0)
        # rate-of-change limits (first move over the sample period, then per step)
        du = ca.horzcat(up[:, 0] - par["u_prev"], up[:, 1:] - up[:, :-1])
        for i in range(nu):
            r = self.rate_limits[i]
            if math.isfinite(r):
                span = np.full(n, r * h)
                span[0] = r * c.sample_period_h
                add(du[i, :] / su[i], -span / self.input_scale[i], span / self.input_scale[i])
        # hard state limits on x_1..x_N, masked beyond the harvest (their kappa*sigma margin
        # is a soft constraint below); the recovery slack is fixed at 0 outside recovery mode
        for j, hd in enumerate(hards):
            si = float(self.state_scale[hd.state])
            viol = hd.sign * (xp[hd.state, 1:] - hd.limit)
            add(par["mask"] * viol / si - rs[j, :], -np.inf, 0.0, tag="hard")
        for j, s in enumerate(softs):
            si = float(self.state_scale[s.state])
            viol = s.sign * (xp[s.state, 1:] - s.limit) + par["tightening"][s.state, :]
            add(par["mask"] * viol / si - ss[j, :], -np.inf, 0.0)

        # objective
        cost: Any = 0
        if dose_mode:
            ic = self.state_names.index(c.dose.cells_state)
            iv = self.state_names.index(c.dose.volume_state)
            cells_end = ca.sum2(par["terminal"] * xp[ic, 1:] * xp[iv, 1:])
            add(1.0 - cells_end / par["dose_target"] - sd, -np.inf, 0.0, staged=False)
            cost += c.dose.weight * sd**2 + c.dose.weight_linear * sd
            if c.dose.overshoot_weight > 0:
                excess = ca.fmax(cells_end / par["dose_target"] - 1.0 - c.dose.overshoot_band, 0.0)
                cost += par["overshoot_active"] * c.dose.overshoot_weight * excess**2
            if c.dose.viability_weight > 0:
                viability = self._viability_expr(xp)
                if viability is not None:
                    cost += c.dose.viability_weight * (
                        1.0 - ca.sum2(par["terminal"] * viability[:, 1:])
                    )
        for j, name in enumerate(self.tracked):
            i = self.state_names.index(name)
            term = c.tracking[name]
            err = (xp[i, :] - par["reference"][j, :]) / float(self.state_scale[i])
            cost += term.weight * ca.sum2(par["mask"] * err[:, :n] ** 2)
            cost += term.weight * ca.sum2(par["terminal"] * err[:, 1:] ** 2)
        for name, wgt in c.stage_state_weights.items():
            i = self.state_names.index(name)
            cost += wgt * ca.sum2(par["mask"] * xp[i, :n]) / float(self.state_scale[i])
        for name, wgt in c.terminal_state_weights.items():
            i = self.state_names.index(name)
            cost += wgt * ca.sum2(par["terminal"] * xp[i, 1:]) / float(self.state_scale[i])
        for name, wgt in c.input_usage_weights.items():
            i = self.input_names.index(name)
            cost += wgt * h * ca.sum2(par["mask"] * up[i, :])
        for name, wgt in c.input_quadratic_weights.items():
            i = self.input_names.index(name)
            cost += wgt * ca.sum2(par["mask"] * us[i, :] ** 2)
        for i, name in enumerate(self.input_names):
            wgt = c.input_move_weights.get(name, 0.0)
            dui = du[i, :] / su[i]
            cost += ca.sum2((wgt * par["mask"] + _IDLE_MOVE_WEIGHT * (1 - par["mask"])) * dui**2)
        for j, s in enumerate(softs):
            cost += s.weight * ca.sumsqr(ss[j, :]) + s.weight_linear * ca.sum2(ss[j, :])
        if nh:  # exact L1 penalty (plus a quadratic term that spreads it over the horizon)
            cost += _RECOVERY_WEIGHT * (ca.sum1(ca.sum2(rs)) + ca.sumsqr(rs))

        w = self._w_layout.concat(wsym)
        p = self._p_layout.concat(par)
        nw = self._w_layout.size

        def bounds(
            x_bound: float, u_bound: FloatArray, slack_bound: float, recovery_bound: float
        ) -> FloatArray:
            return self._w_layout.pack(
                {
                    "states": np.full((nx, n + 1), x_bound),
                    "inputs": np.tile((u_bound / self.input_scale).reshape(-1, 1), (1, n)),
                    "slacks": np.full((ns, n), slack_bound),
                    "dose_slack": np.full(self._w_layout["dose_slack"].size, slack_bound),
                    "recovery_slacks": np.full((nh, n), recovery_bound),
                }
            )

        self._lbw = bounds(-np.inf, self.u_low, 0.0, 0.0)
        self._ubw = bounds(np.inf, self.u_high, np.inf, 0.0)
        self._ubw_recovery = bounds(np.inf, self.u_high, np.inf, np.inf)
        self._g_blocks = blocks
        # stage-ordered blocks of w (start, size, rows per stage), for shifting multipliers
        self._w_blocks = [
            (e.offset, e.size, e.shape[0])
            for e in (self._w_layout[k] for k in ("states", "inputs", "slacks", "recovery_slacks"))
        ]
        self._lbg, self._ubg = np.concatenate(lbg), np.concatenate(ubg)
        self._nw, self._ng, self._np = nw, int(self._lbg.size), self._p_layout.size
        nlp = {"x": w, "p": p, "f": cost, "g": ca.vertcat(*g)}
        self.compile_outcomes: list[CompileOutcome] = []
        self._structured = c.solver.name == "sqpmethod"
        if not self._structured:
            self._solver_cold = self._nlpsol("mpc_cold", "ipopt", nlp, False, compiled=True)
            self._solver_warm = (
                self._nlpsol("mpc_warm", "ipopt", nlp, True, compiled=True)
                if c.solver.warm_start
                else self._solver_cold
            )
            self._solver_fast: Any = None
        else:
            self._build_structured(wsym, p, cost, g, lbg, ubg, blocks, tags, sym)
            # IPOPT on the full NLP: the fallback of a failed SQP solve and the recovery
            # mode (hard limits relaxed by slacks); not compiled, rarely used
            self._solver_cold = self._nlpsol("mpc_ipopt", "ipopt", nlp, False, compiled=False)
            self._solver_warm = self._solver_cold
        log.debug("MPC built: %d variables, %d constraints, %d parameters", nw, self._ng, self._np)

    def _build_structured(
        self,
        wsym: Mapping[str, Any],
        p: Any,
        cost: Any,
        g: Sequence[Any],
        lbg: Sequence[FloatArray],
        ubg: Sequence[FloatArray],
        blocks: Sequence[tuple[int, int, int]],
        tags: Sequence[str],
        sym: Any,
    ) -> None:
        """The structured NLP of ``sqpmethod``: the full NLP without the recovery slacks,
        the initial state and the hard state limits as bounds of the state variables (set
        per step in :meth:`_fast_bounds`), and its SQP solver."""
        layout = self._w_layout
        if layout.names[-1] != "recovery_slacks":  # the fast vector is a prefix of w
            raise ModelError("NLP layout: recovery_slacks must be the last block")
        n_fast = layout["recovery_slacks"].offset
        rs = wsym["recovery_slacks"]
        w_fast = ca.vertcat(*[ca.vec(wsym[k]) for k in layout.names if k != "recovery_slacks"])
        f_fast = cost
        if rs.numel() > 0:
            f_fast = ca.substitute(cost, rs, sym.zeros(*rs.shape))
        keep = [i for i, tag in enumerate(tags) if tag not in ("x0", "hard")]
        # rows of the full NLP that the structured one keeps (in order)
        rows = [np.arange(blocks[i][0], blocks[i][0] + blocks[i][1]) for i in keep]
        self._fast_rows = np.concatenate(rows) if rows else np.zeros(0, dtype=int)
        # rows of the initial state (nx) and of each hard limit (one per stage), whose
        # multipliers are those of the state bounds in the structured NLP
        x0_block = blocks[tags.index("x0")]
        self._x0_rows = np.arange(x0_block[0], x0_block[0] + x0_block[1])
        hard_blocks = [blocks[i] for i, tag in enumerate(tags) if tag == "hard"]
        self._hard_rows = [np.arange(b[0], b[0] + b[1]) for b in hard_blocks]
        g_fast = ca.vertcat(*[g[i] for i in keep])
        self._lbg_fast = np.concatenate([lbg[i] for i in keep]) if keep else np.zeros(0)
        self._ubg_fast = np.concatenate([ubg[i] for i in keep]) if keep else np.zeros(0)
        self._n_fast = n_fast
        self._lbw_fast = self._lbw[:n_fast].copy()
        self._ubw_fast = self._ubw[:n_fast].copy()
        nlp = {"x": w_fast, "p": p, "f": f_fast, "g": g_fast}
        self._solver_fast = self._nlpsol("mpc_sqp", "sqpmethod", nlp, True, compiled=True)

    def _state_index(self, stage: Any, state: Any) -> Any:
        return self._w_layout["states"].offset + self.nx * stage + state

    def _to_full_duals(self, lam_x: FloatArray, lam_g: FloatArray) -> tuple[FloatArray, FloatArray]:
        """Multipliers of the structured NLP in the full NLP's layout: the state bounds'
        multipliers become those of the initial-state and hard-limit rows (CasADi's sign
        convention: positive at an upper bound)."""
        n = self.horizon
        full_x = np.concatenate([lam_x, np.zeros(self._nw - lam_x.size)])
        full_g = np.zeros(self._ng)
        full_g[self._fast_rows] = lam_g
        x0_idx = self._state_index(0, np.arange(self.nx))
        full_g[self._x0_rows] = full_x[x0_idx]
        stages = np.arange(1, n + 1)
        for rows, hd in zip(self._hard_rows, self._hards, strict=True):
            full_g[rows] = np.maximum(hd.sign * full_x[self._state_index(stages, hd.state)], 0.0)
        off = self._w_layout["states"].offset
        full_x[off : off + self.nx * (n + 1)] = 0.0  # no state bounds in the full NLP
        return full_x, full_g

    def _to_structured_duals(
        self, lam_x: FloatArray, lam_g: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """The inverse of :meth:`_to_full_duals` (a shifted plan's multipliers)."""
        n = self.horizon
        fast_x = lam_x[: self._n_fast].copy()
        fast_x[self._state_index(0, np.arange(self.nx))] = lam_g[self._x0_rows]
        stages = np.arange(1, n + 1)
        for rows, hd in zip(self._hard_rows, self._hards, strict=True):
            fast_x[self._state_index(stages, hd.state)] += hd.sign * lam_g[rows]
        return fast_x, lam_g[self._fast_rows]

    def _fast_bounds(self, x: FloatArray, active: int) -> tuple[FloatArray, FloatArray]:
        """Bounds of the structured NLP's variables for one step: the initial state fixed,
        the hard limits on the states of the active stages (scaled)."""
        lbx, ubx = self._lbw_fast.copy(), self._ubw_fast.copy()
        off, nx = self._w_layout["states"].offset, self.nx
        lbx[off : off + nx] = ubx[off : off + nx] = x / self.state_scale
        for hd in self._hards:
            idx = off + nx * np.arange(1, active + 1) + hd.state
            limit = hd.limit / float(self.state_scale[hd.state])
            if hd.sign > 0:
                ubx[idx] = np.minimum(ubx[idx], limit)
            else:
                lbx[idx] = np.maximum(lbx[idx], limit)
        return lbx, ubx

    def _nlpsol(
        self, name: str, plugin: str, nlp: Mapping[str, Any], warm: bool, *, compiled: bool
    ) -> ca.Function:
        """``ca.nlpsol`` with this tuning's options; with ``jit`` (and ``compiled``) its
        functions are generated C, cached on disk (:func:`compiled_nlpsol`)."""
        s = self.config.solver
        opts = self._solver_options(warm, plugin)
        if not (s.jit and compiled):
            return ca.nlpsol(name, plugin, nlp, opts)
        cache = Path(s.cache_dir).expanduser() if s.cache_dir else None
        solver, outcome = compiled_nlpsol(
            name, plugin, nlp, opts, cache_dir=cache, flags=(s.jit_optimisation,)
        )
        self.compile_outcomes.append(outcome)
        return solver

    def _linearisation_function(self) -> ca.Function | None:
        """The residual's work of one MPC step as ONE function, evaluated once per step:
        ``(t (1 x N), x (nx x N), u (nu x N), p (npar), data) -> (rate_std (n_r x N),
        state_std (nx x N+1), q (nq x N))`` along a plan.

        ``rate_std``/``state_std``: zero-order spread propagation (``cov_{k+1} = A_k cov_k
        A_k^T + h^2 G_k diag(std_k^2) G_k^T``, A the state Jacobian of the step, G the
        rates' state map) when tightening is on (``kappa > 0`` and a ``residual_std``);
        ``q``: the residual mean, its state Jacobian and the state at each stage
        (``residual = "linearized"``). The residual's data are an input, so the function
        (with its derivatives) is built once; None when there is nothing to compute."""
        stage = self._res_fn
        if stage is None:
            return None
        n, nx, nu = self.horizon, self.nx, self.nu
        spread = self._has_std and self._map_fn is not None and self.config.kappa > 0
        linear = self._linearized and self._has_mean
        if not (spread or linear):
            return None
        n_r = len(self.residual_names)
        npar = len(self.parameter_names)
        t1 = ca.MX.sym("t")
        x1 = ca.MX.sym("x", nx)
        u1 = ca.MX.sym("u", nu)
        d1 = ca.MX.sym("data", stage.size1_in(3))
        # inlined, so that the mean's Jacobian differentiates the mean's nodes only
        mean1, std1 = stage.call([t1, x1, u1, d1], True, False)
        outs1 = [ca.fmax(std1, 0.0)]
        if linear:
            outs1.append(ca.vertcat(mean1, ca.vec(ca.jacobian(mean1, x1)), x1))
        per_stage = ca.Function("residual_stage", [t1, x1, u1, d1], outs1)
        if self.config.solver.expand and stage.size1_in(3) <= _EXPAND_LIMIT:
            # scalar code where that is small (a sparse GP, a small exact one): the matrix
            # nodes of a large exact GP stay MX, which evaluates them faster in less memory
            # (its scalar form would hold every entry of its triangular factor)
            try:
                expanded = per_stage.expand()
            except RuntimeError as exc:
                log.info("MPC: residual stage kept as MX (%s)", exc)
            else:
                if expanded.n_instructions() <= 5 * _EXPAND_LIMIT:
                    per_stage = expanded
        tt = ca.MX.sym("t", 1, n)
        xx = ca.MX.sym("x", nx, n)
        uu = ca.MX.sym("u", nu, n)
        pm = ca.MX.sym("p", npar)
        data = ca.MX.sym("data", stage.size1_in(3))
        # one call per stage, all reading the same data symbol (a map with the data as a
        # non-repeated input would copy them N times into its workspace)
        calls = [per_stage.call([tt[:, k], xx[:, k], uu[:, k], data]) for k in range(n)]
        std = ca.horzcat(*[out[0] for out in calls])
        q = ca.horzcat(*[out[1] for out in calls]) if linear else ca.MX(0, n)
        state_std = ca.MX(nx, n + 1)
        if spread and self._map_fn is not None:
            a_all = self._jac_fn.map(n)(tt, xx, uu, ca.repmat(pm, 1, n))  # nx x nx*n
            g_all = self._map_fn.map(n)(tt, xx, uu)  # nx x n_r*n
            state_std = self._propagation(n_r)(a_all, g_all, std)
        return ca.Function(
            "residual_per_step",
            [tt, xx, uu, pm, data],
            [ca.densify(std), ca.densify(state_std), ca.densify(q)],
            ["t", "x", "u", "p", "data"],
            ["rate_std", "state_std", "q"],
        )

    def _propagation(self, n_r: int) -> ca.Function:
        """``(A (nx x nx N), G (nx x n_r N), std (n_r x N)) -> state std (nx x N+1)``:
        ``cov_{k+1} = A_k cov_k A_k^T + h^2 G_k diag(std_k^2) G_k^T`` from ``cov_0 = 0``
        (scalar code: small dense matrices)."""
        n, nx, h = self.horizon, self.nx, self.config.step_h
        a_all = ca.SX.sym("A", nx, nx * n)
        g_all = ca.SX.sym("G", nx, n_r * n)
        std = ca.SX.sym("std", n_r, n)
        cov = ca.SX(nx, nx)
        cols = [ca.SX(nx, 1)]
        for k in range(n):
            a = a_all[:, k * nx : (k + 1) * nx]
            g = g_all[:, k * n_r : (k + 1) * n_r] * (h * ca.repmat(std[:, k].T, nx, 1))
            cov = ca.mtimes(ca.mtimes(a, cov), a.T) + ca.mtimes(g, g.T)
            cols.append(ca.sqrt(ca.fmax(ca.diag(cov), 0.0)))
        return ca.Function(
            "spread_propagation",
            [a_all, g_all, std],
            [ca.horzcat(*cols)],
            ["A", "G", "std"],
            ["state_std"],
        )

    def refresh_residual(self) -> None:
        """Take the model's residual as it is now, after it learned in the batch (e.g.
        :meth:`plant_models.gp.GPResidual.observe` through ``HybridModel.observe``).

        A model with ``residual_parametric()``/``residual_data()`` only hands over its new
        data vector: no CasADi function is built (the layout of the data is fixed, see
        :meth:`plant_models.gp.GPResidual.data_layout`; if it did change, the functions
        are rebuilt once, logged). Other models' ``residual_mean``/``residual_std`` are
        re-read and the per-step function rebuilt. The NLP itself is never rebuilt: with
        ``residual = "linearized"`` the residual enters it as parameters; with
        ``residual = "exact"`` the residual inside the NLP stays as built (only the
        tightening follows the learned residual) and a new :class:`NonlinearMPC` is needed
        to change it.
        """
        if self._res_fn is None:
            return
        if self._parametric:
            data = self._read_residual_data()
            if data.size != self._res_data.size:
                log.warning(
                    "MPC: the residual's data length changed (%d -> %d); its functions are rebuilt",
                    self._res_data.size,
                    data.size,
                )
                self._setup_residual()
                self._lin_fn = self._linearisation_function()
                return
            self._res_data = data  # read in place at each step (Function.buffer)
            return
        self._setup_residual()
        self._lin_fn = self._linearisation_function()

    def residual_at(
        self, t: float, x: Sequence[float] | FloatArray, u: Sequence[float] | FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """The residual (mean, std) of the corrected rates at one point, as the MPC sees it
        now (after the last :meth:`refresh_residual`); zeros for what the model lacks."""
        n_r = len(self.residual_names)
        if self._res_fn is None:
            return np.zeros(n_r), np.zeros(n_r)
        mean, std = self._res_fn(
            t, np.asarray(x, dtype=float), np.asarray(u, dtype=float), ca.DM(self._res_data)
        )
        return np.asarray(mean, dtype=float).reshape(-1), np.asarray(std, dtype=float).reshape(-1)

    def _rk4(self, rhs: Callable[[Any, Any], Any], t: Any, x: Any) -> Any:
        """State after one ``step_h`` of RK4 (``integrator_substeps`` sub-steps) of ``rhs``."""
        return rk4(rhs, t, x, self.config.step_h, self.config.integrator_substeps)

    def _viability_expr(self, xp: Any) -> Any:
        names = self.state_names
        iv = names.index(self.config.dose.cells_state)
        if "dead_cells" in names:
            return xp[iv, :] / (xp[iv, :] + xp[names.index("dead_cells"), :] + 1e-9)
        if "total_cells" in names:
            return xp[iv, :] / (xp[names.index("total_cells"), :] + 1e-9)
        return None

    def _solver_options(self, warm: bool, plugin: str = "ipopt") -> dict[str, Any]:
        s = self.config.solver
        if plugin == "sqpmethod":
            qp_opts: dict[str, Any] = {"error_on_fail": False}
            if s.qpsol == "qrqp":
                qp_opts |= {"print_iter": False, "print_header": False, "print_info": False}
            elif s.qpsol == "qpoases":
                qp_opts |= {"printLevel": "none", "sparse": True}
            elif s.qpsol == "osqp":
                qp_opts |= {"verbose": False, "osqp": {"verbose": False}}
            return {
                "print_time": False,
                "print_header": False,
                "print_iteration": False,
                "print_status": False,
                "error_on_fail": False,
                "max_iter": s.sqp_max_iter,
                # the default 3 line-search steps end cold starts far from the solution in
                # Search_Direction_Becomes_Too_Small (do-mpc batch reactor, step 0)
                "max_iter_ls": 10,
                "calc_lam_p": False,
                "tol_pr": s.tolerance,
                "tol_du": s.tolerance,
                "qpsol": s.qpsol,
                "qpsol_options": qp_opts,
                "hessian_approximation": "exact" if s.hessian == "exact" else "limited-memory",
            }
        opts: dict[str, Any] = {
            "print_time": False,
            "error_on_fail": False,
            "ipopt.print_level": 0,
            "ipopt.sb": "yes",
            "ipopt.max_iter": s.max_iter,
            "ipopt.max_cpu_time": s.max_cpu_time_s,
            "ipopt.tol": s.tolerance,
            "ipopt.acceptable_tol": s.acceptable_tolerance,
            "ipopt.linear_solver": s.linear_solver,
            "ipopt.hessian_approximation": s.hessian,
        }
        if warm:
            opts.update(
                {
                    "ipopt.warm_start_init_point": "yes",
                    "ipopt.warm_start_bound_push": 1e-6,
                    "ipopt.warm_start_slack_bound_push": 1e-6,
                    "ipopt.warm_start_mult_bound_push": 1e-6,
                    "ipopt.mu_init": s.warm_start_mu,
                }
            )
        return opts

    def _parameter_defaults(self) -> FloatArray:
        params = getattr(self.model, "parameters", None)
        values = []
        for name in self.parameter_names:
            value = getattr(params, name, None)
            if value is None or not math.isfinite(float(value)):
                raise ConfigError(
                    f"MPC model_parameters: {name!r} is not a finite parameter of model "
                    f"{getattr(self.model, 'name', type(self.model).__name__)!r}."
                )
            values.append(float(value))
        return np.array(values, dtype=float)

    def _model_function(self, attr: str) -> ca.Function | None:
        """``model.<attr>()`` with the MPC's symbolic model parameters, checked."""
        factory = getattr(self.model, attr, None)
        if not callable(factory):
            return None
        names = self.parameter_names
        fn = factory(symbolic_parameters=names) if names else factory()
        n_in = 4 if names else 3
        if not isinstance(fn, ca.Function) or fn.n_in() != n_in:
            args = "(t, x, u, p)" if names else "(t, x, u)"
            raise ModelError(
                f"model.{attr}() must return a ca.Function {args} -> (xdot, ...) with exactly "
                f"{n_in} inputs."
            )
        return fn

    def _setup_residual(self) -> None:
        """Optional residual interface of a hybrid model (see :class:`PredictionModel`).

        Leaves ``_res_fn`` = ``(t, x, u, data) -> (mean, std)`` (None without a residual)
        and ``_res_data``: the model's numeric data for a parametric model, an empty vector
        for a model whose ``residual_mean``/``residual_std`` embed them."""
        self.residual_names: tuple[str, ...] = ()
        self._res_fn = None
        self._res_data = np.zeros(0)
        self._parametric = False
        self._has_mean = False
        self._has_std = False
        self._std_fn: ca.Function | None = None
        self._base_fn: ca.Function | None = None
        self._map_fn: ca.Function | None = None
        base = self._model_function("base_dynamics")
        fns: dict[str, ca.Function] = {}
        parametric = getattr(self.model, "residual_parametric", None)
        if callable(parametric) and callable(getattr(self.model, "residual_data", None)):
            fn = parametric()
            if not isinstance(fn, ca.Function) or fn.n_in() != 4 or fn.n_out() != 2:
                raise ModelError(
                    "model.residual_parametric() must return a ca.Function (t, x, u, data) -> "
                    "(mean, std)."
                )
            data = self._read_residual_data()
            if data.size != fn.size1_in(3) * fn.size2_in(3):
                raise ModelError(
                    f"model.residual_data() has {data.size} values but residual_parametric() "
                    f"takes {fn.size1_in(3) * fn.size2_in(3)}."
                )
            self._parametric, self._has_mean, self._has_std = True, True, True
            n_r = int(fn.size1_out(1)) * int(fn.size2_out(1))
        else:
            for attr in ("residual_std", "residual_mean"):
                factory = getattr(self.model, attr, None)
                if callable(factory):
                    fn = factory()
                    if not isinstance(fn, ca.Function) or fn.n_in() != 3:
                        raise ModelError(f"model.{attr}() must return a ca.Function of (t, x, u).")
                    fns[attr] = fn
            self._has_mean, self._has_std = "residual_mean" in fns, "residual_std" in fns
            ref = fns.get("residual_std", fns.get("residual_mean"))
            n_r = 0 if ref is None else int(ref.size1_out(0)) * int(ref.size2_out(0))
        # "linearized" applies to hybrid models; a purely mechanistic model has nothing to
        # linearise and is solved exactly
        self._linearized = self.config.residual == "linearized" and self._has_mean
        if self._linearized and base is None:
            raise ConfigError(
                f"{self.config.source} [mpc] residual = 'linearized' needs the model's "
                "base_dynamics() (mechanistic part) as well; add it or use residual = 'exact'."
            )
        if not (self._has_mean or self._has_std):
            return
        names = tuple(getattr(self.model, "residual_names", ()) or ())
        if not names:
            names = tuple(f"residual_{i}" for i in range(n_r))
        if len(names) != n_r:
            raise ModelError(f"residual_names {names} do not match {n_r} residual outputs.")
        map_factory = getattr(self.model, "residual_state_map", None)
        map_fn = map_factory() if callable(map_factory) else self._derive_state_map(names)
        self.residual_names, self._map_fn, self._base_fn = names, map_fn, base
        if self._parametric:
            self._res_fn, self._res_data = fn, data
        else:
            self._res_fn = self._legacy_residual(fns, n_r)
        # read by _build: the margins of the hard bounds exist when the spread is propagated
        self._std_fn = self._res_fn if self._has_std else None

    def _read_residual_data(self) -> FloatArray:
        reader: Any = self.model
        data: FloatArray = np.asarray(reader.residual_data(), dtype=np.float64).reshape(-1)
        if not np.all(np.isfinite(data)):
            raise ModelError("model.residual_data() holds NaN or inf values.")
        return data

    def _legacy_residual(self, fns: Mapping[str, ca.Function], n_r: int) -> ca.Function:
        """``(t, x, u, data[0]) -> (mean, std)`` from a model's (t, x, u) functions (what it
        lacks is zero)."""
        t = ca.MX.sym("t")
        x = ca.MX.sym("x", self.nx)
        u = ca.MX.sym("u", self.nu)
        data = ca.MX.sym("data", 0)
        outs = []
        for attr in ("residual_mean", "residual_std"):
            fn = fns.get(attr)
            outs.append(ca.vec(fn(t, x, u)) if fn is not None else ca.MX.zeros(n_r, 1))
        return ca.Function(
            "residual", [t, x, u, data], outs, ["t", "x", "u", "data"], ["mean", "std"]
        )

    def _derive_state_map(self, names: tuple[str, ...]) -> ca.Function:
        """d xdot / d rate for the residual rates, from the model's mass balances."""
        model: Any = self.model
        rate_names = tuple(getattr(model, "rate_names", ()))
        if not hasattr(model, "balances") or any(r not in rate_names for r in names):
            raise ModelError(
                "the model has residual_std() but neither residual_state_map() nor mass "
                f"balances over rates {names}; add residual_state_map()."
            )
        t = ca.SX.sym("t")
        x = ca.SX.sym("x", self.nx)
        u = ca.SX.sym("u", self.nu)
        r = ca.SX.sym("r", len(rate_names))
        rd = {k: r[i] for i, k in enumerate(rate_names)}
        xs = [x[i] for i in range(self.nx)]
        us = [u[i] for i in range(self.nu)]
        xdot = ca.vertcat(*model.balances(t, xs, us, rd, model.parameters, CASADI_OPS))
        idx = [rate_names.index(k) for k in names]
        jac = ca.jacobian(xdot, ca.vertcat(*[r[i] for i in idx]))
        return ca.Function("residual_state_map", [t, x, u], [jac], ["t", "x", "u"], ["G"])

    # ------------------------------------------------------------------ public
    @property
    def n_variables(self) -> int:
        """Number of NLP decision variables."""
        return self._nw

    @property
    def n_constraints(self) -> int:
        return self._ng

    def reset(self) -> None:
        """Forget the previous solution (next step starts cold)."""
        self._plan = None

    def simulate(self, x0: FloatArray, t0: float, inputs: FloatArray) -> FloatArray:
        """Prediction of the model over ``len(inputs)`` steps of ``step_h``: (n+1, nx)."""
        out = [np.asarray(x0, dtype=float).reshape(-1)]
        for k, uk in enumerate(np.atleast_2d(inputs)):
            xk = self._sim_fn(t0 + k * self.config.step_h, out[-1], uk, self._pvals)
            out.append(np.asarray(xk, dtype=float).reshape(-1))
        return np.array(out)

    def step(
        self,
        x0: Mapping[str, float] | Sequence[float] | FloatArray,
        t: float,
        u_prev: Mapping[str, float] | Sequence[float] | FloatArray,
        *,
        references: Mapping[str, float | Sequence[float]] | None = None,
        harvest_time: float | None = None,
        model_parameters: Mapping[str, float] | None = None,
    ) -> MPCResult:
        """Solve the MPC problem from state ``x0`` at culture age ``t`` (h).

        Args:
            x0: state estimate (name -> value, or a vector in ``state_names`` order).
            t: culture age, h.
            u_prev: inputs applied over the last period (rate limits count from these).
            references: tracking references overriding the tuning (a value, or N+1 values).
            harvest_time: culture age of the harvest, h (default: the tuning's, for
                dose-by-date; none otherwise); the horizon shrinks to it.
            model_parameters: values of the MPC's ``model_parameters`` for this step
                (missing names keep their nominal values).
        Returns:
            :class:`MPCResult`; on solver failure the move of the ``on_failure`` policy.
        Raises:
            SolverFailedError: only with ``on_failure = "raise"``.
        """
        c = self.config
        x = self._vector(x0, self.state_names, "state")
        up = self._vector(u_prev, self.input_names, "input")
        self._pvals = self._parameter_vector(model_parameters)
        n, h = self.horizon, c.step_h
        times = t + h * np.arange(n + 1, dtype=np.float64)
        if not (np.all(np.isfinite(x)) and np.all(np.isfinite(up)) and math.isfinite(t)):
            return self._fallback(t, up, "non-finite state, input or time", "not solved", 0, 0.0)
        harvest = harvest_time
        if harvest is None and c.objective == "dose-by-date":
            harvest = c.dose.harvest_time
        active = n
        if harvest is not None:
            active = int(min(max(math.ceil((harvest - t) / h - 1e-6), 1), n))
        mask = np.zeros(n)
        mask[:active] = 1.0
        term = np.zeros(n)
        term[active - 1] = 1.0
        dose_target, overshoot_active = 1.0, 0.0
        if c.objective == "dose-by-date":
            base = float(c.dose.dose_cells or 0.0) * (1.0 + c.dose.margin)
            to_go = max(float(harvest or 0.0) - times[active], 0.0)
            rate = c.dose.reference_growth_rate * self._growth_scale()
            dose_target = base * math.exp(-rate * to_go)
            # the overshoot penalty holds at the harvest only, not on the discounted target
            overshoot_active = 1.0 if to_go <= 1e-9 else 0.0
        refs = self._references(references)
        guess_states, guess_inputs, lam = self._initial_guess(x, t, up)
        rate_std, state_std = self._uncertainty(guess_states, guess_inputs, times)
        tight = (c.kappa * state_std[1:, :]).T  # (nx, N)
        lin = self._linearisation(guess_states, guess_inputs, times)
        p = self._p_layout.pack(
            {
                "x0": x,
                "u_prev": up,
                "t0": t,
                "mask": mask,
                "terminal": term,
                "dose_target": dose_target,
                "reference": refs,
                "tightening": tight,
                "residual_linearisation": lin,
                "model_parameters": self._pvals,
                "overshoot_active": overshoot_active,
            }
        )
        # (the structured NLP has no recovery slacks: their guess is made when needed)
        w0 = self._pack(
            guess_states, guess_inputs, x, dose_target, term, violations=not self._structured
        )

        # recovery mode: a state already beyond a hard limit makes the strict problem
        # infeasible; its limits become exact-penalty soft constraints (always feasible)
        beyond = self.beyond_hard_limits(x) if self._hards else []
        recovery = bool(beyond)
        if recovery:
            log.warning(
                "MPC t=%.2f h: state beyond hard limit(s) %s: recovery mode", t, ", ".join(beyond)
            )

        t_start = time.perf_counter()
        iterations = 0
        # (solver, warm start, hard limits relaxed, structured NLP)
        attempts: list[tuple[Any, bool, bool, bool]] = []
        if self._structured and not recovery:
            attempts.append((self._solver_fast, True, False, True))
            if c.solver.fallback == "ipopt":
                # IPOPT from the same initial guess, cold (strict limits); then the relaxed
                # retry. (A warm IPOPT restart from the SQP's multipliers was slower on the
                # hybrid problem at N = 3000: p95 11 s against 6-7 s.)
                attempts.append((self._solver_cold, False, False, False))
        else:
            if lam is not None and c.solver.warm_start and not recovery:
                attempts.append((self._solver_warm, True, False, False))
            attempts.append((self._solver_cold, False, recovery, False))
        if not recovery and self._hards and (not self._structured or c.solver.fallback != "none"):
            # the strict problem may be infeasible from inside the limits too (a state that
            # cannot be stopped in time): the last attempt relaxes the hard limits
            attempts.append((self._solver_cold, False, True, False))
        status = "not solved"
        sol: Any = None
        accepted = False
        structured = False
        for solver, warm, relaxed, structured in attempts:
            if sol is not None and (not warm or self._structured):
                # a retry must not push the step beyond the CPU budget
                if time.perf_counter() - t_start > 0.5 * c.solver.max_cpu_time_s:
                    break
            kwargs: dict[str, Any] = {"p": p}
            if structured:
                lbx, ubx = self._fast_bounds(x, active)
                nf = self._n_fast
                kwargs |= {
                    "x0": w0[:nf],
                    "lbx": lbx,
                    "ubx": ubx,
                    "lbg": self._lbg_fast,
                    "ubg": self._ubg_fast,
                }
                if lam is not None:
                    lam_x0, lam_g0 = self._to_structured_duals(lam[0], lam[1])
                    kwargs["lam_x0"], kwargs["lam_g0"] = lam_x0, lam_g0
            else:
                if self._structured:
                    w0 = self._pack(guess_states, guess_inputs, x, dose_target, term)
                kwargs |= {
                    "x0": w0,
                    "lbx": self._lbw,
                    "ubx": self._ubw_recovery if relaxed else self._ubw,
                    "lbg": self._lbg,
                    "ubg": self._ubg,
                }
                if warm and lam is not None:
                    kwargs["lam_x0"], kwargs["lam_g0"] = lam[0], lam[1]
            sol = solver(**kwargs)
            stats = solver.stats()
            status = str(stats.get("return_status", "unknown"))
            iterations += int(stats.get("iter_count", 0))
            accepted = self._accept(stats, sol, sqp=structured)
            recovery = relaxed
            if accepted:
                break
            log.info(
                "MPC t=%.2f h: %s%s solve failed (%s)",
                t,
                "SQP" if structured else ("warm" if warm else "cold"),
                " recovery" if relaxed else "",
                status,
            )
        elapsed = time.perf_counter() - t_start
        if not accepted:
            return self._fallback(t, up, f"solver status {status}", status, iterations, elapsed)

        wopt = np.asarray(sol["x"], dtype=float).reshape(-1)
        lam_x = np.asarray(sol["lam_x"], dtype=float).reshape(-1)
        lam_g = np.asarray(sol["lam_g"], dtype=float).reshape(-1)
        if structured:  # embedded in the full NLP's layout (recovery slacks 0)
            wopt = np.concatenate([wopt, np.zeros(self._nw - wopt.size)])
            lam_x, lam_g = self._to_full_duals(lam_x, lam_g)
        states, inputs, slack, sdose = self._unpack(wopt)
        rec = self._w_layout.unpack(wopt)["recovery_slacks"]
        self._plan = _Plan(t, wopt, lam_x, lam_g, states, inputs)
        move = self._project(inputs[0], up)
        slacks = {
            s.label: float(np.max(slack[j]) * self.state_scale[s.state]) if n else 0.0
            for j, s in enumerate(self._softs)
        }
        if c.objective == "dose-by-date":
            slacks["dose_shortfall"] = sdose
        if recovery:
            for j, hd in enumerate(self._hards):
                slacks[hd.label] = float(np.max(rec[j]) * self.state_scale[hd.state]) if n else 0.0
        return MPCResult(
            u=dict(zip(self.input_names, (float(v) for v in move), strict=True)),
            success=True,
            status=status,
            iterations=iterations,
            solve_time_s=elapsed,
            time_h=t,
            horizon_steps=active,
            state_names=self.state_names,
            input_names=self.input_names,
            residual_names=self.residual_names,
            predicted_times=times,
            predicted_states=states,
            predicted_inputs=inputs,
            predicted_std=rate_std,
            predicted_state_std=state_std,
            cost=float(sol["f"]),
            slacks=slacks,
            recovery=recovery,
            solver="sqpmethod" if structured else "ipopt",
        )

    # ------------------------------------------------------------------ helpers
    def _growth_scale(self) -> float:
        """This step's value of ``[dose] reference_growth_parameter`` over its nominal one
        (1 without one), within [0.25, 4]."""
        i = self._growth_index
        if i is None:
            return 1.0
        return min(max(float(self._pvals[i]) / float(self._nominal_parameters[i]), 0.25), 4.0)

    def _parameter_vector(self, values: Mapping[str, float] | None) -> FloatArray:
        out = self._nominal_parameters.copy()
        for name, value in (values or {}).items():
            if name not in self.parameter_names:
                raise ModelError(
                    f"model parameter {name!r} is not one of the MPC's model_parameters "
                    f"{list(self.parameter_names)}; declare it when building the MPC."
                )
            v = float(value)
            if not math.isfinite(v):
                raise ModelError(f"model parameter {name} = {value!r} is not finite.")
            out[self.parameter_names.index(name)] = v
        return out

    def _vector(
        self,
        value: Mapping[str, float] | Sequence[float] | FloatArray,
        names: Sequence[str],
        kind: str,
    ) -> FloatArray:
        if isinstance(value, Mapping):
            unknown = [k for k in value if k not in names]
            missing = [k for k in names if k not in value]
            if unknown or missing:
                raise ModelError(
                    f"MPC: {kind} mapping has unknown {unknown} / missing {missing}; "
                    f"expected {list(names)}."
                )
            return np.array([float(value[k]) for k in names])
        arr = np.asarray(value, dtype=float).reshape(-1)
        if arr.size != len(names):
            raise ModelError(
                f"MPC: expected {len(names)} {kind} values {list(names)}, got {arr.size}."
            )
        return arr

    def _references(self, references: Mapping[str, float | Sequence[float]] | None) -> FloatArray:
        n = self.horizon
        out = np.zeros((len(self.tracked), n + 1))
        extra = dict(references or {})
        unknown = [k for k in extra if k not in self.tracked]
        if unknown:
            raise ConfigError(
                f"MPC: references for {unknown}, but only {list(self.tracked)} are tracked "
                f"({self.config.source} [tracking])."
            )
        for j, name in enumerate(self.tracked):
            value = extra.get(name, self.config.tracking[name].reference)
            arr = np.asarray(value, dtype=float).reshape(-1)
            if arr.size not in (1, n + 1):
                raise ModelError(f"MPC: reference of {name} needs 1 or {n + 1} values.")
            out[j, :] = arr
        return out

    def _initial_guess(
        self, x: FloatArray, t: float, up: FloatArray
    ) -> tuple[FloatArray, FloatArray, tuple[FloatArray, FloatArray] | None]:
        n, h = self.horizon, self.config.step_h
        plan = self._plan
        if plan is not None and self.config.solver.warm_start:
            # previous solution, shifted to the new time grid by interpolation
            shift = round((t - plan.time_h) / h)
            if 0 <= shift <= n and abs((t - plan.time_h) / h - shift) < 1e-9:
                # on the old grid (sample period = step): a shift of whole rows, the same
                # as the interpolation below (which holds the last value), but cheaper
                keep = n + 1 - shift
                states = np.empty_like(plan.states)
                states[:keep] = plan.states[shift:]
                states[keep:] = plan.states[-1]
                states[0] = x
                idx = np.minimum(np.arange(n) + shift, n - 1)
            else:
                old_t = plan.time_h + h * np.arange(n + 1)
                new_t = t + h * np.arange(n + 1)
                states = np.column_stack(
                    [np.interp(new_t, old_t, plan.states[:, i]) for i in range(self.nx)]
                )
                states[0] = x
                idx = np.clip(np.floor((new_t[:n] - plan.time_h) / h + 1e-9).astype(int), 0, n - 1)
            inputs = plan.inputs[idx]
            if 0 <= shift < n:
                lam_x = _shift_blocks(plan.lam_x, self._w_blocks, shift)
                lam_g = _shift_blocks(plan.lam_g, self._g_blocks, shift)
                return states, inputs, (lam_x, lam_g)
            return states, inputs, None
        u0 = np.clip(up, self.u_low, self.u_high)
        inputs = np.tile(u0, (n, 1))
        states = self.simulate(x, t, inputs)
        if not np.all(np.isfinite(states)):
            states = np.tile(x, (n + 1, 1))
        return states, inputs, None

    def _uncertainty(
        self, states: FloatArray, inputs: FloatArray, times: FloatArray
    ) -> tuple[FloatArray, FloatArray]:
        """Zero-order propagation of the residual std along a given plan (one evaluation of
        the per-step function, which also yields the linearisation for
        :meth:`_linearisation` on the same plan).

        Returns (rate std (N, n_r), state std (N+1, nx)).
        """
        n = self.horizon
        if not self._has_std or self._map_fn is None or self.config.kappa <= 0:
            return np.zeros((n, len(self.residual_names))), np.zeros((n + 1, self.nx))
        std, state_std, _ = self._per_step(states, inputs, times)
        return std, state_std

    def _linearisation(
        self, states: FloatArray, inputs: FloatArray, times: FloatArray
    ) -> FloatArray:
        """Residual mean, its state Jacobian and the state along a plan: (nq, N)."""
        n = self.horizon
        if not self._linearized or self._lin_fn is None:
            return np.zeros((0, n))
        return self._per_step(states, inputs, times)[2]

    def _per_step(
        self, states: FloatArray, inputs: FloatArray, times: FloatArray
    ) -> tuple[FloatArray, FloatArray, FloatArray]:
        """The per-step function on a plan, evaluated once per plan (the result is kept for
        the second caller of the same step)."""
        n = self.horizon
        cached = getattr(self, "_per_step_cache", None)
        if (
            cached is not None
            and cached[0] is self._res_data
            and cached[6] is self._lin_fn
            and np.array_equal(cached[1], states)
            and np.array_equal(cached[2], inputs)
            and np.array_equal(cached[3], times)
            and np.array_equal(cached[4], self._pvals)
        ):
            return cached[5]
        fn = self._lin_fn
        if fn is None:  # guarded by the callers
            raise ModelError("no residual per-step function")
        # zero-copy evaluation: the arguments are read in place (a numpy argument of a
        # plain call is converted element by element, milliseconds for a large GP's data)
        buffer = getattr(self, "_per_step_buffer", None)
        if buffer is None or buffer[0] is not fn:
            buffer = (fn, *fn.buffer())
            self._per_step_buffer = buffer
        # (CasADi's stub wants (i, buffer, size); its typemap takes the size from the buffer)
        buf: Any = buffer[1]
        evaluate = buffer[2]
        args = [
            np.ascontiguousarray(times[:n], dtype=np.float64),
            np.ascontiguousarray(states[:n], dtype=np.float64),  # (N, nx) = column-major x
            np.ascontiguousarray(inputs, dtype=np.float64),
            np.ascontiguousarray(self._pvals, dtype=np.float64),
            np.ascontiguousarray(self._res_data, dtype=np.float64),
        ]
        results = [np.zeros(fn.numel_out(i)) for i in range(3)]
        for i, arg in enumerate(args):
            if arg.size != fn.numel_in(i):
                raise ModelError(f"residual per-step input {i}: {arg.size} != {fn.numel_in(i)}")
            buf.set_arg(i, arg.data)
        for i, res in enumerate(results):
            buf.set_res(i, res.data)
        evaluate()
        std, state_std, q = results
        n_r = fn.size1_out(0)
        out = (
            np.nan_to_num(std.reshape(n, n_r)),  # column-major (n_r, N) = (N, n_r) rows
            np.nan_to_num(state_std.reshape(n + 1, self.nx)),
            np.nan_to_num(q.reshape(n, -1).T) if q.size else np.zeros((0, n)),
        )
        self._per_step_cache = (
            self._res_data,
            states.copy(),
            inputs.copy(),
            times.copy(),
            self._pvals.copy(),
            out,
            fn,
        )
        return out

    def _pack(
        self,
        states: FloatArray,
        inputs: FloatArray,
        x: FloatArray,
        target: float,
        term: FloatArray,
        *,
        violations: bool = True,
    ) -> FloatArray:
        """Initial guess of the decision vector from states (N+1, nx) and inputs (N, nu)."""
        dose_slack = np.zeros(0)
        if self.config.objective == "dose-by-date":
            c = self.config.dose
            ic, iv = self.state_names.index(c.cells_state), self.state_names.index(c.volume_state)
            cells = float(np.sum(term * states[1:, ic] * states[1:, iv]))
            dose_slack = np.array([max(0.0, 1.0 - cells / target)])
        return self._w_layout.pack(
            {
                "states": (states / self.state_scale).T,
                "inputs": (inputs / self.input_scale).T,
                "slacks": np.zeros(self._w_layout["slacks"].shape),
                "dose_slack": dose_slack,
                "recovery_slacks": (
                    self._violations(states)
                    if violations
                    else np.zeros(self._w_layout["recovery_slacks"].shape)
                ),
            }
        )

    def _violations(self, states: FloatArray) -> FloatArray:
        """(n_hard, N) scaled violations of the hard state limits along states (N+1, nx)."""
        out = np.zeros((len(self._hards), self.horizon))
        for j, hd in enumerate(self._hards):
            viol = hd.sign * (states[1:, hd.state] - hd.limit) / self.state_scale[hd.state]
            out[j] = np.maximum(np.nan_to_num(viol), 0.0)
        return out

    def beyond_hard_limits(self, x: FloatArray) -> list[str]:
        """Labels of the hard state limits the state vector ``x`` is already beyond."""
        out = []
        for hd in self._hards:
            viol = hd.sign * (float(x[hd.state]) - hd.limit) / self.state_scale[hd.state]
            if viol > _RECOVERY_TOLERANCE:
                out.append(hd.label.removesuffix("_recovery"))
        return out

    def _unpack(self, w: FloatArray) -> tuple[FloatArray, FloatArray, FloatArray, float]:
        """States (N+1, nx) and inputs (N, nu) in physical units, slacks (n_soft, N) and the
        dose shortfall (0 without one) of a decision vector."""
        parts = self._w_layout.unpack(w)
        states = np.ascontiguousarray(parts["states"].T) * self.state_scale
        inputs = np.ascontiguousarray(parts["inputs"].T) * self.input_scale
        dose = parts["dose_slack"]
        sdose = float(dose[0, 0]) if dose.size else 0.0
        return states, inputs, parts["slacks"], sdose

    def _accept(self, stats: Mapping[str, Any], sol: Mapping[str, Any], *, sqp: bool) -> bool:
        status = str(stats.get("return_status", ""))
        ok = status in ACCEPTED_STATUSES
        if sqp:
            ok = bool(stats.get("success", False))
        if not ok:
            return False
        w = np.asarray(sol["x"], dtype=float)
        return bool(np.all(np.isfinite(w)) and math.isfinite(float(sol["f"])))

    def _project(self, u: FloatArray, up: FloatArray) -> FloatArray:
        """Clip a move into the input bounds and the rate limits around ``up``."""
        span = self.rate_limits * self.config.sample_period_h
        prev = np.clip(up, self.u_low, self.u_high)
        out = np.clip(u, prev - span, prev + span)
        out = np.clip(out, self.u_low, self.u_high)
        if np.any(np.abs(out - u) > 1e-6 * np.maximum(1.0, np.abs(u))):
            log.debug("MPC: move %s projected to %s", u, out)
        return out

    def _fallback(
        self, t: float, up: FloatArray, reason: str, status: str, iterations: int, elapsed: float
    ) -> MPCResult:
        policy = self.config.on_failure
        if policy == "raise":
            raise SolverFailedError(f"MPC at t={t:.3f} h: {reason}; no move applied.", status)
        used, u = "hold", up.copy()
        n, h = self.horizon, self.config.step_h
        plan = self._plan
        if policy == "shift" and plan is not None:
            k = math.floor((t - plan.time_h) / h + 1e-9)
            if 0 <= k < n:
                used, u = "shift", plan.inputs[k].copy()
        elif policy == "recipe" and self.recipe is not None:
            rec = self.recipe(t)
            used, u = (
                "recipe",
                np.array([float(rec.get(k, up[i])) for i, k in enumerate(self.input_names)]),
            )
        if not np.all(np.isfinite(u)):
            used, u = "hold", up.copy()
        move = self._project(u, np.nan_to_num(up))
        log.warning("MPC t=%.2f h: %s; applying the %s move (policy %s)", t, reason, used, policy)
        nan_x = np.full((n + 1, self.nx), np.nan)
        return MPCResult(
            u=dict(zip(self.input_names, (float(v) for v in move), strict=True)),
            success=False,
            status=status,
            iterations=iterations,
            solve_time_s=elapsed,
            time_h=t,
            horizon_steps=0,
            state_names=self.state_names,
            input_names=self.input_names,
            residual_names=self.residual_names,
            predicted_times=t + h * np.arange(n + 1, dtype=np.float64),
            predicted_states=nan_x,
            predicted_inputs=np.full((n, self.nu), np.nan),
            predicted_std=np.zeros((n, len(self.residual_names))),
            predicted_state_std=np.zeros((n + 1, self.nx)),
            cost=float("nan"),
            slacks={},
            fallback_used=used,
            fallback_reason=reason,
        )


def _shift_blocks(
    values: FloatArray, blocks: Sequence[tuple[int, int, int]], shift: int
) -> FloatArray:
    """Shift stage-ordered blocks of a vector by ``shift`` stages (last stage repeated).

    ``blocks``: (start, size, rows per stage); rows 0 means "not staged" (kept as is).
    """
    out = values.copy()
    if shift <= 0:
        return out
    for start, size, rows in blocks:
        if rows <= 0 or size <= 0:
            continue
        block = values[start : start + size].reshape(-1, rows)
        moved = np.vstack([block[shift:], np.repeat(block[-1:], min(shift, len(block)), axis=0)])
        out[start : start + size] = moved[: len(block)].reshape(-1)
    return out

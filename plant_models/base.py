"""Shared structure of the mechanistic models: variable specifications, math back-ends and
the model base class that keeps kinetic rates apart from mass balances.

A model is written once, against an ``ops`` namespace (:data:`NUMPY_OPS` or
:data:`CASADI_OPS`), so the CasADi symbolic dynamics used by the MPC and the numpy
right-hand side used by the simulator are the same equations.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from types import SimpleNamespace
from typing import Any, Generic, TypeVar

import casadi as ca
import numpy as np
import numpy.typing as npt

from plant_models.errors import ModelError

__all__ = [
    "CASADI_OPS",
    "NUMPY_OPS",
    "MechanisticModel",
    "VariableSpec",
]

FloatArray = npt.NDArray[np.float64]


def _np_logistic(z: Any) -> Any:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _ca_logistic(z: Any) -> Any:
    return 0.5 * (1.0 + ca.tanh(0.5 * z))


#: numpy back-end (fast, for simulation and tests).
NUMPY_OPS = SimpleNamespace(
    exp=np.exp,
    log=np.log,
    sqrt=np.sqrt,
    tanh=np.tanh,
    fmax=np.maximum,
    fmin=np.minimum,
    logistic=_np_logistic,
    vertcat=lambda *a: np.array(a, dtype=float),
)
#: CasADi back-end (symbolic SX/MX, for the optimiser and estimator).
CASADI_OPS = SimpleNamespace(
    exp=ca.exp,
    log=ca.log,
    sqrt=ca.sqrt,
    tanh=ca.tanh,
    fmax=ca.fmax,
    fmin=ca.fmin,
    logistic=_ca_logistic,
    vertcat=ca.vertcat,
)


def rk4(rhs: Any, t: Any, x: Any, step_h: Any, substeps: int = 4) -> Any:
    """``substeps`` classical Runge-Kutta steps of ``dx/dt = rhs(t, x)`` over ``step_h``
    (symbolic or numeric ``t``, ``x``); the state after the step."""
    h = step_h / substeps
    xk, tk = x, t
    for _ in range(substeps):
        k1 = rhs(tk, xk)
        k2 = rhs(tk + h / 2, xk + h / 2 * k1)
        k3 = rhs(tk + h / 2, xk + h / 2 * k2)
        k4 = rhs(tk + h, xk + h * k3)
        xk = xk + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        tk = tk + h
    return xk


@dataclasses.dataclass(frozen=True)
class VariableSpec:
    """A state, input or rate: full-word name, canonical unit and physical range."""

    name: str
    unit: str
    description: str
    low: float = 0.0
    high: float = float("inf")


P = TypeVar("P")


class MechanisticModel(Generic[P]):
    """Base of the mechanistic models.

    Subclasses define ``name``, ``states``, ``inputs``, ``rate_specs`` and implement
    :meth:`rates` (kinetics: specific rates from state and inputs) and :meth:`balances`
    (mass balances given the rates). State functions follow the ``(t, x, u, ...)`` order.

    ``p`` in :meth:`rates` / :meth:`balances` is any object with the parameter attributes:
    the frozen parameter dataclass, or a namespace in which some parameters are CasADi
    symbols (see :meth:`dynamics` ``symbolic_parameters``).
    """

    name: str = ""
    states: tuple[VariableSpec, ...] = ()
    inputs: tuple[VariableSpec, ...] = ()
    rate_specs: tuple[VariableSpec, ...] = ()

    def __init__(self, parameters: P) -> None:
        self.parameters = parameters

    # -- names -------------------------------------------------------------------------
    @property
    def state_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.states)

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.inputs)

    @property
    def rate_names(self) -> tuple[str, ...]:
        return tuple(s.name for s in self.rate_specs)

    @property
    def nx(self) -> int:
        return len(self.states)

    @property
    def nu(self) -> int:
        return len(self.inputs)

    # -- the equations (subclasses) ----------------------------------------------------
    def rates(self, t: Any, x: Sequence[Any], u: Sequence[Any], p: Any, ops: Any) -> dict[str, Any]:
        """Specific kinetic rates, keyed by ``rate_names``."""
        raise NotImplementedError  # abstract: every concrete model overrides it

    def balances(
        self, t: Any, x: Sequence[Any], u: Sequence[Any], r: Mapping[str, Any], p: Any, ops: Any
    ) -> list[Any]:
        """Time derivatives of the states, in ``state_names`` order, given rates ``r``."""
        raise NotImplementedError  # abstract: every concrete model overrides it

    # -- numpy evaluation --------------------------------------------------------------
    def rhs(self, t: float, x: FloatArray, u: FloatArray, p: Any = None) -> FloatArray:
        """dx/dt with numpy. Shapes: x (nx,), u (nu,) -> (nx,)."""
        par = self.parameters if p is None else p
        xs = [float(v) for v in np.asarray(x, dtype=float).reshape(-1)]
        us = [float(v) for v in np.asarray(u, dtype=float).reshape(-1)]
        self._check_sizes(xs, us)
        r = self.rates(t, xs, us, par, NUMPY_OPS)
        return np.array(self.balances(t, xs, us, r, par, NUMPY_OPS), dtype=float)

    def rates_numpy(
        self, t: float, x: FloatArray, u: FloatArray, p: Any = None
    ) -> dict[str, float]:
        """Kinetic rates with numpy, keyed by ``rate_names``."""
        par = self.parameters if p is None else p
        xs = [float(v) for v in np.asarray(x, dtype=float).reshape(-1)]
        us = [float(v) for v in np.asarray(u, dtype=float).reshape(-1)]
        self._check_sizes(xs, us)
        return {k: float(v) for k, v in self.rates(t, xs, us, par, NUMPY_OPS).items()}

    def _check_sizes(self, x: Sequence[float], u: Sequence[float]) -> None:
        if len(x) != self.nx or len(u) != self.nu:
            raise ModelError(
                f"{self.name}: expected {self.nx} states {self.state_names} and {self.nu} inputs "
                f"{self.input_names}, got {len(x)} and {len(u)}."
            )

    # -- CasADi ------------------------------------------------------------------------
    def symbolic_parameters(self, names: Sequence[str]) -> tuple[Any, ca.SX]:
        """A parameter namespace in which ``names`` are SX symbols (others stay numbers)."""
        fields = {f.name for f in dataclasses.fields(self.parameters)}  # type: ignore[arg-type]
        unknown = [n for n in names if n not in fields]
        if unknown:
            raise ModelError(
                f"{self.name}: unknown parameter(s) {unknown}; known: {sorted(fields)}"
            )
        psym = ca.SX.sym("p", len(names))
        values = dataclasses.asdict(self.parameters)  # type: ignore[call-overload]
        for i, n in enumerate(names):
            values[n] = psym[i]
        return SimpleNamespace(**values), psym

    def dynamics(self, symbolic_parameters: Sequence[str] = ()) -> ca.Function:
        """CasADi function ``(t, x, u[, p]) -> (xdot, rates)`` with named inputs/outputs.

        Args:
            symbolic_parameters: parameter names to expose as the input ``p`` (in order),
                e.g. for estimation of a patient-specific factor; others are constants.
        """
        t = ca.SX.sym("t")
        x = ca.SX.sym("x", self.nx)
        u = ca.SX.sym("u", self.nu)
        xs = [x[i] for i in range(self.nx)]
        us = [u[i] for i in range(self.nu)]
        if symbolic_parameters:
            par, psym = self.symbolic_parameters(symbolic_parameters)
        else:
            par, psym = self.parameters, None
        r = self.rates(t, xs, us, par, CASADI_OPS)
        xdot = ca.vertcat(*self.balances(t, xs, us, r, par, CASADI_OPS))
        rv = ca.vertcat(*[r[k] for k in self.rate_names])
        ins, names = [t, x, u], ["t", "x", "u"]
        if psym is not None:
            ins.append(psym)
            names.append("p")
        return ca.Function(f"{self.name}_dynamics", ins, [xdot, rv], names, ["xdot", "rates"])

    # -- helpers -----------------------------------------------------------------------
    def state_vector(self, values: Mapping[str, float]) -> FloatArray:
        """Order a name->value mapping into a state vector (all states required)."""
        return self._vector(values, self.state_names, "state")

    def input_vector(self, values: Mapping[str, float]) -> FloatArray:
        """Order a name->value mapping into an input vector (all inputs required)."""
        return self._vector(values, self.input_names, "input")

    def _vector(self, values: Mapping[str, float], names: Sequence[str], kind: str) -> FloatArray:
        unknown = [k for k in values if k not in names]
        missing = [k for k in names if k not in values]
        if unknown or missing:
            raise ModelError(
                f"{self.name}: {kind} mapping has unknown {unknown} / missing {missing}; "
                f"expected {list(names)}."
            )
        return np.array([float(values[n]) for n in names], dtype=float)

    def input_bounds(self) -> tuple[FloatArray, FloatArray]:
        """(lower, upper) bounds of the inputs."""
        return (np.array([s.low for s in self.inputs]), np.array([s.high for s in self.inputs]))

"""The virtual bioreactor: the truth plant that every controller is tested against."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.integrate import solve_ivp

from plant_models.base import MechanisticModel
from plant_models.errors import IntegrationError, ModelError
from plant_models.process import ProcessPlugin, get_process
from sim.patients import VirtualPatient
from sim.sensors import Measurement, PlantSensors, SensorSpec, default_sensor_spec

__all__ = ["VirtualBioreactor", "clamp_inputs"]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: Integrators tried in turn: LSODA switches between stiff and non-stiff methods; BDF and
#: Radau are the stiff fall-backs.
_METHODS = ("LSODA", "BDF", "Radau")


def clamp_inputs(
    inputs: Mapping[str, float], bounds: Mapping[str, tuple[float, float]], *, warn: bool = True
) -> tuple[dict[str, float], int]:
    """Inputs clamped to their (low, high) bounds, as a plant's own controllers would: a
    missing input is 0 (then clamped), a non-finite one its lower bound. Returns the
    clamped inputs and how many were changed (each logged as a warning when ``warn``).

    Raises:
        ModelError: an input the plant does not take.
    """
    unknown = [k for k in inputs if k not in bounds]
    if unknown:
        raise ModelError(f"unknown input(s) {unknown}; the plant takes {sorted(bounds)}")
    out: dict[str, float] = {}
    changed = 0
    for name, (low, high) in bounds.items():
        value = float(inputs.get(name, 0.0))
        if not math.isfinite(value):
            log.warning("plant: non-finite %s=%r replaced by %g", name, value, low)
            value = low
        clamped = min(max(value, low), high)
        if clamped != value:
            changed += 1
            if warn:
                log.warning("plant: %s=%g clamped to [%g, %g]", name, value, low, high)
        out[name] = clamped
    return out, changed


class VirtualBioreactor:
    """Truth plant of one patient's batch, with online probes and delayed offline assays.

    Use :meth:`for_process` to build one. :meth:`step` applies inputs (clamped to
    the process bounds, as the plant's own controllers would) for ``dt_h`` hours and returns
    the measurements that became available during that interval.
    """

    def __init__(
        self,
        model: MechanisticModel[Any],
        process: Any,
        patient: VirtualPatient,
        sensors: SensorSpec,
        *,
        plugin: ProcessPlugin,
        seed: int = 0,
    ) -> None:
        self.model = model
        self.process = process
        self.patient = patient
        self.sensors = sensors
        self.plugin = plugin
        self.kind = plugin.name
        self.readings = PlantSensors(sensors, seed)
        self.rng = self.readings.rng
        self.probe_gains = self.readings.probe_gains
        self.time_h = 0.0
        init = model.initial_state(viability=patient.initial_viability)  # type: ignore[attr-defined]
        self.state: FloatArray = model.state_vector(init)
        self.initial_state: FloatArray = self.state.copy()
        self.bounds: dict[str, tuple[float, float]] = model.operating_bounds()  # type: ignore[attr-defined]
        self.clamped_inputs = 0

    # -- constructors ------------------------------------------------------------------
    @classmethod
    def for_process(
        cls,
        name: str | ProcessPlugin,
        patient: VirtualPatient,
        *,
        process: Any = None,
        truth: Any = None,
        sensors: SensorSpec | None = None,
        seed: int = 0,
    ) -> VirtualBioreactor:
        """The truth plant of a process plug-in for one patient.

        Args:
            name: the process plug-in (or its registered name).
            process: the process specification (default: the plug-in's packaged file).
            truth: truth kinetics (default: the plug-in's packaged truth variant).
            sensors: probes and assays (default: the plug-in's).
        """
        plugin = get_process(name)
        proc = process if process is not None else plugin.load_process()[0]
        return cls(
            plugin.truth_model(patient, proc, truth),
            proc,
            patient,
            sensors or default_sensor_spec(plugin),
            plugin=plugin,
            seed=seed,
        )

    # -- truth ---------------------------------------------------------------------------
    def true_values(self) -> dict[str, float]:
        """The true states plus derived quantities (viability, total viable cells)."""
        values = dict(zip(self.model.state_names, (float(v) for v in self.state), strict=True))
        values.update(self.plugin.derived_values(values))
        return values

    @property
    def plant_id(self) -> str:
        """The patient (or batch) the plant stands for."""
        return self.patient.patient_id

    @property
    def input_names(self) -> tuple[str, ...]:
        return self.model.input_names

    def variable_units(self) -> dict[str, str]:
        """Canonical unit of every state, input and rate of the plant's model."""
        m = self.model
        return {v.name: v.unit for v in m.states + m.inputs + m.rate_specs}

    def true_rates(self, inputs: Mapping[str, float]) -> dict[str, float]:
        u = self.model.input_vector(self._clamp(inputs, count=False))
        return self.model.rates_numpy(self.time_h, self.state, u)

    # -- stepping ------------------------------------------------------------------------
    def _clamp(self, inputs: Mapping[str, float], *, count: bool = True) -> dict[str, float]:
        out, clamped = clamp_inputs(inputs, self.bounds, warn=count)
        if count:
            self.clamped_inputs += clamped
        return out

    def initial_measurements(self) -> list[Measurement]:
        """Online readings at inoculation (and the day-0 assay when it is due)."""
        return self.readings.initial(self.true_values(), self.time_h)

    def step(self, inputs: Mapping[str, float], dt_h: float) -> list[Measurement]:
        """Advance the truth by ``dt_h`` hours under piecewise-constant ``inputs``."""
        if not (dt_h > 0 and math.isfinite(dt_h)):
            raise ModelError(f"step length must be positive and finite, got {dt_h!r}")
        u = self.model.input_vector(self._clamp(inputs))

        def advance_to(t: float) -> dict[str, float]:
            self._integrate(u, self.time_h, t)
            return self.true_values()

        return self.readings.interval(self.time_h, self.time_h + dt_h, advance_to)

    def _integrate(self, u: FloatArray, t0: float, t1: float) -> None:
        if t1 <= t0:
            self.time_h = max(self.time_h, t1)
            return
        scale = np.maximum(np.abs(self.state), 1.0)
        last = "not run"
        for method in _METHODS:
            sol = solve_ivp(
                lambda t, y: self.model.rhs(t, y, u),
                (t0, t1),
                self.state,
                method=method,
                rtol=1e-7,
                atol=1e-9 * scale,
            )
            if sol.success and np.all(np.isfinite(sol.y[:, -1])):
                if method != _METHODS[0]:
                    log.info("plant: integrated %.3g-%.3g h with fall-back %s", t0, t1, method)
                # concentrations cannot go negative; integration error may leave -1e-12
                self.state = np.maximum(sol.y[:, -1], 0.0)
                self.time_h = t1
                return
            last = f"{method}: {sol.message}"
        raise IntegrationError(f"plant integration failed on [{t0}, {t1}] h ({last})")

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
from sim.sensors import Measurement, SensorSpec, default_sensor_spec, noisy

__all__ = ["VirtualBioreactor"]

log = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: Integrators tried in turn: LSODA switches between stiff and non-stiff methods; BDF and
#: Radau are the stiff fall-backs.
_METHODS = ("LSODA", "BDF", "Radau")


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
        self.rng = np.random.default_rng(np.random.SeedSequence([7919, int(seed)]))
        # probe calibration errors: their own stream, so the noise streams do not move
        cal_rng = np.random.default_rng(np.random.SeedSequence([7927, int(seed)]))
        self.probe_gains: dict[str, float] = {
            name: float(math.exp(cal_rng.normal(0.0, sd)))
            for name, sd in sensors.online_calibration_sd.items()
        }
        self.time_h = 0.0
        init = model.initial_state(viability=patient.initial_viability)  # type: ignore[attr-defined]
        self.state: FloatArray = model.state_vector(init)
        self.initial_state: FloatArray = self.state.copy()
        self.bounds: dict[str, tuple[float, float]] = model.operating_bounds()  # type: ignore[attr-defined]
        self._pending: list[Measurement] = []
        self._next_assay = sensors.assay_first
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
        unknown = [k for k in inputs if k not in self.bounds]
        if unknown:
            raise ModelError(f"unknown input(s) {unknown}; the plant takes {sorted(self.bounds)}")
        out: dict[str, float] = {}
        for name, (low, high) in self.bounds.items():
            value = float(inputs.get(name, 0.0))
            if not math.isfinite(value):
                log.warning("plant: non-finite %s=%r replaced by %g", name, value, low)
                value = low
            clamped = min(max(value, low), high)
            if count and clamped != value:
                self.clamped_inputs += 1
                log.warning("plant: %s=%g clamped to [%g, %g]", name, value, low, high)
            out[name] = clamped
        return out

    def initial_measurements(self) -> list[Measurement]:
        """Online readings at inoculation (and the day-0 assay when it is due)."""
        out = self._online(self.time_h)
        self._sample_assays(self.time_h)
        return out + self._release(self.time_h)

    def step(self, inputs: Mapping[str, float], dt_h: float) -> list[Measurement]:
        """Advance the truth by ``dt_h`` hours under piecewise-constant ``inputs``."""
        if not (dt_h > 0 and math.isfinite(dt_h)):
            raise ModelError(f"step length must be positive and finite, got {dt_h!r}")
        u = self.model.input_vector(self._clamp(inputs))
        t0, t1 = self.time_h, self.time_h + dt_h
        # assays sampled inside the interval are taken at their sample time
        while self._next_assay < t1 - 1e-9:
            if self._next_assay > t0 + 1e-9:
                self._integrate(u, self.time_h, self._next_assay)
                self._sample_assays(self._next_assay)
            elif self._next_assay <= t0 + 1e-9:
                self._sample_assays(self._next_assay)
        self._integrate(u, self.time_h, t1)
        return self._online(t1) + self._release(t1)

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

    def _online(self, t: float) -> list[Measurement]:
        truth = self.true_values()
        return [
            Measurement(
                name,
                noisy(
                    self.probe_gains.get(name, 1.0) * truth[name],
                    spec,
                    self.rng,
                    upper=1.0 if name == "viability" else math.inf,
                ),
                spec.unit,
                t,
                t,
                "online",
            )
            for name, spec in self.sensors.online.items()
        ]

    def _sample_assays(self, t: float) -> None:
        truth = self.true_values()
        arrival = t + self.sensors.assay_delay
        for name, spec in self.sensors.assays.items():
            value = noisy(
                truth[name], spec, self.rng, upper=1.0 if name == "viability" else math.inf
            )
            self._pending.append(Measurement(name, value, spec.unit, t, arrival, "assay"))
        self._next_assay = t + self.sensors.assay_interval

    def _release(self, t: float) -> list[Measurement]:
        ready = [m for m in self._pending if m.arrival_time <= t + 1e-9]
        self._pending = [m for m in self._pending if m.arrival_time > t + 1e-9]
        return ready

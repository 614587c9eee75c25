"""Sensors of the virtual plant: online probes every step and offline daily assays that
arrive hours after their sample time, carrying that sample time."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping

import numpy as np

from controller.numerics.measurements import Measurement
from plant_models.process import ProcessPlugin, SensorNoise, get_process

__all__ = ["Measurement", "NoiseSpec", "PlantSensors", "SensorSpec", "default_sensor_spec", "noisy"]


#: Gaussian noise: standard deviation ``absolute + relative * |value|`` (the process
#: plug-ins declare their probes with it).
NoiseSpec = SensorNoise


@dataclasses.dataclass(frozen=True)
class SensorSpec:
    """Which variables are measured online and by assay, with their noise and timing.

    ``online_calibration_sd`` gives online probes a calibration error that is constant
    over a batch: the probe reads ``gain * value`` (then noise), with ``ln(gain)`` drawn
    once per plant from a normal distribution of this standard deviation. A capacitance
    probe's cells-per-signal factor depends on cell size and is fitted on other batches,
    so each batch's cells sit some percent off it. Empty (the default): probes are exactly
    calibrated.
    """

    online: Mapping[str, NoiseSpec]
    assays: Mapping[str, NoiseSpec]
    assay_interval: float = 24.0
    assay_delay: float = 4.0
    assay_first: float = 0.0
    online_calibration_sd: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, sd in self.online_calibration_sd.items():
            if name not in self.online:
                raise ValueError(
                    f"online_calibration_sd: {name!r} is not an online probe "
                    f"(online: {sorted(self.online)})"
                )
            if not (math.isfinite(sd) and sd >= 0.0):
                raise ValueError(
                    f"online_calibration_sd[{name!r}] must be a finite number >= 0, got {sd!r}"
                )


def default_sensor_spec(process: str | ProcessPlugin) -> SensorSpec:
    """The process plug-in's typical probes and assays (e.g. capacitance, Raman or an
    analyser online; a daily cell count and metabolite assays)."""
    d = get_process(process).sensors
    return SensorSpec(
        online=dict(d.online),
        assays=dict(d.assays),
        assay_interval=d.assay_interval,
        assay_delay=d.assay_delay,
    )


def noisy(
    value: float, spec: NoiseSpec, rng: np.random.Generator, *, upper: float = math.inf
) -> float:
    """A noisy reading, clipped to the physical range [0, upper]."""
    sd = spec.absolute + spec.relative * abs(value)
    return float(min(max(value + rng.normal(0.0, sd), 0.0), upper))


class PlantSensors:
    """The probes and assays of one plant (virtual bioreactor, FMU or any other): noisy
    online readings at every step and assays sampled every ``assay_interval`` hours that
    arrive ``assay_delay`` hours later, carrying their sample time.

    The plant supplies its true values; this object owns the noise stream (seeded by the
    plant's ``seed``), the per-batch probe calibration gains and the assays in transit.
    """

    def __init__(self, spec: SensorSpec, seed: int = 0) -> None:
        self.spec = spec
        self.rng = np.random.default_rng(np.random.SeedSequence([7919, int(seed)]))
        # probe calibration errors: their own stream, so the noise streams do not move
        cal_rng = np.random.default_rng(np.random.SeedSequence([7927, int(seed)]))
        self.probe_gains: dict[str, float] = {
            name: float(math.exp(cal_rng.normal(0.0, sd)))
            for name, sd in spec.online_calibration_sd.items()
        }
        self.pending: list[Measurement] = []
        self.next_assay = spec.assay_first

    def initial(self, truth: Mapping[str, float], t: float) -> list[Measurement]:
        """Online readings at inoculation (and the assay when one is due then)."""
        out = self.online(truth, t)
        self.sample_assays(truth, t)
        return out + self.release(t)

    def interval(
        self, t0: float, t1: float, advance_to: Callable[[float], Mapping[str, float]]
    ) -> list[Measurement]:
        """Measurements of one step from ``t0`` to ``t1`` h. ``advance_to(t)`` moves the plant
        on to time ``t`` (no further than it is when ``t`` is not later) and returns its true
        values then; assays sampled inside the interval are taken at their sample time."""
        while self.next_assay < t1 - 1e-9:
            t = self.next_assay
            self.sample_assays(advance_to(t if t > t0 + 1e-9 else t0), t)
        truth = advance_to(t1)
        return self.online(truth, t1) + self.release(t1)

    def online(self, truth: Mapping[str, float], t: float) -> list[Measurement]:
        """Noisy online readings of the true values at time ``t``."""
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
            for name, spec in self.spec.online.items()
        ]

    def sample_assays(self, truth: Mapping[str, float], t: float) -> None:
        """Take the assay samples at ``t``; they arrive ``assay_delay`` hours later."""
        arrival = t + self.spec.assay_delay
        for name, spec in self.spec.assays.items():
            value = noisy(
                truth[name], spec, self.rng, upper=1.0 if name == "viability" else math.inf
            )
            self.pending.append(Measurement(name, value, spec.unit, t, arrival, "assay"))
        self.next_assay = t + self.spec.assay_interval

    def release(self, t: float) -> list[Measurement]:
        """The assays that have arrived by ``t`` (removed from those in transit)."""
        ready = [m for m in self.pending if m.arrival_time <= t + 1e-9]
        self.pending = [m for m in self.pending if m.arrival_time > t + 1e-9]
        return ready

"""Sensors of the virtual plant: online probes every step and offline daily assays that
arrive hours after their sample time, carrying that sample time."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import numpy as np

from controller.numerics.measurements import Measurement
from plant_models.process import ProcessPlugin, SensorNoise, get_process

__all__ = ["Measurement", "NoiseSpec", "SensorSpec", "default_sensor_spec"]


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

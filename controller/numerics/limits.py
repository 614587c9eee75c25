"""Output limits applied to every move before it leaves the controller: absolute bounds,
rate-of-change limits and a deadband (the controller-side half of the SCADA convention;
the plant applies its own clamps too)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

from plant_models.errors import ConfigError

__all__ = ["OutputLimiter"]


@dataclasses.dataclass(frozen=True)
class OutputLimiter:
    """Limits per manipulated variable.

    Attributes:
        bounds: name -> (low, high), inclusive.
        rate_limits: name -> maximum absolute change per hour (missing: unlimited).
        deadbands: name -> smallest change worth writing (missing: 0).
    """

    bounds: Mapping[str, tuple[float, float]]
    rate_limits: Mapping[str, float] = dataclasses.field(default_factory=dict)
    deadbands: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, (low, high) in self.bounds.items():
            if not (math.isfinite(low) and math.isfinite(high)) or low > high:
                raise ConfigError(f"output limits: {name} bounds ({low}, {high}) are invalid.")
        for name in list(self.rate_limits) + list(self.deadbands):
            if name not in self.bounds:
                raise ConfigError(
                    f"output limits: {name!r} has a rate limit or deadband but "
                    f"no bounds; known: {sorted(self.bounds)}."
                )

    def apply(
        self, proposed: Mapping[str, float], previous: Mapping[str, float], dt_h: float
    ) -> dict[str, float]:
        """Limit a proposed move. A non-finite proposal holds the previous value.

        Every bounded variable must be in ``previous``; the result always lies in the bounds.
        """
        out: dict[str, float] = {}
        for name, (low, high) in self.bounds.items():
            prev = min(max(float(previous[name]), low), high)
            value = float(proposed.get(name, prev))
            if not math.isfinite(value):
                value = prev
            rate = self.rate_limits.get(name)
            if rate is not None:
                step = rate * dt_h
                value = min(max(value, prev - step), prev + step)
            if abs(value - prev) < self.deadbands.get(name, 0.0):
                value = prev
            out[name] = min(max(value, low), high)
        return out

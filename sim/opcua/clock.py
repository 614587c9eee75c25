"""The process clock of the simulators: culture age in hours, running ``speed`` times faster
than the wall clock, and the epoch that maps process time to OPC UA timestamps."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

from plant_models.errors import ConfigError

__all__ = ["ProcessClock"]


class ProcessClock:
    """Process time ``t_h = speed * (monotonic() - start) / 3600`` (hours).

    Timestamps published by the simulators are ``epoch + t_h`` hours, where ``epoch`` is the
    wall-clock UTC time at which the batch started (published as ``BatchStartTime``). With
    ``speed > 1`` they run ahead of the wall clock: they are process timestamps, not
    receipt times. :meth:`to_process_h` inverts the mapping.
    """

    def __init__(
        self,
        speed: float = 1.0,
        *,
        monotonic: Callable[[], float] = time.monotonic,
        epoch: datetime | None = None,
    ) -> None:
        if not (speed > 0 and math.isfinite(speed)):
            raise ConfigError(f"clock speed must be positive and finite, got {speed!r}")
        self.speed = float(speed)
        self._monotonic = monotonic
        self._fixed_epoch = epoch
        self._start = 0.0
        self.epoch = datetime.now(UTC)
        self.reset()

    def reset(self) -> None:
        """Process time 0 now (the batch starts); the epoch is the current UTC time to the
        millisecond (OPC UA DateTime resolution is 100 ns; ms keeps the mapping exact)."""
        self._start = self._monotonic()
        now = datetime.now(UTC) if self._fixed_epoch is None else self._fixed_epoch
        self.epoch = now.replace(microsecond=(now.microsecond // 1000) * 1000)

    def continue_from(self, epoch: datetime) -> None:
        """Continue a batch that started at ``epoch`` (a restarted simulator): the process
        time is what it would be had the clock never stopped (``speed`` times the wall time
        since the epoch), and the published BatchStartTime stays the same."""
        if epoch.tzinfo is None:
            epoch = epoch.replace(tzinfo=UTC)
        elapsed = max((datetime.now(UTC) - epoch).total_seconds(), 0.0)
        self._start = self._monotonic() - elapsed
        self.epoch = epoch

    def wall(self) -> float:
        """Monotonic wall seconds (for heartbeats and time-outs)."""
        return self._monotonic()

    def process_h(self) -> float:
        return self.speed * (self._monotonic() - self._start) / 3600.0

    def timestamp(self, process_h: float) -> datetime:
        return self.epoch + timedelta(hours=process_h)

    def to_process_h(self, stamp: datetime) -> float:
        if stamp.tzinfo is None:
            stamp = stamp.replace(tzinfo=UTC)
        return (stamp - self.epoch).total_seconds() / 3600.0

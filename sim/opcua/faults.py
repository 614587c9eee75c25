"""Fault injection of the simulators: what a published value looks like under a fault.

Kinds (``--fault KIND:TARGET:START_H:DURATION_H`` or the ``InjectFault`` method):

- ``stale``: the value and its SourceTimestamp stop updating (a frozen data path).
- ``stuck``: the value freezes but the timestamps keep advancing (a stuck sensor).
- ``nan``: the value is NaN with status Good (a sensor that lies; the client must check).
- ``bad``: the value keeps updating with status BadSensorFailure.
- ``restart``: the OPC UA server stops for ``DURATION`` wall seconds and starts again
  (TARGET is ignored; the plant keeps running and the watchdog keeps watching).
- ``printer``: the printer faults: a running job is aborted (TARGET is ignored).

TARGET is a unit and sensor, ``BR01.glucose``, ``BR01.*`` or ``*`` (every unit and sensor).
Times are process hours; a duration of 0 lasts until cleared with ``InjectFault("clear", ...)``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import math

from plant_models.errors import ConfigError

__all__ = ["SENSOR_FAULTS", "Fault", "FaultBook", "parse_fault"]

log = logging.getLogger(__name__)

SENSOR_FAULTS = ("stale", "stuck", "nan", "bad")
KINDS = (*SENSOR_FAULTS, "restart", "printer", "clear")


@dataclasses.dataclass(frozen=True)
class Fault:
    """One fault. ``duration_h == 0`` means until cleared (for ``restart``: wall seconds)."""

    kind: str
    target: str = "*"
    start_h: float = 0.0
    duration_h: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"fault kind {self.kind!r}; allowed: {', '.join(KINDS)}")
        if not (math.isfinite(self.start_h) and self.start_h >= 0):
            raise ConfigError(f"fault start must be >= 0 h, got {self.start_h!r}")
        if not (math.isfinite(self.duration_h) and self.duration_h >= 0):
            raise ConfigError(f"fault duration must be >= 0, got {self.duration_h!r}")

    def active(self, t_h: float) -> bool:
        if t_h < self.start_h:
            return False
        return self.duration_h == 0 or t_h < self.start_h + self.duration_h

    def matches(self, unit: str, sensor: str) -> bool:
        return fnmatch.fnmatchcase(f"{unit}.{sensor}", self.target) or self.target == "*"


def parse_fault(text: str) -> Fault:
    """``KIND[:TARGET[:START_H[:DURATION]]]``, e.g. ``stuck:BR01.glucose:48:12``."""
    parts = text.split(":")
    if not 1 <= len(parts) <= 4:
        raise ConfigError(f"--fault {text!r}: expected KIND[:TARGET[:START_H[:DURATION]]]")
    try:
        start = float(parts[2]) if len(parts) > 2 else 0.0
        duration = float(parts[3]) if len(parts) > 3 else 0.0
    except ValueError:
        raise ConfigError(f"--fault {text!r}: START_H and DURATION must be numbers") from None
    return Fault(parts[0], parts[1] if len(parts) > 1 and parts[1] else "*", start, duration)


class FaultBook:
    """The sensor faults in force; restart and printer faults are events handled by the
    server loop (:meth:`due_events`)."""

    def __init__(self, faults: tuple[Fault, ...] = ()) -> None:
        self._sensor: list[Fault] = [f for f in faults if f.kind in SENSOR_FAULTS]
        self._events: list[Fault] = [f for f in faults if f.kind in ("restart", "printer")]

    def add(self, fault: Fault) -> None:
        log.warning("fault injected: %s", fault)
        if fault.kind == "clear":
            self._sensor = [f for f in self._sensor if f.target != fault.target]
            if fault.target == "*":
                self._sensor = []
        elif fault.kind in SENSOR_FAULTS:
            self._sensor.append(fault)
        else:
            self._events.append(fault)

    def sensor_fault(self, unit: str, sensor: str, t_h: float) -> str | None:
        """The kind of the latest active fault on this sensor, if any."""
        kind = None
        for fault in self._sensor:
            if fault.active(t_h) and fault.matches(unit, sensor):
                kind = fault.kind
        return kind

    def due_events(self, t_h: float) -> list[Fault]:
        """Restart / printer faults whose start has come; each is returned once."""
        due = [f for f in self._events if f.start_h <= t_h]
        self._events = [f for f in self._events if f.start_h > t_h]
        return due

"""Measurement validation before any estimator update.

The checks here need no state estimate: non-finite values, bad quality flags, unknown
variables, values outside the physical range, stuck online sensors, stale or future
timestamps, duplicate and superseded readings. The innovation (spike) gate needs the
estimate and lives in :mod:`controller.numerics.estimator`.

Every decision is a :class:`MeasurementDecision` with a machine-readable ``reason``
(one of :data:`REASONS`), so the historian and the tests can count rejections per cause.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Mapping
from typing import Any

from controller.numerics.measurements import Measurement

__all__ = [
    "REASONS",
    "MeasurementDecision",
    "MeasurementValidator",
    "ValidationSettings",
]

log = logging.getLogger(__name__)

#: Reasons a measurement can be rejected (``accepted`` marks an accepted one).
REASONS = (
    "accepted",
    "non_finite",  # NaN or +/-inf
    "bad_quality",  # the source flagged it "bad"
    "unknown_variable",  # not something the estimator can predict
    "unknown_source",  # neither "online" nor "assay"
    "unit",  # its unit cannot be converted to the variable's canonical unit
    "out_of_range",  # outside the physical range of the variable
    "stuck",  # online value unchanged for too many samples
    "stale",  # online sample older than the allowed age
    "future_timestamp",  # sampled after the estimator's present time
    "older_than_history",  # sampled before the oldest time the estimator can re-process
    "duplicate",  # same name, source and sample time already received
    "superseded",  # online sample older than one already received for that variable
    "innovation_gate",  # spike: too far from the prediction (Mahalanobis gate)
)


@dataclasses.dataclass(frozen=True)
class MeasurementDecision:
    """What the estimator did with one measurement.

    Attributes:
        measurement: the measurement as received.
        accepted: whether it was used in an update.
        reason: ``accepted`` or a rejection reason of :data:`REASONS`.
        detail: human-readable detail (limits, innovation in standard deviations).
        decided_at: estimator time at which the decision was taken, h.
    """

    measurement: Measurement
    accepted: bool
    reason: str
    detail: str
    decided_at: float


@dataclasses.dataclass(frozen=True)
class ValidationSettings:
    """Settings of the estimate-free checks (a subset of the estimator configuration).

    Attributes:
        physical_ranges: name -> (low, high); a value outside is rejected.
        stuck_samples: an online value unchanged (within ``stuck_tolerance``) for this many
            consecutive samples is rejected as stuck (the first ``stuck_samples - 1`` pass).
        stuck_tolerance: absolute change regarded as "unchanged".
        max_online_age_h: an online sample older than this at arrival is stale.
        time_tolerance_h: timestamps closer than this are the same time.
    """

    physical_ranges: Mapping[str, tuple[float, float]]
    stuck_samples: int = 5
    stuck_tolerance: float = 0.0
    max_online_age_h: float = 2.0
    time_tolerance_h: float = 1e-6


@dataclasses.dataclass
class _Track:
    """Per-variable record of the online stream (last value, repeats, last sample time)."""

    last_value: float = math.nan
    repeats: int = 0
    last_sample_time: float = -math.inf
    stuck_value: float = math.nan
    recovered: int = 0


class MeasurementValidator:
    """Stateful, estimate-free checks of incoming measurements (arrival order).

    Stuck detection and duplicate detection depend on what arrived before, so one validator
    belongs to one estimator (one batch). A value at the lower end of its physical range
    (e.g. glucose reads 0.0 because the analyser clips at zero when glucose is exhausted)
    is not counted as stuck: a starved culture legitimately reads the same zero for hours.
    """

    def __init__(self, settings: ValidationSettings, known_variables: frozenset[str]) -> None:
        self.settings = settings
        self.known_variables = known_variables
        self._online: dict[str, _Track] = {}
        self._seen_assays: dict[tuple[str, float], float] = {}

    def check(self, m: Measurement, now_h: float, oldest_h: float) -> tuple[bool, str, str]:
        """(passed, reason, detail) for measurement ``m`` arriving at estimator time
        ``now_h`` when the history reaches back to ``oldest_h``."""
        s = self.settings
        tol = s.time_tolerance_h
        if not (math.isfinite(m.value) and math.isfinite(m.sample_time)):
            return False, "non_finite", f"value {m.value!r} at sample time {m.sample_time!r}"
        if m.quality == "bad":
            return False, "bad_quality", "source quality flag is 'bad'"
        if m.name not in self.known_variables:
            return False, "unknown_variable", f"known: {sorted(self.known_variables)}"
        if m.source not in ("online", "assay"):
            return False, "unknown_source", f"source {m.source!r}; expected online or assay"
        low, high = s.physical_ranges.get(m.name, (-math.inf, math.inf))
        if not low <= m.value <= high:
            return False, "out_of_range", f"{m.value:g} outside [{low:g}, {high:g}] {m.unit}"
        if m.sample_time > now_h + tol:
            return False, "future_timestamp", f"sampled at {m.sample_time:g} h > now {now_h:g} h"
        if m.source == "online":
            return self._check_online(m, now_h, low, oldest_h)
        if m.sample_time < oldest_h - tol:
            return False, "older_than_history", _too_old(m, oldest_h)
        key = (m.name, round(m.sample_time / max(tol, 1e-12)) * max(tol, 1e-12))
        if key in self._seen_assays:
            return False, "duplicate", f"assay {m.name} sampled at {m.sample_time:g} h seen before"
        self._seen_assays[key] = m.sample_time
        return True, "accepted", ""

    def _check_online(
        self, m: Measurement, now_h: float, low: float, oldest_h: float
    ) -> tuple[bool, str, str]:
        s = self.settings
        tol = s.time_tolerance_h
        age = now_h - m.sample_time
        if age > s.max_online_age_h + tol:
            return False, "stale", f"online sample {age:g} h old (limit {s.max_online_age_h:g} h)"
        if m.sample_time < oldest_h - tol:
            return False, "older_than_history", _too_old(m, oldest_h)
        track = self._online.setdefault(m.name, _Track())
        if abs(m.sample_time - track.last_sample_time) <= tol:
            return False, "duplicate", f"online {m.name} sampled at {m.sample_time:g} h seen before"
        if m.sample_time < track.last_sample_time:
            return (
                False,
                "superseded",
                f"sampled at {m.sample_time:g} h, newer sample at {track.last_sample_time:g} h",
            )
        track.last_sample_time = m.sample_time
        tol_v = s.stuck_tolerance
        unchanged = abs(m.value - track.last_value) <= tol_v
        at_floor = abs(m.value - low) <= tol_v
        track.repeats = track.repeats + 1 if unchanged and not at_floor else 0
        track.last_value = m.value
        if track.repeats >= s.stuck_samples - 1:
            track.stuck_value = m.value
            track.recovered = 0
        elif not math.isnan(track.stuck_value):
            # a sensor once found stuck stays suspect: its frozen value is rejected even when
            # other faults (a spike) interrupt the run, until it has moved freely again
            if abs(m.value - track.stuck_value) <= tol_v:
                track.recovered = 0
                detail = f"{m.name} back at its stuck value {m.value:g}"
                return False, "stuck", detail
            track.recovered += 1
            if track.recovered >= s.stuck_samples - 1:
                log.info("online %s moves again: no longer stuck", m.name)
                track.stuck_value = math.nan
        if track.repeats >= s.stuck_samples - 1:
            detail = f"{m.name} unchanged at {m.value:g} for {track.repeats + 1} samples"
            return False, "stuck", detail
        return True, "accepted", ""

    def snapshot(self) -> dict[str, Any]:
        """The state of the checks (stuck tracks, assays seen) as JSON-compatible data;
        non-finite numbers are written as the strings ``"nan"``, ``"inf"``, ``"-inf"``."""
        return {
            "online": {
                name: {
                    "last_value": _dump(track.last_value),
                    "repeats": track.repeats,
                    "last_sample_time": _dump(track.last_sample_time),
                    "stuck_value": _dump(track.stuck_value),
                    "recovered": track.recovered,
                }
                for name, track in self._online.items()
            },
            "seen_assays": [[n, _dump(k), _dump(t)] for (n, k), t in self._seen_assays.items()],
        }

    def restore(self, data: Mapping[str, Any]) -> None:
        """Take over the state written by :meth:`snapshot`.

        Raises:
            ValueError: malformed data (the caller names the source).
        """
        try:
            online = {
                str(name): _Track(
                    last_value=_load(t["last_value"]),
                    repeats=int(t["repeats"]),
                    last_sample_time=_load(t["last_sample_time"]),
                    stuck_value=_load(t["stuck_value"]),
                    recovered=int(t["recovered"]),
                )
                for name, t in data["online"].items()
            }
            seen = {(str(n), _load(k)): _load(t) for n, k, t in data["seen_assays"]}
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"validator state malformed ({exc!r})") from None
        self._online = online
        self._seen_assays = seen

    def forget_before(self, time_h: float) -> None:
        """Drop duplicate-detection records older than ``time_h`` (bounded memory)."""
        self._seen_assays = {k: t for k, t in self._seen_assays.items() if t >= time_h}


def _dump(value: float) -> float | str:
    """A float for JSON: non-finite values as strings."""
    value = float(value)
    return value if math.isfinite(value) else repr(value)


def _load(value: float | str) -> float:
    """Inverse of :func:`_dump` (accepts numbers and "nan", "inf", "-inf")."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a number, got {value!r}")
    if isinstance(value, str) and value not in ("nan", "inf", "-inf"):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


def _too_old(m: Measurement, oldest_h: float) -> str:
    return f"sampled at {m.sample_time:g} h, history starts at {oldest_h:g} h"


def log_rejection(decision: MeasurementDecision) -> None:
    """Log a rejected measurement with its reason (a duplicate at info level: it is harmless;
    every other reason at warning level)."""
    m = decision.measurement
    log.log(
        logging.INFO if decision.reason == "duplicate" else logging.WARNING,
        "rejected %s %s=%r (sampled %.3g h) at %.3g h: %s %s",
        m.source,
        m.name,
        m.value,
        m.sample_time,
        decision.decided_at,
        decision.reason,
        decision.detail,
    )

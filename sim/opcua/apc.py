"""Plant-side half of the SCADA handshake (docs/opcua.md): modes, heartbeat watchdog and
setpoint bundles with clamps, rate limits and deadbands.

This module is pure and synchronous: the OPC UA server (:mod:`sim.opcua.server`) calls it
with the calling user's role and the current time, so the rules are testable without a
network. Times are wall-clock seconds from a monotonic clock (the heartbeat is a
communication-health signal, independent of the accelerated process clock); rate limits are
per process hour.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
from collections.abc import Mapping, Sequence

from plant_models.errors import ConfigError

__all__ = [
    "ApcConfig",
    "ApcInterface",
    "ItemStatus",
    "Mode",
    "Role",
    "SetpointLimit",
    "default_apc_config",
    "parse_fallback",
]

log = logging.getLogger(__name__)


class Role(enum.StrEnum):
    """Roles of the users file; each user has exactly one."""

    VIEWER = "viewer"  # read, browse, subscribe
    OPERATOR = "operator"  # grants/revokes Remote mode, faults, printer jobs
    APC = "apc"  # the controller: heartbeat, setpoint bundles, printer jobs
    ENGINEER = "engineer"  # tuning: plant-side limits; read everything


class Mode(enum.IntEnum):
    """Operating mode of a unit's setpoints (the value of the ``Mode`` variable)."""

    LOCAL = 0  # setpoints held by the plant (operator / local recipe)
    REMOTE = 1  # setpoints written by the APC through WriteSetpoints


class ItemStatus(enum.Enum):
    """Outcome of one item of a setpoint bundle (mapped to an OPC UA StatusCode)."""

    GOOD = "Good"
    OUT_OF_RANGE = "BadOutOfRange"  # outside [low, high] or not finite: nothing changed
    INVALID_STATE = "BadInvalidState"  # unit not in Remote mode: nothing changed
    ACCESS_DENIED = "BadUserAccessDenied"  # caller's role may not write setpoints
    UNKNOWN_ITEM = "BadNodeIdUnknown"  # no such setpoint name


@dataclasses.dataclass(frozen=True)
class SetpointLimit:
    """Plant-side limits of one setpoint (FF SP_LO_LIM / SP_HI_LIM / SP_RATE_DN / SP_RATE_UP).

    Attributes:
        low, high: accepted range, canonical unit; a request outside it is refused.
        rate_up, rate_down: largest increase / decrease of the working setpoint per
            process hour (the working setpoint ramps toward the requested target).
        deadband: a request closer than this to the current target is accepted but ignored.
        unit: canonical unit (published as EngineeringUnits).
    """

    low: float
    high: float
    rate_up: float = math.inf
    rate_down: float = math.inf
    deadband: float = 0.0
    unit: str = ""

    def __post_init__(self) -> None:
        if not (math.isfinite(self.low) and math.isfinite(self.high)) or self.low > self.high:
            raise ConfigError(f"setpoint limits ({self.low}, {self.high}) are invalid")
        if not (self.rate_up > 0 and self.rate_down > 0 and self.deadband >= 0):
            raise ConfigError("setpoint rates must be positive and the deadband non-negative")


@dataclasses.dataclass(frozen=True)
class ApcConfig:
    """Settings of the APC interface of one unit.

    Attributes:
        limits: setpoint name -> limits.
        heartbeat_timeout_s: wall seconds without a heartbeat change before the watchdog
            sheds Remote mode.
        fallback: setpoint name -> the safe value the plant moves to when the watchdog
            sheds the controller (SHED_RCAS-style fallback: the working setpoint ramps there
            at the rate limits). A setpoint without one is held where it was at the shed.
    """

    limits: Mapping[str, SetpointLimit]
    heartbeat_timeout_s: float = 10.0
    fallback: Mapping[str, float] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        if not (self.heartbeat_timeout_s > 0 and math.isfinite(self.heartbeat_timeout_s)):
            raise ConfigError(
                f"heartbeat time-out must be positive, got {self.heartbeat_timeout_s!r}"
            )
        if not self.limits:
            raise ConfigError("an APC interface needs at least one setpoint")
        for name, value in self.fallback.items():
            lim = self.limits.get(name)
            if lim is None:
                raise ConfigError(
                    f"fallback setpoint {name!r}: no such setpoint; "
                    f"setpoints: {sorted(self.limits)}"
                )
            if not (math.isfinite(value) and lim.low <= value <= lim.high):
                raise ConfigError(
                    f"fallback setpoint {name}={value!r} is outside its limits "
                    f"[{lim.low:g}, {lim.high:g}]"
                )


def parse_fallback(text: str) -> dict[str, float]:
    """``NAME=VALUE[,NAME=VALUE...]`` (``hmpc-sim serve --fallback``), e.g.
    ``glucose_feed=0,il2_addition=0``."""
    out: dict[str, float] = {}
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        name, sep, raw = part.partition("=")
        try:
            value = float(raw)
        except ValueError:
            value = math.nan
        if not sep or not name.strip() or not math.isfinite(value):
            raise ConfigError(f"--fallback {text!r}: expected NAME=VALUE[,NAME=VALUE...]")
        out[name.strip()] = value
    return out


def default_apc_config(
    bounds: Mapping[str, tuple[float, float]],
    units: Mapping[str, str],
    rate_limits: Mapping[str, float],
    *,
    heartbeat_timeout_s: float = 10.0,
    fallback: Mapping[str, float] | None = None,
) -> ApcConfig:
    """Limits from the plant's operating bounds; deadband 0.1 % of the span."""
    limits = {
        name: SetpointLimit(
            low=low,
            high=high,
            rate_up=rate_limits.get(name, math.inf),
            rate_down=rate_limits.get(name, math.inf),
            deadband=1e-3 * (high - low),
            unit=units.get(name, ""),
        )
        for name, (low, high) in bounds.items()
    }
    return ApcConfig(
        limits=limits, heartbeat_timeout_s=heartbeat_timeout_s, fallback=dict(fallback or {})
    )


class ApcInterface:
    """Modes, heartbeat watchdog and setpoints of one unit.

    ``targets`` are the accepted requests; ``working`` are the values the plant applies,
    ramping toward the targets at the rate limits as process time advances.
    """

    def __init__(self, config: ApcConfig, initial: Mapping[str, float], now: float) -> None:
        missing = sorted(set(config.limits) - set(initial))
        if missing:
            raise ConfigError(f"initial setpoints missing for {missing}")
        self.config = config
        self.mode = Mode.LOCAL
        self.fallback = False
        self.shed_count = 0
        self.targets: dict[str, float] = {}
        for name, lim in config.limits.items():
            self.targets[name] = min(max(float(initial[name]), lim.low), lim.high)
        self.working: dict[str, float] = dict(self.targets)
        #: the safe state applied on shed (the operator/engineer may change it at run time)
        self.fallback_setpoints: dict[str, float] = {
            k: float(v) for k, v in config.fallback.items()
        }
        self.heartbeat = 0  # the initial value of the Heartbeat node; a change is a beat
        self._last_beat = now - 2 * config.heartbeat_timeout_s  # unhealthy until a beat

    # -- heartbeat and watchdog -------------------------------------------------------
    def beat(self, value: int, now: float) -> None:
        """Record the heartbeat value; only a change counts as a beat."""
        if value != self.heartbeat:
            self.heartbeat = value
            self._last_beat = now

    def heartbeat_healthy(self, now: float) -> bool:
        return now - self._last_beat <= self.config.heartbeat_timeout_s

    def check_watchdog(self, now: float) -> bool:
        """Shed to Local when the heartbeat has timed out in Remote mode: raise the
        fallback flag and put the plant in its safe state (the configured fallback
        setpoints, reached at the rate limits; a setpoint without one is held where its
        working value stands). Returns whether it shed now."""
        if self.mode is Mode.REMOTE and not self.heartbeat_healthy(now):
            self.mode = Mode.LOCAL
            self.fallback = True
            self.shed_count += 1
            self.targets = dict(self.working)
            self.targets.update(self.fallback_setpoints)
            log.warning(
                "watchdog: heartbeat silent for %.1f s > %.1f s; shed to Local, fallback "
                "setpoints %s (from %s)",
                now - self._last_beat,
                self.config.heartbeat_timeout_s,
                self.targets,
                self.working,
            )
            return True
        return False

    def set_fallback(self, name: str, value: float, role: Role, user: str) -> ItemStatus:
        """The operator or engineer changes a fallback setpoint (applies at the next shed)."""
        if role not in (Role.OPERATOR, Role.ENGINEER):
            log.warning("fallback: %s (%s) may not change fallback setpoints", user, role.value)
            return ItemStatus.ACCESS_DENIED
        lim = self.config.limits.get(name)
        if lim is None:
            return ItemStatus.UNKNOWN_ITEM
        if not (math.isfinite(value) and lim.low <= value <= lim.high):
            return ItemStatus.OUT_OF_RANGE
        self.fallback_setpoints[name] = float(value)
        log.info("fallback: %s (%s) set %s=%r", user, role.value, name, value)
        return ItemStatus.GOOD

    # -- modes --------------------------------------------------------------------------
    def request_mode(self, mode: Mode, role: Role, now: float, user: str) -> ItemStatus:
        """Operator grants Remote (only while the heartbeat is healthy; this is also the
        operator action that clears the fallback flag). Operator or APC may return to Local."""
        if mode is Mode.REMOTE:
            if role is not Role.OPERATOR:
                log.warning("mode: %s (%s) may not grant Remote", user, role.value)
                return ItemStatus.ACCESS_DENIED
            if not self.heartbeat_healthy(now):
                log.warning("mode: Remote refused for %s: heartbeat unhealthy", user)
                return ItemStatus.INVALID_STATE
            self.mode = Mode.REMOTE
            self.fallback = False
            log.info("mode: Remote granted by %s", user)
            return ItemStatus.GOOD
        if role not in (Role.OPERATOR, Role.APC):
            log.warning("mode: %s (%s) may not change the mode", user, role.value)
            return ItemStatus.ACCESS_DENIED
        self.mode = Mode.LOCAL
        log.info("mode: Local set by %s", user)
        return ItemStatus.GOOD

    # -- setpoints ----------------------------------------------------------------------
    def write_setpoints(
        self,
        names: Sequence[str],
        values: Sequence[float],
        role: Role,
        now: float,
        user: str,
    ) -> list[ItemStatus]:
        """One status per item. A refused item changes nothing; good items take effect
        (subject to the deadband, then ramped at the rate limits)."""
        if len(names) != len(values):
            raise ConfigError(f"{len(names)} setpoint names but {len(values)} values")
        out: list[ItemStatus] = []
        for name, raw in zip(names, values, strict=True):
            status = self._write_one(name, float(raw), role, now)
            out.append(status)
            # audit: every attempt, accepted or not, with the authenticated user
            log.info(
                "setpoint write by %s (%s): %s=%r -> %s", user, role.value, name, raw, status.value
            )
        return out

    def _write_one(self, name: str, value: float, role: Role, now: float) -> ItemStatus:
        if role is not Role.APC:
            return ItemStatus.ACCESS_DENIED
        lim = self.config.limits.get(name)
        if lim is None:
            return ItemStatus.UNKNOWN_ITEM
        if self.mode is not Mode.REMOTE or not self.heartbeat_healthy(now):
            return ItemStatus.INVALID_STATE
        if not (math.isfinite(value) and lim.low <= value <= lim.high):
            return ItemStatus.OUT_OF_RANGE
        if abs(value - self.targets[name]) >= lim.deadband:
            self.targets[name] = value
        return ItemStatus.GOOD

    def advance(self, dt_h: float) -> dict[str, float]:
        """Move the working setpoints toward the targets by at most the rate limit times
        ``dt_h`` process hours and return them: the inputs the plant applies over the next
        ``dt_h`` (piecewise constant, as the in-process closed loop applies its inputs, so a
        controller that respects the rate limits sees its setpoints applied unchanged)."""
        for name, lim in self.config.limits.items():
            start = self.working[name]
            target = self.targets[name]
            if target >= start:
                self.working[name] = min(target, start + lim.rate_up * dt_h)
            else:
                self.working[name] = max(target, start - lim.rate_down * dt_h)
        return dict(self.working)

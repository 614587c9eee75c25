"""Plant-side APC rules without a network: modes, watchdog, clamps, rate limits, deadband."""

from __future__ import annotations

import math

import pytest

from plant_models.errors import ConfigError
from sim.opcua.apc import (
    ApcConfig,
    ApcInterface,
    ItemStatus,
    Mode,
    Role,
    SetpointLimit,
    parse_fallback,
)


def make(timeout: float = 5.0) -> ApcInterface:
    config = ApcConfig(
        limits={
            "perfusion_rate": SetpointLimit(0.0, 2.0, rate_up=0.5, rate_down=1.0, deadband=0.01),
            "glucose_feed": SetpointLimit(0.0, 10.0),
        },
        heartbeat_timeout_s=timeout,
    )
    return ApcInterface(config, {"perfusion_rate": 0.0, "glucose_feed": 1.0}, now=0.0)


def remote(apc: ApcInterface, now: float = 0.0) -> None:
    apc.beat(1, now)
    assert apc.request_mode(Mode.REMOTE, Role.OPERATOR, now, "op") is ItemStatus.GOOD


def test_starts_local_and_only_operator_grants_remote_with_healthy_heartbeat() -> None:
    apc = make()
    assert apc.mode is Mode.LOCAL
    # no heartbeat yet: refused even for the operator
    assert apc.request_mode(Mode.REMOTE, Role.OPERATOR, 0.0, "op") is ItemStatus.INVALID_STATE
    apc.beat(1, 0.0)
    for role in (Role.APC, Role.VIEWER, Role.ENGINEER):
        assert apc.request_mode(Mode.REMOTE, role, 0.0, "x") is ItemStatus.ACCESS_DENIED
    assert apc.mode is Mode.LOCAL
    assert apc.request_mode(Mode.REMOTE, Role.OPERATOR, 0.0, "op") is ItemStatus.GOOD
    assert apc.mode is Mode.REMOTE
    assert apc.request_mode(Mode.LOCAL, Role.VIEWER, 0.0, "v") is ItemStatus.ACCESS_DENIED
    assert apc.request_mode(Mode.LOCAL, Role.APC, 0.0, "apc") is ItemStatus.GOOD
    assert apc.mode is Mode.LOCAL


def test_setpoint_statuses_per_item_and_out_of_range_changes_nothing() -> None:
    apc = make()
    names = ["perfusion_rate", "glucose_feed"]
    assert (
        apc.write_setpoints(names, [1.0, 2.0], Role.APC, 0.0, "apc")
        == [ItemStatus.INVALID_STATE] * 2
    )
    remote(apc)
    before = dict(apc.targets)
    out = apc.write_setpoints(
        ["perfusion_rate", "glucose_feed", "nope"], [2.5, math.nan, 1.0], Role.APC, 0.0, "apc"
    )
    assert out == [ItemStatus.OUT_OF_RANGE, ItemStatus.OUT_OF_RANGE, ItemStatus.UNKNOWN_ITEM]
    assert apc.targets == before
    out = apc.write_setpoints(names, [1.0, 3.0], Role.VIEWER, 0.0, "viewer")
    assert out == [ItemStatus.ACCESS_DENIED] * 2
    assert apc.targets == before
    out = apc.write_setpoints(names, [1.0, 11.0], Role.APC, 0.0, "apc")
    assert out == [ItemStatus.GOOD, ItemStatus.OUT_OF_RANGE]
    assert apc.targets == {"perfusion_rate": 1.0, "glucose_feed": 1.0}


def test_deadband_ignores_small_changes() -> None:
    apc = make()
    remote(apc)
    apc.write_setpoints(["perfusion_rate"], [1.0], Role.APC, 0.0, "apc")
    assert apc.write_setpoints(["perfusion_rate"], [1.005], Role.APC, 0.0, "apc") == [
        ItemStatus.GOOD
    ]
    assert apc.targets["perfusion_rate"] == 1.0


def test_working_setpoint_ramps_at_the_rate_limits() -> None:
    apc = make()
    remote(apc)
    apc.write_setpoints(["perfusion_rate"], [2.0], Role.APC, 0.0, "apc")
    applied = apc.advance(1.0)  # 0.5 per h up
    assert apc.working["perfusion_rate"] == pytest.approx(0.5)
    assert applied["perfusion_rate"] == pytest.approx(0.5)
    apc.advance(10.0)
    assert apc.working["perfusion_rate"] == pytest.approx(2.0)
    apc.write_setpoints(["perfusion_rate"], [0.0], Role.APC, 0.0, "apc")
    apc.advance(1.0)  # 1.0 per h down
    assert apc.working["perfusion_rate"] == pytest.approx(1.0)


def test_watchdog_sheds_holds_and_needs_operator() -> None:
    apc = make(timeout=5.0)
    remote(apc)
    apc.write_setpoints(["perfusion_rate"], [2.0], Role.APC, 0.0, "apc")
    apc.advance(2.0)
    assert not apc.check_watchdog(4.0)  # within the time-out
    assert apc.check_watchdog(5.5)
    assert apc.mode is Mode.LOCAL and apc.fallback and apc.shed_count == 1
    held = dict(apc.working)
    assert apc.targets == held  # ramp stopped where it was
    apc.advance(5.0)
    assert apc.working == held
    # a late beat does not bring Remote back; the operator must grant it again
    apc.beat(2, 6.0)
    assert apc.mode is Mode.LOCAL and apc.fallback
    assert apc.write_setpoints(["perfusion_rate"], [1.0], Role.APC, 6.0, "apc") == [
        ItemStatus.INVALID_STATE
    ]
    assert apc.request_mode(Mode.REMOTE, Role.OPERATOR, 6.0, "op") is ItemStatus.GOOD
    assert not apc.fallback


def test_invalid_configuration_is_a_config_error() -> None:
    with pytest.raises(ConfigError):
        SetpointLimit(1.0, 0.0)
    with pytest.raises(ConfigError):
        ApcConfig(limits={"a": SetpointLimit(0.0, 1.0)}, heartbeat_timeout_s=0.0)
    with pytest.raises(ConfigError):
        ApcInterface(ApcConfig(limits={"a": SetpointLimit(0.0, 1.0)}), {}, now=0.0)


def test_shed_applies_the_fallback_setpoints_at_the_rate_limits() -> None:
    """SHED_RCAS-style fallback: the shed does not freeze the last move; the configured
    setpoints are the new targets and the working values ramp there."""
    config = ApcConfig(
        limits={
            "perfusion_rate": SetpointLimit(0.0, 2.0, rate_up=0.5, rate_down=1.0),
            "glucose_feed": SetpointLimit(0.0, 10.0),
        },
        heartbeat_timeout_s=5.0,
        fallback={"perfusion_rate": 0.5, "glucose_feed": 0.0},
    )
    apc = ApcInterface(config, {"perfusion_rate": 0.0, "glucose_feed": 0.0}, now=0.0)
    remote(apc)
    apc.write_setpoints(["perfusion_rate", "glucose_feed"], [2.0, 10.0], Role.APC, 0.0, "apc")
    apc.advance(4.0)
    assert apc.working == {"perfusion_rate": 2.0, "glucose_feed": 10.0}  # the last move
    assert apc.check_watchdog(5.5)
    assert apc.targets == {"perfusion_rate": 0.5, "glucose_feed": 0.0}
    apc.advance(1.0)  # glucose at once (no rate limit), perfusion 1.0 per h down
    assert apc.working == pytest.approx({"perfusion_rate": 1.0, "glucose_feed": 0.0})
    apc.advance(1.0)
    assert apc.working == pytest.approx({"perfusion_rate": 0.5, "glucose_feed": 0.0})


def test_fallback_setpoints_are_validated_and_changed_by_operator_or_engineer() -> None:
    limits = {"a": SetpointLimit(0.0, 1.0), "b": SetpointLimit(0.0, 1.0)}
    with pytest.raises(ConfigError, match="outside its limits"):
        ApcConfig(limits=limits, fallback={"a": 2.0})
    with pytest.raises(ConfigError, match="no such setpoint"):
        ApcConfig(limits=limits, fallback={"c": 0.0})
    apc = ApcInterface(ApcConfig(limits=limits, fallback={"a": 0.0}), {"a": 1, "b": 1}, now=0.0)
    assert apc.set_fallback("b", 0.2, Role.APC, "apc") is ItemStatus.ACCESS_DENIED
    assert apc.set_fallback("b", 2.0, Role.ENGINEER, "eng") is ItemStatus.OUT_OF_RANGE
    assert apc.set_fallback("b", 0.2, Role.OPERATOR, "op") is ItemStatus.GOOD
    assert apc.fallback_setpoints == {"a": 0.0, "b": 0.2}


def test_parse_fallback() -> None:
    assert parse_fallback("glucose_feed=0, il2_addition=0.5") == {
        "glucose_feed": 0.0,
        "il2_addition": 0.5,
    }
    for bad in ("glucose_feed", "=1", "a=x", "a=nan"):
        with pytest.raises(ConfigError):
            parse_fallback(bad)

"""The OPC UA simulators on 127.0.0.1: security, LADS model, APC handshake, watchdog, printer
and faults, with real asyncua clients."""

from __future__ import annotations

import asyncio
import math
import time
from datetime import timedelta
from typing import Any

import pytest
from asyncua import Client, ua
from opcua_testkit import PASSWORDS, Pki, SimThread, node, session

from sim.opcua.faults import Fault
from sim.opcua.lads import DI_URI, LADS_URI, find_nodesets_dir

pytestmark = pytest.mark.integration

SP = "APC.BR01"
NAMES = ["perfusion_rate", "glucose_feed", "il2_addition"]


async def call(client: Client, obj: str, method: str, *args: ua.Variant) -> Any:
    return await (await node(client, obj)).call_method(await node(client, f"{obj}.{method}"), *args)


#: The Properties argument of LADS FunctionalUnitState.Start (KeyValuePair[]), empty.
NO_PROPERTIES = ua.Variant([], ua.VariantType.ExtensionObject, is_array=True)


async def _status(pending: Any) -> Any:
    """The status code a method call ends with (Good when it returns)."""
    try:
        await pending
    except ua.UaStatusCodeError as exc:
        return exc.code
    return ua.StatusCodes.Good


def strings(values: list[str]) -> ua.Variant:
    return ua.Variant(values, ua.VariantType.String, is_array=True)


def doubles(values: list[float]) -> ua.Variant:
    return ua.Variant(values, ua.VariantType.Double, is_array=True)


async def beat(client: Client, unit: str, value: int) -> None:
    hb = await node(client, f"APC.{unit}.Heartbeat")
    await hb.write_value(ua.Variant(value, ua.VariantType.UInt32))


async def beating(client: Client, unit: str) -> None:
    """Heartbeat every 0.2 s until cancelled, as a controller does every cycle."""
    count = 100
    while True:
        count += 1
        await beat(client, unit, count)
        await asyncio.sleep(0.2)


async def grant_remote(sim: SimThread, pki: Pki, unit: str = "BR01") -> None:
    async with session(sim.s.endpoint, pki, "operator") as op:
        # as an operator does: grant only once the plant shows a healthy heartbeat
        healthy = await node(op, f"APC.{unit}.HeartbeatHealthy")
        for _ in range(100):
            if await healthy.read_value():
                break
            await asyncio.sleep(0.05)
        result = await call(op, f"APC.{unit}", "RequestMode", ua.Variant(1, ua.VariantType.Int32))
        assert result == ua.StatusCode(ua.StatusCodes.Good)


# -- security ---------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "policy", ["Basic256Sha256", "Aes128_Sha256_RsaOaep", "Aes256_Sha256_RsaPss"]
)
@pytest.mark.parametrize(
    "mode", [ua.MessageSecurityMode.Sign, ua.MessageSecurityMode.SignAndEncrypt]
)
def test_secure_policies_connect_and_read(
    sim: SimThread, pki: Pki, policy: str, mode: ua.MessageSecurityMode
) -> None:
    async def go() -> float:
        async with session(sim.s.endpoint, pki, "viewer", policy=policy, mode=mode) as c:
            value = await (await node(c, "Clock.ProcessTime")).read_value()
            return float(value)

    assert asyncio.run(go()) >= 0.0


def test_endpoints_offer_no_none_policy_and_no_anonymous(sim: SimThread) -> None:
    async def go() -> list[ua.EndpointDescription]:
        client = Client(sim.s.endpoint)
        endpoints = list(await client.connect_and_get_server_endpoints())
        await asyncio.sleep(0.01)  # let the transport close before the loop does
        return endpoints

    endpoints = asyncio.run(go())
    assert {e.SecurityMode for e in endpoints} == {
        ua.MessageSecurityMode.Sign,
        ua.MessageSecurityMode.SignAndEncrypt,
    }
    assert {e.SecurityPolicyUri.rsplit("#", 1)[1] for e in endpoints} == {
        "Basic256Sha256",
        "Aes128_Sha256_RsaOaep",
        "Aes256_Sha256_RsaPss",
    }
    tokens = {t.TokenType for e in endpoints for t in e.UserIdentityTokens}
    assert tokens == {ua.UserTokenType.UserName}


@pytest.mark.parametrize(
    "case", ["wrong password", "unknown user", "anonymous", "untrusted certificate"]
)
def test_refused_sessions(sim: SimThread, pki: Pki, case: str) -> None:
    async def go() -> None:
        user, password, untrusted = {
            "wrong password": ("apc", "nope", False),
            "unknown user": ("mallory", PASSWORDS["apc"], False),
            "anonymous": (None, None, False),
            "untrusted certificate": ("apc", None, True),
        }[case]
        async with session(sim.s.endpoint, pki, user, password=password, untrusted=untrusted):
            pass

    with pytest.raises((ua.UaError, ConnectionError, asyncio.TimeoutError)):
        asyncio.run(go())


# -- information model ---------------------------------------------------------------------------
def test_lads_tree_browse_names_and_units(sim: SimThread, pki: Pki) -> None:
    async def go() -> dict[str, Any]:
        async with session(sim.s.endpoint, pki, "viewer") as c:
            di = await c.get_namespace_index(DI_URI)
            lads = await c.get_namespace_index(LADS_URI)
            hmpc = await c.get_namespace_index("urn:hmpc:sim")
            device_set = await c.nodes.objects.get_child(f"{di}:DeviceSet")
            components = await device_set.get_children(refs=ua.ObjectIds.HasComponent)
            devices = [(await d.read_browse_name()).Name for d in components]
            sensor = await device_set.get_child(
                [
                    f"{hmpc}:BR01",
                    f"{lads}:FunctionalUnitSet",
                    f"{hmpc}:Bioreactor",
                    f"{lads}:FunctionSet",
                    f"{hmpc}:GlucoseSensor",
                    f"{lads}:SensorValue",
                ]
            )
            eu = await (await sensor.get_child("0:EngineeringUnits")).read_value()
            rng = await (await sensor.get_child("0:EURange")).read_value()
            device = await device_set.get_child(f"{hmpc}:BR01")
            typedef = await device.read_type_definition()
            state = await device.get_child(
                [
                    f"{lads}:FunctionalUnitSet",
                    f"{hmpc}:Bioreactor",
                    f"{lads}:FunctionalUnitState",
                    "0:CurrentState",
                ]
            )
            return {
                "devices": devices,
                "sensor": sensor.nodeid,
                "unit": eu.DisplayName.Text,
                "range": (rng.Low, rng.High),
                "typedef": typedef,
                "lads": lads,
                "state": (await state.read_value()).Text,
                "value": await sensor.read_value(),
            }

    out = asyncio.run(go())
    assert out["devices"] == ["BR01", "BR02"]
    assert out["sensor"].Identifier == "BR01.Bioreactor.FunctionSet.GlucoseSensor.SensorValue"
    assert out["unit"] == "mM" and out["range"][0] == 0.0
    assert out["typedef"] == ua.NodeId(1002, out["lads"])  # LADSDeviceType
    assert out["state"] == "Running"
    assert out["value"] > 0
    # the official NodeSets are used whenever they are installed (make setup)
    assert sim.s.bioreactor.official_nodesets == (find_nodesets_dir() is not None)


def test_assays_carry_their_sample_time_and_clock_runs_fast(sim: SimThread, pki: Pki) -> None:
    async def go() -> tuple[Any, Any, float, float]:
        async with session(sim.s.endpoint, pki, "viewer") as c:
            epoch = await (await node(c, "Clock.BatchStartTime")).read_value()
            t0 = await (await node(c, "Clock.ProcessTime")).read_value()
            # the day-0 assays arrive 4 h after sampling; wait until they are published
            assay = await node(c, "BR01.Bioreactor.FunctionSet.ViabilityAssay.SensorValue")
            for _ in range(100):
                dv = await assay.read_data_value(raise_on_bad_status=False)
                if dv.SourceTimestamp is not None and not math.isnan(dv.Value.Value):
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.5)
            t1 = await (await node(c, "Clock.ProcessTime")).read_value()
            return epoch, dv, t0, t1

    start = time.monotonic()
    epoch, dv, t0, t1 = asyncio.run(go())
    elapsed = time.monotonic() - start
    assert t1 > t0
    assert t1 - t0 == pytest.approx(elapsed, abs=1.5)  # 1 process hour per second
    sample_h = (dv.SourceTimestamp.replace(tzinfo=epoch.tzinfo) - epoch) / timedelta(hours=1)
    assert sample_h % 24.0 == pytest.approx(0.0, abs=1e-6)  # daily assays at 0, 24, ... h
    assert 0.0 <= dv.Value.Value <= 1.0


def test_subscription_delivers_online_values(sim: SimThread, pki: Pki) -> None:
    class Handler:
        def __init__(self) -> None:
            self.values: list[float] = []

        def datachange_notification(self, n: Any, val: float, data: Any) -> None:
            self.values.append(val)

    async def go() -> list[float]:
        handler = Handler()
        async with session(sim.s.endpoint, pki, "viewer") as c:
            sensor = await node(c, "BR01.Bioreactor.FunctionSet.LactateSensor.SensorValue")
            sub = await c.create_subscription(50, handler)
            await sub.subscribe_data_change(sensor)
            await asyncio.sleep(1.5)
            await sub.delete()
        return handler.values

    values = asyncio.run(go())
    assert len(values) >= 5
    assert len(set(values)) >= 3  # noisy online probe updated each plant step


# -- APC handshake -----------------------------------------------------------------------------
def test_write_setpoints_handshake(sim: SimThread, pki: Pki) -> None:
    unit = sim.s.unit("BR01")

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with session(sim.s.endpoint, pki, "apc") as apc:
            heartbeat = asyncio.create_task(beating(apc, "BR01"))
            # Local: refused with BadInvalidState, nothing changes
            out["local"] = await call(
                apc, SP, "WriteSetpoints", strings(["glucose_feed"]), doubles([5.0])
            )
            # the controller cannot grant itself Remote
            out["self_grant"] = await call(
                apc, SP, "RequestMode", ua.Variant(1, ua.VariantType.Int32)
            )
            await grant_remote(sim, pki)
            targets = await (await node(apc, f"{SP}.Setpoints")).read_value()
            out["before"] = targets
            out["mixed"] = await call(
                apc,
                SP,
                "WriteSetpoints",
                strings(["glucose_feed", "il2_addition", "perfusion_rate"]),
                doubles([5.0, 1e9, 0.5]),
            )
            out["after"] = list(unit.apc.targets.values())
            out["bad"] = await call(
                apc, SP, "WriteSetpoints", strings(["il2_addition"]), doubles([-1.0])
            )
            out["after_bad"] = dict(unit.apc.targets)
            await asyncio.sleep(0.5)
            target = await node(apc, "BR01.Bioreactor.FunctionSet.GlucoseFeedPump.TargetValue")
            out["target_node"] = await target.read_value()
            # Float into a Double array is refused as a whole (wrong argument type)
            try:
                await call(
                    apc,
                    SP,
                    "WriteSetpoints",
                    strings(["glucose_feed"]),
                    ua.Variant([1.0], ua.VariantType.Float, is_array=True),
                )
                out["float"] = "accepted"
            except ua.UaStatusCodeError as exc:
                out["float"] = exc.code
            await call(apc, SP, "RequestMode", ua.Variant(0, ua.VariantType.Int32))
            heartbeat.cancel()
        return out

    out = asyncio.run(go())
    bad_state = ua.StatusCode(ua.StatusCodes.BadInvalidState)
    assert out["local"] == [bad_state]
    assert out["self_grant"] == ua.StatusCode(ua.StatusCodes.BadUserAccessDenied)
    assert out["mixed"] == [
        ua.StatusCode(ua.StatusCodes.Good),
        ua.StatusCode(ua.StatusCodes.BadOutOfRange),
        ua.StatusCode(ua.StatusCodes.Good),
    ]
    assert out["after"][NAMES.index("glucose_feed")] == 5.0
    assert out["after"][NAMES.index("il2_addition")] == out["before"][NAMES.index("il2_addition")]
    assert out["bad"] == [ua.StatusCode(ua.StatusCodes.BadOutOfRange)]
    assert out["after_bad"]["il2_addition"] == out["before"][NAMES.index("il2_addition")]
    assert out["target_node"] == 5.0
    assert out["float"] == ua.StatusCodes.BadInvalidArgument
    assert unit.apc.mode.name == "LOCAL"


def test_viewer_and_engineer_cannot_write(sim: SimThread, pki: Pki) -> None:
    async def go(user: str) -> tuple[Any, Any]:
        async with session(sim.s.endpoint, pki, user) as c:
            result = await call(
                c, "APC.BR02", "WriteSetpoints", strings(["glucose_feed"]), doubles([1.0])
            )
            try:
                await beat(c, "BR02", 99)
                hb: Any = "accepted"
            except ua.UaStatusCodeError as exc:
                hb = exc.code
            return result, hb

    for user in ("viewer", "engineer", "operator"):
        result, hb = asyncio.run(go(user))
        assert result == [ua.StatusCode(ua.StatusCodes.BadUserAccessDenied)], user
        assert hb == ua.StatusCodes.BadUserAccessDenied, user
    assert sim.s.unit("BR02").apc.heartbeat == 0


def test_watchdog_sheds_to_the_fallback_setpoints_when_the_heartbeat_stops(
    sim: SimThread, pki: Pki
) -> None:
    unit = sim.s.unit("BR02")
    timeout = sim.s.config.heartbeat_timeout_s

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with session(sim.s.endpoint, pki, "apc") as apc:
            heartbeat = asyncio.create_task(beating(apc, "BR02"))
            await asyncio.sleep(0.3)
            await grant_remote(sim, pki, "BR02")
            out["write"] = await call(
                apc, "APC.BR02", "WriteSetpoints", strings(["glucose_feed"]), doubles([4.0])
            )
            heartbeat.cancel()
            # heartbeat stops now
            stopped = time.monotonic()
            fallback = await node(apc, "APC.BR02.Fallback")
            for _ in range(int(5 * timeout / 0.05)):
                if await fallback.read_value():
                    break
                await asyncio.sleep(0.05)
            out["shed_after"] = time.monotonic() - stopped
            out["fallback"] = await fallback.read_value()
            out["mode"] = await (await node(apc, "APC.BR02.Mode")).read_value()
            held = await (await node(apc, "APC.BR02.Setpoints")).read_value()
            out["held"] = held
            await asyncio.sleep(0.5)
            out["held_later"] = await (await node(apc, "APC.BR02.Setpoints")).read_value()
            # writes refused; a late heartbeat does not restore Remote
            await beat(apc, "BR02", 3)
            out["late"] = await call(
                apc, "APC.BR02", "WriteSetpoints", strings(["glucose_feed"]), doubles([6.0])
            )
        async with session(sim.s.endpoint, pki, "operator") as op:
            # heartbeat unhealthy again by now: the operator is refused too
            await asyncio.sleep(timeout + 0.3)
            out["regrant"] = await call(
                op, "APC.BR02", "RequestMode", ua.Variant(1, ua.VariantType.Int32)
            )
        return out

    out = asyncio.run(go())
    assert out["write"] == [ua.StatusCode(ua.StatusCodes.Good)]
    assert out["shed_after"] <= timeout + 0.5  # within the time-out (+ one plant tick)
    assert out["fallback"] is True and out["mode"] == 0
    # the safe state (the batch-start values, the default --fallback), not the last move 4.0
    assert out["held"][NAMES.index("glucose_feed")] == pytest.approx(0.0)
    assert out["held_later"] == out["held"]
    assert out["late"] == [ua.StatusCode(ua.StatusCodes.BadInvalidState)]
    assert out["regrant"] == ua.StatusCode(ua.StatusCodes.BadInvalidState)
    assert unit.apc.shed_count >= 1


# -- faults ------------------------------------------------------------------------------------
def test_injected_sensor_faults(sim: SimThread, pki: Pki) -> None:
    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with session(sim.s.endpoint, pki, "operator") as op:

            def args(kind: str, target: str) -> list[ua.Variant]:
                return [
                    ua.Variant(kind, ua.VariantType.String),
                    ua.Variant(target, ua.VariantType.String),
                    ua.Variant(0.0, ua.VariantType.Double),
                ]

            glucose = await node(op, "BR02.Bioreactor.FunctionSet.GlucoseSensor.SensorValue")
            lactate = await node(op, "BR02.Bioreactor.FunctionSet.LactateSensor.SensorValue")
            cells = await node(
                op, "BR02.Bioreactor.FunctionSet.ViableCellDensitySensor.SensorValue"
            )
            await call(op, "APC", "InjectFault", *args("nan", "BR02.glucose"))
            await call(op, "APC", "InjectFault", *args("stuck", "BR02.lactate"))
            await call(op, "APC", "InjectFault", *args("stale", "BR02.viable_cells"))
            await asyncio.sleep(0.3)
            first = [
                await n.read_data_value(raise_on_bad_status=False)
                for n in (glucose, lactate, cells)
            ]
            await asyncio.sleep(0.5)
            second = [
                await n.read_data_value(raise_on_bad_status=False)
                for n in (glucose, lactate, cells)
            ]
            out["first"], out["second"] = first, second
            await call(op, "APC", "InjectFault", *args("clear", "*"))
            async with session(sim.s.endpoint, pki, "viewer") as viewer:
                try:
                    await call(viewer, "APC", "InjectFault", *args("nan", "*"))
                    out["viewer"] = "accepted"
                except ua.UaStatusCodeError as exc:
                    out["viewer"] = exc.code
        return out

    out = asyncio.run(go())
    _, l1, c1 = out["first"]
    g2, l2, c2 = out["second"]
    assert math.isnan(g2.Value.Value)
    assert l2.Value.Value == l1.Value.Value and l2.SourceTimestamp > l1.SourceTimestamp  # stuck
    assert c2.Value.Value == c1.Value.Value and c2.SourceTimestamp == c1.SourceTimestamp  # stale
    assert out["viewer"] == ua.StatusCodes.BadUserAccessDenied


# -- printer -----------------------------------------------------------------------------------
def test_printer_job_lifecycle_rejection_and_fault(sim: SimThread, pki: Pki) -> None:
    ctrl = "Printer.JobManagement.JobOrderControl"

    async def store(c: Client, job: str, cells: float, start_in_h: float) -> int:
        epoch = await (await node(c, "Clock.BatchStartTime")).read_value()
        now_h = await (await node(c, "Clock.ProcessTime")).read_value()
        when = epoch + timedelta(hours=now_h + start_in_h)
        return int(
            await call(
                c,
                ctrl,
                "StoreAndStart",
                ua.Variant(job, ua.VariantType.String),
                ua.Variant("P0007", ua.VariantType.String),
                ua.Variant("BR01-P0007", ua.VariantType.String),
                ua.Variant(cells, ua.VariantType.Double),
                ua.Variant(10.0, ua.VariantType.Double),
                ua.Variant(when, ua.VariantType.DateTime),
            )
        )

    async def state(c: Client, job: str) -> str:
        return str(
            await (await node(c, f"Printer.JobManagement.JobOrderList.{job}.State")).read_value()
        )

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        endpoint = sim.s.printer_endpoint
        assert endpoint is not None
        async with session(endpoint, pki, "apc") as c:
            out["ok"] = await store(c, "JOB-1", 0.1, 3.0)  # 10 mL: 0.5 h setup + 1 h printing
            out["rejected"] = await store(c, "JOB-2", 5.0, 0.5)  # 500 mL > cartridge
            out["state0"] = await state(c, "JOB-1")
            for _ in range(200):
                if await state(c, "JOB-1") == "Ended":
                    break
                await asyncio.sleep(0.1)
            out["ended"] = await state(c, "JOB-1")
            base = "Printer.JobManagement.JobOrderList.JOB-1"
            out["cells"] = await (await node(c, f"{base}.ResultCellsPrinted")).read_value()
            out["ok3"] = await store(c, "JOB-3", 0.2, 0.0)
            for _ in range(50):
                if await state(c, "JOB-3") == "Running":
                    break
                await asyncio.sleep(0.05)
            async with session(endpoint, pki, "operator") as op:
                await call(
                    op,
                    "APC",
                    "InjectFault",
                    ua.Variant("printer", ua.VariantType.String),
                    ua.Variant("*", ua.VariantType.String),
                    ua.Variant(0.0, ua.VariantType.Double),
                )
                await asyncio.sleep(0.3)
                out["aborted"] = await state(c, "JOB-3")
                out["machine"] = (
                    await (await node(c, "Printer.MachineryItemState.CurrentState")).read_value()
                ).Text
                out["outcome"] = await (
                    await node(c, "Printer.JobManagement.JobOrderList.JOB-3.ResultOutcome")
                ).read_value()
                await call(op, "Printer", "ClearFault")
            async with session(endpoint, pki, "viewer") as v:
                out["viewer"] = int(
                    await call(v, ctrl, "Abort", ua.Variant("JOB-3", ua.VariantType.String))
                )
        return out

    out = asyncio.run(go())
    assert out["ok"] == 0 and out["rejected"] == 4
    assert out["state0"] == "AllowedToStart"
    assert out["ended"] == "Ended"
    assert out["cells"] == pytest.approx(0.1)
    assert out["ok3"] == 0
    assert out["aborted"] == "Aborted" and out["machine"] == "OutOfService"
    assert "aborted" in out["outcome"]
    assert out["viewer"] == 8
    assert "JOB-2" not in sim.s.printer.jobs


def test_server_restart_fault_comes_back(sim: SimThread, pki: Pki) -> None:
    async def inject() -> None:
        sim.s.faults.add(Fault("restart", "*", sim.s.process_h(), 1.0))

    sim.run(inject)

    async def go() -> tuple[bool, float]:
        await asyncio.sleep(0.5)
        try:
            async with session(sim.s.endpoint, pki, "viewer"):
                down = False
        except (TimeoutError, ua.UaError, ConnectionError, OSError):
            down = True
        for _ in range(100):
            try:
                async with session(sim.s.endpoint, pki, "viewer") as c:
                    return down, float(await (await node(c, "Clock.ProcessTime")).read_value())
            except (TimeoutError, ua.UaError, ConnectionError, OSError):
                await asyncio.sleep(0.2)
        raise AssertionError("server did not come back")

    down, t = asyncio.run(go())
    assert down
    assert t > 0


def test_functional_unit_stop_and_start(sim: SimThread, pki: Pki) -> None:
    fus = "BR02.Bioreactor.FunctionalUnitState"

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with session(sim.s.endpoint, pki, "viewer") as viewer:
            try:
                await call(viewer, fus, "Stop")
                out["viewer"] = "accepted"
            except ua.UaStatusCodeError as exc:
                out["viewer"] = exc.code
        async with session(sim.s.endpoint, pki, "operator") as op:
            await call(op, fus, "Stop")
            state = await node(op, f"{fus}.CurrentState")
            out["stopped"] = (await state.read_value()).Text
            pump = await node(op, "BR02.Bioreactor.FunctionSet.GlucoseFeedPump")
            cfs = await pump.get_child(
                [f"{await op.get_namespace_index(LADS_URI)}:ControlFunctionState", "0:CurrentState"]
            )
            out["pump_state"] = (await cfs.read_value()).Text
            out["setpoints"] = await (await node(op, "APC.BR02.WorkingSetpoints")).read_value()
            out["remote"] = await call(
                op, "APC.BR02", "RequestMode", ua.Variant(1, ua.VariantType.Int32)
            )
            out["extra"] = await _status(call(op, fus, "Start", NO_PROPERTIES, NO_PROPERTIES))
            out["missing"] = await _status(call(op, fus, "Start"))
            await call(op, fus, "Start", NO_PROPERTIES)  # LADS: Start(Properties)
            out["started"] = (await state.read_value()).Text
        return out

    out = asyncio.run(go())
    assert out["viewer"] == ua.StatusCodes.BadUserAccessDenied
    assert out["stopped"] == "Stopped" and out["pump_state"] == "Stopped"
    assert out["setpoints"] == [0.0, 0.0, 0.0]  # pumps off
    assert out["remote"] == ua.StatusCode(ua.StatusCodes.BadInvalidState)
    assert out["extra"] == ua.StatusCodes.BadTooManyArguments
    assert out["missing"] == ua.StatusCodes.BadArgumentsMissing
    assert out["started"] == "Running"

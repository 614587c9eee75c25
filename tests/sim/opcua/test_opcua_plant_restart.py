"""A restarted plant simulator is the same plant (issue 22 item 2 / issue 23 item 4): the
culture survives the in-process restart fault, and with ``--state-file`` a kill -9 of
``hmpc-sim serve`` too: same BatchId, same BatchStartTime, process time continuing (never
back to 0), the culture's state continuing, the unit back in Local with its fallback
setpoints."""

from __future__ import annotations

import asyncio
import math
import os
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from asyncua import Client, ua
from opcua_testkit import Pki, SimThread, free_ports, node, session

from plant_models.errors import ConfigError
from sim.opcua.apc import Mode
from sim.opcua.faults import Fault
from sim.opcua.server import (
    SimulatorConfig,
    Simulators,
    load_plant_state,
    restore_plant_state,
    save_plant_state,
)

ROOT = Path(__file__).resolve().parents[3]


def test_plant_state_round_trip_continues_the_batch(tmp_path: Path) -> None:
    """Without a network: the saved culture is restored to the last bit, the clock continues
    from the saved epoch, and the restart leaves the unit Local in its safe state."""
    path = tmp_path / "plant.json"
    config = SimulatorConfig(units=2, speed=3600.0, patient_seed=3, state_file=path)
    first = Simulators(config)
    for unit in first.units:
        unit.apc.targets["glucose_feed"] = unit.apc.working["glucose_feed"] = 2.0
        for _ in range(60):  # 6 h: assays sampled and in transit, noise drawn
            unit.advance(0.1)
    save_plant_state(first, path)
    second = Simulators(config)
    assert second.units[0].plant.time_h == 0.0
    saved = load_plant_state(path)
    assert saved is not None
    restore_plant_state(second, saved)
    for a, b in zip(first.units, second.units, strict=True):
        assert b.batch_id == a.batch_id
        assert b.plant.time_h == a.plant.time_h == pytest.approx(6.0)
        np.testing.assert_array_equal(b.plant.state, a.plant.state)
        assert b.plant.readings.pending == a.plant.readings.pending
        assert b.totals == a.totals
        assert b.apc.mode is Mode.LOCAL and b.apc.fallback
        assert b.apc.targets == b.apc.fallback_setpoints == dict.fromkeys(b.apc.targets, 0.0)
        assert b.apc.working["glucose_feed"] == 2.0  # ramps to the fallback from there
        # the same noise stream continues: the next readings are identical
        ma = [m.value for m in a.plant.step(dict(a.apc.working), 0.1)]
        mb = [m.value for m in b.plant.step(dict(b.apc.working), 0.1)]
        assert ma == mb
    assert second.clock.epoch == first.clock.epoch
    assert second.clock.process_h() >= 0.0
    # a state file of another plant is refused, never silently mixed
    other = Simulators(SimulatorConfig(units=1, speed=3600.0, state_file=path))
    with pytest.raises(ConfigError, match="units"):
        restore_plant_state(other, saved)


def test_in_process_restart_fault_keeps_the_culture(sim: SimThread, pki: Pki) -> None:
    unit = sim.s.unit("BR01")

    async def before() -> tuple[float, str, Any]:
        sim.s.faults.add(Fault("restart", "*", sim.s.process_h(), 1.0))
        return unit.plant.time_h, unit.batch_id, sim.s.clock.epoch

    t0, batch, epoch = sim.run(before)

    async def after() -> tuple[float, str, datetime]:
        await asyncio.sleep(0.5)
        for _ in range(100):
            try:
                async with session(sim.s.endpoint, pki, "viewer") as c:
                    t = float(await (await node(c, "Clock.ProcessTime")).read_value())
                    b = str(await (await node(c, "APC.BR01.BatchId")).read_value())
                    s = await (await node(c, "Clock.BatchStartTime")).read_value()
                    return t, b, s
            except (TimeoutError, ua.UaError, ConnectionError, OSError):
                await asyncio.sleep(0.2)
        raise AssertionError("server did not come back")

    t1, batch1, start1 = asyncio.run(after())
    assert t1 > t0 and batch1 == batch
    assert abs((start1.replace(tzinfo=epoch.tzinfo) - epoch).total_seconds()) < 1e-3


def _serve(port: int, pki: Pki, state: Path, log: Path) -> subprocess.Popen[bytes]:
    cmd = [
        sys.executable, "-m", "sim.opcua.cli", "serve",
        "--port", str(port), "--printer-port", "0",
        "--units", "1", "--speed", "3600", "--patient-seed", "3",
        "--pki", str(pki.folder), "--dev-insecure", "--hand-built-model",
        "--state-file", str(state),
    ]  # fmt: skip
    with log.open("wb") as err:
        return subprocess.Popen(
            cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err,
            env={**os.environ, "PYTHONWARNINGS": "ignore"},
        )  # fmt: skip


async def _read_plant(port: int, timeout_s: float = 60.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            client = Client(f"opc.tcp://127.0.0.1:{port}/hmpc/bioreactor")
            client.set_user("viewer")
            client.set_password("view-secret")
            async with client:
                ns = await client.get_namespace_index("urn:hmpc:sim")
                paths = {
                    "time_h": "Clock.ProcessTime",
                    "start": "Clock.BatchStartTime",
                    "batch": "APC.BR01.BatchId",
                    "mode": "APC.BR01.Mode",
                    "fallback": "APC.BR01.Fallback",
                }
                return {
                    key: await client.get_node(ua.NodeId(path, ns)).read_value()
                    for key, path in paths.items()
                }
        except (TimeoutError, ua.UaError, ConnectionError, OSError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


@pytest.mark.integration
def test_serve_killed_with_sigkill_continues_the_batch_from_its_state_file(
    pki: Pki, tmp_path: Path
) -> None:
    (port,) = free_ports(1)
    state = tmp_path / "plant.json"
    procs = []
    try:
        procs.append(_serve(port, pki, state, tmp_path / "serve1.err"))
        before = asyncio.run(_read_plant(port))
        time.sleep(2.0)  # two process hours, several saves
        before = asyncio.run(_read_plant(port))
        assert state.exists()
        procs[0].send_signal(signal.SIGKILL)
        assert procs[0].wait(30) == -signal.SIGKILL
        time.sleep(1.0)
        procs.append(_serve(port, pki, state, tmp_path / "serve2.err"))
        after = asyncio.run(_read_plant(port))
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
                try:
                    p.wait(30)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
    err = (tmp_path / "serve2.err").read_text()
    assert after["batch"] == before["batch"], err[-2000:]
    assert after["start"] == before["start"]
    # never back to 0: at least where it was, caught up by the downtime (3600 x wall time)
    assert after["time_h"] >= before["time_h"] + 1.0, (before, after)
    assert after["mode"] == 0 and after["fallback"]  # a restart sheds the controller
    assert "continued from" in err
    assert not math.isnan(after["time_h"])


def _doubles(values: list[float]) -> ua.Variant:
    return ua.Variant(values, ua.VariantType.Double, is_array=True)


def test_fallback_setpoints_are_published_and_set_by_operator_or_engineer(
    sim: SimThread, pki: Pki
) -> None:
    """FallbackSetpoints (the safe state on shed) is read by everyone; SetFallbackSetpoints
    is for the operator and the engineer, per item, within the setpoint limits."""
    names = ua.Variant(["glucose_feed", "il2_addition"], ua.VariantType.String, is_array=True)
    obj = "APC.BR01"

    async def go() -> dict[str, Any]:
        out: dict[str, Any] = {}
        async with session(sim.s.endpoint, pki, "viewer") as viewer:
            out["before"] = await (await node(viewer, f"{obj}.FallbackSetpoints")).read_value()
        for user in ("apc", "engineer"):
            async with session(sim.s.endpoint, pki, user) as c:
                method = await node(c, f"{obj}.SetFallbackSetpoints")
                out[user] = await (await node(c, obj)).call_method(
                    method, names, _doubles([1.0, 25.0])
                )
                out[f"{user}_after"] = await (
                    await node(c, f"{obj}.FallbackSetpoints")
                ).read_value()
            async with session(sim.s.endpoint, pki, "operator") as op:  # restore
                await (await node(op, obj)).call_method(
                    await node(op, f"{obj}.SetFallbackSetpoints"), names, _doubles([0.0, 0.0])
                )
        return out

    out = asyncio.run(go())
    assert out["before"] == [0.0, 0.0, 0.0]  # --fallback initial (the batch-start values)
    denied = ua.StatusCode(ua.StatusCodes.BadUserAccessDenied)
    assert out["apc"] == [denied, denied]  # the controller cannot choose its own safe state
    assert out["apc_after"] == [0.0, 0.0, 0.0]
    good, out_of_range = (ua.StatusCode(c) for c in (0, ua.StatusCodes.BadOutOfRange))
    assert out["engineer"] == [good, out_of_range]  # il2_addition is limited to 20 kIU/h
    assert out["engineer_after"] == [0.0, 1.0, 0.0]
    assert sim.s.unit("BR01").apc.fallback_setpoints["glucose_feed"] == 0.0  # restored

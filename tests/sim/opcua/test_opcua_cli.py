"""``hmpc-sim serve`` as a process: starts, serves (here the hand-built LADS subset and the
development None endpoint), and stops cleanly on SIGTERM."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from asyncua import Client, ua
from opcua_testkit import Pki, free_ports

from sim.opcua.lads import DI_URI, LADS_URI

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]


def test_serve_command_runs_and_stops_on_sigterm(pki: Pki, tmp_path: Path) -> None:
    port, printer_port = free_ports(2)
    cmd = [
        sys.executable, "-m", "sim.opcua.cli", "serve",
        "--port", str(port), "--printer-port", str(printer_port),
        "--units", "1", "--speed", "3600", "--patient-seed", "3",
        "--pki", str(pki.folder), "--dev-insecure", "--hand-built-model",
        "--fault", "stuck:BR01.glucose:0:0",
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.strip() == "ready":
                break
        assert lines and lines[-1].strip() == "ready", (
            lines,
            proc.stderr.read() if proc.stderr else "",
        )
        assert "hand-built subset" in lines[0]

        async def browse() -> tuple[set[str], str, float, float]:
            client = Client(f"opc.tcp://127.0.0.1:{port}/hmpc/bioreactor")
            # the development endpoint: SecurityPolicy None, still a named user
            client.set_user("viewer")
            client.set_password("view-secret")
            async with client:
                endpoints = await client.get_endpoints()
                di = await client.get_namespace_index(DI_URI)
                lads = await client.get_namespace_index(LADS_URI)
                ds = await client.nodes.objects.get_child(f"{di}:DeviceSet")
                br = (await ds.get_children(refs=ua.ObjectIds.HasComponent))[0]
                fus = await br.get_child(f"{lads}:FunctionalUnitSet")
                names = {(await n.read_browse_name()).Name for n in await fus.get_children()}
                ns = await client.get_namespace_index("urn:hmpc:sim")
                glucose = client.get_node(
                    ua.NodeId("BR01.Bioreactor.FunctionSet.GlucoseSensor.SensorValue", ns)
                )
                first = await glucose.read_value()
                await asyncio.sleep(0.5)
                second = await glucose.read_value()
            await asyncio.sleep(0.01)
            policies = {e.SecurityPolicyUri.rsplit("#", 1)[1] for e in endpoints}
            return names, ",".join(sorted(policies)), first, second

        names, policies, first, second = asyncio.run(browse())
        assert names == {"Bioreactor"}
        assert "None" in policies and "Basic256Sha256" in policies
        assert first == second  # the scheduled stuck-sensor fault
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            if proc.stdout:
                proc.stdout.close()
            if proc.stderr:
                proc.stderr.close()
    assert code == 0


def test_serve_without_users_file_says_what_to_do(tmp_path: Path) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "sim.opcua.cli", "serve", "--pki", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2
    assert "opcua-user" in out.stderr


def test_opcua_user_command_writes_hashed_password(tmp_path: Path) -> None:
    users = tmp_path / "users.toml"
    out = subprocess.run(
        [sys.executable, "-m", "sim.opcua.cli", "opcua-user", "alice", "operator",
         "--users", str(users)],
        cwd=ROOT, capture_output=True, text=True, timeout=60,
        env={**os.environ, "HMPC_OPCUA_PASSWORD": "s3cret"},
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    text = users.read_text()
    assert 'role = "operator"' in text and "s3cret" not in text

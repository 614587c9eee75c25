"""``hmpc run`` and ``hmpc-sim serve`` as separate processes on 127.0.0.1 (secure), and
``hmpc-sim bench loop`` for a small unit count (figures printed, never asserted)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runtime_testkit import PASSWORDS, free_ports, stop_process, wait_ready

from controller.records.audit import AuditTrail, verify_historian
from controller.records.historian import Historian
from sim.bench_loop import PASSWORD_ENV, grant_remote, write_sim_site
from sim.cli import main as sim_main

pytestmark = pytest.mark.integration


def test_hmpc_run_drives_two_units_and_stops_cleanly_on_sigterm(tmp_path: Path, pki: Path) -> None:
    (port,) = free_ports(1)
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sim.opcua.cli",
            "serve",
            "--port",
            str(port),
            "--printer-port",
            "0",
            "--units",
            "2",
            "--speed",
            "3600",
            "--pki",
            str(pki),
            "--hand-built-model",
            "--heartbeat-timeout",
            "5",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    run: subprocess.Popen[str] | None = None
    try:
        wait_ready(server)
        site = write_sim_site(
            tmp_path / "site.toml",
            endpoint=f"opc.tcp://127.0.0.1:{port}/hmpc/bioreactor",
            pki=pki,
            units=["BR01", "BR02"],
            controller="rule",
            timing={"heartbeat_interval_s": 0.5},
        )
        out = tmp_path / "out"
        env = {**os.environ, PASSWORD_ENV: PASSWORDS["apc"]}
        run = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "controller.cli",
                "run",
                "--site",
                str(site.path),
                "--out",
                str(out),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )

        async def operator() -> list[str]:
            return [await grant_remote(site, u, PASSWORDS["operator"]) for u in ("BR01", "BR02")]

        assert asyncio.run(operator()) == ["Good", "Good"]
        time.sleep(4.0)  # a few process hours under control
        run.send_signal(signal.SIGTERM)
        stdout, stderr = run.communicate(timeout=60)
        assert run.returncode == 0, stderr[-2000:]
    finally:
        if run is not None:
            stop_process(run)
        stop_process(server)

    assert "BR01" in stdout and "ended: stopped" in stdout
    summary = json.loads((out / "run_summary.json").read_text())
    units = {u["unit"]: u for u in summary["units"]}
    assert set(units) == {"BR01", "BR02"}
    for u in units.values():
        assert u["ended"] == "stopped" and u["engagements"] == 1
        assert u["bundles"] >= 1 and set(u["item_statuses"]) == {"Good"}
    assert (out / "hmpc-run.log").read_text().count("write unit=") >= 2
    with Historian(str(out / "historian.sqlite"), create=False) as historian:
        (batch1, batch2) = sorted(historian.batches())
        for batch, unit in ((batch1, "BR01"), (batch2, "BR02")):
            steps = historian.steps(batch, unit)
            assert any(s.mode == "remote" for s in steps)
            assert any(p.status == "Good" for s in steps for p in s.setpoints)
            messages = [e.message for e in historian.events(batch, unit)]
            assert "controller stopping" in messages
            assert "handed back to Local (Good)" in messages  # not left to the watchdog
            assert [e.kind for e in historian.events(batch, unit, kind="config")] == ["config"]
            # an uninterrupted batch is audited: every write (with its confirmed write-ahead
            # intent) and the mode changes (granted at the plant, handed back by hmpc)
            intents = historian.intents(batch, unit)
            audit = AuditTrail(historian).records(batch)
            writes = [r for r in audit if r.action == "setpoint_write" and r.unit == unit]
            assert intents and {i.state for i in intents} == {"confirmed"}
            assert len(writes) == len(intents) == units[unit]["bundles"]
            assert [r.new_value for r in writes] == [dict(i.target) for i in intents]
            modes = [(r.user, r.old_value, r.new_value) for r in audit if r.action == "mode_change"]
            assert ("plant", "local", "remote") in modes and ("hmpc", "remote", "local") in modes
        assert any(r.action == "config_load" for r in AuditTrail(historian).records())
        result, records = verify_historian(historian, anchor=str(out / "historian.anchor.jsonl"))
        assert result.ok and records.ok, (result.issues, records.issues)


def test_bench_loop_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "loop.json"
    assert sim_main(["bench", "loop", "--units", "2", "--cycles", "3", "--json", str(out)]) == 0
    figures = json.loads(out.read_text())
    assert figures["units"] == 2 and figures["engaged_cycles"] >= 2
    for key in ("overhead_p50_s", "overhead_p99_s", "bundle_overhead_p50_s"):
        assert figures[key] >= 0.0
    assert figures["overhead_p50_s"] <= figures["overhead_p99_s"]
    assert set(figures["item_statuses"]) == {"Good"} and figures["overruns"] == 0
    assert "loop overhead p50" in capsys.readouterr().out

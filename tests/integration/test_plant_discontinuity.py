"""A restarted plant is a different plant (issue 22 §2), with real processes: ``hmpc run``
controls a ``hmpc-sim serve`` plant; the simulator is killed (-9) and started again, so the
plant comes back at process time 0 under the same BatchId. The controller must notice,
stop writing, raise one alarm, and never feed the old estimate the new plant's data; the
same ``hmpc run`` started again records the new plant under a new batch record."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from runtime_testkit import PASSWORDS, free_ports, stop_process, wait_ready, wait_until

from controller.records.historian import Historian
from sim.bench_loop import PASSWORD_ENV, grant_remote, write_sim_site

pytestmark = pytest.mark.integration


def _serve(port: int, pki: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "sim.opcua.cli", "serve", "--port", str(port)),
            *("--printer-port", "0", "--units", "1", "--speed", "3600", "--pki", str(pki)),
            *("--hand-built-model", "--heartbeat-timeout", "5"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    wait_ready(proc)
    return proc


def _run(site: Path, out: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "controller.cli", "run", "--site", str(site), "--out", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, PASSWORD_ENV: PASSWORDS["apc"]},
    )


def _remote_writes(db: Path) -> int:
    """Steps with a setpoint the plant accepted (read while ``hmpc run`` writes)."""
    if not db.exists():
        return 0
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=10) as conn:
        try:
            (count,) = conn.execute(
                "SELECT count(*) FROM setpoints WHERE status = 'Good'"
            ).fetchone()
        except sqlite3.OperationalError:  # tables not created yet
            return 0
    return int(count)


def test_a_plant_restarted_under_the_same_batch_id_is_never_controlled_as_the_old_one(
    tmp_path: Path, pki: Path
) -> None:
    (port,) = free_ports(1)
    server = _serve(port, pki)
    run: subprocess.Popen[str] | None = None
    out = tmp_path / "out"
    db = out / "historian.sqlite"
    try:
        site = write_sim_site(
            tmp_path / "site.toml",
            endpoint=f"opc.tcp://127.0.0.1:{port}/hmpc/bioreactor",
            pki=pki,
            units=["BR01"],
            controller="rule",
            timing={"heartbeat_interval_s": 0.5, "reconnect_interval_s": 0.5},
        )
        run = _run(site.path, out)
        assert asyncio.run(grant_remote(site, "BR01", PASSWORDS["operator"])) == "Good"
        wait_until(lambda: _remote_writes(db) >= 3, 120, "three accepted writes")
        # the plant restarts: same BatchId, process time from 0 again
        stop_process(server, signal.SIGKILL)
        restarted = time.time()
        server = _serve(port, pki)
        stdout, stderr = run.communicate(timeout=120)  # the unit's loop ends by itself
        assert run.returncode == 1, stderr[-2000:]
        assert "ALARM BR01" in stdout and "ended: discontinuity" in stdout

        with Historian(str(db), create=False) as historian:
            (batch,) = historian.batches()
            alarms = historian.events(batch, "BR01", kind="discontinuity")
            assert len(alarms) == 1 and alarms[0].severity == "alarm"
            assert "went back" in alarms[0].message or "BatchStartTime" in alarms[0].message
            steps = historian.steps(batch, "BR01")
            times = [s.process_time_h for s in steps]
            assert times == sorted(times)  # one plant lifetime: time never runs backwards
            assert all(s.wall_time <= alarms[0].wall_time for s in steps)
        log = (out / "hmpc-run.log").read_text()
        tail = log[log.index("kind=discontinuity") :]
        assert "write unit=" not in tail  # nothing written to the new plant

        # the same command again: the new plant gets its own batch record, from a fresh start
        run = _run(site.path, out)
        assert asyncio.run(grant_remote(site, "BR01", PASSWORDS["operator"])) == "Good"

        def new_record_written() -> bool:
            with Historian(str(db), create=False) as h:
                return any(
                    any(p.status == "Good" for s in h.steps(b, "BR01") for p in s.setpoints)
                    for b in h.batches()
                    if b == f"{batch}~2"
                )

        wait_until(new_record_written, 120, "writes under the new batch record")
        stop_process(run)
        assert run.returncode == 0
        with Historian(str(db), create=False) as historian:
            assert sorted(historian.batches()) == [batch, f"{batch}~2"]
            new = historian.steps(f"{batch}~2", "BR01")
            # the new record follows the new plant's clock, which started at the restart
            # (3600 process h per wall h), not the old plant's, which had reached
            # steps[-1]: independent of how long the second start took
            assert new[0].step == 0
            assert new[0].process_time_h <= new[0].wall_time - restarted + 1.0
            old_alarms = historian.events(batch, "BR01", kind="discontinuity")
            assert len(old_alarms) == 2  # the live detection and the one at the restart
            assert f"{batch}~2" in old_alarms[1].message
    finally:
        if run is not None:
            stop_process(run)
        stop_process(server)

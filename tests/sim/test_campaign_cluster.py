"""A campaign on a real two-node Ray cluster on 127.0.0.1 with no shared file system.

The head node (``ray start --head``, no CPUs, so it runs no task) and a worker node
(``ray start --address``, 2 CPUs, its own temporary directory and working directory) are
separate process groups started here and stopped afterwards, also on failure. Where the
kernel allows it (``unshare``), the worker node runs in a mount namespace of its own in
which the driver's folder (the campaign output and the MPC tuning file) is hidden under an
empty tmpfs: the runs on it can reach neither, so the tables the driver writes came
through Ray. The tables must equal those of a local run of the same seed.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("ray")

REPO = Path(__file__).resolve().parents[2]
RAY = Path(sys.executable).with_name("ray")
#: generous: ``ray start`` and a node joining take 10-30 s on the busy 2-core CI machine
START_TIMEOUT_S = 240.0
CAMPAIGN_TIMEOUT_S = 600.0
STOP_TIMEOUT_S = 90.0
CONTROLLERS = "recipe,rule,oracle"


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _wait_until(predicate: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.2)


def _group_pids(pgid: int) -> list[int]:
    """Live processes of process group ``pgid`` (from /proc)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                pids.append(int(entry.name))
    return pids


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the node's process group (``ray start --block`` stops its processes), then
    SIGKILL whatever is left after :data:`STOP_TIMEOUT_S`."""
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)
    with contextlib.suppress(AssertionError):
        _wait_until(lambda: not _group_pids(pgid), STOP_TIMEOUT_S, "the node to stop")
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)


def _hiding_prefix(hidden: Path) -> list[str] | None:
    """A command prefix running a process in a new mount namespace where ``hidden`` is an
    empty tmpfs, or None where the kernel or user may not do that."""
    unshare = shutil.which("unshare")
    if unshare is None:
        return None
    base = [unshare, "--mount", "--propagation", "private"]
    if os.geteuid() != 0:
        base.insert(2, "--map-root-user")
    script = 'mount -t tmpfs -o size=1m hmpc-hidden "$0" && exec "$@"'
    prefix = [*base, "sh", "-c", script, str(hidden)]
    probe = subprocess.run([*prefix, "true"], capture_output=True, check=False, timeout=60)
    return prefix if probe.returncode == 0 else None


def _cli(
    out: Path, mpc_config: Path, env: dict[str, str], *extra: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "sim.cli",
            "campaign",
            "--patients",
            "2",
            "--controllers",
            CONTROLLERS,
            "--seed",
            "3",
            "--days",
            "0.5",
            "--mpc-config",
            str(mpc_config),
            "--out",
            str(out),
            *extra,
        ],
        capture_output=True,
        text=True,
        check=False,
        env=env,
        cwd=REPO,
        timeout=CAMPAIGN_TIMEOUT_S,
    )


class _Cluster:
    """Head and worker node of a test cluster (each ``ray start --block`` in its own
    process group)."""

    def __init__(self, root: Path, env: dict[str, str], hidden: Path) -> None:
        self.root = root
        self.env = env
        self.hidden = hidden
        self.procs: list[subprocess.Popen[bytes]] = []
        self.port, self.head_agent, self.worker_agent = _free_ports(3)
        self.address = f"127.0.0.1:{self.port}"
        self.hiding: list[str] | None = None

    def _start(self, name: str, args: Sequence[str], prefix: Sequence[str] = ()) -> Path:
        temp = self.root / name
        temp.mkdir()
        with (self.root / f"{name}.log").open("wb") as log:
            proc = subprocess.Popen(
                [*prefix, str(RAY), "start", *args, f"--temp-dir={temp}", "--block"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=temp,  # its own working directory, not the driver's
                start_new_session=True,
            )
        self.procs.append(proc)
        logfile = self.root / f"{name}.log"

        def started() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"{name} node exited: {logfile.read_text()[-3000:]}")
            return "Ray runtime started" in logfile.read_text(errors="replace")

        _wait_until(started, START_TIMEOUT_S, f"the {name} node")
        return temp

    def start(self) -> None:
        common = [
            "--node-ip-address=127.0.0.1",
            "--object-store-memory=100000000",
            "--disable-usage-stats",
        ]
        self._start(
            "head",
            [
                "--head",
                f"--port={self.port}",
                "--num-cpus=0",  # the head runs no task: every run goes to the worker node
                "--include-dashboard=false",
                f"--dashboard-agent-listen-port={self.head_agent}",
                *common,
            ],
        )
        self.hiding = _hiding_prefix(self.hidden)
        self._start(
            "worker",
            [
                f"--address={self.address}",
                "--num-cpus=2",
                f"--dashboard-agent-listen-port={self.worker_agent}",
                *common,
            ],
            self.hiding or (),
        )

    def worker_raylet(self) -> tuple[int, str]:
        """(pid, Ray node id) of the worker node's raylet."""
        for pid in _group_pids(self.procs[-1].pid):
            with contextlib.suppress(OSError):
                argv = (Path("/proc") / str(pid) / "cmdline").read_bytes().split(b"\0")
                if argv and argv[0].endswith(b"/raylet"):
                    for arg in argv:
                        if arg.startswith(b"--node_id="):
                            return pid, arg.split(b"=", 1)[1].decode()
        raise AssertionError("the worker node's raylet was not found")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            _stop_group(proc)


@pytest.fixture
def cluster_env() -> Iterator[tuple[Path, dict[str, str]]]:
    """A short temporary root (Ray's socket paths must stay under 108 characters) and the
    environment of the nodes and the driver: this checkout first on the path (what
    ``pip install`` gives every node), the cluster's own auth token, no usage reports."""
    root = Path(tempfile.mkdtemp(prefix="hmpc-ray-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env |= {
        "PYTHONPATH": os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p),
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN": secrets.token_hex(32),
    }
    try:
        yield root, env
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.mark.integration
@pytest.mark.timeout(1200)
def test_campaign_on_a_two_node_cluster_equals_the_local_run(
    tmp_path: Path, cluster_env: tuple[Path, dict[str, str]]
) -> None:
    root, env = cluster_env
    driver = tmp_path / "driver"  # hidden from the worker node
    driver.mkdir()
    tuning = driver / "mpc.toml"
    tuning.write_bytes((REPO / "configs" / "mpc_tcell_hourly.toml").read_bytes())

    local = _cli(driver / "local", tuning, env, "--workers", "2")
    assert local.returncode == 0, local.stderr[-3000:]

    cluster = _Cluster(root, env, driver)
    try:
        cluster.start()
        raylet_pid, worker_node = cluster.worker_raylet()
        remote = _cli(driver / "cluster", tuning, env, "--address", cluster.address)
        assert remote.returncode == 0, remote.stderr[-3000:]
        assert "6 runs (6 run now, 0 already complete)" in remote.stdout
        assert "6/6" in remote.stderr and "failed=0" in remote.stderr  # the progress bar
        assert not (driver / "cluster" / "failures.csv").exists()
        if cluster.hiding is not None:
            # the worker node's view of the driver's folder: the empty tmpfs
            assert list(Path(f"/proc/{raylet_pid}/root{driver}").iterdir()) == []
        # resuming on the cluster runs nothing again
        again = _cli(driver / "cluster", tuning, env, "--address", cluster.address)
        assert again.returncode == 0, again.stderr[-3000:]
        assert "6 runs (0 run now, 6 already complete)" in again.stdout
    finally:
        cluster.stop()
    for proc in cluster.procs:
        assert not _group_pids(proc.pid), "a node's processes outlived the test"

    a, b = driver / "local", driver / "cluster"
    for name in ("summary.csv", "patients/recipe.csv", "patients/rule.csv", "patients/oracle.csv"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    for controller in CONTROLLERS.split(","):
        for patient in ("S3-P000", "S3-P001"):
            for name in ("trajectory.csv", "assays.csv"):
                path = Path("runs") / controller / patient / name
                assert (a / path).read_bytes() == (b / path).read_bytes(), path
    # every run ran on the worker node (the head has no CPU), which could not see this folder
    timing = pd.read_csv(b / "timing.csv")
    assert len(timing) == 6 and set(timing["node"]) == {worker_node}
    assert not list(b.rglob(".*.tmp"))

"""``hmpc-sim bench loop``: the controller runtime's loop overhead (everything but the
control law's step) for N bioreactors over secure OPC UA on loopback.

The simulators run as a separate process (``hmpc-sim serve``, accelerated); ``hmpc run``'s
service (:func:`controller.runtime.service.serve`) drives every unit with the rule
controller (its step takes microseconds; the overhead excludes it anyway); a simulated
operator grants Remote to each unit. Reported: ``overhead_p50_s`` and ``overhead_p99_s`` of
the engaged cycles, i.e. measurement hand-over, freshness gate, output limits, the
``WriteSetpoints`` round trip with its per-item statuses and the step record.

Also the helpers the integration tests use: a PKI with users for the simulators, a site
file for them derived from ``configs/site_sim.toml``, an in-memory recorder, and the
operator's Remote grant.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from controller.config_files import config_file
from controller.records.steps import EventRecord, StepRecord
from controller.runtime.site import SecurityConfig, SiteConfig, load_site
from plant_models.errors import ConfigError, PlantIOError
from plant_models.process import DEFAULT_PROCESS

__all__ = [
    "MemoryRecorder",
    "add_bench_loop",
    "grant_remote",
    "prepare_pki",
    "run_bench_loop",
    "write_sim_site",
]

log = logging.getLogger(__name__)

PASSWORD_ENV = "HMPC_APC_PASSWORD"  # noqa: S105 - the variable's name, not a password


class MemoryRecorder:
    """Step and event records in lists (the historian's two append methods)."""

    def __init__(self) -> None:
        self.steps: list[StepRecord] = []
        self.events: list[EventRecord] = []

    def append_step(self, record: StepRecord) -> None:
        self.steps.append(record)

    def append_event(self, record: EventRecord) -> None:
        self.events.append(record)


def prepare_pki(folder: Path, passwords: Mapping[str, str]) -> Path:
    """A simulator PKI folder with users (role = user name: ``apc``, ``operator``...)."""
    from sim.opcua.apc import Role
    from sim.opcua.security import write_user

    for name, password in passwords.items():
        write_user(folder / "users.toml", name, Role(name), password, iterations=1000)
    (folder / "trusted").mkdir(parents=True, exist_ok=True)
    return folder


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(float(value)) if isinstance(value, float) else str(value)
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"cannot write {type(value).__name__} to TOML")


def _toml(data: Mapping[str, Any], prefix: str = "") -> list[str]:
    lines = [f"{k} = {_toml_value(v)}" for k, v in data.items() if not isinstance(v, dict)]
    for k, v in data.items():
        if isinstance(v, dict):
            name = f"{prefix}.{k}" if prefix else k
            lines += ["", f"[{name}]", *_toml(v, name)]
    return lines


def write_sim_site(
    path: Path,
    *,
    endpoint: str,
    pki: Path,
    units: Sequence[str],
    controller: str = "rule",
    harvest_time_h: float | None = None,
    mpc_config: Path | None = None,
    timing: Mapping[str, float] | None = None,
) -> SiteConfig:
    """A site file for simulators at ``endpoint`` with PKI folder ``pki``: the tag map,
    clock and APC nodes of ``configs/site_sim.toml``, one unit per name."""
    with config_file("site_sim.toml").open("rb") as fh:
        data = tomllib.load(fh)
    data["site"] = {"name": f"simulators at {endpoint}", "output_dir": str(path.parent / "out")}
    data["endpoints"] = {"bioreactor": endpoint}
    data.pop("printer", None)
    sec = data["security"]
    sec["certificate"] = str(pki / "trusted" / "hmpc-controller_cert.der")
    sec["private_key"] = str(path.parent / "client" / "hmpc-controller_key.pem")
    sec["trusted_servers"] = str(pki / "own")
    sec["password_env"] = PASSWORD_ENV
    data["timing"].update(dict(timing or {}))
    unit_table: dict[str, Any] = {"model": DEFAULT_PROCESS, "controller": controller}
    if harvest_time_h is not None:
        unit_table["harvest_time_h"] = float(harvest_time_h)
    if mpc_config is not None:
        unit_table["mpc_config"] = str(mpc_config.resolve())
    data["units"] = {name: dict(unit_table) for name in units}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(_toml(data)) + "\n", encoding="utf-8")
    return load_site(path)


async def grant_remote(
    site: SiteConfig,
    unit: str,
    password: str,
    *,
    user: str = "operator",
    timeout_s: float = 30.0,
    mode: int = 1,
) -> str:
    """What an operator does at the SCADA: wait until the plant sees a healthy heartbeat
    from the controller, then grant Remote (``RequestMode(1)``; ``mode=0``: back to Local
    at once). Returns the status name."""
    from asyncua import Client, ua
    from asyncua.crypto import security_policies

    sec: SecurityConfig = site.security
    config = site.unit(unit)
    deadline = time.monotonic() + timeout_s
    while not (sec.certificate.exists() and sec.private_key.exists()):
        if time.monotonic() > deadline:  # the controller creates it when it starts
            raise PlantIOError(f"no controller certificate at {sec.certificate}")
        await asyncio.sleep(0.05)
    client = Client(site.endpoints[config.endpoint], timeout=site.timing.request_timeout_s)
    client.application_uri = sec.application_uri
    policy: Any = {
        "Basic256Sha256": security_policies.SecurityPolicyBasic256Sha256,
        "Aes128_Sha256_RsaOaep": security_policies.SecurityPolicyAes128Sha256RsaOaep,
        "Aes256_Sha256_RsaPss": security_policies.SecurityPolicyAes256Sha256RsaPss,
    }[sec.policy]
    await client.set_security(
        policy,
        str(sec.certificate),
        str(sec.private_key),
        mode=getattr(ua.MessageSecurityMode, sec.mode),
    )
    client.set_user(user)
    client.set_password(password)
    await client.connect()
    try:
        ns = await client.get_namespace_index(config.apc.uri)
        obj = client.get_node(ua.NodeId(ua.String(config.apc.identifier), ua.Int16(ns)))

        def child(name: str) -> Any:
            return client.get_node(
                ua.NodeId(ua.String(f"{config.apc.identifier}.{name}"), ua.Int16(ns))
            )

        while mode == 1 and not await child("HeartbeatHealthy").read_value():
            if time.monotonic() > deadline:
                raise PlantIOError(f"{unit}: no healthy heartbeat from the controller")
            await asyncio.sleep(0.05)
        result = await obj.call_method(
            child("RequestMode").nodeid, ua.Variant(mode, ua.VariantType.Int32)
        )
        return str(result.name)
    finally:
        await client.disconnect()
        await asyncio.sleep(0.01)


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=float), q)) if values else math.nan


# -- the benchmark -------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def _serve_process(args: list[str], timeout_s: float = 120.0) -> Any:
    """``hmpc-sim serve`` as a subprocess, up until the block ends (then SIGTERM)."""
    cmd = [sys.executable, "-m", "sim.opcua.cli", "serve", *args]
    proc = subprocess.Popen(  # noqa: S603 - our own module with our own arguments
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + timeout_s
        lines = []
        while True:
            line = proc.stdout.readline() if proc.stdout else ""
            if not line:
                err = proc.stderr.read() if proc.stderr else ""
                raise PlantIOError(f"hmpc-sim serve ended before 'ready': {err.strip()[-500:]}")
            lines.append(line)
            if line.strip() == "ready":
                break
            if time.monotonic() > deadline:
                raise PlantIOError("hmpc-sim serve did not become ready")
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


def run_bench_loop(
    units: int,
    *,
    cycles: int = 20,
    speed: float = 7200.0,
    controller: str = "rule",
    workdir: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark; returns the figures (see the module docstring)."""
    if not 1 <= units <= 99:
        raise ConfigError(f"--units must be in 1..99, got {units}")
    if cycles < 2:
        raise ConfigError(f"--cycles must be at least 2, got {cycles}")
    if not (speed > 0 and math.isfinite(speed)):
        raise ConfigError(f"--speed must be positive, got {speed}")
    with contextlib.ExitStack() as stack:
        if workdir is None:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="hmpc-bench-")))
        passwords = {"apc": "bench-apc", "operator": "bench-operator"}
        pki = prepare_pki(workdir / "pki", passwords)
        port = _free_port()
        names = [f"BR{i + 1:02d}" for i in range(units)]
        period_h = 1.0
        harvest = period_h * (cycles + 3)
        site = write_sim_site(
            workdir / "site.toml",
            endpoint=f"opc.tcp://127.0.0.1:{port}/hmpc/bioreactor",
            pki=pki,
            units=names,
            controller=controller,
            harvest_time_h=harvest,
            timing={"period_h": period_h, "heartbeat_interval_s": 0.5},
        )
        stack.enter_context(
            _serve_process(
                [
                    "--port",
                    str(port),
                    "--printer-port",
                    "0",
                    "--units",
                    str(units),
                    "--speed",
                    str(speed),
                    "--plant-step",
                    str(period_h),
                    "--pki",
                    str(pki),
                    "--heartbeat-timeout",
                    "10",
                ]
            )
        )
        previous = os.environ.get(PASSWORD_ENV)
        os.environ[PASSWORD_ENV] = passwords["apc"]  # the site file reads it from there
        recorder = MemoryRecorder()
        started = time.perf_counter()
        try:
            summaries = asyncio.run(
                _bench(site, names, recorder, passwords["operator"], controller)
            )
        finally:
            if previous is None:
                os.environ.pop(PASSWORD_ENV, None)
            else:
                os.environ[PASSWORD_ENV] = previous
        wall = time.perf_counter() - started
    engaged = [
        s
        for s in recorder.steps
        if s.mode == "remote" and any(p.status != "not written" for p in s.setpoints)
    ]
    overheads = [s.overhead_s for s in engaged]
    bundles = [s.overhead_s for s in engaged if any(p.status == "Good" for p in s.setpoints)]
    statuses: dict[str, int] = {}
    for s in summaries:
        for k, v in s.item_statuses.items():
            statuses[k] = statuses.get(k, 0) + v
    return {
        "units": units,
        "cycles_per_unit": cycles,
        "controller": controller,
        "speed": speed,
        "period_h": period_h,
        "security": f"{site.security.policy} {site.security.mode}",
        "engaged_cycles": len(engaged),
        "overhead_p50_s": percentile(overheads, 50),
        "overhead_p99_s": percentile(overheads, 99),
        "overhead_max_s": max(overheads) if overheads else math.nan,
        "bundle_cycles": len(bundles),
        "bundle_overhead_p50_s": percentile(bundles, 50),
        "bundle_overhead_p99_s": percentile(bundles, 99),
        "bundles": sum(s.bundles for s in summaries),
        "item_statuses": statuses,
        "holds": sum(s.holds for s in summaries),
        "overruns": sum(s.overruns for s in summaries),
        "wall_time_s": round(wall, 3),
    }


async def _bench(
    site: SiteConfig,
    names: Sequence[str],
    recorder: MemoryRecorder,
    operator_password: str,
    controller: str,
) -> list[Any]:
    from controller.laws.control import ControllerSpec, build_controller
    from controller.runtime.service import serve

    laws = {
        n: build_controller(ControllerSpec(kind=controller, model=DEFAULT_PROCESS)) for n in names
    }
    stop = asyncio.Event()
    task = asyncio.create_task(serve(site, laws, recorder, stop=stop))
    try:
        for name in names:
            status = await grant_remote(site, name, operator_password)
            if status != "Good":
                raise PlantIOError(f"{name}: Remote refused ({status})")
        return await asyncio.wait_for(task, 600.0)
    finally:
        stop.set()
        if not task.done():
            with contextlib.suppress(Exception):
                await task


def add_bench_loop(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``loop`` to the sub-commands of ``hmpc-sim bench``."""
    p = bench_sub.add_parser(
        "loop",
        help="loop overhead of the controller runtime over OPC UA (excluding the solve)",
        description="Runs hmpc-sim serve (accelerated) and the hmpc run service for N units "
        "on loopback with Basic256Sha256 SignAndEncrypt; prints the loop overhead "
        "percentiles (everything except the control law's step).",
    )
    p.add_argument("--units", type=int, default=10, help="bioreactors (default 10)")
    p.add_argument("--cycles", type=int, default=20, help="control cycles per unit")
    p.add_argument(
        "--speed", type=float, default=7200.0, help="process hours per wall hour (7200: 2 h/s)"
    )
    p.add_argument("--controller", choices=("recipe", "rule"), default="rule", help="control law")
    p.add_argument("--json", type=Path, required=True, help="write the figures here")
    p.set_defaults(func=cmd_bench_loop)


def cmd_bench_loop(args: argparse.Namespace) -> int:
    figures = run_bench_loop(
        args.units, cycles=args.cycles, speed=args.speed, controller=args.controller
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(figures, indent=2) + "\n")
    print(
        f"{figures['units']} units x {figures['cycles_per_unit']} cycles over OPC UA "
        f"({figures['security']}): loop overhead p50 {figures['overhead_p50_s'] * 1e3:.1f} ms, "
        f"p99 {figures['overhead_p99_s'] * 1e3:.1f} ms (excluding the control law); "
        f"{figures['bundles']} bundles {figures['item_statuses']}"
    )
    print(f"wrote {args.json}")
    return 0

"""``hmpc-sim bench login-flood``: what a flood of wrong logins does to a legitimate client.

The simulators run as a separate process (``hmpc-sim serve``, one unit, no printer, users
hashed with the production PBKDF2 cost). A legitimate ``apc`` client connects first
(Basic256Sha256 SignAndEncrypt, trusted certificate), subscribes to
``APC.Clock.ProcessTime`` every 100 ms and reads it every 50 ms. Then a flood process opens
``--connections`` secure channels with a *trusted* certificate (the worst case: an untrusted
one is refused at OpenSecureChannel before any hashing) and sends ``--attempts`` wrong
ActivateSessions on each, paced so that all of them go out within ``--seconds``. After the
flood, one login with the right password from the same address shows whether the address
is locked out.

Printed per scenario: read latency p50/p99/max of the legitimate client during the flood,
the longest gap between its notifications, how often it lost its connection, the flood's
outcomes, and the right-password result. Scenarios: ``default`` (the shipped login policy)
and ``hash-only`` (lock-out and back-off off: every wrong login is hashed, so the figure
shows the worker pool alone).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from plant_models.errors import PlantIOError

__all__ = ["add_bench_login_flood", "run_login_flood"]

CLIENT_URI = "urn:hmpc:bench:client"
APC_PASSWORD = "bench-apc-password"  # noqa: S105 - a throw-away benchmark user
SCENARIOS = {
    "default": [],
    "hash-only": ["--login-max-failures", "0", "--login-backoff", "0"],
}


def _prepare(folder: Path) -> tuple[Path, Path]:
    """PKI with the apc user (production hash cost) and a trusted client certificate."""
    from asyncua.crypto.cert_gen import setup_self_signed_certificate
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from sim.opcua.apc import Role
    from sim.opcua.security import write_user

    write_user(folder / "users.toml", "apc", Role.APC, APC_PASSWORD)
    cert, key = folder / "client_cert.der", folder / "client_key.pem"
    asyncio.run(
        setup_self_signed_certificate(
            key, cert, CLIENT_URI, "localhost", [ExtendedKeyUsageOID.CLIENT_AUTH], {}
        )
    )
    (folder / "trusted").mkdir(parents=True, exist_ok=True)
    (folder / "trusted" / "client.der").write_bytes(cert.read_bytes())
    return cert, key


async def _client(endpoint: str, cert: Path, key: str | Path) -> Any:
    from asyncua import Client, ua
    from asyncua.crypto.security_policies import SecurityPolicyBasic256Sha256

    client = Client(endpoint, timeout=30)
    client.application_uri = CLIENT_URI
    await client.set_security(
        SecurityPolicyBasic256Sha256,
        str(cert),
        str(key),
        mode=ua.MessageSecurityMode.SignAndEncrypt,
    )
    return client


async def _logins(
    endpoint: str, cert: Path, key: Path, passwords: list[str], start: float, spacing: float
) -> list[str]:
    """One secure channel and session; ActivateSession with each password in turn, the
    k-th no earlier than ``start + k * spacing`` (monotonic clock)."""
    from asyncua import ua

    client = await _client(endpoint, cert, key)
    outcomes: list[str] = []
    try:
        await client.connect_socket()
        await client.send_hello()
        await client.open_secure_channel()
        await client.create_session()
        for k, password in enumerate(passwords):
            await asyncio.sleep(max(0.0, start + k * spacing - time.monotonic()))
            try:
                await client.activate_session("apc", password)
                outcomes.append("Good")
            except ua.UaStatusCodeError as exc:
                outcomes.append(type(exc).__name__)
            except (ConnectionError, OSError, TimeoutError) as exc:
                outcomes.append(type(exc).__name__)
                break
    except (ConnectionError, OSError, TimeoutError, ua.UaError) as exc:
        outcomes.append(f"connect: {type(exc).__name__}")
    finally:
        client.disconnect_socket()
        await asyncio.sleep(0.01)
    return outcomes


async def _flood(
    endpoint: str, cert: Path, key: Path, connections: int, attempts: int, seconds: float
) -> dict[str, Any]:
    start = time.monotonic() + 0.5
    spacing = seconds / attempts
    results = await asyncio.gather(
        *(
            _logins(
                endpoint,
                cert,
                key,
                ["wrong"] * attempts,
                start + i * spacing / connections,
                spacing,
            )
            for i in range(connections)
        )
    )
    counts = collections.Counter(o for conn in results for o in conn)
    return {"outcomes": dict(counts), "elapsed_s": time.monotonic() - start}


async def _legitimate(endpoint: str, cert: Path, key: Path, flood_cmd: list[str]) -> dict[str, Any]:
    from asyncua import ua

    lost: list[str] = []
    stamps: list[float] = []

    class Handler:
        def datachange_notification(self, node: object, val: object, data: object) -> None:
            stamps.append(time.monotonic())

    async def on_lost(exc: Exception) -> None:
        lost.append(repr(exc))

    client = await _client(endpoint, cert, key)
    client.set_user("apc")
    client.set_password(APC_PASSWORD)
    await client.connect()
    client.connection_lost_callback = on_lost
    latencies: list[float] = []
    errors = 0
    try:
        ns = await client.get_namespace_index("urn:hmpc:sim")
        clock = client.get_node(ua.NodeId(ua.String("Clock.ProcessTime"), ua.Int16(ns)))
        sub = await client.create_subscription(100, Handler())
        await sub.subscribe_data_change(clock)
        await asyncio.sleep(2.0)  # settle
        proc = await asyncio.create_subprocess_exec(*flood_cmd, stdout=asyncio.subprocess.PIPE)
        flood_start = time.monotonic()
        reader = asyncio.create_task(proc.communicate())
        while not reader.done() or time.monotonic() < flood_start + 1.0:
            t0 = time.monotonic()
            try:
                await clock.read_value()
                latencies.append(time.monotonic() - t0)
            except (ua.UaError, ConnectionError, OSError, TimeoutError):
                errors += 1
            await asyncio.sleep(0.05)
        out, _ = await reader
        flood_end = time.monotonic()
        flood = json.loads(out.decode())
        window = [s for s in stamps if flood_start <= s <= flood_end]
        gap = max(np.diff(window)) if len(window) > 1 else float("nan")
        right = await _logins(endpoint, cert, key, [APC_PASSWORD], time.monotonic(), 0.0)
    finally:
        with contextlib.suppress(Exception):
            await client.disconnect()
    lat = np.array(latencies) * 1000.0
    return {
        "reads": len(latencies),
        "read_errors": errors,
        "p50_ms": float(np.percentile(lat, 50)) if lat.size else float("nan"),
        "p99_ms": float(np.percentile(lat, 99)) if lat.size else float("nan"),
        "max_ms": float(lat.max()) if lat.size else float("nan"),
        "max_notification_gap_ms": float(gap) * 1000.0,
        "disconnects": len(lost),
        "flood": flood,
        "right_password_after_flood": right[0] if right else "none",
    }


@contextlib.contextmanager
def _serve(args: list[str], log_path: Path) -> Iterator[subprocess.Popen[str]]:
    """``hmpc-sim serve`` as a subprocess whose log goes to ``log_path`` (a flood logs every
    refusal: a pipe nobody reads would fill up and stall the server)."""
    with log_path.open("w") as log_file:
        proc = subprocess.Popen(  # noqa: S603 - our own module with our own arguments
            [sys.executable, "-m", "sim.opcua.cli", "serve", *args],
            stdout=subprocess.PIPE,
            stderr=log_file,
            text=True,
        )
        try:
            deadline = time.monotonic() + 120.0
            while True:
                line = proc.stdout.readline() if proc.stdout else ""
                if not line:
                    raise PlantIOError(f"hmpc-sim serve ended: {log_path.read_text()[-500:]}")
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
            if proc.stdout is not None:
                proc.stdout.close()


def run_login_flood(
    *, connections: int, attempts: int, seconds: float, scenarios: list[str]
) -> list[dict[str, Any]]:
    from sim.bench_loop import _free_port

    results = []
    for name in scenarios:
        with tempfile.TemporaryDirectory() as tmp:
            pki = Path(tmp)
            cert, key = _prepare(pki)
            port = _free_port()
            args = [
                "--host", "127.0.0.1", "--port", str(port), "--printer-port", "0",
                "--units", "1", "--speed", "3600", "--pki", str(pki), "--hand-built-model",
                *SCENARIOS[name],
            ]  # fmt: skip
            endpoint = f"opc.tcp://127.0.0.1:{port}/hmpc/bioreactor"
            flood_cmd = [
                sys.executable, "-m", "sim.bench_login_flood", endpoint, str(cert), str(key),
                str(connections), str(attempts), str(seconds),
            ]  # fmt: skip
            with _serve(args, pki / "server.log"):
                result = asyncio.run(_legitimate(endpoint, cert, key, flood_cmd))
            result["scenario"] = name
            results.append(result)
    return results


def add_bench_login_flood(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``login-flood`` to the sub-commands of ``hmpc-sim bench``."""
    p = bench_sub.add_parser(
        "login-flood",
        help="a legitimate client's read latency during a flood of wrong logins",
        description=__doc__.split("\n\n")[1] if __doc__ else None,
    )
    p.add_argument("--connections", type=int, default=20)
    p.add_argument("--attempts", type=int, default=10, help="wrong logins per connection")
    p.add_argument("--seconds", type=float, default=10.0, help="the flood's duration")
    p.add_argument("--scenario", choices=[*SCENARIOS, "all"], default="all", help="login policy")
    p.set_defaults(func=cmd_bench_login_flood)


def cmd_bench_login_flood(args: argparse.Namespace) -> int:
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)  # refusals are the point here
    scenarios = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    total = args.connections * args.attempts
    print(
        f"login flood: {total} wrong logins in {args.seconds:g} s from {args.connections} "
        "connections (trusted certificate, Basic256Sha256 SignAndEncrypt, PBKDF2 200000)"
    )
    try:
        results = run_login_flood(
            connections=args.connections,
            attempts=args.attempts,
            seconds=args.seconds,
            scenarios=scenarios,
        )
    except PlantIOError as exc:
        print(f"hmpc-sim bench login-flood: {exc}", file=sys.stderr)
        return 2
    for r in results:
        outcomes = ", ".join(f"{k} {v}" for k, v in sorted(r["flood"]["outcomes"].items()))
        print(
            f"{r['scenario']:>9}: legitimate reads {r['reads']} "
            f"p50 {r['p50_ms']:.1f} ms p99 {r['p99_ms']:.1f} ms max {r['max_ms']:.1f} ms; "
            f"longest notification gap {r['max_notification_gap_ms']:.0f} ms; "
            f"disconnects {r['disconnects']}; read errors {r['read_errors']}"
        )
        print(
            f"{'':>9}  flood answered in {r['flood']['elapsed_s']:.1f} s: {outcomes}; "
            f"right password after the flood: {r['right_password_after_flood']}"
        )
    return 0


def _flood_main(argv: list[str]) -> None:
    endpoint, cert, key, connections, attempts, seconds = argv
    logging.getLogger("asyncua").setLevel(logging.CRITICAL)
    result = asyncio.run(
        _flood(endpoint, Path(cert), Path(key), int(connections), int(attempts), float(seconds))
    )
    print(json.dumps(result))


if __name__ == "__main__":
    _flood_main(sys.argv[1:7])

"""``hmpc-sim serve`` and ``hmpc-sim opcua-user``: wired into sim/cli.py's EXTRA_COMMANDS."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import getpass
import logging
import os
import signal
import sys
from pathlib import Path

from plant_models.errors import ConfigError, PlantIOError
from plant_models.process import DEFAULT_PROCESS, available_processes
from sim.opcua.apc import Role
from sim.opcua.faults import parse_fault
from sim.opcua.security import LoginPolicy, write_user
from sim.opcua.server import SimulatorConfig, serve_simulators

__all__ = ["register"]

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``serve`` and ``opcua-user`` to the ``hmpc-sim`` sub-commands."""
    serve = sub.add_parser(
        "serve",
        help="run OPC UA simulators of bioreactors (LADS) and a bioprinter",
        description="Secure OPC UA servers for simulated bioreactors and a bioprinter on an "
        "accelerated process clock. See docs/opcua.md.",
    )
    serve.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=4840, help="bioreactor server port")
    serve.add_argument(
        "--printer-port",
        type=int,
        default=None,
        help="printer server port (default PORT+1; 0: none)",
    )
    serve.add_argument("--units", type=int, default=1, help="number of bioreactors")
    serve.add_argument(
        "--model",
        choices=available_processes(),
        default=DEFAULT_PROCESS,
        help="the process plug-in (default %(default)s)",
    )
    serve.add_argument(
        "--speed", type=float, default=1.0, help="process hours per wall hour (3600: 1 h/s)"
    )
    serve.add_argument(
        "--patient-seed",
        type=int,
        default=None,
        help="unit i gets patient seed S+i (default nominal)",
    )
    serve.add_argument("--sensor-seed", type=int, default=0)
    serve.add_argument("--pki", type=Path, default=Path("pki"), help="certificates and trust list")
    serve.add_argument(
        "--users", type=Path, default=None, help="users file (default PKI/users.toml)"
    )
    serve.add_argument(
        "--dev-insecure", action="store_true", help="also offer SecurityPolicy None (development)"
    )
    serve.add_argument("--heartbeat-timeout", type=float, default=10.0, help="watchdog, seconds")
    serve.add_argument(
        "--state-file",
        type=Path,
        default=None,
        help="persist the plants' state here and continue the same batch (BatchId, "
        "BatchStartTime, culture) when restarted with it; without it a restart is a new batch",
    )
    serve.add_argument(
        "--fallback",
        default="initial",
        help="safe state applied when the watchdog sheds the controller: 'initial' (every "
        "setpoint back to its batch-start value, the default), 'hold' (freeze the last "
        "move) or NAME=VALUE,... (e.g. glucose_feed=0,il2_addition=0; others held)",
    )
    serve.add_argument("--plant-step", type=float, default=0.1, help="plant grid, process hours")
    serve.add_argument("--nodesets", type=Path, default=None, help="node-opcua-nodesets folder")
    serve.add_argument(
        "--hand-built-model", action="store_true", help="skip the NodeSets: hand-built LADS subset"
    )
    serve.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="KIND[:TARGET[:START_H[:DURATION]]]",
        help="schedule a fault (stale, stuck, nan, bad, restart, printer); repeatable",
    )
    login = LoginPolicy()
    serve.add_argument(
        "--login-max-failures",
        type=int,
        default=login.max_failures,
        help="wrong logins from one address that lock it out (default %(default)s; 0: never)",
    )
    serve.add_argument(
        "--login-lockout",
        type=float,
        default=login.lockout_s,
        help="lock-out, seconds (default %(default)s)",
    )
    serve.add_argument(
        "--login-backoff",
        type=float,
        default=login.backoff_s,
        help="delay of the first refusal, doubling per failure, seconds (default %(default)s)",
    )
    serve.add_argument(
        "--login-workers",
        type=int,
        default=login.hash_workers,
        help="password-hashing threads (default %(default)s)",
    )
    serve.add_argument(
        "--max-unauthenticated",
        type=int,
        default=login.max_unauthenticated,
        help="connections without an activated session (default %(default)s)",
    )
    serve.set_defaults(func=cmd_serve)

    user = sub.add_parser(
        "opcua-user",
        help="add or replace a user of the OPC UA simulators",
        description="Password from $HMPC_OPCUA_PASSWORD, else asked on the terminal.",
    )
    user.add_argument("name")
    user.add_argument("role", choices=[r.value for r in Role])
    user.add_argument("--users", type=Path, default=Path("pki/users.toml"))
    user.set_defaults(func=cmd_user)


def cmd_user(args: argparse.Namespace) -> int:
    password = os.environ.get("HMPC_OPCUA_PASSWORD") or getpass.getpass(
        f"password for {args.name}: "
    )
    write_user(args.users, args.name, Role(args.role), password)
    print(f"user {args.name} ({args.role}) written to {args.users}")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    config = SimulatorConfig(
        host=args.host,
        port=args.port,
        printer_port=args.printer_port,
        units=args.units,
        speed=args.speed,
        patient_seed=args.patient_seed,
        sensor_seed=args.sensor_seed,
        model=args.model,
        pki=args.pki,
        users_file=args.users,
        dev_insecure=args.dev_insecure,
        heartbeat_timeout_s=args.heartbeat_timeout,
        plant_step_h=args.plant_step,
        nodesets=args.nodesets,
        hand_built=args.hand_built_model,
        faults=tuple(parse_fault(f) for f in args.fault),
        fallback=args.fallback,
        state_file=args.state_file,
        login=LoginPolicy(
            max_failures=args.login_max_failures,
            lockout_s=args.login_lockout,
            backoff_s=args.login_backoff,
            hash_workers=args.login_workers,
            max_unauthenticated=args.max_unauthenticated,
        ),
    )
    if not config.users_path.exists():
        raise ConfigError(
            f"{config.users_path}: no users file; create users with "
            f"`hmpc-sim opcua-user NAME ROLE --users {config.users_path}`"
        )
    asyncio.run(_serve(config))
    return 0


async def _serve(config: SimulatorConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)
    async with serve_simulators(config) as sims:
        model = "official NodeSets" if sims.bioreactor.official_nodesets else "hand-built subset"
        print(f"bioreactors ({len(sims.units)}, LADS {model}): {sims.endpoint}", flush=True)
        if sims.printer_endpoint:
            print(f"printer: {sims.printer_endpoint}", flush=True)
        print(f"batch start (process epoch): {sims.clock.epoch.isoformat()}", flush=True)
        print(
            f"server certificates: {config.pki / 'own'}; trust clients in {config.pki / 'trusted'}"
        )
        print("ready", flush=True)
        sys.stdout.flush()
        stopping = asyncio.create_task(stop.wait())
        failing = asyncio.create_task(sims.wait_failed())
        done, pending = await asyncio.wait({stopping, failing}, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        if failing in done:
            raise PlantIOError(f"the simulated plant failed: {failing.result()!r}")
    log.info("simulators stopped")


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry (``python -m sim.opcua.cli serve ...``) until sim/cli.py wires
    :func:`register` into ``hmpc-sim``."""
    parser = argparse.ArgumentParser(prog="hmpc-sim")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    register(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (ConfigError, OSError) as exc:
        print(f"hmpc-sim: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

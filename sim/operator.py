"""``hmpc-sim operator``: the SCADA operator's actions on the simulators, from a terminal.

Granting Remote is deliberately not something the controller can do (docs/opcua.md): an
operator does it, once the plant shows a healthy heartbeat from the controller. In
simulation this command plays the operator::

    export HMPC_OPERATOR_PASSWORD=...
    hmpc-sim operator --site configs/site_sim.toml --unit BR01 --unit BR02 remote

It connects with the site file's endpoint and application certificate, as user
``operator`` (``--user``), waits for each unit's ``HeartbeatHealthy``, and calls
``RequestMode``.
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import os
from pathlib import Path

from controller.runtime.site import load_site
from plant_models.errors import PlantIOError

__all__ = ["register"]

PASSWORD_ENV = "HMPC_OPERATOR_PASSWORD"  # noqa: S105 - the variable's name, not a password


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``operator`` to the ``hmpc-sim`` sub-commands."""
    p = sub.add_parser(
        "operator",
        help="act as the SCADA operator: grant Remote to the controller (or return to Local)",
        description=f"Password from ${PASSWORD_ENV}, else asked on the terminal.",
    )
    p.add_argument("action", choices=("remote", "local"), help="mode to request")
    p.add_argument("--site", type=Path, required=True, help="site file (endpoints, security)")
    p.add_argument("--unit", action="append", default=None, help="unit (repeatable; default: all)")
    p.add_argument("--user", default="operator", help="operator user name")
    p.add_argument(
        "--timeout", type=float, default=120.0, help="seconds to wait for a healthy heartbeat"
    )
    p.set_defaults(func=cmd_operator)


def cmd_operator(args: argparse.Namespace) -> int:
    from sim.bench_loop import grant_remote

    site = load_site(args.site)
    units = args.unit or [u.name for u in site.units]
    for name in units:
        site.unit(name)
    password = os.environ.get(PASSWORD_ENV) or getpass.getpass(f"password of {args.user}: ")
    mode = 1 if args.action == "remote" else 0

    async def act() -> list[str]:
        return [
            await grant_remote(
                site, name, password, user=args.user, timeout_s=args.timeout, mode=mode
            )
            for name in units
        ]

    try:
        results = asyncio.run(act())
    except (PlantIOError, TimeoutError) as exc:
        raise PlantIOError(f"operator: {exc}") from exc
    for name, result in zip(units, results, strict=True):
        print(f"{name}: RequestMode({args.action}) -> {result}")
    return 0 if all(r == "Good" for r in results) else 1

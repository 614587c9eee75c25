"""``hmpc run --site SITE.toml``: the controller as a long-running service.

One OPC UA session per server endpoint, one control task per bioreactor of the site file
(:class:`controller.runtime.loop.UnitLoop`), every step and event appended to the historian
(SQLite in the output folder by default). SIGINT/SIGTERM stop it cleanly: each unit hands
back to Local (the plant holds its setpoints), the sessions close, the summary is written.
After a crash or ``kill -9`` the same command resumes the running batch from the historian
(controller state saved after every step: :mod:`controller.runtime.restart`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import math
import signal
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from controller.runtime.site import SiteConfig, UnitConfig, canonical_units, load_site
from plant_models.process import get_process

__all__ = ["build_loops", "cmd_run", "register", "serve"]

log = logging.getLogger(__name__)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``run`` to the ``hmpc`` sub-commands."""
    run = sub.add_parser(
        "run",
        help="run the controller against the plant (OPC UA) as described by a site file",
        description="Long-running controller service: one control task per bioreactor of the "
        "site file, over secure OPC UA, on the plant's process clock. Stop with Ctrl-C or "
        "SIGTERM (units are handed back to Local). See docs/runtime.md.",
    )
    run.add_argument("--site", type=Path, required=True, help="site file (TOML)")
    run.add_argument(
        "--out", type=Path, default=None, help="output folder (default: the site's or out/run)"
    )
    run.add_argument(
        "--unit",
        action="append",
        default=None,
        metavar="NAME",
        help="run only this unit of the site file (repeatable)",
    )
    run.add_argument(
        "--historian",
        default=None,
        metavar="URL",
        help="historian URL (default sqlite:///OUT/historian.sqlite)",
    )
    run.add_argument(
        "--anchor",
        type=Path,
        default=None,
        metavar="FILE",
        help="external anchor: the record chain's head is appended here after every commit; "
        "put it where the historian's database users cannot rewrite it (default "
        "OUT/historian.anchor.jsonl; docs/historian.md)",
    )
    run.add_argument(
        "--anchor-key",
        type=Path,
        default=None,
        metavar="FILE",
        help="HMAC key that signs the anchor (default $HMPC_ANCHOR_KEY_FILE; none: unsigned)",
    )
    run.set_defaults(func=cmd_run)


def state_limits(model: str) -> dict[str, dict[str, float | None]]:
    """The process specification's state limits (for the historian's ``config`` event):
    variable -> {"low"/"high": hard limit, "low_soft"/"high_soft": soft limit}."""
    plugin = get_process(model)
    p = plugin.load_process()[0]
    limits: dict[str, dict[str, float | None]] = {}
    for h in plugin.hard_limits:
        limits.setdefault(h.variable, {})[h.side] = h.value(p)
    for variable, side, value in plugin.soft_limit_values(p):
        limits.setdefault(variable, {})[f"{side}_soft"] = value
    return limits


def make_control_law(unit: UnitConfig) -> Any:
    """The control law of a unit (controller.laws.control.build_controller)."""
    from controller.laws.control import ControllerSpec, build_controller

    spec = ControllerSpec(
        kind=unit.controller,
        model=unit.model,
        mpc_config=unit.mpc_config,
        residual=unit.residual,
        harvest_time=unit.harvest_time_h,
    )
    return build_controller(spec)


def build_loops(
    site: SiteConfig,
    laws: Mapping[str, Any],
    recorder: Any,
    *,
    units: Sequence[str] | None = None,
) -> tuple[list[Any], list[Any]]:
    """Connections (one per endpoint) and unit loops for the chosen units of a site."""
    from controller.records.historian import Historian
    from controller.runtime.loop import LoopSettings, UnitLoop
    from controller.runtime.plant_io import OpcUaConnection
    from controller.runtime.restart import Checkpoint

    chosen = [site.unit(n) for n in units] if units else list(site.units)
    connections: dict[str, OpcUaConnection] = {}
    loops = []
    for unit in chosen:
        conn = connections.get(unit.endpoint)
        if conn is None:
            conn = connections[unit.endpoint] = OpcUaConnection(site, unit.endpoint)
        io = conn.add_unit(unit)
        settings = LoopSettings(
            period_h=site.timing.period_h,
            solve_budget_s=site.timing.solve_budget_s,
            engage_ramp_h=site.timing.engage_ramp_h,
            harvest_time_h=unit.harvest_time_h,
        )
        loops.append(
            UnitLoop(
                io,
                laws[unit.name],
                recorder,
                settings,
                site_setpoints=unit.setpoints,
                units=canonical_units(unit.model),
                state_limits=state_limits(unit.model),
                # crash-safe restart: needs the historian (a test's memory recorder has none)
                checkpoint=Checkpoint(recorder) if isinstance(recorder, Historian) else None,
            )
        )
    return list(connections.values()), loops


async def serve(
    site: SiteConfig,
    laws: Mapping[str, Any],
    recorder: Any,
    *,
    units: Sequence[str] | None = None,
    stop: asyncio.Event | None = None,
    signals: bool = False,
) -> list[Any]:
    """Run the controller until every unit reached its harvest time or ``stop`` is set.

    Returns each unit's :class:`~controller.runtime.loop.UnitSummary`. A connection that
    cannot even be attempted (bad security settings) stops everything with its error.
    """
    from controller.runtime.loop import run_control_loop
    from controller.runtime.plant_io import ensure_client_certificate

    stop_event = stop if stop is not None else asyncio.Event()
    if site.security.policy != "None":
        await ensure_client_certificate(site.security)
    site.security.password()  # fail now, with the site file's key in the message
    connections, loops = build_loops(site, laws, recorder, units=units)
    loop = asyncio.get_running_loop()
    installed: list[signal.Signals] = []
    if signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, _stopper(stop_event, sig))
            except (NotImplementedError, RuntimeError) as exc:  # no signals off the main thread
                log.warning(
                    "cannot handle %s here (%s); stop the service by its stop event",
                    sig.name,
                    exc,
                )
            else:
                installed.append(sig)
    try:
        async with contextlib.AsyncExitStack() as stack:
            for conn in connections:
                await stack.enter_async_context(conn)
            control = asyncio.create_task(run_control_loop(loops, stop_event), name="control")
            watched = {control, *(c.supervisor for c in connections if c.supervisor is not None)}
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
            if control not in done:
                failure = next((t.exception() for t in done if t.exception() is not None), None)
                log.critical("plant connection ended: %r; stopping", failure)
                stop_event.set()
                await control
                if failure is not None:
                    raise failure
            return control.result()
    finally:
        for sig in installed:
            loop.remove_signal_handler(sig)


def _stopper(stop: asyncio.Event, sig: signal.Signals) -> Any:
    def handler() -> None:
        log.warning("%s received: stopping (units are handed back to Local)", sig.name)
        stop.set()

    return handler


def _setup_logging(out: Path) -> None:
    runtime = logging.getLogger("controller.runtime")
    if runtime.level == logging.NOTSET or runtime.level > logging.INFO:
        runtime.setLevel(logging.INFO)
    handler = logging.FileHandler(out / "hmpc-run.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    runtime.addHandler(handler)


def cmd_run(args: argparse.Namespace) -> int:
    from controller.records.anchor import Anchor
    from controller.records.historian import Historian

    site = load_site(args.site)
    out: Path = args.out or site.output_dir or Path("out") / "run"
    out.mkdir(parents=True, exist_ok=True)
    _setup_logging(out)
    units = args.unit or [u.name for u in site.units]
    for name in units:
        site.unit(name)  # unknown names fail before anything starts
    laws = {name: make_control_law(site.unit(name)) for name in units}
    site.security.check_files()
    url = args.historian or f"sqlite:///{(out / 'historian.sqlite').resolve()}"
    started = time.time()
    print(f"hmpc run: site {site.name} ({args.site}), units {', '.join(units)}", flush=True)
    anchor_path = args.anchor or out / "historian.anchor.jsonl"
    anchor = Anchor(anchor_path, key_file=args.anchor_key)
    with Historian(url, anchor=anchor) as historian:
        # the URL as shown: never its password (a PostgreSQL URL may carry one)
        print(f"historian: {historian.display_url}; log: {out / 'hmpc-run.log'}", flush=True)
        print(f"anchor: {anchor_path} ({'signed' if anchor.signed else 'unsigned'})", flush=True)
        _audit_config_loads(historian, site, args.site, units)
        summaries = asyncio.run(serve(site, laws, historian, units=units, signals=True))
        reports = _write_reports(historian, summaries, out, anchor=str(anchor_path))
    report = {
        "site": str(args.site),
        "historian": historian.display_url,
        "wall_time_s": round(time.time() - started, 3),
        "units": [_jsonable(dataclasses.asdict(s)) for s in summaries],
    }
    (out / "run_summary.json").write_text(json.dumps(report, indent=2) + "\n")
    for s in summaries:
        print(
            f"{s.unit} ({s.batch_id}): {s.cycles} cycles to {s.last_time_h:.1f} h, "
            f"{s.bundles} bundles {s.item_statuses}, {s.holds} holds, {s.overruns} overruns, "
            f"{s.engagements} engagements, {s.reconnects} reconnects; ended: {s.ended}"
        )
    print(f"wrote {out / 'run_summary.json'}")
    for path in reports:
        print(f"batch report: {path}")
    for s in summaries:
        if s.ended == "discontinuity":
            print(
                f"ALARM {s.unit}: the plant restarted or was replaced under batch {s.batch_id}; "
                "nothing more was written. Check the plant, then start hmpc run again (a new "
                "batch record is started)."
            )
    return 0 if all(not s.ended.startswith(("failed", "discontinuity")) for s in summaries) else 1


def _audit_config_loads(
    historian: Any, site: SiteConfig, site_path: Path, units: Sequence[str]
) -> None:
    """One ``config_load`` audit record per configuration file the run uses (path and
    SHA-256: 21 CFR 11.10(e)); a failure is logged, the run goes on."""
    import hashlib

    from controller.records.audit import AuditTrail

    files: dict[str, Path] = {"site": Path(site_path)}
    for name in units:
        unit = site.unit(name)
        for what, path in (("mpc_config", unit.mpc_config), ("residual", unit.residual)):
            if path is not None:
                files[f"{name}/{what}"] = Path(path)
    trail = AuditTrail(historian)
    for what, path in files.items():
        try:
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
        except OSError as exc:
            digest = f"unreadable: {exc}"
        try:
            trail.record(
                "config_load",
                f"{what}: {path}",
                user="hmpc",
                reason=f"hmpc run loaded the {what} for units {', '.join(units)}",
                new={"path": str(path.resolve()), "sha256": digest},
            )
        except (OSError, ValueError) as exc:
            log.critical("config_load audit record of %s not written: %s", path, exc)


def _write_reports(
    historian: Any, summaries: Sequence[Any], out: Path, *, anchor: str | None = None
) -> list[Path]:
    """The batch report of every unit that ran (a report failure never fails the run; a
    verification failure is flagged in the report)."""
    from controller.records.report import write_report
    from plant_models.errors import HmpcError

    paths = []
    for s in summaries:
        if not s.cycles or not s.batch_id:
            continue
        try:
            paths.append(
                write_report(
                    historian,
                    s.batch_id,
                    out / "report" / s.unit,
                    anchor=anchor,
                    flag_failures=True,
                )
            )
        except (HmpcError, ValueError, OSError) as exc:
            log.error("unit=%s batch report not written: %s", s.unit, exc)
    return paths


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj

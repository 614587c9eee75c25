"""``hmpc-sim demo``: the whole system in simulation mode, end to end, in real processes.

1. History: a cohort of earlier batches (other patients, the rule controller) and
   ``hmpc fit`` trains the growth-rate residual from their records.
2. Plant: ``hmpc-sim serve`` (secure OPC UA bioreactor + printer on an accelerated clock).
3. Controller: ``hmpc run`` with the hybrid MPC (estimator-fed, residual from step 1)
   over Basic256Sha256/SignAndEncrypt with a password user, writing the historian.
4. Operator: ``hmpc-sim operator remote`` grants Remote once the heartbeat is healthy.
5. Printer: every cycle the controller forecasts the harvest (dose-reached time, yield);
   once confident it stores the print job on the simulated bioprinter, updates it as the
   forecast moves, releases it at the harvest with the harvested cells and follows it to
   its end (``controller.runtime.printing``, ``[printer]`` of the site file).
6. At the end ``hmpc run`` writes the batch report (``report/BR01/report.html``, with the
   printer timeline); the demo prints the key lines of that timeline from the historian.

Everything lands in ``--out``; the passwords are generated for the run and passed through
the environment, never written into the site file.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from controller.config_files import config_file
from plant_models.process import DEFAULT_PROCESS

__all__ = ["add_demo_command", "cmd_demo", "printer_timeline"]

log = logging.getLogger(__name__)


def add_demo_command(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    demo = sub.add_parser(
        "demo",
        help="simulated plant over OPC UA + hmpc run (hybrid MPC) + report, end to end",
    )
    demo.add_argument("--out", type=Path, default=Path("out/demo"), help="output folder")
    demo.add_argument(
        "--speed", type=float, default=1800.0, help="process hours per wall hour (1800: 2 s/h)"
    )
    demo.add_argument("--patient-seed", type=int, default=7, help="the demo patient")
    demo.add_argument("--history", type=int, default=8, help="earlier batches to learn from")
    demo.add_argument(
        "--controller",
        choices=("hybrid-mpc", "mechanistic-mpc", "rule"),
        default="hybrid-mpc",
    )
    demo.set_defaults(func=cmd_demo)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _bin(name: str) -> str:
    """The console script next to this interpreter (the venv's), else on PATH."""
    here = Path(sys.executable).parent / name
    if here.exists():
        return str(here)
    found = shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"{name} not found; install the package (make setup) first")
    return found


class DemoStepFailed(RuntimeError):
    """A step of the demo exited with an error (its own output says why)."""


def _run(cmd: list[str], env: dict[str, str] | None = None) -> None:
    print("$ " + " ".join(cmd), flush=True)
    status = subprocess.run(cmd, check=False, env=env).returncode  # noqa: S603 (our scripts)
    if status != 0:
        raise DemoStepFailed(f"`{' '.join(cmd[:2])}` exited with status {status} (output above)")


@contextlib.contextmanager
def _background(
    cmd: list[str], log_path: Path, env: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    print("$ " + " ".join(cmd) + f"  > {log_path} &", flush=True)
    with log_path.open("wb") as sink:
        proc = subprocess.Popen(cmd, stdout=sink, stderr=subprocess.STDOUT, env=env)  # noqa: S603
        try:
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def _wait_port(port: int, proc: subprocess.Popen[bytes], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}; see its log")
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"{what} did not open port {port} within {timeout_s:.0f} s")


def site_file(template: str, *, port: int, controller: str, residual: Path | None) -> str:
    """The simulator site file for the demo folder: paths local to it, the chosen ports,
    one unit (BR01) with the demo's controller."""
    text = template.replace("../pki/", "pki/").replace("../pki", "pki")
    text = text.replace('output_dir = "../out/run"', 'output_dir = "run"')
    text = text.replace("127.0.0.1:4840/", f"127.0.0.1:{port}/")
    text = text.replace("127.0.0.1:4841/", f"127.0.0.1:{port + 1}/")
    text = text.replace(
        'mpc_config = "mpc_tcell_hourly.toml"',
        f'mpc_config = "{config_file("mpc_tcell_hourly.toml")}"',
    )
    # one unit: drop BR02 (everything from its table to the next table)
    text = re.sub(r"\n\[units\.BR02\][^\[]*", "\n", text)
    unit = f'controller = "{controller}"'
    if residual is not None:
        unit += f'\nresidual = "{residual}"'
    return re.sub(r'(\[units\.BR01\][^\[]*?)controller = "[^"]*"', rf"\g<1>{unit}", text)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        return _demo(args)
    except (DemoStepFailed, TimeoutError, RuntimeError) as exc:
        print(f"hmpc-sim demo: {exc}", file=sys.stderr)
        return 1


def _demo(args: argparse.Namespace) -> int:
    out: Path = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    sim, hmpc = _bin("hmpc-sim"), _bin("hmpc")
    t0 = time.perf_counter()
    residual: Path | None = None
    if args.controller == "hybrid-mpc":
        print("== 1. history: earlier batches of other patients, and the residual fit", flush=True)
        history = out / "history"
        _run([sim, "cohort", "--patients", str(args.history), "--seed", "101",
              "--controller", "rule", "--days", "10", "--out", str(history)])  # fmt: skip
        residual = out / "residual.npz"
        _run([hmpc, "fit", "--data", str(history / "*" / "trajectory.csv"),
              "--model", DEFAULT_PROCESS,
              "--out", str(residual), "--report", str(out / "fit")])  # fmt: skip
    pki = out / "pki"
    env = dict(os.environ)
    apc_pw, op_pw = secrets.token_urlsafe(12), secrets.token_urlsafe(12)
    print("== 2. OPC UA users and the accelerated plant (secure endpoints)", flush=True)
    for name, role, pw in (("apc", "apc", apc_pw), ("operator", "operator", op_pw)):
        _run([sim, "opcua-user", name, role, "--users", str(pki / "users.toml")],
             env={**env, "HMPC_OPCUA_PASSWORD": pw})  # fmt: skip
    port = _free_port()
    site = out / "site.toml"
    template = config_file("site_sim.toml").read_text()
    site.write_text(site_file(template, port=port, controller=args.controller, residual=residual))
    serve = [sim, "serve", "--port", str(port), "--units", "1", "--speed", str(args.speed),
             "--plant-step", "1", "--patient-seed", str(args.patient_seed),
             "--pki", str(pki)]  # fmt: skip
    with _background(serve, out / "serve.log", env) as server:
        _wait_port(port, server, 120.0, "hmpc-sim serve")
        print("== 3. the controller: hmpc run (hybrid MPC over OPC UA)", flush=True)
        run_cmd = [hmpc, "run", "--site", str(site), "--out", str(out / "run")]
        with _background(run_cmd, out / "run.log", {**env, "HMPC_APC_PASSWORD": apc_pw}) as run:
            print("== 4. the operator grants Remote", flush=True)
            _run([sim, "operator", "remote", "--site", str(site), "--timeout", "120"],
                 env={**env, "HMPC_OPERATOR_PASSWORD": op_pw})  # fmt: skip
            hours = 192.0 / (args.speed / 3600.0) / 3600.0
            print(f"== 5. batch running to the harvest (about {hours * 60:.0f} min)", flush=True)
            status = run.wait()
    if status != 0:
        print(f"hmpc run exited with status {status}; see {out / 'run.log'}", file=sys.stderr)
        return 1
    print("== 6. the printer timeline (historian events of kind 'printer')", flush=True)
    for line in printer_timeline(out / "run" / "historian.sqlite", out / "run" / "report"):
        print(line)
    print(f"done in {time.perf_counter() - t0:.0f} s:")
    for path in sorted((out / "run").rglob("*")):
        if path.suffix in {".html", ".json", ".sqlite"}:
            print(f"  {path}")
    return 0


#: Printer actions shown one line each (the job's updates are counted instead).
_KEY_ACTIONS = (
    "forecast",
    "Store",
    "StoreAndStart",
    "Cancel",
    "harvest",
    "Start",
    "job_state",
    "machine_state",
    "unreachable",
    "reconnected",
)


def printer_timeline(historian: Path, reports: Path | None = None) -> list[str]:
    """The key lines of each batch's printer timeline: forecasts, the job scheduled,
    revoked, released at the harvest, its states to the end, and every warning and alarm
    (updates of the job before the harvest are counted). With ``reports`` (the folder of
    ``report/<unit>/report.html``), a line says whether each report shows the timeline."""
    from html import escape

    from controller.records.historian import Historian

    if not historian.exists():
        return [f"  no historian at {historian}"]
    lines: list[str] = []
    with Historian(f"sqlite:///{historian}", create=False) as hist:
        for batch in hist.batches():
            events = hist.events(batch, kind="printer")
            lines.append(f"  batch {batch}: {len(events)} printer events")
            updates = 0
            for e in events:
                action = str(e.data.get("action", ""))
                if action == "Update" and e.severity == "info" and not updates:
                    lines.append(f"  {e.process_time_h:7.1f} h  {e.message} (first update)")
                if action == "Update" and e.severity == "info":
                    updates += 1
                    continue
                if action in _KEY_ACTIONS or e.severity in ("warning", "alarm"):
                    mark = "ALARM " if e.severity == "alarm" else ""
                    lines.append(f"  {e.process_time_h:7.1f} h  {mark}{e.message}")
            if updates:
                lines.append(f"  (the job was updated {updates} times as the forecast moved)")
            if reports is not None:
                for unit in hist.units(batch):
                    page = reports / unit / "report.html"
                    if not page.exists():
                        lines.append(f"  report {page}: not written")
                        continue
                    text = page.read_text(encoding="utf-8")
                    section = text[text.find("id='printer'") :] if "id='printer'" in text else ""
                    own = [e for e in events if e.unit == unit]
                    shown = sum(1 for e in own if escape(e.message) in section)
                    lines.append(
                        f"  report {page}#printer: printer timeline with {shown} of "
                        f"{len(own)} events"
                    )
    return lines

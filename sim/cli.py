"""``hmpc-sim``: simulation and evaluation of controllers on virtual patients."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

from controller.cli import run_cli
from plant_models.process import DEFAULT_PROCESS, available_processes, get_process
from sim.baselines import make_baseline
from sim.closed_loop import run_closed_loop, summarize
from sim.fmu import FMUPlant
from sim.patients import VirtualPatient, load_cohort_spec
from sim.plant import VirtualBioreactor
from sim.report import record_toml, write_batch

__all__ = ["main"]

log = logging.getLogger("hmpc.sim")

BASELINES = ("recipe", "rule")
#: MPC controllers of sim.mpc_controllers (imported lazily: they build CasADi problems)
MPC_NAMES = ("mechanistic-mpc", "hybrid-mpc", "oracle")


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="hmpc-sim", description="Simulate bioreactor batches on virtual patients."
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sim = sub.add_parser("simulate", help="run one closed-loop batch and write its report")
    sim.add_argument(
        "--model",
        choices=available_processes(),
        default=DEFAULT_PROCESS,
        help="the process plug-in (default %(default)s)",
    )
    sim.add_argument("--controller", choices=BASELINES + MPC_NAMES, default="recipe")
    sim.add_argument(
        "--mpc-config",
        type=Path,
        default=None,
        help="MPC tuning file (default: the process plug-in's, e.g. configs/mpc_tcell.toml)",
    )
    sim.add_argument(
        "--residual",
        type=Path,
        default=None,
        help="fitted residual of hybrid-mpc (`hmpc fit` output, .npz); default: a benchmark "
        "residual fitted on simulated batches of other patients (T cell only)",
    )
    sim.add_argument(
        "--adapt",
        default="none",
        help="mechanistic-mpc/hybrid-mpc: patient parameters fitted to the running batch's "
        "readings: 'none' (default), 'auto' (T cell: mu_max,exhaustion_threshold,lag_time) "
        "or a comma-separated subset (docs/hybrid.md)",
    )
    sim.add_argument(
        "--faults",
        default=None,
        help="inject sensor faults: comma-separated kinds or 'all' "
        "(nan,out_of_range,stuck,spike,stale,duplicate,out_of_order,drift)",
    )
    sim.add_argument("--fault-seed", type=int, default=0, help="seed of the fault injection")
    who = sim.add_mutually_exclusive_group()
    who.add_argument(
        "--patient-seed",
        type=int,
        default=None,
        help="draw the virtual patient from this seed (default: nominal patient)",
    )
    who.add_argument(
        "--nominal-patient",
        action="store_true",
        help="the nominal patient (no patient-specific deviation)",
    )
    sim.add_argument(
        "--days",
        type=_positive,
        default=None,
        help="batch length in days (default: the process's harvest time)",
    )
    sim.add_argument("--step-hours", type=_positive, default=1.0, help="control period, h")
    sim.add_argument(
        "--parameters",
        type=Path,
        default=None,
        help="truth-plant parameter file (TOML) instead of the default",
    )
    sim.add_argument(
        "--process",
        type=Path,
        default=None,
        help="process specification file (TOML) instead of the default",
    )
    sim.add_argument(
        "--cohort", type=Path, default=None, help="virtual-patient distribution file (TOML)"
    )
    sim.add_argument("--sensor-seed", type=int, default=0, help="seed of the sensor noise")
    sim.add_argument(
        "--plant",
        default="virtual",
        metavar="virtual|fmu:FILE",
        help="the plant: the virtual bioreactor (default) or an FMU run through the variable "
        "map beside it, FILE.toml (fmu:FILE.fmu; needs the extra hmpc[fmu], sim/fmu.py)",
    )
    sim.add_argument("--out", type=Path, required=True, help="output folder")
    sim.set_defaults(func=cmd_simulate)

    coh = sub.add_parser("cohort", help="simulate a seeded cohort of virtual patients")
    coh.add_argument(
        "--model",
        choices=available_processes(),
        default=DEFAULT_PROCESS,
        help="the process plug-in (default %(default)s)",
    )
    coh.add_argument("--controller", choices=BASELINES, default="recipe")
    coh.add_argument("--patients", type=int, default=10, help="number of patients")
    coh.add_argument("--seed", type=int, default=1, help="cohort seed")
    coh.add_argument("--days", type=_positive, default=None, help="batch length in days")
    coh.add_argument("--cohort", type=Path, default=None, help="patient distribution (TOML)")
    coh.add_argument("--out", type=Path, required=True, help="output folder")
    coh.set_defaults(func=cmd_cohort)
    procs = sub.add_parser("processes", help="list the registered process plug-ins")
    procs.set_defaults(func=cmd_processes)
    bench = sub.add_parser("bench", help="benchmarks that print figures (see docs/benchmarks)")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    for add_bench in BENCHMARKS:
        add_bench(bench_sub)
    for register in EXTRA_COMMANDS:
        register(sub)
    return parser


def _bench_estimation(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sim.bench_estimation import add_bench_estimation

    add_bench_estimation(bench_sub)


def _bench_mpc(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sim.bench_mpc import add_bench_mpc

    add_bench_mpc(bench_sub)


def _bench_forecast(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sim.bench_forecast import add_bench_forecast

    add_bench_forecast(bench_sub)


def _bench_loop(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sim.bench_loop import add_bench_loop

    add_bench_loop(bench_sub)


def _bench_faults(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sim.bench_faults import add_bench_faults

    add_bench_faults(bench_sub)


def _bench_login_flood(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sim.bench_login_flood import add_bench_login_flood

    add_bench_login_flood(bench_sub)


def _bench_campaign(bench_sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sim.bench_campaign import add_bench_campaign

    add_bench_campaign(bench_sub)


#: Benchmarks under ``hmpc-sim bench``: callables that take the bench sub-parsers.
BENCHMARKS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _bench_estimation,
    _bench_mpc,
    _bench_forecast,
    _bench_loop,
    _bench_faults,
    _bench_login_flood,
    _bench_campaign,
]


def _serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sim.opcua.cli import register

    register(sub)


def _campaign(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sim.campaign import add_campaign_command

    add_campaign_command(sub)


def _operator(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sim.operator import register

    register(sub)


def _demo(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from sim.demo import add_demo_command

    add_demo_command(sub)


#: Other modules add sub-commands here: callables that take the sub-parsers object.
EXTRA_COMMANDS: list[Callable[[argparse._SubParsersAction[argparse.ArgumentParser]], None]] = [
    _serve,
    _demo,
    _campaign,
    _operator,
]


def cmd_simulate(args: argparse.Namespace) -> int:
    spec = load_cohort_spec(args.cohort)[0]
    if args.patient_seed is None:
        patient = VirtualPatient.nominal()
    else:
        patient = VirtualPatient.draw(args.patient_seed, spec)
    plugin = get_process(args.model)
    proc = plugin.load_process(args.process)[0]
    truth = plugin.load_truth_parameters(args.parameters)[0] if args.parameters else None
    plant: VirtualBioreactor | FMUPlant
    if args.plant.startswith("fmu:"):
        if args.patient_seed is not None or args.controller == "oracle":
            raise ValueError(
                "--plant fmu: the FMU has no virtual patient and no truth model for the "
                "oracle; drop --patient-seed / choose another --controller"
            )
        plant = FMUPlant(
            Path(args.plant[4:]), plugin, process=proc, parameters=truth, seed=args.sensor_seed
        )
    elif args.plant == "virtual":
        plant = VirtualBioreactor.for_process(
            plugin, patient, process=proc, truth=truth, seed=args.sensor_seed
        )
    else:
        raise ValueError(f"--plant {args.plant!r}: expected 'virtual' or 'fmu:FILE.fmu'")
    days = args.days if args.days is not None else proc.harvest_time / 24.0
    controller: Any
    if args.residual is not None and args.controller != "hybrid-mpc":
        raise ValueError(f"--residual is for --controller hybrid-mpc, not {args.controller}")
    if args.controller in MPC_NAMES:
        from sim.mpc_controllers import make_mpc_controller

        controller = make_mpc_controller(
            args.controller,
            cast(Any, plant),  # reads kind, process and bounds (the truth only for the oracle)
            args.mpc_config,
            residual=args.residual,
            patient_parameters=_patient_parameters(args.model, args.adapt),
        )
    else:
        if args.adapt != "none":
            raise ValueError(f"--adapt is for the MPC controllers, not {args.controller}")
        controller = make_baseline(args.controller, plugin, args.process)
    faults = None
    if args.faults:
        from sim.faults import FaultInjector, parse_fault_kinds

        faults = FaultInjector(parse_fault_kinds(args.faults), seed=args.fault_seed)
    t0 = time.perf_counter()
    df = run_closed_loop(
        plant, controller, days=days, step_h=args.step_hours, measurement_filter=faults
    )
    elapsed = time.perf_counter() - t0
    summary = summarize(df, plant)
    summary["controller"] = args.controller
    if args.faults:
        summary["faults"] = args.faults
    if args.controller in MPC_NAMES:
        from sim.mpc_controllers import mpc_statistics

        summary.update(mpc_statistics(controller))
    summary["wall_time_s"] = round(elapsed, 3)
    title = f"{args.model} batch, patient {plant.plant_id}, controller {args.controller}"
    write_batch(df, summary, args.out, title=title, record=record_toml(plugin, proc))
    print(
        f"{title}: fold expansion {summary['fold_expansion']:.1f}, final viability "
        f"{summary['final_viability']:.1%}, peak lactate {summary['peak_lactate']:.1f} mM, "
        f"hard-limit violations {summary['hard_constraint_violations']} "
        f"({len(df) - 1} steps in {elapsed:.2f} s)"
    )
    print(f"wrote {args.out}/trajectory.csv, summary.json, trajectory.png")
    return 0


def cmd_processes(args: argparse.Namespace) -> int:
    """One line a registered process plug-in: name, title, inputs, default tuning."""
    for name in available_processes():
        plugin = get_process(name)
        inputs = ", ".join(plugin.build_model().input_names)
        print(f"{name}: {plugin.title} (inputs: {inputs}; tuning: {plugin.default_mpc_config})")
    return 0


def cmd_cohort(args: argparse.Namespace) -> int:
    import json

    import pandas as pd

    from sim.patients import PatientCohort

    if args.patients < 1:
        raise ValueError(f"--patients must be at least 1, got {args.patients}")
    cohort = PatientCohort(args.patients, args.seed, load_cohort_spec(args.cohort)[0])
    rows = []
    for i, patient in enumerate(cohort):
        plant = VirtualBioreactor.for_process(args.model, patient, seed=args.seed * 1000 + i)
        days = args.days if args.days is not None else plant.process.harvest_time / 24.0
        df = run_closed_loop(plant, make_baseline(args.controller, args.model), days=days)
        summary = summarize(df, plant)
        summary["controller"] = args.controller
        write_batch(
            df,
            summary,
            args.out / patient.patient_id,
            title=f"{args.model} batch, patient {patient.patient_id}, {args.controller}",
            record=record_toml(plant.plugin, plant.process),
        )
        rows.append({k: v for k, v in summary.items() if not isinstance(v, dict)})
    table = pd.DataFrame(rows)
    table.to_csv(args.out / "cohort.csv", index=False, float_format="%.6g")
    (args.out / "patients.json").write_text(
        json.dumps([p.__dict__ for p in cohort], indent=2) + "\n"
    )
    folds = table["fold_expansion"]
    print(
        f"{len(table)} patients, controller {args.controller}: fold expansion median "
        f"{folds.median():.1f} (range {folds.min():.1f}-{folds.max():.1f}), CV "
        f"{folds.std() / folds.mean():.0%}; hard-limit violations "
        f"{int(table['hard_constraint_violations'].sum())}"
    )
    print(f"wrote {args.out}/<patient>/trajectory.csv and {args.out}/cohort.csv")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


def _patient_parameters(model: str, spec: str) -> tuple[str, ...]:
    """``--adapt``: 'none', 'auto' (the model's patient parameters) or a comma list."""
    if spec == "none":
        return ()
    known = [p.name for p in get_process(model).adapted_parameters()]
    if spec == "auto":
        return tuple(known)
    names = tuple(n.strip() for n in spec.split(",") if n.strip())
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ValueError(
            f"--adapt: unknown parameter(s) {unknown or spec!r} for {model}; choose 'none', "
            f"'auto' or from {known or '(none for this model)'}"
        )
    return names


if __name__ == "__main__":
    sys.exit(main())

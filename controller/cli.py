"""``hmpc``: the deployable controller's command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from controller.records.audit import add_audit_parser
from controller.records.report import add_report_parser
from controller.training.calibration import INITIAL_MODES
from controller.training.fitting import FitSpec, fit_residual
from plant_models.config import load_toml
from plant_models.errors import ConfigError, HmpcError
from plant_models.process import DEFAULT_PROCESS, available_processes

__all__ = ["main", "run_cli"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmpc", description="Hybrid MPC for ATMP bioreactors.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fit = sub.add_parser("fit", help="train a growth-rate residual from batch records")
    fit.add_argument(
        "--data", required=True, help="glob of batch-record CSVs, e.g. 'runs/*/trajectory.csv'"
    )
    fit.add_argument(
        "--model",
        choices=available_processes(),
        default=DEFAULT_PROCESS,
        help="the process plug-in (default %(default)s)",
    )
    fit.add_argument("--out", type=Path, required=True, help="residual file to write (.npz)")
    fit.add_argument("--report", type=Path, required=True, help="folder for validation files")
    fit.add_argument(
        "--features", default=None, help="comma-separated features (default: model-specific)"
    )
    fit.add_argument("--sparse", action="store_true", help="sparse GP (inducing points)")
    fit.add_argument("--inducing", type=int, default=64, help="inducing points when sparse")
    fit.add_argument(
        "--holdout", type=float, default=0.25, help="fraction of batches held out for validation"
    )
    fit.add_argument(
        "--window-hours", type=float, default=24.0, help="window of the growth-rate estimate"
    )
    fit.add_argument(
        "--every-hours",
        type=float,
        default=6.0,
        help="spacing of the growth-rate observations (training and in-batch)",
    )
    fit.add_argument(
        "--mode",
        choices=("additive", "multiplicative"),
        default="multiplicative",
        help="residual on the growth rate: added (1/h) or as a factor mu*(1+r)",
    )
    fit.add_argument(
        "--min-model-rate",
        type=float,
        default=0.01,
        help="multiplicative: use growth observations only where the model's rate exceeds "
        "this (1/h); below it the ratio is mostly noise",
    )
    fit.add_argument(
        "--adapt",
        default="none",
        help="patient parameters fitted during each batch (docs/hybrid.md): 'none' (default: "
        "the residual's batch effect learns the batch, as the hybrid MPC does), 'auto' (the "
        "model's: T cell mu_max,exhaustion_threshold,lag_time; CHO none) or a "
        "comma-separated subset",
    )
    fit.add_argument(
        "--adapt-window-hours",
        type=float,
        default=240.0,
        help="the patient-parameter fit uses the batch's last this many hours",
    )
    fit.add_argument(
        "--batch-effect",
        choices=("auto", "none", "offset", "drift"),
        default="auto",
        help="per-batch random effect of the residual, learned during the running batch "
        "(docs/gp.md); 'auto': none with patient parameters (--adapt), else drift",
    )
    fit.add_argument(
        "--batch-feature", default="culture_age", help="feature a 'drift' batch effect follows"
    )
    fit.add_argument(
        "--batch-capacity", type=int, default=16, help="running-batch observations kept"
    )
    fit.add_argument(
        "--batch-min-lengthscale",
        type=float,
        default=None,
        help="lower bound of the drift's length scale in batch-feature units (default: the "
        "window width when the batch feature is culture_age and windows overlap, else none)",
    )
    fit.add_argument(
        "--smoothing-hours",
        type=float,
        default=12.0,
        help="validation: causal fit of ln(viable cells) over this many hours for the start",
    )
    fit.add_argument(
        "--folds",
        type=int,
        default=0,
        help="also cross-validate: K folds of batches (in name order), each held out once; "
        "figures pooled over all batches go to validation.json 'cross_validation'",
    )
    fit.add_argument("--iterations", type=int, default=150, help="hyperparameter iterations")
    fit.add_argument("--parameters", type=Path, default=None, help="model parameter file")
    fit.add_argument(
        "--process",
        type=Path,
        default=None,
        help="process specification file the batches ran under (default: the plug-in's; the "
        "records' start volume and declared feed composition are checked against it)",
    )
    fit.add_argument(
        "--mapping",
        type=Path,
        default=None,
        help="mapping file of vendor exports (CSV, Excel, Parquet): columns, units, time base "
        "(docs/records.md); --data then matches the exports",
    )
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(func=cmd_fit)
    _add_calibrate_parser(sub)
    add_audit_parser(sub)
    add_report_parser(sub)
    from controller.runtime.service import register as add_run_parser

    add_run_parser(sub)
    return parser


def _feature_list(text: str | None) -> tuple[str, ...] | None:
    """``--features``: comma-separated names; None (the model's defaults) when not given."""
    if not text:
        return None
    return tuple(f.strip() for f in text.split(",") if f.strip())


def cmd_fit(args: argparse.Namespace) -> int:
    """``hmpc fit``: the options as a :class:`FitSpec`, :func:`fit_residual`, the files
    written, and a summary printed. Bad options and records raise (status 2 in run_cli)."""
    spec = FitSpec(
        data=args.data,
        model=args.model,
        features=_feature_list(args.features),
        sparse=args.sparse,
        inducing=args.inducing,
        holdout=args.holdout,
        window_hours=args.window_hours,
        every_hours=args.every_hours,
        mode=args.mode,
        min_model_rate=args.min_model_rate,
        adapt=args.adapt,
        adapt_window_hours=args.adapt_window_hours,
        batch_effect=args.batch_effect,
        batch_feature=args.batch_feature,
        batch_capacity=args.batch_capacity,
        batch_min_lengthscale=args.batch_min_lengthscale,
        smoothing_hours=args.smoothing_hours,
        folds=args.folds,
        iterations=args.iterations,
        parameters=args.parameters,
        process=args.process,
        seed=args.seed,
        mapping=args.mapping,
    )
    result = fit_residual(spec)
    summary = result.save(args.out, args.report)
    cross = result.cross_validation
    n_train, n_held = len(result.training_batches), len(result.held_out_batches)
    print(
        f"fitted {'sparse' if spec.sparse else 'exact'} GP ({spec.mode}, batch effect "
        f"{result.batch_effect}) on {result.training_points} points from {n_train} batches; "
        f"24 h-ahead viable-cell RMSE on {n_held} held-out batches: mechanistic "
        f"{summary['rmse_mechanistic']:.3f}, hybrid {summary['rmse_hybrid']:.3f} "
        f"({summary['rmse_reduction']:.0%} lower; without the batch's own data "
        f"{summary['rmse_hybrid_population']:.3f}) 1e6 cells/mL; 95 % band covers "
        f"{summary['coverage_95']:.0%} of {summary['predictions']} held-out points"
    )
    if "rmse_mechanistic_true" in summary:
        print(
            "against the simulated true viable cells (no probe noise on the compared value): "
            f"mechanistic {summary['rmse_mechanistic_true']:.3f}, hybrid "
            f"{summary['rmse_hybrid_true']:.3f} ({summary['rmse_reduction_true']:.0%} lower); "
            f"the model's 95 % band covers {summary['coverage_95_true']:.0%}"
        )
    if cross is not None:
        print(
            f"{spec.folds}-fold cross-validation over all {result.records} batches "
            f"({cross['predictions']} predictions): mechanistic {cross['rmse_mechanistic']:.3f}, "
            f"hybrid {cross['rmse_hybrid']:.3f} ({cross['rmse_reduction']:.0%} lower), 95 % "
            f"band covers {cross['coverage_95']:.0%}"
            + (
                f"; against the true cells: mechanistic {cross['rmse_mechanistic_true']:.3f}, "
                f"hybrid {cross['rmse_hybrid_true']:.3f} ({cross['rmse_reduction_true']:.0%} "
                f"lower), band covers {cross['coverage_95_true']:.0%}"
                if "rmse_mechanistic_true" in cross
                else ""
            )
        )
    for warning in result.process_warnings:  # also logged; repeated beside the figures
        print(f"warning: {warning}")
    print(f"wrote {args.out}, {args.report}/validation.json, {args.report}/validation.png")
    return 0


def _add_calibrate_parser(sub: Any) -> None:
    cal = sub.add_parser(
        "calibrate",
        help="calibrate the model's population parameters to batch records (docs/calibration.md)",
    )
    cal.add_argument(
        "--process",
        required=True,
        help="the process plug-in's name (its packaged process file) or a process file "
        "(whose [meta] model names the plug-in)",
    )
    cal.add_argument(
        "--data",
        nargs="+",
        required=True,
        help="batch records: folders (DIR/trajectory.csv or DIR/*/trajectory.csv), files or "
        "quoted globs",
    )
    cal.add_argument(
        "--parameters", required=True, help="comma-separated parameters, e.g. mu_max,k_glucose"
    )
    cal.add_argument(
        "--parameter-file",
        type=Path,
        default=None,
        help="parameter file whose values centre the priors and fill the rest (default: the "
        "plug-in's packaged one)",
    )
    cal.add_argument(
        "--holdout",
        nargs="+",
        default=None,
        help="held-out batches for the 24 h-ahead check: records as for --data, or a "
        "fraction of the --data batches (the last in name order)",
    )
    cal.add_argument(
        "--initial",
        choices=INITIAL_MODES,
        default="estimate",
        help="per-batch initial states: estimated (default) or fixed at the first measurements",
    )
    cal.add_argument(
        "--mapping",
        type=Path,
        default=None,
        help="mapping file of vendor exports (docs/records.md); --data and --holdout then "
        "name the exports (files or quoted globs)",
    )
    cal.add_argument("--no-profiles", action="store_true", help="skip the profile likelihoods")
    cal.add_argument("--out", type=Path, default=None, help="calibrated parameter file (TOML)")
    cal.add_argument(
        "--report", type=Path, default=None, help="HTML report (and its .json beside it)"
    )
    cal.set_defaults(func=cmd_calibrate)


def _record_paths(items: Sequence[str]) -> list[str]:
    """Batch-record files of ``--data`` items: a folder (its trajectory.csv, else
    */trajectory.csv), a file or a glob; each item must match at least one record."""
    import glob

    out: list[str] = []
    for item in items:
        path = Path(item)
        if path.is_dir():
            pattern = str(path / "trajectory.csv")
            if not path.joinpath("trajectory.csv").exists():
                pattern = str(path / "*" / "trajectory.csv")
        else:
            pattern = item
        found = sorted(p for p in glob.glob(pattern) if Path(p).name != "assays.csv")
        if not found:
            raise ConfigError(f"no batch records match {item!r} (looked for {pattern!r})")
        out += [p for p in found if p not in out]
    return out


def _process_argument(text: str) -> tuple[str, Path | None]:
    """``--process``: a registered plug-in name, or a process file naming its plug-in."""
    if text in available_processes():
        return text, None
    path = Path(text)
    if not path.is_file():
        raise ConfigError(
            f"--process {text!r}: neither a registered process "
            f"({', '.join(available_processes())}) nor a process file"
        )
    model = str(load_toml(path).get("meta", {}).get("model", ""))
    if not model.endswith("-process"):
        raise ConfigError(
            f"--process {path}: [meta] model = {model!r}; a process file says "
            'model = "<plug-in>-process"'
        )
    return model.removesuffix("-process"), path


def cmd_calibrate(args: argparse.Namespace) -> int:
    """``hmpc calibrate``: records -> :func:`controller.training.calibration.calibrate`, the
    24 h-ahead check on the held-out batches, the files written, a summary printed."""
    import dataclasses
    import datetime
    import json

    from controller.training import calibration as cal
    from controller.training import calibration_report as files
    from controller.training.batches import read_batch_record
    from controller.training.process_check import check_records_fit_process
    from plant_models.process import get_process

    name, process_file = _process_argument(args.process)
    plugin = get_process(name)
    parameters, provenance = plugin.load_parameters(args.parameter_file)
    model = plugin.model(parameters, plugin.load_process(process_file)[0])
    settings = cal.CalibrationSettings(
        parameters=tuple(p.strip() for p in args.parameters.split(",") if p.strip()),
        initial=args.initial,
        profiles=not args.no_profiles,
    )
    paths = _record_paths(args.data)
    held_paths: list[str] = []
    if args.holdout:
        try:
            fraction = float(args.holdout[0]) if len(args.holdout) == 1 else None
        except ValueError:
            fraction = None
        if fraction is not None:
            if not 0.0 < fraction < 1.0 or len(paths) < 2:
                raise ConfigError(
                    f"--holdout {fraction}: a fraction lies in (0, 1) and needs 2+ records"
                )
            n_held = min(len(paths) - 1, max(1, round(fraction * len(paths))))
            paths, held_paths = paths[:-n_held], paths[-n_held:]
        else:
            held_paths = _record_paths(args.holdout)
            both = [
                p for p in held_paths if Path(p).resolve() in {Path(q).resolve() for q in paths}
            ]
            if both:
                raise ConfigError(
                    f"--holdout {both} are also in --data: a held-out batch must not be "
                    "calibrated on; name it in one of the two"
                )
    if args.out is not None and args.report is not None:
        if Path(args.out).resolve() == Path(args.report).resolve():
            raise ConfigError("--out and --report name the same file; the report would replace it")
    records = [read_batch_record(p, model, mapping=args.mapping) for p in paths]
    held = [read_batch_record(p, model, mapping=args.mapping) for p in held_paths]
    # the records must have run under the process the model is built for (start volume,
    # declared feed composition): an error, or warnings printed and kept in the report
    for warning in check_records_fit_process([*records, *held], model, process_file):
        print(f"warning: {warning}", file=sys.stderr)
    result = cal.calibrate(plugin, model, records, settings)
    calibrated = plugin.model(
        dataclasses.replace(parameters, **result.values), plugin.load_process(process_file)[0]
    )
    validation = None
    before = "shipped" if args.parameter_file is None else "input"  # the prior centre
    if held:
        validation = cal.validate_24h_mechanistic({before: model, "calibrated": calibrated}, held)
    date = datetime.datetime.now(datetime.UTC).date().isoformat()
    command = "hmpc calibrate " + " ".join(
        [f"--process {args.process}", "--data " + " ".join(args.data)]
        + [f"--parameters {args.parameters}"]
        + ([f"--parameter-file {args.parameter_file}"] if args.parameter_file else [])
        + (["--holdout " + " ".join(args.holdout)] if args.holdout else [])
        + [f"--initial {args.initial}"]
        + (["--no-profiles"] if args.no_profiles else [])
    )
    data = files.data_files(paths)
    for e in result.estimates:
        profile = (
            f", profile [{e.profile[0]:.4g}, {e.profile[1]:.4g}]" if e.profile is not None else ""
        )
        flags = ([f"flat profile ({e.flat})"] if e.flat else []) + (
            ["at a search bound"] if e.at_bound else []
        )
        print(
            f"{e.name} = {e.value:.4g} {e.prior.unit} (prior {e.prior.centre:.4g}; 95 % Laplace "
            f"[{e.laplace[0]:.4g}, {e.laplace[1]:.4g}]{profile})"
            + (f" NOT IDENTIFIED: {', '.join(flags)}" if flags else "")
        )
    for a, b, c in result.flagged_pairs:
        print(f"flagged pair: {a} and {b}, correlation {c:+.3f} (only a combination is identified)")
    print(
        f"{len(records)} batches, {result.observations} measurements; chi-square per "
        f"measurement {result.chi2_data / result.observations:.3g} calibrated, "
        f"{result.chi2_data_nominal / result.observations:.3g} at the prior centre; "
        f"{result.message}"
    )
    if validation is not None:
        print(
            f"24 h-ahead viable-cell RMSE on {len(held_paths)} held-out batches "
            f"({validation['predictions']} predictions): {before} "
            f"{validation[f'rmse_{before}']:.4g}, calibrated {validation['rmse_calibrated']:.4g} "
            "1e6 cells/mL"
        )
    if args.out is not None:
        files.write_parameter_file(args.out, provenance, result, data, date=date, command=command)
        plugin.load_parameters(args.out)  # the written file loads like any parameter file
        print(f"wrote {args.out}")
    if args.report is not None:
        files.write_report(
            args.report,
            result,
            validation,
            data,
            title=f"hmpc calibrate: {name}, {', '.join(settings.parameters)}",
            command=command,
            parameter_file_out=str(args.out) if args.out is not None else None,
        )
        report_json = args.report.with_suffix(".json")
        figures = files.summary(
            result,
            validation,
            data,
            process=name,
            parameter_file=provenance.path,
            date=date,
        )
        report_json.write_text(json.dumps(figures, indent=2) + "\n")
        print(f"wrote {args.report}, {report_json}")
    return 0


def run_cli(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> int:
    """Parse, set up logging (``-v`` for debug) and run the chosen sub-command. User errors
    (typed hmpc errors, bad values, files that cannot be read) become a one-line message
    and exit status 2, never a traceback. Shared by ``hmpc`` and ``hmpc-sim``."""
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return int(args.func(args))
    except (HmpcError, ValueError, OSError) as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    return run_cli(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())

"""``hmpc``: the deployable controller's command line."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from controller.records.audit import add_audit_parser
from controller.records.report import add_report_parser
from controller.training.fitting import FitSpec, fit_residual
from plant_models.errors import HmpcError
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

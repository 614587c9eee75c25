"""``hmpc``: the deployable controller's command line."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from controller.audit import add_audit_parser
from controller.report import add_report_parser
from plant_models.base import MechanisticModel
from plant_models.cho import CHOFedBatchModel, load_cho_parameters, load_cho_process
from plant_models.errors import HmpcError
from plant_models.gp import GPResidual
from plant_models.hybrid import HybridModel, RateCorrection, discretize, feature_units
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process

__all__ = ["main", "nominal_model", "run_cli"]

log = logging.getLogger("hmpc")

DEFAULT_FEATURES = {
    "tcell": ("lactate", "il2", "inhibitor", "culture_age"),
    "cho": ("glucose", "lactate", "ammonia", "culture_age"),
}


def nominal_model(
    kind: str, parameters: Path | None = None, process: Path | None = None
) -> MechanisticModel[Any]:
    """The controller's mechanistic model of a kind (``tcell`` or ``cho``)."""
    if kind == "tcell":
        return TCellExpansionModel(
            load_tcell_parameters(parameters)[0], load_tcell_process(process)[0]
        )
    if kind == "cho":
        return CHOFedBatchModel(load_cho_parameters(parameters)[0], load_cho_process(process)[0])
    raise ValueError(f"unknown model {kind!r}; expected 'tcell' or 'cho'")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hmpc", description="Hybrid MPC for ATMP bioreactors.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fit = sub.add_parser("fit", help="train a growth-rate residual from batch records")
    fit.add_argument(
        "--data", required=True, help="glob of batch-record CSVs, e.g. 'runs/*/trajectory.csv'"
    )
    fit.add_argument("--model", choices=("tcell", "cho"), default="tcell")
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
    fit.add_argument("--iterations", type=int, default=150, help="hyperparameter iterations")
    fit.add_argument("--parameters", type=Path, default=None, help="model parameter file")
    fit.add_argument("--process", type=Path, default=None, help="process specification file")
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(func=cmd_fit)
    add_audit_parser(sub)
    add_report_parser(sub)
    from controller.runtime.service import register as add_run_parser

    add_run_parser(sub)
    return parser


def cmd_fit(args: argparse.Namespace) -> int:
    from controller.training import growth_rate_observations, load_batch_records

    base = nominal_model(args.model, args.parameters, args.process)
    features = (
        tuple(f.strip() for f in args.features.split(",") if f.strip())
        if args.features
        else DEFAULT_FEATURES[args.model]
    )
    units = feature_units(base)
    unknown = [f for f in features if f not in units]
    if unknown:
        raise ValueError(f"--features: unknown {unknown}; choose from {sorted(units)}")
    if not 0.0 < args.holdout < 1.0:
        raise ValueError(f"--holdout must lie in (0, 1), got {args.holdout}")
    records = load_batch_records(args.data, base)
    if len(records) < 2:
        raise ValueError(
            f"--data matches {len(records)} batch; at least 2 are needed (training and held-out)"
        )
    n_hold = max(1, math.ceil(args.holdout * len(records)))
    train, held = records[:-n_hold], records[-n_hold:]
    obs = growth_rate_observations(train, base, features, window_h=args.window_hours)
    gp = GPResidual(
        features,
        [units[f] for f in features],
        "growth_rate_residual",
        "1/h",
        sparse=args.sparse,
        n_inducing=args.inducing,
        training_iterations=args.iterations,
        seed=args.seed,
    )
    gp.fit(obs[list(features)].to_numpy(float), obs["residual"].to_numpy(float))
    hybrid = HybridModel(base, [RateCorrection("growth_rate", gp)])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gp.save(args.out)
    args.report.mkdir(parents=True, exist_ok=True)
    validation = validate_24h(base, hybrid, held, features=features, window_h=args.window_hours)
    summary = {
        "model": args.model,
        "features": list(features),
        "training_batches": [r.name for r in train],
        "held_out_batches": [r.name for r in held],
        "training_points": len(obs),
        "sparse": bool(args.sparse),
        "horizon_h": 24.0,
        "rmse_mechanistic": validation["rmse_mechanistic"],
        "rmse_hybrid": validation["rmse_hybrid"],
        "rmse_hybrid_online": validation["rmse_hybrid_online"],
        "rmse_unit": "1e6 cells/mL",
        "predictions": len(validation["rows"]),
        "residual_file": str(args.out),
    }
    (args.report / "validation.json").write_text(json.dumps(summary, indent=2) + "\n")
    _plot_validation(validation["rows"], args.report / "validation.png")
    print(
        f"fitted {'sparse' if args.sparse else 'exact'} GP on {len(obs)} points from "
        f"{len(train)} batches; 24 h-ahead viable-cell RMSE on {len(held)} held-out batches: "
        f"mechanistic {summary['rmse_mechanistic']:.3f}, hybrid {summary['rmse_hybrid']:.3f}, "
        f"hybrid updated during the batch {summary['rmse_hybrid_online']:.3f} 1e6 cells/mL"
    )
    print(f"wrote {args.out}, {args.report}/validation.json, {args.report}/validation.png")
    return 0


def validate_24h(
    base: MechanisticModel[Any],
    hybrid: HybridModel,
    records: Sequence[Any],
    *,
    features: Sequence[str],
    window_h: float = 24.0,
    horizon_h: float = 24.0,
    every_h: float = 12.0,
) -> dict[str, Any]:
    """24 h-ahead predictions of viable cells from reconstructed states and recorded inputs.

    Three predictors: the mechanistic model, the hybrid model as fitted, and the hybrid
    model whose residual was updated (no re-fit) with the batch's own growth-rate
    observations available at the prediction time (learning during the batch). The
    hybrid prediction carries a band from the residual's variance: the standard deviation
    of ln(viable cells) after the horizon is taken as the sum of the hourly growth-rate
    standard deviations times the step (fully correlated, conservative).
    """
    import copy

    from controller.training import growth_rate_observations, reconstruct_states

    rows: list[dict[str, Any]] = []
    var_f = hybrid.rate_variance()
    steps: dict[float, tuple[Any, Any]] = {}
    i_cells = base.state_names.index("viable_cells")
    residual = hybrid.corrections[0].residual
    for rec in records:
        x = reconstruct_states(rec, base)
        own = growth_rate_observations([rec], base, features, window_h=window_h)
        t = rec.steps["time"].to_numpy(float)
        u = rec.steps[list(base.input_names)].to_numpy(float)
        next_start = t[0] + 24.0
        for i in range(len(t)):
            if t[i] < next_start - 1e-9:
                continue
            end = np.searchsorted(t, t[i] + horizon_h - 1e-9)
            if end >= len(t) or abs(t[end] - t[i] - horizon_h) > 1e-6:
                break
            next_start = t[i] + every_h
            # the batch's own observations whose window has closed by t[i]
            seen = own[own["time"] + window_h / 2.0 <= t[i] + 1e-9]
            online = hybrid
            if len(seen):
                updated = copy.deepcopy(residual).update(
                    seen[list(features)].to_numpy(float), seen["residual"].to_numpy(float)
                )
                online = HybridModel(base, [RateCorrection("growth_rate", updated)])
            xm, xh, xo, sd_log = x[i].copy(), x[i].copy(), x[i].copy(), 0.0
            online_steps: dict[float, Any] = {}
            for k in range(i, end):
                dt = float(t[k + 1] - t[k])
                if dt not in steps:
                    steps[dt] = (discretize(base, dt), hybrid.discretize(dt))
                fm, fh = steps[dt]
                sd_log += math.sqrt(max(float(var_f(t[k], xh, u[k])[0]), 0.0)) * dt
                xm = np.maximum(np.array(fm(t[k], xm, u[k])).ravel(), 0.0)
                xh = np.maximum(np.array(fh(t[k], xh, u[k])).ravel(), 0.0)
                if dt not in online_steps:
                    online_steps[dt] = discretize(online, dt)
                xo = np.maximum(np.array(online_steps[dt](t[k], xo, u[k])).ravel(), 0.0)
            rows.append(
                {
                    "batch": rec.name,
                    "start": t[i],
                    "time": t[end],
                    "measured": float(x[end, i_cells]),
                    "mechanistic": float(xm[i_cells]),
                    "hybrid": float(xh[i_cells]),
                    "hybrid_online": float(xo[i_cells]),
                    "hybrid_sd_log": sd_log,
                }
            )
    if not rows:
        raise ValueError("held-out batches are too short for a 24 h-ahead validation")
    meas = np.array([r["measured"] for r in rows])

    def rmse(key: str) -> float:
        return float(np.sqrt(np.mean((np.array([r[key] for r in rows]) - meas) ** 2)))

    return {
        "rows": rows,
        "rmse_mechanistic": rmse("mechanistic"),
        "rmse_hybrid": rmse("hybrid"),
        "rmse_hybrid_online": rmse("hybrid_online"),
    }


def _plot_validation(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(
        1, len(batches), figsize=(6 * len(batches), 4.5), squeeze=False, constrained_layout=True
    )
    for ax, name in zip(axes[0], batches, strict=True):
        sel = [r for r in rows if r["batch"] == name]
        days = np.array([r["time"] for r in sel]) / 24.0
        hyb = np.array([r["hybrid"] for r in sel])
        sd = np.array([r["hybrid_sd_log"] for r in sel])
        ax.plot(days, [r["measured"] for r in sel], "ko", ms=4, label="measured")
        ax.plot(days, [r["mechanistic"] for r in sel], "s--", ms=4, label="mechanistic")
        ax.plot(days, hyb, "^-", ms=4, label="hybrid")
        ax.plot(
            days, [r["hybrid_online"] for r in sel], "v-", ms=4, label="hybrid, updated in batch"
        )
        ax.fill_between(
            days, hyb * np.exp(-2 * sd), hyb * np.exp(2 * sd), alpha=0.25, label="hybrid ±2σ (GP)"
        )
        ax.set_title(f"{name}: 24 h-ahead viable cells")
        ax.set_xlabel("culture age at prediction target [d]")
        ax.set_ylabel("viable cells [1e6 cells/mL]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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

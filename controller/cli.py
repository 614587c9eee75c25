"""``hmpc``: the deployable controller's command line."""

from __future__ import annotations

import argparse
import dataclasses
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
from plant_models.adaptation import (
    AdaptedParameter,
    PatientAdaptation,
    default_adapted_parameters,
    default_simulated_states,
    with_parameters,
)
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
    fit.add_argument("--process", type=Path, default=None, help="process specification file")
    fit.add_argument("--seed", type=int, default=0)
    fit.set_defaults(func=cmd_fit)
    add_audit_parser(sub)
    add_report_parser(sub)
    from controller.runtime.service import register as add_run_parser

    add_run_parser(sub)
    return parser


def cmd_fit(args: argparse.Namespace) -> int:
    from controller.training import (
        estimate_log_noise,
        load_batch_records,
    )

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
    adapt = _adapted_parameters(args.model, args.adapt)
    if not args.adapt_window_hours > 0:
        raise ValueError(f"--adapt-window-hours must be positive, got {args.adapt_window_hours}")
    if args.batch_effect == "auto":
        args.batch_effect = "none" if adapt else "drift"
    elif adapt and args.batch_effect != "none":
        raise ValueError(
            f"--batch-effect {args.batch_effect} and patient parameters (--adapt) both learn "
            "the running batch; use one (--adapt none for the batch effect)"
        )
    simulated = default_simulated_states(args.model)
    batch_feature = args.batch_feature if args.batch_effect == "drift" else None
    min_lengthscale = args.batch_min_lengthscale
    if (
        min_lengthscale is None
        and batch_feature == "culture_age"
        and args.every_hours < args.window_hours
    ):
        # overlapping windows: their estimation noise is correlated over a window width
        min_lengthscale = args.window_hours
    if batch_feature is not None and batch_feature not in features:
        raise ValueError(
            f"--batch-feature {batch_feature!r} must be one of the features {list(features)}"
        )
    records = load_batch_records(args.data, base)
    if len(records) < 2:
        raise ValueError(
            f"--data matches {len(records)} batch; at least 2 are needed (training and held-out)"
        )
    n_hold = max(1, math.ceil(args.holdout * len(records)))
    train, held = records[:-n_hold], records[-n_hold:]
    if args.folds == 1 or args.folds < 0 or args.folds > len(records):
        raise ValueError(f"--folds must be 0 (off) or 2..{len(records)}, got {args.folds}")
    multiplicative = args.mode == "multiplicative"

    def fit_and_validate(
        train: Sequence[Any], held: Sequence[Any]
    ) -> tuple[GPResidual, int, Any, dict[str, Any]]:
        obs = _training_observations(
            train,
            base,
            features,
            adapt,
            simulated,
            window_h=args.window_hours,
            every_h=args.every_hours,
            min_model_rate=args.min_model_rate,
        )
        target = "relative_residual" if multiplicative else "residual"
        obs = obs[np.isfinite(obs[target].to_numpy(float))]
        gp = GPResidual(
            features,
            [units[f] for f in features],
            "growth_rate_factor" if multiplicative else "growth_rate_residual",
            "1" if multiplicative else "1/h",
            sparse=args.sparse,
            n_inducing=args.inducing,
            training_iterations=args.iterations,
            seed=args.seed,
            batch_effect=args.batch_effect,
            batch_feature=batch_feature,
            batch_capacity=args.batch_capacity,
            batch_min_lengthscale=min_lengthscale if batch_feature is not None else None,
        )
        gp.fit(
            obs[list(features)].to_numpy(float),
            obs[target].to_numpy(float),
            batches=obs["batch"].tolist(),
        )
        hybrid = HybridModel(base, [RateCorrection("growth_rate", gp, args.mode)])
        noise = estimate_log_noise(train)
        validation = validate_24h(
            base,
            hybrid,
            held,
            window_h=args.window_hours,
            observe_every_h=args.every_hours,
            smoothing_h=args.smoothing_hours,
            noise=noise,
            min_model_rate=args.min_model_rate,
            adapt=adapt,
            adapt_simulated=simulated,
            adapt_window_h=args.adapt_window_hours,
        )
        return gp, len(obs), noise, validation

    gp, n_obs, noise, validation = fit_and_validate(train, held)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    gp.save(args.out)
    args.report.mkdir(parents=True, exist_ok=True)
    cross: dict[str, Any] | None = None
    if args.folds:
        folds = np.array_split(np.arange(len(records)), args.folds)
        pooled: list[dict[str, Any]] = []
        per_fold = []
        for k, fold in enumerate(folds):
            inside = set(fold.tolist())
            fold_train = [r for i, r in enumerate(records) if i not in inside]
            fold_held = [records[i] for i in fold]
            fold_result = fit_and_validate(fold_train, fold_held)[3]
            pooled.extend(fold_result["rows"])
            per_fold.append(
                {
                    "held_out_batches": [r.name for r in fold_held],
                    "rmse_mechanistic": fold_result["rmse_mechanistic"],
                    "rmse_hybrid": fold_result["rmse_hybrid"],
                    "coverage_95": fold_result["coverage_95"],
                    **{k: v for k, v in fold_result.items() if k.endswith("_true")},
                }
            )
            log.info("fold %d of %d done", k + 1, args.folds)
        cross = {"folds": per_fold, **_pooled_figures(pooled)}
    rmse_m, rmse_h = validation["rmse_mechanistic"], validation["rmse_hybrid"]
    summary = {
        "model": args.model,
        "features": list(features),
        "mode": args.mode,
        "batch_effect": args.batch_effect,
        "batch_feature": batch_feature,
        "adapted_parameters": [dataclasses.asdict(p) for p in adapt],
        "adapt_window_h": args.adapt_window_hours if adapt else None,
        "training_batches": [r.name for r in train],
        "held_out_batches": [r.name for r in held],
        "training_points": n_obs,
        "sparse": bool(args.sparse),
        "horizon_h": 24.0,
        "rmse_mechanistic": rmse_m,
        "rmse_hybrid": rmse_h,
        "rmse_hybrid_population": validation["rmse_hybrid_population"],
        "rmse_hybrid_online": rmse_h,
        "rmse_reduction": 1.0 - rmse_h / rmse_m if rmse_m > 0 else math.nan,
        "rmse_unit": "1e6 cells/mL",
        "coverage_95": validation["coverage_95"],
        "coverage_95_population": validation["coverage_95_population"],
        **{k: v for k, v in validation.items() if k.endswith("_true")},
        "per_batch": validation["per_batch"],
        "start_smoothing_h": args.smoothing_hours,
        "observe_every_h": args.every_hours,
        "min_model_rate": args.min_model_rate,
        "log_noise_coefficients": noise.coefficients.tolist(),
        "hyperparameters": {
            "lengthscales": dict(
                zip(features, (gp.lengthscales_ * gp.x_scale_).tolist(), strict=True)
            ),
            "outputscale": gp.outputscale_ * gp.y_scale_**2,
            "noise_variance": gp.noise_variance_,
            "batch_variance": gp.batch_variance_ * gp.y_scale_**2,
            "batch_lengthscale": (
                gp.batch_lengthscale_ * gp.x_scale_[features.index(batch_feature)]
                if batch_feature is not None
                else None
            ),
            "unit": gp.target_unit,
        },
        "predictions": len(validation["rows"]),
        "residual_file": str(args.out),
    }
    if cross is not None:
        summary["cross_validation"] = cross
    (args.report / "validation.json").write_text(json.dumps(_json_safe(summary), indent=2) + "\n")
    _plot_validation(validation["rows"], args.report / "validation.png")
    print(
        f"fitted {'sparse' if args.sparse else 'exact'} GP ({args.mode}, batch effect "
        f"{args.batch_effect}) on {n_obs} points from {len(train)} batches; 24 h-ahead "
        f"viable-cell RMSE on {len(held)} held-out batches: mechanistic {rmse_m:.3f}, "
        f"hybrid {rmse_h:.3f} ({summary['rmse_reduction']:.0%} lower; without the batch's "
        f"own data {summary['rmse_hybrid_population']:.3f}) 1e6 cells/mL; 95 % band covers "
        f"{summary['coverage_95']:.0%} of {len(validation['rows'])} held-out points"
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
            f"{args.folds}-fold cross-validation over all {len(records)} batches "
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
    print(f"wrote {args.out}, {args.report}/validation.json, {args.report}/validation.png")
    return 0


def _adapted_parameters(model: str, spec: str) -> tuple[AdaptedParameter, ...]:
    """``--adapt``: 'auto' (the model's defaults), 'none', or a subset of the defaults."""
    defaults = default_adapted_parameters(model)
    if spec == "auto":
        return defaults
    if spec == "none":
        return ()
    by_name = {p.name: p for p in defaults}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise ValueError(
            f"--adapt: unknown parameter(s) {unknown or spec!r} for {model}; choose 'auto', "
            f"'none' or from {sorted(by_name) or '(none for this model)'}"
        )
    return tuple(by_name[n] for n in names)


def _sample_period(records: Sequence[Any]) -> float:
    """The records' sample period (h): the median step of the first record."""
    t = records[0].steps["time"].to_numpy(float)
    if t.size < 2:
        raise ValueError(f"batch record {records[0].name!r} has fewer than 2 samples")
    return float(np.median(np.diff(t)))


def _training_observations(
    records: Sequence[Any],
    base: MechanisticModel[Any],
    features: Sequence[str],
    adapt: Sequence[AdaptedParameter],
    simulated: Sequence[str],
    **kwargs: Any,
) -> Any:
    """Growth-rate observations of the training batches; with patient parameters each batch's
    are fitted on its whole record first and its residuals taken against that adapted model,
    so the residual learns what the patient parameters do not explain."""
    import pandas as pd

    from controller.training import (
        estimate_log_noise,
        growth_rate_observations,
        reconstruct_states,
    )

    if not adapt:
        return growth_rate_observations(records, base, features, **kwargs)
    i_cells = base.state_names.index(simulated[0])
    longest = max(float(r.steps["time"].iloc[-1] - r.steps["time"].iloc[0]) for r in records)
    fitter = PatientAdaptation(
        base, adapt, simulated=simulated, window_h=longest, step_h=_sample_period(records)
    )
    noise = estimate_log_noise(records)
    frames = []
    for rec in records:
        x = reconstruct_states(rec, base)
        t = rec.steps["time"].to_numpy(float)
        u = rec.steps[list(base.input_names)].to_numpy(float)
        cells = np.maximum(x[:, i_cells], 1e-9)
        fit = fitter.fit(t, x, u, np.log(cells), np.sqrt(noise.variance(cells)), len(t) - 1)
        frames.append(
            growth_rate_observations([rec], with_parameters(base, fit.values), features, **kwargs)
        )
    return pd.concat(frames, ignore_index=True)


def _pooled_figures(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """RMSEs, reduction and band coverage over prediction rows of :func:`validate_24h`."""
    meas = np.array([r["measured"] for r in rows])

    def rmse(key: str) -> float:
        return float(np.sqrt(np.mean((np.array([r[key] for r in rows]) - meas) ** 2)))

    pred = np.maximum(np.array([r["hybrid"] for r in rows]), 1e-9)
    sd = np.maximum(np.array([r["sd_log"] for r in rows]), 1e-12)
    z = np.log(np.maximum(meas, 1e-9) / pred) / sd
    mech, hyb = rmse("mechanistic"), rmse("hybrid")
    return {
        **_true_state_figures(rows),
        "predictions": len(rows),
        "rmse_mechanistic": mech,
        "rmse_hybrid": hyb,
        "rmse_hybrid_population": rmse("hybrid_population"),
        "rmse_reduction": 1.0 - hyb / mech if mech > 0 else math.nan,
        "coverage_95": float(np.mean(np.abs(z) <= 1.959964)),
    }


def _true_state_figures(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The same figures against the simulated true viable cells (``*_true`` keys), when every
    compared batch carries them; empty for real site records. The band is then the model's
    alone (start estimate + residual), without the compared reading's probe noise."""
    true = np.array([r.get("true", math.nan) for r in rows], dtype=float)
    if not rows or not np.all(np.isfinite(true)):
        return {}

    def rmse(key: str) -> float:
        return float(np.sqrt(np.mean((np.array([r[key] for r in rows]) - true) ** 2)))

    pred = np.maximum(np.array([r["hybrid"] for r in rows]), 1e-9)
    sd = np.maximum(np.array([r["sd_log_model"] for r in rows]), 1e-12)
    z = np.log(np.maximum(true, 1e-9) / pred) / sd
    mech, hyb = rmse("mechanistic"), rmse("hybrid")
    return {
        "rmse_mechanistic_true": mech,
        "rmse_hybrid_true": hyb,
        "rmse_hybrid_population_true": rmse("hybrid_population"),
        "rmse_reduction_true": 1.0 - hyb / mech if mech > 0 else math.nan,
        "coverage_95_true": float(np.mean(np.abs(z) <= 1.959964)),
    }


def _json_safe(value: Any) -> Any:
    """Replace non-finite floats (not valid JSON) by None, recursively."""
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def validate_24h(
    base: MechanisticModel[Any],
    hybrid: HybridModel,
    records: Sequence[Any],
    *,
    features: Sequence[str] | None = None,
    window_h: float = 24.0,
    horizon_h: float = 24.0,
    every_h: float = 12.0,
    observe_every_h: float = 6.0,
    smoothing_h: float = 12.0,
    noise: Any = None,
    min_model_rate: float = 0.003,
    adapt: Sequence[Any] = (),
    adapt_simulated: Sequence[str] = ("viable_cells",),
    adapt_window_h: float = 240.0,
) -> dict[str, Any]:
    """24 h-ahead predictions of viable cells on held-out batches, with calibrated bands.

    Every ``every_h`` hours (from day 1) each predictor starts from the same state,
    reconstructed from measurements up to that time (viable cells: a causal straight-line
    fit of ln X over the last ``smoothing_h`` hours), and runs the recorded inputs for
    ``horizon_h``. It is compared with the *measured* viable cells at the end. Predictors:

    * ``mechanistic``: the nominal model;
    * ``hybrid_population``: the hybrid model as fitted, without the batch's own data (a
      new batch; with a batch effect its band includes the effect's prior variance);
    * ``hybrid``: the hybrid model learning during the batch: the batch's own growth-rate
      observations (every ``observe_every_h`` h, each used only once its window has closed)
      are given to :meth:`HybridModel.observe` (batch effect) or to
      :meth:`GPResidual.update` (no batch effect) before each prediction; with ``adapt``
      (:class:`plant_models.adaptation.AdaptedParameter` list) instead the batch's patient
      parameters are fitted to its measured viable cells up to the start
      (:class:`plant_models.adaptation.PatientAdaptation` on the population hybrid model)
      and the hybrid model predicts with them; its band adds the parameters' posterior
      variance.

    Band: the variance of ln X after the horizon is the sum of (1) the start estimate's
    measurement variance, (2) the residual's *correlated* predictive variance integrated
    along the predicted path (``w^T S w``, S from :meth:`GPResidual.predict_covariance` at
    the hourly states, ``w = dt`` for an additive residual and ``dt * mu_model`` for a
    multiplicative one) and (3) the measurement variance of the compared point, from the
    ``noise`` model (:class:`controller.training.LogNoiseModel`; estimated from the records
    when None). ``coverage_95`` is the share of points within ``+-1.96 sd``.

    ``features`` is accepted for backward compatibility and ignored (the residual's own).
    """
    import copy

    import pandas as pd

    from controller.training import (
        TRUE_CELLS_KEY,
        causal_log_cells,
        estimate_log_noise,
        growth_rate_observations,
        reconstruct_states,
    )

    del features
    if noise is None:
        noise = estimate_log_noise(records)
    correction = hybrid.corrections[0]
    rate, mode, residual = correction.rate, correction.mode, correction.residual
    batch_effect = residual.has_batch_effect
    target = "residual" if mode == "additive" else "relative_residual"
    names = list(residual.feature_names)
    population_residual = copy.deepcopy(residual)
    if batch_effect:
        population_residual.begin_batch()
    population = HybridModel(base, [RateCorrection(rate, population_residual, mode)])
    i_cells = base.state_names.index("viable_cells")
    adaptation = (
        PatientAdaptation(
            population,
            adapt,
            simulated=adapt_simulated,
            window_h=adapt_window_h,
            step_h=_sample_period(records),
        )
        if adapt
        else None
    )
    predictors: dict[int, Any] = {}
    steps: dict[float, tuple[Any, Any]] = {}
    rows: list[dict[str, Any]] = []
    for rec in records:
        x = reconstruct_states(rec, base)
        t = rec.steps["time"].to_numpy(float)
        u = rec.steps[list(base.input_names)].to_numpy(float)
        # the batch's own growth-rate observations feed the residual, unless the patient
        # parameters learn the batch instead
        own = (
            growth_rate_observations(
                [rec],
                base,
                names,
                window_h=window_h,
                every_h=observe_every_h,
                min_model_rate=min_model_rate,
            )
            if adaptation is None
            else pd.DataFrame(columns=[*names, target, "available"])
        )
        own = own[np.isfinite(own[target].to_numpy(float))].sort_values("available")
        learner = copy.deepcopy(population_residual)
        online = population
        online_steps: dict[float, Any] = {}
        used = 0
        next_start = t[0] + 24.0
        adapt_theta = None
        meas_cells = np.maximum(x[:, i_cells], 1e-9)
        log_meas, log_sd = np.log(meas_cells), np.sqrt(noise.variance(meas_cells))
        for i in range(len(t)):
            if t[i] < next_start - 1e-9:
                continue
            end = int(np.searchsorted(t, t[i] + horizon_h - 1e-9))
            if end >= len(t) or abs(t[end] - t[i] - horizon_h) > 1e-6:
                break
            next_start = t[i] + every_h
            fresh = own.iloc[used:]
            fresh = fresh[fresh["available"] <= t[i] + 1e-9]
            if len(fresh):
                used += len(fresh)
                xs, ys = fresh[names].to_numpy(float), fresh[target].to_numpy(float)
                if batch_effect:
                    learner.observe(xs, ys)
                else:
                    learner.update(xs, ys)
                online = HybridModel(base, [RateCorrection(rate, learner, mode)])
                online_steps = {}
            log_start, leverage = causal_log_cells(rec, i, smoothing_h)
            x0 = x[i].copy()
            x0[i_cells] = math.exp(log_start)
            xm, xp, xo = x0.copy(), x0.copy(), x0.copy()
            path_p, path_o = [], []
            for k in range(i, end):
                dt = float(t[k + 1] - t[k])
                if dt not in steps:
                    steps[dt] = (discretize(base, dt), discretize(population, dt))
                if dt not in online_steps:
                    online_steps[dt] = discretize(online, dt)
                f_mech, f_pop = steps[dt]
                path_p.append((t[k], xp.copy(), u[k], dt))
                path_o.append((t[k], xo.copy(), u[k], dt))
                xm = np.maximum(np.array(f_mech(t[k], xm, u[k])).ravel(), 0.0)
                xp = np.maximum(np.array(f_pop(t[k], xp, u[k])).ravel(), 0.0)
                xo = np.maximum(np.array(online_steps[dt](t[k], xo, u[k])).ravel(), 0.0)
            start_var = leverage * float(noise.variance(x0[i_cells]))
            sd_p = _band_sd(base, population, rate, mode, population_residual, path_p, start_var)
            adapted_values: dict[str, float] = {}
            if adaptation is not None:
                fit = adaptation.fit(t, x, u, log_meas, log_sd, i, start_theta=adapt_theta)
                adapt_theta, adapted_values = fit.theta, fit.values
                horizon = end - i
                if horizon not in predictors:
                    predictors[horizon] = adaptation.predictor(horizon)
                path, grad = predictors[horizon](x0, t[i:end][None, :], u[i:end].T, fit.theta)
                path = np.array(path, dtype=float)
                xo = path[:, -1]
                before = np.column_stack([x0, path[:, :-1]])
                path_o = [
                    (t[k], before[:, k - i], u[k], float(t[k + 1] - t[k])) for k in range(i, end)
                ]
                sd_o = _band_sd(
                    with_parameters(base, fit.values),
                    with_parameters(population, fit.values),
                    rate,
                    mode,
                    population_residual,
                    path_o,
                    start_var,
                )
                g = np.array(grad, dtype=float).ravel()
                sd_o = math.sqrt(sd_o**2 + max(float(g @ fit.covariance @ g), 0.0))
            else:
                sd_o = _band_sd(base, online, rate, mode, learner, path_o, start_var)
            end_var_p = float(noise.variance(xp[i_cells]))
            end_var_o = float(noise.variance(xo[i_cells]))
            measured = float(x[end, i_cells])
            true_end = (
                float(rec.steps[TRUE_CELLS_KEY].iloc[end])
                if TRUE_CELLS_KEY in rec.steps
                else math.nan
            )
            rows.append(
                {
                    "batch": rec.name,
                    "start": float(t[i]),
                    "time": float(t[end]),
                    "measured": measured,
                    "true": true_end,
                    "mechanistic": float(xm[i_cells]),
                    "hybrid_population": float(xp[i_cells]),
                    "hybrid": float(xo[i_cells]),
                    "hybrid_online": float(xo[i_cells]),
                    "sd_log_population": math.sqrt(sd_p**2 + end_var_p),
                    "sd_log": math.sqrt(sd_o**2 + end_var_o),
                    "sd_log_model": sd_o,
                    "batch_observations": used,
                    "adapted": adapted_values,
                }
            )
    if not rows:
        raise ValueError("held-out batches are too short for a 24 h-ahead validation")
    meas = np.array([r["measured"] for r in rows])

    def rmse(key: str, sel: Any = slice(None)) -> float:
        pred = np.array([r[key] for r in rows])[sel]
        return float(np.sqrt(np.mean((pred - meas[sel]) ** 2)))

    def coverage(key: str, sd_key: str, sel: Any = slice(None)) -> float:
        pred = np.maximum(np.array([r[key] for r in rows])[sel], 1e-9)
        sd = np.array([r[sd_key] for r in rows])[sel]
        z = np.log(np.maximum(meas[sel], 1e-9) / pred) / np.maximum(sd, 1e-12)
        return float(np.mean(np.abs(z) <= 1.959964))

    batches = [r["batch"] for r in rows]
    per_batch = {}
    for name in dict.fromkeys(batches):
        sel = np.array([b == name for b in batches])
        per_batch[name] = {
            "rmse_mechanistic": rmse("mechanistic", sel),
            "rmse_hybrid": rmse("hybrid", sel),
            "rmse_hybrid_population": rmse("hybrid_population", sel),
            "coverage_95": coverage("hybrid", "sd_log", sel),
            "predictions": int(sel.sum()),
        }
    return {
        "rows": rows,
        **_true_state_figures(rows),
        "rmse_mechanistic": rmse("mechanistic"),
        "rmse_hybrid": rmse("hybrid"),
        "rmse_hybrid_online": rmse("hybrid"),
        "rmse_hybrid_population": rmse("hybrid_population"),
        "coverage_95": coverage("hybrid", "sd_log"),
        "coverage_95_population": coverage("hybrid_population", "sd_log_population"),
        "per_batch": per_batch,
    }


def _band_sd(
    base: MechanisticModel[Any],
    model: HybridModel,
    rate: str,
    mode: str | None,
    residual: GPResidual,
    path: Sequence[tuple[float, Any, Any, float]],
    start_var: float,
) -> float:
    """Standard deviation of ln X at the end of ``path`` (rows (t, x, u, dt) of the
    predicted trajectory): start variance plus the residual's correlated variance
    integrated along the path (see :func:`validate_24h`)."""
    tt = np.array([p[0] for p in path])
    xx = np.array([p[1] for p in path])
    uu = np.array([p[2] for p in path])
    weights = np.array([p[3] for p in path])
    if mode == "multiplicative":
        weights = weights * np.array(
            [base.rates_numpy(p[0], p[1], p[2])[rate] for p in path], dtype=float
        )
    _, cov = residual.predict_covariance(model.feature_matrix(tt, xx, uu, rate))
    return math.sqrt(max(start_var + float(weights @ cov @ weights), 0.0))


def _plot_validation(rows: Sequence[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = list(dict.fromkeys(r["batch"] for r in rows))
    ncols = min(3, len(batches))
    nrows = math.ceil(len(batches) / ncols)
    fig, axes = plt.subplots(
        nrows,
        ncols,
        figsize=(5.5 * ncols, 4.2 * nrows),
        squeeze=False,
        constrained_layout=True,
    )
    for ax in axes.ravel()[len(batches) :]:
        ax.set_visible(False)
    for ax, name in zip(axes.ravel(), batches, strict=False):
        sel = [r for r in rows if r["batch"] == name]
        days = np.array([r["time"] for r in sel]) / 24.0
        meas = np.array([r["measured"] for r in sel])
        hyb = np.array([r["hybrid"] for r in sel])
        sd = np.array([r["sd_log"] for r in sel])
        inside = np.abs(np.log(np.maximum(meas, 1e-9) / np.maximum(hyb, 1e-9))) <= 1.96 * sd
        ax.fill_between(
            days,
            hyb * np.exp(-1.96 * sd),
            hyb * np.exp(1.96 * sd),
            alpha=0.25,
            color="C2",
            label="hybrid 95 % band",
        )
        ax.plot(days, [r["mechanistic"] for r in sel], "s--", ms=3, color="C0", label="mechanistic")
        ax.plot(
            days,
            [r["hybrid_population"] for r in sel],
            "^:",
            ms=3,
            color="C1",
            label="hybrid, no batch data",
        )
        ax.plot(days, hyb, "v-", ms=4, color="C2", label="hybrid, learning in batch")
        ax.plot(days, meas, "ko", ms=4, label="measured")
        if (~inside).any():
            ax.plot(days[~inside], meas[~inside], "rx", ms=8, label="outside band")
        ax.set_title(f"{name}: 24 h ahead, band covers {inside.mean():.0%}")
        ax.set_xlabel("culture age at prediction target [d]")
        ax.set_ylabel("viable cells [1e6 cells/mL]")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.savefig(path, dpi=100)
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

"""Training a growth-rate residual from batch records, and its 24 h-ahead validation.

The library behind ``hmpc fit`` (:func:`controller.cli.cmd_fit`) and the campaign's
historical residual (:func:`sim.campaign.train_historical_residual`):

* :class:`FitSpec`: everything ``hmpc fit``'s options say (checked on construction);
* :func:`fit_residual`: load the records, fit the residual on the training batches and
  validate it 24 h ahead on the held-out ones (and, with ``folds``, cross-validate);
* :meth:`FitResult.save`: write the residual (``.npz``) and the report folder
  (``validation.json``, ``validation.png``);
* :func:`validate_24h`: the validation on its own.

The training data come from :mod:`controller.training.batches` (docs/gp.md, docs/hybrid.md).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from plant_models.adaptation import (
    AdaptedParameter,
    PatientAdaptation,
    with_parameters,
)
from plant_models.base import MechanisticModel
from plant_models.errors import ConfigError
from plant_models.gp import GPResidual
from plant_models.hybrid import HybridModel, Mode, RateCorrection, discretize, feature_units
from plant_models.process import DEFAULT_PROCESS, get_process

if TYPE_CHECKING:  # pandas is imported only when training (hmpc's start-up stays quick)
    import pandas as pd

    from controller.training.batches import BatchRecord, LogNoiseModel

__all__ = [
    "FitResult",
    "FitSpec",
    "fit_residual",
    "nominal_model",
    "training_observations",
    "validate_24h",
]

log = logging.getLogger(__name__)

MODES = ("additive", "multiplicative")
BATCH_EFFECTS = ("auto", "none", "offset", "drift")


def nominal_model(
    kind: str, parameters: Path | None = None, process: Path | None = None
) -> MechanisticModel[Any]:
    """The controller's mechanistic model of a process plug-in (plant_models.process)."""
    return get_process(kind).build_model(parameters, process)


@dataclasses.dataclass(frozen=True)
class FitSpec:
    """What to fit: the options of ``hmpc fit`` (``hmpc fit --help``; the messages of a bad
    value name the option). Checked on construction (:class:`ConfigError`); what needs the
    model or the records (unknown features, a drift's feature among them, too few records or
    folds) by :func:`fit_residual`.

    Attributes:
        data: glob of batch-record CSVs, e.g. ``runs/*/trajectory.csv``.
        model: model kind, ``tcell`` or ``cho``.
        features: the residual's features; None: the process plug-in's ``gp_features``.
        sparse: sparse GP (``inducing`` inducing points).
        inducing: inducing points of a sparse GP.
        holdout: fraction of the batches (the last in name order) held out for validation.
        window_hours: window of the growth-rate estimate (h).
        every_hours: spacing of the growth-rate observations, training and in-batch (h).
        mode: ``multiplicative`` (factor ``mu * (1 + r)``) or ``additive`` (1/h).
        min_model_rate: multiplicative: growth observations only where the model's rate
            exceeds this (1/h).
        adapt: patient parameters fitted during each batch: ``none``, ``auto`` (the model's)
            or a comma-separated subset of the model's.
        adapt_window_hours: the patient-parameter fit uses the batch's last this many hours.
        batch_effect: per-batch random effect of the residual, ``auto`` (none with patient
            parameters, else drift), ``none``, ``offset`` or ``drift``.
        batch_feature: feature a ``drift`` batch effect follows.
        batch_capacity: running-batch observations kept.
        batch_min_lengthscale: lower bound of the drift's length scale (batch-feature units);
            None: the window width when the batch feature is culture_age and the windows
            overlap, else none.
        smoothing_hours: validation: causal fit of ln(viable cells) over this many hours for
            the start of a prediction.
        folds: 0 (off) or K folds of batches for a cross-validation.
        iterations: hyperparameter iterations.
        parameters: model parameter file (None: the packaged one).
        process: process specification file (None: the packaged one).
        seed: seed of the GP fit.
        mapping: mapping file of vendor exports (``data`` then matches the exports;
            docs/records.md); None: hmpc's own record layout.
    """

    data: str
    model: str = DEFAULT_PROCESS
    features: tuple[str, ...] | None = None
    sparse: bool = False
    inducing: int = 64
    holdout: float = 0.25
    window_hours: float = 24.0
    every_hours: float = 6.0
    mode: Mode = "multiplicative"
    min_model_rate: float = 0.01
    adapt: str = "none"
    adapt_window_hours: float = 240.0
    batch_effect: str = "auto"
    batch_feature: str = "culture_age"
    batch_capacity: int = 16
    batch_min_lengthscale: float | None = None
    smoothing_hours: float = 12.0
    folds: int = 0
    iterations: int = 150
    parameters: Path | None = None
    process: Path | None = None
    seed: int = 0
    mapping: Path | None = None

    def __post_init__(self) -> None:
        if self.features is not None:
            object.__setattr__(self, "features", tuple(self.features))
        get_process(self.model)  # a ConfigError naming the registered processes
        if self.mode not in MODES:
            raise ConfigError(f"--mode must be one of {list(MODES)}, got {self.mode!r}")
        if self.batch_effect not in BATCH_EFFECTS:
            raise ConfigError(
                f"--batch-effect must be one of {list(BATCH_EFFECTS)}, got {self.batch_effect!r}"
            )
        if not 0.0 < self.holdout < 1.0:
            raise ConfigError(f"--holdout must lie in (0, 1), got {self.holdout}")
        if not (self.window_hours > 0 and self.every_hours > 0):
            raise ConfigError(
                f"--window-hours and --every-hours must be positive, got {self.window_hours} "
                f"and {self.every_hours}"
            )
        adapt = self.adapted_parameters  # checks the names
        if not self.adapt_window_hours > 0:
            raise ConfigError(
                f"--adapt-window-hours must be positive, got {self.adapt_window_hours}"
            )
        if adapt and self.batch_effect not in ("auto", "none"):
            raise ConfigError(
                f"--batch-effect {self.batch_effect} and patient parameters (--adapt) both learn "
                "the running batch; use one (--adapt none for the batch effect)"
            )
        if self.folds == 1 or self.folds < 0:
            raise ConfigError(f"--folds must be 0 (off) or at least 2, got {self.folds}")

    @property
    def feature_names(self) -> tuple[str, ...]:
        """The residual's features (``features`` or the model's defaults)."""
        return self.features if self.features is not None else get_process(self.model).gp_features

    @property
    def adapted_parameters(self) -> tuple[AdaptedParameter, ...]:
        """The patient parameters ``adapt`` names (empty for ``none``)."""
        return _adapted_parameters(self.model, self.adapt)

    @property
    def effective_batch_effect(self) -> str:
        """``batch_effect`` with ``auto`` resolved: none with patient parameters, else drift."""
        if self.batch_effect == "auto":
            return "none" if self.adapted_parameters else "drift"
        return self.batch_effect

    @property
    def effective_batch_feature(self) -> str | None:
        """The feature the batch effect follows (a ``drift`` only), else None."""
        return self.batch_feature if self.effective_batch_effect == "drift" else None

    @property
    def effective_batch_min_lengthscale(self) -> float | None:
        """The drift's length-scale bound (None without a drift): ``batch_min_lengthscale``,
        by default the window width when the drift follows culture_age and windows overlap
        (their estimation noise is correlated over a window width)."""
        batch_feature = self.effective_batch_feature
        if batch_feature is None:
            return None
        if (
            self.batch_min_lengthscale is None
            and batch_feature == "culture_age"
            and self.every_hours < self.window_hours
        ):
            return self.window_hours
        return self.batch_min_lengthscale


@dataclasses.dataclass(frozen=True)
class FitResult:
    """A fitted residual and its validation (:func:`fit_residual`).

    Attributes:
        spec: what was fitted.
        residual: the fitted growth-rate residual (trained on ``training_batches``).
        batch_effect: its batch effect (``spec.batch_effect`` with ``auto`` resolved).
        batch_feature: the feature a drift follows, else None.
        training_batches: names of the batches it was trained on.
        held_out_batches: names of the batches it was validated on.
        training_points: growth-rate observations it was trained on.
        noise: probe-noise model of ln(viable cells), estimated from the training batches.
        validation: :func:`validate_24h` on the held-out batches (``rows``: one dict per
            prediction; RMSEs, coverage, ``per_batch``; ``*_true`` on simulated records).
        cross_validation: with ``spec.folds``: ``folds`` (per fold: held-out batches and
            figures) and the figures pooled over all batches; else None.
        records: how many batch records ``spec.data`` matched.
        process_warnings: what :func:`check_records_fit_process` warned of (the records'
            fit to the process).
    """

    spec: FitSpec
    residual: GPResidual
    batch_effect: str
    batch_feature: str | None
    training_batches: tuple[str, ...]
    held_out_batches: tuple[str, ...]
    training_points: int
    noise: LogNoiseModel
    validation: dict[str, Any]
    cross_validation: dict[str, Any] | None
    records: int
    process_warnings: tuple[str, ...] = ()

    def summary(self, residual_file: str | Path) -> dict[str, Any]:
        """The content of ``validation.json`` (non-finite numbers still as floats), for the
        residual written to ``residual_file``."""
        spec, gp, validation = self.spec, self.residual, self.validation
        features = spec.feature_names
        adapt = spec.adapted_parameters
        batch_feature = self.batch_feature
        rmse_m, rmse_h = validation["rmse_mechanistic"], validation["rmse_hybrid"]
        summary = {
            "model": spec.model,
            "features": list(features),
            "mode": spec.mode,
            "batch_effect": self.batch_effect,
            "batch_feature": batch_feature,
            "adapted_parameters": [dataclasses.asdict(p) for p in adapt],
            "adapt_window_h": spec.adapt_window_hours if adapt else None,
            "training_batches": list(self.training_batches),
            "held_out_batches": list(self.held_out_batches),
            "training_points": self.training_points,
            "sparse": bool(spec.sparse),
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
            "start_smoothing_h": spec.smoothing_hours,
            "observe_every_h": spec.every_hours,
            "min_model_rate": spec.min_model_rate,
            "log_noise_coefficients": self.noise.coefficients.tolist(),
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
            "residual_file": str(residual_file),
            "process_warnings": list(self.process_warnings),
        }
        if self.cross_validation is not None:
            summary["cross_validation"] = self.cross_validation
        return summary

    def save(self, out_path: Path, report_dir: Path) -> dict[str, Any]:
        """Write the residual to ``out_path`` (``.npz``) and ``validation.json`` (the
        :meth:`summary`, non-finite numbers as null) and ``validation.png`` (the held-out
        predictions with their bands) into ``report_dir``; folders are created. Returns the
        summary."""
        out_path.parent.mkdir(parents=True, exist_ok=True)
        self.residual.save(out_path)
        report_dir.mkdir(parents=True, exist_ok=True)
        summary = self.summary(out_path)
        (report_dir / "validation.json").write_text(
            json.dumps(_json_safe(summary), indent=2) + "\n"
        )
        _plot_validation(self.validation["rows"], report_dir / "validation.png")
        return summary


def fit_residual(spec: FitSpec) -> FitResult:
    """Fit the growth-rate residual ``spec`` describes and validate it.

    The records ``spec.data`` matches are taken in name order; the last ``holdout`` share
    (at least one) is held out. The residual is fitted on the growth-rate observations of
    the others (with patient parameters, against each batch's adapted model) and validated
    24 h ahead on the held-out ones (:func:`validate_24h`); with ``folds`` each fold of
    batches is also held out once, by a residual fitted on the rest.

    Raises:
        ConfigError: unknown features, a drift following a feature not among them,
            unreadable or too few records (at least 2), more folds than records; errors of
            the model files.
        FitError: the GP fit failed.
    """
    from controller.training.batches import load_batch_records
    from controller.training.process_check import check_records_fit_process

    base = nominal_model(spec.model, spec.parameters, spec.process)
    features = spec.feature_names
    units = feature_units(base)
    unknown = [f for f in features if f not in units]
    if unknown:
        raise ConfigError(f"--features: unknown {unknown}; choose from {sorted(units)}")
    batch_feature = spec.effective_batch_feature
    if batch_feature is not None and batch_feature not in features:
        raise ConfigError(
            f"--batch-feature {batch_feature!r} must be one of the features {list(features)}"
        )
    records = load_batch_records(spec.data, base, mapping=spec.mapping)
    process_warnings = check_records_fit_process(records, base, spec.process)
    if len(records) < 2:
        raise ConfigError(
            f"--data matches {len(records)} batch; at least 2 are needed (training and held-out)"
        )
    n_hold = max(1, math.ceil(spec.holdout * len(records)))
    train, held = records[:-n_hold], records[-n_hold:]
    if spec.folds > len(records):
        raise ConfigError(f"--folds must be 0 (off) or 2..{len(records)}, got {spec.folds}")
    gp, n_obs, noise, validation = _fit_and_validate(spec, base, units, train, held)
    cross: dict[str, Any] | None = None
    if spec.folds:
        folds = np.array_split(np.arange(len(records)), spec.folds)
        pooled: list[dict[str, Any]] = []
        per_fold = []
        for k, fold in enumerate(folds):
            inside = set(fold.tolist())
            fold_train = [r for i, r in enumerate(records) if i not in inside]
            fold_held = [records[i] for i in fold]
            fold_result = _fit_and_validate(spec, base, units, fold_train, fold_held)[3]
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
            log.info("fold %d of %d done", k + 1, spec.folds)
        cross = {"folds": per_fold, **_pooled_figures(pooled)}
    return FitResult(
        spec=spec,
        residual=gp,
        batch_effect=spec.effective_batch_effect,
        batch_feature=spec.effective_batch_feature,
        training_batches=tuple(r.name for r in train),
        held_out_batches=tuple(r.name for r in held),
        training_points=n_obs,
        noise=noise,
        validation=validation,
        cross_validation=cross,
        records=len(records),
        process_warnings=process_warnings,
    )


def _fit_and_validate(
    spec: FitSpec,
    base: MechanisticModel[Any],
    units: dict[str, str],
    train: Sequence[BatchRecord],
    held: Sequence[BatchRecord],
) -> tuple[GPResidual, int, LogNoiseModel, dict[str, Any]]:
    """Fit a residual on ``train``, validate it on ``held``: (residual, training points,
    probe-noise model of ``train``, :func:`validate_24h` result)."""
    from controller.training.batches import estimate_log_noise

    features = spec.feature_names
    adapt = spec.adapted_parameters
    simulated = get_process(spec.model).simulated_states
    multiplicative = spec.mode == "multiplicative"
    batch_feature = spec.effective_batch_feature
    obs = training_observations(
        train,
        base,
        features,
        adapt,
        simulated,
        window_h=spec.window_hours,
        every_h=spec.every_hours,
        min_model_rate=spec.min_model_rate,
    )
    target = "relative_residual" if multiplicative else "residual"
    obs = obs[np.isfinite(obs[target].to_numpy(float))]
    gp = GPResidual(
        features,
        [units[f] for f in features],
        "growth_rate_factor" if multiplicative else "growth_rate_residual",
        "1" if multiplicative else "1/h",
        sparse=spec.sparse,
        n_inducing=spec.inducing,
        training_iterations=spec.iterations,
        seed=spec.seed,
        batch_effect=spec.effective_batch_effect,
        batch_feature=batch_feature,
        batch_capacity=spec.batch_capacity,
        batch_min_lengthscale=spec.effective_batch_min_lengthscale,
    )
    gp.fit(
        obs[list(features)].to_numpy(float),
        obs[target].to_numpy(float),
        batches=obs["batch"].tolist(),
    )
    hybrid = HybridModel(base, [RateCorrection("growth_rate", gp, spec.mode)])
    noise = estimate_log_noise(train)
    validation = validate_24h(
        base,
        hybrid,
        held,
        window_h=spec.window_hours,
        observe_every_h=spec.every_hours,
        smoothing_h=spec.smoothing_hours,
        noise=noise,
        min_model_rate=spec.min_model_rate,
        adapt=adapt,
        adapt_simulated=simulated,
        adapt_window_h=spec.adapt_window_hours,
    )
    return gp, len(obs), noise, validation


def _adapted_parameters(model: str, spec: str) -> tuple[AdaptedParameter, ...]:
    """``--adapt``: 'auto' (the model's defaults), 'none', or a subset of the defaults."""
    defaults = get_process(model).adapted_parameters()
    if spec == "auto":
        return defaults
    if spec == "none":
        return ()
    by_name = {p.name: p for p in defaults}
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in by_name]
    if unknown or not names:
        raise ConfigError(
            f"--adapt: unknown parameter(s) {unknown or spec!r} for {model}; choose 'auto', "
            f"'none' or from {sorted(by_name) or '(none for this model)'}"
        )
    return tuple(by_name[n] for n in names)


def _sample_period(records: Sequence[BatchRecord]) -> float:
    """The records' sample period (h): the median step of the first record."""
    t = records[0].steps["time"].to_numpy(float)
    if t.size < 2:
        raise ConfigError(f"batch record {records[0].name!r} has fewer than 2 samples")
    return float(np.median(np.diff(t)))


def training_observations(
    records: Sequence[BatchRecord],
    base: MechanisticModel[Any],
    features: Sequence[str],
    adapt: Sequence[AdaptedParameter],
    simulated: Sequence[str],
    **kwargs: Any,
) -> pd.DataFrame:
    """Growth-rate observations of the training batches; with patient parameters each batch's
    are fitted on its whole record first and its residuals taken against that adapted model,
    so the residual learns what the patient parameters do not explain.

    ``kwargs`` go to :func:`controller.training.batches.growth_rate_observations`; returns its
    DataFrame (one row per observation)."""
    import pandas as pd

    from controller.training.batches import (
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
    records: Sequence[BatchRecord],
    *,
    features: Sequence[str] | None = None,
    window_h: float = 24.0,
    horizon_h: float = 24.0,
    every_h: float = 12.0,
    observe_every_h: float = 6.0,
    smoothing_h: float = 12.0,
    noise: LogNoiseModel | None = None,
    min_model_rate: float = 0.003,
    adapt: Sequence[AdaptedParameter] = (),
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
    ``noise`` model (:class:`controller.training.batches.LogNoiseModel`; estimated from the records
    when None). ``coverage_95`` is the share of points within ``+-1.96 sd``.

    ``features`` is accepted for backward compatibility and ignored (the residual's own).

    Returns:
        ``rows`` (one dict per prediction: batch, start, time, measured, true, the three
        predictions, their log-scale sds, ...), the RMSEs (1e6 cells/mL) and coverages over
        all rows, ``per_batch`` figures and, when every record carries the simulated true
        cells, the ``*_true`` figures.

    Raises:
        ValueError: the records are too short for one prediction.
    """
    import copy

    import pandas as pd

    from controller.training.batches import (
        TRUE_CELLS_KEY,
        causal_log_cells,
        estimate_log_noise,
        forecast_windows,
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
        adapt_theta = None
        meas_cells = np.maximum(x[:, i_cells], 1e-9)
        log_meas, log_sd = np.log(meas_cells), np.sqrt(noise.variance(meas_cells))
        for i, end in forecast_windows(t, horizon_h, every_h):
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
        raise ConfigError("held-out batches are too short for a 24 h-ahead validation")
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

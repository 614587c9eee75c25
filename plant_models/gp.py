"""Gaussian-process residuals for the hybrid model (exact and sparse), exportable to CasADi.

A :class:`GPResidual` learns the mismatch ``y = r(x) + noise`` between an observed kinetic
rate and the mechanistic model's rate (or any scalar residual) as a function of a few named
features. It is fitted with GPyTorch (float64) and then reduced to a handful of numpy arrays
(the *posterior state*): the scaled basis inputs, the weight vector ``alpha`` and one or two
triangular variance factors. :meth:`GPResidual.predict`, :meth:`GPResidual.to_casadi`,
:meth:`GPResidual.update` and :meth:`GPResidual.save` all work on that state only, so a
loaded model needs neither torch nor GPyTorch at run time.

Model (all in *scaled* units, see docs/gp.md)::

    x_s = (x - x_mean) / x_scale            y_s = (y - y_mean) / y_scale
    k(a, b) = s2 * exp(-0.5 * sum_j (a_j - b_j)^2 / l_j^2)           (ARD RBF)
    y_s = f(x_s) + e,   f ~ GP(0, k),   e ~ N(0, sigma2),   sigma2 >= noise_floor

Exact variant (basis Z = the training window, N points)::

    L = chol(K_ZZ + sigma2 I),  alpha = L^-T L^-1 y_s,  W1 = L^-1
    mean_s(x) = k_x^T alpha,    var_s(x) = s2 - |W1 k_x|^2

Sparse variant (basis Z = M fixed inducing points, Titsias' collapsed bound / VFE)::

    L = chol(K_uu),  P = L^-1 K_uf K_fu L^-T,  b = L^-1 K_uf y_s   (whitened statistics)
    B = I + P / sigma2,  W1 = L^-1,  W2 = chol(B)^-1 W1,  alpha = W2^T chol(B)^-1 b / sigma2
    mean_s(x) = k_x^T alpha,    var_s(x) = s2 - |W1 k_x|^2 + |W2 k_x|^2

The returned variance is the *latent* function variance (no observation noise) unless
``include_noise=True``; in target units ``mean = y_mean + y_scale * mean_s`` and
``var = y_scale^2 * var_s``.

Batch effect (exact variant, ``batch_effect="offset"`` or ``"drift"``; docs/gp.md). Each
observation carries the batch it comes from, and the kernel gets a per-batch term::

    k((a, i), (b, j)) = k(a, b) + [i == j] * sb2 * exp(-0.5 (a_t - b_t)^2 / lb^2)

(``a_t``: the ``batch_feature``, e.g. culture age; ``lb = inf`` for ``"offset"``.) Fitted
on historical batches, the population posterior is the exact GP above with ``K_ZZ`` holding
the per-batch blocks. A *new* batch shares only the population part, so its prediction
has the prior variance ``s2 + sb2``. The running batch's own observations ``(X_o, y_o)``
(:meth:`GPResidual.observe`, at most ``batch_capacity``) then condition it exactly::

    S(a, b) = k(a, b) - (W1 k_a).(W1 k_b)                 population posterior covariance
    C = S(X_o, X_o) + Kb(X_o, X_o) + sigma2 I,   L_o = chol(C),   W_o = L_o^-1
    alpha_o = C^-1 (y_o - mean_s(X_o)),   G = W1 K_Z,Xo     (n x k, "cross")
    c(x) = k(X_o, x) - G^T W1 k_x + kb(X_o, x)
    mean_s(x) += c(x)^T alpha_o,   var_s(x) = s2 + sb2 - |W1 k_x|^2 - |W_o c(x)|^2
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as dt
import difflib
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import re
import tempfile
import time
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import casadi as ca
import numpy as np
import numpy.typing as npt
import scipy.linalg

from plant_models.errors import ConfigError, FitError, ModelError

__all__ = [
    "BATCH_EFFECTS",
    "SUPPORTED_KERNELS",
    "GPResidual",
    "exact_gpytorch_settings",
    "import_gpytorch",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float64]

#: Kernels understood by :class:`GPResidual` (``kernel=`` argument).
SUPPORTED_KERNELS: tuple[str, ...] = ("rbf-ard",)
#: Per-batch random effects understood by :class:`GPResidual` (``batch_effect=`` argument).
BATCH_EFFECTS: tuple[str, ...] = ("none", "offset", "drift")

_FORMAT = "hmpc.gp_residual"
_CASADI_NAME = re.compile(r"[A-Za-z](?:_?[A-Za-z0-9])*")
_FORMAT_VERSION = 2
#: Older format versions that :meth:`GPResidual.load` still reads (version 1: no batch effect).
_READABLE_VERSIONS = (1, 2)
#: Rows of test points evaluated at once in :meth:`GPResidual.predict` (bounds memory).
_PREDICT_CHUNK = 2048
#: Diagonal jitter (relative to the kernel's output scale) tried, in order, when the inducing
#: kernel matrix K_uu is not numerically positive definite. Zero comes first so that a
#: well-conditioned K_uu is factorised exactly as GPyTorch does.
_JITTER_LADDER = (0.0, 1e-12, 1e-10, 1e-8, 1e-6)
#: Inducing points whose conditional prior variance, given the others, is below this
#: fraction of the output scale are dropped after training (see _prune_inducing).
_PRUNE_TOLERANCE = 1e-6


@dataclasses.dataclass(frozen=True)
class _State:
    """Everything a fitted residual needs to predict, export, update and save.

    Arrays are in scaled units (see module docstring); n is the number of basis points
    (training window for the exact variant, inducing points for the sparse one).
    """

    x_mean: FloatArray  # (d,)
    x_scale: FloatArray  # (d,)
    y_mean: float
    y_scale: float
    lengthscales: FloatArray  # (d,)  in scaled-input units
    outputscale: float  # s2, prior variance of f in scaled-target units
    noise: float  # sigma2, observation-noise variance in scaled-target units
    jitter: float  # absolute diagonal jitter added to K_uu (sparse); 0 for exact
    basis: FloatArray  # (n, d)  scaled inputs of the training window / inducing points
    window_targets: FloatArray  # (n,) scaled targets of the window (exact); (0,) sparse
    stat_p: FloatArray  # (n, n) L^-1 K_uf K_fu L^-T, L = chol(K_uu) (sparse); (0, 0) exact
    stat_b: FloatArray  # (n,)  L^-1 K_uf y_s (sparse); (0,) exact
    alpha: FloatArray  # (n,)
    w1: FloatArray  # (n, n) lower triangular
    w2: FloatArray  # (n, n) lower triangular (sparse); (0, 0) exact
    n_observations: int
    n_updates: int
    training_data_sha256: str
    update_data_sha256: str
    fit_loss: float
    created: str
    # Batch effect (zeros / empty without one): see the module docstring.
    batch_variance: float = 0.0  # sb2, scaled target units
    batch_inv_lengthscale: float = 0.0  # 1 / lb in scaled units of batch_feature; 0 = offset
    batch_column: int = -1  # index of batch_feature in the features; -1 = constant offset
    window_batches: FloatArray = dataclasses.field(default_factory=lambda: np.zeros(0))  # (N,)
    running_x: FloatArray = dataclasses.field(default_factory=lambda: np.zeros((0, 0)))  # (k, d)
    running_y: FloatArray = dataclasses.field(default_factory=lambda: np.zeros(0))  # (k,)
    running_alpha: FloatArray = dataclasses.field(default_factory=lambda: np.zeros(0))  # (k,)
    running_factor: FloatArray = dataclasses.field(default_factory=lambda: np.zeros((0, 0)))
    running_cross: FloatArray = dataclasses.field(default_factory=lambda: np.zeros((0, 0)))

    @property
    def n_running(self) -> int:
        """Number k of running-batch observations conditioning the posterior."""
        return int(self.running_y.shape[0])


class GPResidual:
    """Gaussian-process residual ``r(features) -> target`` with ARD RBF kernel.

    ``__init__`` only stores (and checks) settings; :meth:`fit` learns hyperparameters and
    the posterior. Fitted attributes end in ``_``.

    Args:
        feature_names: names of the d input features, in column order of ``X``.
        feature_units: canonical unit of each feature (same length).
        target_name: name of the residual (for example ``"growth_rate_residual"``).
        target_unit: its unit (for example ``"1/h"``).
        sparse: use M fixed inducing points (k-means of the scaled inputs) and Titsias'
            collapsed variational bound; cost of prediction and export is then independent
            of the number of observations. Otherwise an exact GP.
        n_inducing: number of inducing points M (sparse only; at most the number of
            distinct training inputs is used).
        kernel: covariance function; only ``"rbf-ard"`` (ScaleKernel(RBFKernel(ARD))).
        noise_floor: lower bound of the observation-noise variance in *scaled* target
            units (the target is standardised, so 1e-6 means 0.1 % of its std).
        training_iterations: number of Adam steps on the (collapsed) marginal likelihood.
        learning_rate: Adam step size.
        seed: seed of every random choice (k-means++ initialisation of inducing points).
        max_points: largest number of training points accepted by the exact variant
            (exact fitting is O(N^3) and each MPC evaluation O(N^2)); use ``sparse=True``
            beyond that.
        batch_effect: per-batch random effect on the residual (exact variant only):
            ``"none"`` (default; one population function), ``"offset"`` (a constant per
            batch, variance ``sb2``) or ``"drift"`` (a smooth per-batch deviation over
            ``batch_feature`` with its own length scale). With a batch effect, :meth:`fit`
            needs the batch of each row, and :meth:`observe` conditions on the running
            batch's own observations (learning during the batch).
        batch_feature: the feature over which a ``"drift"`` varies (for example
            ``"culture_age"``); required for ``"drift"``, not allowed otherwise.
        batch_capacity: most recent running-batch observations kept by :meth:`observe`
            (the oldest drop out); bounds the cost of an update and the size of the export.
        batch_min_lengthscale: lower bound of a drift's length scale, in units of
            ``batch_feature`` (default: none). Set it to the width of the windows the
            observations are estimated on when windows overlap: their estimation noise is
            correlated over that width, and a shorter drift would model that noise instead
            of the batch (docs/gp.md).
    """

    def __init__(
        self,
        feature_names: Sequence[str],
        feature_units: Sequence[str],
        target_name: str,
        target_unit: str,
        *,
        sparse: bool = False,
        n_inducing: int = 64,
        kernel: str = "rbf-ard",
        noise_floor: float = 1e-6,
        training_iterations: int = 200,
        learning_rate: float = 0.05,
        seed: int = 0,
        max_points: int = 2000,
        batch_effect: str = "none",
        batch_feature: str | None = None,
        batch_capacity: int = 16,
        batch_min_lengthscale: float | None = None,
    ) -> None:
        self.feature_names: tuple[str, ...] = tuple(feature_names)
        self.feature_units: tuple[str, ...] = tuple(feature_units)
        self.target_name = target_name
        self.target_unit = target_unit
        self.sparse = sparse
        self.n_inducing = n_inducing
        self.kernel = kernel
        self.noise_floor = noise_floor
        self.training_iterations = training_iterations
        self.learning_rate = learning_rate
        self.seed = seed
        self.max_points = max_points
        self.batch_effect = batch_effect
        self.batch_feature = batch_feature
        self.batch_capacity = batch_capacity
        self.batch_min_lengthscale = batch_min_lengthscale
        self._state: _State | None = None
        self._check_settings()

    # ------------------------------------------------------------------ settings
    def _check_settings(self) -> None:
        names, units = self.feature_names, self.feature_units
        if not names:
            raise ConfigError("GPResidual needs at least one feature name")
        if any(not isinstance(n, str) or not n for n in names):
            raise ConfigError(f"feature names must be non-empty strings, got {list(names)}")
        if len(set(names)) != len(names):
            raise ConfigError(f"feature names must be unique, got {list(names)}")
        if len(units) != len(names) or any(not isinstance(u, str) or not u for u in units):
            raise ConfigError(
                f"feature_units must give one non-empty unit per feature: {len(names)} "
                f"features {list(names)} but units {list(units)}"
            )
        for label, value in (("target_name", self.target_name), ("target_unit", self.target_unit)):
            if not isinstance(value, str) or not value:
                raise ConfigError(f"{label} must be a non-empty string, got {value!r}")
        if self.kernel not in SUPPORTED_KERNELS:
            close = difflib.get_close_matches(str(self.kernel), SUPPORTED_KERNELS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"kernel {self.kernel!r} is not supported (allowed: {list(SUPPORTED_KERNELS)})"
                f"{hint}"
            )
        if not isinstance(self.sparse, bool):
            raise ConfigError(f"sparse must be True or False, got {self.sparse!r}")
        _check_int("n_inducing", self.n_inducing, 1)
        _check_int("training_iterations", self.training_iterations, 0)
        _check_int("seed", self.seed, 0)
        _check_int("max_points", self.max_points, 1)
        _check_positive("noise_floor", self.noise_floor)
        _check_positive("learning_rate", self.learning_rate)
        self._check_batch_settings()

    def _check_batch_settings(self) -> None:
        if self.batch_effect not in BATCH_EFFECTS:
            close = difflib.get_close_matches(str(self.batch_effect), BATCH_EFFECTS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"batch_effect {self.batch_effect!r} is not supported (allowed: "
                f"{list(BATCH_EFFECTS)}){hint}"
            )
        _check_int("batch_capacity", self.batch_capacity, 1)
        if self.batch_effect == "drift":
            if self.batch_feature not in self.feature_names:
                raise ConfigError(
                    f"batch_effect 'drift' needs batch_feature, one of the features "
                    f"{list(self.feature_names)} (for example 'culture_age'); got "
                    f"{self.batch_feature!r}"
                )
            if self.batch_min_lengthscale is not None:
                _check_positive("batch_min_lengthscale", self.batch_min_lengthscale)
        elif self.batch_min_lengthscale is not None:
            raise ConfigError(
                "batch_min_lengthscale is only used with batch_effect='drift'; drop it"
            )
        if self.batch_effect != "drift" and self.batch_feature is not None:
            raise ConfigError(
                f"batch_feature={self.batch_feature!r} is only used with batch_effect='drift' "
                f"(batch_effect is {self.batch_effect!r}); drop it or choose 'drift'"
            )
        if self.batch_effect != "none" and self.sparse:
            raise ConfigError(
                "a batch effect needs the exact GP (sparse=False); for data sets beyond "
                "max_points use sparse=True with batch_effect='none'"
            )

    @property
    def has_batch_effect(self) -> bool:
        """True when the model has a per-batch random effect (``batch_effect`` not 'none')."""
        return self.batch_effect != "none"

    @property
    def _batch_column(self) -> int:
        return (
            self.feature_names.index(self.batch_feature)
            if self.batch_effect == "drift" and self.batch_feature is not None
            else -1
        )

    # ------------------------------------------------------------------ fitted attributes
    def _fitted(self) -> _State:
        if self._state is None:
            raise ModelError(
                f"GPResidual for {self.target_name!r} is not fitted; call fit(X, y) or "
                "GPResidual.load(path) first"
            )
        return self._state

    @property
    def is_fitted(self) -> bool:
        """True once :meth:`fit` (or :meth:`load`) succeeded."""
        return self._state is not None

    @property
    def n_features(self) -> int:
        """Number d of input features."""
        return len(self.feature_names)

    @property
    def x_mean_(self) -> FloatArray:
        """Training mean of each feature, shape (d,), feature units."""
        return self._fitted().x_mean.copy()

    @property
    def x_scale_(self) -> FloatArray:
        """Training standard deviation of each feature (1 if constant), shape (d,)."""
        return self._fitted().x_scale.copy()

    @property
    def y_mean_(self) -> float:
        """Training mean of the target, target units."""
        return self._fitted().y_mean

    @property
    def y_scale_(self) -> float:
        """Training standard deviation of the target (1 if constant), target units."""
        return self._fitted().y_scale

    @property
    def lengthscales_(self) -> FloatArray:
        """ARD length scales in *scaled* feature units, shape (d,)."""
        return self._fitted().lengthscales.copy()

    @property
    def outputscale_(self) -> float:
        """Prior variance s2 of the latent function in *scaled* target units."""
        return self._fitted().outputscale

    @property
    def noise_(self) -> float:
        """Observation-noise variance sigma2 in *scaled* target units."""
        return self._fitted().noise

    @property
    def batch_variance_(self) -> float:
        """Prior variance sb2 of the per-batch effect in *scaled* target units (0 without)."""
        return self._fitted().batch_variance

    @property
    def batch_lengthscale_(self) -> float:
        """Length scale of a ``"drift"`` batch effect in *scaled* units of ``batch_feature``
        (``inf`` for ``"offset"``; ``nan`` without a batch effect)."""
        state = self._fitted()
        if not self.has_batch_effect:
            return math.nan
        inv = state.batch_inv_lengthscale
        return math.inf if inv == 0.0 else 1.0 / inv

    @property
    def n_running_(self) -> int:
        """Running-batch observations currently conditioning the posterior (<= capacity)."""
        return self._fitted().n_running

    @property
    def noise_variance_(self) -> float:
        """Observation-noise variance in target units squared."""
        state = self._fitted()
        return state.noise * state.y_scale**2

    @property
    def basis_(self) -> FloatArray:
        """Scaled basis inputs, shape (n, d): training window (exact) or inducing points."""
        return self._fitted().basis.copy()

    @property
    def n_basis_(self) -> int:
        """Number of basis points n (N for exact, M for sparse); fixed after fit."""
        return int(self._fitted().basis.shape[0])

    @property
    def n_observations_(self) -> int:
        """Observations assimilated so far (fit plus every update)."""
        return self._fitted().n_observations

    @property
    def training_data_sha256_(self) -> str:
        """SHA-256 of the data given to :meth:`fit` (shape, X and y as float64)."""
        return self._fitted().training_data_sha256

    @property
    def fit_loss_(self) -> float:
        """Final training loss: negative (collapsed) log marginal likelihood per point."""
        return self._fitted().fit_loss

    # ------------------------------------------------------------------ fit
    def fit(
        self, X: npt.ArrayLike, y: npt.ArrayLike, batches: Sequence[object] | None = None
    ) -> GPResidual:
        """Learn scaling, hyperparameters and posterior from data.

        Args:
            X: features, shape (n, d), columns in the order of ``feature_names``, rows in
                chronological order (the exact variant's update drops the oldest rows).
            y: observed residuals, shape (n,), target units.
            batches: label of the batch each row comes from, length n (any hashable values,
                e.g. batch names). Required with a batch effect; ignored without one.

        Returns:
            self.

        Raises:
            ModelError: wrong shapes, fewer than 2 points, NaN or inf values.
            ConfigError: more than ``max_points`` points for the exact variant, or no
                ``batches`` for a model with a batch effect.
            FitError: optimisation or factorisation failed; the model keeps its previous
                fitted state (or stays unfitted). A running batch is forgotten only on
                success.
        """
        x_arr, y_arr = self._check_data(X, y, "fit")
        batch_ids = self._batch_ids(batches, x_arr.shape[0])
        n = x_arr.shape[0]
        if n < 2:
            raise ModelError(f"fit needs at least 2 observations, got {n}")
        if not self.sparse and n > self.max_points:
            raise ConfigError(
                f"exact GP with {n} points exceeds max_points={self.max_points}; use "
                "sparse=True (inducing points) or raise max_points"
            )
        started = time.perf_counter()
        x_mean, x_scale = _scaling(x_arr, "features")
        y_mean_arr, y_scale_arr = _scaling(y_arr[:, None], "target")
        y_mean, y_scale = float(y_mean_arr[0]), float(y_scale_arr[0])
        x_s = (x_arr - x_mean) / x_scale
        y_s = (y_arr - y_mean) / y_scale
        if not (np.all(np.isfinite(x_s)) and np.all(np.isfinite(y_s))):
            raise FitError("scaled training data are not finite; the model was not changed")

        inducing = _kmeans(x_s, self.n_inducing, self.seed) if self.sparse else None
        hyper = self._train(x_s, y_s, inducing, batch_ids, x_scale)
        lengthscales, outputscale, noise, loss = hyper[:4]
        data_hash = _sha256(x_arr, y_arr, batch_ids)
        common: dict[str, Any] = {
            "x_mean": x_mean,
            "x_scale": x_scale,
            "y_mean": y_mean,
            "y_scale": y_scale,
            "lengthscales": lengthscales,
            "outputscale": outputscale,
            "noise": noise,
            "n_observations": n,
            "n_updates": 0,
            "training_data_sha256": data_hash,
            "update_data_sha256": data_hash,
            "fit_loss": loss,
            "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "batch_variance": hyper[4],
            "batch_inv_lengthscale": hyper[5],
            "batch_column": self._batch_column,
        }
        if inducing is None:
            ids = batch_ids if batch_ids is not None else np.arange(n, dtype=np.float64)
            state = _exact_state(basis=x_s, targets=y_s, batches=ids, **common)
        else:
            inducing = _prune_inducing(inducing, lengthscales, outputscale)
            lower, jitter = _inducing_cholesky(inducing, lengthscales, outputscale, None)
            stat_p, stat_b = _whitened_statistics(
                lower, inducing, x_s, y_s, lengthscales, outputscale
            )
            state = _sparse_state(
                basis=inducing, lower=lower, jitter=jitter, stat_p=stat_p, stat_b=stat_b, **common
            )
        self._state = state
        logger.info(
            "fitted %s GP residual %r on %d points (basis %d) in %.2f s: loss %.4g, "
            "lengthscales %s, outputscale %.4g, noise %.4g, batch variance %.4g, batch "
            "length scale %.4g (scaled units)",
            "sparse" if self.sparse else "exact",
            self.target_name,
            n,
            state.basis.shape[0],
            time.perf_counter() - started,
            loss,
            np.array2string(lengthscales, precision=4),
            outputscale,
            noise,
            state.batch_variance,
            1.0 / state.batch_inv_lengthscale if state.batch_inv_lengthscale else math.inf,
        )
        return self

    def _batch_ids(self, batches: Sequence[object] | None, n: int) -> FloatArray | None:
        """Batch labels -> float ids 0, 1, ... in order of first appearance, shape (n,);
        None without a batch effect."""
        if not self.has_batch_effect:
            return None
        if batches is None:
            raise ConfigError(
                f"GPResidual with batch_effect={self.batch_effect!r} needs the batch of each "
                "row: fit(X, y, batches=...) (e.g. the batch names of the records)"
            )
        labels = list(batches)
        if len(labels) != n:
            raise ModelError(f"fit: batches must give one label per row ({n}), got {len(labels)}")
        index: dict[object, int] = {}
        try:
            ids = [index.setdefault(label, len(index)) for label in labels]
        except TypeError as exc:
            raise ModelError(f"fit: batch labels must be hashable ({exc})") from exc
        return np.asarray(ids, dtype=np.float64)

    def _train(
        self,
        x_s: FloatArray,
        y_s: FloatArray,
        inducing: FloatArray | None,
        batch_ids: FloatArray | None,
        x_scale: FloatArray,
    ) -> tuple[FloatArray, float, float, float, float, float]:
        """Maximise the (collapsed) marginal likelihood with GPyTorch; return
        (lengthscales (d,), outputscale, noise, final loss, batch variance, inverse batch
        length scale), all in scaled units (the last two 0 without a batch effect)."""
        torch, gpytorch = import_gpytorch()

        d = x_s.shape[1]
        x_t = torch.as_tensor(x_s, dtype=torch.float64)
        if batch_ids is not None:  # the batch id travels as an extra, last input column
            x_t = torch.cat([x_t, torch.as_tensor(batch_ids, dtype=torch.float64)[:, None]], 1)
        y_t = torch.as_tensor(y_s, dtype=torch.float64)
        z_t = None if inducing is None else torch.as_tensor(inducing, dtype=torch.float64)
        likelihood = gpytorch.likelihoods.GaussianLikelihood(
            noise_constraint=gpytorch.constraints.GreaterThan(self.noise_floor)
        ).double()
        batch = None
        min_scaled = 0.0
        if batch_ids is not None:
            if self.batch_min_lengthscale is not None:
                min_scaled = self.batch_min_lengthscale / float(x_scale[self._batch_column])
            batch = make_batch_kernel(
                d, self._batch_column, self.batch_effect == "drift", min_scaled
            )
        model = _make_torch_model(x_t, y_t, likelihood, z_t, batch, d).double()
        # Start from unit length scales and output scale (the data are standardised) and a
        # moderate noise, clipped to the floor; a batch effect from half the variance and,
        # for a drift, half a standard deviation of its feature.
        model.base_kernel.base_kernel.lengthscale = torch.ones(1, d)
        model.base_kernel.outputscale = torch.tensor(1.0)
        if batch is not None:
            batch.variance = torch.tensor(0.5)
            if self.batch_effect == "drift":
                batch.lengthscale = torch.tensor(max(0.5, 2.0 * min_scaled))
        likelihood.noise = torch.tensor(max(0.1, 2.0 * self.noise_floor))
        params = [p for p in model.parameters() if p.requires_grad]
        optimiser = torch.optim.Adam(params, lr=self.learning_rate)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
        loss_value = math.nan
        model.train()
        likelihood.train()
        # One intra-op thread while fitting: the matrices are small (N <= max_points, M
        # inducing points), so more threads mostly spin against other processes (campaign
        # workers, the controller), and single-threaded reductions make the seeded fit
        # reproducible across machines. The caller's setting is restored afterwards.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with exact_gpytorch_settings(), warnings.catch_warnings():
                # GPyTorch warns (NumericalWarning) when it adds jitter to a nearly singular
                # K_uu during training; the added jitter is part of the optimisation and the
                # posterior is refactorised (with its own checked jitter) afterwards.
                warnings.simplefilter("ignore", gpytorch.utils.warnings.NumericalWarning)
                for iteration in range(self.training_iterations):
                    optimiser.zero_grad()
                    loss = -mll(model(x_t), y_t)
                    loss_value = float(loss.detach())
                    if not math.isfinite(loss_value):
                        raise FitError(
                            f"training loss of {self.target_name!r} became {loss_value} at "
                            f"iteration {iteration} (learning_rate={self.learning_rate}); the "
                            "model was not changed - lower learning_rate or check the data"
                        )
                    loss.backward()
                    optimiser.step()
                with torch.no_grad():
                    loss_value = float(-mll(model(x_t), y_t))
        except (RuntimeError, ValueError) as exc:
            if isinstance(exc, FitError):
                raise
            raise FitError(
                f"fitting the GP residual {self.target_name!r} failed ({exc}); the model was "
                f"not changed - lower learning_rate (now {self.learning_rate}) or check the data"
            ) from exc
        finally:
            torch.set_num_threads(threads)
            model.eval()
            likelihood.eval()
        with torch.no_grad():
            lengthscales = (
                model.base_kernel.base_kernel.lengthscale.detach().reshape(-1).numpy().copy()
            )
            outputscale = float(model.base_kernel.outputscale.detach())
            noise = float(likelihood.noise.detach().reshape(-1)[0])
            batch_variance = float(batch.variance.detach()) if batch is not None else 0.0
            batch_inv = (
                1.0 / float(batch.lengthscale.detach())
                if batch is not None and self.batch_effect == "drift"
                else 0.0
            )
        values = np.concatenate(
            [lengthscales, [outputscale, noise, loss_value, batch_variance, batch_inv]]
        )
        if not np.all(np.isfinite(values)) or outputscale <= 0.0 or np.any(lengthscales <= 0.0):
            raise FitError(
                f"fitting {self.target_name!r} gave invalid hyperparameters (lengthscales "
                f"{lengthscales}, outputscale {outputscale}, noise {noise}, loss {loss_value}); "
                "the model was not changed - lower learning_rate or check the data"
            )
        return (
            lengthscales.astype(np.float64),
            outputscale,
            noise,
            loss_value,
            batch_variance,
            batch_inv,
        )

    # ------------------------------------------------------------------ update
    def update(self, X_new: npt.ArrayLike, y_new: npt.ArrayLike) -> GPResidual:
        """Condition the posterior on new observations without re-fitting hyperparameters.

        Scaling and hyperparameters stay as fitted. Cost per call is bounded and the number
        of basis points (hence the size of :meth:`to_casadi`'s function) never changes:

        * sparse: the whitened sufficient statistics ``P += R R^T`` and ``b += R y_s`` with
          ``R = L^-1 K_un`` take the k new points at O(k M d + k M^2), plus an O(M^3)
          refactorisation;
        * exact: a sliding window of the N fitted points; the k newest points are appended
          and the k oldest dropped (rows of ``X`` in fit order, then update order), followed
          by an O(N^3) refactorisation.

        With a batch effect, the rows of one call form one new, *finished* batch of the
        population (for example a batch record added after harvest); the running batch's
        own observations go to :meth:`observe` instead. Observations held by
        :meth:`observe` are kept and re-conditioned on the updated population.

        Args:
            X_new: new features, shape (k, d).
            y_new: new residual observations, shape (k,).

        Returns:
            self.

        Raises:
            ModelError: not fitted, wrong shapes, NaN or inf values.
            FitError: the new posterior could not be factorised; the model is unchanged.
        """
        state = self._fitted()
        x_arr, y_arr = self._check_data(X_new, y_new, "update")
        x_s = (x_arr - state.x_mean) / state.x_scale
        y_s = (y_arr - state.y_mean) / state.y_scale
        if not (np.all(np.isfinite(x_s)) and np.all(np.isfinite(y_s))):
            raise ModelError("update data overflow after scaling; check their units")
        chain = hashlib.sha256(state.update_data_sha256.encode())
        chain.update(_sha256(x_arr, y_arr).encode())
        common: dict[str, Any] = {
            name: getattr(state, name)
            for name in (
                "x_mean x_scale y_mean y_scale lengthscales outputscale noise "
                "training_data_sha256 fit_loss created batch_variance batch_inv_lengthscale "
                "batch_column"
            ).split()
        }
        common["n_observations"] = state.n_observations + x_arr.shape[0]
        common["n_updates"] = state.n_updates + 1
        common["update_data_sha256"] = chain.hexdigest()
        if self.sparse:
            lower, jitter = _inducing_cholesky(
                state.basis, state.lengthscales, state.outputscale, state.jitter
            )
            add_p, add_b = _whitened_statistics(
                lower, state.basis, x_s, y_s, state.lengthscales, state.outputscale
            )
            new_state = _sparse_state(
                basis=state.basis,
                lower=lower,
                jitter=jitter,
                stat_p=state.stat_p + add_p,
                stat_b=state.stat_b + add_b,
                **common,
            )
        else:
            capacity = state.basis.shape[0]
            basis = np.concatenate([state.basis, x_s])[-capacity:]
            targets = np.concatenate([state.window_targets, y_s])[-capacity:]
            new_id = float(state.window_batches.max()) + 1.0 if state.window_batches.size else 0.0
            if self.has_batch_effect:  # one new finished batch
                new_ids = np.full(x_s.shape[0], new_id)
            else:  # no batch structure: keep the ids distinct
                new_ids = new_id + np.arange(x_s.shape[0], dtype=np.float64)
            ids = np.concatenate([state.window_batches, new_ids])[-capacity:]
            new_state = _exact_state(basis=basis, targets=targets, batches=ids, **common)
        if state.n_running:
            new_state = _with_running(new_state, state.running_x, state.running_y)
        self._state = new_state
        logger.debug(
            "updated GP residual %r with %d points (%d observations in total)",
            self.target_name,
            x_arr.shape[0],
            new_state.n_observations,
        )
        return self

    # ------------------------------------------------------------------ running batch
    def observe(self, X_new: npt.ArrayLike, y_new: npt.ArrayLike) -> GPResidual:
        """Condition the prediction on observations of the *running* batch (learning during
        the batch; needs a batch effect).

        The observations share the running batch's random effect, so they teach it (the
        offset, or the drift near their ``batch_feature`` values) on top of the population
        posterior, which is not changed. The ``batch_capacity`` most recent ones are kept
        (the oldest drop out). Cost per call O(k^3 + k n d) with k <= ``batch_capacity``
        and n basis points; the export's size is bounded by the capacity (with
        ``to_casadi(parametric=True)`` it is fixed). Only pass observations that exist at
        the time of use (a growth-rate window that has closed).

        Args:
            X_new: features, shape (k, d), oldest first.
            y_new: residual observations, shape (k,), target units.

        Returns:
            self.

        Raises:
            ConfigError: the model has no batch effect (use :meth:`update`).
            ModelError: not fitted, wrong shapes, NaN or inf values.
            FitError: the conditioned posterior could not be factorised; unchanged.
        """
        state = self._fitted()
        if not self.has_batch_effect:
            raise ConfigError(
                f"GPResidual {self.target_name!r} has no batch effect, so there is no running "
                "batch to observe: use update(X, y), or fit with batch_effect='offset' or "
                "'drift'"
            )
        x_arr, y_arr = self._check_data(X_new, y_new, "observe")
        x_s = (x_arr - state.x_mean) / state.x_scale
        y_s = (y_arr - state.y_mean) / state.y_scale
        if not (np.all(np.isfinite(x_s)) and np.all(np.isfinite(y_s))):
            raise ModelError("observe data overflow after scaling; check their units")
        cap = self.batch_capacity
        run_x = np.concatenate([state.running_x.reshape(-1, self.n_features), x_s])[-cap:]
        run_y = np.concatenate([state.running_y, y_s])[-cap:]
        self._state = _with_running(state, run_x, run_y)
        logger.debug(
            "GP residual %r observed %d running-batch point(s); %d kept",
            self.target_name,
            x_arr.shape[0],
            run_y.shape[0],
        )
        return self

    def begin_batch(self) -> GPResidual:
        """Forget the running batch's observations (a new batch starts): predictions return
        to the population posterior with the batch effect's prior variance. Returns self."""
        state = self._fitted()
        self._state = _with_running(state, np.zeros((0, self.n_features)), np.zeros(0))
        return self

    # ------------------------------------------------------------------ predict
    def predict(
        self, X: npt.ArrayLike, *, include_noise: bool = False
    ) -> tuple[FloatArray, FloatArray]:
        """Posterior mean and variance at test points.

        Args:
            X: features, shape (m, d).
            include_noise: add the observation-noise variance (predict a new *measurement*
                rather than the latent residual).

        Returns:
            ``(mean, variance)``, each shape (m,), target units and target units squared.
            The variance is the latent function variance unless ``include_noise``; it is
            clipped at 0 against round-off. With a batch effect the points belong to the
            running batch: conditioned on its :meth:`observe`d points, and including the
            batch effect's remaining variance (a new batch: its prior variance ``sb2``).
        """
        state = self._fitted()
        x_arr = self._check_features(X, "predict")
        mean = np.empty(x_arr.shape[0])
        var = np.empty(x_arr.shape[0])
        for start in range(0, x_arr.shape[0], _PREDICT_CHUNK):
            rows = slice(start, start + _PREDICT_CHUNK)
            x_s = (x_arr[rows] - state.x_mean) / state.x_scale
            k = _rbf(x_s, state.basis, state.lengthscales, state.outputscale)  # (m, n)
            mean[rows] = k @ state.alpha
            wk = k @ state.w1.T
            var_s = state.outputscale + state.batch_variance - np.sum(wk**2, axis=1)
            if state.w2.size:
                var_s = var_s + np.sum((k @ state.w2.T) ** 2, axis=1)
            if state.n_running:
                c = _running_covariance(state, x_s, wk)  # (m, k)
                mean[rows] += c @ state.running_alpha
                var_s = var_s - np.sum((c @ state.running_factor.T) ** 2, axis=1)
            var[rows] = var_s
        mean = state.y_mean + state.y_scale * mean
        var = np.maximum(var, 0.0) * state.y_scale**2
        if include_noise:
            var = var + state.noise * state.y_scale**2
        return mean, var

    def predict_covariance(self, X: npt.ArrayLike) -> tuple[FloatArray, FloatArray]:
        """Posterior mean (m,) and joint latent covariance (m, m) at test points, target
        units (squared); the diagonal equals :meth:`predict`'s variance before clipping.

        Use it to propagate the residual's *correlated* uncertainty along a predicted
        trajectory (e.g. the variance of an integrated rate). Cost O(m^2 n); meant for
        validation and planning, not for the MPC's inner loop.
        """
        state = self._fitted()
        x_arr = self._check_features(X, "predict_covariance")
        x_s = (x_arr - state.x_mean) / state.x_scale
        k = _rbf(x_s, state.basis, state.lengthscales, state.outputscale)
        mean = k @ state.alpha
        wk = k @ state.w1.T
        cov = (
            _rbf(x_s, x_s, state.lengthscales, state.outputscale)
            + _batch_matrix(state, x_s, x_s)
            - wk @ wk.T
        )
        if state.w2.size:
            w2k = k @ state.w2.T
            cov = cov + w2k @ w2k.T
        if state.n_running:
            c = _running_covariance(state, x_s, wk)
            mean = mean + c @ state.running_alpha
            cw = c @ state.running_factor.T
            cov = cov - cw @ cw.T
        cov = 0.5 * (cov + cov.T) * state.y_scale**2
        return state.y_mean + state.y_scale * mean, cov

    # ------------------------------------------------------------------ CasADi export
    def to_casadi(
        self,
        name: str = "gp_residual",
        *,
        variance: bool = True,
        include_noise: bool = False,
        parametric: bool = False,
    ) -> ca.Function:
        """Closed-form CasADi function of the posterior (no torch at run time).

        Inputs ``["features"]`` (d x 1, feature units); outputs ``["mean", "variance"]``
        (1 x 1 each, target units) or ``["mean"]`` when ``variance=False``. Evaluation costs
        O(n d) for the mean and O(n^2) more for the variance (n = N exact, M sparse). It is
        an MXFunction whose nodes support SX evaluation, so it can be called with numbers,
        SX or MX arguments. Unlike :meth:`predict`, the variance is not clipped at 0 (the
        clip would make the derivative discontinuous); it can go negative by round-off only.
        With a batch effect the function predicts for the running batch (as :meth:`predict`):
        the :meth:`observe`d points add O(k n) to the mean and O(k^2) to the variance
        (k <= ``batch_capacity``; with ``parametric=True`` always K = ``batch_capacity``
        slots, unused ones switched off by zero weights).

        Args:
            name: CasADi function name (letters, digits, single underscores).
            variance: also output the variance (skip it for a cheap mean-only NLP term).
            include_noise: add the observation-noise variance to ``variance``.
            parametric: make the arrays that :meth:`update` changes extra inputs (named as
                the keys of :meth:`casadi_parameters`) instead of embedded constants, so an
                NLP built once can take them as per-step parameters.
        """
        state = self._fitted()
        _check_casadi_name(name)
        consts = _casadi_constants(state, self.batch_capacity if parametric else None)
        d = self.n_features
        features = ca.MX.sym("features", d, 1)
        inputs: list[ca.MX] = [features]
        input_names = ["features"]
        values: dict[str, ca.MX | ca.DM] = {}
        for key in self._parameter_names(variance):
            shape = consts[key].shape
            if parametric:
                sym = ca.MX.sym(key, shape[0], shape[1] if len(shape) > 1 else 1)
                inputs.append(sym)
                input_names.append(key)
                values[key] = sym
            elif key in ("variance_factor", "running_factor"):  # lower triangular
                values[key] = _lower_dm(consts[key])
            else:
                values[key] = ca.DM(consts[key])
        basis_t = values.get("basis", ca.DM(consts["basis"]))
        w_fixed = _lower_dm(consts["w1"]) if self.sparse else None
        n = int(consts["basis"].shape[1])
        x_t = (features - ca.DM(state.x_mean)) / ca.DM(state.x_scale * state.lengthscales)
        sqdist = ca.sum1((basis_t - ca.repmat(x_t, 1, n)) ** 2)  # 1 x n
        k = state.outputscale * ca.exp(-0.5 * sqdist).T  # n x 1, scaled kernel units
        mean = state.y_mean + ca.mtimes(values["alpha"].T, k)
        n_run = int(consts["running_alpha"].shape[0]) if self.has_batch_effect else 0
        c = None
        if n_run:
            # running batch: c(x) = k(X_o, x) - G^T W k_x + kb(X_o, x), constants folded
            # (running_cross = G / y_scale, variance_factor = y_scale W)
            run_basis = values["running_basis"]  # d x K, length-scale units
            sq_o = ca.sum1((run_basis - ca.repmat(x_t, 1, n_run)) ** 2)
            k_o = state.outputscale * ca.exp(-0.5 * sq_o).T  # K x 1
            if state.batch_column >= 0 and state.batch_inv_lengthscale > 0.0:
                j = state.batch_column
                scale_j = float(state.lengthscales[j] * state.batch_inv_lengthscale)
                diff = (ca.repmat(x_t[j], 1, n_run) - run_basis[j, :]) * scale_j
                k_b: ca.MX | ca.DM = state.batch_variance * ca.exp(-0.5 * diff**2).T
            else:
                k_b = state.batch_variance * ca.DM.ones(n_run, 1)
            w_k = ca.mtimes(values["variance_factor"], k)
            c = k_o - ca.mtimes(values["running_cross"].T, w_k) + k_b
            mean = mean + ca.mtimes(values["running_alpha"].T, c)
        outputs: list[ca.MX] = [mean]
        output_names = ["mean"]
        if variance:
            prior = (state.outputscale + state.batch_variance) * state.y_scale**2
            if include_noise:
                prior += state.noise * state.y_scale**2
            if w_fixed is not None:
                var = (
                    prior
                    - ca.sumsqr(ca.mtimes(w_fixed, k))
                    + ca.sumsqr(ca.mtimes(values["variance_factor"], k))
                )
            else:
                var = prior - ca.sumsqr(ca.mtimes(values["variance_factor"], k))
            if c is not None:
                var = var - ca.sumsqr(ca.mtimes(values["running_factor"], c))
            outputs.append(var)
            output_names.append("variance")
        return ca.Function(name, inputs, outputs, input_names, output_names)

    def casadi_parameters(self, *, variance: bool = True) -> dict[str, FloatArray]:
        """Current values of the extra inputs of ``to_casadi(parametric=True)``.

        Keys and shapes: exact ``basis`` (d x N), ``alpha`` (N x 1), ``variance_factor``
        (N x N); sparse ``alpha`` (M x 1), ``variance_factor`` (M x M). With a batch effect
        also (K = ``batch_capacity``, unused slots zero) ``running_basis`` (d x K),
        ``running_cross`` (N x K), ``running_alpha`` (K x 1) and ``running_factor``
        (K x K), and ``variance_factor`` even when ``variance=False`` (the running batch's
        mean needs it). Shapes never change after fit; call again after :meth:`update`,
        :meth:`observe` or :meth:`begin_batch` and pass the values as NLP parameters.
        """
        consts = _casadi_constants(self._fitted(), self.batch_capacity)
        return {key: consts[key].copy() for key in self._parameter_names(variance)}

    # ------------------------------------------------------------------ numeric-data export
    def data_layout(self) -> tuple[tuple[str, int], ...]:
        """Blocks of :meth:`casadi_data`, in order: ``(name, length)``.

        ``hyper`` (2 d + 6: feature shift x_mean, inverse feature scale 1 / (x_scale l),
        output scale, y_mean, prior variance (s2 + sb2) y_scale^2, noise variance
        sigma2 y_scale^2, batch variance, batch-drift scale), ``basis`` (d n, column-major
        d x n, length-scale units), ``alpha`` (n: the weights of k(x) in the mean, with the
        running batch's ``-G^T W k`` term folded in), ``w1`` (n (n+1) / 2, lower triangle
        column-major), sparse also ``w2`` (the same), and with a batch effect the running
        batch's K = ``batch_capacity`` slots: ``running_basis`` (d K), ``running_cross``
        (n K), ``running_alpha`` (K), ``running_factor`` (K (K+1) / 2). The layout depends
        only on the settings and the number of basis points n, which :meth:`update` never
        changes, and :meth:`observe` fills at most K slots.
        """
        state = self._fitted()
        return _data_layout(
            int(state.basis.shape[0]),
            self.n_features,
            self.batch_capacity if self.has_batch_effect else 0,
            self.sparse,
        )

    @property
    def data_size(self) -> int:
        """Length of :meth:`casadi_data` (the ``data`` input of :meth:`to_casadi_data`)."""
        return sum(size for _, size in self.data_layout())

    def casadi_data(self) -> FloatArray:
        """Everything the posterior depends on as one flat vector (n_data,), the ``data``
        input of :meth:`to_casadi_data` (blocks: :meth:`data_layout`). Call again after
        :meth:`update`, :meth:`observe` or :meth:`begin_batch`; no CasADi object is built.
        Unused running-batch slots are zero, which switches them off."""
        state = self._fitted()
        capacity = self.batch_capacity if self.has_batch_effect else 0
        consts = _casadi_constants(state, capacity if capacity else None)
        n = int(state.basis.shape[0])
        batch_scale = (
            float(state.lengthscales[state.batch_column] * state.batch_inv_lengthscale)
            if state.batch_column >= 0
            else 0.0
        )
        hyper = np.concatenate(
            [
                state.x_mean,
                1.0 / (state.x_scale * state.lengthscales),
                [
                    state.outputscale,
                    state.y_mean,
                    (state.outputscale + state.batch_variance) * state.y_scale**2,
                    state.noise * state.y_scale**2,
                    state.batch_variance,
                    batch_scale,
                ],
            ]
        )
        lower = np.triu_indices(n)
        # the mean is linear in k(x): the running batch's  -run_alpha^T G^T W k  is folded
        # into the weights of k, so the mean needs neither W nor G (O(n d) per point)
        weights = consts["alpha"].reshape(-1)
        if capacity:
            weights = weights - (state.y_scale * state.w1).T @ (
                consts["running_cross"] @ consts["running_alpha"].reshape(-1)
            )
        blocks = [
            hyper,
            consts["basis"].T.reshape(-1),  # column-major d x n = row-major n x d
            weights,
            (state.y_scale * state.w1).T[lower],
        ]
        if self.sparse:
            blocks.append((state.y_scale * state.w2).T[lower])
        if capacity:
            blocks += [
                consts["running_basis"].T.reshape(-1),
                consts["running_cross"].T.reshape(-1),
                consts["running_alpha"].reshape(-1),
                consts["running_factor"].T[np.triu_indices(capacity)],
            ]
        return np.ascontiguousarray(np.concatenate(blocks), dtype=np.float64)

    def to_casadi_data(
        self, name: str = "gp_residual", *, variance: bool = True, include_noise: bool = False
    ) -> ca.Function:
        """The posterior as a CasADi function of the features *and* of its numeric data,
        built once: inputs ``["features", "data"]`` (d x 1, and :attr:`data_size` x 1 from
        :meth:`casadi_data`), outputs ``["mean", "variance"]`` (or ``["mean"]``), target
        units, the same values as :meth:`to_casadi` with the data embedded.

        Learning (:meth:`update`, :meth:`observe`, :meth:`begin_batch`) changes only the
        data vector, never its length, so a caller swaps arrays instead of rebuilding
        functions or their derivatives. Cost per evaluation as :meth:`to_casadi`
        (triangular factors are kept sparse). A residual re-fitted on another number of
        points (or with another ``batch_capacity``) has another layout and needs a new
        function: compare :meth:`data_layout`.
        """
        state = self._fitted()
        _check_casadi_name(name)
        layout = self.data_layout()
        d = self.n_features
        n = int(state.basis.shape[0])
        features = ca.MX.sym("features", d, 1)
        data = ca.MX.sym("data", sum(size for _, size in layout), 1)
        blocks: dict[str, ca.MX] = {}
        offset = 0
        for key, size in layout:
            blocks[key] = data[offset : offset + size]
            offset += size
        hyper = blocks["hyper"]
        shift, inv_scale = hyper[:d], hyper[d : 2 * d]
        outputscale, y_mean, prior, noise_var, batch_var, batch_scale = (
            hyper[2 * d + i] for i in range(6)
        )
        x_t = (features - shift) * inv_scale
        basis = ca.reshape(blocks["basis"], d, n)
        k = outputscale * ca.exp(-0.5 * ca.sum1((basis - ca.repmat(x_t, 1, n)) ** 2)).T  # n x 1
        mean = y_mean + ca.dot(blocks["alpha"], k)
        capacity = self.batch_capacity if self.has_batch_effect else 0
        outputs: list[ca.MX] = [mean]
        output_names = ["mean"]
        if capacity:
            run_basis = ca.reshape(blocks["running_basis"], d, capacity)
            k_o = (
                outputscale
                * ca.exp(-0.5 * ca.sum1((run_basis - ca.repmat(x_t, 1, capacity)) ** 2)).T
            )
            j = max(state.batch_column, 0)  # structural (the batch feature); 0: offset
            diff = (ca.repmat(x_t[j], 1, capacity) - run_basis[j, :]) * batch_scale
            k_b = batch_var * ca.exp(-0.5 * diff**2).T
            # (the -G^T W k part of c(x) is folded into "alpha", see casadi_data)
            outputs[0] = mean + ca.dot(blocks["running_alpha"], k_o + k_b)
        if variance:
            w1k = ca.mtimes(ca.MX(ca.Sparsity.lower(n), blocks["w1"]), k)
            var = prior - ca.sumsqr(w1k)
            if include_noise:
                var = var + noise_var
            if self.sparse:
                var = var + ca.sumsqr(ca.mtimes(ca.MX(ca.Sparsity.lower(n), blocks["w2"]), k))
            if capacity:
                cross = ca.reshape(blocks["running_cross"], n, capacity)
                c = k_o - ca.mtimes(cross.T, w1k) + k_b
                factor = ca.MX(ca.Sparsity.lower(capacity), blocks["running_factor"])
                var = var - ca.sumsqr(ca.mtimes(factor, c))
            outputs.append(var)
            output_names.append("variance")
        return ca.Function(name, [features, data], outputs, ["features", "data"], output_names)

    def _parameter_names(self, variance: bool) -> list[str]:
        names = ["alpha"] if self.sparse else ["basis", "alpha"]
        if variance or self.has_batch_effect:
            names.append("variance_factor")
        if self.has_batch_effect:
            names += ["running_basis", "running_cross", "running_alpha"]
            if variance:
                names.append("running_factor")
        return names

    # ------------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the fitted residual to an ``.npz`` file (no pickle), atomically.

        The file holds the posterior state arrays and a ``metadata`` JSON string (feature
        names and units, target, settings, training-data SHA-256, package versions,
        creation and save times). Returns the path written.
        """
        state = self._fitted()
        target = Path(path)
        if target.suffix != ".npz":
            raise ConfigError(f"GP residual files end in .npz, got {str(target)!r}")
        metadata = {
            "format": _FORMAT,
            "format_version": _FORMAT_VERSION,
            "feature_names": list(self.feature_names),
            "feature_units": list(self.feature_units),
            "target_name": self.target_name,
            "target_unit": self.target_unit,
            "sparse": self.sparse,
            "settings": {
                "n_inducing": self.n_inducing,
                "kernel": self.kernel,
                "noise_floor": self.noise_floor,
                "training_iterations": self.training_iterations,
                "learning_rate": self.learning_rate,
                "seed": self.seed,
                "max_points": self.max_points,
                "batch_effect": self.batch_effect,
                "batch_feature": self.batch_feature,
                "batch_capacity": self.batch_capacity,
                "batch_min_lengthscale": self.batch_min_lengthscale,
            },
            "training_data_sha256": state.training_data_sha256,
            "update_data_sha256": state.update_data_sha256,
            "n_observations": state.n_observations,
            "n_updates": state.n_updates,
            "fit_loss": state.fit_loss,
            "created": state.created,
            "saved": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "versions": _package_versions(),
        }
        arrays: dict[str, npt.NDArray[Any]] = {
            key: np.asarray(getattr(state, key), dtype=np.float64) for key in _ARRAY_FIELDS
        }
        arrays["metadata"] = np.array(json.dumps(metadata, sort_keys=True))
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=target.name, suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as handle:
                np.savez(handle, allow_pickle=False, **arrays)
            os.replace(tmp_name, target)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp_name)
            raise
        logger.info("saved GP residual %r to %s", self.target_name, target)
        return target

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        expected_features: Sequence[str] | None = None,
        expected_units: Sequence[str] | None = None,
    ) -> GPResidual:
        """Restore a residual written by :meth:`save`.

        Args:
            path: the ``.npz`` file.
            expected_features: feature names (in order) the caller will pass; a file with
                other names or order raises :class:`ConfigError`.
            expected_units: units of those features (same order); a difference raises
                :class:`ConfigError`.

        Raises:
            FileNotFoundError: no such file.
            ConfigError: not a GP residual file, unsupported format version, or features /
                units differing from the expected ones (the message names them).
        """
        source = Path(path)
        meta, arrays = _read_residual_file(source)
        try:
            names = [str(n) for n in meta["feature_names"]]
            units = [str(u) for u in meta["feature_units"]]
            _check_expected(source, names, units, expected_features, expected_units)
            settings = meta["settings"]
            model = cls(
                names,
                units,
                str(meta["target_name"]),
                str(meta["target_unit"]),
                sparse=bool(meta["sparse"]),
                n_inducing=int(settings["n_inducing"]),
                kernel=str(settings["kernel"]),
                noise_floor=float(settings["noise_floor"]),
                training_iterations=int(settings["training_iterations"]),
                learning_rate=float(settings["learning_rate"]),
                seed=int(settings["seed"]),
                max_points=int(settings["max_points"]),
                batch_effect=str(settings.get("batch_effect", "none")),
                batch_feature=(
                    None
                    if settings.get("batch_feature") is None
                    else str(settings["batch_feature"])
                ),
                batch_capacity=int(settings.get("batch_capacity", 16)),
                batch_min_lengthscale=(
                    None
                    if settings.get("batch_min_lengthscale") is None
                    else float(settings["batch_min_lengthscale"])
                ),
            )
            counters: dict[str, Any] = {
                "n_observations": int(meta["n_observations"]),
                "n_updates": int(meta["n_updates"]),
                "training_data_sha256": str(meta["training_data_sha256"]),
                "update_data_sha256": str(meta["update_data_sha256"]),
                "fit_loss": float(meta["fit_loss"]),
                "created": str(meta["created"]),
            }
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, ConfigError):
                raise
            raise ConfigError(f"{source}: GP residual metadata is incomplete ({exc!r})") from exc
        d = len(names)
        n = arrays["basis"].shape[0] if arrays["basis"].ndim == 2 else -1
        if meta["format_version"] == 1:  # before batch effects: no batch structure
            arrays["window_batches"] = np.zeros(0) if model.sparse else np.arange(float(n))
            arrays["running_x"] = np.zeros((0, d))
            arrays["running_y"] = np.zeros(0)
            arrays["batch_variance"] = np.array(0.0)
            arrays["batch_inv_lengthscale"] = np.array(0.0)
        k_run = arrays["running_y"].shape[0] if arrays["running_y"].ndim == 1 else -1
        if k_run > model.batch_capacity or (k_run > 0 and not model.has_batch_effect):
            raise ConfigError(
                f"{source}: {k_run} running-batch observations for a model with "
                f"batch_effect={model.batch_effect!r} and batch_capacity={model.batch_capacity}"
            )
        expected_shapes: dict[str, tuple[int, ...]] = {
            "x_mean": (d,),
            "x_scale": (d,),
            "lengthscales": (d,),
            "basis": (n, d),
            "alpha": (n,),
            "w1": (n, n),
            "w2": (n, n) if model.sparse else (0, 0),
            "stat_p": (n, n) if model.sparse else (0, 0),
            "stat_b": (n,) if model.sparse else (0,),
            "window_targets": (0,) if model.sparse else (n,),
            "window_batches": (0,) if model.sparse else (n,),
            "running_x": (k_run, d),
            "running_y": (k_run,),
        }
        expected_shapes.update({key: () for key in _SCALAR_FIELDS})
        for key, shape in expected_shapes.items():
            if arrays[key].shape != shape:
                raise ConfigError(
                    f"{source}: entry {key!r} has shape {arrays[key].shape}, expected {shape}"
                )
        scalars: dict[str, Any] = {key: float(arrays[key]) for key in _SCALAR_FIELDS}
        vectors: dict[str, Any] = {key: arrays[key] for key in _ARRAY_FIELDS_NONSCALAR}
        run_x, run_y = vectors.pop("running_x"), vectors.pop("running_y")
        state = _State(
            **vectors,
            **scalars,
            **counters,
            batch_column=model._batch_column,
            running_x=np.zeros((0, d)),
            running_cross=np.zeros((n, 0)),
        )
        try:
            model._state = _with_running(state, run_x, run_y)
        except (FitError, ModelError) as exc:
            raise ConfigError(f"{source}: running-batch observations are unusable ({exc})") from exc
        logger.info("loaded GP residual %r from %s", model.target_name, source)
        return model

    def metadata(self) -> dict[str, Any]:
        """Names, units and provenance of the fitted residual (as saved)."""
        state = self._fitted()
        return {
            "feature_names": list(self.feature_names),
            "feature_units": list(self.feature_units),
            "target_name": self.target_name,
            "target_unit": self.target_unit,
            "sparse": self.sparse,
            "batch_effect": self.batch_effect,
            "batch_feature": self.batch_feature,
            "n_running": state.n_running,
            "n_basis": int(state.basis.shape[0]),
            "n_observations": state.n_observations,
            "n_updates": state.n_updates,
            "training_data_sha256": state.training_data_sha256,
            "created": state.created,
        }

    def __deepcopy__(self, memo: dict[int, Any]) -> GPResidual:
        clone = copy.copy(self)
        if self._state is not None:
            arrays = {
                field.name: getattr(self._state, field.name).copy()
                for field in dataclasses.fields(self._state)
                if isinstance(getattr(self._state, field.name), np.ndarray)
            }
            clone._state = dataclasses.replace(self._state, **arrays)
        return clone

    def __repr__(self) -> str:
        kind = "sparse" if self.sparse else "exact"
        if self.has_batch_effect:
            kind += f", batch effect {self.batch_effect}"
        status = f"fitted, n_basis={self.n_basis_}" if self.is_fitted else "unfitted"
        return (
            f"GPResidual({self.target_name!r} [{self.target_unit}] ~ "
            f"{list(self.feature_names)}, {kind}, {status})"
        )

    # ------------------------------------------------------------------ data checks
    def _check_features(self, X: npt.ArrayLike, where: str) -> FloatArray:
        try:
            x_arr = np.asarray(X, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}: X must be numeric, shape (n, d) ({exc})") from exc
        d = self.n_features
        if x_arr.ndim != 2 or x_arr.shape[1] != d:
            raise ModelError(
                f"{where}: X must have shape (n, {d}) for features {list(self.feature_names)}, "
                f"got {x_arr.shape}; use X.reshape(1, -1) for a single point"
            )
        if x_arr.shape[0] == 0:
            raise ModelError(f"{where}: X has no rows")
        bad = ~np.isfinite(x_arr)
        if bad.any():
            row, col = (int(i) for i in np.argwhere(bad)[0])
            raise ModelError(
                f"{where}: X contains {int(bad.sum())} NaN/inf value(s), first at row {row}, "
                f"feature {self.feature_names[col]!r}; drop or impute them first"
            )
        return x_arr

    def _check_data(
        self, X: npt.ArrayLike, y: npt.ArrayLike, where: str
    ) -> tuple[FloatArray, FloatArray]:
        x_arr = self._check_features(X, where)
        try:
            y_arr = np.asarray(y, dtype=np.float64)
        except (TypeError, ValueError) as exc:
            raise ModelError(f"{where}: y must be numeric, shape (n,) ({exc})") from exc
        if y_arr.ndim != 1 or y_arr.shape[0] != x_arr.shape[0]:
            raise ModelError(
                f"{where}: y must have shape ({x_arr.shape[0]},) to match X {x_arr.shape}, "
                f"got {y_arr.shape}"
            )
        bad = ~np.isfinite(y_arr)
        if bad.any():
            raise ModelError(
                f"{where}: y ({self.target_name!r}) contains {int(bad.sum())} NaN/inf "
                f"value(s), first at row {int(np.flatnonzero(bad)[0])}; drop them first"
            )
        return x_arr, y_arr


# ---------------------------------------------------------------------- helpers
_ARRAY_FIELDS_NONSCALAR = (
    "x_mean",
    "x_scale",
    "lengthscales",
    "basis",
    "window_targets",
    "stat_p",
    "stat_b",
    "alpha",
    "w1",
    "w2",
    "window_batches",
    "running_x",
    "running_y",
)
_SCALAR_FIELDS = (
    "y_mean",
    "y_scale",
    "outputscale",
    "noise",
    "jitter",
    "batch_variance",
    "batch_inv_lengthscale",
)
_ARRAY_FIELDS = _ARRAY_FIELDS_NONSCALAR + _SCALAR_FIELDS
#: Entries of a version-1 file (before batch effects).
_ARRAY_FIELDS_V1 = tuple(
    key
    for key in _ARRAY_FIELDS
    if key
    not in ("window_batches", "running_x", "running_y", "batch_variance", "batch_inv_lengthscale")
)


def import_gpytorch() -> tuple[Any, Any]:
    """Import and return ``(torch, gpytorch)``.

    Imported lazily so that loading, predicting and exporting a saved residual (the
    controller's path) never imports torch. linear_operator 0.6 decorates functions with
    ``torch.jit.script`` at import time, which torch 2.13 deprecates with a
    DeprecationWarning that we cannot act on; it is ignored for the import only.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings(
            "ignore", message=r".torch\.jit\.script. is deprecated", category=DeprecationWarning
        )
        import gpytorch
        import torch
    return torch, gpytorch


@contextlib.contextmanager
def exact_gpytorch_settings() -> Iterator[None]:
    """GPyTorch settings for exact, Cholesky-based computation (no CG, Lanczos or LOVE).

    ``max_cholesky_size`` is effectively unlimited, so linear_operator factorises instead of
    running conjugate gradients or stochastic Lanczos. ``log_prob`` keeps GPyTorch's own
    path (``inv_quad_logdet``), which is then a Cholesky for the exact GP and the exact
    O(N M^2) Woodbury identity for SGPR; switching it off would make GPyTorch fall back to
    torch's dense MultivariateNormal, an O(N^3) Cholesky even for the sparse model.
    Used when fitting and by the conformance tests' GPyTorch reference predictions.
    """
    _, gpytorch = import_gpytorch()

    with contextlib.ExitStack() as stack:
        stack.enter_context(
            gpytorch.settings.fast_computations(
                covar_root_decomposition=False, log_prob=True, solves=False
            )
        )
        stack.enter_context(gpytorch.settings.max_cholesky_size(2**31))
        stack.enter_context(gpytorch.settings.fast_pred_var(False))
        stack.enter_context(gpytorch.settings.skip_posterior_variances(False))
        yield


def make_batch_kernel(
    n_features: int, batch_column: int, drift: bool, min_lengthscale: float = 0.0
) -> Any:
    """GPyTorch kernel of the per-batch effect on inputs whose last column (index
    ``n_features``) is the batch id::

        k(a, b) = variance * [a_id == b_id] * exp(-0.5 (a_t - b_t)^2 / lengthscale^2)

    with ``a_t`` the column ``batch_column`` (scaled units) for a drift, and without the
    exponential factor for a constant offset (``drift=False``). Attributes ``variance`` and
    (drift) ``lengthscale`` are positive (softplus-constrained) parameters; the length
    scale is kept above ``min_lengthscale`` (scaled units) when that is positive.
    """
    torch, gpytorch = import_gpytorch()
    kernel_base: Any = gpytorch.kernels.Kernel

    class BatchEffectKernel(kernel_base):
        is_stationary = False

        def __init__(self) -> None:
            super().__init__()
            self.register_parameter("raw_variance", torch.nn.Parameter(torch.zeros(1)))
            self.register_constraint("raw_variance", gpytorch.constraints.Positive())
            if drift:
                self.register_parameter("raw_lengthscale", torch.nn.Parameter(torch.zeros(1)))
                self.register_constraint(
                    "raw_lengthscale",
                    gpytorch.constraints.GreaterThan(min_lengthscale)
                    if min_lengthscale > 0.0
                    else gpytorch.constraints.Positive(),
                )

        @property
        def variance(self) -> Any:
            return self.raw_variance_constraint.transform(self.raw_variance)[0]

        @variance.setter
        def variance(self, value: Any) -> None:
            raw = self.raw_variance_constraint.inverse_transform(torch.as_tensor(value))
            self.initialize(raw_variance=raw.reshape(1).to(self.raw_variance))

        @property
        def lengthscale(self) -> Any:
            return self.raw_lengthscale_constraint.transform(self.raw_lengthscale)[0]

        @lengthscale.setter
        def lengthscale(self, value: Any) -> None:
            raw = self.raw_lengthscale_constraint.inverse_transform(torch.as_tensor(value))
            self.initialize(raw_lengthscale=raw.reshape(1).to(self.raw_lengthscale))

        def forward(self, x1: Any, x2: Any, diag: bool = False, **params: Any) -> Any:
            id1, id2 = x1[..., n_features], x2[..., n_features]
            if diag:
                same = (id1 == id2).to(x1.dtype)
                if drift:
                    diff = (x1[..., batch_column] - x2[..., batch_column]) / self.lengthscale
                    same = same * torch.exp(-0.5 * diff**2)
                return self.variance * same
            same = (id1[..., :, None] == id2[..., None, :]).to(x1.dtype)
            if drift:
                diff = (
                    x1[..., :, None, batch_column] - x2[..., None, :, batch_column]
                ) / self.lengthscale
                same = same * torch.exp(-0.5 * diff**2)
            return self.variance * same

    return BatchEffectKernel()


def _make_torch_model(
    x_t: Any,
    y_t: Any,
    likelihood: Any,
    inducing: Any | None,
    batch: Any | None = None,
    n_features: int | None = None,
) -> Any:
    """GPyTorch ExactGP with zero mean and ScaleKernel(RBF ARD), wrapped in an
    InducingPointKernel (SGPR, Titsias' collapsed bound) with fixed inducing points when
    ``inducing`` is given, plus the ``batch`` kernel (see :func:`make_batch_kernel`; the
    inputs then carry the batch id as an extra last column and the RBF sees only the first
    ``n_features``). ``model.base_kernel`` is the ScaleKernel in all cases."""
    _, gpytorch = import_gpytorch()

    d = int(x_t.shape[1]) if n_features is None else n_features
    exact_gp: Any = gpytorch.models.ExactGP

    class _ResidualGP(exact_gp):
        def __init__(self) -> None:
            super().__init__(x_t, y_t, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.base_kernel = gpytorch.kernels.ScaleKernel(
                gpytorch.kernels.RBFKernel(
                    ard_num_dims=d, active_dims=tuple(range(d)) if batch is not None else None
                )
            )
            if batch is not None:
                self.batch_kernel = batch
                self.covar_module = self.base_kernel + batch
            elif inducing is None:
                self.covar_module = self.base_kernel
            else:
                self.covar_module = gpytorch.kernels.InducingPointKernel(
                    self.base_kernel, inducing_points=inducing.clone(), likelihood=likelihood
                )
                self.covar_module.inducing_points.requires_grad_(False)

        def forward(self, x: Any) -> Any:
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    return _ResidualGP()


def _check_int(label: str, value: object, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ConfigError(f"{label} must be an integer >= {minimum}, got {value!r}")


def _check_positive(label: str, value: object) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float | np.floating)
        or not math.isfinite(float(value))
        or float(value) <= 0.0
    ):
        raise ConfigError(f"{label} must be a finite number > 0, got {value!r}")


def _scaling(values: FloatArray, label: str) -> tuple[FloatArray, FloatArray]:
    """Column means and standard deviations, shape (d,) each; constant columns get 1."""
    with np.errstate(over="ignore", invalid="ignore"):
        mean = values.mean(axis=0)
        scale = values.std(axis=0)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(scale))):
        raise FitError(
            f"standardising the {label} overflowed (values too large for float64); the model "
            "was not changed - express them in larger units"
        )
    constant = scale <= 1e-12 * np.maximum(np.abs(mean), 1.0)
    if constant.any():
        logger.warning(
            "%s column(s) %s are constant in the training data; their scale is set to 1",
            label,
            np.flatnonzero(constant).tolist(),
        )
        scale = np.where(constant, 1.0, scale)
    return mean.astype(np.float64), scale.astype(np.float64)


def _rbf(a: FloatArray, b: FloatArray, lengthscales: FloatArray, outputscale: float) -> FloatArray:
    """ARD RBF kernel matrix, shape (len(a), len(b)), from scaled inputs a (n, d), b (m, d)."""
    inv = 1.0 / lengthscales
    sq = np.zeros((a.shape[0], b.shape[0]))
    for j in range(a.shape[1]):
        sq += (a[:, j, None] * inv[j] - b[None, :, j] * inv[j]) ** 2
    return outputscale * np.exp(-0.5 * sq)


def _kmeans(x_s: FloatArray, n_clusters: int, seed: int, iterations: int = 25) -> FloatArray:
    """Seeded k-means (k-means++ start, Lloyd steps) of scaled inputs; centres (k, d).

    k is at most the number of distinct rows; an empty cluster keeps its previous centre.
    """
    points = np.unique(x_s, axis=0)
    k = min(n_clusters, points.shape[0])
    if k == points.shape[0]:
        return points.copy()
    rng = np.random.default_rng(seed)
    centres = np.empty((k, x_s.shape[1]))
    centres[0] = x_s[rng.integers(x_s.shape[0])]
    closest = np.sum((x_s - centres[0]) ** 2, axis=1)
    for i in range(1, k):
        total = closest.sum()
        idx = int(rng.choice(x_s.shape[0], p=closest / total)) if total > 0 else i
        centres[i] = x_s[idx]
        closest = np.minimum(closest, np.sum((x_s - centres[i]) ** 2, axis=1))
    for _ in range(iterations):
        dist = np.sum((x_s[:, None, :] - centres[None, :, :]) ** 2, axis=2)
        labels = np.argmin(dist, axis=1)
        new = centres.copy()
        for c in range(k):
            members = labels == c
            if members.any():
                new[c] = x_s[members].mean(axis=0)
        if np.array_equal(new, centres):
            break
        centres = new
    return np.unique(centres, axis=0)


def _prune_inducing(
    inducing: FloatArray, lengthscales: FloatArray, outputscale: float
) -> FloatArray:
    """Drop inducing points (M, d) that the others already explain (pivoted Cholesky of K_uu).

    A point whose conditional prior variance given the points kept so far is below
    ``_PRUNE_TOLERANCE * outputscale`` adds (almost) nothing to the approximation but makes
    K_uu nearly singular, so that alpha and the variance factors lose digits. Returns the
    kept points (M', d) in their original order.
    """
    k_uu = _rbf(inducing, inducing, lengthscales, outputscale)
    m = k_uu.shape[0]
    residual = np.diag(k_uu).copy()
    factor = np.zeros((m, m))
    chosen: list[int] = []
    for step in range(m):
        pivot = int(np.argmax(residual))
        if residual[pivot] <= _PRUNE_TOLERANCE * outputscale:
            break
        chosen.append(pivot)
        column = (k_uu[:, pivot] - factor[:, :step] @ factor[pivot, :step]) / math.sqrt(
            residual[pivot]
        )
        factor[:, step] = column
        residual = residual - column**2
        residual[chosen] = 0.0
    if len(chosen) < m:
        logger.info(
            "kept %d of %d inducing points; the others are redundant at the fitted length "
            "scales (conditional variance < %.0e x outputscale)",
            len(chosen),
            m,
            _PRUNE_TOLERANCE,
        )
    return inducing[np.sort(chosen)].copy()


def _cholesky(matrix: FloatArray, what: str) -> FloatArray:
    try:
        return np.asarray(scipy.linalg.cholesky(matrix, lower=True), dtype=np.float64)
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise FitError(
            f"{what} is not positive definite ({exc}); the model was not changed - raise "
            "noise_floor or remove duplicated observations"
        ) from exc


def _tri_inverse(lower: FloatArray) -> FloatArray:
    eye = np.eye(lower.shape[0])
    return np.asarray(scipy.linalg.solve_triangular(lower, eye, lower=True), dtype=np.float64)


def _batch_kernel(
    a: FloatArray,
    b: FloatArray,
    variance: float,
    inv_lengthscale: float,
    column: int,
) -> FloatArray:
    """Batch-effect kernel (without the same-batch indicator) between scaled inputs a (n, d)
    and b (m, d): ``variance * exp(-0.5 ((a_t - b_t) * inv_lengthscale)^2)``, shape (n, m);
    constant ``variance`` for an offset (column < 0 or inv_lengthscale 0)."""
    if variance == 0.0:
        return np.zeros((a.shape[0], b.shape[0]))
    if column < 0 or inv_lengthscale == 0.0:
        return np.full((a.shape[0], b.shape[0]), variance)
    diff = (a[:, column, None] - b[None, :, column]) * inv_lengthscale
    return variance * np.exp(-0.5 * diff**2)


def _batch_matrix(state: _State, a: FloatArray, b: FloatArray) -> FloatArray:
    """Batch-effect covariance between points a (n, d) and b (m, d) of the *same* batch."""
    return _batch_kernel(
        a, b, state.batch_variance, state.batch_inv_lengthscale, state.batch_column
    )


def _running_covariance(state: _State, x_s: FloatArray, wk: FloatArray) -> FloatArray:
    """Prior-to-running covariance ``c(x)`` (m, k) of test points x_s (m, d) of the running
    batch with its observations, given ``wk = k(x, Z) W1^T`` (m, n)."""
    return (
        _rbf(x_s, state.running_x, state.lengthscales, state.outputscale)
        - wk @ state.running_cross
        + _batch_matrix(state, x_s, state.running_x)
    )


def _with_running(state: _State, run_x: FloatArray, run_y: FloatArray) -> _State:
    """The state conditioned on running-batch observations run_x (k, d), run_y (k,) (scaled
    units); k = 0 clears them. See the module docstring for the formulas."""
    n, d = state.basis.shape
    if run_y.shape[0] == 0:
        return dataclasses.replace(
            state,
            running_x=np.zeros((0, d)),
            running_y=np.zeros(0),
            running_alpha=np.zeros(0),
            running_factor=np.zeros((0, 0)),
            running_cross=np.zeros((n, 0)),
        )
    if state.w2.size:
        raise ModelError("running-batch observations need the exact GP (sparse=False)")
    k_zo = _rbf(state.basis, run_x, state.lengthscales, state.outputscale)  # (n, k)
    cross = state.w1 @ k_zo
    cov = _rbf(run_x, run_x, state.lengthscales, state.outputscale) - cross.T @ cross
    cov = 0.5 * (cov + cov.T) + _batch_matrix(state, run_x, run_x)
    cov[np.diag_indices_from(cov)] += state.noise
    chol = _cholesky(cov, "the running-batch covariance S + Kb + sigma2 I")
    alpha = scipy.linalg.cho_solve((chol, True), run_y - k_zo.T @ state.alpha)
    return dataclasses.replace(
        state,
        running_x=run_x.copy(),
        running_y=run_y.copy(),
        running_alpha=np.asarray(alpha, dtype=np.float64),
        running_factor=_tri_inverse(chol),
        running_cross=np.asarray(cross, dtype=np.float64),
    )


def _exact_state(
    *, basis: FloatArray, targets: FloatArray, batches: FloatArray, **common: Any
) -> _State:
    """Posterior of the exact GP on the window (basis (N, d), targets (N,), batch ids (N,)):
    ``K = k(Z, Z) + [same batch] Kb(Z, Z) + sigma2 I``."""
    k = _rbf(basis, basis, common["lengthscales"], common["outputscale"])
    if common.get("batch_variance", 0.0) > 0.0:
        same = batches[:, None] == batches[None, :]
        k += same * _batch_kernel(
            basis,
            basis,
            common["batch_variance"],
            common["batch_inv_lengthscale"],
            common["batch_column"],
        )
    k[np.diag_indices_from(k)] += common["noise"]
    chol = _cholesky(k, "the training kernel matrix K + sigma2 I")
    alpha = scipy.linalg.cho_solve((chol, True), targets)
    d = basis.shape[1]
    return _State(
        window_batches=np.asarray(batches, dtype=np.float64).copy(),
        running_x=np.zeros((0, d)),
        running_cross=np.zeros((basis.shape[0], 0)),
        basis=basis.copy(),
        window_targets=targets.copy(),
        stat_p=np.zeros((0, 0)),
        stat_b=np.zeros(0),
        alpha=np.asarray(alpha, dtype=np.float64),
        w1=_tri_inverse(chol),
        w2=np.zeros((0, 0)),
        jitter=0.0,
        **common,
    )


def _inducing_cholesky(
    basis: FloatArray, lengthscales: FloatArray, outputscale: float, jitter: float | None
) -> tuple[FloatArray, float]:
    """Lower Cholesky factor of K_uu (+ jitter I) for inducing points (M, d) and the jitter.

    ``jitter=None`` tries the ladder ``_JITTER_LADDER`` (fit); otherwise the given jitter is
    reused (update), so that K_uu and the fixed factor W1 stay exactly as fitted.
    """
    k_uu = _rbf(basis, basis, lengthscales, outputscale)
    ladder = _JITTER_LADDER if jitter is None else (jitter / outputscale,)
    for rel in ladder:
        try:
            chol = scipy.linalg.cholesky(k_uu + rel * outputscale * np.eye(len(k_uu)), lower=True)
        except np.linalg.LinAlgError:
            continue
        if rel > 0 and jitter is None:
            logger.warning(
                "inducing kernel matrix K_uu needed jitter %.1e x outputscale; consider fewer "
                "inducing points (n_inducing)",
                rel,
            )
        return np.asarray(chol, dtype=np.float64), rel * outputscale
    raise FitError(
        "the inducing kernel matrix K_uu is not positive definite even with jitter; the "
        "model was not changed - use fewer inducing points"
    )


def _whitened_statistics(
    lower: FloatArray,
    basis: FloatArray,
    x_s: FloatArray,
    y_s: FloatArray,
    lengthscales: FloatArray,
    outputscale: float,
) -> tuple[FloatArray, FloatArray]:
    """Contribution of observations (x_s (k, d), y_s (k,)) to the whitened sufficient
    statistics ``P = L^-1 K_uf K_fu L^-T`` (M, M) and ``b = L^-1 K_uf y_s`` (M,).

    Whitening each batch before squaring (R = L^-1 K_uf, P = R R^T) keeps the condition
    number of K_uu from being squared.
    """
    k_uf = _rbf(basis, x_s, lengthscales, outputscale)
    root = np.asarray(scipy.linalg.solve_triangular(lower, k_uf, lower=True), dtype=np.float64)
    return root @ root.T, root @ y_s


def _sparse_state(
    *,
    basis: FloatArray,
    lower: FloatArray,
    jitter: float,
    stat_p: FloatArray,
    stat_b: FloatArray,
    **common: Any,
) -> _State:
    """VFE posterior from inducing points (M, d), the Cholesky factor L of K_uu and the
    whitened sufficient statistics P (M, M) and b (M,) (see _whitened_statistics)."""
    noise = common["noise"]
    b_mat = np.eye(len(lower)) + (stat_p + stat_p.T) / (2.0 * noise)
    chol_b = _cholesky(b_mat, "the sparse posterior matrix I + L^-1 K_uf K_fu L^-T / sigma2")
    c = scipy.linalg.solve_triangular(chol_b, stat_b, lower=True) / noise
    t = scipy.linalg.solve_triangular(chol_b, c, lower=True, trans="T")
    alpha = scipy.linalg.solve_triangular(lower, t, lower=True, trans="T")
    w1 = _tri_inverse(lower)
    w2 = np.asarray(scipy.linalg.solve_triangular(chol_b, w1, lower=True), dtype=np.float64)
    return _State(
        running_x=np.zeros((0, basis.shape[1])),
        running_cross=np.zeros((basis.shape[0], 0)),
        basis=basis.copy(),
        window_targets=np.zeros(0),
        stat_p=stat_p,
        stat_b=stat_b,
        alpha=np.asarray(alpha, dtype=np.float64),
        w1=w1,
        w2=w2,
        jitter=float(jitter),
        **common,
    )


def _casadi_constants(state: _State, capacity: int | None = None) -> dict[str, FloatArray]:
    """Arrays of the CasADi graph, target units folded in: ``basis`` (d, n) in
    length-scale units, ``alpha`` (n, 1), ``variance_factor`` (n, n), ``w1`` (n, n), and the
    running batch's ``running_basis`` (d, K) in length-scale units, ``running_cross``
    (n, K) divided by y_scale, ``running_alpha`` (K, 1), ``running_factor`` (K, K): K = the
    k running observations, or ``capacity`` with zero-padded unused slots (whose zero
    weights switch them off)."""
    basis = (state.basis / state.lengthscales).T
    factor = state.w2 if state.w2.size else state.w1
    k = state.n_running
    size = k if capacity is None else capacity
    n, d = state.basis.shape
    run_basis = np.zeros((d, size))
    run_cross = np.zeros((n, size))
    run_alpha = np.zeros((size, 1))
    run_factor = np.zeros((size, size))
    if k:
        run_basis[:, :k] = (state.running_x / state.lengthscales).T
        run_cross[:, :k] = state.running_cross / state.y_scale
        run_alpha[:k, 0] = state.y_scale * state.running_alpha
        run_factor[:k, :k] = state.y_scale * state.running_factor
    return {
        "basis": np.ascontiguousarray(basis),
        "alpha": (state.y_scale * state.alpha)[:, None],
        "variance_factor": state.y_scale * factor,
        "w1": state.y_scale * state.w1,
        "running_basis": run_basis,
        "running_cross": run_cross,
        "running_alpha": run_alpha,
        "running_factor": run_factor,
    }


def _check_casadi_name(name: object) -> None:
    if (
        not isinstance(name, str)
        or not _CASADI_NAME.fullmatch(name)
        or name in ("null", "jac", "hess")
    ):
        raise ConfigError(
            f"CasADi function name {name!r} is not valid: use a letter followed by letters, "
            "digits or single underscores (not 'null', 'jac' or 'hess')"
        )


def _data_layout(n: int, d: int, capacity: int, sparse: bool) -> tuple[tuple[str, int], ...]:
    """Blocks of :meth:`GPResidual.casadi_data` for n basis points, d features and
    ``capacity`` running-batch slots (0: no batch effect)."""
    blocks = [("hyper", 2 * d + 6), ("basis", d * n), ("alpha", n), ("w1", n * (n + 1) // 2)]
    if sparse:
        blocks.append(("w2", n * (n + 1) // 2))
    if capacity:
        blocks += [
            ("running_basis", d * capacity),
            ("running_cross", n * capacity),
            ("running_alpha", capacity),
            ("running_factor", capacity * (capacity + 1) // 2),
        ]
    return tuple(blocks)


def _lower_dm(matrix: FloatArray) -> ca.DM:
    """Lower-triangular CasADi DM (sparse storage: half the multiplications)."""
    n = matrix.shape[0]
    return ca.DM(ca.Sparsity.lower(n), matrix.T[np.triu_indices(n)])


def _sha256(x_arr: FloatArray, y_arr: FloatArray, batch_ids: FloatArray | None = None) -> str:
    digest = hashlib.sha256()
    digest.update(f"{x_arr.shape}{y_arr.shape}".encode())
    digest.update(np.ascontiguousarray(x_arr, dtype=np.float64).tobytes())
    digest.update(np.ascontiguousarray(y_arr, dtype=np.float64).tobytes())
    if batch_ids is not None:  # the batch structure is part of the training data
        digest.update(np.ascontiguousarray(batch_ids, dtype=np.float64).tobytes())
    return digest.hexdigest()


def _package_versions() -> dict[str, str]:
    versions = {}
    for package in ("hmpc", "numpy", "scipy", "torch", "gpytorch", "casadi"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


def _read_residual_file(source: Path) -> tuple[dict[str, Any], dict[str, FloatArray]]:
    """Metadata dict and float64 arrays of a GP residual file; ConfigError if it is not one."""
    try:
        loaded = np.load(source, allow_pickle=False)
    except FileNotFoundError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise ConfigError(f"{source} is not a readable GP residual file ({exc})") from exc
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise ConfigError(f"{source} is not a GP residual file (not an .npz archive)")
    with loaded as npz:
        missing = sorted({"metadata", *_ARRAY_FIELDS_V1} - set(npz.files))
        if missing:
            raise ConfigError(f"{source} is not a GP residual file (missing entries {missing})")
        try:
            meta = json.loads(str(npz["metadata"][()]))
            present = [key for key in _ARRAY_FIELDS if key in npz.files]
            arrays = {key: np.asarray(npz[key], dtype=np.float64) for key in present}
        except (OSError, ValueError, TypeError, zipfile.BadZipFile) as exc:
            raise ConfigError(f"{source} is not a readable GP residual file ({exc})") from exc
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise ConfigError(f"{source} is not a GP residual file (format {_FORMAT!r} expected)")
    if meta.get("format_version") not in _READABLE_VERSIONS:
        raise ConfigError(
            f"{source} has GP residual format version {meta.get('format_version')!r}; this "
            f"hmpc reads versions {list(_READABLE_VERSIONS)}. Re-fit or convert the residual."
        )
    missing = sorted(set(_ARRAY_FIELDS) - set(arrays))
    if meta["format_version"] >= 2 and missing:
        raise ConfigError(f"{source} is not a GP residual file (missing entries {missing})")
    return meta, arrays


def _check_expected(
    source: Path,
    names: list[str],
    units: list[str],
    expected_features: Sequence[str] | None,
    expected_units: Sequence[str] | None,
) -> None:
    if expected_features is not None and list(expected_features) != names:
        missing = [n for n in expected_features if n not in names]
        extra = [n for n in names if n not in expected_features]
        detail = []
        if missing:
            detail.append(f"missing {missing}")
        if extra:
            detail.append(f"unexpected {extra}")
        if not detail:
            detail.append("same names in another order")
        raise ConfigError(
            f"{source}: GP residual features differ ({'; '.join(detail)}): file has {names}, "
            f"expected {list(expected_features)}"
        )
    if expected_units is not None:
        expected = list(expected_units)
        reference = list(expected_features) if expected_features is not None else names
        if len(expected) != len(reference):
            raise ConfigError(
                f"{source}: expected_units gives {len(expected)} units for {len(reference)} "
                f"features {reference}"
            )
        differing = [
            f"{name!r}: file {have!r}, expected {want!r}"
            for name, have, want in zip(names, units, expected, strict=True)
            if have != want
        ]
        if differing:
            raise ConfigError(
                f"{source}: GP residual feature units differ ({'; '.join(differing)})"
            )

"""Reusable conformance cases for GP residuals (:class:`plant_models.gp.GPResidual`).

The reference is built *independently* of gp.py's posterior code: a plain GPyTorch model
(ExactGP, or SGPR = ExactGP with an InducingPointKernel) carrying the fitted
hyperparameters and scaling, evaluated with exact Cholesky settings. Any residual model
that exposes the same fitted attributes can be checked with :func:`check_conformance`.

Sparse reference: GPyTorch's SGPR prediction with ``sgpr_diagonal_correction(False)`` is the
VFE mean with the subset-of-regressors variance ``k*u Sigma ku*``; adding the GPyTorch
kernel terms ``k** - Q**`` gives the Titsias/DTC variance that gp.py uses. (GPyTorch's
default, with the diagonal correction, is the FITC predictive, which does not match the
VFE training bound.)

Batch effect reference: the per-batch term is built from GPyTorch primitives, not from
gp.py's kernel: ``ScaleKernel(RBFKernel)`` on the batch-id column with a length scale of
1e-3 (ids differ by at least 1, so this is exactly the same-batch indicator in float64)
times, for a drift, an ``RBFKernel`` on the batch feature. The reference is a plain
ExactGP conditioned on the historical data *and* the running batch's observations (one
more batch id) and evaluated at test points of the running batch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import casadi as ca
import numpy as np
import numpy.typing as npt

from plant_models.gp import GPResidual, exact_gpytorch_settings, import_gpytorch

torch, gpytorch = import_gpytorch()

FloatArray = npt.NDArray[np.float64]
Reference = Callable[[Any], tuple[Any, Any]]


def _batch_covariance(model: GPResidual) -> Any:
    """GPyTorch kernel of the batch effect on inputs (features..., batch id), from
    primitives (see the module docstring)."""
    d = model.n_features
    indicator = gpytorch.kernels.RBFKernel(active_dims=(d,)).double()
    indicator.lengthscale = torch.tensor([[1e-3]], dtype=torch.float64)
    same = gpytorch.kernels.ScaleKernel(indicator).double()
    same.outputscale = torch.tensor(model.batch_variance_, dtype=torch.float64)
    if model.batch_effect == "offset":
        return same
    column = model.feature_names.index(str(model.batch_feature))
    drift = gpytorch.kernels.RBFKernel(active_dims=(column,)).double()
    drift.lengthscale = torch.tensor([[model.batch_lengthscale_]], dtype=torch.float64)
    return same * drift


def gpytorch_reference(
    model: GPResidual,
    X: FloatArray,
    y: FloatArray,
    batches: npt.NDArray[np.int64] | None = None,
    X_run: FloatArray | None = None,
    y_run: FloatArray | None = None,
) -> Reference:
    """GPyTorch predictor equal in theory to ``model`` conditioned on (X, y).

    Args:
        model: a fitted GPResidual (its scaling, hyperparameters and, if sparse, inducing
            points are used; its posterior arrays are not).
        X: conditioning features, shape (n, d), feature units.
        y: conditioning targets, shape (n,), target units.
        batches: with a batch effect, integer batch id 0.. of each row of X, shape (n,).
        X_run, y_run: with a batch effect, the running batch's observations (k, d), (k,)
            (may be empty); test points belong to the running batch.

    Returns:
        ``ref(x)`` mapping a float64 torch tensor (m, d) in feature units to
        ``(mean, latent variance)`` torch tensors (m,) in target units, differentiable.
    """
    x_mean = torch.as_tensor(model.x_mean_)
    x_scale = torch.as_tensor(model.x_scale_)
    y_mean, y_scale = model.y_mean_, model.y_scale_
    x_s = (torch.as_tensor(X, dtype=torch.float64) - x_mean) / x_scale
    y_s = (torch.as_tensor(y, dtype=torch.float64) - y_mean) / y_scale
    run_id = None
    if model.has_batch_effect:
        if batches is None:
            raise ValueError("a batch-effect model needs the batch ids of X")
        run_id = int(np.max(batches)) + 1
        ids = torch.as_tensor(np.asarray(batches, dtype=np.float64))[:, None]
        x_s = torch.cat([x_s, ids], 1)
        if X_run is not None and y_run is not None and len(y_run):
            xr = (torch.as_tensor(X_run, dtype=torch.float64) - x_mean) / x_scale
            xr = torch.cat([xr, torch.full((xr.shape[0], 1), float(run_id))], 1)
            x_s = torch.cat([x_s, xr], 0)
            yr = (torch.as_tensor(y_run, dtype=torch.float64) - y_mean) / y_scale
            y_s = torch.cat([y_s, yr])
    likelihood = gpytorch.likelihoods.GaussianLikelihood(
        noise_constraint=gpytorch.constraints.GreaterThan(model.noise_floor)
    ).double()
    d = model.n_features
    base = gpytorch.kernels.ScaleKernel(
        gpytorch.kernels.RBFKernel(
            ard_num_dims=d, active_dims=tuple(range(d)) if run_id is not None else None
        )
    ).double()
    base.base_kernel.lengthscale = torch.as_tensor(model.lengthscales_)[None, :]
    base.outputscale = torch.tensor(model.outputscale_, dtype=torch.float64)
    likelihood.noise = torch.tensor([model.noise_], dtype=torch.float64)
    if model.sparse:
        covar = gpytorch.kernels.InducingPointKernel(
            base, inducing_points=torch.as_tensor(model.basis_), likelihood=likelihood
        ).double()
    elif run_id is not None:
        covar = base + _batch_covariance(model)
    else:
        covar = base

    class Reference(gpytorch.models.ExactGP):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__(x_s, y_s, likelihood)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = covar

        def forward(self, x: Any) -> Any:
            return gpytorch.distributions.MultivariateNormal(
                self.mean_module(x), self.covar_module(x)
            )

    gp = Reference().double()
    gp.eval()
    likelihood.eval()

    def predict(x: Any) -> tuple[Any, Any]:
        xs = (x - x_mean) / x_scale
        if run_id is not None:
            xs = torch.cat([xs, torch.full((xs.shape[0], 1), float(run_id))], 1)
        with exact_gpytorch_settings(), gpytorch.settings.sgpr_diagonal_correction(False):
            out = gp(xs)
            # The diagonal of the lazy covariance, not ``out.variance``, which clamps small
            # values (and warns) - we compare unclamped numbers.
            var_s = out.lazy_covariance_matrix.diagonal(dim1=-1, dim2=-2)
            if model.sparse:
                var_s = var_s + base(xs, diag=True) - covar(xs, diag=True)
        return y_mean + y_scale * out.mean, y_scale**2 * var_s

    return predict


#: Relative tolerances of the conformance checks (values, Jacobians).
RTOL_VALUE = 1e-8
RTOL_JACOBIAN = 1e-6
#: Absolute floors, as fractions of the natural scale: ``y_scale`` for the mean and the
#: prior variance ``y_scale^2 * outputscale`` for the variance (divided by ``x_scale`` for
#: Jacobians). Every implementation computes the variance as the prior minus the explained
#: variance, so its round-off scales with the prior, not with the (possibly much smaller)
#: posterior variance; GPyTorch's SGPR Woodbury form loses most (about 1e-10 of the prior on
#: the test problems), so 1e-9 x prior is the floor.
ATOL_MEAN = 1e-10
ATOL_VARIANCE = 1e-9


@dataclasses.dataclass(frozen=True)
class Comparison:
    """Errors of one quantity: ``ratio`` = max |a - b| / (rtol |b| + atol), which must be
    <= 1 to pass; ``max_rel`` = max |a - b| / |b| over entries above the floor."""

    ratio: float
    max_rel: float
    max_abs: float

    @classmethod
    def of(cls, a: FloatArray, b: FloatArray, rtol: float, atol: FloatArray | float) -> Comparison:
        err = np.abs(a - b)
        atol_arr = np.broadcast_to(np.asarray(atol, dtype=np.float64), b.shape)
        above = np.abs(b) > atol_arr / rtol
        max_rel = float(np.max(err[above] / np.abs(b[above]))) if above.any() else 0.0
        return cls(
            ratio=float(np.max(err / (rtol * np.abs(b) + atol_arr))),
            max_rel=max_rel,
            max_abs=float(np.max(err)),
        )


@dataclasses.dataclass(frozen=True)
class Agreement:
    """CasADi export and ``predict`` versus the GPyTorch reference."""

    mean: Comparison
    variance: Comparison
    jacobian_mean: Comparison
    jacobian_variance: Comparison
    predict_mean: Comparison
    predict_variance: Comparison

    def failures(self) -> list[str]:
        """Names of the comparisons whose ratio exceeds 1 (empty when conformant)."""
        return [
            f"{field.name}: {getattr(self, field.name)}"
            for field in dataclasses.fields(self)
            if not getattr(self, field.name).ratio <= 1.0
        ]


def casadi_values(
    function: ca.Function, X: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Mean, variance (m,) and their Jacobians (m, d) of ``to_casadi()``'s function, via
    CasADi's own algorithmic differentiation on an SX argument."""
    d = X.shape[1]
    x = ca.SX.sym("x", d)
    out = function(features=x)
    jac = ca.Function(
        "reference_jacobians",
        [x],
        [
            out["mean"],
            out["variance"],
            ca.jacobian(out["mean"], x),
            ca.jacobian(out["variance"], x),
        ],
    )
    rows = [[np.asarray(v, dtype=np.float64).ravel() for v in jac(point)] for point in X]
    return (
        np.array([r[0][0] for r in rows]),
        np.array([r[1][0] for r in rows]),
        np.array([r[2] for r in rows]),
        np.array([r[3] for r in rows]),
    )


def reference_values(
    reference: Reference, X: FloatArray
) -> tuple[FloatArray, FloatArray, FloatArray, FloatArray]:
    """Mean, variance (m,) and Jacobians (m, d) of the GPyTorch reference (torch autograd;
    each output depends only on its own row, so the gradient of the sum gives all rows)."""
    x = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    mean, var = reference(x)
    (jac_mean,) = torch.autograd.grad(mean.sum(), x, retain_graph=True)
    (jac_var,) = torch.autograd.grad(var.sum(), x)
    return (
        mean.detach().numpy(),
        var.detach().numpy(),
        jac_mean.numpy(),
        jac_var.numpy(),
    )


def check_conformance(
    model: GPResidual,
    X_cond: FloatArray,
    y_cond: FloatArray,
    X_test: FloatArray,
    batches: npt.NDArray[np.int64] | None = None,
    X_run: FloatArray | None = None,
    y_run: FloatArray | None = None,
    *,
    parametric: bool = False,
) -> Agreement:
    """Compare ``model.to_casadi()`` (values and CasADi Jacobians) and ``model.predict`` with
    the GPyTorch reference conditioned on (X_cond, y_cond) (and, with a batch effect, on the
    running batch's (X_run, y_run), ``batches`` giving the ids of X_cond), at X_test (m, d).
    ``parametric=True`` checks ``to_casadi(parametric=True)`` fed ``casadi_parameters()``."""
    reference = gpytorch_reference(model, X_cond, y_cond, batches, X_run, y_run)
    r_mean, r_var, r_jm, r_jv = reference_values(reference, X_test)
    if parametric:
        values = model.casadi_parameters()
        inner = model.to_casadi("parametric_residual", parametric=True)
        x = ca.MX.sym("features", model.n_features)
        out = inner(features=x, **{key: ca.DM(value) for key, value in values.items()})
        function = ca.Function(
            "bound_residual",
            [x],
            [out["mean"], out["variance"]],
            ["features"],
            ["mean", "variance"],
        )
    else:
        function = model.to_casadi()
    c_mean, c_var, c_jm, c_jv = casadi_values(function, X_test)
    p_mean, p_var = model.predict(X_test)
    mean_atol = ATOL_MEAN * model.y_scale_
    prior = model.outputscale_ + (model.batch_variance_ if model.has_batch_effect else 0.0)
    var_atol = ATOL_VARIANCE * model.y_scale_**2 * prior
    per_feature = 1.0 / model.x_scale_[None, :]
    return Agreement(
        mean=Comparison.of(c_mean, r_mean, RTOL_VALUE, mean_atol),
        variance=Comparison.of(c_var, r_var, RTOL_VALUE, var_atol),
        jacobian_mean=Comparison.of(c_jm, r_jm, RTOL_JACOBIAN, mean_atol * per_feature),
        jacobian_variance=Comparison.of(c_jv, r_jv, RTOL_JACOBIAN, var_atol * per_feature),
        predict_mean=Comparison.of(p_mean, r_mean, RTOL_VALUE, mean_atol),
        predict_variance=Comparison.of(p_var, r_var, RTOL_VALUE, var_atol),
    )

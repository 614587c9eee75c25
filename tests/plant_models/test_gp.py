"""GPResidual: conformance of predict/CasADi with GPyTorch, learning, update, persistence."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import casadi as ca
import numpy as np
import numpy.typing as npt
import pytest
from gp_conformance import check_conformance

from plant_models.errors import ConfigError, FitError, ModelError
from plant_models.gp import GPResidual

FloatArray = npt.NDArray[np.float64]
Fitted = tuple[GPResidual, FloatArray, FloatArray]  # (model, X, y)

FEATURES = ["glucose", "lactate"]
UNITS = ["g/L", "g/L"]
# Moderate sizes keep the file fast; the sparse case has many more points than inducing ones.
SIZES = {"exact": (80, 40), "sparse": (600, 40)}  # (N observations, n_inducing)


def truth(X: FloatArray) -> FloatArray:
    """Known residual, shape (n,), of features (n, 2) around glucose 3 g/L, lactate 1 g/L."""
    return np.sin(2.0 * (X[:, 0] - 3.0)) + 0.3 * (X[:, 1] - 1.0) ** 2


def make_data(n: int, seed: int) -> tuple[FloatArray, FloatArray]:
    rng = np.random.default_rng(seed)
    X = np.column_stack([rng.uniform(1.0, 5.0, n), rng.uniform(-1.0, 3.0, n)])
    return X, truth(X) + 0.05 * rng.standard_normal(n)


def probe_points(seed: int) -> FloatArray:
    """20 points inside the training box and 10 outside it (up to 3 box half-widths away)."""
    rng = np.random.default_rng(seed)
    inside = np.column_stack([rng.uniform(1.0, 5.0, 20), rng.uniform(-1.0, 3.0, 20)])
    offset = rng.uniform(2.5, 6.0, (10, 2)) * rng.choice([-1.0, 1.0], (10, 2))
    return np.vstack([inside, np.array([3.0, 1.0]) + offset])


@pytest.fixture(scope="module", params=["exact", "sparse"])
def fitted(request: pytest.FixtureRequest) -> Fitted:
    """(model, X, y), fitted once per variant; tests that change the model deep-copy it."""
    n, n_inducing = SIZES[request.param]
    X, y = make_data(n, seed=1)
    model = GPResidual(
        FEATURES,
        UNITS,
        "growth_rate_residual",
        "1/h",
        sparse=request.param == "sparse",
        n_inducing=n_inducing,
    ).fit(X, y)
    return model, X, y


# ---------------------------------------------------------------------- conformance
def test_casadi_and_predict_match_gpytorch(fitted: Fitted) -> None:
    model, X, y = fitted
    agreement = check_conformance(model, X, y, probe_points(seed=2))
    assert agreement.failures() == []


def test_update_equals_gpytorch_conditioned_on_all_data(
    fitted: Fitted,
) -> None:
    model, X, y = fitted
    X_new, y_new = make_data(12, seed=3)
    updated = copy.deepcopy(model).update(X_new[:5], y_new[:5]).update(X_new[5:], y_new[5:])
    X_all, y_all = np.vstack([X, X_new]), np.concatenate([y, y_new])
    if not model.sparse:  # sliding window: the 12 oldest observations were dropped
        X_all, y_all = X_all[12:], y_all[12:]
    agreement = check_conformance(updated, X_all, y_all, probe_points(seed=4))
    assert agreement.failures() == []
    assert updated.n_observations_ == X.shape[0] + 12


def test_casadi_function_accepts_sx_mx_and_numbers(
    fitted: Fitted,
) -> None:
    model, _, _ = fitted
    points = probe_points(seed=5)[:6]
    function = model.to_casadi()
    assert function.name_in() == ["features"]
    assert function.name_out() == ["mean", "variance"]
    assert function.size_in(0) == (2, 1)
    mean_only = model.to_casadi("gp_mean", variance=False)
    assert mean_only.name_out() == ["mean"]
    noisy = model.to_casadi("gp_noisy", include_noise=True)
    sx = ca.SX.sym("x", 2)
    mx = ca.MX.sym("x", 2)
    via_sx = ca.Function("via_sx", [sx], function.call([sx]))
    via_mx = ca.Function("via_mx", [mx], function.call([mx]))
    assert isinstance(function(sx)[0], ca.SX)
    assert isinstance(function(mx)[0], ca.MX)
    mean, var = model.predict(points)
    # Different evaluation orders (SX, MX, numpy) differ by round-off only. The mean sums
    # alpha_i k_i with alpha of either sign; the variance is the prior minus the explained
    # variance, so its round-off scales with the prior.
    mean_atol = 1e-12 * model.y_scale_
    var_atol = 1e-12 * model.outputscale_ * model.y_scale_**2
    for i, point in enumerate(points):
        out = function(features=point)
        for f in (via_sx, via_mx):
            m_i, v_i = (float(v) for v in f(point))
            assert m_i == pytest.approx(float(out["mean"]), rel=1e-11, abs=mean_atol)
            assert v_i == pytest.approx(float(out["variance"]), rel=1e-12, abs=var_atol)
        assert float(mean_only(point)) == pytest.approx(float(out["mean"]), rel=1e-13)
        assert float(noisy(point)[1]) == pytest.approx(
            float(out["variance"]) + model.noise_variance_, rel=1e-12
        )
        assert float(out["mean"]) == pytest.approx(mean[i], rel=1e-11, abs=mean_atol)
        assert float(out["variance"]) == pytest.approx(var[i], rel=1e-10, abs=var_atol)
    _, noisy_var = model.predict(points, include_noise=True)
    np.testing.assert_allclose(noisy_var, var + model.noise_variance_, rtol=1e-14)


def test_parametric_export_matches_and_keeps_shapes(
    fitted: Fitted,
) -> None:
    model = copy.deepcopy(fitted[0])
    points = probe_points(seed=6)[:5]
    parametric = model.to_casadi("gp_param", parametric=True)
    params = model.casadi_parameters()
    assert parametric.name_in() == ["features", *params]
    shapes = {key: value.shape for key, value in params.items()}
    X_new, y_new = make_data(7, seed=7)
    model.update(X_new, y_new)
    new_params = model.casadi_parameters()
    assert {key: value.shape for key, value in new_params.items()} == shapes
    mean, var = model.predict(points)
    mean_atol = 1e-12 * model.y_scale_
    var_atol = 1e-12 * model.outputscale_ * model.y_scale_**2
    for i, point in enumerate(points):
        out = parametric(features=point, **new_params)
        assert float(out["mean"]) == pytest.approx(mean[i], rel=1e-11, abs=mean_atol)
        assert float(out["variance"]) == pytest.approx(var[i], rel=1e-10, abs=var_atol)


# ---------------------------------------------------------------------- learning behaviour
@pytest.mark.parametrize("sparse", [False, True], ids=["exact", "sparse"])
def test_recovers_known_one_dimensional_function(sparse: bool) -> None:
    rng = np.random.default_rng(11)
    x = rng.uniform(0.0, 2.0 * np.pi, 200 if sparse else 40)
    y = np.sin(x) + 0.02 * rng.standard_normal(x.size)
    model = GPResidual(["age"], ["h"], "r", "1/h", sparse=sparse, n_inducing=15)
    model.fit(x[:, None], y)
    grid = np.linspace(0.3, 2.0 * np.pi - 0.3, 50)
    mean, var = model.predict(grid[:, None])
    assert np.max(np.abs(mean - np.sin(grid))) < 0.03
    assert np.all(np.sqrt(var) < 0.05)
    assert np.sqrt(model.noise_variance_) == pytest.approx(0.02, rel=0.5)


def test_variance_grows_away_from_data(fitted: Fitted) -> None:
    model, X, _ = fitted
    prior = model.outputscale_ * model.y_scale_**2
    direction = np.array([1.0, 1.0]) / np.sqrt(2.0)
    distances = np.array([0.0, 1.0, 2.0, 4.0, 8.0, 30.0])
    points = np.array([5.0, 3.0]) + distances[:, None] * direction  # from the box corner out
    _, var = model.predict(points)
    assert np.all(np.diff(var) > 0.0)
    assert var[-1] == pytest.approx(prior, rel=1e-9)
    _, var_train = model.predict(X)
    assert np.median(var_train) < 0.05 * prior


def test_update_improves_prediction_near_new_points(
    fitted: Fitted,
) -> None:
    """A new patient whose residual is 0.5 higher around one operating point."""
    model, _, _ = fitted
    rng = np.random.default_rng(8)
    centre = np.array([[3.5, 1.5]])
    X_new = centre + rng.uniform(-0.3, 0.3, (15, 2))
    y_new = truth(X_new) + 0.5 + 0.05 * rng.standard_normal(15)
    target = truth(centre) + 0.5
    mean_before, var_before = model.predict(centre)
    size_before = _casadi_size(model)
    updated = copy.deepcopy(model).update(X_new, y_new)
    mean_after, var_after = updated.predict(centre)
    assert abs(mean_after[0] - target[0]) < 0.8 * abs(mean_before[0] - target[0])
    assert var_after[0] < var_before[0]
    assert updated.n_basis_ == model.n_basis_
    assert _casadi_size(updated) == size_before
    # scaling and hyperparameters are not re-fitted
    np.testing.assert_array_equal(updated.x_mean_, model.x_mean_)
    np.testing.assert_array_equal(updated.lengthscales_, model.lengthscales_)
    assert updated.noise_ == model.noise_
    # the fitted original is untouched by the update of its copy
    np.testing.assert_array_equal(model.predict(centre)[0], mean_before)


def _casadi_size(model: GPResidual) -> tuple[int, int, int, int]:
    function = model.to_casadi()
    return (
        function.n_nodes(),
        function.n_instructions(),
        len(function.serialize()),
        model.n_basis_,
    )


def test_sparse_basis_does_not_depend_on_number_of_observations() -> None:
    X, y = make_data(1500, seed=9)
    model = GPResidual(FEATURES, UNITS, "r", "1/h", sparse=True, n_inducing=30)
    model.fit(X, y)
    assert 0 < model.n_basis_ <= 30
    size = _casadi_size(model)
    for seed in range(3):
        X_new, y_new = make_data(200, seed=20 + seed)
        model.update(X_new, y_new)
    assert _casadi_size(model) == size
    assert model.n_observations_ == 2100


def test_fit_is_reproducible_with_the_same_seed() -> None:
    X, y = make_data(300, seed=10)
    settings = {"sparse": True, "n_inducing": 20, "training_iterations": 30, "seed": 3}
    first = GPResidual(FEATURES, UNITS, "r", "1/h", **settings).fit(X, y)
    second = GPResidual(FEATURES, UNITS, "r", "1/h", **settings).fit(X, y)
    np.testing.assert_array_equal(first.basis_, second.basis_)
    np.testing.assert_array_equal(first.lengthscales_, second.lengthscales_)
    assert first.training_data_sha256_ == second.training_data_sha256_


# ---------------------------------------------------------------------- failures
def test_failed_fit_rolls_back_to_previous_state(
    fitted: Fitted,
) -> None:
    model = copy.deepcopy(fitted[0])
    points = probe_points(seed=12)
    before = model.predict(points)
    lengthscales = model.lengthscales_
    X, y = make_data(60, seed=13)
    # A divergent optimiser: Adam with a huge step drives the kernel parameters to NaN.
    model.learning_rate = 1e3
    with pytest.raises(FitError, match="learning_rate"):
        model.fit(X, y)
    # Data that pass the finiteness checks but overflow when standardised.
    model.learning_rate = 0.05
    y_huge = y.copy()
    y_huge[:2] = [1e308, -1e308]
    with pytest.raises(FitError, match="overflow"):
        model.fit(X, y_huge)
    np.testing.assert_array_equal(model.predict(points)[0], before[0])
    np.testing.assert_array_equal(model.predict(points)[1], before[1])
    np.testing.assert_array_equal(model.lengthscales_, lengthscales)


def test_failed_first_fit_leaves_model_unfitted() -> None:
    X, y = make_data(40, seed=14)
    model = GPResidual(FEATURES, UNITS, "r", "1/h", learning_rate=1e3, training_iterations=20)
    with pytest.raises(FitError):
        model.fit(X, y)
    assert not model.is_fitted
    with pytest.raises(ModelError, match="not fitted"):
        model.predict(X)


@pytest.mark.parametrize(
    ("X", "y", "message"),
    [
        (np.ones((5, 3)), np.ones(5), r"shape \(n, 2\)"),
        (np.ones(5), np.ones(5), r"shape \(n, 2\)"),
        (np.ones((5, 2)), np.ones(4), r"shape \(5,\)"),
        (np.ones((5, 2)), np.ones((5, 1)), r"shape \(5,\)"),
        (np.array([[1.0, 2.0], [np.nan, 1.0], [2.0, 2.0]]), np.ones(3), "'glucose'"),
        (np.ones((3, 2)), np.array([1.0, np.inf, 2.0]), "NaN/inf"),
        (np.ones((1, 2)), np.ones(1), "at least 2"),
        ([["a", "b"], ["c", "d"]], [1.0, 2.0], "numeric"),
    ],
)
def test_bad_data_raise_model_error(X: object, y: object, message: str) -> None:
    model = GPResidual(FEATURES, UNITS, "r", "1/h", training_iterations=2)
    with pytest.raises(ModelError, match=message):
        model.fit(X, y)  # type: ignore[arg-type]
    assert not model.is_fitted


def test_bad_predict_and_update_inputs(fitted: Fitted) -> None:
    model = copy.deepcopy(fitted[0])
    with pytest.raises(ModelError, match="reshape"):
        model.predict(np.array([3.0, 1.0]))
    with pytest.raises(ModelError, match="NaN"):
        model.predict(np.array([[3.0, np.inf]]))
    with pytest.raises(ModelError, match="NaN"):
        model.update(np.array([[3.0, 1.0]]), np.array([np.nan]))
    with pytest.raises(ConfigError, match="not valid"):
        model.to_casadi("gp residual")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"kernel": "rbf_ard"}, "did you mean 'rbf-ard'"),
        ({"kernel": "matern"}, "not supported"),
        ({"noise_floor": 0.0}, "noise_floor"),
        ({"n_inducing": 0}, "n_inducing"),
        ({"training_iterations": -1}, "training_iterations"),
        ({"learning_rate": float("nan")}, "learning_rate"),
        ({"feature_units": ["g/L"]}, "one non-empty unit per feature"),
        ({"feature_names": ["glucose", "glucose"]}, "unique"),
        ({"target_unit": ""}, "target_unit"),
    ],
)
def test_bad_settings_raise_config_error(kwargs: dict[str, object], message: str) -> None:
    args: dict[str, object] = {
        "feature_names": FEATURES,
        "feature_units": UNITS,
        "target_name": "r",
        "target_unit": "1/h",
    }
    args.update(kwargs)
    with pytest.raises(ConfigError, match=message):
        GPResidual(**args)  # type: ignore[arg-type]


def test_exact_variant_refuses_more_than_max_points() -> None:
    X, y = make_data(30, seed=15)
    with pytest.raises(ConfigError, match="sparse=True"):
        GPResidual(FEATURES, UNITS, "r", "1/h", max_points=20).fit(X, y)


# ---------------------------------------------------------------------- persistence
def test_save_load_round_trip(fitted: Fitted, tmp_path: Path) -> None:
    model = fitted[0]
    path = model.save(tmp_path / "residual.npz")
    loaded = GPResidual.load(path, expected_features=FEATURES, expected_units=UNITS)
    points = probe_points(seed=16)
    for a, b in zip(model.predict(points), loaded.predict(points), strict=True):
        np.testing.assert_array_equal(a, b)
    f_model, f_loaded = model.to_casadi(), loaded.to_casadi()
    for point in points[:5]:
        assert float(f_loaded(point)[1]) == float(f_model(point)[1])
    assert loaded.sparse == model.sparse
    assert loaded.target_name == "growth_rate_residual" and loaded.target_unit == "1/h"
    # updates continue identically after a round trip
    X_new, y_new = make_data(6, seed=17)
    a = copy.deepcopy(model).update(X_new, y_new).predict(points)
    b = loaded.update(X_new, y_new).predict(points)
    np.testing.assert_allclose(a[0], b[0], rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(a[1], b[1], rtol=1e-11, atol=1e-15)


def test_saved_metadata(fitted: Fitted, tmp_path: Path) -> None:
    model, X, y = fitted
    path = model.save(tmp_path / "residual.npz")
    with np.load(path, allow_pickle=False) as npz:
        meta = json.loads(str(npz["metadata"][()]))
        assert npz["basis"].shape == (model.n_basis_, 2)
    assert meta["feature_names"] == FEATURES
    assert meta["feature_units"] == UNITS
    assert meta["target_name"] == "growth_rate_residual"
    assert meta["target_unit"] == "1/h"
    assert meta["sparse"] is model.sparse
    assert meta["training_data_sha256"] == model.training_data_sha256_
    assert len(meta["training_data_sha256"]) == 64
    assert set(meta["versions"]) >= {"hmpc", "numpy", "torch", "gpytorch", "casadi"}
    assert meta["created"].endswith("+00:00")
    assert model.metadata()["n_basis"] == model.n_basis_
    with pytest.raises(ConfigError, match=r"\.npz"):
        model.save(tmp_path / "residual.json")
    other = GPResidual(FEATURES, UNITS, "r", "1/h", training_iterations=2)
    assert other.fit(X, y).training_data_sha256_ == model.training_data_sha256_
    assert other.fit(X, y + 1e-9).training_data_sha256_ != model.training_data_sha256_


def test_load_with_other_features_or_units_raises(fitted: Fitted, tmp_path: Path) -> None:
    path = fitted[0].save(tmp_path / "residual.npz")
    with pytest.raises(ConfigError, match=r"missing \['ammonia'\]; unexpected \['lactate'\]"):
        GPResidual.load(path, expected_features=["glucose", "ammonia"])
    with pytest.raises(ConfigError, match="another order"):
        GPResidual.load(path, expected_features=["lactate", "glucose"])
    with pytest.raises(ConfigError, match="'lactate': file 'g/L', expected 'mmol/L'"):
        GPResidual.load(path, expected_features=FEATURES, expected_units=["g/L", "mmol/L"])


def test_load_rejects_files_that_are_not_residuals(tmp_path: Path) -> None:
    other_npz = tmp_path / "other.npz"
    np.savez(other_npz, values=np.arange(3.0))
    with pytest.raises(ConfigError, match="not a GP residual file"):
        GPResidual.load(other_npz)
    text = tmp_path / "notes.npz"
    text.write_text("not an archive")
    with pytest.raises(ConfigError, match="not a readable GP residual file"):
        GPResidual.load(text)
    npy = tmp_path / "array.npy"
    np.save(npy, np.arange(3.0))
    with pytest.raises(ConfigError, match=r"not an \.npz archive"):
        GPResidual.load(npy)
    with pytest.raises(FileNotFoundError):
        GPResidual.load(tmp_path / "missing.npz")


# ---------------------------------------------------------------------- batch effect
BATCH_FEATURES = ["glucose", "culture_age"]
BATCH_UNITS = ["mM", "h"]


def batch_data(
    n_batches: int, per_batch: int, seed: int, offset_sd: float = 0.5
) -> tuple[FloatArray, FloatArray, npt.NDArray[np.int64]]:
    """Batches sharing sin(glucose) plus a per-batch offset and a slow per-batch drift in
    culture age; rows in batch order, culture age increasing within a batch."""
    rng = np.random.default_rng(seed)
    xs, ys, ids = [], [], []
    for b in range(n_batches):
        age = np.sort(rng.uniform(0.0, 120.0, per_batch))
        glucose = rng.uniform(0.0, 5.0, per_batch)
        effect = rng.normal(0.0, offset_sd) + rng.normal(0.0, 0.2) * np.sin(age / 25.0)
        xs.append(np.column_stack([glucose, age]))
        ys.append(np.sin(glucose) + effect + 0.03 * rng.standard_normal(per_batch))
        ids.append(np.full(per_batch, b))
    return np.vstack(xs), np.concatenate(ys), np.concatenate(ids)


@pytest.fixture(scope="module", params=["offset", "drift"])
def batch_fitted(
    request: pytest.FixtureRequest,
) -> tuple[GPResidual, FloatArray, FloatArray, npt.NDArray[np.int64]]:
    X, y, ids = batch_data(8, 12, seed=21)
    model = GPResidual(
        BATCH_FEATURES,
        BATCH_UNITS,
        "growth_rate_residual",
        "1/h",
        batch_effect=request.param,
        batch_feature="culture_age" if request.param == "drift" else None,
        batch_capacity=6,
        training_iterations=150,
    ).fit(X, y, batches=[f"batch-{i}" for i in ids])
    return model, X, y, ids


def batch_probe_points(seed: int) -> FloatArray:
    rng = np.random.default_rng(seed)
    inside = np.column_stack([rng.uniform(0.0, 5.0, 12), rng.uniform(0.0, 120.0, 12)])
    outside = np.column_stack([rng.uniform(-6.0, 11.0, 6), rng.uniform(-150.0, 300.0, 6)])
    return np.vstack([inside, outside])


def test_batch_hyperparameters_are_learned(batch_fitted) -> None:  # type: ignore[no-untyped-def]
    model = batch_fitted[0]
    # offsets of sd 0.5 against a target sd of about 0.8: a clear share of the variance
    assert 0.05 < model.batch_variance_ < 2.0
    if model.batch_effect == "offset":
        assert model.batch_lengthscale_ == math.inf
    else:
        assert 0.0 < model.batch_lengthscale_ < math.inf


@pytest.mark.parametrize("n_running", [0, 4, 9], ids=["new-batch", "running", "over-capacity"])
@pytest.mark.parametrize("parametric", [False, True], ids=["constants", "parametric"])
def test_batch_effect_conformance_with_gpytorch(
    batch_fitted, n_running: int, parametric: bool
) -> None:  # type: ignore[no-untyped-def]
    model, X, y, ids = batch_fitted
    model = copy.deepcopy(model)
    X_run, y_run, _ = batch_data(1, 9, seed=22, offset_sd=0.8)
    for i in range(0, n_running, 3):  # observed in chunks, as windows close
        model.observe(X_run[i : min(i + 3, n_running)], y_run[i : min(i + 3, n_running)])
    kept = slice(max(0, n_running - model.batch_capacity), n_running)
    assert model.n_running_ == min(n_running, model.batch_capacity)
    agreement = check_conformance(
        model,
        X,
        y,
        batch_probe_points(23),
        ids,
        X_run[kept],
        y_run[kept],
        parametric=parametric,
    )
    assert agreement.failures() == []


def test_running_batch_observations_teach_the_offset(batch_fitted) -> None:  # type: ignore[no-untyped-def]
    model = copy.deepcopy(batch_fitted[0])
    rng = np.random.default_rng(24)
    age = np.linspace(0.0, 110.0, 12)
    glucose = rng.uniform(0.0, 5.0, 12)
    X_new = np.column_stack([glucose, age])
    y_new = np.sin(glucose) + 1.2 + 0.03 * rng.standard_normal(12)  # a strong offset
    mean0, var0 = model.predict(X_new[6:])
    # a new batch: the prior variance of the effect is in the band
    assert np.all(var0 > model.batch_variance_ * model.y_scale_**2 * 0.9)
    model.observe(X_new[:6], y_new[:6])
    mean1, var1 = model.predict(X_new[6:])
    err0 = np.abs(mean0 - y_new[6:]).mean()
    err1 = np.abs(mean1 - y_new[6:]).mean()
    assert err1 < 0.35 * err0
    assert np.all(var1 < var0)
    # honest: the held-back points lie inside the 95 % band (latent + noise)
    _, noisy = model.predict(X_new[6:], include_noise=True)
    assert np.all(np.abs(mean1 - y_new[6:]) < 1.96 * np.sqrt(noisy) + 0.05)
    model.begin_batch()
    np.testing.assert_allclose(model.predict(X_new[6:])[0], mean0, rtol=1e-12)
    assert model.n_running_ == 0


def test_observe_keeps_capacity_and_parametric_shapes(batch_fitted) -> None:  # type: ignore[no-untyped-def]
    model = copy.deepcopy(batch_fitted[0])
    params = model.casadi_parameters()
    shapes = {key: value.shape for key, value in params.items()}
    assert shapes["running_alpha"] == (model.batch_capacity, 1)
    X_run, y_run, _ = batch_data(1, 20, seed=25)
    for i in range(20):
        model.observe(X_run[i : i + 1], y_run[i : i + 1])
        assert model.n_running_ == min(i + 1, model.batch_capacity)
        assert {k: v.shape for k, v in model.casadi_parameters().items()} == shapes
    # the kept observations are the most recent ones
    ref = copy.deepcopy(batch_fitted[0]).observe(X_run[-model.batch_capacity :], y_run[-6:])
    points = batch_probe_points(26)
    np.testing.assert_allclose(model.predict(points)[0], ref.predict(points)[0], rtol=1e-10)


def test_predict_covariance_is_consistent(batch_fitted) -> None:  # type: ignore[no-untyped-def]
    model = copy.deepcopy(batch_fitted[0])
    X_run, y_run, _ = batch_data(1, 5, seed=27)
    model.observe(X_run, y_run)
    points = batch_probe_points(28)
    mean, var = model.predict(points)
    mean_c, cov = model.predict_covariance(points)
    np.testing.assert_allclose(mean_c, mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(np.diag(cov), var, rtol=1e-9, atol=1e-12 * model.y_scale_**2)
    assert np.linalg.eigvalsh(cov).min() > -1e-9 * np.abs(cov).max()
    # points of the same batch close in culture age are correlated through the effect
    same = model.predict_covariance(np.array([[2.0, 50.0], [4.0, 52.0]]))[1]
    assert same[0, 1] > 0.0


def test_update_with_batch_effect_adds_a_finished_batch(batch_fitted) -> None:  # type: ignore[no-untyped-def]
    model, X, y, ids = batch_fitted
    model = copy.deepcopy(model)
    X_run, y_run, _ = batch_data(1, 4, seed=29)
    model.observe(X_run, y_run)
    X_new, y_new, _ = batch_data(1, 7, seed=30)
    model.update(X_new, y_new)
    assert model.n_running_ == 4  # the running batch is kept and re-conditioned
    X_all = np.vstack([X, X_new])[7:]
    y_all = np.concatenate([y, y_new])[7:]
    ids_all = np.concatenate([ids, np.full(7, ids.max() + 1)])[7:]
    agreement = check_conformance(
        model, X_all, y_all, batch_probe_points(31), ids_all, X_run, y_run
    )
    assert agreement.failures() == []


def test_batch_effect_save_load_round_trip(batch_fitted, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model = copy.deepcopy(batch_fitted[0])
    X_run, y_run, _ = batch_data(1, 3, seed=32)
    model.observe(X_run, y_run)
    path = model.save(tmp_path / "batch.npz")
    loaded = GPResidual.load(path, expected_features=BATCH_FEATURES, expected_units=BATCH_UNITS)
    assert loaded.batch_effect == model.batch_effect
    assert loaded.batch_feature == model.batch_feature
    assert loaded.batch_capacity == model.batch_capacity
    assert loaded.batch_variance_ == model.batch_variance_
    assert loaded.n_running_ == 3
    points = batch_probe_points(33)
    for a, b in zip(loaded.predict(points), model.predict(points), strict=True):
        np.testing.assert_array_equal(a, b)
    meta = loaded.metadata()
    assert meta["batch_effect"] == model.batch_effect and meta["n_running"] == 3


def test_version_one_files_still_load(fitted: Fitted, tmp_path: Path) -> None:
    model = fitted[0]
    path = model.save(tmp_path / "v2.npz")
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    meta = json.loads(str(arrays["metadata"][()]))
    meta["format_version"] = 1
    for key in ("batch_effect", "batch_feature", "batch_capacity"):
        del meta["settings"][key]
    arrays["metadata"] = np.array(json.dumps(meta))
    for key in ("window_batches", "running_x", "running_y", "batch_variance"):
        del arrays[key]
    del arrays["batch_inv_lengthscale"]
    old = tmp_path / "v1.npz"
    np.savez(old, allow_pickle=False, **arrays)
    loaded = GPResidual.load(old)
    points = probe_points(34)
    np.testing.assert_array_equal(loaded.predict(points)[0], model.predict(points)[0])
    assert not loaded.has_batch_effect


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"batch_effect": "ofset"}, "did you mean 'offset'"),
        ({"batch_effect": "drift"}, "needs batch_feature"),
        ({"batch_effect": "drift", "batch_feature": "ph"}, "needs batch_feature"),
        ({"batch_effect": "offset", "batch_feature": "culture_age"}, "only used with"),
        ({"batch_effect": "offset", "sparse": True}, "exact GP"),
        ({"batch_effect": "offset", "batch_capacity": 0}, "batch_capacity"),
    ],
)
def test_bad_batch_settings(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        GPResidual(BATCH_FEATURES, BATCH_UNITS, "r", "1/h", **kwargs)  # type: ignore[arg-type]


def test_batch_effect_needs_batches_and_observe_needs_batch_effect(fitted: Fitted) -> None:
    X, y, _ = batch_data(3, 5, seed=35)
    model = GPResidual(BATCH_FEATURES, BATCH_UNITS, "r", "1/h", batch_effect="offset")
    with pytest.raises(ConfigError, match="batches="):
        model.fit(X, y)
    with pytest.raises(ModelError, match="one label per row"):
        model.fit(X, y, batches=["a"] * 3)
    assert not model.is_fitted
    plain = copy.deepcopy(fitted[0])
    with pytest.raises(ConfigError, match="no batch effect"):
        plain.observe(fitted[1][:2], fitted[2][:2])


# ---------------------------------------------------------------------- numeric-data export
def _assert_data_export_matches(model: GPResidual, fn: ca.Function, points: FloatArray) -> None:
    """``to_casadi_data`` with the current ``casadi_data`` equals a fresh embedded export
    (``to_casadi``: the data as constants, built symbolically now) and ``predict``."""
    embedded = model.to_casadi("embedded")
    data = model.casadi_data()
    assert data.shape == (model.data_size,)
    mean_p, var_p = model.predict(points)
    for x, m_p, v_p in zip(points, mean_p, var_p, strict=True):
        mean, var = (float(v) for v in fn(x, data))
        mean_e, var_e = (float(v) for v in embedded(x))
        scale = max(1.0, abs(mean_e))
        assert abs(mean - mean_e) <= 1e-9 * scale
        assert abs(var - var_e) <= 1e-9 * max(var_e, 1e-6)
        assert mean == pytest.approx(m_p, rel=1e-9, abs=1e-10)
        assert max(var, 0.0) == pytest.approx(v_p, rel=1e-7, abs=1e-10)


def test_numeric_data_export_follows_update_without_rebuild(fitted: Fitted) -> None:
    """Issue 25: the residual's data are an input of a function built once; after an
    update only the data vector changes (same length), and the function gives what a
    symbolic re-export would."""
    model = copy.deepcopy(fitted[0])
    fn = model.to_casadi_data("gp")
    layout = model.data_layout()
    points = probe_points(40)
    _assert_data_export_matches(model, fn, points)
    before = model.casadi_data()
    model.update(*make_data(15, seed=41))
    assert model.data_layout() == layout
    assert not np.array_equal(model.casadi_data(), before)
    _assert_data_export_matches(model, fn, points)


def test_numeric_data_export_of_the_running_batch(batch_fitted) -> None:  # type: ignore[no-untyped-def]
    """Running-batch slots are fixed (batch_capacity), zero when unused: the same function
    serves 0, some, a full and an overfull running batch (the oldest drop out), a finished
    batch added to the population, and a new batch."""
    model = copy.deepcopy(batch_fitted[0])
    fn = model.to_casadi_data("gp")
    layout = model.data_layout()
    points = batch_probe_points(42)
    _assert_data_export_matches(model, fn, points)
    X_run, y_run, _ = batch_data(1, model.batch_capacity + 5, seed=43)
    model.observe(X_run[:2], y_run[:2])
    _assert_data_export_matches(model, fn, points)
    model.observe(X_run[2:], y_run[2:])  # more than the slots: the most recent K are kept
    assert model.n_running_ == model.batch_capacity
    assert model.data_layout() == layout
    _assert_data_export_matches(model, fn, points)
    X_new, y_new, _ = batch_data(1, 10, seed=44)
    model.update(X_new, y_new)
    assert model.data_layout() == layout
    _assert_data_export_matches(model, fn, points)
    model.begin_batch()
    _assert_data_export_matches(model, fn, points)


def test_numeric_data_export_differentiates_like_the_embedded_one(fitted: Fitted) -> None:
    model = copy.deepcopy(fitted[0])
    x = ca.MX.sym("x", 2)
    data = ca.DM(model.casadi_data())
    new = ca.Function("j", [x], [ca.jacobian(model.to_casadi_data("gp")(x, data)[0], x)])
    old = ca.Function("j", [x], [ca.jacobian(model.to_casadi("gp")(x)[0], x)])
    for point in probe_points(45)[:8]:
        np.testing.assert_allclose(np.asarray(new(point)), np.asarray(old(point)), atol=1e-9)

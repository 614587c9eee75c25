"""GPResidual: conformance of predict/CasADi with GPyTorch, learning, update, persistence."""

from __future__ import annotations

import copy
import json
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

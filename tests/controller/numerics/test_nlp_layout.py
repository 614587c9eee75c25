"""Tests of the named layout of the MPC's NLP vectors (controller/numerics/mpc.py VectorLayout):
column-major packing as CasADi's ``vec``, typed errors, and its use by NonlinearMPC."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import casadi as ca
import numpy as np
import pytest

from controller.numerics.mpc import NonlinearMPC, VectorLayout
from controller.numerics.mpc_config import SoftBound, load_mpc_config, with_process_limits
from plant_models.errors import ModelError
from plant_models.tcell import TCellExpansionModel, load_tcell_parameters, load_tcell_process

REPO = Path(__file__).resolve().parents[3]

SHAPES: dict[str, int | tuple[int, int]] = {
    "column": 3,
    "matrix": (2, 3),
    "row": (1, 4),
    "scalar": 1,
    "empty": (0, 5),
}


def layout() -> VectorLayout:
    return VectorLayout(SHAPES, "test block")


def values(seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    return {
        "column": rng.normal(size=3),
        "matrix": rng.normal(size=(2, 3)),
        "row": rng.normal(size=(1, 4)),
        "scalar": float(rng.normal()),
        "empty": np.zeros((0, 5)),
    }


# ----------------------------------------------------------------------------- numeric


def test_offsets_and_sizes_follow_the_given_order() -> None:
    lay = layout()
    assert lay.names == ("column", "matrix", "row", "scalar", "empty")
    assert [(e.offset, e.shape) for e in lay.entries] == [
        (0, (3, 1)),
        (3, (2, 3)),
        (9, (1, 4)),
        (13, (1, 1)),
        (14, (0, 5)),
    ]
    assert lay.size == 14
    assert lay["row"].slice == slice(9, 13)


def test_matrices_are_packed_column_major() -> None:
    lay = VectorLayout({"a": 1, "m": (2, 3)})
    packed = lay.pack({"a": 7.0, "m": np.array([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])})
    np.testing.assert_allclose(packed, [7.0, 1.0, 4.0, 2.0, 5.0, 3.0, 6.0], rtol=0, atol=1e-15)


def test_pack_unpack_round_trip() -> None:
    lay, vals = layout(), values()
    packed = lay.pack(vals)
    assert packed.shape == (lay.size,) and packed.dtype == np.float64
    out = lay.unpack(packed)
    assert list(out) == list(lay.names)
    for name, value in vals.items():
        assert out[name].shape == lay[name].shape
        np.testing.assert_allclose(
            out[name], np.reshape(value, lay[name].shape), rtol=1e-15, atol=0
        )
    # unpack returns copies: changing them leaves the vector alone
    out["matrix"][0, 0] = 1e9
    assert packed[3] != 1e9


def test_vectors_take_1d_arrays_and_scalars() -> None:
    lay = layout()
    vals = values()
    flat = dict(vals, row=np.ravel(vals["row"]), scalar=np.array([vals["scalar"]]))
    np.testing.assert_allclose(lay.pack(flat), lay.pack(vals), rtol=0, atol=1e-15)
    column = dict(vals, column=np.reshape(vals["column"], (3, 1)))
    np.testing.assert_allclose(lay.pack(column), lay.pack(vals), rtol=0, atol=1e-15)


def test_missing_name_is_a_model_error_naming_it() -> None:
    vals = values()
    del vals["row"]
    with pytest.raises(ModelError, match=r"test block values: missing \['row'\], unknown \[\]"):
        layout().pack(vals)


def test_unknown_name_is_a_model_error_naming_it() -> None:
    vals = values()
    vals["matrx"] = vals.pop("matrix")
    with pytest.raises(ModelError, match=r"missing \['matrix'\], unknown \['matrx'\]") as err:
        layout().pack(vals)
    assert "Did you mean 'matrix'" in str(err.value)


@pytest.mark.parametrize(
    ("name", "bad", "shape"),
    [
        ("matrix", np.zeros((3, 2)), r"\(3, 2\)"),  # the transpose: same size, wrong shape
        ("matrix", np.zeros(6), r"\(6,\)"),  # a matrix never takes a flat array
        ("column", np.zeros(4), r"\(4,\)"),
        ("column", np.zeros((1, 3)), r"\(1, 3\)"),
        ("row", np.zeros((4, 1)), r"\(4, 1\)"),
        ("scalar", np.zeros(2), r"\(2,\)"),
    ],
)
def test_wrong_shape_is_a_model_error_naming_the_entry(name: str, bad: Any, shape: str) -> None:
    vals = values()
    vals[name] = bad
    with pytest.raises(ModelError, match=rf"test block '{name}': expected shape .*got {shape}"):
        layout().pack(vals)


def test_unpack_checks_the_size() -> None:
    with pytest.raises(ModelError, match=r"test block vector: expected 14 values, got 13"):
        layout().unpack(np.zeros(13))


def test_unknown_entry_and_bad_shapes_are_model_errors() -> None:
    with pytest.raises(ModelError, match=r"'colum' is not in the layout. Did you mean 'column'"):
        layout()["colum"]
    with pytest.raises(ModelError, match=r"'m': shape \(2, -1\)"):
        VectorLayout({"m": (2, -1)})
    with pytest.raises(ModelError, match=r"'m': shape \(1, 2, 3\)"):
        VectorLayout({"m": (1, 2, 3)})  # type: ignore[dict-item]


# ----------------------------------------------------------------------------- symbolic


@pytest.mark.parametrize("sym", [ca.SX, ca.MX])
def test_symbolic_vector_equals_the_numeric_pack(sym: Any) -> None:
    lay = layout()
    syms = lay.symbols(sym)
    assert {k: tuple(v.shape) for k, v in syms.items()} == {e.name: e.shape for e in lay.entries}
    vec = lay.concat(syms)
    assert tuple(vec.shape) == (lay.size, 1)
    fn = ca.Function("pack", [syms[k] for k in lay.names], [vec])
    for seed in range(3):
        vals = values(seed)
        args = [np.reshape(np.asarray(vals[k], dtype=float), lay[k].shape) for k in lay.names]
        evaluated = np.asarray(fn(*args), dtype=float).reshape(-1)
        np.testing.assert_allclose(evaluated, lay.pack(vals), rtol=1e-15, atol=0)
        # and back: the numeric unpack of the symbolic vector gives the pieces
        for k, piece in lay.unpack(evaluated).items():
            np.testing.assert_allclose(piece, np.reshape(vals[k], lay[k].shape), rtol=1e-15)


def test_concat_checks_names_and_shapes() -> None:
    lay = layout()
    syms = lay.symbols()
    with pytest.raises(ModelError, match=r"missing \['scalar'\]"):
        lay.concat({k: v for k, v in syms.items() if k != "scalar"})
    with pytest.raises(ModelError, match=r"'matrix': expected shape \(2, 3\), got \(3, 2\)"):
        lay.concat(dict(syms, matrix=ca.SX.sym("m", 3, 2)))


# ----------------------------------------------------------------------------- in the MPC


@pytest.fixture(scope="module")
def mpc() -> NonlinearMPC:
    model = TCellExpansionModel(load_tcell_parameters()[0], load_tcell_process()[0])
    cfg = with_process_limits(
        load_mpc_config(REPO / "configs" / "mpc_tcell.toml"),
        model.process,
        model.operating_bounds(),
    )
    cfg = dataclasses.replace(
        cfg,
        horizon=6,
        step_h=4.0,
        soft_bounds={"lactate": SoftBound(None, 20.0, 1e4, 1e3)},
    )
    return NonlinearMPC(model, cfg, model_parameters=("mu_max",))


def test_mpc_layouts_match_the_nlp(mpc: NonlinearMPC) -> None:
    n, nx, nu = mpc.horizon, mpc.nx, mpc.nu
    w, p = mpc._w_layout, mpc._p_layout
    assert w["states"].shape == (nx, n + 1) and w["inputs"].shape == (nu, n)
    assert w["slacks"].shape == (1, n) and w["dose_slack"].shape == (1, 1)
    assert p["mask"].shape == (1, n) and p["model_parameters"].shape == (1, 1)
    assert mpc._solver_cold.size_in("x0") == (w.size, 1) == (mpc.n_variables, 1)
    assert mpc._solver_cold.size_in("p") == (p.size, 1)
    bounds = w.unpack(mpc._lbw)
    assert np.all(bounds["states"] == -np.inf)
    np.testing.assert_allclose(
        bounds["inputs"], np.tile((mpc.u_low / mpc.input_scale)[:, None], (1, n)), rtol=1e-15
    )
    assert np.all(bounds["slacks"] == 0.0) and np.all(bounds["dose_slack"] == 0.0)
    upper = w.unpack(mpc._ubw)
    np.testing.assert_allclose(
        upper["inputs"], np.tile((mpc.u_high / mpc.input_scale)[:, None], (1, n)), rtol=1e-15
    )
    assert np.all(upper["slacks"] == np.inf)


def test_mpc_pack_unpack_round_trip(mpc: NonlinearMPC) -> None:
    n = mpc.horizon
    rng = np.random.default_rng(3)
    states = rng.uniform(0.5, 20.0, size=(n + 1, mpc.nx))
    inputs = rng.uniform(0.0, 2.0, size=(n, mpc.nu))
    term = np.zeros(n)
    term[-1] = 1.0
    w0 = mpc._pack(states, inputs, states[0], 1e6, term)
    assert w0.shape == (mpc.n_variables,)
    # the scaled states of stage k are contiguous (column k of vec(X))
    np.testing.assert_allclose(w0[: mpc.nx], states[0] / mpc.state_scale, rtol=1e-15)
    got_states, got_inputs, slack, sdose = mpc._unpack(w0)
    np.testing.assert_allclose(got_states, states, rtol=1e-14)
    np.testing.assert_allclose(got_inputs, inputs, rtol=1e-14)
    assert slack.shape == (1, n) and np.all(slack == 0.0)
    assert sdose == pytest.approx(1.0, abs=1e-3)  # far below a 1e6 target: ~all short

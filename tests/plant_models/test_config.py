from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import pytest

from plant_models.config import load_dataclass, load_fields, setting
from plant_models.errors import ConfigError, HmpcError
from plant_models.tcell import TCellParameters, load_tcell_parameters, load_tcell_process

DATA = Path(__file__).resolve().parents[2] / "plant_models" / "data"


def _edit(tmp_path: Path, old: str, new: str, name: str = "tcell_nominal.toml") -> Path:
    text = (DATA / name).read_text()
    assert old in text
    out = tmp_path / name
    out.write_text(text.replace(old, new, 1))
    return out


def test_default_files_load_with_provenance() -> None:
    params, prov = load_tcell_parameters()
    process, _ = load_tcell_process()
    assert params.mu_max > 0 and process.working_volume > 0
    assert prov.model == "tcell" and "duran" in prov.sources
    assert set(prov.parameter_sources) == {f.name for f in dataclasses.fields(TCellParameters)}


def test_parameters_are_frozen() -> None:
    params, _ = load_tcell_parameters()
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.mu_max = 1.0  # type: ignore[misc]


def test_unknown_key_names_file_key_and_suggestion(tmp_path: Path) -> None:
    bad = _edit(tmp_path, "\nmu_max =", "\nmu_maxx =")
    with pytest.raises(ConfigError) as err:
        load_tcell_parameters(bad)
    msg = str(err.value)
    assert str(bad) in msg and "'mu_maxx'" in msg and "Did you mean 'mu_max'" in msg
    assert isinstance(err.value, ValueError) and isinstance(err.value, HmpcError)


def test_out_of_range_value_states_the_range(tmp_path: Path) -> None:
    bad = _edit(tmp_path, "lysis_rate = { value = 0.01", "lysis_rate = { value = -0.5")
    with pytest.raises(ConfigError, match=r"lysis_rate = -0\.5 1/h is outside .*\[0, 0\.5\] 1/h"):
        load_tcell_parameters(bad)


def test_open_lower_bound(tmp_path: Path) -> None:
    bad = _edit(tmp_path, "mu_max = { value = 0.036", "mu_max = { value = 0.0")
    with pytest.raises(ConfigError, match=r"\(0, 0\.2\]"):
        load_tcell_parameters(bad)


def test_wrong_unit_is_refused_not_converted(tmp_path: Path) -> None:
    bad = _edit(tmp_path, 'value = 0.036, unit = "1/h"', 'value = 0.864, unit = "1/d"')
    with pytest.raises(ConfigError, match="unit '1/d' given.*'1/h'"):
        load_tcell_parameters(bad)


def test_missing_key(tmp_path: Path) -> None:
    text = (DATA / "tcell_nominal.toml").read_text()
    lines = [ln for ln in text.splitlines() if not ln.startswith("il2_decay")]
    bad = tmp_path / "missing.toml"
    bad.write_text("\n".join(lines))
    with pytest.raises(ConfigError, match="missing required key.*il2_decay"):
        load_tcell_parameters(bad)


def test_unknown_citation(tmp_path: Path) -> None:
    bad = _edit(tmp_path, 'source = "[calib]; structure [duran]', 'source = "[durann]')
    with pytest.raises(ConfigError, match="cites \\[durann\\].*Did you mean 'duran'"):
        load_tcell_parameters(bad)


def test_wrong_model_kind() -> None:
    with pytest.raises(ConfigError, match="'tcell-process' parameter set is needed"):
        load_tcell_process(DATA / "tcell_nominal.toml")


def test_not_toml_and_missing_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("mu_max 0.1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_tcell_parameters(bad)
    with pytest.raises(ConfigError, match="file not found"):
        load_tcell_parameters(tmp_path / "nope.toml")


def test_value_must_be_a_number(tmp_path: Path) -> None:
    bad = _edit(tmp_path, "mu_max = { value = 0.036", 'mu_max = { value = "fast"')
    with pytest.raises(ConfigError, match="must be a number"):
        load_tcell_parameters(bad)


# -- the generic settings loader (load_dataclass) -------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Limit:
    low: float | None = setting(None, low=0.0, high=100.0, unit="mM", description="limit")
    weight: float = setting(1.0, low=0.0, high=1e6)


@dataclasses.dataclass(frozen=True)
class _Tuning:
    step_h: float = setting(1.0, low=0.0, low_open=True, high=48.0, unit="h", description="step")
    horizon: int = setting(10, low=1, high=100)
    method: str = setting("ipopt", choices=("ipopt", "sqpmethod"))
    warm: bool = setting(True)
    limit: _Limit = dataclasses.field(default_factory=_Limit)
    weights: Mapping[str, float] = setting(
        default_factory=dict, low=0.0, high=10.0, description="weight"
    )
    bounds: tuple[float, float] = setting((0.0, 1.0))
    names: tuple[str, ...] = setting(())
    states: Mapping[str, _Limit] = setting(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class _Term:
    reference: float = setting(low=-10.0, high=10.0)
    weight: float = setting(1.0)


@dataclasses.dataclass(frozen=True)
class _File:
    term: _Term = dataclasses.field(default_factory=lambda: _Term(0.0))


@dataclasses.dataclass(frozen=True)
class _Config:
    step_h: float = setting(1.0, low=0.0, high=10.0)
    move_weights: Mapping[str, float] = setting(default_factory=dict, key="move", low=0.0)


def test_settings_missing_keys_take_the_dataclass_defaults() -> None:
    assert load_dataclass(_Tuning, {}, "t.toml") == _Tuning()
    got = load_dataclass(
        _Tuning,
        {
            "step_h": 2,
            "horizon": 5,
            "method": "sqpmethod",
            "warm": False,
            "limit": {"low": 3},
            "weights": {"a": 0.5},
            "bounds": [1, 2.5],
            "names": ["x", "y"],
            "states": {"glucose": {"weight": 2.0}},
        },
        "t.toml",
    )
    assert got.step_h == 2.0 and isinstance(got.step_h, float) and got.horizon == 5
    assert got.method == "sqpmethod" and got.warm is False
    assert got.limit == _Limit(low=3.0, weight=1.0)
    assert dict(got.weights) == {"a": 0.5} and got.bounds == (1.0, 2.5) and got.names == ("x", "y")
    assert got.states["glucose"] == _Limit(None, 2.0)


@pytest.mark.parametrize(
    ("table", "pattern"),
    [
        ({"horizn": 5}, r"t\.toml: unknown key 'horizn'\. Did you mean 'horizon'\?"),
        ({"step_h": True}, r"t\.toml step_h: must be a number, got True"),
        ({"warm": 1}, r"t\.toml warm: must be true or false, got 1"),
        ({"horizon": 2.0}, r"t\.toml horizon: must be a whole number, got 2\.0"),
        ({"horizon": 0}, r"t\.toml horizon = 0 is outside its range \[1, 100\]"),
        ({"step_h": 0.0}, r"t\.toml step_h = 0\.0 h is outside its physical range \(0, 48\] h"),
        ({"step_h": float("nan")}, r"t\.toml step_h = nan h is outside"),
        ({"method": "ipop"}, r"t\.toml method = 'ipop' is not allowed\. Did you mean 'ipopt'\?"),
        ({"limit": {"low": -1}}, r"t\.toml limit low = -1\.0 mM is outside .*\[0, 100\] mM"),
        ({"limit": {"lw": 1}}, r"t\.toml limit: unknown key 'lw'\. Did you mean 'low'\?"),
        ({"limit": 3}, r"t\.toml limit: must be a table \{ low = \.\.\., weight = \.\.\. \}"),
        ({"weights": {"a": 11}}, r"t\.toml weights a = 11\.0 is outside .*\(weight\)"),
        ({"weights": [1]}, r"t\.toml weights: must be a table of name = weight, got \[1\]"),
        ({"bounds": [1]}, r"t\.toml bounds: must be \[number, number\], got \[1\]"),
        ({"bounds": [1, True]}, r"t\.toml bounds: must be \[number, number\]"),
        ({"names": "x"}, r"t\.toml names: must be a list of strings, got 'x'"),
        ({"states": {"glucose": {"weight": -1}}}, r"t\.toml states glucose weight = -1\.0 is"),
    ],
)
def test_settings_errors_name_the_key_the_value_and_what_is_allowed(
    table: dict[str, object], pattern: str
) -> None:
    with pytest.raises(ConfigError, match=pattern):
        load_dataclass(_Tuning, table, "t.toml")


def test_settings_without_default_are_required_and_root_tables_are_bracketed() -> None:
    with pytest.raises(
        ConfigError, match=r"f\.toml \[term\]: missing required key\(s\): reference"
    ):
        load_dataclass(_File, {"term": {"weight": 2.0}}, "f.toml", root=True)
    with pytest.raises(ConfigError, match=r"f\.toml \[term\] reference = 11\.0 is outside"):
        load_dataclass(_File, {"term": {"reference": 11}}, "f.toml", root=True)
    with pytest.raises(ConfigError, match=r"f\.toml: must be a table, got 3"):
        load_dataclass(_File, 3, "f.toml", root=True)
    assert load_dataclass(_File, {"term": {"reference": 1}}, "f.toml").term == _Term(1.0, 1.0)


def test_load_fields_reads_part_of_a_dataclass_under_file_keys() -> None:
    values = load_fields(
        _Config, {"move": {"u": 2}, "other": {}}, "c", names=["move_weights"], extra=["other"]
    )
    assert set(values) == {"move_weights"} and dict(values["move_weights"]) == {"u": 2.0}
    assert load_fields(_Config, {}, "c") == {}  # left out: the dataclass supplies the default
    with pytest.raises(ConfigError, match=r"c: unknown key 'step_h'"):
        load_fields(_Config, {"step_h": 1.0}, "c", names=["move_weights"])
    with pytest.raises(ConfigError, match=r"c: missing required key\(s\): step_h"):
        load_fields(_Config, {}, "c", required=["step_h"])

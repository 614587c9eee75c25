from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

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

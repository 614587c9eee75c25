"""The shipped configuration files are found from a checkout and from a built wheel."""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from controller.config_files import config_dir, config_file
from controller.numerics.mpc_config import load_mpc_config
from plant_models.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]


def test_checkout_resolves_repository_configs() -> None:
    assert config_dir() == ROOT / "configs"
    path = config_file("mpc_tcell_hourly.toml")
    assert path == ROOT / "configs" / "mpc_tcell_hourly.toml"
    assert load_mpc_config(path).step_h == 1.0


def test_unknown_file_names_the_shipped_ones() -> None:
    with pytest.raises(ConfigError, match=r"mpc_tcel\.toml.*there are:.*mpc_tcell\.toml"):
        config_file("mpc_tcel.toml")


def test_wheel_carries_configs_and_resolves_them(tmp_path: Path) -> None:
    """Build the wheel, unpack it outside the checkout and ask it for a tuning file."""
    subprocess.run(
        [
            *(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"),
            *("-w", str(tmp_path / "dist"), str(ROOT)),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = (tmp_path / "dist").glob("hmpc-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        shipped = {p.name for p in (ROOT / "configs").glob("*.toml")}
        assert {f"controller/configs/{n}" for n in shipped} <= names
        zf.extractall(tmp_path / "site")
    code = "from controller.config_files import config_file; print(config_file('mpc_tcell.toml'))"
    env = {**os.environ, "PYTHONPATH": str(tmp_path / "site")}
    out = subprocess.run(
        [sys.executable, "-c", code],
        check=True,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=120,
    ).stdout.strip()
    assert Path(out) == tmp_path / "site" / "controller" / "configs" / "mpc_tcell.toml"

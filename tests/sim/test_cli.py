from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from sim.cli import main

KEYS = {
    "fold_expansion",
    "final_viable_cells",
    "final_viability",
    "peak_lactate",
    "media_used",
    "hard_constraint_violations",
}


def test_simulate_writes_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        [
            "simulate",
            "--model",
            "tcell",
            "--controller",
            "rule",
            "--patient-seed",
            "7",
            "--days",
            "10",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert KEYS <= set(summary)
    df = pd.read_csv(tmp_path / "trajectory.csv")
    assert len(df) == 241
    assert "viable_cells [1e6 cells/mL]" in df.columns and "time [h]" in df.columns
    units = json.loads((tmp_path / "trajectory.units.json").read_text())
    assert units["glucose"] == "mM"
    png = (tmp_path / "trajectory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
    assert "fold expansion" in capsys.readouterr().out


def test_cho_and_parameter_file(tmp_path: Path) -> None:
    assert main(["simulate", "--model", "cho", "--days", "7", "--out", str(tmp_path / "c")]) == 0
    assert json.loads((tmp_path / "c" / "summary.json").read_text())["model"] == "cho"
    nominal = Path(__file__).resolve().parents[2] / "plant_models/data/tcell_nominal.toml"
    assert (
        main(
            ["simulate", "--parameters", str(nominal), "--days", "3", "--out", str(tmp_path / "t")]
        )
        == 0
    )


def test_bad_parameter_file_is_a_message_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[meta]\nmodel = "tcell-truth"\ntitle = "x"\n[parameters]\nmu_maxx = 1\n')
    assert main(["simulate", "--parameters", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'mu_maxx'" in err and "Did you mean 'mu_max'" in err
    assert "Traceback" not in err


def test_console_script_rejects_bad_option(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("hmpc-sim")
    proc = subprocess.run(
        [str(exe), "simulate", "--controller", "pid", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "invalid choice: 'pid'" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [str(exe), "simulate", "--days", "-1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2 and "must be positive" in proc.stderr


def test_simulate_adapt_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--adapt`` gives an MPC the running batch's patient parameters; the baselines and
    unknown names are refused with a message."""
    out = tmp_path / "adapt"
    args = ["simulate", "--controller", "mechanistic-mpc", "--days", "1.5", "--out", str(out)]
    args += ["--mpc-config", str(Path(__file__).parents[2] / "configs" / "mpc_tcell_hourly.toml")]
    assert main([*args, "--adapt", "mu_max,lag_time"]) == 0
    assert (out / "trajectory.csv").exists()
    capsys.readouterr()
    assert main([*args, "--adapt", "k_lys"]) == 2
    assert "unknown parameter(s) ['k_lys']" in capsys.readouterr().err
    recipe = ["simulate", "--adapt", "auto", "--out", str(tmp_path / "r")]
    assert main(recipe) == 2
    assert "--adapt is for the MPC controllers" in capsys.readouterr().err


def test_processes_lists_the_registered_plug_ins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["processes"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(line.startswith("tcell: ") and "glucose_feed" in line for line in lines)
    assert any(line.startswith("cho: ") and "feed_rate" in line for line in lines)
    with pytest.raises(SystemExit) as err:
        main(["simulate", "--model", "yeast", "--out", "x"])
    assert err.value.code == 2  # argparse: not a registered process

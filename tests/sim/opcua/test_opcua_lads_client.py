"""Interop with the PyPI lads-opcua-client: it discovers the simulator's LADS devices, their
functional unit and its functions (sensor and control functions by LADS type) over a secure
session (Basic256Sha256 + user).

lads-opcua-client needs Python >= 3.12; ``sim/opcua/setup_lads_client.sh`` (make setup) puts
it in build/lads-venv. Skipped with that instruction when the venv is missing.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
from opcua_testkit import CLIENT_URI, Pki, SimThread

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
VENV = Path(os.environ.get("HMPC_LADS_VENV", ROOT / "build" / "lads-venv"))
SCRIPT = Path(__file__).parent / "lads_client" / "discover.py"


def test_lads_opcua_client_discovers_devices_units_and_functions(sim: SimThread, pki: Pki) -> None:
    python = VENV / "bin" / "python"
    if not python.is_file():
        pytest.skip(f"no lads-opcua-client venv in {VENV}: run sim/opcua/setup_lads_client.sh")
    if not sim.s.bioreactor.official_nodesets:
        pytest.skip("the LADS NodeSets are not installed: run sim/opcua/setup_nodesets.sh")
    out = subprocess.run(
        [
            str(python),
            str(SCRIPT),
            sim.s.endpoint,
            str(pki.client_cert),
            str(pki.client_key),
            CLIENT_URI,
            "viewer",
            "view-secret",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=SCRIPT.parent,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["initialized"] is True
    assert result["devices"] == ["BR01", "BR02"]
    units = result["functional_units"]
    assert [u["name"] for u in units] == ["Bioreactor", "Bioreactor"]
    functions = units[0]["functions"]
    assert functions["GlucoseSensor"] == "AnalogScalarSensorFunction"
    assert functions["ViabilityAssay"] == "AnalogScalarSensorFunction"
    assert functions["PerfusionPump"] == "AnalogControlFunctionWithTotalizer"

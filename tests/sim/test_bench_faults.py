"""``hmpc-sim bench faults`` runs one short batch end to end (real ``hmpc run`` child
process, the plant in-process, kill -9, SIGSTOP, a plant restart, sensor faults, tampering)
and writes every figure the issue names. Safety invariants are checked; times are not."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sim.cli import main as sim_main

pytestmark = pytest.mark.integration

KEYS = {
    "batches",
    "writes_without_record",
    "records_without_write",
    "setpoints_outside_limits",
    "max_first_move_fraction",
    "max_seconds_to_safe_state",
    "hours_beyond_hard_limit",
    "tamper_detected",
    "tamper_tried",
}


def test_bench_faults_one_short_batch(tmp_path: Path) -> None:
    out = tmp_path / "faults.json"
    code = sim_main(
        [
            *("bench", "faults", "--batches", "1", "--hours", "16", "--speed", "1800"),
            *("--keep", str(tmp_path / "work"), "--json", str(out)),
        ]
    )
    assert code == 0
    figures = json.loads(out.read_text())
    assert KEYS <= set(figures) and figures["batches"] == 1
    assert figures["setpoints_outside_limits"] == 0
    assert figures["writes_without_record"] == 0 and figures["records_without_write"] == 0
    assert figures["tamper_tried"] == 8

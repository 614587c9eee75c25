"""Fixtures of the runtime integration tests (helpers in runtime_testkit.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from runtime_testkit import PASSWORDS, make_pki

from sim.bench_loop import PASSWORD_ENV


@pytest.fixture
def pki(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A simulator PKI folder with users apc and operator; the apc password exported."""
    monkeypatch.setenv(PASSWORD_ENV, PASSWORDS["apc"])
    return make_pki(tmp_path / "pki")

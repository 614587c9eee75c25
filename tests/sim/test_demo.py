"""The demo's site file (sim/demo.py) is a valid site file for `hmpc run`."""

from __future__ import annotations

from pathlib import Path

from controller.config_files import config_file
from controller.runtime.site import load_site
from sim.demo import site_file


def test_demo_site_file_loads_with_one_hybrid_unit(tmp_path: Path) -> None:
    residual = tmp_path / "residual.npz"
    residual.write_bytes(b"")  # the loader checks that it exists; content is not read here
    text = site_file(
        config_file("site_sim.toml").read_text(),
        port=45123,
        controller="hybrid-mpc",
        residual=residual,
    )
    path = tmp_path / "site.toml"
    path.write_text(text)
    site = load_site(path)
    assert [u.name for u in site.units] == ["BR01"]
    unit = site.units[0]
    assert unit.controller == "hybrid-mpc"
    assert unit.residual == residual
    assert unit.mpc_config is not None and unit.mpc_config.exists()
    assert site.endpoints["bioreactor"] == "opc.tcp://127.0.0.1:45123/hmpc/bioreactor"
    assert "45124" in text  # the printer next to it
    assert site.output_dir == tmp_path / "run"
    # nothing points outside the demo folder but the packaged tuning
    assert "../" not in text

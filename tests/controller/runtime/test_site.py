"""The site file: the example loads; every mistake is a ConfigError naming file and key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from controller.runtime.site import (
    conversion_for,
    load_site,
    parse_node_ref,
)
from plant_models.errors import ConfigError

EXAMPLE = Path(__file__).resolve().parents[3] / "configs" / "site_sim.toml"

MINIMAL = """
[endpoints]
bioreactor = "opc.tcp://127.0.0.1:4840/hmpc/bioreactor"

[security]
certificate = "cert.der"
private_key = "key.pem"
user = "apc"
password_env = "HMPC_APC_PASSWORD"

[clock]
process_time = "nsu=urn:hmpc:sim;s=Clock.ProcessTime"
batch_start = "nsu=urn:hmpc:sim;s=Clock.BatchStartTime"

[apc]
object = "nsu=urn:hmpc:sim;s=APC.{unit}"

[tags.glucose]
node = "nsu=urn:hmpc:sim;s={unit}.Bioreactor.FunctionSet.GlucoseSensor.SensorValue"
unit = "mM"

[units.BR01]
model = "tcell"
controller = "rule"
"""


def _site(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "site.toml"
    path.write_text(text)
    return path


def test_example_site_file_loads() -> None:
    site = load_site(EXAMPLE)
    assert [u.name for u in site.units] == ["BR01", "BR02"]
    br01 = site.unit("BR01")
    assert br01.controller == "mechanistic-mpc" and br01.mpc_config is not None
    assert br01.mpc_config.is_file()
    assert str(br01.apc) == "nsu=urn:hmpc:sim;s=APC.BR01"
    online = [t for t in br01.inputs if t.source == "online"]
    assert {t.variable for t in online} == {"viable_cells", "glucose", "lactate"}
    assert all(t.required and t.max_age_h == 1.5 for t in online)
    assert all(not t.required for t in br01.inputs if t.source == "assay")
    assert [s.variable for s in br01.setpoints] == [
        "perfusion_rate",
        "glucose_feed",
        "il2_addition",
    ]
    assert site.security.policy == "Basic256Sha256" and site.security.mode == "SignAndEncrypt"
    assert site.security.certificate.parent.name == "trusted"  # relative to configs/
    assert site.printer is not None and site.printer.endpoint.endswith(":4841/hmpc/printer")
    assert site.timing.period_h == 1.0
    # the safe state the simulator applies on shed (hmpc-sim serve --fallback initial)
    assert {s.variable: s.fallback for s in br01.setpoints} == dict.fromkeys(
        ("perfusion_rate", "glucose_feed", "il2_addition"), 0.0
    )


def test_minimal_site_defaults(tmp_path: Path) -> None:
    site = load_site(_site(tmp_path, MINIMAL))
    unit = site.unit("BR01")
    assert unit.endpoint == "bioreactor" and unit.harvest_time_h is None
    assert site.timing.solve_budget_s is None and site.printer is None
    assert site.security.certificate == tmp_path / "cert.der"
    (tag,) = unit.inputs
    assert str(tag.node).endswith("s=BR01.Bioreactor.FunctionSet.GlucoseSensor.SensorValue")
    # setpoints without a table: the model's inputs in their canonical units
    assert [(s.item, s.conversion.device_unit) for s in unit.setpoints] == [
        ("perfusion_rate", "1/d"),
        ("glucose_feed", "mL/h"),
        ("il2_addition", "kIU/h"),
    ]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (
            ("[apc]", "[timing]\nperod_h = 1.0\n\n[apc]"),
            r"\[timing\]: unknown key 'perod_h'.*period_h",
        ),
        (("[units.BR01]", "[untis.BR01]"), r"unknown key 'untis'.*'units'"),
        (('controller = "rule"', 'controller = "rules"'), r"\[units.BR01\] controller.*'rule'"),
        (('model = "tcell"', 'model = "tcel"'), r"model = 'tcel'.*'tcell'"),
        (('unit = "mM"', 'unit = "furlong"'), r"\[tags.glucose\] \(unit BR01\).*'furlong'.*scale"),
        (
            ("[tags.glucose]", "[tags.glucos]"),
            r"\[tags.glucos\] \(unit BR01\) variable 'glucos'.*'glucose'",
        ),
        (
            ("nsu=urn:hmpc:sim;s={unit}.Bio", "ns=2;s={unit}.Bio"),
            r"\[tags.glucose\] \(unit BR01\) node.*nsu=",
        ),
        (('user = "apc"', 'user = "apc"\npassword = "x"'), r"password: never put a password"),
        (('password_env = "HMPC_APC_PASSWORD"', ""), r"exactly one of password_env"),
        (("[security]", '[security]\npolicy = "None"'), r"allow_insecure"),
        (("opc.tcp://127.0.0.1:4840", "http://127.0.0.1:4840"), r"\[endpoints\] bioreactor"),
        (
            ("[units.BR01]", '[units.BR01]\nendpoint = "bioreactr"'),
            r"endpoint = 'bioreactr'.*'bioreactor'",
        ),
        (("[units.BR01]", "[units.BR01]\nharvest_time_h = -4"), r"harvest_time_h = -4"),
        (
            ("[units.BR01]", '[setpoints.feed_rate]\nunit = "L/h"\n\n[units.BR01]'),
            r"setpoints: 'feed_rate' is not an input of the tcell model",
        ),
        (("{unit}.Bio", "{reactor}.Bio"), r"unknown placeholder"),
        (
            (
                "[units.BR01]",
                "[setpoints.glucose_feed]\nhigh = 4.0\nfallback = 4.5\n\n[units.BR01]",
            ),
            r"\[setpoints.glucose_feed\].* fallback = 4.5 mL/h is outside \[-inf, 4\]",
        ),
        (
            ("[units.BR01]", "[units.BR01]\ncontroller_kind = 1"),
            r"\[units.BR01\]: unknown key 'controller_kind'",
        ),
    ],
)
def test_site_errors_name_file_and_key(tmp_path: Path, edit: tuple[str, str], message: str) -> None:
    old, new = edit
    assert old in MINIMAL
    path = _site(tmp_path, MINIMAL.replace(old, new, 1))
    with pytest.raises(ConfigError, match=message) as info:
        load_site(path)
    assert str(path) in str(info.value)


def test_missing_mpc_file_and_residual(tmp_path: Path) -> None:
    text = MINIMAL.replace('controller = "rule"', 'controller = "hybrid-mpc"')
    with pytest.raises(ConfigError, match="residual"):
        load_site(_site(tmp_path, text))
    text = MINIMAL.replace(
        'controller = "rule"', 'controller = "mechanistic-mpc"\nmpc_config = "nope.toml"'
    )
    with pytest.raises(ConfigError, match=re.escape(str(tmp_path / "nope.toml"))):
        load_site(_site(tmp_path, text))


def test_per_unit_tag_override(tmp_path: Path) -> None:
    text = MINIMAL + (
        '\n[units.BR02]\nmodel = "tcell"\ncontroller = "recipe"\n'
        '[units.BR02.tags.glucose]\nnode = "nsu=urn:other;s=G2"\nunit = "g/L"\n'
    )
    site = load_site(_site(tmp_path, text))
    (g1,) = site.unit("BR01").inputs
    (g2,) = site.unit("BR02").inputs
    assert g1.conversion.scale == 1.0 and str(g2.node) == "nsu=urn:other;s=G2"
    assert g2.conversion.to_canonical(1.80156) == pytest.approx(10.0)  # g/L glucose -> mM


def test_password_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    site = load_site(_site(tmp_path, MINIMAL))
    monkeypatch.delenv("HMPC_APC_PASSWORD", raising=False)
    with pytest.raises(ConfigError, match="HMPC_APC_PASSWORD is not set"):
        site.security.password()
    monkeypatch.setenv("HMPC_APC_PASSWORD", "s3cret")
    assert site.security.password() == "s3cret"


def test_unit_conversions() -> None:
    c = conversion_for("viable_cells", "cells/mL", "1e6 cells/mL", "w")
    assert c.to_canonical(2.5e6) == pytest.approx(2.5)
    assert c.to_device(c.to_canonical(3.1e6)) == pytest.approx(3.1e6)
    # the reverse of a listed pair
    assert conversion_for("x", "1e6 cells/mL", "cells/mL", "w").scale == pytest.approx(1e6)
    assert conversion_for("viability", "%", "1", "w").to_canonical(92.0) == pytest.approx(0.92)
    assert conversion_for("lactate", "g/L", "mM", "w").to_canonical(0.90078) == pytest.approx(10.0)
    explicit = conversion_for("il2", "raw", "IU/mL", "w", scale=2.0, offset=-1.0)
    assert explicit.to_canonical(3.0) == 5.0 and explicit.to_device(5.0) == 3.0
    with pytest.raises(ConfigError, match="il2"):
        conversion_for("il2", "g/L", "IU/mL", "w")
    with pytest.raises(ConfigError, match="non-zero"):
        conversion_for("il2", "raw", "IU/mL", "w", scale=0.0)


def test_node_refs() -> None:
    ref = parse_node_ref("nsu=urn:hmpc:sim;s=APC.{unit}", "w", unit="BR07")
    assert (ref.uri, ref.kind, ref.identifier) == ("urn:hmpc:sim", "s", "APC.BR07")
    assert str(ref.child("Heartbeat")) == "nsu=urn:hmpc:sim;s=APC.BR07.Heartbeat"
    assert parse_node_ref("i=2258", "w").uri == ""
    with pytest.raises(ConfigError, match="not a node id"):
        parse_node_ref("Heartbeat", "w")


# ------------------------------------------------ hostile or careless files (issue 22 §4)


def test_a_non_utf8_site_file_names_the_file_and_the_line(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_bytes(MINIMAL.encode() + b"\n# Sch\xf6ne Gr\xfc\xdfe\n")
    with pytest.raises(ConfigError) as err:
        load_site(path)
    message = str(err.value)
    assert str(path) in message and "not UTF-8" in message and "line" in message


def test_a_huge_site_file_is_refused_before_it_is_parsed_or_echoed(tmp_path: Path) -> None:
    path = tmp_path / "site.toml"
    path.write_text(MINIMAL + "\n# " + "x" * 50_000_000 + "\n")
    with pytest.raises(ConfigError, match="larger than") as err:
        load_site(path)
    assert len(str(err.value)) < 500


def test_a_huge_or_control_character_name_is_refused_and_not_echoed(tmp_path: Path) -> None:
    long_name = "A" * 500_000
    with pytest.raises(ConfigError, match="longer than") as err:
        load_site(_site(tmp_path, MINIMAL + f'\n[site]\nname = "{long_name}"\n'))
    assert len(str(err.value)) < 500
    with pytest.raises(ConfigError, match="control characters"):
        load_site(_site(tmp_path, MINIMAL + '\n[site]\nname = "BR\\u001b[2J"\n'))


def _secured(tmp_path: Path, lines: str) -> Path:
    text = MINIMAL.replace('password_env = "HMPC_APC_PASSWORD"\n', lines)
    return _site(tmp_path, text)


def test_a_password_file_others_can_read_is_refused(tmp_path: Path) -> None:
    secret = tmp_path / "apc.pw"
    secret.write_text("s3cr3t\n")
    secret.chmod(0o644)
    site = load_site(_secured(tmp_path, 'password_file = "apc.pw"\n'))
    with pytest.raises(ConfigError, match="chmod 600") as err:
        site.security.check_files()
    assert "s3cr3t" not in str(err.value)
    with pytest.raises(ConfigError, match="group or others"):
        site.security.password()
    secret.chmod(0o600)
    site.security.check_files()
    assert site.security.password() == "s3cr3t"


def test_a_missing_trust_folder_fails_before_connecting(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HMPC_APC_PASSWORD", "pw")
    path = _secured(
        tmp_path, 'password_env = "HMPC_APC_PASSWORD"\ntrusted_servers = "pki/trusted"\n'
    )
    site = load_site(path)
    with pytest.raises(ConfigError, match="trusted_servers: folder .* does not exist"):
        site.security.check_files()
    (tmp_path / "pki" / "trusted").mkdir(parents=True)
    site.security.check_files()
    monkeypatch.delenv("HMPC_APC_PASSWORD")
    with pytest.raises(ConfigError, match="is not set"):
        site.security.check_files()


def test_hmpc_run_never_prints_the_historian_password(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The database is unreachable (port 1): ``hmpc run`` stops with an error, and neither
    what it printed before nor the error shows the URL's password."""
    from controller.cli import main

    monkeypatch.setenv("HMPC_APC_PASSWORD", "pw")
    site = _site(tmp_path, MINIMAL)
    url = "postgresql://apc:Tr0ub4dor-s3cr3t@127.0.0.1:1/hmpc"
    code = main(["run", "--site", str(site), "--out", str(tmp_path / "out"), "--historian", url])
    out = capsys.readouterr()
    assert code != 0
    assert "Tr0ub4dor-s3cr3t" not in out.out + out.err
    assert "127.0.0.1" in out.out + out.err  # the error still says which database

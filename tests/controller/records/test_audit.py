"""The GMP audit trail: appends, the hash chain, and tamper detection by `hmpc audit verify`
after direct SQL tampering (edit, delete, reorder, insert) on SQLite and a real PostgreSQL."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import pytest

from controller.cli import main
from controller.records.audit import GENESIS_HASH, AuditTrail, chain_hash
from controller.records.historian import Historian, canonical_json
from plant_models.errors import HistorianError


class Clock:
    """The controller's clock, stepped by hand (one minute per reading)."""

    def __init__(self, start: float = 1_795_000_000.0) -> None:
        self.t = start

    def __call__(self) -> float:
        self.t += 60.0
        return self.t


def fill(trail: AuditTrail) -> None:
    """Six records of a batch: login, tuning, mode, setpoint, residual, a config change."""
    trail.login("alice")
    trail.tuning_change(
        "configs/mpc_tcell.toml: horizon",
        48,
        36,
        user="alice",
        reason="CR-118 faster solves",
        batch_id="B-0001",
        unit="R1",
    )
    trail.mode_change(
        "R1", "local", "remote", user="bob", reason="start of control", batch_id="B-0001"
    )
    trail.setpoint_write(
        "R1", "perfusion_rate", 0.5, 0.75, user="hmpc", reason="MPC step 12", batch_id="B-0001"
    )
    trail.residual_update(
        "R1/growth_rate residual",
        {"points": 300},
        {"points": 312},
        user="hmpc",
        reason="assay of day 2",
        batch_id="B-0001",
        unit="R1",
    )
    trail.config_change(
        "site.toml: R1 endpoint",
        "opc.tcp://a:4840",
        "opc.tcp://b:4840",
        user="carol",
        reason="CR-120 new gateway",
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'historian.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def filled(url: str) -> str:
    with Historian(url) as hist:
        fill(AuditTrail(hist, clock=Clock()))
    return url


def execute(url: str, *statements: str) -> None:
    """Tamper with the database directly, as someone with write access could."""
    if url.startswith("sqlite"):
        import sqlite3

        with sqlite3.connect(url[len("sqlite:///") :]) as conn:
            for s in statements:
                conn.execute(s)
    else:
        import psycopg

        with psycopg.connect(url) as conn:
            for s in statements:
                conn.execute(s)


def verify(url: str, capsys: pytest.CaptureFixture[str]) -> tuple[int, list[str]]:
    code = main(["audit", "verify", "--historian", url])
    out = capsys.readouterr().out
    return code, out.strip().splitlines()


def problems(lines: list[str]) -> list[str]:
    """``record #N: problem`` of each line of the audit trail's section (the record
    chain's findings, which follow under ``records TAMPERED``, are left out)."""
    section = []
    for line in lines[1:]:
        if line.startswith("records TAMPERED"):
            break
        section.append(": ".join(line.strip().split(": ")[:2]))
    return section


def test_records_are_chained_with_user_time_values_and_reason(url: str) -> None:
    clock = Clock()
    with Historian(url) as hist:
        trail = AuditTrail(hist, clock=clock)
        fill(trail)
        records = trail.records()
        assert [r.seq for r in records] == [1, 2, 3, 4, 5, 6]
        assert records[0].prev_hash == GENESIS_HASH
        for before, rec in itertools.pairwise(records):
            assert rec.prev_hash == before.hash
            assert rec.wall_time == before.wall_time + 60.0  # the injected clock
        for rec in records:
            assert rec.hash == chain_hash(rec.content(), rec.prev_hash)
        tuning = records[1]
        assert (tuning.user, tuning.action, tuning.old_value, tuning.new_value) == (
            "alice",
            "tuning_change",
            48,
            36,
        )
        assert tuning.reason == "CR-118 faster solves"
        assert records[4].new_value == {"points": 312}
        # a batch's records, plus the site-wide ones written during it
        batch = trail.records("B-0001", since=records[0].wall_time, until=records[5].wall_time)
        assert [r.seq for r in batch] == [1, 2, 3, 4, 5, 6]
        assert [r.seq for r in trail.records("B-0001")] == [2, 3, 4, 5]
        assert trail.head() == (6, records[-1].hash)
        assert trail.verify().ok


def test_hash_is_sha256_of_the_canonical_json_and_previous_hash() -> None:
    import hashlib

    content = {"seq": 1, "user": "alice", "new_value": [1.5, None], "reason": "é"}
    expected = hashlib.sha256(
        ('{"new_value":[1.5,null],"reason":"é","seq":1,"user":"alice"}' + "ab").encode()
    ).hexdigest()
    assert chain_hash(content, "ab") == expected
    assert canonical_json({"b": 1, "a": float("nan")}) == '{"a":NaN,"b":1}'


def test_intact_trail_verifies(filled: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = verify(filled, capsys)
    assert code == 0
    assert lines[0].startswith("audit trail intact: 6 records")


def test_edited_record_is_named(filled: str, capsys: pytest.CaptureFixture[str]) -> None:
    execute(filled, "UPDATE audit SET new_value = '0.5' WHERE seq = 4")
    code, lines = verify(filled, capsys)
    assert code == 1
    assert "TAMPERED" in lines[0]
    assert problems(lines) == ["record #4: edited"]


def test_edited_user_of_the_first_record_is_named(
    filled: str, capsys: pytest.CaptureFixture[str]
) -> None:
    execute(filled, "UPDATE audit SET user_name = 'mallory' WHERE seq = 1")
    code, lines = verify(filled, capsys)
    assert code == 1
    assert problems(lines) == ["record #1: edited"]


def test_edit_with_recomputed_hash_is_named(
    filled: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """The forger re-computes record 3's hash but cannot fix record 4's link to it."""
    with Historian(filled) as hist:
        rec = AuditTrail(hist).records()[2]
    forged = {**rec.content(), "reason": "nothing to see"}
    new_hash = chain_hash(forged, rec.prev_hash)
    execute(
        filled,
        f"UPDATE audit SET reason = 'nothing to see', hash = '{new_hash}' WHERE seq = 3",  # noqa: S608 (tampering on purpose)
    )
    code, lines = verify(filled, capsys)
    assert code == 1
    assert problems(lines) == ["record #3: edited"]
    assert "hash re-computed" in lines[1]


def test_deleted_record_is_named(filled: str, capsys: pytest.CaptureFixture[str]) -> None:
    execute(filled, "DELETE FROM audit WHERE seq = 3")
    code, lines = verify(filled, capsys)
    assert code == 1
    assert problems(lines) == ["record #3: deleted"]


def test_deleted_last_record_is_named(filled: str, capsys: pytest.CaptureFixture[str]) -> None:
    execute(filled, "DELETE FROM audit WHERE seq = 6")
    code, lines = verify(filled, capsys)
    assert code == 1
    assert problems(lines) == ["record #6: deleted"]


def test_deletion_hidden_by_renumbering_is_named(
    filled: str, capsys: pytest.CaptureFixture[str]
) -> None:
    execute(
        filled,
        "DELETE FROM audit WHERE seq = 2",
        "UPDATE audit SET seq = -seq WHERE seq > 2",
        "UPDATE audit SET seq = -seq - 1 WHERE seq < 0",
        "UPDATE audit_head SET seq = 5 WHERE id = 1",
    )
    code, lines = verify(filled, capsys)
    assert code == 1
    found = problems(lines)
    assert "record #2: deleted" in found
    assert {"record #3: renumbered", "record #6: renumbered"} <= set(found)
    assert not any("reordered" in p or "edited" in p for p in found)


def test_reordered_records_are_named(filled: str, capsys: pytest.CaptureFixture[str]) -> None:
    execute(
        filled,
        "UPDATE audit SET seq = 100 WHERE seq = 2",
        "UPDATE audit SET seq = 2 WHERE seq = 5",
        "UPDATE audit SET seq = 5 WHERE seq = 100",
    )
    code, lines = verify(filled, capsys)
    assert code == 1
    assert problems(lines) == ["record #2: reordered", "record #5: reordered"]
    assert "written as record #5, now stored as #2" in "\n".join(lines)


def test_inserted_record_is_named(filled: str, capsys: pytest.CaptureFixture[str]) -> None:
    """A forged record with a correct hash, linked after record 2; later numbers shifted."""
    with Historian(filled) as hist:
        two = AuditTrail(hist).records()[1]
    content = {**two.content(), "seq": 3, "reason": "back-dated approval", "user": "mallory"}
    forged_hash = chain_hash(content, two.hash)
    execute(
        filled,
        "UPDATE audit SET seq = -seq WHERE seq >= 3",
        "UPDATE audit SET seq = -seq + 1 WHERE seq < 0",
        "INSERT INTO audit (seq, wall_time, user_name, action, target, old_value, new_value, "  # noqa: S608
        "reason, batch_id, unit, prev_hash, hash) VALUES (3, "
        f"{two.wall_time}, 'mallory', 'tuning_change', '{two.target}', '48', '36', "
        f"'back-dated approval', 'B-0001', 'R1', '{two.hash}', '{forged_hash}')",
        "UPDATE audit_head SET seq = 7 WHERE id = 1",
    )
    code, lines = verify(filled, capsys)
    assert code == 1
    found = problems(lines)
    assert "record #3: inserted" in found
    assert not any("edited" in p or "deleted" in p or "reordered" in p for p in found)


def test_appended_record_outside_the_trail_is_named(
    filled: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with Historian(filled) as hist:
        six = AuditTrail(hist).records()[5]
    content = {**six.content(), "seq": 7, "reason": "forged"}
    execute(
        filled,
        "INSERT INTO audit (seq, wall_time, user_name, action, target, old_value, new_value, "  # noqa: S608
        "reason, batch_id, unit, prev_hash, hash) VALUES (7, "
        f"{six.wall_time}, '{six.user}', '{six.action}', '{six.target}', "
        f"'{json.dumps(six.old_value)}', '{json.dumps(six.new_value)}', 'forged', '', '', "
        f"'{six.hash}', '{chain_hash(content, six.hash)}')",
    )
    code, lines = verify(filled, capsys)
    assert code == 1
    assert problems(lines) == ["record #7: inserted"]


def test_appends_continue_the_chain_after_reopening(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.sqlite'}"
    with Historian(url) as hist:
        AuditTrail(hist, clock=Clock()).login("alice")
    with Historian(url) as hist:
        trail = AuditTrail(hist, clock=Clock(1_800_000_000.0))
        rec = trail.mode_change("R1", "remote", "local", user="bob", reason="maintenance")
        assert rec.seq == 2
        assert trail.verify().ok


def test_concurrent_appends_from_threads_keep_one_chain(url: str) -> None:
    with Historian(url) as hist:
        trail = AuditTrail(hist, clock=Clock())

        def writer(unit: str) -> None:
            for k in range(10):
                trail.setpoint_write(unit, "perfusion_rate", k, k + 1, user="hmpc", reason="MPC")

        threads = [threading.Thread(target=writer, args=(f"R{i}",)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        result = trail.verify()
        assert result.ok, result.issues
        assert result.records == 40
        assert [r.seq for r in trail.records()] == list(range(1, 41))


def test_bad_audit_input_is_refused(tmp_path: Path) -> None:
    with Historian(tmp_path / "h.sqlite") as hist:
        trail = AuditTrail(hist)
        with pytest.raises(ValueError, match="Did you mean 'mode_change'"):
            trail.record("mode_chnage", "R1/mode", user="bob", reason="x")
        with pytest.raises(ValueError, match="needs a reason"):
            trail.mode_change("R1", "local", "remote", user="bob", reason=" ")
        with pytest.raises(ValueError, match="needs the user"):
            trail.login("")
        with pytest.raises(ValueError, match="not JSON"):
            trail.config_change("x", object(), 1, user="bob", reason="r")
        assert trail.records() == []


def test_missing_head_row_makes_appends_fail_loudly(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'h.sqlite'}"
    with Historian(url) as hist:
        trail = AuditTrail(hist)
        trail.login("alice")
        execute(url, "DELETE FROM audit_head")
        with pytest.raises(HistorianError, match="audit head row is missing"):
            trail.login("bob")
        assert not trail.verify().ok


def test_verify_of_a_missing_database_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["audit", "verify", "--historian", f"sqlite:///{tmp_path / 'nope.sqlite'}"])
    assert code == 2
    assert "no historian database" in capsys.readouterr().err
    assert not (tmp_path / "nope.sqlite").exists()

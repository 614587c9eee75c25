"""The controller state the runtime keeps for a restart (controller/runtime/restart.py),
without a network: a real estimator-fed MPC stepping a virtual T-cell plant, its state
stored after every step as full rows and deltas in a real SQLite historian. Every stored
state rebuilds bit for bit; a law restored from it continues exactly like the one that
never stopped; steps recorded after the last state are replayed; a damaged row falls back
to an older intact state. The kill -9 of a real ``hmpc run`` is in
tests/integration/test_restart.py."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from controller.laws.control import ControllerSpec, build_controller
from controller.numerics.measurements import Measurement
from controller.records.historian import Historian
from controller.records.steps import SetpointRecord, StepRecord
from controller.runtime.loop import UnitLoop
from controller.runtime.restart import (
    Checkpoint,
    StateStore,
    apply_law_state,
    capture_law_state,
    estimator_digest,
)
from plant_models.errors import HmpcError
from sim.closed_loop import default_limiter
from sim.patients import VirtualPatient, load_cohort_spec
from sim.plant import VirtualBioreactor

CONFIGS = Path(__file__).resolve().parents[3] / "configs"
BATCH, UNIT = "B-restart", "R1"


def _law(kind: str = "mechanistic-mpc") -> Any:
    return build_controller(
        ControllerSpec(kind, model="tcell", mpc_config=CONFIGS / "mpc_tcell_hourly.toml")
    )


def _usable(ms: list[Measurement]) -> list[Measurement]:
    """What the runtime hands the law: finite values that are not bad."""
    return [m for m in ms if math.isfinite(m.value) and m.quality != "bad"]


class Batch:
    """A law on a virtual plant, hour by hour, with step records and states stored."""

    def __init__(self, historian: Historian, *, full_every: int) -> None:
        self.plant = VirtualBioreactor.for_process(
            "tcell", VirtualPatient.draw(7, load_cohort_spec()[0]), seed=0
        )
        self.limiter = default_limiter(self.plant)
        self.law = _law()
        self.law.start(0.0)
        self.historian = historian
        self.checkpoint = Checkpoint(historian, full_every=full_every)
        self.inputs = {n: self.plant.bounds[n][0] for n in self.plant.model.input_names}
        self.arrived = self.plant.initial_measurements()
        self.digests: list[str] = []

    def step(self, k: int, *, save_state: bool = True) -> dict[str, float]:
        t = self.plant.time_h
        previous = dict(self.inputs)
        proposed = self.law.step(t, _usable(self.arrived), previous)
        self.inputs = self.limiter.apply(proposed, previous, 1.0)
        self.historian.append_step(
            StepRecord(
                batch_id=BATCH,
                unit=UNIT,
                step=k,
                process_time_h=t,
                wall_time=time.time(),
                mode="remote",
                measurements=tuple(UnitLoop._measurement_record(m) for m in self.arrived),
                solver={"success": True},
                setpoints=tuple(
                    SetpointRecord(n, proposed[n], v, "", "Good") for n, v in self.inputs.items()
                ),
            )
        )
        if save_state:
            self.checkpoint._save(self.law, BATCH, UNIT, k, t, dict(self.inputs))
        self.digests.append(estimator_digest(self.law.estimator.snapshot()))
        self.arrived = self.plant.step(self.inputs, 1.0)
        return dict(self.inputs)


def test_every_stored_state_rebuilds_exactly_and_a_restored_law_continues_identically(
    tmp_path: Path,
) -> None:
    with Historian(tmp_path / "h.sqlite") as historian:
        batch = Batch(historian, full_every=8)
        for k in range(36):  # includes late assays (re-processing deep in the history)
            batch.step(k)
        store = StateStore(historian)
        rows = store.rows(BATCH, UNIT)
        assert [r.step for r in rows] == list(range(36))
        kinds = "".join(r.kind[0] for r in rows)  # f: full, d: delta
        print("rows:", kinds)
        assert kinds.startswith("f") and "d" * 7 in kinds and "d" * 8 not in kinds
        for row in rows:  # every state, full or delta chain, bit for bit
            stored = store.load(row.id)
            assert estimator_digest(stored.state["estimator"]) == batch.digests[row.step]
            assert stored.state["step"] == row.step and stored.chain[-1] == row.id
        fulls = [r.json_bytes for r in rows if r.kind == "full"]
        deltas = [r.json_bytes for r in rows if r.kind == "delta"]
        assert max(deltas) < min(fulls[1:])  # the point of the deltas
        print(
            f"state JSON: full {np.mean(fulls) / 1e3:.1f} kB, delta {np.mean(deltas) / 1e3:.1f} "
            f"kB (median {np.median(deltas) / 1e3:.1f}); stored "
            f"{np.mean([r.size_bytes for r in rows]) / 1e3:.1f} kB per row; "
            f"capture {1e3 * np.mean([r.capture_s for r in rows]):.1f} ms per step"
        )

        latest, skipped = store.latest(BATCH, UNIT)
        assert latest is not None and not skipped and latest.row.step == 35
        twin = _law()
        twin.start(0.0)
        restored = apply_law_state(twin, latest.state)
        assert restored.plan and not restored.residual and not restored.notes
        assert estimator_digest(twin.estimator.snapshot()) == batch.digests[-1]
        assert restored.estimate.state == batch.law.last_estimate.state
        for key in ("w", "lam_x", "lam_g", "states", "inputs"):
            np.testing.assert_array_equal(
                getattr(twin.mpc._plan, key), getattr(batch.law.mpc._plan, key)
            )

        # the restored law and the one that never stopped make the same next moves
        t = batch.plant.time_h
        ms = _usable(batch.arrived)
        u_original = batch.law.step(t, ms, batch.inputs)
        u_restored = twin.step(t, ms, batch.inputs)
        assert u_restored == u_original
        assert estimator_digest(twin.estimator.snapshot()) == estimator_digest(
            batch.law.estimator.snapshot()
        )


def test_steps_recorded_after_the_last_state_are_replayed(tmp_path: Path) -> None:
    """The kill fell between step records and their state rows: the estimator catches up
    from the recorded measurements and setpoints and ends where the original was."""
    with Historian(tmp_path / "h.sqlite") as historian:
        batch = Batch(historian, full_every=24)
        for k in range(14):
            batch.step(k, save_state=k < 11)
        last = historian.last_step(BATCH, UNIT)
        assert last is not None and last.step == 13
        twin = _law()
        twin.start(0.0)
        stored, restored, replayed, pending, problems = Checkpoint(historian)._restore(
            twin, BATCH, UNIT, last
        )
        assert stored is not None and stored.row.step == 10 and restored is not None
        assert replayed == 3 and pending == [] and problems == []
        assert estimator_digest(twin.estimator.snapshot()) == batch.digests[13]


def test_a_damaged_state_falls_back_to_an_older_intact_one(tmp_path: Path) -> None:
    with Historian(tmp_path / "h.sqlite") as historian:
        batch = Batch(historian, full_every=4)
        for k in range(10):
            batch.step(k)
        store = StateStore(historian)
        rows = store.rows(BATCH, UNIT)
        assert "".join(r.kind[0] for r in rows) == "fdddfdddfd"  # f: full, d: delta
        with historian.transaction("tamper") as cur:  # a payload edited: its hash fails
            cur.execute("UPDATE controller_state SET payload = ? WHERE id = ?", (b"x", rows[-1].id))
        latest, skipped = store.latest(BATCH, UNIT)
        assert latest is not None and latest.row.step == 8 and len(skipped) == 1
        assert "SHA-256" in skipped[0]
        assert estimator_digest(latest.state["estimator"]) == batch.digests[8]
        with historian.transaction("tamper") as cur:  # a full row deleted: its deltas orphaned
            cur.execute("DELETE FROM controller_state WHERE id = ?", (rows[8].id,))
        latest, skipped = store.latest(BATCH, UNIT)
        assert latest is not None and latest.row.step == 7 and len(skipped) == 1
        assert estimator_digest(latest.state["estimator"]) == batch.digests[7]


def test_state_of_another_law_is_refused_and_stateless_laws_store_nothing() -> None:
    law = _law()
    law.start(0.0)
    state = capture_law_state(law)
    assert state is not None and state["plan"] is None and state["residual"] is None
    rule = build_controller(ControllerSpec("rule", model="tcell"))
    assert capture_law_state(rule) is None
    other = dict(state, law="hybrid-mpc")
    with pytest.raises(HmpcError, match="starts from its prior"):
        apply_law_state(law, other)


class Learner:
    """A residual learner with the restart hook (snapshot/restore), as in-batch learning
    of the GP residual would provide it."""

    def __init__(self) -> None:
        self.points: list[list[float]] = []

    def __call__(
        self, time_h: float, measurements: Any, estimate: Any, previous: Any = None
    ) -> bool:
        self.points.append([time_h, float(estimate.growth_factor)])
        return False

    def snapshot(self) -> dict[str, Any]:
        return {"points": [list(p) for p in self.points]}

    def restore(self, data: dict[str, Any]) -> None:
        self.points = [list(p) for p in data["points"]]


def test_residual_learner_hook_round_trips(tmp_path: Path) -> None:
    with Historian(tmp_path / "h.sqlite") as historian:
        batch = Batch(historian, full_every=24)
        batch.law.learner = Learner()
        for k in range(4):
            batch.step(k)
        kinds = [r.kind for r in StateStore(historian).rows(BATCH, UNIT)]
        assert kinds == ["full", "delta", "delta", "delta"]
        latest, _ = StateStore(historian).latest(BATCH, UNIT)
        assert latest is not None
        twin = _law()
        twin.start(0.0)
        twin.learner = Learner()
        restored = apply_law_state(twin, latest.state)
        assert restored.residual
        assert twin.learner.points == batch.law.learner.points and len(twin.learner.points) == 4


def test_postgresql_stores_and_rebuilds_the_same_states_as_sqlite(
    tmp_path: Path, pg_url: str
) -> None:
    with Historian(tmp_path / "h.sqlite") as lite, Historian(pg_url) as pg:
        batch = Batch(lite, full_every=3)
        twin = Checkpoint(pg, full_every=3)
        for k in range(5):
            batch.step(k)
            t = batch.plant.time_h - 1.0
            twin._save(batch.law, BATCH, UNIT, k, t, dict(batch.inputs))
        a, b = StateStore(lite), StateStore(pg)
        rows_a, rows_b = a.rows(BATCH, UNIT), b.rows(BATCH, UNIT)
        assert [(r.kind, r.step, r.json_bytes) for r in rows_a] == [
            (r.kind, r.step, r.json_bytes) for r in rows_b
        ]
        assert {r.kind for r in rows_b} == {"full", "delta"}
        for ra, rb in zip(rows_a, rows_b, strict=True):
            assert a.load(ra.id).state == b.load(rb.id).state
        latest, _ = b.latest(BATCH, UNIT)
        assert latest is not None
        assert estimator_digest(latest.state["estimator"]) == batch.digests[-1]

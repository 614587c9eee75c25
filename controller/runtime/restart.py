"""Crash-safe restart of ``hmpc run``: the controller's state after every cycle in the
historian, and the resumption of a batch from it.

After each cycle in which the control law stepped, :meth:`Checkpoint.save` appends one row
to the historian's ``controller_state`` table (append-only, one committed transaction,
*after* the cycle's step record):

- the estimator's :meth:`~controller.numerics.estimator.Estimator.snapshot` (its history of up to
  ``history_h`` hours, the validation state), the MPC's last plan (the warm start:
  solution, multipliers, predicted states and inputs, as exact float64), the residual
  learner's data when it has ``snapshot()``/``restore()`` (the hook for in-batch learning),
  the setpoints the loop believes the plant holds, and the step number;
- as a **delta** against the previous row (the estimator's history changes only at its
  end, or from the sample time of a late assay on) and as a **full** state every
  ``full_every`` rows, when the delta would not be smaller, and after any failed write.
  Payload: canonical JSON, zlib level 1, with its SHA-256.

When ``hmpc run`` starts and the plant reports a batch the historian already holds steps of
(and that has no ``batch_end``), :meth:`Checkpoint.resume` rebuilds the latest state (the
newest row whose chain of deltas back to a full row is complete and intact; an older one
otherwise), restores the estimator, the plan and the residual, replays into the estimator
the measurements of any step recorded after that state (the kill fell between a step
record and its state row), hands the measurements of trailing held cycles to the next step,
and records a ``restart`` event and a ``restart`` audit record. The loop continues the step
numbers (``last_step + 1``) and engages bumplessly as after any start: it reads the plant's
setpoints back and moves from there within the rate limits. See docs/runtime.md, "Restart".
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from controller.numerics.measurements import Measurement
from controller.records.historian import Historian, canonical_json
from controller.records.steps import StepRecord
from plant_models.errors import HistorianError, HmpcError

__all__ = [
    "STATE_FORMAT",
    "Checkpoint",
    "StateRow",
    "StateStore",
    "StoredState",
    "apply_law_state",
    "capture_law_state",
    "estimator_digest",
]

log = logging.getLogger(__name__)

#: Format tag of a stored controller state (in every payload).
STATE_FORMAT = "hmpc-controller-state/1"
ENCODING = "zlib+json"
#: A full state every this many rows (once a process day at hourly cycles).
FULL_EVERY = 24
#: Setpoint statuses after which the loop's belief of the plant's setpoint is the value.
_BELIEVED = ("Good", "unchanged", "not written")
#: Notes of a step record whose law step consumed the measurements without a move.
_CONSUMED = ("control law failed", "step abandoned", "control law returned no setpoints")


# ------------------------------------------------------------------------------ law state


def _pack(array: Any) -> dict[str, Any]:
    a = np.ascontiguousarray(np.asarray(array, dtype="<f8"))
    return {"shape": list(a.shape), "data": base64.b64encode(a.tobytes()).decode("ascii")}


def _unpack(d: Mapping[str, Any]) -> np.ndarray[Any, np.dtype[np.float64]]:
    raw = base64.b64decode(str(d["data"]), validate=True)
    shape = tuple(int(n) for n in d["shape"])
    return np.frombuffer(raw, dtype="<f8").reshape(shape).astype(np.float64)


def capture_law_state(law: Any) -> dict[str, Any] | None:
    """What a control law needs to continue exactly, as JSON-compatible data, or None for a
    stateless law (recipe, rule).

    Keys: ``law`` (its name), ``estimator`` (:meth:`Estimator.snapshot`), ``plan`` (the
    MPC's warm start, float64 arrays exact in base64; None before the first accepted
    solve), ``residual`` (``law.learner.snapshot()`` when the learner has one, else None).
    Call it only while no step of the law runs.
    """
    estimator = getattr(law, "estimator", None)
    learner = getattr(law, "learner", None)
    snap = getattr(estimator, "snapshot", None)
    residual_snap = getattr(learner, "snapshot", None)
    if not callable(snap) and not callable(residual_snap):
        return None
    state: dict[str, Any] = {"law": str(getattr(law, "name", type(law).__name__))}
    state["estimator"] = snap() if callable(snap) else None
    plan = getattr(getattr(law, "mpc", None), "_plan", None)
    state["plan"] = (
        None
        if plan is None
        else {
            "time_h": float(plan.time_h),
            **{k: _pack(getattr(plan, k)) for k in ("w", "lam_x", "lam_g", "states", "inputs")},
        }
    )
    state["residual"] = residual_snap() if callable(residual_snap) else None
    return state


@dataclasses.dataclass(frozen=True)
class Restored:
    """What :func:`apply_law_state` restored."""

    estimate: Any = None  # the EstimatorResult at the state's time
    plan: bool = False
    residual: bool = False
    notes: tuple[str, ...] = ()


def apply_law_state(law: Any, state: Mapping[str, Any]) -> Restored:
    """Put a :func:`capture_law_state` result back into a freshly built law of the same
    kind and tuning.

    Raises:
        HmpcError: the state belongs to another law or does not fit it (the estimator's
            :class:`~plant_models.errors.ModelError`); nothing was changed then. A plan
            that does not fit the MPC (its tuning changed) is only skipped, with a note.
    """
    name = str(getattr(law, "name", type(law).__name__))
    if state.get("law") != name:
        raise HmpcError(
            f"the stored controller state is of law {state.get('law')!r}, this unit runs "
            f"{name!r}; the law starts from its prior"
        )
    notes: list[str] = []
    estimate = None
    estimator = getattr(law, "estimator", None)
    if state.get("estimator") is not None and estimator is not None:
        estimate = estimator.restore(state["estimator"])
        law.last_estimate = estimate
        if hasattr(law, "_started"):
            law._started = True  # restored: no re-initialisation at the next step
    plan_ok = False
    mpc = getattr(law, "mpc", None)
    plan = state.get("plan")
    if plan is not None and mpc is not None:
        plan_ok, why = _restore_plan(mpc, plan)
        if not plan_ok:
            notes.append(f"plan not restored ({why}): the next solve starts cold")
    residual_ok = False
    learner = getattr(law, "learner", None)
    if state.get("residual") is not None:
        restore = getattr(learner, "restore", None)
        if callable(restore):
            restore(state["residual"])
            refresh = getattr(mpc, "refresh_residual", None)
            if callable(refresh):
                refresh()
            residual_ok = True
        else:
            notes.append("residual data stored but this law has no learner to restore it")
    return Restored(estimate, plan_ok, residual_ok, tuple(notes))


def _restore_plan(mpc: Any, data: Mapping[str, Any]) -> tuple[bool, str]:
    from controller.numerics.mpc import _Plan

    try:
        arrays = {k: _unpack(data[k]) for k in ("w", "lam_x", "lam_g", "states", "inputs")}
        time_h = float(data["time_h"])
    except (KeyError, TypeError, ValueError) as exc:
        return False, f"malformed: {exc!r}"
    n = int(mpc.horizon)
    expected = {
        "w": (int(mpc.n_variables),),
        "lam_x": (int(mpc.n_variables),),
        "lam_g": (int(mpc.n_constraints),),
        "states": (n + 1, int(mpc.nx)),
        "inputs": (n, int(mpc.nu)),
    }
    for key, shape in expected.items():
        if arrays[key].shape != shape:
            return False, f"{key} has shape {arrays[key].shape}, the MPC needs {shape}"
    if not all(np.all(np.isfinite(a)) for a in arrays.values()) or not math.isfinite(time_h):
        return False, "not finite"
    mpc._plan = _Plan(time_h, **arrays)
    return True, ""


def estimator_digest(snapshot: Mapping[str, Any] | None) -> str:
    """SHA-256 of an estimator snapshot's canonical JSON ("" for none): equal digests,
    equal filter states."""
    if snapshot is None:
        return ""
    return hashlib.sha256(canonical_json(snapshot).encode("utf-8")).hexdigest()


# ------------------------------------------------------------------------------ the store


@dataclasses.dataclass(frozen=True)
class StateRow:
    """One stored state (without its payload)."""

    id: int
    batch_id: str
    unit: str
    step: int
    process_time_h: float
    wall_time: float
    kind: str  # full | delta
    base_id: int | None
    size_bytes: int  # compressed payload
    json_bytes: int  # the payload's JSON
    capture_s: float  # wall seconds to capture, diff and encode it
    sha256: str  # of the compressed payload


@dataclasses.dataclass(frozen=True)
class StoredState:
    """A state rebuilt from the store: the row it ends at and the full state.

    ``state`` keys: ``format``, ``step``, ``time_h``, ``setpoints``, ``law``,
    ``estimator``, ``plan``, ``residual``; ``chain``: the rows applied (full first)."""

    row: StateRow
    state: dict[str, Any]
    chain: tuple[int, ...]


_ROW_COLUMNS = (
    "id, batch_id, unit, step, process_time_h, wall_time, kind, base_id, size_bytes, "
    "json_bytes, capture_s, sha256"
)


def _row(r: Sequence[Any]) -> StateRow:
    return StateRow(
        id=int(r[0]),
        batch_id=str(r[1]),
        unit=str(r[2]),
        step=int(r[3]),
        process_time_h=math.nan if r[4] is None else float(r[4]),
        wall_time=math.nan if r[5] is None else float(r[5]),
        kind=str(r[6]),
        base_id=None if r[7] is None else int(r[7]),
        size_bytes=int(r[8]),
        json_bytes=int(r[9]),
        capture_s=math.nan if r[10] is None else float(r[10]),
        sha256=str(r[11]),
    )


class StateStore:
    """The ``controller_state`` rows of a historian (SQLite or PostgreSQL)."""

    def __init__(self, historian: Historian) -> None:
        self.historian = historian

    def append(
        self,
        *,
        batch_id: str,
        unit: str,
        step: int,
        time_h: float,
        kind: str,
        base_id: int | None,
        text: str,
        capture_s: float,
    ) -> int:
        """Store one payload (JSON text) in one committed transaction; its row id.

        Raises:
            HistorianError: nothing was written.
        """
        blob = zlib.compress(text.encode("utf-8"), 1)
        digest = hashlib.sha256(blob).hexdigest()
        what = f"appending the controller state of step {step} of batch {batch_id!r} {unit!r}"
        with self.historian.transaction(what) as cur:
            row = cur.execute(
                "INSERT INTO controller_state (batch_id, unit, step, process_time_h, wall_time, "
                "kind, base_id, encoding, payload, size_bytes, json_bytes, capture_s, sha256) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    batch_id,
                    unit,
                    int(step),
                    float(time_h),
                    time.time(),
                    kind,
                    base_id,
                    ENCODING,
                    blob,
                    len(blob),
                    len(text),
                    float(capture_s),
                    digest,
                ),
            ).fetchone()
        if row is None:  # pragma: no cover - RETURNING always yields the id
            raise HistorianError(f"historian: {what}: the database returned no id")
        return int(row[0])

    def rows(self, batch_id: str, unit: str) -> list[StateRow]:
        """The stored states of a unit in a batch, oldest first (no payloads)."""
        found = self.historian.query(
            f"SELECT {_ROW_COLUMNS} FROM controller_state WHERE batch_id = ? AND unit = ? "  # noqa: S608 (fixed SQL; values are parameters)
            "ORDER BY id",
            (batch_id, unit),
            what=f"listing the controller states of batch {batch_id!r} unit {unit!r}",
        )
        return [_row(r) for r in found]

    def _payloads(self, ids: Sequence[int]) -> dict[int, tuple[str, bytes]]:
        marks = ", ".join("?" for _ in ids)
        found = self.historian.query(
            f"SELECT id, encoding, payload FROM controller_state WHERE id IN ({marks})",  # noqa: S608
            list(ids),
            what="reading controller states",
        )
        return {int(r[0]): (str(r[1]), bytes(r[2])) for r in found}

    def load(self, row_id: int, rows: Sequence[StateRow] | None = None) -> StoredState:
        """The full state at row ``row_id`` (its delta chain applied).

        Raises:
            HistorianError: the chain is broken (a row missing), a payload does not match
                its hash or cannot be decoded.
        """
        by_id = {r.id: r for r in rows} if rows is not None else None
        if by_id is None or row_id not in by_id:
            found = self.historian.query(
                f"SELECT {_ROW_COLUMNS} FROM controller_state WHERE id = ?",  # noqa: S608
                (row_id,),
                what="reading a controller state",
            )
            if not found:
                raise HistorianError(f"controller state #{row_id} does not exist")
            first = _row(found[0])
            by_id = {r.id: r for r in self.rows(first.batch_id, first.unit)}
        chain = [by_id[row_id]]
        while chain[-1].kind == "delta":
            base = chain[-1].base_id
            if base is None or base not in by_id or len(chain) > len(by_id):
                raise HistorianError(
                    f"controller state #{chain[-1].id}: its base #{base} is missing"
                )
            chain.append(by_id[base])
        chain.reverse()
        payloads = self._payloads([r.id for r in chain])
        steps: list[Any] = []
        residual: Any = None
        meta: dict[str, Any] = {}
        for r in chain:
            if r.id not in payloads:
                raise HistorianError(f"controller state #{r.id}: payload missing")
            encoding, blob = payloads[r.id]
            if hashlib.sha256(blob).hexdigest() != r.sha256:
                raise HistorianError(
                    f"controller state #{r.id}: the payload does not match its SHA-256"
                )
            if encoding != ENCODING:
                raise HistorianError(f"controller state #{r.id}: unknown encoding {encoding!r}")
            try:
                data = json.loads(zlib.decompress(blob).decode("utf-8"))
                meta = dict(data["meta"])
                if meta.get("format") != STATE_FORMAT:
                    raise ValueError(f"format {meta.get('format')!r}")
                if r.kind == "full":
                    steps = list(data["steps"])
                else:
                    drop, keep = int(meta["delta"]["drop"]), int(meta["delta"]["keep"])
                    if drop < 0 or keep < 0 or drop + keep > len(steps):
                        raise ValueError(f"delta {drop}+{keep} beyond {len(steps)} steps")
                    steps = steps[drop : drop + keep] + list(data["steps"])
                if meta.get("residual_from_base"):
                    meta["residual"] = residual
                residual = meta.get("residual")
            except (ValueError, KeyError, TypeError, zlib.error) as exc:
                raise HistorianError(
                    f"controller state #{r.id}: cannot be decoded ({exc!r})"
                ) from None
        state = {k: v for k, v in meta.items() if k not in ("delta", "residual_from_base")}
        if state.get("estimator") is not None:
            state["estimator"] = {**state["estimator"], "steps": steps}
        return StoredState(chain[-1], state, tuple(r.id for r in chain))

    def latest(self, batch_id: str, unit: str) -> tuple[StoredState | None, list[str]]:
        """The newest intact state of a unit in a batch, and why newer rows were skipped."""
        rows = self.rows(batch_id, unit)
        skipped: list[str] = []
        for row in reversed(rows):
            try:
                return self.load(row.id, rows), skipped
            except HistorianError as exc:
                log.error("unit=%s batch=%s %s; trying an older state", unit, batch_id, exc)
                skipped.append(str(exc))
                if len(skipped) >= 3 * FULL_EVERY:
                    break
        return None, skipped


# ------------------------------------------------------------------------------ per unit


class Checkpoint:
    """Saves a unit's state after each cycle and resumes a batch at start (one per unit).

    Args:
        historian: where the states, the restart event's audit record and the earlier
            steps live.
        full_every: a full state every this many rows (deltas in between).
        user: the audit trail's user for the restart record.
    """

    def __init__(
        self, historian: Historian, *, full_every: int = FULL_EVERY, user: str = "hmpc"
    ) -> None:
        if full_every < 1:
            raise ValueError(f"full_every must be at least 1, got {full_every!r}")
        self.historian = historian
        self.store = StateStore(historian)
        self.full_every = full_every
        self.user = user
        self.saved = 0
        self.failures = 0
        # the last stored row: id, its estimator steps (times, JSON texts), residual JSON,
        # rows since the last full one
        self._base: tuple[int, list[float], list[str], str, int] | None = None

    # -- saving ----------------------------------------------------------------------------
    async def save(self, unit_loop: Any, step: int, time_h: float) -> None:
        """Store the unit's state after cycle ``step`` (in the unit's worker thread, which
        is idle: call it only when no step of the law runs). A failure is logged and the
        next row is a full state; control goes on."""
        if not unit_loop.summary.batch_id or unit_loop._unsaved:
            return  # no batch yet, or the step record is not stored yet (kept for retry)
        setpoints = {k: float(v) for k, v in (unit_loop._setpoints or {}).items()}
        call = functools.partial(
            self._save,
            unit_loop.law,
            unit_loop.summary.batch_id,
            unit_loop.io.unit,
            step,
            time_h,
            setpoints,
        )
        try:
            await asyncio.get_running_loop().run_in_executor(unit_loop._executor, call)
        except Exception as exc:  # storing the state must never stop control
            self.failures += 1
            self._base = None
            log.error(
                "unit=%s controller state of step %d not stored (%s); a restart would resume "
                "from an older state",
                unit_loop.io.unit,
                step,
                exc,
            )

    def _save(
        self,
        law: Any,
        batch_id: str,
        unit: str,
        step: int,
        time_h: float,
        setpoints: dict[str, float],
    ) -> None:
        started = time.perf_counter()
        captured = capture_law_state(law)
        if captured is None:
            return  # a stateless law: the step records are all a restart needs
        estimator = captured.pop("estimator")
        steps = list(estimator.get("steps", ())) if estimator is not None else []
        times = [float(s["time_h"]) for s in steps]
        texts = [canonical_json(s) for s in steps]
        if estimator is not None:
            estimator = {k: v for k, v in estimator.items() if k != "steps"}
        residual_text = canonical_json(captured.get("residual"))
        meta: dict[str, Any] = {
            "format": STATE_FORMAT,
            "step": int(step),
            "time_h": float(time_h),
            "setpoints": setpoints,
            "law": captured["law"],
            "estimator": estimator,
            "plan": captured["plan"],
            "residual": captured["residual"],
        }
        kind, base_id, tail = "full", None, texts
        base = self._base
        if base is not None and base[4] + 1 < self.full_every:
            base_id, old_times, old, old_residual, _ = base
            drop, keep = _common(old_times, old, times, texts)
            if keep >= len(texts) // 2:
                kind, tail = "delta", texts[keep:]
                meta["delta"] = {"drop": drop, "keep": keep}
                if residual_text == old_residual:
                    meta["residual"] = None
                    meta["residual_from_base"] = True
            else:
                base_id = None
        text = '{"meta":' + canonical_json(meta) + ',"steps":[' + ",".join(tail) + "]}"
        row_id = self.store.append(
            batch_id=batch_id,
            unit=unit,
            step=step,
            time_h=time_h,
            kind=kind,
            base_id=base_id,
            text=text,
            capture_s=time.perf_counter() - started,
        )
        since_full = 0 if kind == "full" else (base[4] + 1 if base is not None else 0)
        self._base = (row_id, times, texts, residual_text, since_full)
        self.saved += 1

    # -- write-ahead reconciliation ---------------------------------------------------------
    async def reconcile(self, unit_loop: Any, time_h: float) -> int:
        """Settle the write intents an earlier run of this unit left pending in the plant's
        batch (stored before a write, never confirmed: the process died or the historian
        failed in between) by reading the plant's setpoints back: each is closed as
        ``reconciled`` with the read-back, a verdict (``written``: the plant holds the
        intended values; ``not written``: it holds the previous ones; ``differs``: neither,
        e.g. an operator changed them since; ``undetermined``: not written-looking while the
        plant has shed to fallback setpoints, which hide what it held before) and a
        ``setpoint_write`` audit record, in one transaction, and a ``reconcile`` event.
        Returns how many were settled; when the plant cannot be read they stay pending (the
        next start tries again)."""
        from controller.records.audit import AuditTrail

        batch, unit = unit_loop.summary.batch_id, unit_loop.io.unit
        try:
            pending = self.historian.intents(batch, unit, state="pending")
        except HistorianError as exc:
            log.critical("unit=%s cannot read the write intents (%s)", unit, exc)
            return 0
        if not pending:
            return 0
        try:
            readback = {k: float(v) for k, v in (await unit_loop.io.read_setpoints()).items()}
        except Exception as exc:  # the plant cannot be read: settle at a later start
            log.critical(
                "unit=%s %d unconfirmed write intent(s) not reconciled: the plant's setpoints "
                "cannot be read back (%r)",
                unit,
                len(pending),
                exc,
            )
            return 0
        status = unit_loop.io.status()
        shed = bool(status.connected and status.fallback)
        # the safe values the plant moves to on shed (none published: it holds them; the
        # limits not known yet: assume it may have moved them)
        limits = unit_loop.io.limits()
        plant_fallback = dict(getattr(limits, "fallback", None) or {})
        trail = AuditTrail(self.historian)
        settled = 0
        for intent in pending:
            latest = intent is pending[-1]
            items = {}
            for name, value in intent.target.items():
                plant = readback.get(name, math.nan)
                before = intent.previous.get(name, math.nan)
                if _close(value, before):
                    continue  # not changed by this bundle: tells nothing
                if _close(plant, value):
                    items[name] = "written"
                elif _close(plant, before):
                    items[name] = "not written"
                else:
                    items[name] = "differs"
            verdicts = set(items.values())
            verdict = (
                verdicts.pop()
                if len(verdicts) == 1
                else "partly written"
                if verdicts
                else "written"  # (no item changed: plant and intent agree)
            )
            moved = limits is None or any(n in plant_fallback for n in items)
            if shed and moved and verdict != "written":
                # the watchdog's shed moved the setpoints to the plant's fallback since:
                # today's read-back cannot tell whether the bundle had reached the plant
                verdict = f"undetermined (the plant has shed to its fallback; read-back {verdict})"
            if not latest and verdict != "written" and not verdict.startswith("undetermined"):
                # only the newest intent can be judged by today's read-back: an older
                # one was followed by other writes
                verdict = f"superseded ({verdict} by today's read-back)"
            outcome = {
                "verdict": verdict,
                "items": items,
                "readback": readback,
                "reconciled_at_h": float(time_h),
            }
            reason = (
                f"write intent {intent.id} of step {intent.step} ({intent.reason}) found "
                f"unconfirmed at a restart; plant read back: {verdict}"
            )

            def audit(cur: Any, _i: Any = intent, _r: str = reason) -> None:
                trail.append(
                    cur,
                    "setpoint_write",
                    f"{unit}/setpoints",
                    user=self.user,
                    reason=_r,
                    old=dict(_i.previous),
                    new={"intended": dict(_i.target), "plant": readback},
                    batch_id=batch,
                    unit=unit,
                )

            try:
                self.historian.close_intent(intent, "reconciled", outcome, also=audit)
            except HistorianError as exc:
                log.critical("unit=%s write intent %d not reconciled: %s", unit, intent.id, exc)
                continue
            settled += 1
            unit_loop._event(
                "reconcile",
                "warning",
                reason,
                time_h,
                intent_id=intent.id,
                step=intent.step,
                target=dict(intent.target),
                previous=dict(intent.previous),
                **outcome,
            )
        return settled

    # -- resuming --------------------------------------------------------------------------
    async def resume(self, unit_loop: Any, time_h: float) -> None:
        """Resume the plant's batch if the historian holds steps of it for this unit and it
        has not ended: restore the law and the loop, record the restart (event and audit).
        Call right after the loop learnt the batch id and continued the step numbers."""
        batch, unit = unit_loop.summary.batch_id, unit_loop.io.unit
        self._base = None
        if not batch:
            return
        try:
            last = self.historian.last_step(batch, unit)
            if last is None:
                return
            events = self.historian.events(batch, unit)
        except HistorianError as exc:
            log.critical("unit=%s cannot read batch %s back (%s): not resumed", unit, batch, exc)
            return
        if any(e.kind == "batch_end" for e in events):
            log.info("unit=%s batch %s has ended: nothing to resume", unit, batch)
            return
        clean = bool(events) and (
            events[-1].kind == "shutdown"
            or (events[-1].kind == "mode" and "handed back" in events[-1].message)
        )
        call = functools.partial(self._restore, unit_loop.law, batch, unit, last)
        try:
            outcome = await asyncio.get_running_loop().run_in_executor(unit_loop._executor, call)
        except Exception as exc:  # a failed resumption must not stop control: start afresh
            log.critical("unit=%s batch=%s state not restored", unit, batch, exc_info=exc)
            outcome = (None, None, 0, [], [f"state not restored: {exc!r}"])
        stored, restored, replayed, pending, problems = outcome
        # what the plant held at the stop, as far as the records know (until the read-back
        # at engagement, which is what the first move starts from)
        known = {s.name: float(s.value) for s in last.setpoints if math.isfinite(s.value)}
        if stored is not None:
            known = dict(stored.state.get("setpoints") or {}) or known
        unit_loop._setpoints = known or None
        if pending:
            unit_loop._buffer = [*pending, *unit_loop._buffer]
        data: dict[str, Any] = {
            "previous_run": "clean shutdown" if clean else "unclean stop (no shutdown record)",
            "last_step": last.step,
            "last_step_time_h": last.process_time_h,
            "resumed_at_step": int(unit_loop._step),
            "last_recorded_setpoints": {s.name: s.value for s in last.setpoints},
            "state": None,
            "replayed_steps": replayed,
            "measurements_handed_on": len(pending),
            "problems": problems,
        }
        if stored is not None:
            data["state"] = {
                "id": stored.row.id,
                "step": stored.row.step,
                "time_h": stored.row.process_time_h,
                "rows_applied": len(stored.chain),
                "setpoints": stored.state.get("setpoints"),
                "estimator_sha256": estimator_digest(stored.state.get("estimator")),
                "plan": bool(restored.plan) if restored is not None else False,
                "residual": bool(restored.residual) if restored is not None else False,
            }
            # the estimate the law continues from (after any replay) and its filter state
            law_estimator = getattr(unit_loop.law, "estimator", None)
            est = getattr(unit_loop.law, "last_estimate", None)
            if restored is not None and est is not None and law_estimator is not None:
                data["estimate_time_h"] = float(est.time_h)
                data["estimate"] = {k: float(v) for k, v in est.state.items()}
                data["estimate_std"] = {k: float(v) for k, v in est.std.items()}
                data["estimator_sha256"] = estimator_digest(law_estimator.snapshot())
        what = (
            f"resumed batch {batch} at step {unit_loop._step} from the historian"
            + (
                f" (state of step {stored.row.step}"
                + (f", {replayed} step(s) replayed" if replayed else "")
                + ")"
                if stored is not None
                else " (no controller state stored: a stateless law, or it starts afresh)"
            )
            + ("" if clean else " after an unclean stop")
        )
        unit_loop._event(
            "restart", "info" if clean and not problems else "warning", what, time_h, **data
        )
        self._audit(batch, unit, last, unit_loop._step, data, what)

    def _restore(
        self, law: Any, batch: str, unit: str, last: StepRecord
    ) -> tuple[StoredState | None, Restored | None, int, list[Measurement], list[str]]:
        problems: list[str] = []
        stored, skipped = self.store.latest(batch, unit)
        problems.extend(f"skipped: {s}" for s in skipped)
        restored: Restored | None = None
        if stored is not None:
            try:
                restored = apply_law_state(law, stored.state)
                problems.extend(restored.notes)
            except HmpcError as exc:
                problems.append(f"state not restored: {exc}")
                log.error("unit=%s batch=%s state not restored: %s", unit, batch, exc)
                stored = None
        since = stored.row.step if stored is not None else -1
        replayed = 0
        pending: list[Measurement] = []
        if last.step > since:
            try:
                records = [s for s in self.historian.steps(batch, unit) if s.step > since]
            except HistorianError as exc:
                problems.append(f"steps after the state not read: {exc}")
                records = []
            belief = dict(stored.state.get("setpoints") or {}) if stored is not None else {}
            replayed, pending = _replay(law if restored is not None else None, records, belief)
        return stored, restored, replayed, pending, problems

    def _audit(
        self, batch: str, unit: str, last: StepRecord, step: int, data: Mapping[str, Any], what: str
    ) -> None:
        from controller.records.audit import AuditTrail

        state = data.get("state") or {}
        try:
            AuditTrail(self.historian).record(
                "restart",
                unit,
                user=self.user,
                reason=f"hmpc run started on a running batch: {what}",
                old={"step": last.step, "process_time_h": last.process_time_h},
                new={
                    "step": step,
                    "state_step": state.get("step"),
                    "estimator_sha256": data.get("estimator_sha256", ""),
                },
                batch_id=batch,
                unit=unit,
            )
        except (HmpcError, OSError, ValueError) as exc:
            log.critical("unit=%s restart audit record not written: %s", unit, exc)


def _close(a: float, b: float) -> bool:
    return math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-9 + 1e-6 * abs(b)


def _common(
    old_times: Sequence[float], old: Sequence[str], times: Sequence[float], new: Sequence[str]
) -> tuple[int, int]:
    """(drop, keep): ``new`` starts with ``old[drop:drop + keep]`` (the history's front
    pruned, then the unchanged steps, compared as canonical JSON, so bit for bit); the
    rest of ``new`` is the delta's tail."""
    if not new:
        return len(old), 0
    drop = next((i for i, t in enumerate(old_times) if t >= times[0]), len(old))
    keep = 0
    limit = min(len(old) - drop, len(new))
    while keep < limit and old[drop + keep] == new[keep]:
        keep += 1
    return drop, keep


def _measurement(m: Any) -> Measurement:
    return Measurement(
        name=m.name,
        value=float(m.value),
        unit=m.unit,
        sample_time=float(m.sample_time_h),
        arrival_time=float(m.arrival_time_h),
        source=m.source,
        quality=m.quality,
    )


def _replay(
    law: Any, records: Sequence[StepRecord], belief: dict[str, float]
) -> tuple[int, list[Measurement]]:
    """Feed the estimator what the law received in the steps recorded after the stored
    state: the accepted measurements since the law's previous step, at each step where it
    stepped (some setpoint item other than ``not written``: the move followed), with the
    setpoints the loop believed the plant held. A step where the law failed or was
    abandoned consumed its measurements too (as in the original run), without a replay.
    Returns (steps replayed, measurements of trailing held cycles for the next step).
    Without a restored ``law`` nothing is replayed."""
    estimator = getattr(law, "estimator", None) if law is not None else None
    pending: list[Measurement] = []
    replayed = 0
    for rec in sorted(records, key=lambda r: r.step):
        pending.extend(
            _measurement(m)
            for m in rec.measurements
            # (the estimator received the ones it rejected itself: replayed as in the run)
            if (m.accepted or m.reason.startswith("estimator:"))
            and math.isfinite(m.value)
            and m.quality != "bad"
        )
        stepped = any(sp.status != "not written" for sp in rec.setpoints)
        failed = any(n.startswith(_CONSUMED) for n in rec.notes)
        if stepped and estimator is not None:
            try:
                estimate = estimator.update(rec.process_time_h, dict(belief), pending)
            except (HmpcError, ValueError) as exc:
                log.error("replay of step %d stopped: %s", rec.step, exc)
                return replayed, []
            law.last_estimate = estimate
            replayed += 1
        if stepped or failed:
            pending = []
        for sp in rec.setpoints:
            if sp.status in _BELIEVED and math.isfinite(sp.value):
                belief[sp.name] = float(sp.value)
    return replayed, pending

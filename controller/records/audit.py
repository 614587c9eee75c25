"""The GMP audit trail (21 CFR Part 11, EU GMP Annex 11): who changed what, when, from
what to what, and why. Append-only and hash-chained, in the historian's database.

Every record carries a sequence number (1, 2, ...), the controller's clock, the user, the
action, the target, the old and new values (JSON), the reason and the batch and unit it
concerns. Its hash is ``SHA-256(canonical JSON of those fields + previous record's hash)``
(the first record chains to 64 zeros), and a one-row ``audit_head`` table holds the number
and hash of the last record, written in the same transaction. :meth:`AuditTrail.verify`
(``hmpc audit verify``) re-computes the chain and reports every edited, deleted, reordered
or inserted record by its sequence number.

What a hash chain cannot do: someone with write access who rewrites a record *and*
recomputes every later hash and the head leaves a consistent chain. Anchor the head hash
outside the database (it is printed by ``hmpc audit verify`` and in each batch report)
and compare it later; see docs/historian.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from controller.records.anchor import read_anchor
from controller.records.historian import (
    Historian,
    LedgerEntry,
    canonical_json,
    default_url,
    event_digest,
    intent_close_digest,
    intent_open_digest,
    ledger_hash,
    step_digest,
)
from plant_models.config import suggest
from plant_models.errors import HistorianError

__all__ = [
    "ACTIONS",
    "GENESIS_HASH",
    "AuditIssue",
    "AuditRecord",
    "AuditTrail",
    "AuditVerification",
    "RecordVerification",
    "add_audit_parser",
    "chain_hash",
    "verify_historian",
    "verify_records",
]

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64

#: The actions of the audit trail and what each records.
ACTIONS: Mapping[str, str] = {
    "config_change": "a configuration value (site, I/O, recipe) changed",
    "tuning_change": "a controller tuning value (horizon, weights, limits, policy) changed",
    "mode_change": "the control mode of a unit changed",
    "setpoint_write": "a setpoint was written to the plant",
    "residual_update": "a residual (GP) model was updated or replaced",
    "login": "a user logged in",
    "logout": "a user logged out",
    "login_failed": "a login was refused",
    "restart": "the controller restarted and resumed a batch",
    "config_load": "a configuration file was loaded (its path and SHA-256)",
}

#: Upper bound of hash evaluations spent locating moved chain fragments in one verification.
_SEARCH_BUDGET = 2_000_000


def chain_hash(content: Mapping[str, Any], prev_hash: str) -> str:
    """SHA-256 (hex) of the canonical JSON of ``content`` followed by ``prev_hash``."""
    return hashlib.sha256((canonical_json(content) + prev_hash).encode("utf-8")).hexdigest()


@dataclasses.dataclass(frozen=True)
class AuditRecord:
    """One entry of the audit trail.

    Attributes:
        seq: sequence number, 1 for the first record.
        wall_time: controller clock, Unix seconds.
        user: who (a person's login, or ``hmpc`` for the controller itself).
        action: one of :data:`ACTIONS`.
        target: what changed (``configs/mpc_tcell.toml: horizon``, ``R1/perfusion_rate``).
        old_value, new_value: JSON values before and after (None when not applicable).
        reason: why.
        batch_id, unit: the batch and unit concerned (``""`` for site-wide records).
        prev_hash: hash of the previous record.
        hash: this record's hash.
    """

    seq: int
    wall_time: float
    user: str
    action: str
    target: str
    old_value: Any
    new_value: Any
    reason: str
    batch_id: str = ""
    unit: str = ""
    prev_hash: str = GENESIS_HASH
    hash: str = ""

    def content(self, seq: int | None = None) -> dict[str, Any]:
        """The hashed fields (with another ``seq`` when given: used to locate moved records)."""
        return {
            "seq": self.seq if seq is None else seq,
            "wall_time": self.wall_time,
            "user": self.user,
            "action": self.action,
            "target": self.target,
            "old_value": self.old_value,
            "new_value": self.new_value,
            "reason": self.reason,
            "batch_id": self.batch_id,
            "unit": self.unit,
        }


@dataclasses.dataclass(frozen=True)
class AuditIssue:
    """One finding of a verification.

    Attributes:
        seq: the record's sequence number as written (as stored for an inserted record).
        problem: ``edited``, ``deleted``, ``reordered``, ``inserted``, ``renumbered`` or
            ``head``.
        detail: what is wrong, in words.
    """

    seq: Any
    problem: str
    detail: str

    def __str__(self) -> str:
        return f"record #{self.seq}: {self.problem}: {self.detail}"


@dataclasses.dataclass(frozen=True)
class AuditVerification:
    """Result of :meth:`AuditTrail.verify`: ``ok`` when the chain is intact."""

    records: int
    head_seq: int
    head_hash: str
    issues: tuple[AuditIssue, ...]

    @property
    def ok(self) -> bool:
        return not self.issues


_COLUMNS = (
    "seq, wall_time, user_name, action, target, old_value, new_value, reason, batch_id, unit, "
    "prev_hash, hash"
)


def _loads(text: Any) -> Any:
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return {"$unreadable": str(text)}  # an edited value that is no JSON: never matches


def _record(row: Sequence[Any]) -> AuditRecord:
    wall = row[1]
    return AuditRecord(
        seq=row[0],
        wall_time=math.nan if wall is None else float(wall),
        user=str(row[2]),
        action=str(row[3]),
        target=str(row[4]),
        old_value=_loads(row[5]),
        new_value=_loads(row[6]),
        reason=str(row[7]),
        batch_id=str(row[8]),
        unit=str(row[9]),
        prev_hash=str(row[10]),
        hash=str(row[11]),
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class AuditTrail:
    """Append-only, hash-chained audit records in a historian's database.

    Args:
        historian: where the records live (SQLite or PostgreSQL).
        clock: the controller's clock, Unix seconds (injectable for simulation and tests).
    """

    def __init__(self, historian: Historian, *, clock: Callable[[], float] = time.time) -> None:
        self.historian = historian
        self.clock = clock

    # -------------------------------------------------------------- writing

    def record(
        self,
        action: str,
        target: str,
        *,
        user: str,
        reason: str,
        old: Any = None,
        new: Any = None,
        batch_id: str = "",
        unit: str = "",
    ) -> AuditRecord:
        """Append one record in one committed transaction and return it.

        Raises:
            ValueError: unknown action, empty user or reason, values that are not JSON.
            HistorianError: the database failed (nothing was written).
        """
        self._check(action, target, user, reason, old, new)
        with self.historian.transaction(f"appending a {action} audit record") as cur:
            rec = self.append(
                cur,
                action,
                target,
                user=user,
                reason=reason,
                old=old,
                new=new,
                batch_id=batch_id,
                unit=unit,
            )
        log.debug("audit #%d %s %s by %s", rec.seq, action, target, user)
        return rec

    @staticmethod
    def _check(action: str, target: str, user: str, reason: str, old: Any, new: Any) -> None:
        if action not in ACTIONS:
            raise ValueError(
                f"audit action {action!r} is unknown.{suggest(action, ACTIONS)} Choose one of "
                f"{', '.join(ACTIONS)}"
            )
        if not user.strip():
            raise ValueError("an audit record needs the user who made the change")
        if not reason.strip():
            raise ValueError(f"an audit record ({action} of {target!r}) needs a reason")
        try:
            canonical_json(old), canonical_json(new)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"audit {action} of {target!r}: value is not JSON: {exc}") from exc

    def append(
        self,
        cur: Any,
        action: str,
        target: str,
        *,
        user: str,
        reason: str,
        old: Any = None,
        new: Any = None,
        batch_id: str = "",
        unit: str = "",
    ) -> AuditRecord:
        """Append one record inside the caller's transaction ``cur`` of the historian (so
        that a record and the change it documents are committed together).

        Raises:
            ValueError: as :meth:`record`.
            HistorianError: the audit head row is missing.
        """
        self._check(action, target, user, reason, old, new)
        old_text, new_text = canonical_json(old), canonical_json(new)
        wall = float(self.clock())
        lock = " FOR UPDATE" if self.historian.dialect == "postgresql" else ""
        head = cur.execute(f"SELECT seq, hash FROM audit_head WHERE id = 1{lock}").fetchone()  # noqa: S608 (fixed SQL; values are parameters)
        if head is None:
            raise HistorianError(
                f"historian {self.historian.display_url}: the audit head row is missing; "
                "the audit trail was tampered with. Run `hmpc audit verify`"
            )
        rec = AuditRecord(
            seq=int(head[0]) + 1,
            wall_time=wall,
            user=user,
            action=action,
            target=target,
            old_value=json.loads(old_text),
            new_value=json.loads(new_text),
            reason=reason,
            batch_id=batch_id,
            unit=unit,
            prev_hash=str(head[1]),
        )
        rec = dataclasses.replace(rec, hash=chain_hash(rec.content(), rec.prev_hash))
        cur.execute(
            f"INSERT INTO audit ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",  # noqa: S608
            (
                rec.seq,
                rec.wall_time,
                user,
                action,
                target,
                old_text,
                new_text,
                reason,
                batch_id,
                unit,
                rec.prev_hash,
                rec.hash,
            ),
        )
        cur.execute("UPDATE audit_head SET seq = ?, hash = ? WHERE id = 1", (rec.seq, rec.hash))
        if self.historian.schema_version >= 2:
            self.historian.chain(cur, "audit", batch_id, unit, str(rec.seq), rec.hash)
        return rec

    def config_change(
        self, target: str, old: Any, new: Any, *, user: str, reason: str, batch_id: str = ""
    ) -> AuditRecord:
        """A configuration value changed (``target``: file and key)."""
        return self.record(
            "config_change", target, user=user, reason=reason, old=old, new=new, batch_id=batch_id
        )

    def tuning_change(
        self,
        target: str,
        old: Any,
        new: Any,
        *,
        user: str,
        reason: str,
        batch_id: str = "",
        unit: str = "",
    ) -> AuditRecord:
        """A tuning value of the controller changed."""
        return self.record(
            "tuning_change",
            target,
            user=user,
            reason=reason,
            old=old,
            new=new,
            batch_id=batch_id,
            unit=unit,
        )

    def mode_change(
        self, unit: str, old: str, new: str, *, user: str, reason: str, batch_id: str = ""
    ) -> AuditRecord:
        """The control mode of ``unit`` changed."""
        return self.record(
            "mode_change",
            f"{unit}/mode",
            user=user,
            reason=reason,
            old=old,
            new=new,
            batch_id=batch_id,
            unit=unit,
        )

    def setpoint_write(
        self,
        unit: str,
        name: str,
        old: float | None,
        new: float,
        *,
        user: str,
        reason: str,
        batch_id: str = "",
    ) -> AuditRecord:
        """A setpoint ``name`` of ``unit`` was written (canonical unit)."""
        return self.record(
            "setpoint_write",
            f"{unit}/{name}",
            user=user,
            reason=reason,
            old=old,
            new=new,
            batch_id=batch_id,
            unit=unit,
        )

    def residual_update(
        self,
        target: str,
        old: Any,
        new: Any,
        *,
        user: str,
        reason: str,
        batch_id: str = "",
        unit: str = "",
    ) -> AuditRecord:
        """A residual (GP) model was updated (``old``/``new``: e.g. file hash and points)."""
        return self.record(
            "residual_update",
            target,
            user=user,
            reason=reason,
            old=old,
            new=new,
            batch_id=batch_id,
            unit=unit,
        )

    def login(self, user: str, *, success: bool = True, reason: str = "interactive") -> AuditRecord:
        """A login (or a refused one)."""
        return self.record(
            "login" if success else "login_failed", "session", user=user, reason=reason
        )

    # -------------------------------------------------------------- reading

    def records(
        self,
        batch_id: str | None = None,
        *,
        since: float | None = None,
        until: float | None = None,
    ) -> list[AuditRecord]:
        """Records in sequence order: all, or those of ``batch_id`` plus the site-wide ones
        (empty batch id) written between ``since`` and ``until`` (controller clock)."""
        sql = f"SELECT {_COLUMNS} FROM audit"  # noqa: S608
        params: list[Any] = []
        if batch_id is not None:
            sql += " WHERE batch_id = ?"
            params.append(batch_id)
            if since is not None and until is not None:
                sql += " OR (batch_id = '' AND wall_time >= ? AND wall_time <= ?)"
                params += [since, until]
        rows = self.historian.query(sql + " ORDER BY seq", params, what="reading the audit trail")
        return [_record(r) for r in rows]

    def head(self) -> tuple[int, str]:
        """Sequence number and hash of the last record (``(0, 64 zeros)`` when empty)."""
        rows = self.historian.query(
            "SELECT seq, hash FROM audit_head WHERE id = 1", what="reading the audit head"
        )
        if not rows:
            return -1, ""
        return int(rows[0][0]), str(rows[0][1])

    # -------------------------------------------------------------- verification

    def verify(self) -> AuditVerification:
        """Re-compute the chain and report every edited, deleted, reordered or inserted
        record (see the module docstring for what a chain cannot detect)."""
        rows = self.records()
        head_seq, head_hash = self.head()
        issues = _verify(rows, head_seq, head_hash)
        return AuditVerification(len(rows), head_seq, head_hash, tuple(issues))


def _verify(rows: Sequence[AuditRecord], head_seq: int, head_hash: str) -> list[AuditIssue]:
    """The chain analysis of :meth:`AuditTrail.verify` (rows in stored sequence order)."""
    issues: list[AuditIssue] = []
    n = len(rows)
    by_hash: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        by_hash.setdefault(r.hash, []).append(i)
    referenced = {r.prev_hash for r in rows}

    # 1. fragments of the chain as linked by the stored hashes: root and depth of each row
    root_depth: dict[int, tuple[int, int]] = {}
    for i in range(n):
        stack: list[int] = []
        j = i
        while j not in root_depth and j not in stack:
            stack.append(j)
            preds = [p for p in by_hash.get(rows[j].prev_hash, []) if p != j]
            if rows[j].prev_hash == GENESIS_HASH or not preds:
                break
            j = preds[0]
        if j in root_depth:
            root, depth = root_depth[j]
        else:  # stack[-1] is a root (genesis, unknown predecessor or a forged cycle)
            root, depth = stack[-1], -1
            if j in stack and j != stack[-1]:
                root = j
        for k in reversed(stack):
            depth += 1
            root_depth[k] = (root, depth)

    # 2. the sequence number each root was written with
    budget = _SEARCH_BUDGET
    int_seqs = [r.seq for r in rows if _is_int(r.seq)]
    limit = max([head_seq, *int_seqs, 0]) + n + 1
    root_seq: dict[int, int | None] = {}
    for root in {rd[0] for rd in root_depth.values()}:
        r = rows[root]
        if r.prev_hash == GENESIS_HASH:
            root_seq[root] = 1
            continue
        found: int | None = None
        candidates = [r.seq] if _is_int(r.seq) else []
        for s in [*candidates, *range(1, limit)]:
            budget -= 1
            if budget < 0:
                break
            if chain_hash(r.content(s), r.prev_hash) == r.hash:
                found = s
                break
        root_seq[root] = found

    # 3. each row: valid where it is, moved (valid with another seq), edited or inserted
    orig: dict[int, int] = {}
    state: dict[int, str] = {}
    for i, r in enumerate(rows):
        if not _is_int(r.seq):
            state[i] = "inserted"
            issues.append(
                AuditIssue(r.seq, "inserted", f"sequence number {r.seq!r} is not an integer")
            )
            continue
        root, depth = root_depth[i]
        base = root_seq[root]
        linked = None if base is None else base + depth
        if chain_hash(r.content(), r.prev_hash) == r.hash:
            state[i], orig[i] = "valid", r.seq
        elif linked is not None and chain_hash(r.content(linked), r.prev_hash) == r.hash:
            state[i], orig[i] = "moved", linked
        else:
            state[i], orig[i] = "edited", linked if linked is not None else r.seq

    # 4. two rows claiming the same original position: the one no later record links to
    #    (or one that matches no hash at all) was inserted
    claims: dict[int, list[int]] = {}
    for i, s in orig.items():
        claims.setdefault(s, []).append(i)
    for s, members in claims.items():
        if len(members) < 2:
            continue
        genuine = [i for i in members if state[i] != "edited" and rows[i].hash in referenced] or [
            i for i in members if state[i] != "edited"
        ]
        keep = genuine[0] if genuine else members[0]
        for i in members:
            if i != keep:
                state[i] = "inserted"
                issues.append(
                    AuditIssue(
                        rows[i].seq,
                        "inserted",
                        f"a record that is not part of the chain claims position #{s} "
                        f"(the chain continues from record #{s} as written)",
                    )
                )
                del orig[i]

    verified = {i: s for i, s in orig.items() if state[i] in ("valid", "moved")}
    # the head's hash names the true last record even when its number was rewritten
    named = [s for i, s in verified.items() if rows[i].hash == head_hash]
    if named and head_seq >= 0 and named[0] != head_seq:
        issues.append(
            AuditIssue(
                "head",
                "head",
                f"the audit head says #{head_seq} but its hash is that of record #{named[0]}: "
                "the head was rewritten",
            )
        )
        head_seq = named[0]

    # 5. rows past the head: appended without the audit trail
    for i, s in sorted(orig.items(), key=lambda kv: kv[1]):
        if 0 <= head_seq < s and state[i] != "inserted":
            state[i] = "inserted"
            issues.append(
                AuditIssue(
                    rows[i].seq,
                    "inserted",
                    f"record #{s} lies past the audit head (#{head_seq}): it was added "
                    "outside the audit trail",
                )
            )
    orig = {i: s for i, s in orig.items() if state[i] != "inserted"}
    top = max((s for i, s in orig.items() if state[i] in ("valid", "moved")), default=0)

    # 6. edited records
    for i in sorted(orig):
        if state[i] == "edited":
            issues.append(
                AuditIssue(
                    orig[i],
                    "edited",
                    "its content no longer matches its hash (a field was changed after it "
                    "was written)",
                )
            )
    # an edit that also re-computed the hash breaks the next record's link
    edited = {orig[i] for i in orig if state[i] == "edited"}
    position = {s: i for i, s in orig.items()}
    for root, base in root_seq.items():
        if rows[root].prev_hash == GENESIS_HASH or base is None or state.get(root) == "inserted":
            continue
        before = base - 1
        if before in position and before not in edited:
            edited.add(before)
            issues.append(
                AuditIssue(
                    before,
                    "edited",
                    f"record #{base} links to a hash that record #{before} no longer has: "
                    f"record #{before} was changed and its hash re-computed",
                )
            )

    # 7. deleted records: positions of the chain (up to the head) that no row holds
    expected = max(head_seq, top)
    missing = sorted(set(range(1, expected + 1)) - set(orig.values()))
    for s in missing:
        where = "after the last record" if s > top else "from the chain"
        issues.append(AuditIssue(s, "deleted", f"record #{s} is missing {where}"))

    # 8. moved records: out of order (reordered) or shifted by an insertion/deletion
    order = [(rows[i].seq, orig[i], i) for i in sorted(orig, key=lambda k: rows[k].seq)]
    prefix_max, suffix_min = [], []
    m = -math.inf
    for _, s, _ in order:
        prefix_max.append(m)
        m = max(m, s)
    m = math.inf
    for _, s, _ in reversed(order):
        suffix_min.append(m)
        m = min(m, s)
    suffix_min.reverse()
    for k, (stored, s, i) in enumerate(order):
        if state[i] != "moved":
            continue
        if prefix_max[k] > s or suffix_min[k] < s:
            issues.append(
                AuditIssue(
                    s,
                    "reordered",
                    f"written as record #{s}, now stored as #{stored} (out of order)",
                )
            )
        else:
            issues.append(
                AuditIssue(
                    s,
                    "renumbered",
                    f"written as record #{s}, now stored as #{stored} (numbers shifted to "
                    "hide a deletion or insertion)",
                )
            )

    # 9. the head must name the last record
    if head_seq < 0:
        issues.append(AuditIssue("head", "head", "the audit head row is missing"))
    elif head_seq > 0 and head_seq in position and state[position[head_seq]] != "edited":
        if rows[position[head_seq]].hash != head_hash:
            issues.append(
                AuditIssue(
                    head_seq,
                    "head",
                    f"the audit head's hash does not match record #{head_seq}: the head or "
                    "the record was rewritten",
                )
            )
    return sorted(issues, key=lambda x: (_sort_key(x.seq), x.problem))


def _sort_key(seq: Any) -> float:
    try:
        return float(seq)
    except (TypeError, ValueError):
        return math.inf


# ------------------------------------------------------------------------------ the record chain


@dataclasses.dataclass(frozen=True)
class RecordVerification:
    """Result of :func:`verify_records`: ``ok`` when the record chain, every record it
    covers and the anchor agree.

    Attributes:
        entries: ledger entries stored.
        head_seq, head_hash: the chain's head row (-1, "" when it is missing).
        anchored_seq: the highest head in the anchor file (None: no anchor given).
        issues: every finding, in words.
    """

    entries: int
    head_seq: int
    head_hash: str
    anchored_seq: int | None
    issues: tuple[str, ...]

    @property
    def ok(self) -> bool:
        return not self.issues


def verify_records(
    historian: Historian,
    *,
    batch_id: str | None = None,
    anchor: str | None = None,
    anchor_key: str | None = None,
) -> RecordVerification:
    """Check the record chain and the records it covers (steps with their measurements,
    setpoints, estimates and predictions; events; write intents; audit records).

    The chain is checked whole (links, hashes, numbering, head row, anchor); the records
    of ``batch_id`` (None: of every batch) are compared with their ledger entries: an
    edited record no longer matches its digest, a deleted one leaves an entry without a
    record, a forged one has no entry, swapped ones match the wrong digests. With
    ``anchor`` (the file ``hmpc run --anchor`` appends to), every anchored head must be in
    the chain with the same hash: a cut tail, a full wipe or a re-computed chain fails.
    """
    issues: list[str] = []
    if historian.schema_version < 2:
        issues.append(
            f"historian schema {historian.schema_version} predates the record chain: steps "
            "and events are not tamper-evident. The next `hmpc run` on it upgrades it and "
            "chains the records as they are then (docs/historian.md, Upgrading)"
        )
        return RecordVerification(0, -1, "", None, tuple(issues))
    entries = historian.ledger()
    head = historian.ledger_head()
    # 1. the chain: numbering, links, hashes
    prev, expected = GENESIS_HASH, 1
    by_seq: dict[int, LedgerEntry] = {}
    for e in entries:
        by_seq[e.seq] = e
        if e.seq != expected:
            issues.append(
                f"record chain: entries #{expected}..#{e.seq - 1} are missing (deleted)"
                if e.seq > expected
                else f"record chain: entry #{e.seq} is out of order"
            )
        if e.prev_hash != prev:
            issues.append(f"record chain: entry #{e.seq} does not link to the entry before it")
        if ledger_hash(e) != e.hash:
            issues.append(f"record chain: entry #{e.seq} was edited (its hash does not match)")
        prev, expected = e.hash, e.seq + 1
    last = entries[-1] if entries else None
    if head is None:
        issues.append("record chain: the head row is missing")
    elif last is None and head[0] != 0:
        issues.append(f"record chain: the head names entry #{head[0]} but the chain is empty")
    elif last is not None and (head[0] != last.seq or head[1] != last.hash):
        issues.append(
            f"record chain: the head names entry #{head[0]} but the chain ends at #{last.seq} "
            "(entries cut from the tail or appended outside the historian)"
        )
    # 2. the anchor
    anchored: int | None = None
    if anchor is not None:
        try:
            found = read_anchor(anchor, key_file=anchor_key)
        except HistorianError as exc:
            issues.append(f"anchor: {exc}")
        else:
            anchored = found.seq
            issues.extend(f"anchor: {p}" for p in found.problems)
            top = last.seq if last is not None else 0
            if found.seq > top:
                issues.append(
                    f"anchor: the anchored head #{found.seq} is not in the historian, whose "
                    f"chain ends at #{top}: its tail was cut"
                    + (" or it was wiped" if top == 0 else "")
                )
            wrong = [s for s, h in found.heads if s in by_seq and by_seq[s].hash != h]
            if wrong:
                issues.append(
                    f"anchor: entry #{wrong[0]} of the chain differs from the anchored hash "
                    f"({len(wrong)} anchored head(s) differ): the chain was re-computed"
                )
    # 3. the records against their entries
    batches = historian.batches() if batch_id is None else [batch_id]
    scope = [e for e in entries if batch_id is None or e.batch_id == batch_id]
    issues += _check_records(historian, batches, scope, batch_id is None)
    return RecordVerification(
        len(entries),
        head[0] if head is not None else -1,
        head[1] if head is not None else "",
        anchored,
        tuple(issues),
    )


def _check_records(
    historian: Historian, batches: Sequence[str], entries: Sequence[LedgerEntry], everything: bool
) -> list[str]:
    issues: list[str] = []
    want: dict[tuple[str, str, str, str], list[str]] = {}
    for e in entries:
        want.setdefault((e.kind, e.batch_id, e.unit, e.ref), []).append(e.digest)
    have: dict[tuple[str, str, str, str], str] = {}
    for b in batches:
        try:
            steps = historian.steps(b)
        except (ValueError, TypeError) as exc:
            issues.append(f"batch {b!r}: its steps cannot be read back ({exc}): edited")
            steps = []
        for s in steps:
            have[("step", s.batch_id, s.unit, str(s.step))] = step_digest(s)
        for eid, ev in historian.events_with_ids(b):
            have[("event", ev.batch_id, ev.unit, str(eid))] = event_digest(eid, ev)
        for it in historian.intents(b):
            have[("intent", it.batch_id, it.unit, str(it.id))] = intent_open_digest(it)
            if it.state != "pending":
                have[("intent_close", it.batch_id, it.unit, str(it.id))] = intent_close_digest(it)
    audit_rows = {str(r.seq): r for r in AuditTrail(historian).records()}
    for key, digests in want.items():
        kind, b, unit, ref = key
        if kind == "upgrade":
            continue
        if kind == "audit":
            r = audit_rows.get(ref)
            if r is None:
                issues.append(f"audit record #{ref} is chained but missing (deleted)")
            elif r.hash != digests[-1]:
                issues.append(f"audit record #{ref} differs from its chained hash (edited)")
            continue
        name = _name(kind, b, unit, ref)
        if len(digests) > 1:
            issues.append(f"{name} is chained {len(digests)} times")
        got = have.pop(key, None)
        if got is None:
            if kind == "intent_close":
                issues.append(f"{name}: chained as closed but stored as pending (edited)")
            else:
                issues.append(f"{name} is chained but missing (deleted)")
        elif got != digests[-1]:
            issues.append(f"{name} differs from the record chained (edited or swapped)")
    for key in have:
        kind, b, unit, ref = key
        issues.append(f"{_name(kind, b, unit, ref)} is not in the record chain (forged)")
    if everything:
        chained_audit = {e.ref for e in entries if e.kind == "audit"}
        upgraded = any(e.kind == "upgrade" for e in entries)
        for ref in audit_rows:
            if ref not in chained_audit and not upgraded:
                issues.append(f"audit record #{ref} is not in the record chain (inserted)")
    return issues


def _name(kind: str, batch: str, unit: str, ref: str) -> str:
    what = {
        "step": "step",
        "event": "event id",
        "intent": "write intent",
        "intent_close": "write intent (closing)",
    }.get(kind, kind)
    return f"{what} {ref} of batch {batch!r} unit {unit!r}"


def verify_historian(
    historian: Historian,
    *,
    batch_id: str | None = None,
    anchor: str | None = None,
    anchor_key: str | None = None,
) -> tuple[AuditVerification, RecordVerification]:
    """Both checks: the audit trail's own chain and the record chain (with the anchor)."""
    return AuditTrail(historian).verify(), verify_records(
        historian, batch_id=batch_id, anchor=anchor, anchor_key=anchor_key
    )


# ------------------------------------------------------------------------------ command line


def add_audit_parser(sub: Any) -> None:
    """Register ``hmpc audit verify|show`` on the ``hmpc`` sub-command parser."""
    audit = sub.add_parser("audit", help="verify or list the GMP audit trail")
    actions = audit.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    verify = actions.add_parser(
        "verify", help="check the hash chain; exit 1 naming every tampered record"
    )
    verify.add_argument(
        "--historian",
        default=None,
        help=f"historian URL (default $HMPC_HISTORIAN or {default_url()})",
    )
    verify.add_argument(
        "--anchor",
        default=None,
        help="the anchor file hmpc run appended the chain head to: detects a cut tail or a "
        "wiped historian (docs/historian.md)",
    )
    verify.add_argument(
        "--anchor-key",
        default=None,
        help="file with the anchor's HMAC key (default $HMPC_ANCHOR_KEY_FILE; none: unsigned)",
    )
    verify.add_argument("--batch", default=None, help="only the records of this batch")
    verify.set_defaults(func=cmd_audit_verify)
    show = actions.add_parser("show", help="list the audit records (of one batch)")
    show.add_argument("--historian", default=None, help="historian URL")
    show.add_argument("--batch", default=None, help="only records of this batch")
    show.set_defaults(func=cmd_audit_show)


def cmd_audit_verify(args: argparse.Namespace) -> int:
    with Historian(args.historian or default_url(), create=False) as hist:
        result, records = verify_historian(
            hist, batch_id=args.batch, anchor=args.anchor, anchor_key=args.anchor_key
        )
        where = hist.display_url
    anchored = (
        f"; anchored head #{records.anchored_seq}" if records.anchored_seq is not None else ""
    )
    if result.ok and records.ok:
        print(
            f"audit trail intact: {result.records} records in {where}; head #{result.head_seq} "
            f"{result.head_hash}"
        )
        print(
            f"record chain intact: {records.entries} entries; head #{records.head_seq} "
            f"{records.head_hash}{anchored}"
            + ("" if args.anchor else " (no --anchor: a cut tail, a wipe or a re-computed chain")
            + ("" if args.anchor else " is not detectable)")
        )
        return 0
    if not result.ok:
        print(
            f"audit trail TAMPERED: {len(result.issues)} problem(s) in {where} "
            f"({result.records} records stored, head #{result.head_seq}):"
        )
        for issue in result.issues:
            print(f"  {issue}")
    if not records.ok:
        print(
            f"records TAMPERED: {len(records.issues)} problem(s) in {where} "
            f"({records.entries} chain entries, head #{records.head_seq}{anchored}):"
        )
        for text in records.issues:
            print(f"  {text}")
    return 1


def cmd_audit_show(args: argparse.Namespace) -> int:
    with Historian(args.historian or default_url(), create=False) as hist:
        records = AuditTrail(hist).records(args.batch)
    for r in records:
        stamp = (
            time.strftime("%Y-%m-%d %H:%M:%SZ", time.gmtime(r.wall_time))
            if math.isfinite(r.wall_time)
            else "(no time)"
        )
        print(
            f"#{r.seq} {stamp} {r.user} {r.action} {r.target}: "
            f"{canonical_json(r.old_value)} -> {canonical_json(r.new_value)} ({r.reason})"
        )
    return 0

"""The historian: every control step and event of every unit, appended to SQLite (default)
or PostgreSQL with the same schema, and read back for restarts, reports and audits.

Each append is one committed transaction: when :meth:`Historian.append_step` returns, the
record is on disk (SQLite in WAL mode with ``synchronous=FULL``: the write-ahead log is
fsynced at every commit) or committed by the PostgreSQL server. A failure raises
:class:`~plant_models.errors.HistorianError` and nothing of the failed record is kept
(never a half-written step); the caller logs it and decides what to do. See
docs/historian.md for the schema, the durability argument and example queries.

URLs: ``sqlite:///relative/path.sqlite``, ``sqlite:////absolute/path.sqlite`` (as in
SQLAlchemy), a plain file path (SQLite), or ``postgresql://user[:password]@host:port/db``
(any libpq connection URL; psycopg 3).

Thread safety: one connection per :class:`Historian`, guarded by a lock, so the unit tasks
of one controller process can share one instance (from the event loop or from threads).
Several processes may write to the same database: SQLite serialises writers (WAL, busy
timeout) and PostgreSQL does so by itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.records.anchor import Anchor
from controller.records.steps import EventRecord, MeasurementRecord, SetpointRecord, StepRecord
from plant_models.errors import HistorianError

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "DEFAULT_URL",
    "SCHEMA_VERSION",
    "Historian",
    "LedgerEntry",
    "WriteIntent",
    "canonical_json",
    "config_event",
    "default_url",
    "event_digest",
    "intent_close_digest",
    "intent_open_digest",
    "ledger_hash",
    "record_json",
    "step_digest",
]

log = logging.getLogger(__name__)

#: The historian used when no URL is given (overridden by the HMPC_HISTORIAN variable).
DEFAULT_URL = "sqlite:///historian.sqlite"
#: 2: the record chain (``ledger``, ``ledger_head``) and write-ahead intents
#: (``write_intents``); a version-1 historian is upgraded by its next writer (docs/historian.md).
SCHEMA_VERSION = 2
#: Seconds a writer waits for another process's write lock (SQLite) before failing.
BUSY_TIMEOUT_S = 30.0


def default_url() -> str:
    """``$HMPC_HISTORIAN`` when set, else :data:`DEFAULT_URL`."""
    return os.environ.get("HMPC_HISTORIAN", "") or DEFAULT_URL


# ------------------------------------------------------------------------------ encoding


def _jsonable(obj: Any) -> Any:
    """``json.dumps`` fallback: numpy scalars and arrays, tuples, sets; else a TypeError."""
    if hasattr(obj, "tolist"):  # numpy arrays and scalars
        return obj.tolist()
    if isinstance(obj, (set, frozenset)):
        return sorted(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON: sorted keys, no spaces, UTF-8 text, Python's shortest float repr;
    non-finite floats as ``NaN``/``Infinity`` (the same tokens SQLite's JSON functions read).
    Used for JSON columns and for the audit trail's hashes."""
    return json.dumps(
        obj,
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
        allow_nan=True,
        default=_jsonable,
    )


def record_json(record: StepRecord | EventRecord) -> str:
    """Canonical JSON of a record (for comparing records that may hold NaN)."""
    return canonical_json(dataclasses.asdict(record))


def _f(value: Any) -> float:
    """A float column read back: SQLite stores NaN as NULL."""
    return math.nan if value is None else float(value)


def _float_seq(values: Any) -> tuple[float, ...]:
    return tuple(_f(v) for v in values)


def config_event(
    batch_id: str,
    unit: str,
    *,
    process_time_h: float,
    wall_time: float,
    state_limits: Mapping[str, Mapping[str, float | None]],
    input_bounds: Mapping[str, tuple[float, float]],
    source: str = "",
) -> EventRecord:
    """The ``config`` event a runtime appends at the start of a batch (and after every
    tuning change) so that reports can draw the limits in force.

    Args:
        state_limits: state -> ``{"low": ..., "high": ..., "low_soft": ..., "high_soft": ...}``
            (any subset; None for none), canonical units.
        input_bounds: manipulated variable -> ``(low, high)``, canonical units.
        source: where the limits came from (tuning file path).
    """
    return EventRecord(
        batch_id=batch_id,
        unit=unit,
        process_time_h=process_time_h,
        wall_time=wall_time,
        kind="config",
        severity="info",
        message=f"limits in force{f' from {source}' if source else ''}",
        data={
            "state_limits": {k: dict(v) for k, v in state_limits.items()},
            "input_bounds": {k: [float(lo), float(hi)] for k, (lo, hi) in input_bounds.items()},
            "source": source,
        },
    )


# ------------------------------------------------------------------------------ record chain


def _fl(value: Any) -> float:
    """A float as the database gives it back (-0.0 folded into 0.0, None as NaN)."""
    return math.nan if value is None else float(value) + 0.0


def _sha(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()


def step_digest(record: StepRecord) -> str:
    """SHA-256 of a step record in the form the historian stores and reads it back (so the
    digest of a record read back equals the one computed when it was written)."""
    return _sha(
        {
            "batch_id": str(record.batch_id),
            "unit": str(record.unit),
            "step": int(record.step),
            "process_time_h": _fl(record.process_time_h),
            "wall_time": _fl(record.wall_time),
            "mode": str(record.mode),
            "growth_factor": _fl(record.growth_factor),
            "overhead_s": _fl(record.overhead_s),
            "solver": json.loads(canonical_json(dict(record.solver))),
            "predictions": {k: [_fl(v) for v in vs] for k, vs in record.predictions.items()},
            "notes": [str(n) for n in record.notes],
            "measurements": [
                [
                    m.name,
                    _fl(m.value),
                    m.unit,
                    _fl(m.sample_time_h),
                    _fl(m.arrival_time_h),
                    m.source,
                    m.quality,
                    bool(m.accepted),
                    m.reason,
                ]
                for m in record.measurements
            ],
            "setpoints": [
                [p.name, _fl(p.requested), _fl(p.value), p.unit, p.status] for p in record.setpoints
            ],
            "estimate": [[k, _fl(v)] for k, v in record.estimate.items()],
            "estimate_std": [[k, _fl(v)] for k, v in record.estimate_std.items()],
            # only when present: the digests of records written before they existed hold
            **(
                {"diagnostics": [[k, _fl(v)] for k, v in record.diagnostics.items()]}
                if record.diagnostics
                else {}
            ),
        }
    )


def event_digest(event_id: int, record: EventRecord) -> str:
    """SHA-256 of an event as stored (with its row id, so a moved event does not match)."""
    return _sha(
        {
            "id": int(event_id),
            "batch_id": str(record.batch_id),
            "unit": str(record.unit),
            "process_time_h": _fl(record.process_time_h),
            "wall_time": _fl(record.wall_time),
            "kind": str(record.kind),
            "severity": str(record.severity),
            "message": str(record.message),
            "data": json.loads(canonical_json(dict(record.data))),
        }
    )


@dataclasses.dataclass(frozen=True)
class WriteIntent:
    """A setpoint bundle announced before it was written (write-ahead).

    Attributes:
        id: row id.
        batch_id, unit, step: the cycle that writes.
        process_time_h, wall_time: when the intent was stored.
        reason: why (the control law and cycle).
        target: setpoint -> value to write, canonical units.
        previous: setpoint -> value the controller believed the plant held.
        state: ``pending`` (stored, not confirmed), ``confirmed`` (the write returned) or
            ``reconciled`` (found pending at a restart and settled by reading the plant back).
        outcome: per-item statuses (confirmed) or the reconciliation (read-back values and
            verdict).
        closed_wall_time: when it was confirmed or reconciled (NaN while pending).
    """

    id: int
    batch_id: str
    unit: str
    step: int
    process_time_h: float
    wall_time: float
    reason: str
    target: Mapping[str, float]
    previous: Mapping[str, float]
    state: str = "pending"
    outcome: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    closed_wall_time: float = math.nan


def intent_open_digest(intent: WriteIntent) -> str:
    """SHA-256 of the immutable part of a write intent (as stored before the write)."""
    return _sha(
        {
            "id": int(intent.id),
            "batch_id": intent.batch_id,
            "unit": intent.unit,
            "step": int(intent.step),
            "process_time_h": _fl(intent.process_time_h),
            "wall_time": _fl(intent.wall_time),
            "reason": intent.reason,
            "target": json.loads(canonical_json(dict(intent.target))),
            "previous": json.loads(canonical_json(dict(intent.previous))),
        }
    )


def intent_close_digest(intent: WriteIntent) -> str:
    """SHA-256 of the closing part of a write intent (confirmation or reconciliation)."""
    return _sha(
        {
            "id": int(intent.id),
            "state": intent.state,
            "outcome": json.loads(canonical_json(dict(intent.outcome))),
            "closed_wall_time": _fl(intent.closed_wall_time),
        }
    )


@dataclasses.dataclass(frozen=True)
class LedgerEntry:
    """One entry of the record chain.

    Attributes:
        seq: 1, 2, ... in commit order.
        kind: ``step``, ``event``, ``intent``, ``intent_close``, ``audit`` or ``upgrade``.
        batch_id, unit: of the record (``""`` for site-wide ones).
        ref: the record's key: step number, event id, intent id or audit sequence number.
        digest: SHA-256 of the record as stored (:func:`step_digest`, ...).
        wall_time: controller clock when chained.
        prev_hash, hash: the chain (:func:`ledger_hash`).
    """

    seq: int
    kind: str
    batch_id: str
    unit: str
    ref: str
    digest: str
    wall_time: float
    prev_hash: str
    hash: str

    def content(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "kind": self.kind,
            "batch_id": self.batch_id,
            "unit": self.unit,
            "ref": self.ref,
            "digest": self.digest,
            "wall_time": _fl(self.wall_time),
        }


def ledger_hash(entry: LedgerEntry) -> str:
    """SHA-256 (hex) of the entry's canonical JSON followed by the previous entry's hash."""
    return hashlib.sha256(
        (canonical_json(entry.content()) + entry.prev_hash).encode("utf-8")
    ).hexdigest()


# ------------------------------------------------------------------------------ back-ends

_TYPES = {
    "sqlite": {
        "id": "INTEGER PRIMARY KEY AUTOINCREMENT",
        "ref": "INTEGER",
        "seq": "INTEGER",
        "blob": "BLOB",
    },
    "postgresql": {
        "id": "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        "ref": "BIGINT",
        "seq": "BIGINT",
        "blob": "BYTEA",
    },
}

_GENESIS = "0" * 64

_SCHEMA = [
    "CREATE TABLE IF NOT EXISTS hmpc_schema (version INTEGER NOT NULL)",
    """CREATE TABLE IF NOT EXISTS steps (
        id {id},
        batch_id TEXT NOT NULL,
        unit TEXT NOT NULL,
        step INTEGER NOT NULL,
        process_time_h DOUBLE PRECISION,
        wall_time DOUBLE PRECISION,
        mode TEXT NOT NULL,
        growth_factor DOUBLE PRECISION,
        overhead_s DOUBLE PRECISION,
        solver_success INTEGER,
        solver_status TEXT,
        solver_iterations INTEGER,
        solve_time_s DOUBLE PRECISION,
        solver_cost DOUBLE PRECISION,
        fallback_used TEXT,
        fallback_reason TEXT,
        solver TEXT NOT NULL,
        predictions TEXT NOT NULL,
        notes TEXT NOT NULL,
        UNIQUE (batch_id, unit, step))""",
    """CREATE TABLE IF NOT EXISTS measurements (
        step_id {ref} NOT NULL REFERENCES steps (id),
        idx INTEGER NOT NULL,
        name TEXT NOT NULL,
        value DOUBLE PRECISION,
        value_unit TEXT NOT NULL,
        sample_time_h DOUBLE PRECISION,
        arrival_time_h DOUBLE PRECISION,
        source TEXT NOT NULL,
        quality TEXT NOT NULL,
        accepted INTEGER NOT NULL,
        reason TEXT NOT NULL,
        PRIMARY KEY (step_id, idx))""",
    """CREATE TABLE IF NOT EXISTS setpoints (
        step_id {ref} NOT NULL REFERENCES steps (id),
        idx INTEGER NOT NULL,
        name TEXT NOT NULL,
        requested DOUBLE PRECISION,
        value DOUBLE PRECISION,
        value_unit TEXT NOT NULL,
        status TEXT NOT NULL,
        PRIMARY KEY (step_id, idx))""",
    """CREATE TABLE IF NOT EXISTS estimates (
        step_id {ref} NOT NULL REFERENCES steps (id),
        kind TEXT NOT NULL,
        idx INTEGER NOT NULL,
        name TEXT NOT NULL,
        value DOUBLE PRECISION,
        PRIMARY KEY (step_id, kind, idx))""",
    """CREATE TABLE IF NOT EXISTS events (
        id {id},
        batch_id TEXT NOT NULL,
        unit TEXT NOT NULL,
        process_time_h DOUBLE PRECISION,
        wall_time DOUBLE PRECISION,
        kind TEXT NOT NULL,
        severity TEXT NOT NULL,
        message TEXT NOT NULL,
        data TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS audit (
        seq {seq} PRIMARY KEY,
        wall_time DOUBLE PRECISION,
        user_name TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        old_value TEXT NOT NULL,
        new_value TEXT NOT NULL,
        reason TEXT NOT NULL,
        batch_id TEXT NOT NULL,
        unit TEXT NOT NULL,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS audit_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq {seq} NOT NULL,
        hash TEXT NOT NULL)""",
    # the controller's resumable state after each cycle (controller/runtime/restart.py,
    # docs/runtime.md "Restart"): append-only, full or delta (base_id), zlib-compressed JSON
    """CREATE TABLE IF NOT EXISTS controller_state (
        id {id},
        batch_id TEXT NOT NULL,
        unit TEXT NOT NULL,
        step INTEGER NOT NULL,
        process_time_h DOUBLE PRECISION,
        wall_time DOUBLE PRECISION,
        kind TEXT NOT NULL,
        base_id {ref},
        encoding TEXT NOT NULL,
        payload {blob} NOT NULL,
        size_bytes INTEGER NOT NULL,
        json_bytes INTEGER NOT NULL,
        capture_s DOUBLE PRECISION,
        sha256 TEXT NOT NULL)""",
    # the record chain (schema 2): one entry per stored step, event, write intent (opened
    # and closed) and audit record, each with the SHA-256 of the record as stored, chained
    # like the audit trail; ledger_head names the last entry (docs/historian.md)
    """CREATE TABLE IF NOT EXISTS ledger (
        seq {seq} PRIMARY KEY,
        kind TEXT NOT NULL,
        batch_id TEXT NOT NULL,
        unit TEXT NOT NULL,
        ref TEXT NOT NULL,
        digest TEXT NOT NULL,
        wall_time DOUBLE PRECISION,
        prev_hash TEXT NOT NULL,
        hash TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS ledger_head (
        id INTEGER PRIMARY KEY CHECK (id = 1),
        seq {seq} NOT NULL,
        hash TEXT NOT NULL)""",
    # write-ahead setpoint writes (schema 2): stored before the write, closed after it (or
    # reconciled against the plant's read-back at the next start)
    """CREATE TABLE IF NOT EXISTS write_intents (
        id {id},
        batch_id TEXT NOT NULL,
        unit TEXT NOT NULL,
        step INTEGER NOT NULL,
        process_time_h DOUBLE PRECISION,
        wall_time DOUBLE PRECISION,
        reason TEXT NOT NULL,
        target TEXT NOT NULL,
        previous TEXT NOT NULL,
        state TEXT NOT NULL,
        outcome TEXT NOT NULL,
        closed_wall_time DOUBLE PRECISION)""",
    "CREATE INDEX IF NOT EXISTS ledger_batch ON ledger (batch_id, kind)",
    "CREATE INDEX IF NOT EXISTS write_intents_batch ON write_intents (batch_id, unit, state)",
    "CREATE INDEX IF NOT EXISTS steps_batch ON steps (batch_id, unit, step)",
    "CREATE INDEX IF NOT EXISTS controller_state_batch ON controller_state (batch_id, unit, id)",
    "CREATE INDEX IF NOT EXISTS events_batch ON events (batch_id, kind)",
    "CREATE INDEX IF NOT EXISTS audit_batch ON audit (batch_id)",
]


def _redact(url: str) -> str:
    """The URL without its password (for messages and logs)."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", url)


def _sqlite_path(url: str) -> Path:
    if url.startswith("sqlite:///"):
        return Path(url[len("sqlite:///") :])
    if url.startswith("sqlite:"):
        raise HistorianError(
            f"historian URL {url!r}: write sqlite:///relative/path or sqlite:////absolute/path"
        )
    return Path(url)


class _Cursor:
    """A DB-API cursor that takes ``?`` placeholders on both back-ends."""

    def __init__(self, cursor: Any, dialect: str) -> None:
        self._cursor = cursor
        self._pg = dialect == "postgresql"

    def _sql(self, sql: str) -> str:
        return sql.replace("?", "%s") if self._pg else sql

    def execute(self, sql: str, params: Sequence[Any] = ()) -> _Cursor:
        self._cursor.execute(self._sql(sql), tuple(params))
        return self

    def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._cursor.executemany(self._sql(sql), [tuple(r) for r in rows])

    def fetchall(self) -> list[tuple[Any, ...]]:
        return list(self._cursor.fetchall())

    def fetchone(self) -> tuple[Any, ...] | None:
        row = self._cursor.fetchone()
        return None if row is None else tuple(row)


class _Backend:
    """One connection of one dialect; opened lazily again after it was lost."""

    dialect: str

    def connect(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def transaction(self, write: bool) -> contextlib.AbstractContextManager[_Cursor]:
        raise NotImplementedError

    def db_errors(self) -> tuple[type[BaseException], ...]:
        raise NotImplementedError


class _SQLite(_Backend):
    dialect = "sqlite"

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None

    def connect(self) -> None:
        if self.path.parent and not self.path.parent.exists():
            raise HistorianError(
                f"historian folder {self.path.parent} does not exist; create it or give "
                "another --historian URL"
            )
        conn = sqlite3.connect(
            self.path, isolation_level=None, check_same_thread=False, timeout=BUSY_TIMEOUT_S
        )
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            conn.close()
            raise HistorianError(
                f"historian {self.path}: SQLite could not switch to WAL mode (got {mode!r}); "
                "put the database on a local file system"
            )
        # FULL: the WAL is fsynced at every commit, so a committed step survives a power
        # loss too, not only a killed process (docs/historian.md, "Durability").
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        conn.execute(f"PRAGMA busy_timeout={int(BUSY_TIMEOUT_S * 1000)}")
        self._conn = conn

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[_Cursor]:
        if self._conn is None:
            self.connect()
        conn = self._conn
        if conn is None:  # pragma: no cover - connect() raises instead
            raise HistorianError(f"historian {self.path}: not connected")
        # IMMEDIATE takes the write lock at once (no lock upgrade that could deadlock);
        # readers never block writers in WAL mode
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield _Cursor(conn.cursor(), self.dialect)
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    def db_errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)


class _Postgres(_Backend):
    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        self.url = url
        self._conn: Any = None

    def connect(self) -> None:
        try:
            import psycopg
        except ImportError as exc:
            raise HistorianError(
                "a postgresql:// historian needs psycopg 3: pip install 'psycopg[binary]'"
            ) from exc
        self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=10)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    @contextlib.contextmanager
    def transaction(self, write: bool) -> Iterator[_Cursor]:
        if self._conn is None or self._conn.closed:
            self.connect()
        with self._conn.transaction(), self._conn.cursor() as cur:
            yield _Cursor(cur, self.dialect)

    def db_errors(self) -> tuple[type[BaseException], ...]:
        import psycopg

        return (psycopg.Error,)


# ------------------------------------------------------------------------------ historian

_STEP_COLUMNS = (
    "id, batch_id, unit, step, process_time_h, wall_time, mode, growth_factor, overhead_s, "
    "solver, predictions, notes"
)


class Historian:
    """Append-only store of step records, events and the audit trail.

    Args:
        url: ``sqlite:///path`` (default :func:`default_url`), a file path, or a
            ``postgresql://`` URL.
        create: make a new SQLite file when there is none (False for readers such as
            ``hmpc report`` and ``hmpc audit verify``, which then say that it is missing).
            A writer (``create=True``) upgrades a version-1 schema (see
            :meth:`_upgrade_from_1`); a reader leaves it as it is (:attr:`schema_version`).
        anchor: where the record chain's head is published after every commit (the
            external anchor; None: nowhere).
    Raises:
        HistorianError: the database cannot be opened or its schema is newer than this
            program's.

    Use as a context manager or call :meth:`close`.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        create: bool = True,
        anchor: Anchor | None = None,
    ) -> None:
        self.url = os.fspath(url) if url is not None else default_url()
        self._lock = threading.RLock()
        self._writer = create
        self.anchor = anchor
        #: failures to publish the head to the anchor (logged; control goes on)
        self.anchor_failures = 0
        self.schema_version = SCHEMA_VERSION
        self._chained: tuple[int, str] | None = None
        self._backend: _Backend
        if self.url.startswith(("postgresql://", "postgres://")):
            self._backend = _Postgres(self.url)
        else:
            path = _sqlite_path(self.url)
            if not create and not path.is_file():
                raise HistorianError(
                    f"no historian database at {path}; give the URL the controller writes to "
                    "with --historian (or set HMPC_HISTORIAN)"
                )
            self._backend = _SQLite(path)
        self._init_schema()

    # -------------------------------------------------------------- plumbing

    @property
    def dialect(self) -> str:
        """``sqlite`` or ``postgresql``."""
        return self._backend.dialect

    @property
    def display_url(self) -> str:
        """The URL without a password."""
        return _redact(self.url)

    def __enter__(self) -> Historian:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            with contextlib.suppress(Exception):
                self._backend.close()

    @contextlib.contextmanager
    def transaction(self, what: str, *, write: bool = True) -> Iterator[_Cursor]:
        """One committed transaction under the historian's lock; every database error
        becomes a :class:`HistorianError` naming ``what`` failed (nothing is kept).
        For the audit trail and tests; other code uses the append/read methods."""
        failures: tuple[type[BaseException], ...] = (*self._backend.db_errors(), OSError)
        with self._lock:
            self._chained = None
            try:
                with self._backend.transaction(write) as cur:
                    yield cur
            except HistorianError:
                self._chained = None
                raise
            except failures as exc:
                self._chained = None
                # a broken connection is re-opened by the next call
                with contextlib.suppress(Exception):
                    self._backend.close()
                kept = "Nothing was written; check" if write else "Check"
                raise HistorianError(
                    f"historian {self.display_url}: {what} failed: {exc}. {kept} that the "
                    "database is reachable and writable (disk space, permissions, server) "
                    "and retry"
                ) from exc
            except BaseException:
                self._chained = None
                raise
            head, self._chained = self._chained, None
            if head is not None and self.anchor is not None:
                try:
                    self.anchor.publish(*head)
                except HistorianError as exc:  # the record is committed; the anchor lags
                    self.anchor_failures += 1
                    log.critical("%s (the record chain's head #%d is not anchored)", exc, head[0])

    def query(self, sql: str, params: Sequence[Any] = (), what: str = "read") -> list[Any]:
        """Rows of one read-only statement (``?`` placeholders on both back-ends)."""
        with self.transaction(what, write=False) as cur:
            return cur.execute(sql, params).fetchall()

    def _init_schema(self) -> None:
        types = _TYPES[self.dialect]
        with self.transaction("creating the schema") as cur:
            cur.execute(_SCHEMA[0])
            row = cur.execute("SELECT version FROM hmpc_schema").fetchone()
            version = SCHEMA_VERSION if row is None else int(row[0])
            if version > SCHEMA_VERSION:
                raise HistorianError(
                    f"historian {self.display_url} has schema version {version}, newer than "
                    f"this program's {SCHEMA_VERSION}; upgrade hmpc"
                )
            if version < 1:
                raise HistorianError(
                    f"historian {self.display_url} has schema version {version}, which this "
                    "program does not know; restore it from a backup or start a new historian"
                )
            if version < SCHEMA_VERSION and not self._writer:
                # a reader leaves an old historian as it is (sealing its records now would
                # bless edits made before); verification says it is not chained
                self.schema_version = version
                return
            for statement in _SCHEMA[1:]:
                cur.execute(statement.format(**types))
            if row is None:
                cur.execute("INSERT INTO hmpc_schema (version) VALUES (?)", (SCHEMA_VERSION,))
            if cur.execute("SELECT seq FROM audit_head WHERE id = 1").fetchone() is None:
                cur.execute("INSERT INTO audit_head (id, seq, hash) VALUES (1, 0, ?)", (_GENESIS,))
            if cur.execute("SELECT seq FROM ledger_head WHERE id = 1").fetchone() is None:
                cur.execute("INSERT INTO ledger_head (id, seq, hash) VALUES (1, 0, ?)", (_GENESIS,))
            if version == 1:
                self._upgrade_from_1(cur)
                cur.execute("UPDATE hmpc_schema SET version = ?", (SCHEMA_VERSION,))

    def _upgrade_from_1(self, cur: _Cursor) -> None:
        """Schema 1 -> 2: chain the steps, events and audit records present now (an
        ``upgrade`` entry first, naming how many). Edits made before the upgrade cannot be
        detected any more; the audit trail's own chain still covers its records."""
        steps = [
            (b, u, n)
            for b, u, n in cur.execute(
                "SELECT batch_id, unit, step FROM steps ORDER BY batch_id, unit, step"
            ).fetchall()
        ]
        events = cur.execute("SELECT id FROM events ORDER BY id").fetchall()
        audits = cur.execute("SELECT seq, hash FROM audit ORDER BY seq").fetchall()
        self.chain(
            cur,
            "upgrade",
            "",
            "",
            "schema 1 -> 2",
            _sha({"steps": len(steps), "events": len(events), "audit": len(audits)}),
        )
        for batch, unit, _ in sorted({(b, u, 0) for b, u, _ in steps}):
            for rec in self._steps_in(cur, "batch_id = ? AND unit = ?", (batch, unit)):
                self.chain(cur, "step", batch, unit, str(rec.step), step_digest(rec))
        for (event_id,) in events:
            for eid, ev in self._events_in(cur, "id = ?", (int(event_id),)):
                self.chain(cur, "event", ev.batch_id, ev.unit, str(eid), event_digest(eid, ev))
        for seq, digest in audits:
            self.chain(cur, "audit", "", "", str(int(seq)), str(digest))
        log.warning(
            "historian %s upgraded from schema 1 to %d: %d steps, %d events and %d audit "
            "records chained as they are now",
            self.display_url,
            SCHEMA_VERSION,
            len(steps),
            len(events),
            len(audits),
        )

    # -------------------------------------------------------------- the record chain

    def chain(
        self, cur: _Cursor, kind: str, batch_id: str, unit: str, ref: str, digest: str
    ) -> LedgerEntry:
        """Append a ledger entry for a record stored in the same transaction ``cur``
        (the head row is locked, so concurrent writers chain one after the other); the new
        head is published to the anchor after the commit."""
        lock = " FOR UPDATE" if self.dialect == "postgresql" else ""
        head = cur.execute(f"SELECT seq, hash FROM ledger_head WHERE id = 1{lock}").fetchone()  # noqa: S608 (fixed SQL)
        if head is None:
            raise HistorianError(
                f"historian {self.display_url}: the record chain's head row is missing; the "
                "historian was tampered with. Run `hmpc audit verify`"
            )
        entry = LedgerEntry(
            seq=int(head[0]) + 1,
            kind=kind,
            batch_id=batch_id,
            unit=unit,
            ref=ref,
            digest=digest,
            wall_time=round(time.time(), 6),
            prev_hash=str(head[1]),
            hash="",
        )
        entry = dataclasses.replace(entry, hash=ledger_hash(entry))
        cur.execute(
            "INSERT INTO ledger (seq, kind, batch_id, unit, ref, digest, wall_time, prev_hash, "
            "hash) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                entry.seq,
                kind,
                batch_id,
                unit,
                ref,
                digest,
                entry.wall_time,
                entry.prev_hash,
                entry.hash,
            ),
        )
        cur.execute(
            "UPDATE ledger_head SET seq = ?, hash = ? WHERE id = 1", (entry.seq, entry.hash)
        )
        self._chained = (entry.seq, entry.hash)
        return entry

    def ledger(self) -> list[LedgerEntry]:
        """Every entry of the record chain in sequence order (as stored)."""
        rows = self.query(
            "SELECT seq, kind, batch_id, unit, ref, digest, wall_time, prev_hash, hash "
            "FROM ledger ORDER BY seq",
            what="reading the record chain",
        )
        return [
            LedgerEntry(
                seq=int(r[0]),
                kind=str(r[1]),
                batch_id=str(r[2]),
                unit=str(r[3]),
                ref=str(r[4]),
                digest=str(r[5]),
                wall_time=_f(r[6]),
                prev_hash=str(r[7]),
                hash=str(r[8]),
            )
            for r in rows
        ]

    def ledger_head(self) -> tuple[int, str] | None:
        """(seq, hash) of the record chain's head row, None when the row is missing."""
        rows = self.query(
            "SELECT seq, hash FROM ledger_head WHERE id = 1", what="reading the chain head"
        )
        return (int(rows[0][0]), str(rows[0][1])) if rows else None

    # -------------------------------------------------------------- write-ahead intents

    def open_intent(
        self,
        batch_id: str,
        unit: str,
        *,
        step: int,
        process_time_h: float,
        target: Mapping[str, float],
        previous: Mapping[str, float],
        reason: str,
    ) -> WriteIntent:
        """Store (and chain) the intent to write ``target`` before writing it.

        Raises:
            HistorianError: nothing was stored; the caller must not write."""
        what = f"storing the write intent of step {step} of batch {batch_id!r} unit {unit!r}"
        wall = round(time.time(), 6)
        target_d = {str(k): _fl(v) for k, v in target.items()}
        previous_d = {str(k): _fl(v) for k, v in previous.items()}
        with self.transaction(what) as cur:
            row = cur.execute(
                "INSERT INTO write_intents (batch_id, unit, step, process_time_h, wall_time, "
                "reason, target, previous, state, outcome, closed_wall_time) VALUES "
                "(?, ?, ?, ?, ?, ?, ?, ?, 'pending', '{}', NULL) RETURNING id",
                (
                    batch_id,
                    unit,
                    int(step),
                    _fl(process_time_h),
                    wall,
                    reason,
                    canonical_json(target_d),
                    canonical_json(previous_d),
                ),
            ).fetchone()
            if row is None:  # pragma: no cover - RETURNING always yields the id
                raise HistorianError(f"historian: {what}: the database returned no id")
            intent = WriteIntent(
                id=int(row[0]),
                batch_id=batch_id,
                unit=unit,
                step=int(step),
                process_time_h=_fl(process_time_h),
                wall_time=wall,
                reason=reason,
                target=target_d,
                previous=previous_d,
            )
            self.chain(cur, "intent", batch_id, unit, str(intent.id), intent_open_digest(intent))
        return intent

    def close_intent(
        self,
        intent: WriteIntent,
        state: str,
        outcome: Mapping[str, Any],
        *,
        also: Any = None,
    ) -> WriteIntent:
        """Mark an intent ``confirmed`` or ``reconciled`` with its outcome (and chain it).
        ``also(cur)`` runs in the same transaction (the audit record of the write).

        Raises:
            HistorianError: nothing was stored (the intent stays pending)."""
        if state not in ("confirmed", "reconciled"):
            raise ValueError(f"an intent is closed as confirmed or reconciled, not {state!r}")
        closed = dataclasses.replace(
            intent,
            state=state,
            outcome=json.loads(canonical_json(dict(outcome))),
            closed_wall_time=round(time.time(), 6),
        )
        what = f"closing write intent {intent.id} ({state})"
        with self.transaction(what) as cur:
            cur.execute(
                "UPDATE write_intents SET state = ?, outcome = ?, closed_wall_time = ? "
                "WHERE id = ? AND state = 'pending'",
                (state, canonical_json(closed.outcome), closed.closed_wall_time, intent.id),
            )
            self.chain(
                cur,
                "intent_close",
                intent.batch_id,
                intent.unit,
                str(intent.id),
                intent_close_digest(closed),
            )
            if also is not None:
                also(cur)
        return closed

    def intents(
        self, batch_id: str | None = None, unit: str | None = None, *, state: str | None = None
    ) -> list[WriteIntent]:
        """Write intents (of a batch, unit, state) in id order."""
        where, params = ["1 = 1"], []
        for column, value in (("batch_id", batch_id), ("unit", unit), ("state", state)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        rows = self.query(
            "SELECT id, batch_id, unit, step, process_time_h, wall_time, reason, target, "  # noqa: S608 (fixed SQL; values are parameters)
            f"previous, state, outcome, closed_wall_time FROM write_intents WHERE "
            f"{' AND '.join(where)} ORDER BY id",
            params,
            what="reading the write intents",
        )
        return [
            WriteIntent(
                id=int(r[0]),
                batch_id=str(r[1]),
                unit=str(r[2]),
                step=int(r[3]),
                process_time_h=_f(r[4]),
                wall_time=_f(r[5]),
                reason=str(r[6]),
                target=_json_or_text(r[7]),
                previous=_json_or_text(r[8]),
                state=str(r[9]),
                outcome=_json_or_text(r[10]),
                closed_wall_time=_f(r[11]),
            )
            for r in rows
        ]

    def last_intent_step(self, batch_id: str, unit: str) -> int | None:
        """The highest step number of a write intent of the unit in the batch (None: none)."""
        rows = self.query(
            "SELECT MAX(step) FROM write_intents WHERE batch_id = ? AND unit = ?",
            (batch_id, unit),
            what="reading the last write intent",
        )
        return None if not rows or rows[0][0] is None else int(rows[0][0])

    # -------------------------------------------------------------- appends

    def append_step(self, record: StepRecord) -> None:
        """Store one step (with its measurements, setpoints and estimates) in one committed
        transaction.

        Raises:
            HistorianError: the database refused or failed (including a step number that
                was already stored for this batch and unit); nothing was written.
        """
        what = f"appending step {record.step} of batch {record.batch_id!r} unit {record.unit!r}"
        try:
            solver = dict(record.solver)
            solver_json = canonical_json(solver)
            predictions_json = canonical_json(
                {k: [float(v) for v in vs] for k, vs in record.predictions.items()}
            )
            notes_json = canonical_json(list(record.notes))
        except (TypeError, ValueError) as exc:
            raise HistorianError(f"historian: {what}: a value is not storable: {exc}") from exc
        success = solver.get("success")
        iterations = solver.get("iterations")
        digest = step_digest(record)
        with self.transaction(what) as cur:
            row = cur.execute(
                "INSERT INTO steps (batch_id, unit, step, process_time_h, wall_time, mode, "
                "growth_factor, overhead_s, solver_success, solver_status, solver_iterations, "
                "solve_time_s, solver_cost, fallback_used, fallback_reason, solver, "
                "predictions, notes) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, "
                "?, ?) RETURNING id",
                (
                    record.batch_id,
                    record.unit,
                    int(record.step),
                    float(record.process_time_h),
                    float(record.wall_time),
                    record.mode,
                    float(record.growth_factor),
                    float(record.overhead_s),
                    None if success is None else int(bool(success)),
                    None if solver.get("status") is None else str(solver["status"]),
                    None if iterations is None else int(iterations),
                    _opt_float(solver.get("solve_time_s")),
                    _opt_float(solver.get("cost")),
                    str(solver.get("fallback_used", "") or ""),
                    str(solver.get("fallback_reason", "") or ""),
                    solver_json,
                    predictions_json,
                    notes_json,
                ),
            ).fetchone()
            if row is None:  # pragma: no cover - RETURNING always yields the id
                raise HistorianError(f"historian: {what}: the database returned no id")
            step_id = int(row[0])
            cur.executemany(
                "INSERT INTO measurements (step_id, idx, name, value, value_unit, "
                "sample_time_h, arrival_time_h, source, quality, accepted, reason) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                [
                    (
                        step_id,
                        i,
                        m.name,
                        float(m.value),
                        m.unit,
                        float(m.sample_time_h),
                        float(m.arrival_time_h),
                        m.source,
                        m.quality,
                        int(bool(m.accepted)),
                        m.reason,
                    )
                    for i, m in enumerate(record.measurements)
                ],
            )
            cur.executemany(
                "INSERT INTO setpoints (step_id, idx, name, requested, value, value_unit, "
                "status) VALUES (?, ?, ?, ?, ?, ?, ?)",
                [
                    (step_id, i, s.name, float(s.requested), float(s.value), s.unit, s.status)
                    for i, s in enumerate(record.setpoints)
                ],
            )
            cur.executemany(
                "INSERT INTO estimates (step_id, kind, idx, name, value) VALUES (?, ?, ?, ?, ?)",
                [
                    (step_id, kind, i, name, float(value))
                    for kind, values in (
                        ("mean", record.estimate),
                        ("std", record.estimate_std),
                        ("diagnostic", record.diagnostics),
                    )
                    for i, (name, value) in enumerate(values.items())
                ],
            )
            self.chain(cur, "step", record.batch_id, record.unit, str(int(record.step)), digest)

    def append_event(self, record: EventRecord) -> None:
        """Store one event in one committed transaction.

        Raises:
            HistorianError: the database refused or failed; nothing was written.
        """
        what = f"appending a {record.kind!r} event of batch {record.batch_id!r}"
        try:
            data = canonical_json(dict(record.data))
        except (TypeError, ValueError) as exc:
            raise HistorianError(f"historian: {what}: data is not storable: {exc}") from exc
        with self.transaction(what) as cur:
            row = cur.execute(
                "INSERT INTO events (batch_id, unit, process_time_h, wall_time, kind, severity, "
                "message, data) VALUES (?, ?, ?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    record.batch_id,
                    record.unit,
                    float(record.process_time_h),
                    float(record.wall_time),
                    record.kind,
                    record.severity,
                    record.message,
                    data,
                ),
            ).fetchone()
            if row is None:  # pragma: no cover - RETURNING always yields the id
                raise HistorianError(f"historian: {what}: the database returned no id")
            event_id = int(row[0])
            self.chain(
                cur,
                "event",
                record.batch_id,
                record.unit,
                str(event_id),
                event_digest(event_id, record),
            )

    # -------------------------------------------------------------- readers

    def batches(self) -> list[str]:
        """Every batch id with steps or events, by the controller time of its first record."""
        rows = self.query(
            "SELECT batch_id FROM (SELECT batch_id, MIN(wall_time) AS first FROM steps GROUP BY "
            "batch_id UNION ALL SELECT batch_id, MIN(wall_time) FROM events GROUP BY batch_id) "
            "AS b GROUP BY batch_id ORDER BY MIN(first), batch_id",
            what="listing batches",
        )
        return [str(r[0]) for r in rows]

    def require_batch(self, batch_id: str) -> None:
        """Raise a ValueError naming the known batches when ``batch_id`` has no records."""
        known = self.batches()
        if batch_id not in known:
            listed = ", ".join(repr(b) for b in known) if known else "none"
            raise ValueError(
                f"batch {batch_id!r} has no records in historian {self.display_url}; known "
                f"batches: {listed}. Give one of them with --batch (or another --historian)"
            )

    def units(self, batch_id: str) -> list[str]:
        """The units of a batch (with steps or events), sorted."""
        rows = self.query(
            "SELECT unit FROM steps WHERE batch_id = ? UNION SELECT unit FROM events "
            "WHERE batch_id = ?",
            (batch_id, batch_id),
            what=f"listing the units of batch {batch_id!r}",
        )
        return sorted(str(r[0]) for r in rows)

    def steps(self, batch_id: str, unit: str | None = None) -> list[StepRecord]:
        """The steps of a batch (one unit or all), ordered by unit and step."""
        where = "batch_id = ?" + (" AND unit = ?" if unit is not None else "")
        params: tuple[Any, ...] = (batch_id,) if unit is None else (batch_id, unit)
        return self._read_steps(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE {where} ORDER BY unit, step",  # noqa: S608 (fixed SQL; values are parameters)
            params,
            f"reading the steps of batch {batch_id!r}",
        )

    def last_step(self, batch_id: str, unit: str) -> StepRecord | None:
        """The latest stored step of a unit in a batch (for a restart), or None."""
        found = self._read_steps(
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE batch_id = ? AND unit = ? "  # noqa: S608
            "ORDER BY step DESC LIMIT 1",
            (batch_id, unit),
            f"reading the last step of batch {batch_id!r} unit {unit!r}",
        )
        return found[0] if found else None

    def events(
        self, batch_id: str, unit: str | None = None, kind: str | None = None
    ) -> list[EventRecord]:
        """The events of a batch (optionally of one unit and/or kind) in append order."""
        where, params = ["batch_id = ?"], [batch_id]
        if unit is not None:
            where.append("unit = ?")
            params.append(unit)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        with self.transaction(f"reading the events of batch {batch_id!r}", write=False) as cur:
            return [e for _, e in self._events_in(cur, " AND ".join(where), params)]

    def events_with_ids(self, batch_id: str) -> list[tuple[int, EventRecord]]:
        """(row id, event) of a batch in append order (for verification)."""
        with self.transaction(f"reading the events of batch {batch_id!r}", write=False) as cur:
            return self._events_in(cur, "batch_id = ?", (batch_id,))

    @staticmethod
    def _events_in(
        cur: _Cursor, where: str, params: Sequence[Any]
    ) -> list[tuple[int, EventRecord]]:
        rows = cur.execute(
            "SELECT id, batch_id, unit, process_time_h, wall_time, kind, severity, message, "  # noqa: S608 (fixed SQL; values are parameters)
            f"data FROM events WHERE {where} ORDER BY id",
            params,
        ).fetchall()
        return [
            (
                int(r[0]),
                EventRecord(
                    batch_id=r[1],
                    unit=r[2],
                    process_time_h=_f(r[3]),
                    wall_time=_f(r[4]),
                    kind=r[5],
                    severity=r[6],
                    message=r[7],
                    data=_json_or_text(r[8]),
                ),
            )
            for r in rows
        ]

    def _read_steps(self, sql: str, params: Sequence[Any], what: str) -> list[StepRecord]:
        with self.transaction(what, write=False) as cur:
            return self._steps_of(cur, sql, params)

    def _steps_in(self, cur: _Cursor, where: str, params: Sequence[Any]) -> list[StepRecord]:
        return self._steps_of(
            cur,
            f"SELECT {_STEP_COLUMNS} FROM steps WHERE {where} ORDER BY unit, step",  # noqa: S608
            params,
        )

    @staticmethod
    def _steps_of(cur: _Cursor, sql: str, params: Sequence[Any]) -> list[StepRecord]:
        rows = cur.execute(sql, params).fetchall()
        if not rows:
            return []
        ids = [int(r[0]) for r in rows]
        marks = ", ".join("?" for _ in ids)
        meas = cur.execute(
            "SELECT step_id, name, value, value_unit, sample_time_h, arrival_time_h, "  # noqa: S608
            f"source, quality, accepted, reason FROM measurements WHERE step_id IN ({marks}) "
            "ORDER BY step_id, idx",
            ids,
        ).fetchall()
        setp = cur.execute(
            "SELECT step_id, name, requested, value, value_unit, status FROM setpoints "  # noqa: S608
            f"WHERE step_id IN ({marks}) ORDER BY step_id, idx",
            ids,
        ).fetchall()
        est = cur.execute(
            f"SELECT step_id, kind, name, value FROM estimates WHERE step_id IN ({marks}) "  # noqa: S608
            "ORDER BY step_id, kind, idx",
            ids,
        ).fetchall()
        by_meas: dict[int, list[MeasurementRecord]] = {}
        for m in meas:
            by_meas.setdefault(int(m[0]), []).append(
                MeasurementRecord(
                    name=m[1],
                    value=_f(m[2]),
                    unit=m[3],
                    sample_time_h=_f(m[4]),
                    arrival_time_h=_f(m[5]),
                    source=m[6],
                    quality=m[7],
                    accepted=bool(m[8]),
                    reason=m[9],
                )
            )
        by_setp: dict[int, list[SetpointRecord]] = {}
        for s in setp:
            by_setp.setdefault(int(s[0]), []).append(
                SetpointRecord(
                    name=s[1], requested=_f(s[2]), value=_f(s[3]), unit=s[4], status=s[5]
                )
            )
        by_est: dict[tuple[int, str], dict[str, float]] = {}
        for e in est:
            by_est.setdefault((int(e[0]), e[1]), {})[e[2]] = _f(e[3])
        out = []
        for r in rows:
            sid = int(r[0])
            out.append(
                StepRecord(
                    batch_id=r[1],
                    unit=r[2],
                    step=int(r[3]),
                    process_time_h=_f(r[4]),
                    wall_time=_f(r[5]),
                    mode=r[6],
                    growth_factor=_f(r[7]),
                    overhead_s=_f(r[8]),
                    solver=json.loads(r[9]),
                    predictions={k: _float_seq(v) for k, v in json.loads(r[10]).items()},
                    notes=tuple(json.loads(r[11])),
                    measurements=tuple(by_meas.get(sid, ())),
                    setpoints=tuple(by_setp.get(sid, ())),
                    estimate=by_est.get((sid, "mean"), {}),
                    estimate_std=by_est.get((sid, "std"), {}),
                    diagnostics=by_est.get((sid, "diagnostic"), {}),
                )
            )
        return out

    # -------------------------------------------------------------- tables

    def to_dataframes(self, batch_id: str) -> dict[str, pd.DataFrame]:
        """The batch as tables (pandas), for reports and exports.

        Returns:
            ``steps``: one row per unit and step: time, mode, solver figures, estimates
            (``<state>`` and ``<state>_std``), setpoints written (``<input>``) and
            requested (``<input>_requested``); ``measurements``, ``setpoints``:
            one row per item; ``predictions``: one row per step, horizon point and
            variable (``value`` and ``std``); ``events``: one row per event.
        Raises:
            ValueError: no records of ``batch_id`` (the message lists the known batches).
        """
        import pandas as pd

        self.require_batch(batch_id)
        steps = self.steps(batch_id)
        step_rows: list[dict[str, Any]] = []
        meas_rows: list[dict[str, Any]] = []
        setp_rows: list[dict[str, Any]] = []
        pred_rows: list[dict[str, Any]] = []
        for s in steps:
            key = {"unit": s.unit, "step": s.step, "process_time_h": s.process_time_h}
            row: dict[str, Any] = {
                "batch_id": s.batch_id,
                **key,
                "wall_time": s.wall_time,
                "mode": s.mode,
                "growth_factor": s.growth_factor,
                "overhead_s": s.overhead_s,
                "solver_success": s.solver.get("success"),
                "solver_status": s.solver.get("status", ""),
                "solver_iterations": s.solver.get("iterations"),
                "solve_time_s": _opt_float(s.solver.get("solve_time_s")),
                "solver_cost": _opt_float(s.solver.get("cost")),
                "fallback_used": s.solver.get("fallback_used", "") or "",
                "fallback_reason": s.solver.get("fallback_reason", "") or "",
                "notes": "; ".join(s.notes),
            }
            for name, value in s.estimate.items():
                row[name] = value
            for name, value in s.estimate_std.items():
                row[f"{name}_std"] = value
            for name, value in s.diagnostics.items():  # the estimator's mismatch figures
                row[f"diagnostic.{name}"] = value
            for sp in s.setpoints:
                row[sp.name] = sp.value
                row[f"{sp.name}_requested"] = sp.requested
                row[f"{sp.name}_status"] = sp.status
            step_rows.append(row)
            for m in s.measurements:
                meas_rows.append(
                    {
                        **key,
                        "name": m.name,
                        "value": m.value,
                        "value_unit": m.unit,
                        "sample_time_h": m.sample_time_h,
                        "arrival_time_h": m.arrival_time_h,
                        "source": m.source,
                        "quality": m.quality,
                        "accepted": m.accepted,
                        "reason": m.reason,
                    }
                )
            for sp in s.setpoints:
                setp_rows.append(
                    {
                        **key,
                        "name": sp.name,
                        "requested": sp.requested,
                        "value": sp.value,
                        "value_unit": sp.unit,
                        "status": sp.status,
                    }
                )
            times = s.predictions.get("time_h", ())
            for name, values in s.predictions.items():
                if name == "time_h" or name.endswith("_std"):
                    continue
                std = s.predictions.get(f"{name}_std", ())
                for i, value in enumerate(values):
                    pred_rows.append(
                        {
                            **key,
                            "horizon_index": i,
                            "time_h": times[i] if i < len(times) else math.nan,
                            "name": name,
                            "value": value,
                            "std": std[i] if i < len(std) else math.nan,
                        }
                    )
        events = [
            {
                "batch_id": e.batch_id,
                "unit": e.unit,
                "process_time_h": e.process_time_h,
                "wall_time": e.wall_time,
                "kind": e.kind,
                "severity": e.severity,
                "message": e.message,
                "data": canonical_json(dict(e.data)),
            }
            for e in self.events(batch_id)
        ]
        key_cols = ["unit", "step", "process_time_h"]
        return {
            "steps": pd.DataFrame(step_rows, columns=_columns(step_rows, ["batch_id", *key_cols])),
            "measurements": pd.DataFrame(
                meas_rows,
                columns=[
                    *key_cols,
                    "name",
                    "value",
                    "value_unit",
                    "sample_time_h",
                    "arrival_time_h",
                    "source",
                    "quality",
                    "accepted",
                    "reason",
                ],
            ),
            "setpoints": pd.DataFrame(
                setp_rows,
                columns=[*key_cols, "name", "requested", "value", "value_unit", "status"],
            ),
            "predictions": pd.DataFrame(
                pred_rows, columns=[*key_cols, "horizon_index", "time_h", "name", "value", "std"]
            ),
            "events": pd.DataFrame(
                events,
                columns=[
                    "batch_id",
                    "unit",
                    "process_time_h",
                    "wall_time",
                    "kind",
                    "severity",
                    "message",
                    "data",
                ],
            ),
        }


def _json_or_text(text: Any) -> Any:
    """A JSON column read back; an edited value that is no JSON is kept as text (it will
    not match its digest)."""
    try:
        return json.loads(text)
    except (TypeError, ValueError):
        return {"$unreadable": str(text)}


def _columns(rows: Sequence[Mapping[str, Any]], first: Sequence[str]) -> list[str]:
    """Column order: ``first``, then every other key in order of first appearance."""
    cols = list(first)
    seen = set(cols)
    for row in rows:
        for key in row:
            if key not in seen:
                seen.add(key)
                cols.append(key)
    return cols


def _opt_float(value: Any) -> float | None:
    if value is None:
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None

"""Records of what the controller saw, decided and did: one :class:`StepRecord` per control
cycle and one :class:`EventRecord` per discrete event (mode change, fallback, fault, printer
event, alarm). The runtime loop produces them; the historian stores them; reports read them.

All values are in the canonical units of the model (device units are converted at the
plant I/O boundary). Times: ``process_time_h`` is the culture age from the plant's process
clock; ``wall_time`` is the controller's own clock (Unix seconds, UTC).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["EventRecord", "MeasurementRecord", "SetpointRecord", "StepRecord"]


@dataclasses.dataclass(frozen=True)
class MeasurementRecord:
    """One measured value as received, with the validation decision on it.

    Attributes:
        name: process variable (model vocabulary, e.g. ``glucose``).
        value: canonical unit (may be NaN when the device sent garbage).
        unit: canonical unit.
        sample_time_h: culture age of the sample, h.
        arrival_time_h: culture age at which the value became available, h.
        source: ``online`` or ``assay``.
        quality: ``good``, ``uncertain`` or ``bad`` (from the device / OPC UA status).
        accepted: the estimator used it.
        reason: why it was rejected (``""`` when accepted).
    """

    name: str
    value: float
    unit: str
    sample_time_h: float
    arrival_time_h: float
    source: str
    quality: str
    accepted: bool
    reason: str = ""


@dataclasses.dataclass(frozen=True)
class SetpointRecord:
    """One setpoint of the cycle's bundle.

    Attributes:
        name: manipulated variable (model vocabulary).
        requested: what the optimiser (or fallback) proposed, canonical unit.
        value: what was sent after output limits, canonical unit.
        unit: canonical unit.
        status: per-item result from the plant (e.g. ``Good``, ``BadOutOfRange``) or
            ``not written`` (stale data, not in remote mode, ...).
    """

    name: str
    requested: float
    value: float
    unit: str
    status: str


@dataclasses.dataclass(frozen=True)
class StepRecord:
    """Everything about one control cycle of one unit.

    Attributes:
        batch_id: the batch (patient) identifier.
        unit: the bioreactor's name in the site file.
        step: cycle counter within the batch (0, 1, ...).
        process_time_h: culture age at the cycle, h.
        wall_time: controller clock, Unix seconds.
        mode: control mode seen at the cycle (``remote``, ``local``, ``shed``,
            ``disconnected``, ``simulation``...).
        measurements: what arrived since the last cycle, with decisions.
        estimate: state name -> posterior mean.
        estimate_std: state name -> posterior standard deviation.
        growth_factor: estimated per-patient growth factor (1.0 when not estimated).
        solver: MPC outcome (``success``, ``status``, ``iterations``, ``solve_time_s``,
            ``cost``, ``fallback_used``, ``fallback_reason``, ``slacks``); empty for
            controllers without an optimiser.
        predictions: name -> sequence over the horizon (``time_h``, states, and
            ``<state>_std``); empty when none.
        setpoints: the bundle of the cycle.
        overhead_s: loop time excluding the solve, s.
        notes: free-form remarks of the cycle (e.g. why nothing was written).
        diagnostics: the estimator's model-mismatch figures
            (:meth:`controller.numerics.mismatch.MismatchReport.values`: ``nis.<source>.<var>``,
            ``nis_high.<...>``, ``gain.<probe>``, ``alarm.<key>``); empty without an estimator.
    """

    batch_id: str
    unit: str
    step: int
    process_time_h: float
    wall_time: float
    mode: str
    measurements: tuple[MeasurementRecord, ...] = ()
    estimate: Mapping[str, float] = dataclasses.field(default_factory=dict)
    estimate_std: Mapping[str, float] = dataclasses.field(default_factory=dict)
    growth_factor: float = 1.0
    solver: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    predictions: Mapping[str, tuple[float, ...]] = dataclasses.field(default_factory=dict)
    setpoints: tuple[SetpointRecord, ...] = ()
    overhead_s: float = 0.0
    notes: tuple[str, ...] = ()
    diagnostics: Mapping[str, float] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class EventRecord:
    """A discrete event.

    Attributes:
        batch_id, unit: as in :class:`StepRecord`.
        process_time_h: culture age, h (NaN when unknown, e.g. while disconnected).
        wall_time: controller clock, Unix seconds.
        kind: ``mode``, ``fallback``, ``fault``, ``alarm``, ``connection``, ``printer``,
            ``residual_update``, ``restart``...
        severity: ``info``, ``warning`` or ``alarm``.
        message: one human-readable line.
        data: structured details (JSON-serialisable).
    """

    batch_id: str
    unit: str
    process_time_h: float
    wall_time: float
    kind: str
    severity: str
    message: str
    data: Mapping[str, Any] = dataclasses.field(default_factory=dict)

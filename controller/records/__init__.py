"""Records of what the controller saw, decided and did: step and event records, the
historian (SQLite, PostgreSQL), the audit trail and the batch report.

The names below are the public API; the modules are the implementation."""

from __future__ import annotations

from controller.records.audit import AuditRecord, AuditTrail, AuditVerification
from controller.records.historian import Historian, config_event, default_url
from controller.records.report import write_report
from controller.records.steps import EventRecord, MeasurementRecord, SetpointRecord, StepRecord

__all__ = [
    "AuditRecord",
    "AuditTrail",
    "AuditVerification",
    "EventRecord",
    "Historian",
    "MeasurementRecord",
    "SetpointRecord",
    "StepRecord",
    "config_event",
    "default_url",
    "write_report",
]

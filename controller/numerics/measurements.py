"""Measurement records shared by every plant interface (simulated or OPC UA)."""

from __future__ import annotations

import dataclasses

__all__ = ["Measurement"]


@dataclasses.dataclass(frozen=True)
class Measurement:
    """One measured value.

    Attributes:
        name: process variable (full word, e.g. ``glucose``).
        value: in the canonical unit ``unit``.
        unit: canonical unit of the value.
        sample_time: culture age at which the sample was taken, h.
        arrival_time: culture age at which the value became available, h.
        source: ``online`` (probe) or ``assay`` (offline lab result).
        quality: ``good``, ``uncertain`` or ``bad``.
    """

    name: str
    value: float
    unit: str
    sample_time: float
    arrival_time: float
    source: str
    quality: str = "good"

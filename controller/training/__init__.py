"""Training from batch records, as library calls: batch records -> training data
(``batches``), fitting the residual and its 24 h validation (``fitting``).

The names below are the public API; the modules are the implementation."""

from __future__ import annotations

from controller.training.batches import (
    BatchRecord,
    growth_rate_observations,
    load_batch_records,
    read_batch_record,
    reconstruct_states,
)
from controller.training.fitting import (
    FitResult,
    FitSpec,
    fit_residual,
    nominal_model,
    validate_24h,
)
from controller.training.process_check import check_records_fit_process
from controller.training.record_units import (
    RecordMapping,
    load_record_mapping,
    read_export,
)

__all__ = [
    "BatchRecord",
    "FitResult",
    "FitSpec",
    "RecordMapping",
    "check_records_fit_process",
    "fit_residual",
    "growth_rate_observations",
    "load_batch_records",
    "load_record_mapping",
    "nominal_model",
    "read_batch_record",
    "read_export",
    "reconstruct_states",
    "validate_24h",
]

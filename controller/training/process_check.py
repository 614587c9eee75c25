"""Do the batch records fit the process the model is built for?

A residual (``hmpc fit``) or a calibration fitted to records of another process learns
the difference between the processes, not the model's error: 0.35 L records fitted against
the default 1 L process gave a "hybrid" model four times worse than the mechanistic one.
:func:`check_records_fit_process` compares, before any fit:

* the **start volume** of every record (its first ``volume``) with the process file's
  initial volume (the model's initial state): beyond ``volume_tolerance`` (relative) an
  error, which says when the process file is the plug-in's default (no ``--process``);
* the **process values a record declares** (``record.toml`` ``[process]`` beside a
  ``trajectory.csv``, or a mapping file's ``[process]``; units converted): a declared
  value the process file does not have is an error; a feed-composition value
  (the plug-in's ``feed_composition``) that differs is an error, any other a warning;
* records that declare **no feed composition**: a warning naming the values assumed from
  the process file.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from controller.numerics.units import MOLAR_MASSES
from controller.training.record_units import column_factor
from plant_models.config import suggest
from plant_models.errors import ConfigError
from plant_models.process import process_of

if TYPE_CHECKING:
    from controller.training.batches import BatchRecord

__all__ = ["check_records_fit_process"]

log = logging.getLogger(__name__)


def _process_fields(process: Any) -> dict[str, tuple[float, str]]:
    """Process field -> (value, canonical unit) of a process specification dataclass."""
    if process is None or not dataclasses.is_dataclass(process):
        return {}
    out = {}
    for f in dataclasses.fields(process):
        value = getattr(process, f.name)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[f.name] = (float(value), str(f.metadata.get("unit", "")))
    return out


def _differs(a: float, b: float, tolerance: float) -> bool:
    """Whether two values differ by more than ``tolerance`` (relative); a value that is not
    finite (nan, inf) always differs: it cannot show that the record fits."""
    if not (math.isfinite(a) and math.isfinite(b)):
        return True
    return abs(a - b) > tolerance * max(abs(a), abs(b), 1e-12)


def check_records_fit_process(
    records: Sequence[BatchRecord],
    model: Any,
    process_file: str | Path | None = None,
    *,
    volume_tolerance: float = 0.05,
    value_tolerance: float = 0.02,
) -> tuple[str, ...]:
    """Check that ``records`` were run under the process ``model`` is built for.

    Args:
        records: the batch records (:func:`controller.training.load_batch_records`).
        model: the mechanistic model (its ``process`` and its plug-in's
            ``feed_composition``); a hybrid model is accepted.
        process_file: the process file the model was built from, as the user gave it
            (``--process``); None: the plug-in's default (the messages say so).
        volume_tolerance: relative difference of start volumes taken as a mismatch.
        value_tolerance: relative difference of a declared process value taken as one.

    Returns:
        The warnings (each also logged at warning level).

    Raises:
        ConfigError: a start volume or a declared feed composition that does not match,
            or a declared value the process file has no field for, naming the records.
    """
    base = getattr(model, "base", model)
    plugin = process_of(base)
    process = getattr(base, "process", None)
    fields = _process_fields(process)
    name = plugin.name if plugin is not None else type(base).__name__
    if process_file is None:
        shown = plugin.process_file() if plugin is not None else "the packaged process file"
        which = f"the default process of {name!r} ({shown})"
        remedy = "pass --process with the process file the batches ran under"
    else:
        which = f"the process file {process_file}"
        remedy = "check that it is the process the batches ran under (or the records)"
    feed = tuple(plugin.feed_composition) if plugin is not None else ()
    errors: list[str] = []
    warnings: list[str] = []

    names = list(base.state_names)
    start = base.initial_state()
    start_volume = float(start["volume"]) if "volume" in names else math.nan
    if math.isfinite(start_volume):
        off = [
            (r.name, float(r.steps["volume"].iloc[0]))
            for r in records
            if _differs(float(r.steps["volume"].iloc[0]), start_volume, volume_tolerance)
        ]
        if off:
            listed = ", ".join(f"{n} ({v:.4g} L)" for n, v in off[:5])
            more = f" and {len(off) - 5} more" if len(off) > 5 else ""
            errors.append(
                f"{len(off)} of {len(records)} batch record(s) start at another volume than "
                f"{which}, which starts at {start_volume:.4g} L: {listed}{more} (tolerance "
                f"{volume_tolerance:.0%}); {remedy}"
            )

    undeclared = []
    for rec in records:
        for key, declared in rec.process.items():
            if key not in fields:
                errors.append(
                    f"{declared.where}: {key!r} is not a value of {which}."
                    f"{suggest(key, list(fields))}"
                )
                continue
            value, unit = fields[key]
            variable = next((m for m in MOLAR_MASSES if m in key), key)
            try:
                factor = column_factor(variable, declared.unit, unit, declared.where)
            except ConfigError as exc:
                errors.append(str(exc))
                continue
            got = declared.value * factor
            if _differs(got, value, value_tolerance):
                text = (
                    f"batch {rec.name}: {declared.where} = {declared.value:g} {declared.unit}"
                    f" ({got:.4g} {unit}), but {which} has {key} = {value:.4g} {unit}"
                )
                (errors if key in feed else warnings).append(text)
        if any(f not in rec.process for f in feed):
            undeclared.append(rec.name)
    if undeclared and feed:
        values = ", ".join(
            f"{f} = {fields[f][0]:g} {fields[f][1]}".rstrip() for f in feed if f in fields
        )
        listed = ", ".join(undeclared[:5]) + (
            f" and {len(undeclared) - 5} more" if len(undeclared) > 5 else ""
        )
        warnings.append(
            f"{len(undeclared)} batch record(s) ({listed}) declare no feed composition; "
            f"assuming {which}'s: {values} (declare it in record.toml [process] beside the "
            "record or in the mapping file's [process])"
        )
    if errors:
        raise ConfigError(
            "the batch records do not fit the process: " + "; ".join(dict.fromkeys(errors))
        )
    for w in warnings:
        log.warning("%s", w)
    return tuple(warnings)

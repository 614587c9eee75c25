"""Unit conversion to the model's canonical units: one table for every boundary where
values come in from outside (the site file's OPC UA tags, batch records and vendor exports,
measurements handed to the estimator).

A conversion is ``canonical = scale * device + offset``. Known pairs are in
:data:`CONVERSIONS` (either direction); a mass concentration (``g/L``, ``mg/L``) becomes a
molar one (``mM``) by the variable's molar mass (:data:`MOLAR_MASSES`). Anything else is an
error naming where the value came from: units are never guessed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from types import MappingProxyType

from plant_models.errors import ConfigError

__all__ = [
    "CONVERSIONS",
    "MOLAR_MASSES",
    "UnitConversion",
    "conversion_for",
    "known_conversion",
]

#: (device unit, canonical unit) -> factor: canonical = factor * device.
CONVERSIONS: Mapping[tuple[str, str], float] = MappingProxyType(
    {
        ("cells/mL", "1e6 cells/mL"): 1e-6,
        ("1e5 cells/mL", "1e6 cells/mL"): 0.1,
        ("1e9 cells/L", "1e6 cells/mL"): 1.0,
        ("cells/L", "1e9 cells/L"): 1e-9,
        ("1e6 cells/mL", "1e9 cells/L"): 1.0,
        ("%", "1"): 0.01,
        ("1/h", "1/d"): 24.0,
        ("vvd", "1/d"): 1.0,
        ("L/h", "mL/h"): 1000.0,
        ("mL/min", "mL/h"): 60.0,
        ("uL/min", "mL/h"): 0.06,
        ("mL/h", "L/h"): 1e-3,
        ("L/d", "L/h"): 1.0 / 24.0,
        ("mL/min", "L/h"): 0.06,
        ("IU/h", "kIU/h"): 1e-3,
        ("U/mL", "IU/mL"): 1.0,
        ("kIU/L", "IU/mL"): 1.0,
        ("mmol/L", "mM"): 1.0,
        ("mL", "L"): 1e-3,
        ("g/L", "mg/L"): 1000.0,
        ("min", "h"): 1.0 / 60.0,
        ("s", "h"): 1.0 / 3600.0,
        ("d", "h"): 24.0,
    }
)

#: Molar masses (g/mol) for mass concentrations (g/L -> mM).
MOLAR_MASSES: Mapping[str, float] = MappingProxyType(
    {"glucose": 180.156, "lactate": 90.078, "glutamine": 146.146, "ammonia": 17.031}
)

#: Mass concentrations in g/L per unit, for the molar-mass route to mM.
_MASS_CONCENTRATIONS: Mapping[str, float] = MappingProxyType({"g/L": 1.0, "mg/L": 1e-3})


@dataclasses.dataclass(frozen=True)
class UnitConversion:
    """``canonical = scale * device + offset``."""

    device_unit: str
    canonical_unit: str
    scale: float = 1.0
    offset: float = 0.0

    def to_canonical(self, value: float) -> float:
        return self.scale * value + self.offset

    def to_device(self, value: float) -> float:
        return (value - self.offset) / self.scale


def known_conversion(variable: str, unit: str, canonical_unit: str) -> float | None:
    """The factor ``canonical = factor * value`` from the table (or the molar mass of
    ``variable``), or None when the pair is not known."""
    if unit == canonical_unit:
        return 1.0
    factor = CONVERSIONS.get((unit, canonical_unit))
    if factor is None and (canonical_unit, unit) in CONVERSIONS:
        factor = 1.0 / CONVERSIONS[(canonical_unit, unit)]
    if factor is None and unit in _MASS_CONCENTRATIONS and canonical_unit == "mM":
        mass = MOLAR_MASSES.get(variable)
        if mass is not None:
            factor = _MASS_CONCENTRATIONS[unit] * 1000.0 / mass
    return factor


def conversion_for(
    variable: str,
    device_unit: str,
    canonical_unit: str,
    where: str,
    *,
    scale: float | None = None,
    offset: float | None = None,
) -> UnitConversion:
    """The conversion of one value source: explicit scale/offset, else a known unit pair.

    Raises:
        ConfigError: no known conversion (the message starts with ``where``), or a bad
            explicit scale/offset.
    """
    if scale is not None or offset is not None:
        s = 1.0 if scale is None else float(scale)
        o = 0.0 if offset is None else float(offset)
        if not (math.isfinite(s) and s != 0.0 and math.isfinite(o)):
            raise ConfigError(f"{where}: scale must be finite and non-zero, offset finite.")
        return UnitConversion(device_unit, canonical_unit, s, o)
    factor = known_conversion(variable, device_unit, canonical_unit)
    if factor is None:
        raise ConfigError(
            f"{where}: no known conversion from {device_unit!r} to the canonical unit "
            f"{canonical_unit!r} of {variable}; state the device unit as {canonical_unit!r} "
            f"or give scale (and offset) with canonical = scale * device + offset."
        )
    return UnitConversion(device_unit, canonical_unit, factor)

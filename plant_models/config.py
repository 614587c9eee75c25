"""Loading of TOML parameter files into frozen dataclasses, with validation.

A parameter file looks like::

    [meta]
    model = "tcell"
    title = "..."
    [sources]
    duran2023 = "C. Duran-Villalobos et al., ... (repository ..., file ...)"
    [parameters]
    mu_max = { value = 0.035, unit = "1/h", source = "calibrated, docs/models.md" }

Each dataclass field declares its canonical unit, its physical range and a description in
its ``metadata`` (see :func:`param`). Loading checks, in order: unknown sections and keys
(with close-match suggestions), missing keys, units (must equal the canonical unit; units
are never converted silently), types and ranges. Every error is a :class:`ConfigError`
naming the file and key.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from plant_models.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "ParameterFile",
    "check_keys",
    "load_parameters",
    "load_toml",
    "param",
    "parameter_table",
]


def param(unit: str, low: float, high: float, description: str, *, low_open: bool = False) -> Any:
    """Declare a dataclass field as a physical parameter.

    Args:
        unit: canonical unit (the file must state the same unit).
        low, high: inclusive physical range.
        description: one line for docs and error messages.
        low_open: if true, ``low`` itself is excluded (e.g. strictly positive values).
    """
    return dataclasses.field(
        metadata={
            "unit": unit,
            "low": low,
            "high": high,
            "description": description,
            "low_open": low_open,
        }
    )


def suggest(key: str, allowed: Iterable[str]) -> str:
    """A ' Did you mean ...?' hint for a misspelled key, or an empty string."""
    matches = difflib.get_close_matches(key, list(allowed), n=3, cutoff=0.6)
    if not matches:
        return ""
    return " Did you mean " + " or ".join(repr(m) for m in matches) + "?"


def check_keys(
    table: Mapping[str, Any], allowed: Iterable[str], where: str, *, required: Iterable[str] = ()
) -> None:
    """Reject unknown keys (with suggestions) and missing required keys of a TOML table."""
    allowed_list = list(allowed)
    for key in table:
        if key not in allowed_list:
            raise ConfigError(
                f"{where}: unknown key {key!r}.{suggest(key, allowed_list)} "
                f"Allowed keys: {', '.join(sorted(allowed_list))}."
            )
    missing = [k for k in required if k not in table]
    if missing:
        raise ConfigError(f"{where}: missing required key(s): {', '.join(missing)}.")


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning I/O and syntax errors into :class:`ConfigError`."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc}).") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot be read ({exc.strerror}).") from None


def check_range(value: float, meta: Mapping[str, Any], where: str) -> None:
    """Check one number against the range declared in a field's metadata."""
    low, high = float(meta["low"]), float(meta["high"])
    low_ok = value > low if meta.get("low_open") else value >= low
    if not math.isfinite(value) or not low_ok or value > high:
        bracket = "(" if meta.get("low_open") else "["
        raise ConfigError(
            f"{where} = {value!r} {meta['unit']} is outside its physical range "
            f"{bracket}{low:g}, {high:g}] {meta['unit']} ({meta['description']})."
        )


@dataclasses.dataclass(frozen=True)
class ParameterFile:
    """Provenance of a loaded parameter set."""

    path: str
    model: str
    title: str
    sources: Mapping[str, str]
    parameter_sources: Mapping[str, str]


def load_parameters(cls: type[T], path: str | Path, *, model: str) -> tuple[T, ParameterFile]:
    """Load and validate a parameter file into the frozen dataclass ``cls``.

    Returns:
        (parameters, provenance)
    Raises:
        ConfigError: unknown/missing key, wrong unit or type, value out of range,
        or a file written for another model.
    """
    p = Path(path)
    data = load_toml(p)
    # a process file's [recipe] is read by plant_models.process.load_recipe
    check_keys(
        data, ["meta", "sources", "parameters", "recipe"], str(p), required=["meta", "parameters"]
    )
    meta = data["meta"]
    check_keys(
        meta,
        ["model", "title", "description", "version"],
        f"{p} [meta]",
        required=["model", "title"],
    )
    if meta["model"] != model:
        raise ConfigError(
            f"{p} [meta] model = {meta['model']!r}, but a {model!r} parameter set is needed."
        )
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    table = data["parameters"]
    check_keys(table, fields, f"{p} [parameters]", required=fields)
    values: dict[str, float] = {}
    param_sources: dict[str, str] = {}
    for name, entry in table.items():
        where = f"{p} [parameters] {name}"
        if not isinstance(entry, dict):
            raise ConfigError(
                f"{where}: expected a table {{ value = ..., unit = ..., source = ... }}."
            )
        check_keys(
            entry, ["value", "unit", "source", "note"], where, required=["value", "unit", "source"]
        )
        meta_f = fields[name].metadata
        if entry["unit"] != meta_f["unit"]:
            raise ConfigError(
                f"{where}: unit {entry['unit']!r} given, but this parameter is in "
                f"{meta_f['unit']!r}; convert the value (units are never converted silently)."
            )
        value = entry["value"]
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: value must be a number, got {value!r}.")
        check_range(float(value), meta_f, where)
        values[name] = float(value)
        param_sources[name] = str(entry["source"])
    sources = data.get("sources", {})
    for key, src in param_sources.items():
        for ref in _refs(src):
            if ref != "check" and ref not in sources:
                raise ConfigError(
                    f"{p} [parameters] {key}: source cites [{ref}], which is not in [sources]."
                    f"{suggest(ref, sources)}"
                )
    prov = ParameterFile(str(p), model, str(meta["title"]), dict(sources), param_sources)
    return cls(**values), prov


def _refs(source: str) -> list[str]:
    """Citation keys written as ``[key]`` inside a parameter's source text.

    ``[check]`` is not a citation: it marks a prior not confirmed from a primary source.
    """
    out: list[str] = []
    rest = source
    while "[" in rest and "]" in rest:
        start = rest.index("[")
        end = rest.index("]", start)
        out.append(rest[start + 1 : end])
        rest = rest[end + 1 :]
    return out


def parameter_table(cls: type[Any]) -> list[tuple[str, str, float, float, str]]:
    """(name, unit, low, high, description) of every parameter field, for docs."""
    return [
        (
            f.name,
            f.metadata["unit"],
            f.metadata["low"],
            f.metadata["high"],
            f.metadata["description"],
        )
        for f in dataclasses.fields(cls)
    ]

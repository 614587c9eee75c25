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

Settings files (tuning of the MPC, the estimator, ...) are plain TOML tables read into
frozen dataclasses by :func:`load_dataclass`, driven by the fields themselves: the type
annotation gives the expected TOML type, :func:`setting` declares the default, range,
allowed choices, unit and description. A key the file leaves out takes the field's
default, which therefore lives only in the dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from plant_models.errors import ConfigError

T = TypeVar("T")

__all__ = [
    "ParameterFile",
    "check_keys",
    "load_dataclass",
    "load_fields",
    "load_parameters",
    "load_toml",
    "param",
    "parameter_table",
    "setting",
]


def setting(
    default: Any = dataclasses.MISSING,
    *,
    default_factory: Callable[[], Any] | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    choices: Sequence[str] | None = None,
    unit: str = "",
    description: str = "",
    key: str | None = None,
) -> Any:
    """Declare a dataclass field of a settings file (see :func:`load_dataclass`).

    Args:
        default, default_factory: as for :func:`dataclasses.field`; none of them: the key
            is required in a file.
        low, high: inclusive range of a number (of each number of a table or pair);
            None: unbounded on that side. A declared range also rejects nan and inf.
        low_open: if true, ``low`` itself is excluded (e.g. strictly positive values).
        choices: the allowed values of a string.
        unit, description: for docs and error messages (for a table of numbers the
            description names one entry, e.g. "weight").
        key: the key in the file when it differs from the field name.
    """
    metadata = {
        "unit": unit,
        "low": low,
        "high": high,
        "low_open": low_open,
        "description": description,
        "choices": None if choices is None else tuple(choices),
        "key": key,
    }
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def param(unit: str, low: float, high: float, description: str, *, low_open: bool = False) -> Any:
    """Declare a dataclass field as a physical parameter.

    Args:
        unit: canonical unit (the file must state the same unit).
        low, high: inclusive physical range.
        description: one line for docs and error messages.
        low_open: if true, ``low`` itself is excluded (e.g. strictly positive values).
    """
    return setting(unit=unit, low=low, high=high, low_open=low_open, description=description)


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


#: The largest configuration file read (bytes). Every hmpc TOML file is a few kB; a file
#: far larger is a wrong path or an attack, refused before it is parsed or echoed.
MAX_CONFIG_BYTES = 1_000_000


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning I/O, size, encoding and syntax errors into
    :class:`ConfigError` naming the file (a message never echoes the file's content)."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            raw = fh.read(MAX_CONFIG_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{p}: file not found.") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a folder, not a TOML file.") from None
    except OSError as exc:
        raise ConfigError(f"{p}: cannot be read ({exc.strerror}).") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{p}: larger than {MAX_CONFIG_BYTES // 1000} kB; a configuration file is a few kB "
            "(wrong file?)."
        )
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"{p}: not UTF-8 text (byte 0x{raw[exc.start]:02x} on line {line}); "
            "save the file as UTF-8."
        ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{p}: not valid TOML ({exc}).") from None


def check_range(value: float, meta: Mapping[str, Any], where: str) -> None:
    """Check one number against the range declared in a field's metadata (``low`` or
    ``high`` None: unbounded on that side; an empty unit or description is left out)."""
    low = -math.inf if meta.get("low") is None else float(meta["low"])
    high = math.inf if meta.get("high") is None else float(meta["high"])
    low_ok = value > low if meta.get("low_open") else value >= low
    if not math.isfinite(value) or not low_ok or value > high:
        bracket = "(" if meta.get("low_open") else "["
        unit = f" {meta['unit']}" if meta.get("unit") else ""
        about = f" ({meta['description']})" if meta.get("description") else ""
        raise ConfigError(
            f"{where} = {value!r}{unit} is outside its physical range "
            f"{bracket}{low:g}, {high:g}]{unit}{about}."
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


# -- settings files: dataclasses driven by their fields' metadata ---------------------------


def load_dataclass(cls: type[T], table: Any, where: str, *, root: bool = False) -> T:
    """Build the frozen dataclass ``cls`` from a parsed TOML table, checking every key.

    Unknown keys are rejected with close-match suggestions; a key left out takes the field's
    default (a field without default is required); each value is checked against the
    field's type annotation and :func:`setting` metadata:

    * ``bool``: true or false only; ``int``: a whole number, not a boolean; ``float``: a
      number (an integer is taken as a float), not a boolean; ``str``: a string, one of
      ``choices`` when declared; ``X | None``: as ``X`` (a file has no null);
    * ``tuple[float, float]`` (any fixed length) or ``tuple[str, ...]``: a TOML array;
    * ``Mapping[str, X]``: a table of name = X (read-only ``MappingProxyType``); the
      field's range applies to every number in it;
    * a dataclass: a sub-table, loaded recursively with that dataclass's own metadata.

    Args:
        cls: the dataclass.
        table: the parsed TOML table (anything else is an error).
        where: the file and table for messages, e.g. ``"configs/mpc.toml [solver]"``.
        root: ``table`` is a whole file: its sub-tables are named ``[key]`` in messages.
    Raises:
        ConfigError: naming ``where``, the key, the value and what is allowed.
    """
    return cls(**load_fields(cls, table, where, root=root))


def load_fields(
    cls: type[Any],
    table: Any,
    where: str,
    *,
    names: Iterable[str] | None = None,
    extra: Iterable[str] = (),
    required: Iterable[str] = (),
    root: bool = False,
) -> dict[str, Any]:
    """The checked values of some fields of ``cls`` found in ``table``, by field name.

    Use it when one dataclass is spread over several tables of a file, or when the values
    go on top of another instance (``dataclasses.replace``). Keys left out are left out of
    the result (the dataclass supplies its default). Checks as :func:`load_dataclass`.

    Args:
        names: the fields that live in this table (default: all of them).
        extra: further keys the table may hold, read by the caller.
        required: keys the file must state even though their fields have defaults.
    """
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where}: must be a table, got {table!r}.")
    wanted = None if names is None else set(names)
    fields = {
        f.metadata.get("key") or f.name: f
        for f in dataclasses.fields(cls)
        if wanted is None or f.name in wanted
    }
    must = [k for k, f in fields.items() if not _has_default(f)]
    must += [k for k in required if k not in must]
    check_keys(table, [*fields, *extra], where, required=must)
    hints = typing.get_type_hints(cls)  # resolves `from __future__ import annotations`
    out: dict[str, Any] = {}
    for key, f in fields.items():
        if key in table:
            at = f"{where} [{key}]" if root else f"{where} {key}"
            out[f.name] = _convert(hints[f.name], table[key], at, f.metadata)
    return out


def _has_default(f: dataclasses.Field[Any]) -> bool:
    return f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING


def _convert(tp: Any, value: Any, where: str, meta: Mapping[str, Any]) -> Any:
    """Check ``value`` against the type ``tp`` and the metadata ``meta``; the loaded value."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        inner = [a for a in args if a is not type(None)]
        if len(inner) != 1:
            raise TypeError(f"{where}: unsupported field type {tp!r}.")
        return _convert(inner[0], value, where, meta)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise ConfigError(f"{where}: must be a table {_describe(tp)}, got {value!r}.")
        return load_dataclass(tp, value, where)  # type: ignore[arg-type]
    if origin in (Mapping, dict):
        if not isinstance(value, Mapping):
            entry = meta.get("description") or _describe(args[1], article=False)
            raise ConfigError(f"{where}: must be a table of name = {entry}, got {value!r}.")
        return types.MappingProxyType(
            {str(k): _convert(args[1], v, f"{where} {k}", meta) for k, v in value.items()}
        )
    if origin is tuple:
        items = args[:1] * len(value) if len(args) == 2 and args[1] is Ellipsis else args
        if (
            not isinstance(value, list | tuple)
            or len(value) != len(items)
            or not all(_is_a(t, v) for t, v in zip(items, value, strict=True))
        ):
            raise ConfigError(f"{where}: must be {_describe(tp)}, got {value!r}.")
        return tuple(_convert(t, v, where, meta) for t, v in zip(items, value, strict=True))
    if tp in (bool, int, float, str):
        return _scalar(tp, value, where, meta)
    raise TypeError(f"{where}: unsupported field type {tp!r}.")


def _is_a(tp: Any, value: Any) -> bool:
    """Whether ``value`` has the TOML type that the scalar type ``tp`` asks for."""
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, int | float) and not isinstance(value, bool)
    return isinstance(value, tp)


def _scalar(tp: type, value: Any, where: str, meta: Mapping[str, Any]) -> Any:
    choices = meta.get("choices")
    if choices is not None:
        if value not in choices:
            raise ConfigError(
                f"{where} = {value!r} is not allowed.{suggest(str(value), choices)} "
                f"Allowed: {', '.join(choices)}."
            )
        return value
    if not _is_a(tp, value):
        raise ConfigError(f"{where}: must be {_describe(tp)}, got {value!r}.")
    if tp is int:
        low, high = meta.get("low"), meta.get("high")
        if (low is not None and value < low) or (high is not None and value > high):
            lo = "-inf" if low is None else low
            hi = "inf" if high is None else high
            raise ConfigError(f"{where} = {value} is outside its range [{lo}, {hi}].")
        return int(value)
    if tp is float:
        if meta.get("low") is not None or meta.get("high") is not None:
            check_range(float(value), meta, where)
        return float(value)
    return value


def _describe(tp: Any, *, article: bool = True) -> str:
    """What a file must hold for the type ``tp``, for messages ("a number", "[number,
    number]", "{ low = ..., high = ... }")."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        keys = [f.metadata.get("key") or f.name for f in dataclasses.fields(tp)]
        return "{ " + ", ".join(f"{k} = ..." for k in keys) + " }"
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0], article=False)}s"
        return "[" + ", ".join(_describe(a, article=False) for a in args) + "]"
    if origin in (Mapping, dict):
        return f"a table of name = {_describe(args[1], article=False)}"
    nouns = {bool: "true or false", int: "whole number", float: "number", str: "string"}
    if tp not in nouns:
        return repr(tp)
    return f"a {nouns[tp]}" if article and tp is not bool else nouns[tp]
